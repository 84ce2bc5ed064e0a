"""Intake: a complete source file -> a sealed, committed package in the spool (DESIGN section 6).

>>> intake = Intake(config, spool, keys, disposal, executor, space, deliver=uploads.put_nowait)
>>> await intake.handle(candidate, stop)    # one candidate from the watcher; errors handled here

Per recording: the file is opened without following symlinks and its identity checked against the
watcher's, sealed in a worker thread straight into a staging file (ciphertext from its first byte;
the codec reads the source with `readinto` into its own buffers), its identity checked again after the
last byte, and committed (`Spool.commit`: package and manifest renamed under one directory fsync).
Only then is the source disposed, with the delivery queued beside it (`deliver`): both need only the
durable commit, and unlinking a large file costs ~15 ms (ext4 freeing its extents) that the delivery
need not wait for. The event loop only coordinates; the bytes move in threads.

Invariant 8: a source still open for writing is never sealed (checked on the descriptor sealing reads,
agent/writers.py; the watcher brings it back when its writer closes it), and a watch that deletes
sources after a judgement by time alone (`quiet`, `close`) on a filesystem where that check cannot be
made keeps its sources instead (`delete-refused`, one warning line per watch).

Errors: a source that changed or vanished is redone or dropped quietly; an unreadable one is cooled
down (looked at again later); a failed fsync (DurabilityError) is never handled here, it stops the
agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import hashlib
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediaseal import codec
from mediaseal.agent import metrics
from mediaseal.agent.config import Config, WatchConfig, content_type_for, unsafe_delete
from mediaseal.agent.crash import crash_point
from mediaseal.agent.disposal import Disposal
from mediaseal.agent.keysource import PublicKeys
from mediaseal.agent.watcher import Candidate, sidecars_for
from mediaseal.agent.writers import Writers, ignore_lease_breaks, open_writers_fd, probe
from mediaseal.buffer.manifest import DisposeMode, Manifest, SourceIdentity, sidecar_id
from mediaseal.buffer.spool import Reservation, Spool, SpoolFullError
from mediaseal.plumbing.dirfd import opened_dir
from mediaseal.plumbing.durable import DurabilityError
from mediaseal.uploader import repository_key

log = logging.getLogger("mediaseal.pipeline")

UNREADABLE_RETRY_SECONDS = 60.0
FAILURE_RETRY_SECONDS = 5.0
ROOM_CHECK_SECONDS = 1.0  # while the spool's filesystem is full: how often to look for room again
OPEN_RETRY_SECONDS = 1.0  # a source found open for writing at sealing time: its close event brings it back

__all__ = ["Cancelled", "Intake", "SourceChangedError", "display_name", "package_estimate", "recording_id"]


class SourceChangedError(Exception):
    """The source file changed while it was being sealed: the package is discarded and redone."""


class SourceOpenError(Exception):
    """A process still has the source open for writing: not sealed now (invariant 8)."""


class Cancelled(Exception):
    """The agent is stopping: unfinished work is abandoned (it is redone from the source later)."""


def recording_id(agent_id: str, path: Path, ident: SourceIdentity) -> str:
    """Stable for one source file (a replay after a crash lands on the same repository key), and
    different for two recordings even under a reused name (the inode and mtime differ)."""
    when = dt.datetime.fromtimestamp(ident.mtime_ns / 1e9, dt.UTC)
    basis = f"{agent_id}\0{path}\0{ident.dev}\0{ident.ino}\0{ident.size}\0{ident.mtime_ns}"
    # surrogateescape: a name that is not UTF-8 (any bytes but / and NUL are legal) hashes as its bytes.
    return f"{when:%Y%m%dT%H%M%SZ}-{hashlib.sha256(basis.encode('utf-8', 'surrogateescape')).hexdigest()[:20]}"


def display_name(name: str) -> str:
    """The source's name as the package metadata keeps it: UTF-8 always, so a name that is not
    (its undecodable bytes arrive as surrogate escapes) keeps those bytes as `\\xNN` text."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:4096]


def package_estimate(size: int, chunk_size: int) -> int:
    """An upper bound on the package size for `size` bytes of plaintext (what the spool reserves)."""
    return size + (size // chunk_size + 1) * codec.TAG_SIZE + 64 * 1024


class Intake:
    """Seals candidates into the spool and commits them; hands committed ones to disposal and delivery."""

    def __init__(self, config: Config, spool: Spool, keys: PublicKeys, disposal: Disposal, executor: Executor,
                 space: asyncio.Condition, *, deliver: Callable[[str], None], chunk_size: int) -> None:
        self.config = config
        self.spool = spool
        self.keys = keys
        self.chunk_size = chunk_size
        self._disposal = disposal
        self._executor = executor
        self._space = space  # notified by delivery whenever a release made room
        self._deliver = deliver
        self._in_flight: set[Path] = set()
        self._cooldown: dict[Path, float] = {}  # path -> monotonic time before which it is skipped
        self._cancel = threading.Event()
        self.paused_reason: str | None = None  # why intake waits for room in the spool (readiness shows it)
        self._dispose: dict[Path, DisposeMode] = {}  # watch path -> its disposal, once probed (unsafe_delete)
        self._dispose_lock = threading.Lock()
        ignore_lease_breaks()  # in the main thread, before any sealing thread takes a lease

    def is_busy(self, path: Path) -> bool:
        """Whether the watcher should leave `path` alone for now (being sealed, or cooling down)."""
        if path in self._in_flight:
            return True
        until = self._cooldown.get(path)
        if until is not None and until > time.monotonic():
            return True
        self._cooldown.pop(path, None)
        return False

    def cancel(self) -> None:
        """Stop every sealing thread at its next chunk (its staging file is removed)."""
        self._cancel.set()

    async def handle(self, cand: Candidate, stop: asyncio.Event) -> None:
        """Take one candidate through intake. Raises only DurabilityError and Cancelled."""
        if cand.path in self._in_flight:
            return
        self._in_flight.add(cand.path)
        try:
            while not await self._intake(cand, stop):  # False: the spool's filesystem was full; it has room now
                pass
        except (DurabilityError, Cancelled):
            raise
        except Exception as e:  # a bug must not take the daemon down silently: count, log, cool down
            metrics.FAILED.labels("intake", type(e).__name__).inc()
            log.exception("intake-error", extra={"fields": {"path": str(cand.path)}})
            self._cooldown[cand.path] = time.monotonic() + FAILURE_RETRY_SECONDS
        finally:
            self._in_flight.discard(cand.path)

    async def _intake(self, cand: Candidate, stop: asyncio.Event) -> bool:
        """One attempt; False if the spool's filesystem was full (waited for room: try again)."""
        w = cand.watch
        rid = recording_id(self.config.agent.id, cand.path, cand.identity)
        fields: dict[str, Any] = {"recording_id": rid, "kind": w.kind, "path": str(cand.path)}
        existing = self.spool.load(rid)
        if existing is not None:  # sealed before a restart: only the disposal may be missing
            await self._disposal.start(existing)
            return True
        if self.spool.is_kept(rid):
            return True
        metrics.DISCOVERED.labels(w.kind).inc()  # here, not in the watcher, which may emit a file twice
        need = package_estimate(cand.identity.size, self.chunk_size)
        if not self.spool.fits_ever(need):
            metrics.FAILED.labels("intake", "too-large-for-spool").inc()
            log.error("too-large-for-spool", extra={"fields": fields})
            self._cooldown[cand.path] = time.monotonic() + UNREADABLE_RETRY_SECONDS * 10
            return True
        recipient = await self.keys.wait_current(stop)
        if recipient is None:
            raise Cancelled
        reservation = await self._reserve(need, stop)
        log.info("sealing", extra={"fields": fields})
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            sealed = await loop.run_in_executor(self._executor, self._seal, cand, rid, recipient, reservation)
        except SpoolFullError as e:
            metrics.FAILED.labels("intake", "spool-full").inc()
            await self._wait_for_room(str(e), need, stop)
            return False
        except SourceOpenError:
            log.info("still-open", extra={"fields": fields})
            self._cooldown[cand.path] = time.monotonic() + OPEN_RETRY_SECONDS
            return True
        except SourceChangedError:
            metrics.REDONE.inc()
            log.info("redo", extra={"fields": fields})
            return True
        except FileNotFoundError:
            log.info("vanished", extra={"fields": fields})
            return True
        except PermissionError as e:
            metrics.FAILED.labels("intake", "unreadable").inc()
            log.error("unreadable", extra={"fields": {**fields, "error": e.strerror}})
            self._cooldown[cand.path] = time.monotonic() + UNREADABLE_RETRY_SECONDS
            return True
        except DurabilityError:
            raise  # an OSError too, but never a fault of this source: the agent stops
        except OSError as e:
            if e.errno == errno.ELOOP:  # replaced by a symlink after the scan: never followed, not a fault
                log.warning("skipped", extra={"fields": {**fields, "reason": "symbolic link, not followed"}})
                return True
            reason = errno.errorcode.get(e.errno or 0, "oserror")
            metrics.FAILED.labels("intake", reason).inc()
            log.error("seal-failed", extra={"fields": {**fields, "error": str(e)}})
            self._cooldown[cand.path] = time.monotonic() + FAILURE_RETRY_SECONDS
            return True
        finally:
            self.spool.cancel(reservation)
            metrics.SPOOL_BYTES.set(self.spool.used_bytes)
            metrics.SPOOL_PACKAGES.set(self.spool.package_count)
        metrics.ENCRYPTED.labels(w.kind).inc()
        metrics.ENCRYPT_SECONDS.observe(time.monotonic() - started)
        log.info("spooled", extra={"fields": {**fields, "bytes": cand.identity.size, "kid": sealed[-1].kid}})
        crash_point("after-commit")
        # Delivery goes ahead while the source is disposed (see the module docstring); the disposal is
        # registered first, so the delivery's release waits for it.
        # The sidecars' disposal before the recording's: while the recording is still there, no scan takes
        # a sidecar for an orphan (agent/watcher.py `has_recording`).
        *sidecars, recording = sealed
        first = [self._disposal.start(m) for m in sidecars]
        disposed = self._disposal.start(recording, after=first)
        for m in sealed:
            self._deliver(m.recording_id)
        await disposed
        return True

    async def _reserve(self, need: int, stop: asyncio.Event) -> Reservation:
        """Capacity in the spool for one recording; waits (intake paused) while the spool is full."""
        paused = False
        while (r := self.spool.reserve(need)) is None:
            if stop.is_set():
                raise Cancelled
            # Our own capacity (buffer.max_bytes), or the filesystem's (another process filled it).
            reason = ("spool full" if self.spool.used_bytes + need > self.spool.max_bytes
                      else "spool filesystem full")
            if not paused:
                paused = True
                log.warning("intake-paused", extra={"fields": {"reason": reason, "need": need,
                                                                "used": self.spool.used_bytes}})
            self.paused_reason = reason
            metrics.INTAKE_PAUSED.set(1)
            async with self._space:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space.wait(), timeout=5.0)
        if paused:
            self.paused_reason = None
            metrics.INTAKE_PAUSED.set(0)
            log.info("intake-resumed")
        return r

    async def _wait_for_room(self, error: str, need: int, stop: asyncio.Event) -> None:
        """The spool's filesystem ran out of space under a write (another process filled it: the
        reservation's free-space check saw room). Intake pauses, sources stay where they are, and goes
        on once the filesystem has room for this recording again (looked at every ROOM_CHECK_SECONDS)."""
        if self.paused_reason is None:
            self.paused_reason = "spool filesystem full"
            log.warning("intake-paused", extra={"fields": {"reason": "spool filesystem full", "error": error,
                                                            "need": need, "used": self.spool.used_bytes}})
        metrics.INTAKE_PAUSED.set(1)
        while not _has_room(self.spool, need):
            if stop.is_set():
                raise Cancelled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ROOM_CHECK_SECONDS)
        if self.paused_reason is not None:
            self.paused_reason = None
            metrics.INTAKE_PAUSED.set(0)
            log.info("intake-resumed")

    def _seal(self, cand: Candidate, rid: str, recipient: codec.Recipient,
              reservation: Reservation) -> list[Manifest]:
        """Seal one source, and its sidecars, into the spool and commit them (worker thread). Returns the
        manifests, the recording's last.

        Everything is staged before anything is committed (a source that changed under its sealing leaves
        nothing behind), and the sidecars are committed before the recording: the recording's disposal
        (which removes its marker) may then rely on them being durable. A crash between the two commits
        seals the recording again under the same id and finds its sidecars committed already."""
        w = cand.watch
        captured = dt.datetime.fromtimestamp(cand.identity.mtime_ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        staged: list[_Staged] = []
        try:
            staged.append(self._stage(w, cand.path, rid, captured, recipient, reservation, cand.identity))
            for n, path in enumerate(sidecars_for(w, cand.path), 1):
                sid = sidecar_id(rid, n)
                if self.spool.load(sid) is not None or self.spool.is_kept(sid):
                    continue  # committed before a crash
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue  # this recording has none
                if not stat.S_ISREG(st.st_mode):
                    log.warning("skipped", extra={"fields": {"recording_id": rid, "path": str(path),
                                                             "reason": "sidecar is not a regular file"}})
                    continue
                need = package_estimate(st.st_size, self.chunk_size)
                room = self.spool.reserve(need)
                if room is None:
                    raise SpoolFullError(f"no room in the spool for the sidecar {path} ({need} bytes)")
                staged.append(self._stage(w, path, sid, captured, recipient, room, SourceIdentity.of(st)))
            sidecars, main = staged[1:], staged[0]
            committed = [self._commit(s, w, rid, None) for s in sidecars]
            if committed:
                crash_point("after-sidecar-commit")
            return [*committed, self._commit(main, w, rid, cand.marker)]
        except BaseException:
            for s in staged:
                with contextlib.suppress(FileNotFoundError):  # committed ones were renamed away already
                    s.path.unlink()  # staged, never committed
            raise
        finally:
            for s in staged:
                if s.reservation is not reservation:  # the caller's own; a committed one is released already
                    self.spool.cancel(s.reservation)

    def _stage(self, w: WatchConfig, path: Path, rid: str, captured: str, recipient: codec.Recipient,
               reservation: Reservation, identity: SourceIdentity) -> _Staged:
        """Seal `path` (as last seen: `identity`) into a staging file; raises SourceChangedError or
        SourceOpenError where it is not that file, complete, any more."""
        # Never through a symlink, in the name nor in a directory of the path (plumbing/dirfd.py).
        with opened_dir(w.path, path.parent) as d:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            return self._stage_fd(fd, d, w, path, rid, captured, recipient, reservation, identity)

    def _stage_fd(self, fd: int, d: int, w: WatchConfig, path: Path, rid: str, captured: str,
                  recipient: codec.Recipient, reservation: Reservation, identity: SourceIdentity) -> _Staged:
        with open(fd, "rb", buffering=0) as src:
            sealed_from = SourceIdentity.of(os.fstat(fd))
            if not sealed_from.same_file(identity):
                raise SourceChangedError
            if open_writers_fd(fd) is Writers.OPEN:  # the watcher asked too, but a writer may have come back
                raise SourceOpenError
            metadata = codec.Metadata(
                recording_id=rid, kind=w.kind, content_type=content_type_for(path.name, w.content_type),
                original_name=display_name(path.name), captured_at=captured,
                agent_id=self.config.agent.id[:4096],
            )
            header, keys = codec.new_package(metadata, [recipient], self.chunk_size)
            with self.spool.staging(rid) as (staged, staged_path):
                # No digest here: SHA-256 is slower than the encryption and the copy together, and a
                # same-filesystem repository confirms by identity; delivery hashes when it is needed.
                result = codec.seal(_Source(src, self._cancel), staged, header, keys, size_hint=identity.size)
            crash_point("after-staging-fsync")
            # The identity is checked again now that every byte has been read: a file rewritten or
            # appended to during sealing gives a package of neither version, so it is redone.
            try:
                after: SourceIdentity | None = SourceIdentity.of(os.stat(path.name, dir_fd=d, follow_symlinks=False))
            except FileNotFoundError:
                after = None
            if not sealed_from.same_file(after) or result.plaintext_size != identity.size:
                staged_path.unlink()
                raise SourceChangedError
        metrics.BYTES_IN.inc(result.plaintext_size)
        return _Staged(rid, path, identity, staged_path, result.package_size, recipient.kid, metadata.captured_at,
                       reservation)

    def _commit(self, s: _Staged, w: WatchConfig, rid: str, marker: Path | None) -> Manifest:
        manifest = Manifest(
            recording_id=s.rid, kind=w.kind, repo_key=repository_key(w.kind, s.captured_at, s.rid),
            package_size=s.package_size, sha256=None, kid=s.kid, source=str(s.source),
            identity=s.identity.to_dict(),
            dispose=self._dispose_mode(w), move_to=str(w.move_to) if w.move_to else None,
            marker=str(marker) if marker else None, created_at=time.time(),
        )
        m = self.spool.commit(s.path, manifest, s.reservation)
        if s.rid != rid:
            log.info("sidecar-spooled", extra={"fields": {"recording_id": rid, "sidecar_id": s.rid,
                                                          "path": str(s.source)}})
        return m

    def _dispose_mode(self, w: WatchConfig) -> DisposeMode:
        """The watch's disposal, or "keep" where deleting would rest on an open-writer check that cannot be
        made there (probed once per watch, from the thread sealing its first recording)."""
        if not unsafe_delete(w):
            return w.dispose
        with self._dispose_lock:
            if (mode := self._dispose.get(w.path)) is not None:
                return mode
            reason = probe(w.path)
            if reason is None:
                mode = w.dispose
            else:
                mode = "keep"
                log.warning("delete-refused", extra={"fields": {
                    "watch": str(w.path), "completion": w.completion, "dispose": "keep", "reason": reason}})
            self._dispose[w.path] = mode
            return mode


def _has_room(spool: Spool, need: int) -> bool:
    try:
        st = os.statvfs(spool.root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= need + spool.min_free_bytes


@dataclass(frozen=True)
class _Staged:
    """A sealed staging file, not committed yet."""

    rid: str
    source: Path
    identity: SourceIdentity
    path: Path
    package_size: int
    kid: str
    captured_at: str
    reservation: Reservation


class _Source:
    """The source file as the codec reads it: stops when the agent stops, and hosts a crash point."""

    def __init__(self, f: io.FileIO, cancel: threading.Event) -> None:
        self._f, self._cancel, self._reads = f, cancel, 0

    def readinto(self, buf: memoryview) -> int:
        if self._cancel.is_set():
            raise Cancelled
        n = self._f.readinto(buf)
        self._reads += 1
        if self._reads == 2:
            crash_point("mid-encrypt")
        return int(n or 0)
