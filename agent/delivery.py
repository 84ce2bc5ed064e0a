"""Delivery: a committed package -> the repository, confirmed, then released from the spool.

>>> delivery = Delivery(spool, repository, disposal, executor, space, requeue=uploads.put_nowait)
>>> await delivery.deliver(manifest, stop)   # until confirmed, quarantined, or stopping

Invariants:
- The spool copy goes only after the repository confirmed it: size and SHA-256 (hashed from the
  spool file before the first attempt that needs it, and recorded, so every attempt and every replay
  is checked against the same digest), or, for a hard link on the spool's own filesystem, size and
  identity (the very inode that was sealed and fsynced). A receipt that disagrees is never counted
  as delivered.
- Every state change is a spool transition, written before it is acted on (`Spool.record_*`,
  `release`); a stop at any point leaves the manifest in a state the next start resumes from.
- The spool copy is released only once the source's disposal is done (`Disposal.settled`).
- Transient failures are spaced by one circuit breaker for the whole repository; a permanent one
  quarantines the package (re-probed after `quarantine_seconds`) without holding a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mediaseal.agent import metrics
from mediaseal.agent.crash import crash_point
from mediaseal.agent.disposal import Disposal
from mediaseal.buffer.manifest import Manifest, ManifestState
from mediaseal.buffer.spool import Spool, SpoolFullError
from mediaseal.uploader import PermanentRepositoryError, Receipt, Repository, RepositoryError, Upload
from mediaseal.uploader.breaker import CircuitBreaker

log = logging.getLogger("mediaseal.pipeline")

SPOOL_FULL_RETRY_SECONDS = 5.0  # a manifest write met a full spool filesystem: look again this much later

__all__ = ["Delivery", "DeliveryHealth"]


@dataclass
class DeliveryHealth:
    """What the last delivery attempts said, for /readyz, sd_notify STATUS= and metrics."""

    last_error: str | None = None  # set while the most recent attempt failed
    ok_at: float | None = None  # wall time of the last confirmed delivery
    quarantined: set[str] = field(default_factory=set)  # recording ids failing permanently


class Delivery:
    """Delivers spooled packages one at a time per caller (the pipeline runs several workers)."""

    def __init__(self, spool: Spool, repository: Repository, disposal: Disposal, executor: Executor,
                 space: asyncio.Condition, *, requeue: Callable[[str], None], quarantine_seconds: float) -> None:
        self.spool = spool
        self.repository = repository
        self.quarantine_seconds = quarantine_seconds
        self.health = DeliveryHealth()
        self._disposal = disposal
        self._executor = executor
        self._space = space  # notified after each release: intake may be waiting for room
        self._requeue = requeue
        self._requeues: set[asyncio.TimerHandle] = set()  # quarantined packages, back in the queue later
        self._breaker = CircuitBreaker()

    def stop(self) -> None:
        """Drop the pending re-probes: quarantined packages keep their manifests (re-probed next start)."""
        for h in self._requeues:
            h.cancel()

    async def _thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _requeue_later(self, rid: str, delay: float) -> None:
        def requeue() -> None:
            self._requeues.discard(handle)
            self._requeue(rid)

        handle = asyncio.get_running_loop().call_later(delay, requeue)
        self._requeues.add(handle)

    async def deliver(self, m: Manifest, stop: asyncio.Event) -> None:
        try:
            await self._deliver(m, stop)
        except SpoolFullError as e:  # a manifest could not be written: its old state stands, try later
            log.warning("delivery-paused", extra={"fields": {"recording_id": m.recording_id, "error": str(e),
                                                              "retry_in": SPOOL_FULL_RETRY_SECONDS}})
            self._requeue_later(m.recording_id, SPOOL_FULL_RETRY_SECONDS)

    async def _deliver(self, m: Manifest, stop: asyncio.Event) -> None:
        fields = {"recording_id": m.recording_id, "key": m.repo_key, "path": m.source}
        path = self.spool.package_path(m.recording_id)
        started = time.monotonic()
        while m.state != ManifestState.VERIFIED:  # (one VERIFIED on disk already is just released)
            if stop.is_set():
                return  # the manifest keeps its state; delivery resumes on the next start
            if m.sha256 is None and self.repository.needs_digest(path):
                # Recorded before the first byte goes out (see the module docstring).
                digest = await self._thread(functools.partial(_file_sha256, path))
                await self._thread(functools.partial(self.spool.record_digest, m, digest))
            upload = Upload(
                key=m.repo_key, path=path, size=m.package_size, sha256=m.sha256,
                metadata={"kid": m.kid, "recording-id": m.recording_id, "kind": m.kind,
                          "package-size": str(m.package_size), "format-version": "1"},
                state=m.upload, save=functools.partial(self._save_progress, m),
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
                self.health.last_error = str(e)
                (self.health.quarantined.discard if e.transient else self.health.quarantined.add)(m.recording_id)
                await self._thread(functools.partial(self.spool.record_failure, m, str(e)))
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
            if receipt.sha256 is None:
                # Confirmed by identity (a hard link to the spool's own inode): a replay of this delivery
                # is a no-op, so VERIFIED need not be made durable first (two fsyncs per recording).
                self.spool.record_verified(m, durable=False)
            else:
                await self._thread(functools.partial(self.spool.record_verified, m))
            self.health.last_error, self.health.ok_at = None, time.time()
            self.health.quarantined.discard(m.recording_id)
        crash_point("after-delivery")
        await self._disposal.settled(m.recording_id)
        await self._thread(functools.partial(self.spool.release, m))
        metrics.DELIVERED.labels(m.kind).inc()
        metrics.BYTES_OUT.inc(m.package_size)
        metrics.UPLOAD_SECONDS.observe(time.monotonic() - started)
        log.info("delivered", extra={"fields": {**fields, "bytes": m.package_size}})
        metrics.SPOOL_BYTES.set(self.spool.used_bytes)
        metrics.SPOOL_PACKAGES.set(self.spool.package_count)
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

    async def _save_progress(self, m: Manifest, progress: dict[str, Any]) -> None:
        await self._thread(functools.partial(self.spool.record_upload, m, progress))
        crash_point("after-part-saved")


def _file_sha256(path: Path) -> str:
    """SHA-256 of a spool file (hashlib reads it in the C library, without the GIL)."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
