"""The agent's main job, wired: watch -> intake (seal, commit) -> disposal | delivery -> release.

>>> pipeline = Pipeline(config, spool, repository, public_keys)
>>> await pipeline.recover()        # resume what the spool holds
>>> await pipeline.run(stop)        # until `stop` is set; returns after a graceful drain

This module only wires: the queues (watcher -> intake workers, bounded; committed ids -> delivery
workers), the worker tasks, one thread pool for the bytes, and the stop. The work itself is in
agent/intake.py (seal and commit), agent/disposal.py (the capture-directory side) and
agent/delivery.py (upload, verify, release); the recording's durable state is the spool's
(buffer/spool.py), and nothing here writes it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mediaseal import codec
from mediaseal.agent import metrics
from mediaseal.agent.config import Config
from mediaseal.agent.delivery import Delivery, DeliveryHealth
from mediaseal.agent.disposal import Disposal
from mediaseal.agent.intake import Cancelled, Intake, package_estimate, recording_id
from mediaseal.agent.keysource import PublicKeys
from mediaseal.agent.watcher import Candidate, Watcher
from mediaseal.buffer.manifest import RECORDING_ID, Manifest
from mediaseal.buffer.spool import SPOOLED, Spool
from mediaseal.uploader import Repository, RepositoryError, repository_key

log = logging.getLogger("mediaseal.pipeline")

T = TypeVar("T")

__all__ = ["manifest_problem", "SPOOLED", "DeliveryHealth", "Pipeline", "package_estimate", "recording_id"]


def manifest_problem(config: Config, m: Manifest) -> str | None:
    """Why the agent refuses a manifest from its spool (DESIGN invariant 9), or None. A valid MAC says
    this agent wrote it; these say it still makes sense under this config: its id is one the agent
    makes, its repository key the one derived from kind, capture date and id (a manifest cannot aim a
    delivery at another object), and its source lies under a configured watch (a disposal never acts
    anywhere else). A config changed since (another kind, disposal or marker) is not a refusal: the
    disposal follows the watch as configured now and removes only the marker the watch names."""
    match = RECORDING_ID.fullmatch(m.recording_id)
    if match is None:
        return f"recording id {m.recording_id!r} is not one the agent makes"
    d = match["date"]
    try:
        derived = repository_key(m.kind, f"{d[:4]}-{d[4:6]}-{d[6:]}T00:00:00Z", m.recording_id)
    except ValueError:
        derived = None  # an unknown kind
    if m.repo_key != derived:
        return f"repository key {m.repo_key!r} is not the one derived from its kind, capture date and id"
    src = Path(m.source)
    if not src.is_absolute() or ".." in src.parts or os.path.normpath(src) != str(src):
        return f"source {m.source!r} is not a normal absolute path"
    if not any(src.is_relative_to(w.path) and src != w.path for w in config.watch):
        return f"source {m.source} lies under no configured watch"
    return None


class Pipeline:
    def __init__(self, config: Config, spool: Spool, repository: Repository, keys: PublicKeys,
                 *, chunk_size: int = codec.DEFAULT_CHUNK_SIZE, quarantine_seconds: float = 60.0) -> None:
        self.config = config
        self.spool = spool
        self.repository = repository
        self.keys = keys
        self._busy: set[asyncio.Task[Any]] = set()  # workers holding a recording right now
        self._candidates: asyncio.Queue[Candidate] = asyncio.Queue(maxsize=max(1, config.agent.concurrency))
        self._uploads: asyncio.Queue[str] = asyncio.Queue()
        space = asyncio.Condition()  # delivery made room in the spool: intake may go on
        self._executor = ThreadPoolExecutor(max_workers=config.agent.concurrency + config.repository.concurrency,
                                            thread_name_prefix="mediaseal")
        self.disposal = Disposal(config.watch, spool, self._executor, retry_seconds=config.agent.rescan_seconds)
        self.intake = Intake(config, spool, keys, self.disposal, self._executor, space,
                             deliver=self._uploads.put_nowait, chunk_size=chunk_size)
        self.delivery = Delivery(spool, repository, self.disposal, self._executor, space,
                                 requeue=self._uploads.put_nowait, quarantine_seconds=quarantine_seconds)
        self.fatal: BaseException | None = None
        self.watcher = Watcher(config.watch, rescan_seconds=config.agent.rescan_seconds, is_busy=self.is_busy)

    # -- public ----------------------------------------------------------------------------------

    @property
    def health(self) -> DeliveryHealth:
        return self.delivery.health

    def is_busy(self, path: Path) -> bool:
        return self.intake.is_busy(path)

    async def recover(self) -> int:
        """Resume what a previous run left in the spool; returns how many packages await delivery."""
        pending = await self._thread(self.spool.recover)
        # Before the first scan: whatever disposal a crash interrupted is finished, in every manifest
        # state (a crash after VERIFIED leaves the source under its private name), and every failed one
        # is retried. Idempotent: the source may be gone already.
        await self.disposal.recover(pending)
        for rid in pending:
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
        metrics.SPOOL_BYTES.set(self.spool.used_bytes)
        metrics.SPOOL_PACKAGES.set(self.spool.package_count)
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
        self.intake.cancel()  # sealing threads stop at their next chunk; staging files are removed
        self.delivery.stop()  # quarantined packages keep their manifests: re-probed on the next start
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

    # -- workers ---------------------------------------------------------------------------------

    async def _intake_worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            cand = await self._candidates.get()
            try:
                await self._busy_with(self.intake.handle(cand, stop))
            except Cancelled:
                return

    async def _upload_worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            rid = await self._uploads.get()
            m = self.spool.load(rid)
            if m is None:
                continue
            await self._busy_with(self.delivery.deliver(m, stop))

    async def _busy_with(self, work: Awaitable[None]) -> None:
        """Await `work` with this worker marked busy: at a stop it is let finish (bounded), not cancelled."""
        task = asyncio.current_task()
        if task is not None:
            self._busy.add(task)
        try:
            await work
        finally:
            if task is not None:
                self._busy.discard(task)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
