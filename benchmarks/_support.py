"""Shared machinery for the benchmarks: interleaved baseline/measured rounds, ratios, reporting.

The load meter, the copy baseline, the ratios and the machine facts are the installed package's
(mediaseal.agent.measure, shared with `mediaseal bench`). Every figure is a ratio against a baseline
measured in the same run, interleaved round by round
(baseline, measured, baseline, measured, ...), from medians. Nothing here asserts a wall-clock
threshold; a ratio is asserted only with MEDIASEAL_BENCH_STRICT=1.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from mediaseal import codec
from mediaseal.agent import measure
from mediaseal.agent.measure import LoadMeter, paired_ratio, speed_ratio

MiB = 1 << 20
GiB = 1 << 30

STRICT = os.environ.get("MEDIASEAL_BENCH_STRICT") == "1"
FSYNC = os.environ.get("MEDIASEAL_BENCH_FSYNC") == "1"  # include fsync in both sides of file benchmarks
ROUNDS = int(os.environ.get("MEDIASEAL_BENCH_ROUNDS", "15"))
# The file-to-file source size. Each round writes two files of this size (then deletes them): keep it to
# 64..128 MiB, since the VMs throttle bursts of more than ~300 MiB of new file data.
SOURCE_SIZE = int(os.environ.get("MEDIASEAL_BENCH_MB", "64")) * MiB
WARMUP = int(os.environ.get("MEDIASEAL_BENCH_WARMUP", "1"))
# Before each benchmark, wait up to this many seconds for the other processes on the machine to go quiet.
QUIET_WAIT = float(os.environ.get("MEDIASEAL_BENCH_QUIET_WAIT", "10"))
# When other processes used more than LOADED cores during a measurement, measure again up to RETRIES times.
RETRIES = int(os.environ.get("MEDIASEAL_BENCH_RETRIES", "2"))
LOADED = 0.2

# Every printed line, in order, for the terminal summary (conftest prints them at the end).
REPORT: list[str] = []


def wait_for_quiet(max_wait: float = QUIET_WAIT, threshold: float = 0.15) -> float:
    """Wait (up to `max_wait` s) for a 1-second window in which other processes use < `threshold` cores."""
    deadline = time.monotonic() + max_wait
    while True:
        meter = LoadMeter()
        time.sleep(1.0)
        load = meter.other_cores()
        if load < threshold or time.monotonic() >= deadline:
            return load


@dataclass
class Paired:
    """Seconds per round for the baseline and the measured side, warm-up rounds already dropped."""

    baseline: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)
    other_load: float = 0.0  # cores used by other processes meanwhile (LoadMeter)
    attempt: int = 1  # which measurement this is (see RETRIES)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def measured_median(self) -> float:
        return statistics.median(self.measured)

    @property
    def speed_ratio(self) -> float:
        """Measured speed over baseline speed, from the medians (>1: measured is faster)."""
        return speed_ratio(self.baseline, self.measured)

    @property
    def paired_ratio(self) -> float:
        """Median of per-round ratios (baseline_i / measured_i): robust to slow drift over the run."""
        return paired_ratio(self.baseline, self.measured)


def interleave(
    benchmark: Any,
    baseline: Callable[[], object],
    measured: Callable[[], object],
    *,
    rounds: int = ROUNDS,
    warmup: int = WARMUP,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
) -> Paired:
    """Run baseline then measured, `rounds` times, through pytest-benchmark's pedantic mode.

    pytest-benchmark times the measured side (its own table shows it); the baseline runs in the
    round's setup, timed here. `before` prepares a run (untimed), `after` cleans up after one (untimed,
    e.g. deletes the output file), around each side alike.
    """
    base: list[float] = []
    meas: list[float] = []

    def run_before() -> None:
        if before is not None:
            before()

    def run_after() -> None:
        if after is not None:
            after()

    def setup() -> None:
        run_before()
        t0 = time.perf_counter()
        baseline()
        base.append(time.perf_counter() - t0)
        run_after()
        run_before()

    def target() -> None:
        t0 = time.perf_counter()
        measured()
        meas.append(time.perf_counter() - t0)

    enabled = getattr(benchmark, "enabled", True)
    if enabled:
        wait_for_quiet()
    meter = LoadMeter()
    benchmark.pedantic(
        target, setup=setup, teardown=lambda: run_after(), rounds=rounds, warmup_rounds=warmup, iterations=1
    )
    drop = warmup if len(meas) > warmup else 0  # with --benchmark-disable pedantic runs once, no warm-up
    best = Paired(base[drop:], meas[drop:], meter.other_cores())
    # A neighbour that got busy mid-measurement takes the second core from the overlapped paths: measure
    # again (pytest-benchmark's table keeps the first attempt) and keep the least disturbed attempt.
    for attempt in range(2, RETRIES + 2):
        if not enabled or best.other_load <= LOADED:
            break
        wait_for_quiet()
        base.clear()
        meas.clear()
        meter = LoadMeter()
        for _ in range(warmup + rounds):
            setup()
            target()
            run_after()
        again = Paired(base[warmup:], meas[warmup:], meter.other_cores(), attempt)
        if again.other_load < best.other_load:
            best = again
    return best


def _attempt(paired: Paired) -> str:
    return f", attempt {paired.attempt}" if paired.attempt > 1 else ""


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def report_throughput(
    benchmark: Any,
    name: str,
    paired: Paired,
    nbytes: int,
    baseline_name: str,
    target: float | None = None,
) -> float:
    """Print `name: X GB/s vs baseline Y GB/s = R x (target >= T x)` and record it in extra_info."""
    meas, base = gbps(nbytes, paired.measured_median), gbps(nbytes, paired.baseline_median)
    figures = f"{meas:.2f} GB/s vs {baseline_name} {base:.2f} GB/s"
    return _report(benchmark, name, paired, figures, f"{len(paired.measured)} rounds", baseline_name, target,
                   measured_gbps=round(meas, 4), baseline_gbps=round(base, 4), bytes=nbytes, fsync_included=FSYNC)


def report_latency(
    benchmark: Any,
    name: str,
    paired: Paired,
    per_round: int,
    baseline_name: str,
    target: float | None = None,
) -> float:
    """Print `name: X us/op vs baseline Y us/op = R x` (R = baseline time / measured time)."""
    meas = paired.measured_median / per_round * 1e6
    base = paired.baseline_median / per_round * 1e6
    figures = f"{meas:.1f} us/op vs {baseline_name} {base:.1f} us/op"
    return _report(benchmark, name, paired, figures, f"{len(paired.measured)} rounds x {per_round}", baseline_name,
                   target, measured_us_per_op=round(meas, 3), baseline_us_per_op=round(base, 3),
                   ops_per_round=per_round)


def _report(benchmark: Any, name: str, paired: Paired, figures: str, rounds: str, baseline_name: str,
            target: float | None, **extra: Any) -> float:
    """The report line and extra_info shared by every figure; asserts the target with MEDIASEAL_BENCH_STRICT=1."""
    ratio = paired.speed_ratio
    verdict = ""
    if target is not None:
        verdict = f" (target >= {target}x: {'met' if ratio >= target else 'NOT MET'})"
    line = (
        f"{name}: {figures} = {ratio:.2f}x [paired {paired.paired_ratio:.2f}x, {rounds},"
        f" other load {paired.other_load:.2f} cores{_attempt(paired)}]{verdict}"
    )
    _emit(line)
    benchmark.extra_info.update(
        name=name,
        ratio=round(ratio, 4),
        paired_ratio=round(paired.paired_ratio, 4),
        baseline=baseline_name,
        target=target,
        rounds=len(paired.measured),
        other_load_cores=round(paired.other_load, 3),
        attempt=paired.attempt,
        baseline_s=[round(x, 6) for x in paired.baseline],
        measured_s=[round(x, 6) for x in paired.measured],
        **extra,
    )
    if STRICT and target is not None:
        assert ratio >= target, line
    return ratio


def emit(line: str) -> None:
    _emit(line)


def _emit(line: str) -> None:
    print("\n" + line, flush=True)
    REPORT.append(line)


class PatternReader:
    """A readable stream of `size` deterministic, non-repeating-per-chunk bytes that holds only ~2 MiB.

    It serves windows of a fixed random block whose period (1 MiB + 4093) is not a divisor of any
    power-of-two chunk size, so consecutive chunks differ. Stands in for a recording too large to
    write to disk (the peak-RSS probe) and feeds the large range-decrypt package.
    """

    PERIOD = MiB + 4093

    def __init__(self, size: int, seed: int = 0) -> None:
        import random

        block = random.Random(seed).randbytes(self.PERIOD)
        self._block = memoryview(block + block)  # any window of <= PERIOD bytes is contiguous
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview | bytearray) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), self._size - self._pos)
        done = 0
        while done < n:
            off = (self._pos + done) % self.PERIOD
            k = min(n - done, self.PERIOD)
            view[done : done + k] = self._block[off : off + k]
            done += k
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._size - self._pos
        buf = bytearray(min(n, self._size - self._pos))
        got = self.readinto(buf)
        return bytes(buf[:got])


class KeyUnwrapper:
    """The test-only private KEK as an Unwrapper (what a keyring does, minus the keyring)."""

    def __init__(self, kid: str, private_key: rsa.RSAPrivateKey) -> None:
        self.kid = kid
        self.private_key = private_key

    def unwrap(self, wraps: Sequence[codec.Wrap]) -> bytes:
        for w in wraps:
            if w.kid == self.kid:
                return codec.unwrap_dek(w, self.private_key)
        raise codec.NoMatchingKeyError("no wrap for the benchmark key")


class CachedUnwrapper:
    """Hands back a DEK unwrapped earlier: keeps the RSA private operation (measured on its own) out of
    the decrypt throughput figures."""

    def __init__(self, dek: bytes) -> None:
        self.dek = dek

    def unwrap(self, wraps: Sequence[codec.Wrap]) -> bytes:
        return self.dek


@dataclass(frozen=True)
class Package:
    path: str
    plaintext_size: int
    package_size: int
    unwrapper: CachedUnwrapper


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class NullSink:
    """A writable that keeps nothing (for latency figures where the output's destination is not the point)."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def seal_file(
    src_path: str, dst_path: str, header: codec.Header, keys: codec.Keys, *, overlap: bool = True, digest: bool = False
) -> codec.SealResult:
    with open(src_path, "rb", buffering=0) as src, open(dst_path, "wb", buffering=0) as dst:
        result = codec.seal(src, dst, header, keys, overlap=overlap, digest=digest)
        if FSYNC:
            os.fsync(dst.fileno())
    return result


class FreshPackage:
    """A new header and keys (fresh DEK, as for every recording) before each run, made outside the timing."""

    def __init__(self, recipient: codec.Recipient, chunk_size: int = codec.DEFAULT_CHUNK_SIZE) -> None:
        self.recipient = recipient
        self.chunk_size = chunk_size
        self.renew()

    def renew(self) -> None:
        self.header, self.keys = codec.new_package(codec.Metadata("bench-seal"), [self.recipient], self.chunk_size)


def plain_copy(src_path: str, dst_path: str, block: int = MiB) -> int:
    """The file baseline (agent.measure.plain_copy), fsynced only with MEDIASEAL_BENCH_FSYNC=1, as the
    measured side's files are."""
    return measure.plain_copy(src_path, dst_path, fsync=FSYNC, block=block)


def machine_info(path: str) -> dict[str, str]:
    """What the figures were measured on (agent.measure.machine_info), and whether fsync was included."""
    return {**measure.machine_info(path), "temp_dir": path, "fsync_included": str(FSYNC)}
