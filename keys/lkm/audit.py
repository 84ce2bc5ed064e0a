"""The Local Key Manager's audit log: one JSON line per request, hash-chained, durable before the answer.

>>> log = ChainedAuditLog(Path("/var/lib/mediaseal-lkm/audit.jsonl")); await log.start()
>>> await log.append({"operation": "unwrap", "principal": "export-1", "kid": kid, "outcome": "ok"})
>>> verify_audit_log(Path("audit.jsonl"))          # AuditSummary(lines=..., head=...) or AuditChainError

Each line is a JSON object (sorted keys, ASCII only, no spaces) carrying `v` (1), `seq` (1, 2, ...),
`time` and `prev`: the hex SHA-256 of the previous line's bytes (without its newline); the first
line's `prev` is 64 zeros. Editing or removing a line breaks the chain at that point, and
`verify_audit_log` names the first bad line. What a chain cannot show by itself is the loss of the
newest lines, so the service also logs the chain head (seq and hash) to its own log at start, every
1000 lines and at stop: compare the end of the file with the last head logged (`--expect-head`).

Never in a line: a DEK, a wrapped key, a secret, a signature. Callers pass ids, names and outcomes.

Durability: lines are written by one writer task in batches (all lines queued while the previous
batch was being written), each batch with one write() and one fsync(), and `append` returns only
after its batch is on disk. The service answers a request only after its line is durable, so
nothing is ever answered unaudited; if a write or fsync fails the log is marked broken and every
request from then on is refused with `unavailable` (fail closed) until the service is restarted.
The file is created 0600 and opened O_APPEND.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediaseal.keys.lkm.errors import LKMConfigError, LKMError, UnavailableError
from mediaseal.plumbing.durable import fsync, write_all

GENESIS = "0" * 64
VERSION = 1
HEAD_LOG_EVERY = 1000
MAX_LINE = 1 << 20
_log = logging.getLogger("mediaseal.lkm.audit")


class AuditChainError(LKMError):
    """The audit log's chain is broken at `line` (1-based): a line was edited, removed, inserted or cut."""

    code = "audit"

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"audit log {path}: line {line}: {reason}")
        self.line = line


@dataclass(frozen=True)
class AuditSummary:
    lines: int
    head: str  # hex SHA-256 of the last line (GENESIS for an empty log)


def line_hash(line: bytes) -> str:
    """The chain hash of one line (its bytes without the trailing newline)."""
    return hashlib.sha256(line).hexdigest()


def encode_line(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=str).encode("ascii")


class ChainedAuditLog:
    """Append-only, hash-chained, fsynced JSON lines. One instance per file, used from one event loop."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise LKMConfigError(f"can't open audit log {self.path}: {e.strerror}") from None
        try:
            os.fchmod(self._fd, 0o600)
            self.seq, self.head = _tail(self.path)
        except BaseException:
            os.close(self._fd)
            raise
        self.broken: str | None = None
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None]]] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._writer(), name="lkm-audit-writer")
        _log.info("audit log open", extra={"fields": {"path": str(self.path), "seq": self.seq, "head": self.head}})

    async def append(self, entry: dict[str, Any]) -> None:
        """Add a line and wait until it is on disk. Raises UnavailableError if the log is (or becomes) broken."""
        if self.broken is not None:
            raise UnavailableError(f"audit log is not writable ({self.broken}); nothing is answered unaudited")
        if self._queue is None:
            raise RuntimeError("ChainedAuditLog.start() was not called")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((entry, done))
        await done

    async def close(self) -> None:
        if self._task is not None and self._queue is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._log_head("audit log closed")
        with contextlib.suppress(OSError):
            os.close(self._fd)

    async def _writer(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            error: Exception | None = None
            if self.broken is None:
                data, seq, head = self._chain([entry for entry, _ in batch])
                try:
                    await loop.run_in_executor(None, self._write, data)
                except OSError as e:
                    self.broken = f"{type(e).__name__}: {e.strerror or e}"
                    _log.error("audit log write failed; refusing all requests from now on",
                               extra={"fields": {"path": str(self.path), "error": self.broken}})
                else:
                    crossed = seq // HEAD_LOG_EVERY != self.seq // HEAD_LOG_EVERY
                    self.seq, self.head = seq, head
                    if crossed:
                        self._log_head("audit head")
            if self.broken is not None:
                error = UnavailableError(f"audit log is not writable ({self.broken}); nothing is answered unaudited")
            for _, done in batch:
                if done.done():
                    pass  # the caller gave up waiting; its line is written all the same
                elif error is not None:
                    done.set_exception(error)
                else:
                    done.set_result(None)
                self._queue.task_done()

    def _chain(self, entries: list[dict[str, Any]]) -> tuple[bytes, int, str]:
        seq, head, out = self.seq, self.head, bytearray()
        for entry in entries:
            seq += 1
            line = encode_line({**entry, "v": VERSION, "seq": seq, "time": _now(self._clock()), "prev": head})
            head = line_hash(line)
            out += line + b"\n"
        return bytes(out), seq, head

    def _write(self, data: bytes) -> None:
        write_all(self._fd, data)
        fsync(self._fd, self.path)  # DurabilityError (an OSError): the log is broken, never retried

    def _log_head(self, what: str) -> None:
        _log.info(what, extra={"fields": {"path": str(self.path), "seq": self.seq, "head": self.head}})


def _now(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _tail(path: Path) -> tuple[int, str]:
    """The seq and hash of the last line, read from the end of the file (an empty file: 0, GENESIS)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0, GENESIS
        f.seek(size - 1)
        if f.read(1) != b"\n":
            raise LKMConfigError(
                f"audit log {path} ends in a partial line (a crash during a write?): check it with "
                f"'mediaseal lkm audit-verify {shlex.quote(str(path))}', move it aside,"
                " and start again with a new file")
        block, pos = b"", size - 1  # block: the bytes before the final newline, read backwards
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step) + block
            if b"\n" in block:
                break
            if len(block) > MAX_LINE:
                raise LKMConfigError(f"audit log {path}: the last line is longer than {MAX_LINE} bytes")
    last = block.rsplit(b"\n", 1)[-1]
    try:
        seq = json.loads(last)["seq"]
    except (ValueError, KeyError, TypeError):
        raise LKMConfigError(f"audit log {path}: the last line is not an audit record; "
                             f"check it with 'mediaseal lkm audit-verify {shlex.quote(str(path))}'") from None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise LKMConfigError(f"audit log {path}: the last line has no valid seq")
    return seq, line_hash(last)


def verify_audit_log(path: Path, *, expect_head: str | None = None) -> AuditSummary:
    """Walk the whole chain. Raises AuditChainError naming the first bad line (1-based)."""
    path = Path(path)
    prev, seq_prev, n = GENESIS, 0, 0
    previous_line: bytes | None = None
    try:
        f = open(path, "rb")  # noqa: SIM115  # closed by the with below
    except OSError as e:
        raise LKMConfigError(f"can't read audit log {path}: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):  # n is read after the loop
            if not raw.endswith(b"\n"):
                raise AuditChainError(path, n, "partial last line (no newline): cut short or appended to")
            line = raw[:-1]
            try:
                entry = json.loads(line)
            except ValueError:
                raise AuditChainError(path, n, "not a JSON line (edited?)") from None
            if not isinstance(entry, dict) or entry.get("v") != VERSION:
                raise AuditChainError(path, n, "not an audit record of version 1")
            seq = entry.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise AuditChainError(path, n, "no seq")
            if entry.get("prev") != prev:
                if previous_line is not None and seq == seq_prev + 1:
                    # In sequence but the hash differs: the line before this one was changed.
                    raise AuditChainError(path, n - 1, "this line was edited (the next line's prev hash does not "
                                                       "match it)")
                if seq > seq_prev + 1:
                    raise AuditChainError(path, n, f"{seq - seq_prev - 1} line(s) removed before this one "
                                                   f"(seq jumps from {seq_prev} to {seq})")
                raise AuditChainError(path, n, "prev hash does not match the previous line (lines removed, "
                                               "inserted or reordered)")
            if seq != seq_prev + 1:
                raise AuditChainError(path, n, f"seq {seq} where {seq_prev + 1} was expected")
            prev, seq_prev, previous_line = line_hash(line), seq, line
    if expect_head is not None and prev != expect_head.lower():
        raise AuditChainError(path, n, f"the chain ends at head {prev}, not the expected {expect_head} "
                                       "(newest lines lost or added)")
    return AuditSummary(n, prev)
