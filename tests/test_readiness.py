"""Readiness tells the truth (DESIGN invariant 7; issue 14 observation 9).

A capture directory that is missing (a typo, a share not mounted) or a bucket that does not exist
kept /readyz at 200 and `mediaseal_ready 1`, with one warning at start, while the agent sealed or
delivered nothing. Now each is a 503 naming the reason, with a gauge (`mediaseal_watch_up{watch=...}`,
`mediaseal_repository_up`), and readiness comes back by itself once the directory or the bucket is
there. Real agent processes, moto's real S3 server on loopback; waits on log events, not sleeps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent, Setup, decrypt_all, drop, make_keyring
from s3_support import boto3_client, unique_bucket
from test_service import get, metrics_env


@pytest.fixture(scope="module")
def keyring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keyring(tmp_path_factory.mktemp("kr") / "keyring")


def gauge(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    (value,) = [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]
    return float(value)


def ready_within(agent: Agent, base: str, want: int, timeout: float = 60.0) -> dict[str, Any]:
    """/readyz until it answers `want`, woken by the agent's own probe events (every 10 s at most)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = get(f"{base}/readyz")
        if status == want:
            return dict(json.loads(body))
        assert time.monotonic() < deadline, (status, body)
        agent.wait_for(("watch-ready", "watch-not-ready", "repository-ready", "repository-not-ready", "delivered"),
                       timeout=max(1.0, deadline - time.monotonic()))


class _MissingSecondWatch(Setup):
    """The config names a second capture directory that does not exist when the agent starts."""

    def config(self) -> Path:
        cfg = super().config()
        self.capture(1).rmdir()
        return cfg


def test_a_missing_capture_directory_is_not_ready_until_it_appears(tmp_path: Path, keyring_template: Path) -> None:
    setup = _MissingSecondWatch(
        root=tmp_path, keyring=make_keyring(tmp_path / "keyring", keyring_template),
        watches=[{"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename"},
                 {"path": str(tmp_path / "mnt" / "scren-captures"), "kind": "screen", "completion": "rename"}])
    agent = Agent(setup, env=metrics_env())
    (listening,) = agent.wait_for("metrics-listening")
    base = f"http://{listening['address']}"
    agent.wait_for("ready")
    missing = str(setup.capture(1))
    status, _, body = get(f"{base}/readyz")
    doc = json.loads(body)
    assert status == 503 and doc["reason"].startswith("watches:") and missing in doc["reason"], doc
    assert "does not exist" in doc["reason"]
    _, _, text = get(f"{base}/metrics")
    assert gauge(text, "mediaseal_ready") == 0.0
    assert gauge(text, "mediaseal_watch_up", f'watch="{missing}"') == 0.0
    assert gauge(text, "mediaseal_watch_up", f'watch="{setup.capture(0)}"') == 1.0
    # The other watch works meanwhile.
    sha = drop(setup.capture(0), "a.wav", os.urandom(10_000))
    agent.wait_for("delivered")

    setup.capture(1).mkdir(parents=True)  # mounted at last
    ready_within(agent, base, 200)
    _, _, text = get(f"{base}/metrics")
    assert gauge(text, "mediaseal_watch_up", f'watch="{missing}"') == 1.0 and gauge(text, "mediaseal_ready") == 1.0
    sha2 = drop(setup.capture(1), "s.mp4", os.urandom(10_000))
    agent.wait_for("delivered")
    assert agent.stop() == 0
    assert decrypt_all(setup.repository, setup.keyring) == {"a.wav": [sha], "s.mp4": [sha2]}


def test_a_bucket_that_does_not_exist_is_not_ready_until_it_is_created(tmp_path: Path, keyring_template: Path,
                                                                      moto_server: Any) -> None:
    bucket = unique_bucket("absent")
    setup = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring", keyring_template),
                  watches=[{"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename"}])
    setup.repo.update(url=f"s3://{bucket}/site", endpoint_url=moto_server.url, region="us-east-1",
                      quarantine_seconds=1.0)
    agent = Agent(setup, env=metrics_env())
    (listening,) = agent.wait_for("metrics-listening")
    base = f"http://{listening['address']}"
    (down,) = agent.wait_for("repository-not-ready")
    assert "NoSuchBucket" in down["error"], down
    agent.wait_for("ready")
    status, _, body = get(f"{base}/readyz")  # no delivery attempted yet: the probe alone says so
    doc = json.loads(body)
    assert status == 503 and doc["reason"].startswith("repository:") and "NoSuchBucket" in doc["reason"], doc
    _, _, text = get(f"{base}/metrics")
    assert gauge(text, "mediaseal_ready") == 0.0 and gauge(text, "mediaseal_repository_up") == 0.0

    boto3_client(moto_server.url).create_bucket(Bucket=bucket)
    agent.wait_for("repository-ready", timeout=60)
    ready_within(agent, base, 200)
    _, _, text = get(f"{base}/metrics")
    assert gauge(text, "mediaseal_repository_up") == 1.0 and gauge(text, "mediaseal_ready") == 1.0
    drop(setup.capture(), "late.wav", os.urandom(10_000))
    agent.wait_for("delivered", timeout=60)
    assert agent.stop() == 0
