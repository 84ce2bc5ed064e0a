"""The spool's filesystem filled by another process (issue 14 observation 7): a state, not a crash.

The spool is a real, small tmpfs (root only; skipped with the reason otherwise); another process
(`fallocate`, then `dd` for the last bytes) fills it while recordings arrive. The agent must pause
intake (sources stay where they are), say so in /readyz (503), in `mediaseal_intake_paused` and in an
`intake-paused` log line, and go on by itself once the filler's file is removed: every recording
delivered once, decrypting to its source. Before the fix the agent died with a traceback and exit 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import Agent, Setup, decrypt_all, make_keyring
from reliability_support import assert_zero, record_run, stamp
from support.mounts import TmpfsUnavailable, tmpfs
from test_service import get, metrics_env, sample

from mediaseal.buffer.spool import Manifest, Spool

MiB = 1 << 20
TMPFS_BYTES = 24 * MiB

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fallocate") is None,
                                reason="needs root to mount a small tmpfs (and fallocate) for a real full filesystem")


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    try:
        with tmpfs(tmp_path / "spoolfs", TMPFS_BYTES) as mnt:
            yield mnt
    except TmpfsUnavailable as e:
        pytest.skip(str(e))


def fill(fs: Path) -> list[Path]:
    """Another process takes every free byte of `fs`: fallocate most of it, dd the rest to ENOSPC."""
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    hogs = [fs / "hog", fs / "hog2"]
    subprocess.run(["fallocate", "-l", str(max(0, free - MiB)), str(hogs[0])], check=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={hogs[1]}", "bs=4096"], capture_output=True, check=False)
    st = os.statvfs(fs)
    assert st.f_bavail * st.f_frsize < 64 * 1024, "the filler left room"
    return hogs


def in_place(directory: Path, name: str, data: bytes) -> str:
    import hashlib

    (directory / f"{name}.part").write_bytes(data)
    os.rename(directory / f"{name}.part", directory / name)
    return hashlib.sha256(data).hexdigest()


def test_spool_filesystem_filled_by_another_process_pauses_intake_then_resumes(
        tmp_path: Path, small_spool: Path) -> None:
    setup = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring"),
                  watches=[{"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename"}],
                  # min_free_bytes 0: the spool's own headroom check does not stop short of the edge.
                  buffer={"path": str(small_spool / "spool"), "min_free_bytes": 0, "max_bytes": "1GiB"},
                  repo={"quarantine_seconds": 1.0})
    agent = Agent(setup, env=metrics_env())
    (listening,) = agent.wait_for("metrics-listening")
    base = f"http://{listening['address']}"
    agent.wait_for("ready")
    ledger = {"first.wav": in_place(setup.capture(), "first.wav", os.urandom(300_000))}
    agent.wait_for("delivered")

    # The repository is away (an unmounted share): a package waits in the spool, its manifest rewritten
    # at every failed attempt. Then another process takes every free byte of the spool's filesystem.
    away = setup.root / "repository.away"
    setup.repository.rename(away)
    ledger["waiting.wav"] = in_place(setup.capture(), "waiting.wav", os.urandom(100_000))
    agent.wait_for("delivery-retry", timeout=60)
    hogs = fill(small_spool)
    ledger |= {f"c{i}.wav": in_place(setup.capture(), f"c{i}.wav", os.urandom(200_000)) for i in range(3)}
    (paused,) = agent.wait_for("intake-paused", timeout=60)
    assert paused["reason"] == "spool filesystem full", paused
    # The next attempt's manifest write meets the full filesystem: paused, not a crash.
    agent.wait_for("delivery-paused", timeout=60)
    status, _, body = get(f"{base}/readyz")
    doc = json.loads(body)
    assert status == 503 and "spool" in doc["reason"] and "full" in doc["reason"], doc
    _, _, text = get(f"{base}/metrics")
    assert sample(text, "mediaseal_intake_paused") == 1.0
    assert agent.proc.poll() is None, "\n".join(agent.lines[-20:])
    for name in ("c0.wav", "c1.wav", "c2.wav"):
        assert (setup.capture() / name).exists()  # sources stay where they are

    for hog in hogs:
        hog.unlink()
    away.rename(setup.repository)
    fixed = time.time()
    agent.wait_for("intake-resumed", timeout=60)
    times = [stamp(d) - fixed for d in agent.wait_for("delivered", count=4, timeout=120)]
    deadline = time.monotonic() + 30
    while get(f"{base}/readyz")[0] != 200:
        assert time.monotonic() < deadline, get(f"{base}/readyz")
        agent.wait_for(("rescan-done", "delivered", "disposed", "repository-ready"), timeout=30)
    assert agent.stop() == 0
    assert not any("Traceback" in line for line in agent.lines), "\n".join(agent.lines)
    assert decrypt_all(setup.repository, setup.keyring) == {n: [h] for n, h in ledger.items()}
    assert list(setup.capture().iterdir()) == []
    assert_zero(record_run("spool filesystem filled by another process (and the repository away), then freed",
                           setup, ledger, [max(0.0, min(times))], [max(0.0, max(times))]))


def test_spool_names_a_full_filesystem_and_keeps_the_old_state(tmp_path: Path, small_spool: Path) -> None:
    """buffer.spool on the real full tmpfs: a staging write and a manifest write both fail as
    SpoolFullError (an OSError with errno ENOSPC), and leave nothing half-written behind."""
    import errno

    from mediaseal.buffer.spool import SpoolFullError

    spool = Spool(small_spool / "spool", 1 << 30, min_free_bytes=0)
    m = Manifest(recording_id="r1", kind="call", repo_key="call/2026/01/01/r1.mseal", package_size=10,
                 sha256=None, kid="k", source="/capture/r1.wav", identity={}, dispose="delete", created_at=0.0)
    r = spool.reserve(10)
    assert r is not None
    with spool.staging("r1") as (f, path):
        f.write(b"0123456789")
    spool.commit(path, m, r)
    hogs = fill(small_spool)
    with pytest.raises(SpoolFullError) as e, spool.staging("r2") as (f, _):
        f.write(os.urandom(256 * 1024))
    assert e.value.errno == errno.ENOSPC and "full" in str(e.value)
    assert list((small_spool / "spool" / "staging").iterdir()) == []
    with pytest.raises(SpoolFullError):
        spool.record_digest(m, "ab" * 32)
    on_disk = spool.load("r1")
    assert on_disk is not None and on_disk.sha256 is None  # the old state stands
    assert [p.name for p in (small_spool / "spool" / "packages").iterdir()] in (["r1.json", "r1.mseal"],
                                                                                ["r1.mseal", "r1.json"])
    for hog in hogs:
        hog.unlink()
    m = spool.load("r1")  # (the transition had changed the object in memory; the delivery reloads it too)
    assert m is not None
    spool.record_digest(m, "ab" * 32)  # room again: it goes through
    assert (after := spool.load("r1")) is not None and after.sha256 == "ab" * 32
