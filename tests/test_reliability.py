"""The reliability matrix (issue 9, "Figures"): per fault type, a ledger of recordings, the real agent
against the filesystem repository and S3 (moto behind the fault proxy), real faults, a final clean run
that drains everything, and a checker that decrypts what the repository holds.

Asserted for every fault: lost, duplicated, plaintext outside the capture directory and orphans after
the drain are all 0. Bounded here (`make test`); MEDIASEAL_SOAK=1 (`make soak`) runs the long form;
MEDIASEAL_RELIABILITY_REPORT=1 rewrites docs/RELIABILITY.md from the figures collected.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import PASSPHRASE, Agent, Setup, drop, make_keyring
from keyset_support import TestCA
from reliability_outages import (
    KEYSET_ENV,
    METRICS_ENV,
    RestartableKeySetServer,
    Scrape,
    hash_of,
    http_json,
    keyset_setup,
    produce,
    wait_metric,
)
from reliability_support import (
    Ledger,
    assert_zero,
    check_filesystem,
    check_s3,
    drain_running,
    new_setup,
    record,
    recording,
    restart_and_drain,
    scan_setup,
    sized,
    skipped,
)
from s3_support import Rule, boto3_client
from support.mounts import TmpfsUnavailable, tmpfs
from support.waits import wait_until

from mediaseal.keys.keyring import Keyring

MiB = 1 << 20
CRASH_EXIT = 86
FS = "filesystem"
S3 = "s3"
SMALL = [5000, 70_000, 300_000, 2 * MiB]


@pytest.fixture(scope="session")
def reliability_keyring() -> Iterator[Path]:
    """One keyring made per session (RSA keygen is slow), copied into every set-up."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mediaseal-rel-kr-") as d:
        yield make_keyring(Path(d) / "keyring")


def s3_setup(root: Path, keyring: Path, endpoint: str, bucket: str, **repo: Any) -> Setup:
    return new_setup(root, keyring, url=f"s3://{bucket}/rel", endpoint_url=endpoint, region="us-east-1",
                     part_size="5MiB", put_threshold="6MiB", quarantine_seconds=1.0, **repo)


def crashed_run(setup: Setup, point: str, nth: int) -> None:
    agent = Agent(setup, env={"MEDIASEAL_CRASH_AT": f"{point}:{nth}"})
    assert agent.exited(timeout=120) == CRASH_EXIT, "\n".join(agent.lines[-10:])


# -- filesystem repository ---------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["mid-encrypt", "after-staging-fsync", "after-commit", "after-delivery"])
def test_fs_named_crash_points(tmp_path: Path, reliability_keyring: Path, point: str) -> None:
    ledger = Ledger(f"fs-{point}")
    crash_rows(new_setup(tmp_path, reliability_keyring), ledger, point, ledger.produce, f"crash at {point}")


def crash_rows(setup: Setup, ledger: Ledger, point: str, produce: Callable[[Path, str, list[int]], None],
               label: str) -> None:
    """Crash at `point` again and again (produce, crash, check for plaintext, restart and drain), then
    check the ledger and record the row."""
    iterations = sized(2, 10)
    recover, drain, leaked = [], [], []
    for it in range(iterations):
        produce(setup.capture(), f"c{it}", [0, *SMALL])
        crashed_run(setup, point, ledger.rng.randint(1, 3))
        leaked += scan_setup(setup)  # right after the crash: nothing in plaintext outside capture
        r = restart_and_drain(setup)
        recover.append(r.recover)
        drain.append(r.drain)
    check = check_filesystem(setup, ledger)
    check.plaintext += leaked
    record(FS, label, check, iterations, recover, drain)
    assert_zero(check)


def test_fs_random_sigkills_under_load(tmp_path: Path, reliability_keyring: Path) -> None:
    setup = new_setup(tmp_path, reliability_keyring)
    ledger = Ledger("fs-kills")
    kills = int(os.environ.get("MEDIASEAL_KILL_ITERATIONS", sized(20, 200)))
    rng = random.Random(4321)
    recover, leaked = [], []
    for it in range(kills):
        ledger.produce(setup.capture(), f"k{it}", [rng.choice([0, 5000, 300_000, 2 * MiB]) for _ in range(2)])
        t0 = time.monotonic()
        agent = Agent(setup)
        agent.wait_for("ready", timeout=60)
        recover.append(time.monotonic() - t0)
        time.sleep(rng.uniform(0, 0.4))  # the kill lands at a random instant under load
        agent.kill()
        if it % 5 == 4 or it == kills - 1:
            leaked += scan_setup(setup)
    r = restart_and_drain(setup, timeout=600)
    check = check_filesystem(setup, ledger)
    check.plaintext += leaked
    record(FS, "random SIGKILL under load", check, kills, [*recover, r.recover], [r.drain])
    assert_zero(check)


# -- disposal: a crash point at each step, and kills timed to land inside it (marker mode: the marker is
# one of the things a crash could leave behind) ------------------------------------------------------------

DISPOSAL_POINTS = ["after-sidecar-commit", "after-dispose-rename", "after-dispose-marker", "after-dispose-source"]


def marker_setup(root: Path, keyring: Path) -> Setup:
    """Marker mode, and a sidecar per recording (`<stem>.xml`, as a SIPREC or recorder metadata file)."""
    setup = new_setup(root, keyring)
    setup.watches[0].update(completion="marker", marker_suffix=".done", sidecars=["{dir}/{stem}.xml"])
    return setup


def produce_marked(ledger: Ledger, directory: Path, prefix: str, sizes: list[int]) -> None:
    """The ledger's producer, then each recording's sidecar and `.done` marker (as a recorder's close hook
    would). The sidecars are in the ledger as recordings of their own: each must be delivered once."""
    before = set(ledger.sha)
    ledger.produce(directory, prefix, sizes)
    for name in sorted(set(ledger.sha) - before):
        sidecar = Path(name).stem + ".xml"
        ledger.sha[sidecar] = drop(directory, sidecar, recording(ledger.rng, 700))
        (directory / f"{name}.done").touch()


@pytest.mark.parametrize("point", DISPOSAL_POINTS)
def test_fs_disposal_crash_points(tmp_path: Path, reliability_keyring: Path, point: str) -> None:
    """After the drain no marker, no private `.disposing` name and no source is left (check_filesystem
    counts any as an orphan), and no plaintext was ever outside the capture directory."""
    ledger = Ledger(f"fs-{point}")
    crash_rows(marker_setup(tmp_path, reliability_keyring), ledger, point,
               lambda d, prefix, sizes: produce_marked(ledger, d, prefix, sizes), f"crash at {point} (marker mode)")


def test_fs_random_sigkills_during_disposal(tmp_path: Path, reliability_keyring: Path) -> None:
    """SIGKILL a few milliseconds after a commit, while that recording's disposal (rename, marker,
    unlink of up to 8 MiB) is under way."""
    setup = marker_setup(tmp_path, reliability_keyring)
    ledger = Ledger("fs-dispose-kills")
    kills = sized(6, 60)
    rng = random.Random(2718)
    recover, leaked = [], []
    for it in range(kills):
        produce_marked(ledger, setup.capture(), f"d{it}",
                       [rng.choice([5000, 300_000, 2 * MiB, 8 * MiB]) for _ in range(3)])
        t0 = time.monotonic()
        agent = Agent(setup)
        agent.wait_for("spooled", timeout=60)  # its disposal starts right after the commit
        recover.append(time.monotonic() - t0)
        time.sleep(rng.uniform(0, 0.02))  # the kill lands at a random instant of it
        agent.kill()
        leaked += scan_setup(setup)
    r = restart_and_drain(setup, timeout=300)
    check = check_filesystem(setup, ledger)
    check.plaintext += leaked
    record(FS, "random SIGKILL during disposal (marker mode)", check, kills, [*recover, r.recover], [r.drain])
    assert_zero(check)


@pytest.fixture
def small_spool_fs(tmp_path: Path) -> Iterator[Path]:
    try:
        with tmpfs(tmp_path / "spoolfs", 24 * MiB) as mnt:
            yield mnt
    except TmpfsUnavailable as e:
        skipped(FS, "disk full (spool tmpfs)", str(e))
        pytest.skip(str(e))


def test_fs_disk_full(tmp_path: Path, reliability_keyring: Path, small_spool_fs: Path) -> None:
    setup = new_setup(tmp_path, reliability_keyring)
    setup.buffer.update(path=str(small_spool_fs / "buffer"), max_bytes="1GiB", min_free_bytes="1MiB")
    ledger = Ledger("fs-full")
    iterations = sized(1, 4)
    recover, drain = [], []
    agent = Agent(setup)
    agent.wait_for("ready")
    for it in range(iterations):
        filler = small_spool_fs / "someone-elses-file"
        filler.write_bytes(b"\0" * (14 * MiB))  # another writer on the same disk: ~10 MiB left
        ledger.produce(setup.capture(), f"f{it}", [12 * MiB])
        (paused,) = agent.wait_for("intake-paused", timeout=60)
        assert paused["reason"] == "spool filesystem full"
        filler.unlink()  # the fix: space comes back, intake resumes by itself
        t0 = time.monotonic()
        agent.wait_for("delivered", timeout=120)
        recover.append(time.monotonic() - t0)
        drain_running(agent, setup)
        drain.append(time.monotonic() - t0)
    assert agent.stop() == 0
    restart_and_drain(setup)
    check = check_filesystem(setup, ledger)
    record(FS, "disk full (spool tmpfs)", check, iterations, recover, drain)
    assert_zero(check)


def test_fs_eio_on_fsync(tmp_path: Path, reliability_keyring: Path) -> None:
    if shutil.which("strace") is None:
        skipped(FS, "EIO on fsync (strace)", "strace is not installed")
        pytest.skip("strace is not installed")
    # Spool recovery fsyncs two directories at start; the third fsync is the first staging file's.
    strace = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=fsync", "-e", "inject=fsync:error=EIO:when=3"]
    setup = new_setup(tmp_path, reliability_keyring)
    ledger = Ledger("fs-eio")
    iterations = sized(1, 4)
    recover, drain, leaked = [], [], []
    for it in range(iterations):
        ledger.produce(setup.capture(), f"e{it}", [200_000, 5000, 0])
        broken = Agent(setup, prefix=strace)
        assert broken.exited(timeout=60) == 3, "\n".join(broken.lines[-10:])  # stops: state unknown
        assert not any('"delivered"' in line for line in broken.lines)
        leaked += scan_setup(setup)
        r = restart_and_drain(setup)
        recover.append(r.recover)
        drain.append(r.drain)
    check = check_filesystem(setup, ledger)
    check.plaintext += leaked
    record(FS, "EIO on fsync (strace)", check, iterations, recover, drain)
    assert_zero(check)


# -- S3 (moto behind the fault proxy) -------------------------------------------------------------------------


def test_s3_crash_after_part_saved(tmp_path: Path, reliability_keyring: Path, moto_server: Any, s3_bucket: str,
                                   fault_proxy: Any) -> None:
    setup = s3_setup(tmp_path, reliability_keyring, fault_proxy.url, s3_bucket, concurrency=1)
    ledger = Ledger("s3-part")
    iterations = sized(2, 8)
    recover, drain, leaked = [], [], []
    for it in range(iterations):
        ledger.produce(setup.capture(), f"p{it}", [12 * MiB, 5000])  # 3 parts of 5 MiB and a small PUT
        crashed_run(setup, "after-part-saved", ledger.rng.randint(1, 3))
        leaked += scan_setup(setup)
        r = restart_and_drain(setup)
        recover.append(r.recover)
        drain.append(r.drain)
    check = check_s3(setup, ledger, moto_server.url, s3_bucket)
    check.plaintext += leaked
    record(S3, "crash at after-part-saved", check, iterations, recover, drain)
    assert_zero(check)


def test_s3_random_sigkills_under_load(tmp_path: Path, reliability_keyring: Path, moto_server: Any,
                                       s3_bucket: str) -> None:
    setup = s3_setup(tmp_path, reliability_keyring, moto_server.url, s3_bucket)
    ledger = Ledger("s3-kills")
    kills = sized(4, 40)
    rng = random.Random(99)
    recover, leaked = [], []
    for it in range(kills):
        ledger.produce(setup.capture(), f"k{it}", [rng.choice([5000, 300_000, 7 * MiB]), 0])
        t0 = time.monotonic()
        agent = Agent(setup)
        agent.wait_for("ready", timeout=60)
        recover.append(time.monotonic() - t0)
        time.sleep(rng.uniform(0.1, 0.8))
        agent.kill()
        leaked += scan_setup(setup)
    r = restart_and_drain(setup, timeout=300)
    check = check_s3(setup, ledger, moto_server.url, s3_bucket)
    check.plaintext += leaked
    record(S3, "random SIGKILL under load", check, kills, [*recover, r.recover], [r.drain])
    assert_zero(check)


def test_s3_sigterm_mid_upload(tmp_path: Path, reliability_keyring: Path, moto_server: Any, s3_bucket: str,
                               fault_proxy: Any) -> None:
    setup = s3_setup(tmp_path, reliability_keyring, fault_proxy.url, s3_bucket, concurrency=1)
    setup.agent["rescan_seconds"] = 0.5
    ledger = Ledger("s3-term")
    iterations = sized(1, 4)
    recover, drain, leaked = [], [], []
    for it in range(iterations):
        fault_proxy.delay(3.0, when=lambda r: r.op == "UploadPart")  # every part takes seconds to go up
        agent = Agent(setup, env={"MEDIASEAL_AGENT__STOP_TIMEOUT_SECONDS": "1"})
        agent.wait_for("ready")
        before = fault_proxy.count("UploadPart")
        ledger.produce(setup.capture(), f"t{it}", [12 * MiB])
        agent.wait_for("spooled", timeout=60)
        while fault_proxy.count("UploadPart") == before:  # woken by the agent's own progress
            agent.wait_for("rescan-done", timeout=30)
        t0 = time.monotonic()
        assert agent.stop(timeout=30) == 0
        assert time.monotonic() - t0 < 5, "stop_timeout 1 s was not honoured"
        leaked += scan_setup(setup)
        fault_proxy.clear()
        r = restart_and_drain(setup)
        recover.append(r.recover)
        drain.append(r.drain)
    check = check_s3(setup, ledger, moto_server.url, s3_bucket)
    check.plaintext += leaked
    record(S3, "SIGTERM mid-upload (stop timeout 1 s)", check, iterations, recover, drain)
    assert_zero(check)


def _writes(r: Any) -> bool:
    return r.op in ("PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload")


OUTAGES: dict[str, Callable[[Any], object]] = {
    "refusing connections": lambda p: p.refuse(),
    "hanging (never answers)": lambda p: p.hang(times=None),
    "503 on every request": lambda p: p.fail(503, times=None),
    "reset mid-body": lambda p: p.reset(when=lambda r: r.op in ("PutObject", "UploadPart"), after=1000, times=None),
}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_s3_outage_then_fixed(tmp_path: Path, reliability_keyring: Path, moto_server: Any, s3_bucket: str,
                              fault_proxy: Any, outage: str) -> None:
    setup = s3_setup(tmp_path, reliability_keyring, fault_proxy.url, s3_bucket, read_timeout=2.0,
                     connect_timeout=2.0)
    ledger = Ledger(f"s3-{outage}")
    iterations = sized(1, 4)
    recover, drain = [], []
    agent = Agent(setup, env={"MEDIASEAL_AGENT__STOP_TIMEOUT_SECONDS": "2"})
    agent.wait_for("ready")
    for it in range(iterations):
        OUTAGES[outage](fault_proxy)
        ledger.produce(setup.capture(), f"o{it}", [5000, 300_000, 7 * MiB])
        agent.wait_for("delivery-retry", timeout=120)
        fault_proxy.clear()
        fault_proxy.listen()
        t0 = time.monotonic()
        agent.wait_for("delivered", timeout=120)
        recover.append(time.monotonic() - t0)
        drain_running(agent, setup)
        drain.append(time.monotonic() - t0)
    assert agent.stop() == 0
    restart_and_drain(setup)
    check = check_s3(setup, ledger, moto_server.url, s3_bucket)
    record(S3, f"repository {outage}, then fixed", check, iterations, recover, drain)
    assert_zero(check)


def test_s3_access_denied_then_fixed(tmp_path: Path, reliability_keyring: Path, moto_server: Any, s3_bucket: str,
                                    fault_proxy: Any) -> None:
    """S3 answers 403 AccessDenied (an S3 XML error body) to everything, as when the agent's role loses
    its bucket permissions. That is a permanent error: each package is quarantined and re-probed every
    quarantine_seconds, not retried hot; intake keeps sealing into the spool (sources are disposed only
    once their package is committed there), nothing is deleted, and the error shows in the log, the
    metrics and /readyz. Once the permission is back (the proxy passes again), delivery resumes by
    itself within about one quarantine period, with no restart."""
    quarantine = 1.0  # s3_setup's repository.quarantine_seconds
    setup = s3_setup(tmp_path, reliability_keyring, fault_proxy.url, s3_bucket)
    s3 = boto3_client(moto_server.url)
    ledger = Ledger("s3-403")
    iterations = sized(1, 4)
    recover, drain, leaked = [], [], []
    agent = Agent(setup, env=METRICS_ENV)
    address = agent.wait_for("metrics-listening")[0]["address"]
    agent.wait_for("ready")
    for it in range(iterations):
        fault_proxy.add(Rule(lambda r: True, "status", None, status=403, code="AccessDenied"))
        t_denied = time.monotonic()
        denied_before = fault_proxy.count(action="status")
        objects = s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0)
        names = produce(ledger, setup.capture(), f"d{it}", [5000, 300_000, 7 * MiB])  # 2 PUTs, 1 multipart
        agent.wait_for("spooled", count=len(names), timeout=60)  # intake goes on: sealed, sources disposed
        probes: dict[str, int] = {}  # recording id -> quarantined attempts
        deadline = time.monotonic() + 60
        while sum(c >= 2 for c in probes.values()) < 2:  # re-probed (the upload workers hold 2 at a time)
            assert time.monotonic() < deadline, f"quarantined attempts {probes}:\n" + "\n".join(agent.lines[-10:])
            (q,) = agent.wait_for("delivery-quarantined", timeout=60)
            assert "AccessDenied" in q["error"] and q["retry_in"] == quarantine, q
            probes[q["recording_id"]] = probes.get(q["recording_id"], 0) + 1
        elapsed = time.monotonic() - t_denied
        # Slow re-probing: about one request per package per quarantine period, not a hot loop.
        denied = fault_proxy.count(action="status") - denied_before
        assert denied <= len(names) * (elapsed / quarantine + 2), (denied, elapsed)
        # Nothing delivered, nothing lost: every recording is a committed package in the spool.
        assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == objects
        assert not any(setup.capture().iterdir())
        assert len(list(setup.spool.rglob("*.mseal"))) == len(names)
        leaked += scan_setup(setup)
        m = Scrape.of(address)
        assert m.value("mediaseal_packages_quarantined") == len(probes)
        failed = m.value("mediaseal_recordings_failed_total", stage="upload", reason="quarantined")
        assert failed >= sum(probes.values()), (failed, probes)
        status, ready = http_json(f"http://{address}/readyz")
        assert status == 503 and "AccessDenied" in ready["reason"], ready
        fault_proxy.clear()  # the bucket policy is fixed
        t0 = time.monotonic()
        agent.wait_for("delivered", timeout=60)
        recover.append(time.monotonic() - t0)
        drain_running(agent, setup)
        drain.append(time.monotonic() - t0)
        assert recover[-1] < quarantine + 5, f"delivery resumed {recover[-1]:.1f} s after the fix"
        assert Scrape.of(address).value("mediaseal_packages_quarantined") == 0
        # Ready again: the repository check is cached for a few seconds (its probe's cache_seconds), so
        # it may say the last probe's 403 for that long after the first delivery.
        wait_until(lambda: http_json(f"http://{address}/readyz")[0] == 200, what="ready again after the fix",
                   timeout=60, detail=lambda: http_json(f"http://{address}/readyz")[1])
    assert agent.stop() == 0
    restart_and_drain(setup)
    check = check_s3(setup, ledger, moto_server.url, s3_bucket)
    check.plaintext += leaked
    record(S3, "repository 403 AccessDenied, then fixed", check, iterations, recover, drain)
    assert_zero(check)


def test_s3_quarantined_packages_do_not_hold_up_the_others(tmp_path: Path, reliability_keyring: Path,
                                                           moto_server: Any, s3_bucket: str, fault_proxy: Any) -> None:
    """A 403 on some objects only (a policy denying part of the bucket): those packages are quarantined,
    and the others must still be delivered meanwhile. (A real finding: a quarantined package used to
    keep its upload worker, so two of them stopped every other delivery.)"""
    setup = s3_setup(tmp_path, reliability_keyring, fault_proxy.url, s3_bucket)  # 2 upload workers
    fault_proxy.add(Rule(lambda r: r.op == "PutObject" and 100_000 < int(r.headers.get("content-length", 0)) < MiB,
                         "status", None, status=403, code="AccessDenied"))
    ledger = Ledger("s3-403-some")
    agent = Agent(setup)
    agent.wait_for("ready")
    produce(ledger, setup.capture(), "denied", [300_000, 300_000])
    quarantined: set[str] = set()
    while len(quarantined) < 2:  # both upload workers now hold a quarantined package
        quarantined.add(agent.wait_for("delivery-quarantined", timeout=60)[0]["recording_id"])
    fine = produce(ledger, setup.capture(), "fine", [5000, 5000, 5000])
    delivered = agent.wait_for("delivered", count=len(fine), timeout=6)
    assert {Path(d["path"]).name for d in delivered} == set(fine)
    fault_proxy.clear()
    drain_running(agent, setup)
    assert agent.stop() == 0
    restart_and_drain(setup)
    assert_zero(check_s3(setup, ledger, moto_server.url, s3_bucket))


# -- the key set source down (HTTPS key set server really stopped) ----------------------------------------


@pytest.fixture(scope="module")
def keyset_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.make(tmp_path_factory.mktemp("keyset-ca"))


@pytest.fixture
def keyset_server(keyset_ca: TestCA) -> Iterator[RestartableKeySetServer]:
    server = RestartableKeySetServer(keyset_ca).start()
    try:
        yield server
    finally:
        server.stop()


def test_fs_keyset_source_down_while_running(tmp_path: Path, reliability_keyring: Path, keyset_ca: TestCA,
                                             keyset_server: RestartableKeySetServer) -> None:
    """The key service goes away while the agent runs: it keeps sealing to the cached, still valid key
    (nothing waits), logs and counts every failed refresh, and takes the new (rotated) key set as soon
    as the service is back. recover: from the fix to the new key in use."""
    setup = keyset_setup(tmp_path, reliability_keyring, keyset_server, keyset_ca)
    ring = Keyring.open(setup.keyring)
    ledger = Ledger("fs-keyset-down")
    iterations = sized(1, 4)
    recover, drain, leaked = [], [], []
    agent = Agent(setup, env={**KEYSET_ENV, **METRICS_ENV})
    address = agent.wait_for("metrics-listening")[0]["address"]
    kid = agent.wait_for("key-current")[0]["kid"]
    assert kid == ring.current().kid
    agent.wait_for("ready")
    for it in range(iterations):
        failures = Scrape.of(address).value("mediaseal_key_refresh_failures_total", reason="KeySetSourceError")
        keyset_server.stop()  # connections refused from now on
        agent.wait_for("key-refresh-failed", where=lambda d: "unreachable" in d["error"], timeout=30)
        names = produce(ledger, setup.capture(), f"s{it}", [5000, 300_000, 0])
        assert {e["kid"] for e in agent.wait_for("spooled", count=len(names), timeout=60)} == {kid}
        drain_running(agent, setup, timeout=60)
        leaked += scan_setup(setup)
        m = Scrape.of(address)
        assert m.value("mediaseal_key_refresh_failures_total", reason="KeySetSourceError") > failures
        assert m.value("mediaseal_intake_paused") == 0 and m.value("mediaseal_current_kid_info", kid=kid) == 1
        assert http_json(f"http://{address}/readyz")[0] == 200  # a valid key: the agent is fine
        ring.rotate(PASSPHRASE)  # the key service comes back with a new current key
        keyset_server.document = ring.publish(PASSPHRASE)
        keyset_server.start()
        t0 = time.monotonic()
        new = ring.current().kid
        agent.wait_for("key-current", where=lambda d: d["kid"] == new, timeout=30)
        recover.append(time.monotonic() - t0)
        names = produce(ledger, setup.capture(), f"n{it}", [5000, 70_000])
        assert {e["kid"] for e in agent.wait_for("spooled", count=len(names), timeout=60)} == {new}
        drain_running(agent, setup, timeout=60)
        drain.append(time.monotonic() - t0)
        kid = new
    assert agent.stop() == 0
    restart_and_drain(setup, env=KEYSET_ENV)
    check = check_filesystem(setup, ledger)
    check.plaintext += leaked
    record(FS, "key set source down while running (HTTPS stopped), back with a rotated set", check, iterations,
           recover, drain)
    assert_zero(check)


def test_fs_keyset_source_down_past_staleness(tmp_path: Path, reliability_keyring: Path, keyset_ca: TestCA,
                                              keyset_server: RestartableKeySetServer) -> None:
    """The key service stays away longer than keys.max_staleness_seconds: the agent says so (a
    `key-set-stale` line as the set goes stale, not only when a recording arrives), stops sealing,
    and recordings wait in the capture directory untouched; when the service is back, intake resumes
    by itself. recover: from the fix to the first delivery."""
    staleness = 2.0
    setup = keyset_setup(tmp_path, reliability_keyring, keyset_server, keyset_ca, max_staleness_seconds=staleness)
    ledger = Ledger("fs-keyset-stale")
    iterations = sized(1, 4)
    recover, drain, leaked = [], [], []
    agent = Agent(setup, env={**KEYSET_ENV, **METRICS_ENV})
    address = agent.wait_for("metrics-listening")[0]["address"]
    agent.wait_for("ready")
    for it in range(iterations):
        keyset_server.stop()
        (stale,) = agent.wait_for("key-set-stale", timeout=30)
        assert "max_staleness_seconds" in stale["error"]
        sealed = len([ln for ln in agent.lines if '"event": "sealing"' in ln])
        names = produce(ledger, setup.capture(), f"w{it}", [5000, 300_000, 0])
        m = wait_metric(address, "mediaseal_intake_paused", 1)  # they reached intake, which waits for a key
        assert len([ln for ln in agent.lines if '"event": "sealing"' in ln]) == sealed, "sealed to a stale key"
        waiting = {p.name: hash_of(p) for p in setup.capture().iterdir()}
        assert waiting == {n: ledger.sha[n] for n in names}  # untouched in the capture directory
        assert not list(setup.spool.rglob("*.mseal"))
        leaked += scan_setup(setup)
        assert m.value("mediaseal_keyset_age_seconds") > staleness
        status, ready = http_json(f"http://{address}/readyz")
        assert status == 503 and "max_staleness_seconds" in ready["reason"], ready
        keyset_server.start()  # back, with the same set (a 304 Not Modified renews it)
        t0 = time.monotonic()
        agent.wait_for("key-set-fresh", timeout=30)
        agent.wait_for("delivered", timeout=60)
        recover.append(time.monotonic() - t0)
        drain_running(agent, setup, timeout=60)
        drain.append(time.monotonic() - t0)
        assert Scrape.of(address).value("mediaseal_intake_paused") == 0
    assert agent.stop() == 0
    restart_and_drain(setup, env=KEYSET_ENV)
    check = check_filesystem(setup, ledger)
    check.plaintext += leaked
    record(FS, "key set source down past max_staleness (intake stops), then back", check, iterations, recover, drain)
    assert_zero(check)


def test_fs_keyset_source_down_at_restart(tmp_path: Path, reliability_keyring: Path, keyset_ca: TestCA,
                                          keyset_server: RestartableKeySetServer) -> None:
    """The agent restarts while the key service is down. It starts with the key set it saved
    (`<buffer>/keyset.json`, checked like a fetched one), seals what waits in the capture directory,
    delivers the backlog a crash left in the spool, and counts the failed refreshes; nothing waits for
    the service. recover: restart -> ready; drain: restart -> everything delivered (service still down)."""
    setup = keyset_setup(tmp_path, reliability_keyring, keyset_server, keyset_ca)
    ledger = Ledger("fs-keyset-restart")
    iterations = sized(1, 4)
    recover, drain, leaked = [], [], []
    for it in range(iterations):
        produce(ledger, setup.capture(), f"r{it}", [5000, 300_000, 0])
        # A run that dies right after committing one package: a spool backlog for the next start.
        crashed = Agent(setup, env={**KEYSET_ENV, "MEDIASEAL_CRASH_AT": "after-commit:1"})
        assert crashed.exited(timeout=60) == CRASH_EXIT, "\n".join(crashed.lines[-10:])
        assert sorted(p.name for p in setup.spool.rglob("*.mseal"))  # the backlog
        assert (setup.spool / "keyset.json").stat().st_mode & 0o777 == 0o600
        keyset_server.stop()
        r = restart_and_drain(setup, env=KEYSET_ENV)  # the service stays down throughout
        text = "\n".join(r.agent.lines)
        assert '"event": "key-refresh-failed"' in text and "saved copy" in text and "Traceback" not in text, text
        leaked += scan_setup(setup)
        recover.append(r.recover)
        drain.append(r.drain)
        keyset_server.start()
    check = check_filesystem(setup, ledger)
    check.plaintext += leaked
    record(FS, "key set source down at restart (starts with the saved set)", check, iterations, recover, drain)
    assert_zero(check)


def test_fs_keyset_source_down_at_first_start(tmp_path: Path, reliability_keyring: Path, keyset_ca: TestCA,
                                              keyset_server: RestartableKeySetServer) -> None:
    """The very first start with the key service down: no key set was ever saved, so there is no key to
    seal to. It exits 1 with one line naming the problem (no traceback), seals nothing and leaves the
    recordings where they are; started again once the service is back (systemd's Restart=), it drains."""
    setup = keyset_setup(tmp_path, reliability_keyring, keyset_server, keyset_ca)
    ledger = Ledger("fs-keyset-first")
    iterations = sized(1, 4)
    recover, drain = [], []
    for it in range(iterations):
        (setup.spool / "keyset.json").unlink(missing_ok=True)  # as on a new host
        produce(ledger, setup.capture(), f"f{it}", [5000, 300_000, 0])
        waiting = {p.name: hash_of(p) for p in setup.capture().iterdir()}
        keyset_server.stop()
        refused = Agent(setup, env=KEYSET_ENV)
        assert refused.exited(timeout=60) == 1, "\n".join(refused.lines[-10:])
        text = "\n".join(refused.lines)
        assert "mediaseal: error: no valid public key to encrypt to" in text and "Traceback" not in text, text
        assert any('"event": "key-refresh-failed"' in ln and "unreachable" in ln for ln in refused.lines), text
        assert {p.name: hash_of(p) for p in setup.capture().iterdir()} == waiting  # untouched
        assert not list(setup.spool.rglob("*.mseal"))
        keyset_server.start()
        r = restart_and_drain(setup, env=KEYSET_ENV)
        recover.append(r.recover)
        drain.append(r.drain)
    check = check_filesystem(setup, ledger)
    record(FS, "key set source down at first start (agent refuses to start), then back", check, iterations,
           recover, drain)
    assert_zero(check)


def test_checker_finds_planted_plaintext_and_orphans(tmp_path: Path, reliability_keyring: Path) -> None:
    """Positive control: the scan and the checker do see plaintext, losses and orphans when present."""
    from reliability_support import MARKER, recording

    setup = new_setup(tmp_path, reliability_keyring)
    setup.config()
    ledger = Ledger("control")
    ledger.produce(setup.capture(), "x", [70_000])
    assert MARKER in recording(random.Random(1), 5000)
    assert scan_setup(setup) == []  # the capture directory itself is excluded
    (setup.spool / "staging").mkdir(parents=True, exist_ok=True)
    (setup.spool / "staging" / "leak.part").write_bytes(next(iter(setup.capture().iterdir())).read_bytes()[5000:9000])
    check = check_filesystem(setup, ledger)
    assert len(check.plaintext) == 1 and len(check.orphans) == 1 and check.lost == ["x-00000.bin"]
    # A private name left by an interrupted disposal is an orphan too.
    (setup.capture() / ".mediaseal-20260101T000000Z-00000000000000000000.disposing").write_bytes(b"x")
    assert len(check_filesystem(setup, ledger).orphans) == 2
