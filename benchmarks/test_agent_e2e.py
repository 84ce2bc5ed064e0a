"""End to end: a recording dropped (renamed) into a capture directory until the agent has it confirmed
in the filesystem repository, against a plain copy of the same bytes in the same run.

The agent is the real daemon in a subprocess (as in tests/test_agent.py); a round ends at its
`delivered` log event. The baseline copies the same file with readinto/write in 1 MiB blocks and
fsyncs it once: the agent writes the bytes twice (spool, repository) and fsyncs both, so the ratio
includes everything that durability costs.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent, Setup, make_keyring

from benchmarks._support import MiB, Paired, interleave, report_throughput

LARGE = int(os.environ.get("MEDIASEAL_BENCH_E2E_MB", "64")) * MiB
SMALL = 64 * 1024
SMALL_COUNT = int(os.environ.get("MEDIASEAL_BENCH_SMALL_COUNT", "300"))


@pytest.fixture
def agent_setup(bench_dir: str) -> Any:
    root = Path(bench_dir) / "e2e"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    setup = Setup(root=root, keyring=make_keyring(root / "keyring"),
                  watches=[{"path": str(root / "capture"), "kind": "call", "completion": "rename"}])
    setup.agent.update(concurrency=2)
    agent = Agent(setup)
    agent.wait_for("ready")
    yield setup, agent
    agent.stop()
    shutil.rmtree(root, ignore_errors=True)


def _copy(src: Path, dst: Path) -> None:
    buf = memoryview(bytearray(MiB))
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        while n := f.readinto(buf):
            g.write(buf[:n])
        os.fsync(g.fileno())


def _clear_repository(setup: Setup) -> None:
    for p in setup.repository.iterdir():
        shutil.rmtree(p, ignore_errors=True)


def test_e2e_large_recording_vs_plain_copy(benchmark: Any, agent_setup: Any, bench_dir: str) -> None:
    setup, agent = agent_setup
    source = Path(bench_dir) / "e2e-source.bin"
    source.write_bytes(os.urandom(LARGE))
    staged = setup.capture() / ".incoming.part"
    copy_out = Path(bench_dir) / "e2e-copy.bin"
    n = [0]

    def before() -> None:
        shutil.copyfile(source, staged)  # untimed: the producer writing the recording

    def baseline() -> None:
        _copy(staged, copy_out)

    def measured() -> None:
        n[0] += 1
        name = f"rec-{n[0]}.bin"
        os.rename(staged, setup.capture() / name)
        agent.wait_for("delivered", where=lambda e: e["path"].endswith(name), timeout=300)

    def after() -> None:
        copy_out.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
        _clear_repository(setup)

    paired: Paired = interleave(benchmark, baseline, measured, rounds=5, warmup=1, before=before, after=after)
    report_throughput(benchmark, f"e2e drop->confirmed, filesystem repository, {LARGE // MiB} MiB", paired,
                      LARGE, "plain copy+fsync", target=0.7)
    source.unlink()


def test_e2e_small_file_rate(benchmark: Any, agent_setup: Any, bench_dir: str) -> None:
    setup, agent = agent_setup
    payload = os.urandom(SMALL)
    src_dir = Path(bench_dir) / "small-src"
    copy_dir = Path(bench_dir) / "small-copy"
    batch = [0]

    def before() -> None:
        src_dir.mkdir(exist_ok=True)
        copy_dir.mkdir(exist_ok=True)
        for i in range(SMALL_COUNT):
            (setup.capture() / f".s{i}.part").write_bytes(payload)

    def baseline() -> None:  # the same files, copied one by one with an fsync each
        for i in range(SMALL_COUNT):
            _copy(setup.capture() / f".s{i}.part", copy_dir / f"s{i}")

    def measured() -> None:
        batch[0] += 1
        for i in range(SMALL_COUNT):
            os.rename(setup.capture() / f".s{i}.part", setup.capture() / f"b{batch[0]}-{i}.bin")
        agent.wait_for("delivered", count=SMALL_COUNT, timeout=600)

    def after() -> None:
        shutil.rmtree(copy_dir, ignore_errors=True)
        for p in setup.capture().glob(".s*.part"):
            p.unlink()
        _clear_repository(setup)

    t0 = time.perf_counter()
    paired = interleave(benchmark, baseline, measured, rounds=3, warmup=1, before=before, after=after)
    rate = SMALL_COUNT / paired.measured_median
    report_throughput(benchmark, f"e2e small files ({SMALL // 1024} KiB x {SMALL_COUNT}): {rate:.0f} recordings/s",
                      paired, SMALL * SMALL_COUNT, "per-file copy+fsync")
    benchmark.extra_info.update(recordings_per_second=round(rate, 1), target_recordings_per_second=200,
                                elapsed_s=round(time.perf_counter() - t0, 1))


BACKLOG = int(os.environ.get("MEDIASEAL_BENCH_BACKLOG", "10000"))


def _vm_hwm_kib(pid: int) -> int:
    """Peak resident set of a live process (VmHWM, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_startup_with_a_backlog(benchmark: Any, bench_dir: str) -> None:
    """A start with 10,000 complete recordings waiting (an agent back after an outage): time to `ready`,
    to the first delivery and to the last, and peak RSS against the same agent started idle. Latency and
    memory, not throughput: reported as figures, with the idle start as the memory baseline."""
    from benchmarks._support import emit

    root = Path(bench_dir) / "backlog"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    setup = Setup(root=root, keyring=make_keyring(root / "keyring"),
                  watches=[{"path": str(root / "capture"), "kind": "call", "completion": "rename"}])
    idle = Agent(setup)
    idle.wait_for("ready")
    idle.wait_for("rescan-done")
    idle_kib = _vm_hwm_kib(idle.proc.pid)
    assert idle.stop() == 0
    payload = os.urandom(4096)
    for i in range(BACKLOG):
        (setup.capture() / f"r{i:05d}.bin").write_bytes(payload)
    figures: dict[str, float] = {}

    def run() -> None:
        t0 = time.perf_counter()
        agent = Agent(setup)
        agent.wait_for("ready", timeout=300)
        figures["ready_s"] = time.perf_counter() - t0
        agent.wait_for("delivered", timeout=300)
        figures["first_delivery_s"] = time.perf_counter() - t0
        agent.wait_for("delivered", count=BACKLOG - 1, timeout=1200)
        figures["drained_s"] = time.perf_counter() - t0
        figures["peak_rss_mib"] = _vm_hwm_kib(agent.proc.pid) / 1024
        assert agent.stop() == 0

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert not list(setup.capture().iterdir())
    growth = figures["peak_rss_mib"] - idle_kib / 1024
    emit(f"start-up with a {BACKLOG:,}-file backlog (4 KiB each): ready {figures['ready_s']:.2f} s, first delivery"
         f" {figures['first_delivery_s']:.2f} s, drained {figures['drained_s']:.1f} s"
         f" ({BACKLOG / figures['drained_s']:.0f} recordings/s); peak RSS {figures['peak_rss_mib']:.1f} MiB vs"
         f" {idle_kib / 1024:.1f} MiB started idle (+{growth:.1f} MiB)")
    benchmark.extra_info.update(name="startup backlog", backlog=BACKLOG, idle_peak_rss_mib=round(idle_kib / 1024, 1),
                                **{k: round(v, 3) for k, v in figures.items()})
    shutil.rmtree(root, ignore_errors=True)
