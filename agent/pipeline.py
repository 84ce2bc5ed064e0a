"""The agent's main job: watch -> encrypt -> spool -> dispose -> upload -> release.

>>> pipeline = Pipeline(config, spool, repository, public_keys)
>>> await pipeline.run(stop)        # until `stop` is set; returns after a graceful drain

Per recording (DESIGN section 6): a complete file is sealed in a worker thread straight into a
staging file (ciphertext from its first byte), its identity re-checked, committed (fsync, rename,
manifest), only then is the source disposed, and only after the repository confirmed it is the spool
copy removed: size and SHA-256 (hashed from the spool file before the first attempt), or, for a hard
link on the spool's own filesystem, size and identity (the very inode that was sealed and fsynced).
The event loop only coordinates; the bytes move in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import functools
import hashlib
import io
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mediaseal import codec
from mediaseal.agent import metrics
from mediaseal.agent.config import Config, content_type_for
from mediaseal.agent.crash import crash_point
from mediaseal.agent.keysource import PublicKeys
from mediaseal.agent.watcher import Candidate, FileIdentity, Watcher
from mediaseal.buffer.spool import SPOOLED, UPLOADING, VERIFIED, DurabilityError, Manifest, Reservation, Spool
from mediaseal.uploader import PermanentRepositoryError, Receipt, Repository, RepositoryError, Upload, repository_key
from mediaseal.uploader.breaker import CircuitBreaker

log = logging.getLogger("mediaseal.pipeline")

UNREADABLE_RETRY_SECONDS = 60.0
FAILURE_RETRY_SECONDS = 5.0


class SourceChangedError(Exception):
    """The source file changed while it was being sealed: the package is discarded and redone."""


class Cancelled(Exception):
    """The agent is stopping: unfinished work is abandoned (it is redone from the source later)."""


def recording_id(agent_id: str, path: Path, ident: FileIdentity) -> str:
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


@dataclass
class DeliveryHealth:
    """What the last delivery attempts said, for /readyz, sd_notify STATUS= and metrics."""

    last_error: str | None = None  # set while the most recent attempt failed
    ok_at: float | None = None  # wall time of the last confirmed delivery
    quarantined: set[str] = field(default_factory=set)  # recording ids failing permanently


class Pipeline:
    def __init__(self, config: Config, spool: Spool, repository: Repository, keys: PublicKeys,
                 *, chunk_size: int = codec.DEFAULT_CHUNK_SIZE, quarantine_seconds: float = 60.0) -> None:
        self.config = config
        self.spool = spool
        self.repository = repository
        self.keys = keys
        self.chunk_size = chunk_size
        self.quarantine_seconds = quarantine_seconds
        self._in_flight: set[Path] = set()
        self._disposing: dict[str, asyncio.Event] = {}  # recording id -> set once its source is disposed
        self._busy: set[asyncio.Task[None]] = set()  # workers holding a recording right now
        self._cooldown: dict[Path, float] = {}  # path -> monotonic time before which it is skipped
        self._candidates: asyncio.Queue[Candidate] = asyncio.Queue(maxsize=max(1, config.agent.concurrency))
        self._uploads: asyncio.Queue[str] = asyncio.Queue()
        self._requeues: set[asyncio.TimerHandle] = set()  # quarantined packages, back in _uploads later
        self._space = asyncio.Condition()
        self._cancel = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=config.agent.concurrency + config.repository.concurrency,
                                            thread_name_prefix="mediaseal")
        self._breaker = CircuitBreaker()
        self._repo_ok_at = 0.0
        self.fatal: BaseException | None = None
        self.health = DeliveryHealth()
        self.watcher = Watcher(config.watch, rescan_seconds=config.agent.rescan_seconds, is_busy=self.is_busy)

    # -- public ----------------------------------------------------------------------------------

    def is_busy(self, path: Path) -> bool:
        if path in self._in_flight:
            return True
        until = self._cooldown.get(path)
        if until is not None and until > time.monotonic():
            return True
        self._cooldown.pop(path, None)
        return False

    async def recover(self) -> int:
        """Resume what a previous run left in the spool; returns how many packages await delivery."""
        pending = await self._thread(self.spool.recover)
        for rid in pending:
            m = self.spool.load(rid)
            if m is None:
                continue
            if m.state == SPOOLED:
                await self._thread(self._dispose, m)  # idempotent: the source may be gone already
            self._uploads.put_nowait(rid)
        abort = getattr(self.repository, "abort_orphans", None)
        if abort is not None:  # multipart uploads a crash left behind (S3): ours are in the manifests
            known = [m.upload["upload_id"] for m in self.spool.manifests() if "upload_id" in m.upload]
            try:
                aborted = await abort(known, initiated_before=dt.datetime.now(dt.UTC))
            except RepositoryError as e:
                log.warning("abort-orphans-failed", extra={"fields": {"error": str(e)}})
            else:
                if aborted:
                    log.info("aborted-orphan-uploads", extra={"fields": {"count": len(aborted)}})
        self._update_gauges()
        return len(pending)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set (or a fatal durability error), then stop in bounded time."""
        tasks = [asyncio.create_task(self.watcher.run(self._candidates, stop), name="watcher"),
                 asyncio.create_task(self.keys.run(stop), name="key-refresh")]
        tasks += [asyncio.create_task(self._intake_worker(stop), name=f"intake-{i}")
                  for i in range(self.config.agent.concurrency)]
        tasks += [asyncio.create_task(self._upload_worker(stop), name=f"upload-{i}")
                  for i in range(self.config.repository.concurrency)]
        done, _ = await asyncio.wait([*tasks, asyncio.create_task(stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t in tasks and not t.cancelled() and t.exception() is not None:
                self.fatal = t.exception()
        stop.set()
        self._cancel.set()  # sealing threads stop at their next chunk; staging files are removed
        for h in self._requeues:  # quarantined packages keep their manifests: re-probed on the next start
            h.cancel()
        for t in tasks:
            if t not in self._busy:  # idle workers wait on a queue: nothing to finish
                t.cancel()
        _, pending = await asyncio.wait(tasks, timeout=self.config.agent.stop_timeout_seconds)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.repository.close()
        if self.fatal is not None:
            raise self.fatal

    def _mark_busy(self, busy: bool) -> None:
        task = asyncio.current_task()
        if task is not None:
            (self._busy.add if busy else self._busy.discard)(task)

    def _update_gauges(self) -> None:
        metrics.SPOOL_BYTES.set(self.spool.used_bytes)
        metrics.SPOOL_PACKAGES.set(self.spool.package_count)

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- intake ----------------------------------------------------------------------------------

    async def _intake_worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            cand = await self._candidates.get()
            if cand.path in self._in_flight:
                continue
            self._in_flight.add(cand.path)
            self._mark_busy(True)
            try:
                await self._intake(cand, stop)
            except DurabilityError:
                raise
            except Cancelled:
                return
            except Exception as e:  # a bug must not take the daemon down silently: count, log, cool down
                metrics.FAILED.labels("intake", type(e).__name__).inc()
                log.exception("intake-error", extra={"fields": {"path": str(cand.path)}})
                self._cooldown[cand.path] = time.monotonic() + FAILURE_RETRY_SECONDS
            finally:
                self._in_flight.discard(cand.path)
                self._mark_busy(False)

    async def _intake(self, cand: Candidate, stop: asyncio.Event) -> None:
        w = cand.watch
        rid = recording_id(self.config.agent.id, cand.path, cand.identity)
        fields: dict[str, Any] = {"recording_id": rid, "kind": w.kind, "path": str(cand.path)}
        existing = self.spool.load(rid)
        if existing is not None:  # sealed before a restart: only the disposal may be missing
            await self._thread(self._dispose, existing)
            return
        if self.spool.is_kept(rid):
            return
        metrics.DISCOVERED.labels(w.kind).inc()  # here, not in the watcher, which may emit a file twice
        need = package_estimate(cand.identity.size, self.chunk_size)
        if not self.spool.fits_ever(need):
            metrics.FAILED.labels("intake", "too-large-for-spool").inc()
            log.error("too-large-for-spool", extra={"fields": fields})
            self._cooldown[cand.path] = time.monotonic() + UNREADABLE_RETRY_SECONDS * 10
            return
        recipient = await self.keys.wait_current(stop)
        if recipient is None:
            raise Cancelled
        reservation = await self._reserve(need, stop)
        log.info("sealing", extra={"fields": fields})
        started = time.monotonic()
        try:
            m = await self._thread(self._seal, cand, rid, recipient, reservation)
        except SourceChangedError:
            metrics.REDONE.inc()
            log.info("redo", extra={"fields": fields})
            return
        except FileNotFoundError:
            log.info("vanished", extra={"fields": fields})
            return
        except PermissionError as e:
            metrics.FAILED.labels("intake", "unreadable").inc()
            log.error("unreadable", extra={"fields": {**fields, "error": e.strerror}})
            self._cooldown[cand.path] = time.monotonic() + UNREADABLE_RETRY_SECONDS
            return
        except OSError as e:
            if e.errno == errno.ELOOP:  # replaced by a symlink after the scan: never followed, not a fault
                log.warning("skipped", extra={"fields": {**fields, "reason": "symbolic link, not followed"}})
                return
            reason = errno.errorcode.get(e.errno or 0, "oserror")
            metrics.FAILED.labels("intake", reason).inc()
            log.error("seal-failed", extra={"fields": {**fields, "error": str(e)}})
            self._cooldown[cand.path] = time.monotonic() + FAILURE_RETRY_SECONDS
            return
        finally:
            self.spool.cancel(reservation)
            self._update_gauges()
        metrics.ENCRYPTED.labels(w.kind).inc()
        metrics.ENCRYPT_SECONDS.observe(time.monotonic() - started)
        log.info("spooled", extra={"fields": {**fields, "bytes": cand.identity.size, "kid": m.kid}})
        crash_point("after-commit")
        # Delivery goes ahead while the source is disposed: both need only the durable commit, and
        # unlinking a large file costs ~15 ms (ext4 freeing its extents) that delivery need not wait for.
        # The spool copy is released only once the disposal is done, so that a crash in the middle of
        # it is finished from the manifest on the next start.
        disposed = self._disposing[rid] = asyncio.Event()
        self._uploads.put_nowait(rid)
        try:
            await self._thread(self._dispose, m)
        finally:
            disposed.set()
            del self._disposing[rid]

    async def _reserve(self, need: int, stop: asyncio.Event) -> Reservation:
        """Capacity in the spool for one recording; waits (intake paused) while the spool is full."""
        paused = False
        while (r := self.spool.reserve(need)) is None:
            if stop.is_set():
                raise Cancelled
            if not paused:
                paused = True
                log.warning("intake-paused", extra={"fields": {"reason": "spool full", "need": need,
                                                                "used": self.spool.used_bytes}})
            metrics.INTAKE_PAUSED.set(1)
            async with self._space:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space.wait(), timeout=5.0)
        metrics.INTAKE_PAUSED.set(0)
        if paused:
            log.info("intake-resumed")
        return r

    def _seal(self, cand: Candidate, rid: str, recipient: codec.Recipient, reservation: Reservation) -> Manifest:
        """Seal one source into the spool and commit it (worker thread)."""
        w = cand.watch
        fd = os.open(cand.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # never through a symlink
        with open(fd, "rb", buffering=0) as src:
            if not _same(FileIdentity.of(os.fstat(fd)), cand.identity):
                raise SourceChangedError
            captured = dt.datetime.fromtimestamp(cand.identity.mtime_ns / 1e9, dt.UTC)
            metadata = codec.Metadata(
                recording_id=rid, kind=w.kind, content_type=content_type_for(cand.path.name, w.content_type),
                original_name=display_name(cand.path.name), captured_at=captured.strftime("%Y-%m-%dT%H:%M:%SZ"),
                agent_id=self.config.agent.id[:4096],
            )
            header, keys = codec.new_package(metadata, [recipient], self.chunk_size)
            with self.spool.staging(rid) as (staged, staged_path):
                # No digest here: SHA-256 is slower than the encryption and the copy together, and a
                # same-filesystem repository confirms by identity; _deliver hashes when it is needed.
                result = codec.seal(_Source(src, self._cancel), staged, header, keys,
                                    size_hint=cand.identity.size)
            crash_point("after-staging-fsync")
            # The identity is checked again now that every byte has been read: a file rewritten or
            # appended to during sealing gives a package of neither version, so it is redone.
            try:
                after = FileIdentity.of(os.stat(cand.path, follow_symlinks=False))
            except FileNotFoundError:
                after = None
            if after is None or not _same(after, cand.identity) or result.plaintext_size != cand.identity.size:
                staged_path.unlink()
                raise SourceChangedError
        metrics.BYTES_IN.inc(result.plaintext_size)
        manifest = Manifest(
            recording_id=rid, kind=w.kind,
            repo_key=repository_key(w.kind, metadata.captured_at, rid),
            package_size=result.package_size, sha256=None, kid=recipient.kid,
            source=str(cand.path), identity=_identity_dict(cand.identity), dispose=w.dispose,
            move_to=str(w.move_to) if w.move_to else None,
            marker=str(cand.marker) if cand.marker else None, created_at=time.time(),
        )
        return self.spool.commit(staged_path, manifest, reservation)

    def _dispose(self, m: Manifest) -> None:
        """Apply the watch's disposal to a committed recording's source. Idempotent on replay."""
        if m.dispose == "keep":
            self.spool.mark_kept(m.recording_id)
            log.info("disposed", extra={"fields": {"recording_id": m.recording_id, "path": m.source,
                                                    "dispose": "keep"}})
            return
        src = Path(m.source)
        # The name is taken from the producer first (one atomic rename to a dotfile the watcher ignores),
        # and only then is the file under it checked: checking `src` and then unlinking `src` would
        # delete a new recording renamed over the name in between (a producer reusing names right
        # after a recording is sealed does exactly that). A replay after a crash finds `grabbed`.
        grabbed = src.with_name(f".mediaseal-{m.recording_id}.disposing")
        if not os.path.lexists(grabbed):
            try:
                os.rename(src, grabbed)
            except FileNotFoundError:
                return  # disposed already (before a crash) or removed by someone else
        st = os.stat(grabbed, follow_symlinks=False)
        if _identity_dict(FileIdentity.of(st)) | {"ctime_ns": 0} != m.identity | {"ctime_ns": 0}:
            log.warning("source-changed-after-seal",
                        extra={"fields": {"recording_id": m.recording_id, "path": m.source}})
            _give_back(grabbed, src)
            return
        if m.dispose == "move" and m.move_to:
            watch_root = next((w.path for w in self.config.watch if w.path in src.parents), src.parent)
            dest = Path(m.move_to) / src.relative_to(watch_root)
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.move(grabbed, dest)
            _fsync_dir(dest.parent)
        else:
            grabbed.unlink()
        _fsync_dir(src.parent)
        if m.marker:
            with contextlib.suppress(FileNotFoundError):
                Path(m.marker).unlink()
        log.info("disposed", extra={"fields": {"recording_id": m.recording_id, "path": m.source,
                                                "dispose": m.dispose}})

    # -- delivery --------------------------------------------------------------------------------

    def _requeue_later(self, rid: str, delay: float) -> None:
        def requeue() -> None:
            self._requeues.discard(handle)
            self._uploads.put_nowait(rid)

        handle = asyncio.get_running_loop().call_later(delay, requeue)
        self._requeues.add(handle)

    async def _upload_worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            rid = await self._uploads.get()
            m = self.spool.load(rid)
            if m is None:
                continue
            self._mark_busy(True)
            try:
                await self._deliver(m, stop)
            finally:
                self._mark_busy(False)

    async def _deliver(self, m: Manifest, stop: asyncio.Event) -> None:
        fields = {"recording_id": m.recording_id, "key": m.repo_key, "path": m.source}
        path = self.spool.package_path(m.recording_id)
        started = time.monotonic()
        replayable = False  # (a manifest already VERIFIED on disk is released the careful way)
        while m.state != VERIFIED:
            if stop.is_set():
                return  # the manifest keeps its state; delivery resumes on the next start
            if m.sha256 is None and self.repository.needs_digest(path):
                # Recorded before the first byte goes out, so every attempt and every replay after a
                # crash is checked against the same digest.
                m.sha256 = await self._thread(_file_sha256, path)
                await self._thread(self.spool.update, m)
            upload = Upload(
                key=m.repo_key, path=path, size=m.package_size, sha256=m.sha256,
                metadata={"kid": m.kid, "recording-id": m.recording_id, "kind": m.kind,
                          "package-size": str(m.package_size), "format-version": "1"},
                state=m.upload, save=lambda state, m=m: self._save_upload_state(m, state),  # type: ignore[misc]
            )
            try:
                receipt = await self._put_through_breaker(upload, stop)
                if receipt is None:
                    return  # stopping; the manifest keeps its state
                if (receipt.size, receipt.sha256) != (m.package_size, m.sha256):
                    # Never counted as delivered while wrong; not an outage either, so it is
                    # quarantined (re-probed slowly) with a loud line rather than retried hot.
                    raise PermanentRepositoryError(
                        f"repository holds {receipt.size} B sha256 {str(receipt.sha256)[:12]}..., "
                        f"expected {m.package_size} B sha256 {str(m.sha256)[:12]}...")
            except RepositoryError as e:
                metrics.RETRIES.inc()
                m.attempts += 1
                m.last_error = str(e)
                self.health.last_error = str(e)
                (self.health.quarantined.discard if e.transient else self.health.quarantined.add)(m.recording_id)
                await self._thread(self.spool.update, m)  # so `mediaseal status` shows it with the agent down
                metrics.FAILED.labels("upload", "transient" if e.transient else "quarantined").inc()
                # Transient: the breaker spaces the retries (one probe per interval for the whole
                # repository). Permanent: this package waits quarantine_seconds, then is re-probed.
                delay = self._breaker.retry_in() if e.transient else self.quarantine_seconds
                log.warning("delivery-retry" if e.transient else "delivery-quarantined",
                            extra={"fields": {**fields, "error": str(e), "retry_in": round(delay, 1)}})
                if not e.transient:
                    # Back in the queue later, and this worker free now: a quarantined package must not
                    # hold an upload worker, or `repository.concurrency` of them stop every delivery.
                    self._requeue_later(m.recording_id, delay)
                    return
                continue
            m.state = VERIFIED
            # Confirmed by identity (a hard link to the spool's own inode): a replay of this delivery
            # is a no-op, so VERIFIED need not be made durable first (two fsyncs per recording).
            replayable = receipt.sha256 is None
            if not replayable:
                await self._thread(self.spool.update, m)
            self.health.last_error, self.health.ok_at = None, time.time()
            self.health.quarantined.discard(m.recording_id)
        crash_point("after-delivery")
        if (disposing := self._disposing.get(m.recording_id)) is not None:
            await disposing.wait()
        await self._thread(functools.partial(self.spool.release, m, replayable=replayable))
        metrics.DELIVERED.labels(m.kind).inc()
        metrics.BYTES_OUT.inc(m.package_size)
        metrics.UPLOAD_SECONDS.observe(time.monotonic() - started)
        log.info("delivered", extra={"fields": {**fields, "bytes": m.package_size}})
        self._update_gauges()
        async with self._space:
            self._space.notify_all()

    async def _put_through_breaker(self, upload: Upload, stop: asyncio.Event) -> Receipt | None:
        """One delivery attempt, admitted by the repository's circuit breaker; None once stopping."""

        async def attempt() -> Receipt:
            async with self._breaker.attempt():
                return await self.repository.put(upload)

        task = asyncio.ensure_future(attempt())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not task.done():
            task.cancel()  # resumable: the upload state is in the manifest
            with contextlib.suppress(asyncio.CancelledError, RepositoryError):
                await task
            return None
        return task.result()

    async def _save_upload_state(self, m: Manifest, state: dict[str, Any]) -> None:
        m.upload = dict(state)
        m.state = UPLOADING
        await self._thread(self.spool.update, m)
        crash_point("after-part-saved")


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


def _same(a: FileIdentity, b: FileIdentity) -> bool:
    return (a.dev, a.ino, a.size, a.mtime_ns) == (b.dev, b.ino, b.size, b.mtime_ns)


def _identity_dict(i: FileIdentity) -> dict[str, int]:
    return {"dev": i.dev, "ino": i.ino, "size": i.size, "mtime_ns": i.mtime_ns, "ctime_ns": i.ctime_ns}


def _give_back(grabbed: Path, src: Path) -> None:
    """Return a file taken by mistake (a newer recording under the name) without replacing whatever is
    under the name by now: link, which refuses an existing name, then drop the private one. If the name
    is taken again, the file keeps a visible name of its own, so it is still sealed and nothing is lost."""
    target = src
    for n in range(1, 1000):
        try:
            os.link(grabbed, target)
            break
        except FileExistsError:
            target = src.with_name(f"{src.stem}-{n}{src.suffix}")
        except OSError:  # no hard links here: a rename, checked first (a narrower window, never a loss of both)
            if os.path.lexists(target):
                target = src.with_name(f"{src.stem}-{n}{src.suffix}")
                continue
            os.rename(grabbed, target)
            break
    else:
        raise FileExistsError(f"no free name to give {grabbed} back under")
    if target != src:
        log.warning("source-renamed", extra={"fields": {"path": str(src), "renamed_to": str(target)}})
    with contextlib.suppress(FileNotFoundError):
        grabbed.unlink()
    _fsync_dir(src.parent)


def _file_sha256(path: Path) -> str:
    """SHA-256 of a spool file (hashlib reads it in the C library, without the GIL)."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["SPOOLED", "DeliveryHealth", "Pipeline", "package_estimate", "recording_id"]
