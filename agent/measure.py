"""How mediaseal measures itself: one copy of the pieces that `mediaseal bench` (agent/bench.py) and the
benchmark suite (benchmarks/) share, installed with the package so that benchmarks import it like any
module (no sys.path edits).

>>> meter = LoadMeter(); ...; meter.other_cores()          # CPU other processes used meanwhile, in cores
>>> plain_copy(src, dst, fsync=True)                       # the copy baseline every ratio is measured against
>>> speed_ratio(baseline_s, measured_s), paired_ratio(baseline_s, measured_s)

Every figure is a ratio to a baseline measured in the same run, interleaved round by round, from
medians (docs/BENCHMARKS.md): ratios > 1 mean the measured side is faster than the baseline.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MiB = 1 << 20
BLOCK = MiB  # the copy baseline's block, and the codec's default chunk


class LoadMeter:
    """CPU used by *other* processes since it was made, in cores (/proc/stat minus our own and our
    children's CPU time, and minus `agent_cpu_s` of a child measured on its own).

    On a small VM shared with other work, one busy neighbour takes away the second core that the
    overlapped (two-thread) paths need while a one-thread baseline hardly notices: ratios measured under
    load understate the codec, so every report carries this figure.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        busy = 0.0
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
            busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def other_cores(self, agent_cpu_s: float = 0.0) -> float:
        t1, busy1, own1 = self._sample()
        t0, busy0, own0 = self._start
        return max(0.0, (busy1 - busy0) - (own1 - own0) - agent_cpu_s) / max(t1 - t0, 1e-9)


def plain_copy(src: str | Path, dst: str | Path, *, fsync: bool, block: int = BLOCK) -> int:
    """The file baseline: `readinto` a preallocated block, `write` it, to a fresh unbuffered file."""
    buf = memoryview(bytearray(block))
    total = 0
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        while n := f.readinto(buf):
            view = buf[:n]
            while view:
                view = view[g.write(view) or 0:]
            total += n
        if fsync:
            os.fsync(g.fileno())
    return total


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` took (perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed_ratio(baseline_s: Sequence[float], measured_s: Sequence[float]) -> float:
    """Median baseline time / median measured time (> 1: the measured side is faster)."""
    return statistics.median(baseline_s) / statistics.median(measured_s)


def paired_ratio(baseline_s: Sequence[float], measured_s: Sequence[float]) -> float:
    """Median of per-round ratios (baseline_i / measured_i): robust to slow drift over the run."""
    return statistics.median(b / m for b, m in zip(baseline_s, measured_s, strict=True))


def machine_info(path: str | Path) -> dict[str, str]:
    """What the figures were measured on: host, CPU, cores, Python, cryptography/OpenSSL, `path`'s filesystem."""
    import cryptography

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "unknown"
    with contextlib.suppress(OSError, ValueError):
        real, best = os.path.realpath(path), ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, mopts = line.split()[:4]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, f"{fstype} on {dev} at {mnt} ({mopts})"
    return {
        "host": platform.node(),
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": _openssl_version(),
        "dir": str(path),
        "filesystem": fs,
    }


def _openssl_version() -> str:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return str(backend.openssl_version_text())
    except Exception:
        return "unknown"
