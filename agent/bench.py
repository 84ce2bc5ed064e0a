"""`mediaseal bench`: what this host's own disks give the agent, against a plain copy of the same bytes.

>>> mediaseal bench --dir /var/lib/mediaseal --size 64MiB --rounds 5        # a table
>>> mediaseal bench --dir /var/lib/mediaseal --json                         # one JSON document

Every figure is a ratio to a baseline measured in the same run, interleaved round by round
(copy, measured, copy, measured, ...), from medians, as in benchmarks/ (docs/BENCHMARKS.md):

- file to spool: `codec.seal` of a fresh file into DIR as the agent seals (no digest: the package's
  SHA-256 is computed at delivery, and only where the repository needs it), and with the digest
  (`digest=True`, for what an S3 or cross-filesystem delivery adds), against a plain 1 MiB
  `readinto`/`write` copy of the same file;
- end to end: the real agent (`mediaseal run` as a subprocess, its own capture, spool and a file://
  repository in DIR, or `--repository URL`): a recording dropped by rename until the agent's
  `delivered` log event, against a copy of the same file with one fsync (the agent fsyncs too);
- small files: 64 KiB recordings dropped in a batch, recordings/s, against per-file copy+fsync.

It makes a throwaway keyring (random passphrase, never stored: only the public key is used) in its
own temporary directory under DIR and removes everything it wrote, except packages delivered to a
`--repository` other than file:// (their keys are listed). Other processes' CPU during each
measurement is reported ("other load", in cores): on a busy host the ratios understate the agent.
The load meter, the copy baseline, the ratios and the machine facts are agent/measure.py's, shared with
benchmarks/; the command's parser and table are agent/cli/bench_cmd.py's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mediaseal import codec
from mediaseal.agent.measure import LoadMeter, machine_info, paired_ratio, plain_copy, speed_ratio, timed
from mediaseal.buffer.spool import StagingFile

KiB = 1 << 10
MiB = 1 << 20
SMALL_SIZE = 64 * KiB
JSON_VERSION = 1


class BenchError(Exception):
    """An expected failure (bad directory, the agent did not start): reported as one line."""


@dataclass(frozen=True)
class BenchOptions:
    dir: Path
    size: int = 64 * MiB
    rounds: int = 5
    warmup: int = 1
    repository: str | None = None
    endpoint_url: str | None = None
    small_count: int = 200
    fsync: bool = False  # include fsync in both sides of the file-to-spool figures
    timeout: float = 600.0  # seconds to wait for the agent at any one step


@dataclass
class Result:
    """One measurement: per-round seconds of the measured side and of its copy baseline."""

    name: str
    nbytes: int  # bytes per round (of the recording(s))
    recordings: int  # recordings per round
    baseline_name: str
    measured_s: list[float] = field(default_factory=list)
    baseline_s: list[float] = field(default_factory=list)
    other_load_cores: float = 0.0

    def add(self, round_: int, warmup: int, baseline_s: float, measured_s: float) -> None:
        """One round's pair of times; warm-up rounds (round_ < warmup) are dropped."""
        if round_ >= warmup:
            self.baseline_s.append(baseline_s)
            self.measured_s.append(measured_s)

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / statistics.median(self.measured_s) / 1e6

    @property
    def baseline_mb_per_s(self) -> float:
        return self.nbytes / statistics.median(self.baseline_s) / 1e6

    @property
    def ratio(self) -> float:
        """Median baseline time / median measured time (> 1: faster than the copy)."""
        return speed_ratio(self.baseline_s, self.measured_s)

    @property
    def paired_ratio(self) -> float:
        return paired_ratio(self.baseline_s, self.measured_s)

    @property
    def recordings_per_s(self) -> float:
        return self.recordings / statistics.median(self.measured_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes_per_round": self.nbytes,
            "recordings_per_round": self.recordings,
            "rounds": len(self.measured_s),
            "mb_per_s": round(self.mb_per_s, 2),
            "baseline": self.baseline_name,
            "baseline_mb_per_s": round(self.baseline_mb_per_s, 2),
            "ratio": round(self.ratio, 4),
            "paired_ratio": round(self.paired_ratio, 4),
            "recordings_per_s": round(self.recordings_per_s, 2),
            "other_load_cores": round(self.other_load_cores, 3),
            "measured_s": [round(x, 6) for x in self.measured_s],
            "baseline_s": [round(x, 6) for x in self.baseline_s],
        }


@dataclass
class Report:
    options: BenchOptions
    machine: dict[str, str]
    results: dict[str, Result] = field(default_factory=dict)
    left_in_repository: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()}
        return {
            "version": JSON_VERSION,
            "options": opts,
            "machine": self.machine,
            "units": {"mb_per_s": "10^6 bytes per second", "ratio": "baseline time / measured time"},
            "results": {k: r.to_json() for k, r in self.results.items()},
            "left_in_repository": self.left_in_repository,
        }


# -- measuring -------------------------------------------------------------------------------------


def write_source(path: Path, size: int) -> None:
    """`size` incompressible bytes, written 1 MiB at a time (a recording that has just been finished)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(os.urandom(n))
            left -= n


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def measure_spool(work: Path, recipient: codec.Recipient, opts: BenchOptions) -> dict[str, Result]:
    """file -> spool: `codec.seal` (as the agent: no digest; and with digest=True), each round after a copy."""
    source, copy_out, sealed = work / "source.bin", work / "copy.bin", work / "spool.mseal"
    write_source(source, opts.size)
    with_digest = Result("file -> spool, seal + SHA-256", opts.size, 1, "plain copy")
    no_digest = Result("file -> spool, seal (as the agent)", opts.size, 1, "plain copy")

    def seal(digest: bool) -> float:
        header, keys = codec.new_package(codec.Metadata("bench-spool"), [recipient])  # untimed, as in the agent

        def run() -> None:
            with open(source, "rb", buffering=0) as f, open(sealed, "wb", buffering=0) as g:
                # With fsync, through the spool's StagingFile as the agent writes: it starts the disk
                # writeback every 8 MiB so that the fsync waits for the tail only. Without fsync nothing
                # waits for the disk, and starting writeback would only spend CPU the copy does not.
                codec.seal(f, StagingFile(g) if opts.fsync else g, header, keys, digest=digest)
                if opts.fsync:
                    os.fsync(g.fileno())

        try:
            return timed(run)
        finally:
            _unlink(sealed)

    meter = LoadMeter()
    try:
        for i in range(opts.warmup + opts.rounds):
            base = timed(lambda: plain_copy(source, copy_out, fsync=opts.fsync))
            _unlink(copy_out)
            d, nd = seal(True), seal(False)
            with_digest.add(i, opts.warmup, base, d)
            no_digest.add(i, opts.warmup, base, nd)
    finally:
        _unlink(source)
        _unlink(copy_out)
    with_digest.other_load_cores = no_digest.other_load_cores = meter.other_cores()
    return {"spool": no_digest, "spool_digest": with_digest}


class AgentProcess:
    """`mediaseal run --config FILE --log-format json` as a child; its JSON log lines are the events."""

    def __init__(self, config: Path, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.lines: list[str] = []
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mediaseal.agent.cli", "run", "--config", str(config), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd,
        )
        self._reader = threading.Thread(target=self._read, name="bench-agent-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                self.events.put(doc)
        self.events.put({"event": "_exit"})

    def wait_for(self, event: str, timeout: float, count: int = 1,
                 where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while len(got) < count:
            left = deadline - time.monotonic()
            try:
                doc = self.events.get(timeout=max(left, 0.0)) if left > 0 else None
            except queue.Empty:
                doc = None
            if doc is None:
                raise BenchError(f"the agent did not log {count} x {event!r} within {timeout:g} s"
                                 f" (got {len(got)}){self._last_line()}")
            if doc.get("event") == "_exit":
                raise BenchError(f"the agent exited ({self.proc.wait()}) while the benchmark waited for"
                                 f" {event!r}{self._last_line()}")
            if doc.get("event") == event and (where is None or where(doc)):
                got.append(doc)
        return got

    def _last_line(self) -> str:
        for line in reversed(self.lines):
            if line.strip():
                return f"; its last log line: {line.strip()[:300]}"
        return ""

    def cpu_seconds(self) -> float:
        """The child's CPU time so far (from /proc), to keep it out of the other-load figure."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def write_agent_config(root: Path, keyring: Path, repository: str, endpoint_url: str | None) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "agent": {"id": "mediaseal-bench", "concurrency": 2, "rescan_seconds": 30, "log_format": "json"},
        "watch": {"path": root / "capture", "kind": "call", "completion": "rename"},
        "buffer": {"path": root / "spool"},
        "keys": {"keyring": keyring},
        "repository": {"url": repository, **({"endpoint_url": endpoint_url} if endpoint_url else {})},
        "metrics": {"enabled": False},
    }
    lines: list[str] = []
    for name, body in sections.items():
        lines.append(f"[[{name}]]" if name == "watch" else f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in body.items()]
    path = root / "mediaseal.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class _Delivered:
    """Removes what the agent delivered to a file:// repository; remembers the keys it cannot remove."""

    def __init__(self, repository: str) -> None:
        parsed = urlparse(repository)
        self.root = Path(unquote(parsed.path)) if parsed.scheme == "file" else None
        self.left: list[str] = []

    def remove(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            key = str(e.get("key", ""))
            if self.root is None:
                self.left.append(key)
                continue
            if key and ".." not in Path(key).parts:
                _unlink(self.root / key)


def measure_agent(work: Path, keyring: Path, opts: BenchOptions) -> tuple[dict[str, Result], list[str]]:
    """The real agent, end to end: one large recording per round, then a batch of 64 KiB recordings."""
    root = work / "agent"
    capture = root / "capture"
    capture.mkdir(parents=True)
    if opts.repository is None:
        (root / "repository").mkdir()
        repository = f"file://{root / 'repository'}"
    else:
        repository = opts.repository
    delivered = _Delivered(repository)
    agent = AgentProcess(write_agent_config(root, keyring, repository, opts.endpoint_url), root)
    results: dict[str, Result] = {}
    try:
        agent.wait_for("ready", timeout=min(opts.timeout, 120.0))
        results["e2e"] = _e2e_large(work, capture, agent, delivered, opts)
        if opts.small_count:
            results["small_files"] = _e2e_small(work, capture, agent, delivered, opts)
    finally:
        agent.stop()
    return results, delivered.left


def _named(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: os.path.basename(str(e.get("path", ""))) == name


def _tagged(tag: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: os.path.basename(str(e.get("path", ""))).startswith(tag)


def _copy_each(paths: list[Path], into: Path) -> None:
    for p in paths:
        plain_copy(p, into / p.name, fsync=True)


def _e2e_large(work: Path, capture: Path, agent: AgentProcess, delivered: _Delivered, opts: BenchOptions) -> Result:
    result = Result(f"end to end, {_fmt_size(opts.size)}: drop -> delivered", opts.size, 1, "plain copy+fsync")
    source, copy_out = work / "e2e-source.bin", work / "e2e-copy.bin"
    staged = capture / ".incoming.part"
    write_source(source, opts.size)
    meter, agent_cpu0 = LoadMeter(), agent.cpu_seconds()
    try:
        for i in range(opts.warmup + opts.rounds):
            shutil.copyfile(source, staged)  # untimed: the producer writing its recording
            base = timed(lambda: plain_copy(staged, copy_out, fsync=True))
            _unlink(copy_out)
            name = f"bench-{i}-{secrets.token_hex(4)}.bin"
            t0 = time.perf_counter()
            os.rename(staged, capture / name)
            events = agent.wait_for("delivered", opts.timeout, where=_named(name))
            took = time.perf_counter() - t0
            delivered.remove(events)
            result.add(i, opts.warmup, base, took)
    finally:
        _unlink(source)
        _unlink(copy_out)
        _unlink(staged)
    result.other_load_cores = meter.other_cores(agent.cpu_seconds() - agent_cpu0)
    return result


def _e2e_small(work: Path, capture: Path, agent: AgentProcess, delivered: _Delivered, opts: BenchOptions) -> Result:
    n = opts.small_count
    result = Result(f"small files, {SMALL_SIZE // KiB} KiB x {n}: drop -> delivered", n * SMALL_SIZE, n,
                    "per-file copy+fsync")
    copies = work / "small-copies"
    payload = os.urandom(SMALL_SIZE)
    meter, agent_cpu0 = LoadMeter(), agent.cpu_seconds()
    try:
        for i in range(opts.warmup + opts.rounds):
            staged = [capture / f".small-{j}.part" for j in range(n)]
            for p in staged:  # untimed: the producer
                p.write_bytes(payload)
            copies.mkdir(exist_ok=True)
            base = timed(functools.partial(_copy_each, staged, copies))
            shutil.rmtree(copies)
            tag = f"bench-{i}-{secrets.token_hex(4)}-"
            t0 = time.perf_counter()
            for j, p in enumerate(staged):
                os.rename(p, capture / f"{tag}{j}.bin")
            events = agent.wait_for("delivered", opts.timeout, count=n, where=_tagged(tag))
            took = time.perf_counter() - t0
            delivered.remove(events)
            result.add(i, opts.warmup, base, took)
    finally:
        shutil.rmtree(copies, ignore_errors=True)
        for p in capture.glob(".small-*.part"):
            _unlink(p)
    result.other_load_cores = meter.other_cores(agent.cpu_seconds() - agent_cpu0)
    return result


@contextlib.contextmanager
def _workdir(parent: Path) -> Iterator[Path]:
    if not parent.is_dir():
        raise BenchError(f"{parent} is not a directory")
    try:
        work = Path(tempfile.mkdtemp(prefix=".mediaseal-bench-", dir=parent))
    except OSError as e:
        raise BenchError(f"cannot write in {parent}: {e.strerror}") from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> Report:
    """Every measurement, in a temporary directory under `opts.dir` that is removed afterwards."""
    from mediaseal.keys.keyring import Keyring

    say = progress or (lambda _msg: None)
    report = Report(opts, machine_info(opts.dir))
    with _workdir(opts.dir) as work:
        keyring = work / "keyring"
        # A throwaway keyring: only its public key is used; the passphrase is random and never kept.
        recipient = Keyring.init(keyring, secrets.token_urlsafe(32).encode()).recipient()
        say(f"file to spool: {opts.warmup} + {opts.rounds} rounds of {_fmt_size(opts.size)}")
        try:
            report.results.update(measure_spool(work, recipient, opts))
        except OSError as e:
            raise BenchError(f"file to spool in {opts.dir}: {e}") from None
        say("end to end: starting the agent")
        try:
            results, left = measure_agent(work, keyring, opts)
        except OSError as e:
            raise BenchError(f"end to end in {opts.dir}: {e}") from None
        report.results.update(results)
        report.left_in_repository = left
    return report


# -- the command -----------------------------------------------------------------------------------


def _fmt_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"
