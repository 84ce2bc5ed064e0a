"""Test support for custody outages during decrypt and export (tests/test_reliability_export.py).

- `Command`: a `mediaseal ...` child process (support.process.Child) whose stderr lines are collected
  with their arrival times, so a test can act on "the first recording was exported" and time recovery.
  Every child is reaped by support.process's one reaper.
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
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from reliability_support import Check, Ledger, recording
from support import process
from support.process import child_env
from support.waits import CEILING

from mediaseal import codec
from mediaseal.keys.keyring import Keyring
from mediaseal.uploader.base import repository_key

CAPTURED_AT = "2026-11-28T10:00:00Z"
EXPORTED = re.compile(r"^export: exported (\S+): ")


# -- child processes (support.process) ------------------------------------------------------------------


class Command(process.Child):
    """`python -m mediaseal.agent.cli ARGS` as a child: stderr lines with their arrival times, and stdout."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        super().__init__(process.mediaseal_argv(*args), env=env, cwd=cwd, capture_stdout=True, name=args[0])

    def exported(self) -> list[str]:
        """Source keys this run reported as exported, in order."""
        return [m.group(1) for line in self.stderr.splitlines() if (m := EXPORTED.match(line))]

    def first_exported(self) -> float | None:
        """When the first `export: exported` line came (monotonic clock)."""
        return next((t for t, line in self.timed_lines() if EXPORTED.match(line)), None)


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
        """The client's options. Its per-request timeout is generous: a SIGKILLed LKM resets connections (the
        client learns at once), so the timeout only ever cuts a slow answer, which a loaded machine gives."""
        return ["--lkm", url, "--lkm-credentials", str(self.credential), "--lkm-ca", str(self.pki.ca),
                "--lkm-timeout", "30"]


class LKMProcess:
    """`mediaseal lkm serve` as a real process; `kill()` is a real SIGKILL; `start()` again reuses the port."""

    def __init__(self, world: LKMWorld, audit_log: Path) -> None:
        self.world = world
        self.audit_log = audit_log
        self.port = 0
        self.child: process.Child | None = None  # the running (or last) process

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = CEILING) -> LKMProcess:
        w = self.world
        env = child_env(MEDIASEAL_KEYRING_PASSPHRASE=w.passphrase.decode())
        child = process.Child(
            process.mediaseal_argv(
                "lkm", "serve", "--keyring", w.keyring, "--clients", w.clients, "--audit-log", self.audit_log,
                "--tls-cert", w.pki.server_cert, "--tls-key", w.pki.server_key, "--listen", f"127.0.0.1:{self.port}",
                "--rotation-check", "0", "--log-format", "json"),
            env=env, cwd=w.dir, name="the LKM")
        self.child = child
        (listening,) = child.wait_for("listening", timeout=timeout)
        port = int(str(listening["url"]).rsplit(":", 1)[1])
        assert self.port in (0, port)
        self.port = port
        return self

    @property
    def lines(self) -> list[str]:
        return self.child.lines if self.child is not None else []

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients, sockets reset by the kernel."""
        assert self.child is not None and self.child.alive(), "the LKM is not running"
        assert self.child.kill() == -signal.SIGKILL

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


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
