"""Faults the host inflicts, made real: a spool filesystem that is full (a small tmpfs, mounted here)
and a disk that fails fsync with EIO (injected at the system-call boundary by strace)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import Agent, Setup, decrypt_all, drop, spool_files
from support.mounts import TmpfsUnavailable, tmpfs

MiB = 1 << 20


@pytest.fixture
def small_spool_fs(tmp_path: Path) -> Iterator[Path]:
    try:
        with tmpfs(tmp_path / "spoolfs", 24 * MiB) as mnt:
            yield mnt
    except TmpfsUnavailable as e:
        pytest.skip(str(e))


def test_full_spool_filesystem_pauses_intake_and_loses_nothing(setup: Setup, small_spool_fs: Path) -> None:
    filler = small_spool_fs / "someone-elses-file"
    filler.write_bytes(b"\0" * (14 * MiB))  # another writer on the same disk: ~10 MiB left
    setup.buffer.update(path=str(small_spool_fs / "buffer"), max_bytes="1GiB", min_free_bytes="1MiB")
    agent = Agent(setup)
    agent.wait_for("ready")
    sha = drop(setup.capture(), "big.wav", os.urandom(12 * MiB))
    (paused,) = agent.wait_for("intake-paused")
    assert paused["reason"] == "spool filesystem full"  # another writer filled the disk: not our max_bytes
    assert (setup.capture() / "big.wav").exists() and spool_files(setup.spool) == []
    filler.unlink()  # space comes back: intake resumes by itself
    agent.wait_for("delivered", timeout=60)
    assert agent.stop() == 0
    assert decrypt_all(setup.repository, setup.keyring) == {"big.wav": [sha]}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_eio_on_fsync_stops_the_agent_and_a_restart_delivers(setup: Setup) -> None:
    # Spool recovery fsyncs two directories at start; the third fsync is the first staging file's.
    strace = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=fsync", "-e", "inject=fsync:error=EIO:when=3"]
    setup.capture().mkdir()
    ledger = {f"e{i}.wav": drop(setup.capture(), f"e{i}.wav", os.urandom(200_000)) for i in range(3)}
    broken = Agent(setup, prefix=strace)
    assert broken.exited(timeout=60) == 3, "\n".join(broken.lines[-10:])
    assert any('"durability-failure"' in line and "fsync" in line for line in broken.lines)
    assert not any('"delivered"' in line for line in broken.lines)
    # Nothing lost at the stop: a source is gone only where its manifest is durably in the spool (with
    # concurrency 2 the other worker may have committed before the injected failure; the restart
    # below delivers everything exactly once).
    disposed = set(ledger) - {p.name for p in setup.capture().iterdir()}
    spooled = {Path(json.loads(m.read_text())["source"]).name for m in setup.spool.rglob("*.json")
               if m.name != "keyset.json" and "source" in json.loads(m.read_text())}
    assert disposed <= spooled, (disposed, spooled)
    agent = Agent(setup)
    agent.wait_for("delivered", count=3, timeout=60)
    assert agent.stop() == 0
    assert decrypt_all(setup.repository, setup.keyring) == {n: [h] for n, h in ledger.items()}
    assert spool_files(setup.spool) == []
