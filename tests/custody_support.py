"""Test support for custody outages during decrypt and export (tests/test_reliability_export.py).

- `Command`: a `mediaseal ...` child process whose stderr lines are collected with their arrival times
  (a thread reads them), so a test can act on "the first recording was exported" and time recovery.
- `LKMProcess`: the reference Local Key Manager as a real `mediaseal lkm serve` process on loopback
  (HTTPS), started on a port of the OS's choosing, SIGKILLed for real and restarted on the same port.
- `Corpus`: recordings with the marker pattern (reliability_support.recording), sealed to a keyring's
  current key and stored in a repository (S3 in moto, or a directory), with the ledger of their SHA-256.
- `check_export`: what a destination bucket holds after an export, against the ledger: lost,
  duplicated (also: exported by more than one run), half-exported objects and multipart uploads.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from reliability_support import Check, Ledger, recording

from mediaseal import codec
from mediaseal.keys.keyring import Keyring
from mediaseal.uploader.base import repository_key

CAPTURED_AT = "2026-11-28T10:00:00Z"
EXPORTED = re.compile(r"^export: exported (\S+): ")


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment (moto's fake AWS credentials included) without MEDIASEAL_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- child processes ---------------------------------------------------------------------------------------


_CHILDREN: list[subprocess.Popen[bytes]] = []


def reap() -> None:
    """Kill every child this module started that is still running (a failed test skips its clean-up)."""
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class Command:
    """`python -m agent.cli ARGS` as a child; stderr lines (with monotonic arrival times) and stdout."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "mediaseal.agent.cli", *args], env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _CHILDREN.append(self.proc)
        self.lines: list[tuple[float, str]] = []
        self.stdout = ""
        self.ended: float | None = None
        self._cond = threading.Condition()
        self._eof = False
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read().decode(errors="replace")

    def wait_line(self, pattern: re.Pattern[str], timeout: float = 60.0) -> float:
        """The arrival time of the first stderr line matching `pattern` (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, line in self.lines:
                    if pattern.search(line):
                        return t
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(f"no line matching {pattern.pattern!r} from {self.args[:1]}"
                                         f" (exit {self.proc.poll()}):\n{self.stderr[-3000:]}")
                self._cond.wait(left)

    def finish(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self.ended = self.ended or time.monotonic()
        for t in self._threads:
            t.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def exported(self) -> list[str]:
        """Source keys this run reported as exported, in order."""
        with self._cond:
            return [m.group(1) for _, line in self.lines if (m := EXPORTED.match(line))]

    def first_exported(self) -> float | None:
        with self._cond:
            return next((t for t, line in self.lines if EXPORTED.match(line)), None)


def one_error_line(cmd: Command, code: int) -> str:
    """Exit 1, exactly one `mediaseal: error:` line, no traceback, no per-recording failure lines."""
    err = cmd.stderr
    assert code == 1, f"exit {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("mediaseal: error: ")]
    assert len(errors) == 1, f"{len(errors)} error lines:\n{err[-3000:]}"
    assert not any(ln.startswith("export: failed ") for ln in err.splitlines()), err[-3000:]
    print(f"\n[custody] {errors[0]}")  # what the operator sees (pytest -s)
    return errors[0]


@dataclass
class LKMWorld:
    dir: Path
    keyring: Path
    passphrase: bytes
    pki: Any  # lkm_support.PKI
    clients: Path
    credential: Path

    def client_args(self, url: str) -> list[str]:
        return ["--lkm", url, "--lkm-credentials", str(self.credential), "--lkm-ca", str(self.pki.ca),
                "--lkm-timeout", "5"]


class LKMProcess:
    """`mediaseal lkm serve` as a real process; `kill()` is a real SIGKILL; `start()` again reuses the port."""

    def __init__(self, world: LKMWorld, audit_log: Path) -> None:
        self.world = world
        self.audit_log = audit_log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LKMProcess:
        w = self.world
        env = child_env(MEDIASEAL_KEYRING_PASSPHRASE=w.passphrase.decode())
        proc = subprocess.Popen(
            [sys.executable, "-m", "mediaseal.agent.cli", "lkm", "serve", "--keyring", str(w.keyring), "--clients",
             str(w.clients), "--audit-log", str(self.audit_log), "--tls-cert", str(w.pki.server_cert),
             "--tls-key", str(w.pki.server_key), "--listen", f"127.0.0.1:{self.port}", "--rotation-check", "0",
             "--log-format", "json"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=w.dir)
        _CHILDREN.append(proc)
        self.proc = proc
        ready = threading.Event()
        url: list[str] = []

        def read() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("event") == "listening":
                    url.append(str(doc["url"]))
                    ready.set()
            ready.set()  # exited before listening: the assertion below says so

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout)
        assert url, "the LKM did not start:\n" + "\n".join(self.lines[-10:])
        port = int(url[0].rsplit(":", 1)[1])
        assert self.port in (0, port)
        self.port = port
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients, sockets reset by the kernel."""
        assert self.proc is not None and self.proc.poll() is None, "the LKM is not running"
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


# -- recordings in a repository ----------------------------------------------------------------------------


@dataclass
class Corpus:
    """Sealed recordings in a repository: the ledger (original name -> SHA-256) and source key -> name."""

    ledger: Ledger
    ids: dict[str, str] = field(default_factory=dict)  # recording id -> original name

    @classmethod
    def make(cls, keyring: Path, tag: str, sizes: list[int], store: Any) -> Corpus:
        """`store(key, package_bytes)` puts each package at its repository key."""
        corpus = cls(Ledger(tag))
        recipient = Keyring.open(keyring).recipient()
        for i, size in enumerate(sizes):
            rid, name = f"{tag}-{i:05d}", f"{tag}-{i:05d}.wav"
            data = recording(corpus.ledger.rng, size)
            corpus.ledger.sha[name] = hashlib.sha256(data).hexdigest()
            corpus.ids[rid] = name
            meta = codec.Metadata(rid, "call", "audio/wav", name, CAPTURED_AT, "test-agent")
            header, keys = codec.new_package(meta, [recipient], 64 * 1024)
            out = io.BytesIO()
            codec.seal(io.BytesIO(data), out, header, keys)
            store(repository_key("call", CAPTURED_AT, rid), out.getvalue())
        return corpus

    def __len__(self) -> int:
        return len(self.ids)


def s3_store(s3: Any, bucket: str, prefix: str) -> Any:
    return lambda key, body: s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)


def dir_store(root: Path) -> Any:
    def store(key: str, body: bytes) -> None:
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)

    return store


def snapshot_s3(s3: Any, bucket: str) -> dict[str, str]:
    """Every object of a bucket: key -> ETag, size and modification time (a repository left untouched
    keeps all three; any write, even of the same bytes, changes the time), plus unfinished uploads."""
    out: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = f"{o['ETag']} {o['Size']} {o['LastModified'].isoformat()}"
    for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        out[f"upload {u['Key']} {u['UploadId']}"] = "multipart"
    return out


def snapshot_dir(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- the destination bucket, against the ledger ------------------------------------------------------------


@dataclass
class Destination:
    data: dict[str, list[str]]  # recording id -> SHA-256 of each data object
    meta: dict[str, list[str]]  # recording id -> the plaintext SHA-256 each metadata object states
    half: list[str]  # unpaired objects (data without metadata or the reverse) and unfinished multipart uploads


def read_destination(s3: Any, bucket: str, prefix: str) -> Destination:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    metas = [k for k in keys if k.endswith("_metadata.json")]
    data_keys = set(keys) - set(metas)
    dest = Destination(collections.defaultdict(list), collections.defaultdict(list), [])
    paired: set[str] = set()
    for k in metas:
        doc = json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())
        dest.meta[doc["recording"]["recording_id"]].append(doc["plaintext"]["sha256"])
        if doc["object"]["key"] in data_keys:
            paired.add(doc["object"]["key"])
        else:
            dest.half.append(f"metadata without its data object: {k}")
    for k in sorted(data_keys):
        body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
        dest.data[PurePosixPath(k).name.split(".", 1)[0]].append(hashlib.sha256(body).hexdigest())
        if k not in paired:
            dest.half.append(f"data object without metadata: {k}")
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])
    dest.half += [f"multipart upload {u['Key']} {u['UploadId']}" for u in uploads]
    return dest


def wrong_objects(dest: Destination, corpus: Corpus) -> list[str]:
    """Objects present whose content is not the recording's (a half-written or mixed-up export)."""
    bad: list[str] = []
    for rid, hashes in [*dest.data.items(), *dest.meta.items()]:
        name = corpus.ids.get(rid)
        want = corpus.ledger.sha.get(name) if name else None
        bad += [f"{rid}: {h}" for h in hashes if h != want]
    return bad


def check_export(dest: Destination, corpus: Corpus, runs: list[Command], plaintext: list[str]) -> Check:
    """Lost: a recording without a data object and metadata of the ledger's SHA-256. Duplicated: more than
    one data or metadata object, or exported by more than one run. Orphans: half-exported objects."""
    sha, lost = corpus.ledger.sha, []
    for rid, name in corpus.ids.items():
        if sha[name] not in dest.data.get(rid, []) or sha[name] not in dest.meta.get(rid, []):
            lost.append(name)
    dup = [rid for rid in corpus.ids if len(dest.data.get(rid, [])) > 1 or len(dest.meta.get(rid, [])) > 1]
    times = collections.Counter(k for run in runs for k in run.exported())
    dup += [f"exported {n} times: {k}" for k, n in times.items() if n > 1]
    return Check(len(corpus), lost, dup, plaintext, dest.half + wrong_objects(dest, corpus))


def merge(checks: list[Check]) -> Check:
    return Check(sum(c.recordings for c in checks), [x for c in checks for x in c.lost],
                 [x for c in checks for x in c.duplicated], [x for c in checks for x in c.plaintext],
                 [x for c in checks for x in c.orphans])
