"""The reliability matrix's ledger, checker and figures (tests/test_reliability.py, docs/RELIABILITY.md).

A producer writes recordings with known SHA-256 (the ledger), each one carrying a marker pattern every
4 KiB so that plaintext anywhere outside the capture directory can be found by a byte scan. After a
scenario and its final clean (draining) run, the checker decrypts everything the repository holds and
adds the scenario's figures to its fault type's row: lost, duplicated, plaintext found, orphans, time
to recover and time to drain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_harness import PASSPHRASE, ROOT, Agent, Setup, decrypt_all, drop, spool_files
from agent_harness import new_setup as new_setup  # the rows' set-up; importers take it from here

from mediaseal import codec
from mediaseal.keys.keyring import Keyring

MARKER = b"MEDIASEAL-RELIABILITY-PLAINTEXT-MARKER:"
BLOCK = 4096
SOAK = bool(os.environ.get("MEDIASEAL_SOAK"))
REPORT = bool(os.environ.get("MEDIASEAL_RELIABILITY_REPORT"))
DOC = ROOT / "docs" / "RELIABILITY.md"


def sized(bounded: int, soak: int) -> int:
    """The iteration count: `bounded` in `make test`, `soak` under MEDIASEAL_SOAK=1 (`make soak`)."""
    return soak if SOAK else bounded


def recording(rng: random.Random, size: int) -> bytes:
    """`size` random bytes with MARKER at the start of every 4 KiB block (a 0-byte recording has none)."""
    out = bytearray()
    while len(out) < size:
        out += MARKER + rng.randbytes(BLOCK - len(MARKER))
    return bytes(out[:size])


class Ledger:
    """What the producer wrote: original name -> SHA-256 of the plaintext."""

    def __init__(self, seed: str) -> None:
        self.rng = random.Random(seed)
        self.sha: dict[str, str] = {}

    def produce(self, directory: Path, prefix: str, sizes: list[int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            name = f"{prefix}-{len(self.sha):05d}.bin"
            self.sha[name] = drop(directory, name, recording(self.rng, size))


def plaintext_hits(roots: list[Path], exclude: list[Path]) -> list[str]:
    """Files under `roots` (outside `exclude`) holding the marker, i.e. plaintext of a recording."""
    hits: list[str] = []
    for root in roots:
        for p in root.rglob("*"):
            if any(p.is_relative_to(x) for x in exclude):
                continue
            try:
                if p.is_file() and MARKER in p.read_bytes():
                    hits.append(str(p))
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                continue
    return hits


def scan_setup(setup: Setup) -> list[str]:
    """Plaintext outside the capture directories: everything under the set-up's root, plus the spool."""
    captures = [setup.capture(i) for i in range(len(setup.watches))]
    roots = [setup.root] + ([setup.spool] if not setup.spool.is_relative_to(setup.root) else [])
    return plaintext_hits(roots, captures)


# -- timing a (re)start ------------------------------------------------------------------------------------


@dataclass
class Restart:
    agent: Agent
    recover: float  # process start -> "ready"
    drain: float = 0.0  # process start -> capture and spool empty, everything delivered


def restart_and_drain(setup: Setup, timeout: float = 180.0, env: dict[str, str] | None = None) -> Restart:
    """The final clean run: start the agent, time it to "ready" and to drained, then stop it (exit 0)."""
    t0 = time.monotonic()
    agent = Agent(setup, env=env)
    agent.wait_for("ready")
    r = Restart(agent, time.monotonic() - t0)
    drain_running(agent, setup, timeout)
    r.drain = time.monotonic() - t0
    assert agent.stop() == 0, "\n".join(agent.lines[-10:])
    return r


def pending(setup: Setup) -> bool:
    return any(any(setup.capture(i).iterdir()) for i in range(len(setup.watches))) or bool(spool_files(setup.spool))


def drain_running(agent: Agent, setup: Setup, timeout: float = 180.0) -> None:
    """Wait (on the agent's own "delivered" and "disposed" events: they come in either order) until
    capture directories and spool are empty."""
    deadline = time.monotonic() + timeout
    while pending(setup):
        agent.wait_for(("delivered", "disposed"), timeout=max(1.0, deadline - time.monotonic()))


# -- the checker ---------------------------------------------------------------------------------------------


def capture_leftovers(setup: Setup) -> list[str]:
    """What disposal may leave in a capture directory and must not after the drain: a private
    `.mediaseal-<id>.disposing` name (the whole plaintext, ignored by every scan) or a completion
    marker (it would make the next recording under its name look complete)."""
    out: list[str] = []
    for i, w in enumerate(setup.watches):
        suffix = w.get("marker_suffix", ".done") if w.get("completion") == "marker" else None
        if setup.capture(i).exists():
            out += [str(p) for p in setup.capture(i).rglob("*") if not p.is_dir() and (
                (p.name.startswith(".mediaseal-") and p.name.endswith(".disposing"))
                or (suffix is not None and p.name.endswith(suffix)))]
    return out


@dataclass
class Check:
    recordings: int
    lost: list[str]
    duplicated: list[str]
    plaintext: list[str]
    orphans: list[str]


def check_filesystem(setup: Setup, ledger: Ledger) -> Check:
    got = decrypt_all(setup.repository, setup.keyring)  # original name -> SHA-256 of each package
    lost = [n for n, h in ledger.sha.items() if h not in got.get(n, [])]
    dup = [n for n, hs in got.items() if len(hs) > 1]
    orphans = [str(p) for p in spool_files(setup.spool)] + capture_leftovers(setup)
    orphans += [str(p) for p in setup.repository.rglob("*") if p.is_file() and
                (p.name.startswith(".") or not p.name.endswith(".mseal"))]
    return Check(len(ledger.sha), lost, dup, scan_setup(setup), orphans)


def check_s3(setup: Setup, ledger: Ledger, endpoint: str, bucket: str) -> Check:
    """Download and decrypt every object; count objects per original name and per recording id."""
    from s3_support import boto3_client

    s3 = boto3_client(endpoint)
    unwrapper = Keyring.open(setup.keyring).unlock(PASSPHRASE)
    by_name: dict[str, list[str]] = {}
    by_id: dict[str, int] = {}
    plaintext: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            if MARKER in body:
                plaintext.append(f"s3://{bucket}/{obj['Key']}")
            reader = codec.open_package(io.BytesIO(body), unwrapper)
            plain = io.BytesIO()
            reader.decrypt_to(plain)
            meta = reader.header.metadata
            by_name.setdefault(meta.original_name, []).append(hashlib.sha256(plain.getvalue()).hexdigest())
            by_id[meta.recording_id] = by_id.get(meta.recording_id, 0) + 1
    lost = [n for n, h in ledger.sha.items() if h not in by_name.get(n, [])]
    dup = [n for n, hs in by_name.items() if len(hs) > 1] + [i for i, c in by_id.items() if c > 1]
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    orphans = [f"multipart {u['Key']} {u['UploadId']}" for u in uploads] + [str(p) for p in spool_files(setup.spool)]
    orphans += capture_leftovers(setup)
    return Check(len(ledger.sha), lost, dup, plaintext + scan_setup(setup), orphans)


# -- the figures -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    repository: str
    fault: str
    iterations: int = 0
    recordings: int = 0
    lost: int = 0
    duplicated: int = 0
    plaintext: int = 0
    orphans: int = 0
    recover: list[float] = field(default_factory=list)
    drain: list[float] = field(default_factory=list)
    skipped: str = ""


FIGURES: dict[tuple[str, str], Row] = {}
ORDER: list[tuple[str, str]] = []


@dataclass
class Hostile:
    """One hostile-input target (a fuzzed parser, a server fed malformed requests): how many inputs it
    got, and the distinct failures seen (an unnamed exception, a crash, a hang, a large allocation: each
    a short signature; must be none)."""

    target: str
    method: str
    executions: int = 0
    failures: set[str] = field(default_factory=set)
    slowest: float = 0.0  # seconds, the slowest single input


HOSTILE: dict[str, Hostile] = {}


def hostile(target: str, method: str) -> Hostile:
    """The figures row for `target` (created on first use); add to `.executions`, `.failures`, `.slowest`."""
    if target not in HOSTILE:
        HOSTILE[target] = Hostile(target, method)
    return HOSTILE[target]


def row(repository: str, fault: str) -> Row:
    key = (repository, fault)
    if key not in FIGURES:
        FIGURES[key] = Row(repository, fault)
        ORDER.append(key)
    return FIGURES[key]


def stamp(event: dict[str, Any]) -> float:
    """The wall-clock time of an agent log event ("ts": 2026-11-28T18:00:00.123Z)."""
    return dt.datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def record_run(fault: str, setup: Setup, expected: dict[str, str], recover: list[float], drain: list[float],
               iterations: int = 1) -> Check:
    """A row for a test outside the crash loops (real producers, two agents, a full disk): the same
    checker over what it expected (original name -> SHA-256), recorded under the filesystem repository."""
    ledger = Ledger(fault)
    ledger.sha = dict(expected)
    check = check_filesystem(setup, ledger)
    record("filesystem", fault, check, iterations, recover, drain)
    return check


def record(repository: str, fault: str, check: Check, iterations: int,
           recover: list[float], drain: list[float]) -> Row:
    r = row(repository, fault)
    r.iterations += iterations
    r.recordings += check.recordings
    r.lost += len(check.lost)
    r.duplicated += len(check.duplicated)
    r.plaintext += len(check.plaintext)
    r.orphans += len(check.orphans)
    r.recover += recover
    r.drain += drain
    return r


def assert_zero(check: Check) -> None:
    """The must-be-zero figures, with the offending names in the message."""
    assert not check.lost, f"lost: {check.lost[:10]}"
    assert not check.duplicated, f"duplicated: {check.duplicated[:10]}"
    assert not check.plaintext, f"plaintext outside the capture directory: {check.plaintext[:10]}"
    # (Repository temp files left by a crash between write and rename were a real finding of this
    # suite; the filesystem repository now reuses one temp name per key, so the replay removes them.)
    assert not check.orphans, f"orphans after drain: {check.orphans[:10]}"


def skipped(repository: str, fault: str, reason: str) -> None:
    row(repository, fault).skipped = reason


def _secs(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.2f} / {max(xs):.2f}"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return r.stdout.strip() or "unknown"


def render(elapsed: float) -> str:
    form = ("soak form (`make soak`, MEDIASEAL_SOAK=1)" if SOAK
            else "bounded form (the `make test`-size runs, a few iterations per fault)")
    lines = [
        "# Reliability figures",
        "",
        "<!-- Generated by tests/test_reliability.py; do not edit by hand. -->",
        "",
        f"These are **{form}** figures.",
        "" if SOAK else "They are small runs, not the soak: the soak form runs >= 200 random SIGKILLs and more "
                        "iterations of every fault (see *Regenerating*).",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {_machine()}",
        f"- Commit: {_commit()} (working tree may differ)",
        f"- Suite wall time: {elapsed:.0f} s",
        "",
        "## Method",
        "",
        "A producer writes recordings (random bytes with a marker pattern at the start of every 4 KiB block)",
        "into the capture directory, keeping their SHA-256 in a ledger. The agent runs as a real subprocess",
        "(`mediaseal run`) against the filesystem repository, or against S3 (moto on loopback behind the",
        "fault-injecting proxy of `tests/s3_support.py`). Each fault is real: a named crash point",
        "(`MEDIASEAL_CRASH_AT`, an `os._exit` as abrupt as SIGKILL; among them each step of a source's",
        "disposal: its private rename, its marker removed, the source deleted), a real SIGKILL/SIGTERM",
        "(also timed to land inside disposal), refused, hung,",
        "failed or reset connections, a full tmpfs, `EIO` injected into fsync by strace. After each scenario",
        "a final clean run drains everything; the checker then decrypts everything in the repository.",
        "",
        "- **lost**: ledger entries with no decrypted package of the same name and SHA-256 (must be 0).",
        "- **duplicated**: names (or, on S3, recording ids) with more than one package/object (must be 0).",
        "- **plaintext**: files outside the capture directory (spool, repository, the rest of the agent's",
        "  directory; on S3 also every object) containing the marker, scanned after each fault and after the",
        "  drain (must be 0).",
        "- **orphans**: spool files (staging, packages, manifests, undisposed records), repository temp",
        "  files, S3 multipart uploads, or anything left in a capture directory (a completion marker, a",
        "  private `.mediaseal-<id>.disposing` name) after the drain (must be 0).",
        "- **recover**: seconds from the restart (process start) to the agent's `ready` event; for outages",
        "  and a full disk, where the agent keeps running, from the fix to the first delivery; for file",
        "  races, from the race to the first delivery; for exports (repository column `export`), from the",
        "  fix (key provider back) to the first recording exported by the re-run.",
        "- **drain**: seconds from the restart (or the fix, or the race) until every recording is delivered",
        "  (exported) and the capture directory and spool are empty. Shown as median / max.",
        "- Rows in the `export` column run `mediaseal export` / `mediaseal decrypt` as real processes",
        "  against a real Local Key Manager process (SIGKILLed) or moto KMS (key disabled); *lost* and",
        "  *duplicated* count exported objects, *orphans* half-written ones and multipart uploads.",
        "",
        "## Figures",
        "",
        "| repository | fault | iterations | recordings | lost | duplicated | plaintext | orphans"
        " | recover s (median / max) | drain s (median / max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ORDER:
        r = FIGURES[key]
        if r.skipped and not r.iterations:
            lines.append(f"| {r.repository} | {r.fault} | skipped: {r.skipped} | | | | | | | |")
            continue
        lines.append(f"| {r.repository} | {r.fault} | {r.iterations} | {r.recordings} | {r.lost} | {r.duplicated}"
                     f" | {r.plaintext} | {r.orphans} | {_secs(r.recover)} | {_secs(r.drain)} |")
    if HOSTILE:
        lines += [
            "",
            "## Hostile input",
            "",
            "Fuzzed parsers and servers fed malformed, oversized and slow requests. A failure is anything but",
            "a named error or a bounded refusal: an unnamed exception, a crash, a hang, a large allocation;",
            "*distinct failures* counts different signatures (must be 0).",
            "",
            "| target | method | executions | distinct failures | slowest input s |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [f"| {h.target} | {h.method} | {h.executions} | {len(h.failures)} | {h.slowest:.3f} |"
                  for h in HOSTILE.values()]
    bad = [r for r in FIGURES.values() if r.lost or r.duplicated or r.plaintext or r.orphans]
    bad_hostile = [h for h in HOSTILE.values() if h.failures]
    lines += ["", "## Findings", ""]
    if bad_hostile:
        lines += [f"- {h.target}: {len(h.failures)} distinct failures: {sorted(h.failures)[:5]}" for h in bad_hostile]
    if not bad and not bad_hostile:
        lines.append("Every must-be-zero figure is 0 in every row.")
    else:
        lines.append("Rows with a non-zero must-be-zero figure (the tests fail, or xfail for a known bug):")
        lines.append("")
        lines += [f"- {r.repository} / {r.fault}: lost {r.lost}, duplicated {r.duplicated},"
                  f" plaintext {r.plaintext}, orphans {r.orphans}" for r in bad]
        if any(r.repository == "filesystem" and r.orphans for r in bad):
            lines += [
                "",
                "Known bug behind the filesystem orphans: `uploader/filesystem.py` writes each package to",
                "`<dir>/.<name>.<hex>.tmp` (link or copy) and renames it into place; an abrupt exit while a",
                "delivery is in flight (any crash point or SIGKILL, since other recordings are being",
                "delivered concurrently) leaves that temp file, and nothing sweeps it on restart. It holds",
                "ciphertext only (no plaintext found) and the recording is delivered once, but the temp file",
                "stays in the repository forever. The tests xfail on exactly this and fail on anything else.",
            ]
    lines += [
        "",
        "## Also checked, suite-wide",
        "",
        "Every test of `make test` (not only these) ends with the secrets audit of `tests/secrets_audit.py`:",
        "every agent log line, command output, metrics scrape, manifest and non-package file is searched for",
        "every secret the test knows (passphrases, private keys, the DEKs of the packages it made, AWS and",
        "LKM credentials) in the usual encodings, and every file and directory the agent made must be",
        "0600 / 0700. A finding fails that test; the run prints a one-line summary of what was covered.",
        "",
        "## Not covered here",
        "",
        "moto does not model KMS key states or grants (the KMS rows make moto refuse Decrypt for a",
        "disabled key, as real KMS does), nor does it verify request checksums (corruption is tested through",
        "the fault proxy instead). Mounting the small tmpfs for *disk full* needs root.",
        "",
        "## Regenerating",
        "",
        "- Bounded form (what `make test` runs; this file is only rewritten when asked):",
        "  `MEDIASEAL_RELIABILITY_REPORT=1 .venv/bin/python -m pytest -q tests/test_reliability*.py"
        " tests/test_codec_fuzz.py tests/test_producers.py tests/test_ownership.py tests/test_enospc.py`",
        "- Soak form (>= 200 random SIGKILLs, more iterations of every fault): `make soak`, which sets",
        "  `MEDIASEAL_SOAK=1` and `MEDIASEAL_RELIABILITY_REPORT=1` and rewrites this file.",
        "- Disk full needs permission to mount a tmpfs (root); EIO on fsync needs `strace`. Without them",
        "  those rows say *skipped* and why.",
        "",
    ]
    return "\n".join(lines)


def write_report(elapsed: float) -> None:
    """Called once at the end of the session (tests/conftest.py) when MEDIASEAL_RELIABILITY_REPORT=1."""
    if REPORT and (FIGURES or HOSTILE):
        DOC.write_text(render(elapsed))

