"""The agent delivering to S3: moto's real HTTP server on loopback, reached through aioboto3, with the
fault-injecting proxy in front of it for outages, corruption and counting. The agent is the real
process; faults are real connections refused, hung or altered, and a real kill."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from agent_harness import PASSPHRASE, Agent, Setup, drop, make_keyring, spool_files
from s3_support import boto3_client, make_kms_key, unique_bucket

from mediaseal import codec
from mediaseal.keys.keyring import Keyring

MiB = 1 << 20
PREFIX = "site-a"


def s3_setup(tmp_path: Path, template: Path, endpoint: str, bucket: str, **repo: Any) -> Setup:
    setup = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring", template),
                  watches=[{"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename"}])
    setup.repo.update(url=f"s3://{bucket}/{PREFIX}", endpoint_url=endpoint, region="us-east-1",
                      part_size="5MiB", put_threshold="6MiB", quarantine_seconds=1.0, **repo)
    return setup


def bucket_contents(endpoint: str, bucket: str, keyring: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """original name -> (SHA-256 of the decrypted object, its HeadObject), for every object."""
    s3 = boto3_client(endpoint)
    unwrapper = Keyring.open(keyring).unlock(PASSPHRASE)
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            reader = codec.open_package(io.BytesIO(body), unwrapper)
            plain = io.BytesIO()
            reader.decrypt_to(plain)
            meta = reader.header.metadata
            c = meta.captured_at
            assert obj["Key"] == f"{PREFIX}/call/{c[:4]}/{c[5:7]}/{c[8:10]}/{meta.recording_id}.mseal"
            assert meta.original_name not in out, f"{meta.original_name} delivered twice"
            head = s3.head_object(Bucket=bucket, Key=obj["Key"])
            # The digest the agent computed from the spool file before uploading, checked by S3 on
            # the way in: it must be the SHA-256 of exactly the bytes stored.
            assert head["Metadata"]["package-sha256"] == hashlib.sha256(body).hexdigest()
            out[meta.original_name] = (hashlib.sha256(plain.getvalue()).hexdigest(), head)
    return out


def no_multipart_left(endpoint: str, bucket: str) -> bool:
    return not boto3_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads")


def wait_drained(agent: Agent, setup: Setup, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while list(setup.capture().iterdir()) or spool_files(setup.spool):
        agent.wait_for(("delivered", "disposed"), timeout=max(1.0, deadline - time.monotonic()))


def test_thirty_recordings_arrive_with_metadata_and_sse(tmp_path: Path, keyring_template: Path,
                                                        moto_server: Any, s3_bucket: str) -> None:
    setup = s3_setup(tmp_path, keyring_template, moto_server.url, s3_bucket, sse="AES256")
    agent = Agent(setup)
    agent.wait_for("ready")
    rng = random.Random(30)
    sizes = [0, 1, 7 * MiB, 13 * MiB] + [rng.randrange(0, 300_000) for _ in range(26)]
    ledger = {f"c{i:02d}.wav": drop(setup.capture(), f"c{i:02d}.wav", rng.randbytes(n))
              for i, n in enumerate(sizes)}
    agent.wait_for("delivered", count=len(ledger), timeout=180)
    assert agent.stop() == 0
    got = bucket_contents(moto_server.url, s3_bucket, setup.keyring)
    assert {n: h for n, (h, _) in got.items()} == ledger
    kid = Keyring.open(setup.keyring).current().kid
    for _, head in got.values():
        assert head["ServerSideEncryption"] == "AES256"
        assert head["Metadata"]["kid"] == kid and head["Metadata"]["kind"] == "call"
        assert head["Metadata"]["format-version"] == "1"
    assert spool_files(setup.spool) == [] and list(setup.capture().iterdir()) == []
    assert no_multipart_left(moto_server.url, s3_bucket)


def test_sse_kms(tmp_path: Path, keyring_template: Path, moto_server: Any, s3_bucket: str) -> None:
    key = make_kms_key(moto_server.url)
    setup = s3_setup(tmp_path, keyring_template, moto_server.url, s3_bucket, sse="aws:kms", sse_kms_key_id=key)
    agent = Agent(setup)
    agent.wait_for("ready")
    sha = drop(setup.capture(), "k.wav", b"kms" * 10_000)
    agent.wait_for("delivered")
    agent.stop()
    ((h, head),) = bucket_contents(moto_server.url, s3_bucket, setup.keyring).values()
    assert h == sha
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key


def test_outage_refused_then_hanging_then_back(tmp_path: Path, keyring_template: Path, moto_server: Any,
                                               s3_bucket: str, fault_proxy: Any) -> None:
    setup = s3_setup(tmp_path, keyring_template, fault_proxy.url, s3_bucket, read_timeout=2.0, connect_timeout=2.0)
    agent = Agent(setup, env={"MEDIASEAL_AGENT__STOP_TIMEOUT_SECONDS": "2"})
    agent.wait_for("ready")
    fault_proxy.refuse()
    ledger = {f"o{i}.wav": drop(setup.capture(), f"o{i}.wav", random.randbytes(50_000)) for i in range(6)}
    retries = agent.wait_for("delivery-retry", count=4, timeout=60)
    fault_proxy.listen()
    fault_proxy.hang(times=None)  # accepts, then never answers: the read timeout ends each attempt
    agent.wait_for("delivery-retry", count=1, timeout=120)
    fault_proxy.clear()
    wait_drained(agent, setup)
    assert agent.stop() == 0
    got = bucket_contents(moto_server.url, s3_bucket, setup.keyring)
    assert {n: h for n, (h, _) in got.items()} == ledger
    # The backoff envelope: with six recordings waiting, the outage costs one probe per interval
    # for the whole repository, and the intervals grow.
    times = [r["ts"] for r in retries]
    assert len(set(r["recording_id"] for r in retries)) <= len(retries)
    gaps = [_secs(b) - _secs(a) for a, b in itertools.pairwise(times)]
    assert gaps[-1] >= gaps[0] * 1.5 or gaps[-1] >= 1.0, gaps


def _secs(ts: str) -> float:
    import calendar

    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000


def test_a_flipped_byte_is_detected_and_resent(tmp_path: Path, keyring_template: Path, moto_server: Any,
                                               s3_bucket: str, fault_proxy: Any) -> None:
    setup = s3_setup(tmp_path, keyring_template, fault_proxy.url, s3_bucket)
    fault_proxy.flip(when=lambda r: r.op == "PutObject", times=1)
    agent = Agent(setup)
    agent.wait_for("ready")
    sha = drop(setup.capture(), "flip.wav", random.randbytes(200_000))
    # The repository sees the echoed ETag disagree with the bytes it sent and sends them again from
    # the spool before it ever reports success: one delivery, two PUTs, the first one altered.
    agent.wait_for("delivered", timeout=60)
    agent.stop()
    assert fault_proxy.count("PutObject", "flip") == 1 and fault_proxy.count("PutObject") == 2
    ((h, _),) = bucket_contents(moto_server.url, s3_bucket, setup.keyring).values()
    assert h == sha


def test_crash_mid_multipart_resumes_without_resending_parts(tmp_path: Path, keyring_template: Path,
                                                             moto_server: Any, s3_bucket: str,
                                                             fault_proxy: Any) -> None:
    setup = s3_setup(tmp_path, keyring_template, fault_proxy.url, s3_bucket, concurrency=1)
    setup.repo["concurrency"] = 1  # one part in flight: the kill lands between parts
    data = random.randbytes(28 * MiB)  # 6 parts of 5 MiB
    setup.capture().mkdir()
    sha = drop(setup.capture(), "long-call.wav", data)
    crashed = Agent(setup, env={"MEDIASEAL_CRASH_AT": "after-part-saved:4"})  # upload id, then 3 parts
    assert crashed.exited() == 86, "\n".join(crashed.lines[-10:])
    (manifest,) = [json.loads(p.read_bytes()) for p in (setup.spool / "packages").glob("*.json")]
    saved = {p["n"] for p in manifest["upload"]["parts"]}
    assert saved == {1, 2, 3}
    sent_before = fault_proxy.count("UploadPart")
    agent = Agent(setup)
    agent.wait_for("delivered", timeout=120)
    assert agent.stop() == 0
    resent = [r.part for r in fault_proxy.requests("UploadPart")][sent_before:]
    assert sorted(resent) == [4, 5, 6]  # the completed parts were not sent again
    assert fault_proxy.count("CreateMultipartUpload") == 1
    ((h, _),) = bucket_contents(moto_server.url, s3_bucket, setup.keyring).values()
    assert h == sha
    assert no_multipart_left(moto_server.url, s3_bucket)


def test_no_such_bucket_is_quarantined_then_delivered_once_created(tmp_path: Path, keyring_template: Path,
                                                                   moto_server: Any) -> None:
    bucket = unique_bucket("late")
    setup = s3_setup(tmp_path, keyring_template, moto_server.url, bucket)
    agent = Agent(setup)
    agent.wait_for("ready")
    sha = drop(setup.capture(), "q.wav", b"q" * 70_000)
    (ev,) = agent.wait_for("delivery-quarantined", timeout=60)
    assert "NoSuchBucket" in ev["error"] or "bucket" in ev["error"].lower()
    assert len(spool_files(setup.spool)) == 2  # package and manifest wait in the spool
    boto3_client(moto_server.url).create_bucket(Bucket=bucket)
    agent.wait_for("delivered", timeout=60)  # no restart
    agent.stop()
    ((h, _),) = bucket_contents(moto_server.url, bucket, setup.keyring).values()
    assert h == sha



def test_sigterm_mid_upload_stops_in_bounded_time_and_resumes(tmp_path: Path, keyring_template: Path,
                                                              moto_server: Any, s3_bucket: str,
                                                              fault_proxy: Any) -> None:
    setup = s3_setup(tmp_path, keyring_template, fault_proxy.url, s3_bucket, concurrency=1)
    fault_proxy.delay(3.0, when=lambda r: r.op == "UploadPart")  # every part takes seconds to go up
    agent = Agent(setup, env={"MEDIASEAL_AGENT__STOP_TIMEOUT_SECONDS": "1"})
    agent.wait_for("ready")
    sha = drop(setup.capture(), "long.wav", random.randbytes(12 * MiB))  # 3 parts
    agent.wait_for("spooled")
    while fault_proxy.count("UploadPart") == 0:  # woken by the agent's own progress, bounded below
        agent.wait_for("rescan-done", timeout=30)
    t0 = time.monotonic()
    assert agent.stop(timeout=30) == 0
    assert time.monotonic() - t0 < 5  # stop_timeout 1 s, plus start-up of nothing new
    assert len(spool_files(setup.spool)) == 2  # package and manifest kept for the next run
    fault_proxy.clear()
    again = Agent(setup)
    again.wait_for("delivered", timeout=60)
    assert again.stop() == 0
    ((h, _),) = bucket_contents(moto_server.url, s3_bucket, setup.keyring).values()
    assert h == sha
    assert no_multipart_left(moto_server.url, s3_bucket)
