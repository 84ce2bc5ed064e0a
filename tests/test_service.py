"""Service glue with the real agent: sd_notify against a real AF_UNIX datagram socket standing in for
systemd, the health/metrics listener over real HTTP, and `mediaseal status` from the manifests.

Synchronisation is on the agent's JSON log events and on the datagrams themselves, never on sleeps.
"""

from __future__ import annotations

import calendar
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_harness import ROOT, Agent, Setup, drop, make_keyring
from support.waits import wait_until

from mediaseal.buffer.spool import Manifest
from mediaseal.plumbing.notify import Notifier, notify_address, watchdog_seconds

WATCHDOG_USEC = 1_200_000  # WatchdogSec=1.2 s: pings every 0.4 s, never a gap of 1.2 s


# -- a stand-in for systemd's notification socket ----------------------------------------------------


@dataclass
class Datagram:
    at: float  # time.time() on receipt
    fields: dict[str, str]
    observed: dict[str, Any]  # what `probe` saw at the moment of receipt


class FakeSystemd:
    """A bound AF_UNIX datagram socket (a path, or abstract with '@'), received on a thread."""

    def __init__(self, address: str, probe: Callable[[], dict[str, Any]] | None = None) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.probe = probe or dict
        self.got: list[Datagram] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.time()
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            d = Datagram(at, fields, self.probe() if "READY" in fields else {})
            with self._cond:
                self.got.append(d)
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Datagram], bool], timeout: float = 30.0) -> Datagram:
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for d in self.got[seen:]:
                    if predicate(d):
                        return d
                seen = len(self.got)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching datagram; got {[d.fields for d in self.got]}")
                self._cond.wait(left)

    def messages(self, key: str) -> list[Datagram]:
        with self._cond:
            return [d for d in self.got if key in d.fields]

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()


def log_time(event: dict[str, Any]) -> float:
    ts = event["ts"]  # 2026-11-28T18:00:00.123Z, truncated to the millisecond
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000


def metrics_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"MEDIASEAL_METRICS__ENABLED": "true", "MEDIASEAL_METRICS__LISTEN": "127.0.0.1:0", **(extra or {})}


def get(url: str, accept: str = "") -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def sample(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    (value,) = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


# -- sd_notify, unit level -------------------------------------------------------------------------


def test_notify_socket_addresses() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/123") == "\0/org/freedesktop/systemd1/notify/123"
    assert notify_address(None) is None and notify_address("") is None
    assert notify_address("vsock:2:1234") is None


def test_watchdog_from_environment() -> None:
    assert watchdog_seconds({}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None  # not for us
    assert watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "soon"}) is None


def test_notifier_path_and_abstract_sockets_and_no_socket(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for address in (str(tmp_path / "n.sock"), f"@mediaseal-test-{os.getpid()}-unit"):
        fake = FakeSystemd(address)
        try:
            n = Notifier({"NOTIFY_SOCKET": address})
            assert n.enabled and n.send("READY=1", "STATUS=hello world")
            d = fake.wait_for(lambda d: "READY" in d.fields, timeout=5)
            assert d.fields == {"READY": "1", "STATUS": "hello world"}
            n.close()
        finally:
            fake.close()
    assert not Notifier({}).enabled and Notifier({}).send("READY=1") is False
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="mediaseal"):
        assert gone.send("WATCHDOG=1") is False and gone.send("WATCHDOG=1") is False
    assert [r.getMessage() for r in caplog.records].count("sd-notify-failed") == 1  # warned once, never raised


# -- the real agent and a real notification socket ---------------------------------------------------


def test_sd_notify_lifecycle_ready_watchdog_status_stopping(setup: Setup, tmp_path: Path) -> None:
    # A leftover of a crashed run: recovery removes it, and READY=1 must come only after that.
    staging = setup.spool / "staging"
    staging.mkdir(parents=True)
    leftover = staging / "20260101T000000Z-deadbeef.mseal.part"
    leftover.write_bytes(b"\x8f" * 100)
    fake = FakeSystemd(str(tmp_path / "notify.sock"), probe=lambda: {"leftover": leftover.exists()})
    try:
        agent = Agent(setup, env={"NOTIFY_SOCKET": fake.env_value, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        ready = fake.wait_for(lambda d: d.fields.get("READY") == "1")
        (key_loaded,) = agent.wait_for("key-current")
        (logged_ready,) = agent.wait_for("ready")
        assert ready.observed == {"leftover": False}  # recovery finished before READY=1
        assert log_time(key_loaded) <= log_time(logged_ready) <= ready.at  # after the first key load
        assert "awaiting delivery" in ready.fields["STATUS"] and int(ready.fields["MAINPID"]) == agent.proc.pid
        before = [d.fields.get("STATUS") for d in fake.got[: fake.got.index(ready)] if "STATUS" in d.fields]
        assert before[0] == "starting" and "recovering the spool" in before

        data = drop(setup.capture(), "call.wav", os.urandom(50_000))
        agent.wait_for("delivered")
        assert data

        # The watchdog: pings keep coming from the event loop at less than WatchdogSec/2 apart.
        first = len(fake.messages("WATCHDOG"))
        fake.wait_for(lambda d: len(fake.messages("WATCHDOG")) >= first + 4, timeout=10)
        pings = [d.at for d in fake.messages("WATCHDOG")]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # Pings come every third of WatchdogSec; systemd acts only when one is later than WatchdogSec, so
        # that is the bound that must hold on a loaded machine (an event loop busy in Python, or a
        # pinger that stopped, breaks it; scheduling jitter of a few hundred ms does not).
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

        agent.proc.send_signal(signal.SIGTERM)
        stopping = fake.wait_for(lambda d: d.fields.get("STOPPING") == "1")
        assert stopping.fields["STATUS"].startswith("stopping")
        assert agent.exited() == 0
        assert all(v == "1" for d in fake.got for k, v in d.fields.items() if k in ("READY", "WATCHDOG"))
        assert len(fake.messages("READY")) == 1
    finally:
        fake.close()


def test_no_ready_without_a_valid_key(setup: Setup, tmp_path: Path) -> None:
    (setup.keyring / "keyring.json").write_text("{not json")
    fake = FakeSystemd(f"@mediaseal-test-{os.getpid()}-nokey")
    try:
        agent = Agent(setup, env={"NOTIFY_SOCKET": fake.env_value})
        assert agent.exited() == 1
        fake.wait_for(lambda d: d.fields.get("STOPPING") == "1", timeout=5)
        assert fake.messages("READY") == []
        assert any("no valid public key" in line for line in agent.lines)
    finally:
        fake.close()


def test_health_metrics_readiness_and_status_while_running(setup: Setup) -> None:
    # Abstract socket this time, and the listener on an ephemeral port (the log says which).
    fake = FakeSystemd(f"@mediaseal-test-{os.getpid()}-health")
    try:
        agent = Agent(setup, env=metrics_env({"NOTIFY_SOCKET": fake.env_value, "WATCHDOG_USEC": "900000"}))
        (listening,) = agent.wait_for("metrics-listening")
        base = f"http://{listening['address']}"
        fake.wait_for(lambda d: d.fields.get("READY") == "1")

        status, ctype, body = get(f"{base}/healthz")
        assert status == 200 and ctype.startswith("application/json") and json.loads(body)["alive"] is True
        status, _, body = get(f"{base}/readyz")
        doc = json.loads(body)
        assert status == 200 and doc["ready"] is True, doc
        assert {k: v["ok"] for k, v in doc["checks"].items()} == {"keys": True, "watches": True, "spool": True,
                                                              "repository": True}

        drop(setup.capture(), "one.wav", os.urandom(40_000))
        agent.wait_for("delivered")
        status, ctype, text = get(f"{base}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert 'mediaseal_recordings_delivered_total{kind="call"} 1.0' in text
        assert 'mediaseal_recordings_encrypted_total{kind="call"} 1.0' in text
        assert 'mediaseal_recordings_discovered_total{kind="call"} 1.0' in text  # once, not per component
        for name in ("mediaseal_bytes_in_total 40000.0", "mediaseal_oldest_undelivered_age_seconds 0.0",
                     "mediaseal_packages_quarantined 0.0", "mediaseal_ready 1.0", "mediaseal_spool_packages 0.0",
                     "mediaseal_current_kid_info{kid=", "mediaseal_keyset_age_seconds ",
                     "mediaseal_encrypt_seconds_bucket", "mediaseal_upload_seconds_count 1.0",
                     "mediaseal_watcher_rescans_total", "mediaseal_spool_manifests{state=\"spooled\"} 0.0"):
            assert name in text, name
        # What a Prometheus user expects (issue 14): the standard process and platform collectors, no
        # `_created` series, failure counters at 0 for every known reason, a gauge per watch.
        assert "process_resident_memory_bytes " in text and "process_open_fds " in text and "python_info{" in text
        assert "_created" not in text
        for reason in ("unreadable", "too-large-for-spool", "spool-full"):
            assert f'mediaseal_recordings_failed_total{{reason="{reason}",stage="intake"}} 0.0' in text, reason
        assert 'mediaseal_recordings_failed_total{reason="quarantined",stage="upload"} 0.0' in text
        assert f'mediaseal_watch_up{{watch="{setup.capture()}"}} 1.0' in text and "mediaseal_repository_up 1.0" in text
        status, ctype, _ = get(f"{base}/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and ctype.startswith("application/openmetrics-text")

        # The repository goes away (an unmounted share): deliveries fail, /readyz says why.
        setup.repository.rename(setup.root / "repository.away")
        drop(setup.capture(), "two.wav", os.urandom(30_000))
        agent.wait_for("delivery-retry")
        status, _, body = get(f"{base}/readyz")
        doc = json.loads(body)
        assert status == 503 and doc["ready"] is False and doc["reason"].startswith("repository:"), doc
        assert "not there" in doc["reason"]
        fake.wait_for(lambda d: "last error" in d.fields.get("STATUS", "") and "1 awaiting" in d.fields["STATUS"])
        status, _, text = get(f"{base}/metrics")
        assert "mediaseal_ready 0.0" in text and 'mediaseal_spool_manifests{state="spooled"} 1.0' in text
        assert sample(text, "mediaseal_oldest_undelivered_age_seconds") > 0

        # `mediaseal status` while the agent runs: the manifests plus the agent's live view.
        listen_env = metrics_env({"MEDIASEAL_METRICS__LISTEN": listening["address"]})
        out = status_cmd(setup, "--json", env=listen_env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["packages"] == 1 and report["counts"]["spooled"] + report["counts"]["uploading"] == 1
        assert report["oldest"]["kind"] == "call" and report["oldest"]["age_seconds"] >= 0
        assert report["agent"]["running"] is True and report["agent"]["ready"] is False
        assert report["agent"]["last_error"]["event"] == "delivery-retry"
        text_out = status_cmd(setup, env=listen_env).stdout
        assert "agent: running, NOT ready: repository:" in text_out and "packages   1" in text_out

        # Back again: the retry delivers it and the agent is ready once more.
        (setup.root / "repository.away").rename(setup.repository)
        agent.wait_for("delivered")
        status, _, body = get(f"{base}/readyz")
        assert status == 200, body
        assert agent.stop() == 0
    finally:
        fake.close()


def test_listener_that_cannot_bind_is_a_clear_error(setup: Setup) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = Agent(setup, env=metrics_env({"MEDIASEAL_METRICS__LISTEN": f"127.0.0.1:{port}"}))
        assert agent.exited() == 1
    assert any(f"metrics.listen 127.0.0.1:{port}: cannot listen" in line for line in agent.lines), agent.lines


# -- mediaseal status without an agent ---------------------------------------------------------------


def status_cmd(setup: Setup, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    return subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", "status", "--config",
                           str(setup.root / "mediaseal.toml"), *args], capture_output=True, text=True,
                          env={**inherited, **(env or {})}, cwd=ROOT, timeout=30, check=False)


def write_manifest(packages: Path, rid: str, state: str, created_at: float, attempts: int = 0,
                   last_error: str = "") -> None:
    m = Manifest(recording_id=rid, kind="call", repo_key=f"call/2026/01/01/{rid}.mseal", package_size=1000,
                 sha256="00" * 32, kid="kid", source=f"/capture/{rid}.wav", identity={}, dispose="delete",
                 state=state, created_at=created_at, attempts=attempts, last_error=last_error)
    (packages / f"{rid}.json").write_bytes(m.to_json())
    (packages / f"{rid}.mseal").write_bytes(b"\x00" * 1000)


def test_status_from_manifests_with_no_agent_and_no_keys(setup: Setup) -> None:
    setup.config()
    packages = setup.spool / "packages"
    packages.mkdir(parents=True)
    (setup.spool / "staging").mkdir()
    now = time.time()
    write_manifest(packages, "a-old", "uploading", now - 7200, attempts=3, last_error="AccessDenied: bucket policy")
    write_manifest(packages, "b", "spooled", now - 60)
    write_manifest(packages, "c", "spooled", now - 5, attempts=1, last_error="timeout")
    (packages / ".d.json.tmp").write_bytes(b"{torn")  # a manifest being replaced: not counted
    # No keys are needed: the keyring is unreadable garbage, and status doesn't care.
    (setup.keyring / "keyring.json").write_text("{not json")
    # Nothing listens on the metrics port: the agent is reported as not running.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    env = {"MEDIASEAL_METRICS__ENABLED": "true", "MEDIASEAL_METRICS__LISTEN": f"127.0.0.1:{free}"}
    out = status_cmd(setup, "--json", env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["counts"] == {"spooled": 2, "uploading": 1, "verified": 0}
    assert doc["packages"] == 3 and doc["bytes"] == 3000 and doc["staging"] == 0 and doc["unreadable"] == 0
    assert doc["oldest"]["recording_id"] == "a-old" and 7190 <= doc["oldest"]["age_seconds"] <= 7300
    assert [(e["recording_id"], e["attempts"]) for e in doc["errors"]] == [("a-old", 3), ("c", 1)]
    assert doc["agent"]["running"] is False
    text = status_cmd(setup, env=env).stdout
    assert "spooled    2" in text and "uploading  1" in text and "a-old  uploading  attempts=3  AccessDenied" in text
    assert "(2h 0m ago)" in text and "agent: not running" in text

    (packages / "b.json").write_text("not json")
    doc = json.loads(status_cmd(setup, "--json", "--no-agent").stdout)
    assert doc["unreadable"] == 1 and doc["agent"]["running"] is None


def test_status_without_a_spool_exits_1_with_one_line(setup: Setup) -> None:
    setup.config()
    out = status_cmd(setup)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("mediaseal: error: spool ") and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


# -- SIGHUP (issue 14 observation 10: it killed the agent silently, exit 129, no `stopped` line) -------


def test_sighup_is_logged_and_ignored_and_the_agent_goes_on(setup: Setup) -> None:
    agent = Agent(setup)
    agent.wait_for("ready")
    agent.proc.send_signal(signal.SIGHUP)
    (ignored,) = agent.wait_for("sighup-ignored", timeout=30)
    assert ignored["level"] == "warning" and "restart" in ignored["reason"]
    assert agent.proc.poll() is None
    drop(setup.capture(), "after-hup.wav", os.urandom(20_000))
    agent.wait_for("delivered")
    agent.proc.send_signal(signal.SIGHUP)  # twice: still alive
    agent.wait_for("sighup-ignored", timeout=30)
    assert agent.stop() == 0
    assert any('"event": "stopped"' in line for line in agent.lines), agent.lines[-5:]


def test_the_periodic_rescan_line_is_debug(setup: Setup) -> None:
    # Every 30 s, for ever: at info it drowned the journal. Shown with MEDIASEAL_LOG_LEVEL=debug only.
    agent = Agent(setup, env={"MEDIASEAL_LOG_LEVEL": "info", "MEDIASEAL_AGENT__RESCAN_SECONDS": "0.2"})
    agent.wait_for("ready")
    drop(setup.capture(), "one.wav", os.urandom(1000))
    agent.wait_for("delivered")  # several scans of 0.2 s have run by now
    assert agent.stop() == 0
    assert not any('"rescan-done"' in line for line in agent.lines)
    debug = Agent(setup, env={"MEDIASEAL_AGENT__RESCAN_SECONDS": "0.2"})  # the harness asks for debug
    (ev,) = debug.wait_for("rescan-done")
    assert ev["level"] == "debug"
    assert debug.stop() == 0


def _non_loopback_address() -> str | None:
    """An IPv4 address of this host that is not loopback (a container's or a NIC's), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.254", 9))  # no packet is sent: the kernel picks the source address
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_status_and_readiness_reasons_only_to_this_host(tmp_path: Path) -> None:
    """Issue 15, finding 17: the container binds the listener to every address (for Prometheus and
    probes), and /status and /readyz's reasons named paths and error text to anyone who could reach it.
    Now a peer that is not loopback gets /healthz, /readyz's verdict and /metrics, no /status, no reasons."""
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    setup = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring"),
                  watches=[{"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename"},
                           {"path": str(tmp_path / "not-mounted"), "kind": "screen", "completion": "rename"}])
    agent = Agent(setup, env=metrics_env({"MEDIASEAL_METRICS__LISTEN": "0.0.0.0:0"}))
    (listening,) = agent.wait_for("metrics-listening")
    port = listening["address"].rsplit(":", 1)[1]
    agent.wait_for("ready")
    (tmp_path / "not-mounted").rmdir()  # not ready now: its reason names the path
    local, remote = f"http://127.0.0.1:{port}", f"http://{addr}:{port}"
    wait_until(lambda: get(f"{local}/readyz")[0] == 503, what="not ready", timeout=60)
    status, _, body = get(f"{local}/readyz")
    assert "not-mounted" in body
    status, _, body = get(f"{remote}/readyz")
    assert status == 503 and "not-mounted" not in body and str(tmp_path) not in body, body
    assert get(f"{local}/status")[0] == 200
    status, _, body = get(f"{remote}/status")
    assert status == 403 and str(tmp_path) not in body, body
    assert get(f"{remote}/healthz")[0] == 200 and get(f"{remote}/metrics")[0] == 200
    assert agent.stop() == 0
