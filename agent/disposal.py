"""The capture-directory side: what happens to a source once its package is committed in the spool.

>>> disposal = Disposal(config.watch, spool, executor, retry_seconds=30)
>>> done = disposal.start(manifest)     # in a worker thread; tracked until it finishes
>>> await disposal.settled(rid)         # delivery waits here before the spool copy is released
>>> await disposal.recover(pending)     # at start, before the first scan: finish what a crash left

Invariants:
- A source is disposed only after its package and manifest are durable (the caller's order: commit,
  then disposal), and the spool copy is released only after the disposal is done (`settled`), so a
  crash in the middle of either is finished from the manifest on the next start.
- Every step is idempotent and recoverable from any manifest state (spooled, uploading, verified):
  `recover` replays the disposal of every manifest in the spool, of every source whose disposal
  failed (the spool's undisposed records), and finishes any `.mediaseal-<id>.disposing` file left in
  a capture directory, so no marker, private name or plaintext survives a crash. The steps, each
  with its crash point: take the name (rename to the private dotfile), remove the completion marker
  (fsynced), delete or move the source (directory fsynced). The marker goes before the source: a
  replay that finds neither name knows the marker is gone too, so a leftover marker can never make
  the next recording under the same name look complete while it is still being written.
- Never the wrong file: the name is taken from the producer first (one atomic rename to a dotfile the
  watcher ignores) and only then is the file under it compared with the manifest's `SourceIdentity`.
  A newer recording renamed over the name in between is given back, never deleted (nor its marker).
- A source that cannot be disposed of (a directory the agent may read but not write, a read-only
  mount, an immutable directory) is a state, not an error: remembered durably in the spool
  (`Spool.record_dispose_failed`, which also stops it being sealed again), reported once
  (`dispose-failed` with the reason, `mediaseal_dispose_failures_total{reason}`,
  `mediaseal_sources_undisposed`), and retried every `retry_seconds` and at every start until it
  succeeds. "keep" is remembered in the spool too (`Spool.mark_kept`).

This is the module's whole surface (`Disposal.start`, `settled`, `recover`, `dispose`): the capture side
can be rewritten behind it without the intake or the delivery changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Literal, get_args

from mediaseal.agent import metrics
from mediaseal.agent.config import WatchConfig
from mediaseal.agent.crash import crash_point
from mediaseal.agent.writers import refuse_if_open
from mediaseal.buffer.manifest import DISPOSE_MODES, DisposeMode, Manifest, SourceIdentity
from mediaseal.buffer.spool import Spool
from mediaseal.plumbing.durable import DurabilityError, fsync_dir

log = logging.getLogger("mediaseal.pipeline")

__all__ = ["DISPOSE_FAILURE_REASONS", "DISPOSE_MODES", "Disposal", "DisposeFailure", "DisposeMode", "failure_reason"]

# Why a source could not be disposed of (the `reason` of `dispose-failed` and of the metric's label).
DisposeFailure = Literal["permission-denied", "read-only-filesystem", "busy", "no-space", "other"]
DISPOSE_FAILURE_REASONS: tuple[DisposeFailure, ...] = get_args(DisposeFailure)
for _reason in DISPOSE_FAILURE_REASONS:  # at zero from the start, so increase() sees the first failure
    metrics.DISPOSE_FAILURES.labels(_reason)

_PRIVATE = re.compile(r"\.mediaseal-(?P<rid>[0-9]{8}T[0-9]{6}Z-[0-9a-f]{20}(?:\.sidecar[1-8])?)\.disposing")


def failure_reason(e: OSError) -> DisposeFailure:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission-denied"
    if e.errno == errno.EROFS:
        return "read-only-filesystem"
    if e.errno in (errno.EBUSY, errno.ETXTBSY):
        return "busy"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no-space"
    return "other"


class Disposal:
    """Disposes committed recordings' sources and tracks the ones under way."""

    def __init__(self, watches: Sequence[WatchConfig], spool: Spool, executor: Executor,
                 *, retry_seconds: float = 30.0) -> None:
        self._watches = watches
        self._spool = spool
        self._executor = executor
        self._retry_seconds = retry_seconds
        self._retry: asyncio.TimerHandle | None = None  # armed while some disposal is failing
        self._under_way: dict[str, asyncio.Future[None]] = {}  # recording id -> its disposal
        self._reported: set[str] = set()  # failing disposals reported by this process (once each)
        self._reported_lock = threading.Lock()  # attempts of one recording may overlap (a rescan, a retry)

    def start(self, m: Manifest, after: Sequence[asyncio.Future[None]] = ()) -> asyncio.Future[None]:
        """Dispose of `m`'s source in a worker thread, once the disposals `after` are done (a recording's
        sidecars go before it); `settled(m.recording_id)` waits for it from now on.
        The future fails only on DurabilityError (the agent stops); a source that cannot be disposed
        of is remembered and retried (see the module docstring)."""
        rid = m.recording_id
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None]
        if after:
            async def chained() -> None:
                await asyncio.gather(*after)
                await loop.run_in_executor(self._executor, self._attempt, m)
            fut = asyncio.ensure_future(chained())
        else:
            fut = loop.run_in_executor(self._executor, self._attempt, m)
        self._under_way[rid] = fut

        def finished(_f: asyncio.Future[None]) -> None:
            self._under_way.pop(rid, None)
            self._arm_retry()

        fut.add_done_callback(finished)
        return fut

    async def recover(self, pending: Iterable[str]) -> None:
        """At start, before the first scan: finish every disposal a previous run started, whatever the
        manifest's state (`pending`: the ids the spool still holds), every one that failed before,
        and every private `.disposing` file left in a capture directory."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._recover, list(pending))
        self._arm_retry()

    async def settled(self, recording_id: str) -> None:
        """Return once no disposal of `recording_id` is under way (done, or failed and remembered)."""
        if (fut := self._under_way.get(recording_id)) is not None:
            await asyncio.wait([fut])

    def dispose(self, m: Manifest) -> None:
        """Apply the watch's disposal to a committed recording's source. Idempotent on replay.
        Raises OSError where the capture directory refuses (see `_attempt`)."""
        if m.dispose == "keep":
            self._spool.mark_kept(m.recording_id)
            log.info("disposed", extra={"fields": {"recording_id": m.recording_id, "path": m.source,
                                                    "dispose": "keep"}})
            return
        src = Path(m.source)
        if refuse_if_open(src, m.recording_id):  # invariant 8 (agent/writers.py): the watcher brings it back
            return
        # The name is taken from the producer first (one atomic rename to a dotfile the watcher ignores),
        # and only then is the file under it checked: checking `src` and then unlinking `src` would
        # delete a new recording renamed over the name in between (a producer reusing names right
        # after a recording is sealed does exactly that). A replay after a crash finds `grabbed`.
        grabbed = src.with_name(f".mediaseal-{m.recording_id}.disposing")
        if not os.path.lexists(grabbed):
            try:
                os.rename(src, grabbed)
            except FileNotFoundError:
                # Disposed already (before a crash) or removed by someone else. The marker normally went
                # before the source; an agent before this one removed it after, so it may still be here.
                # Logged at info only when something was left to do (a restart replays every manifest).
                (log.info if _remove_marker(m) else log.debug)("disposed", extra={"fields": {
                    "recording_id": m.recording_id, "path": m.source, "dispose": m.dispose, "replayed": True}})
                return
            crash_point("after-dispose-rename")
        identity = m.source_identity
        if identity is None or not identity.same_file(SourceIdentity.of(os.stat(grabbed, follow_symlinks=False))):
            log.warning("source-changed-after-seal",
                        extra={"fields": {"recording_id": m.recording_id, "path": m.source}})
            _give_back(grabbed, src)
            return
        # The marker before the source (see the module docstring), durably: a marker back from a power
        # cut with its source gone would make the next recording under the name look complete.
        _remove_marker(m)
        crash_point("after-dispose-marker")
        if m.dispose == "move" and m.move_to:
            watch_root = next((w.path for w in self._watches if w.path in src.parents), src.parent)
            dest = Path(m.move_to) / src.relative_to(watch_root)
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.move(grabbed, dest)
            fsync_dir(dest.parent)
        else:
            with contextlib.suppress(FileNotFoundError):  # a replay after the unlink, before the fsync
                grabbed.unlink()
        fsync_dir(src.parent)
        crash_point("after-dispose-source")
        log.info("disposed", extra={"fields": {"recording_id": m.recording_id, "path": m.source,
                                                "dispose": m.dispose}})

    # -- failures and recovery ---------------------------------------------------------------------

    def _attempt(self, m: Manifest) -> None:
        """`dispose`, with a refusal of the capture directory turned into a remembered state (worker thread)."""
        try:
            self.dispose(m)
        except DurabilityError:
            raise  # an OSError too, but the spool's or the capture directory's state is unknown: stop
        except OSError as e:
            reason = failure_reason(e)
            fields = {"recording_id": m.recording_id, "path": m.source, "dispose": m.dispose,
                      "reason": reason, "error": f"{e.strerror or e}: {e.filename or m.source}"}
            self._spool.record_dispose_failed(m, reason)  # writes nothing if remembered already
            with self._reported_lock:
                first = m.recording_id not in self._reported  # once per recording and start, not every retry
                self._reported.add(m.recording_id)
            if first:
                metrics.DISPOSE_FAILURES.labels(reason).inc()
                log.error("dispose-failed", extra={"fields": {**fields, "retry_in": self._retry_seconds}})
            else:
                log.debug("dispose-retry-failed", extra={"fields": fields})
        else:
            self._spool.record_disposed(m.recording_id)  # no I/O unless it had failed before
            with self._reported_lock:
                self._reported.discard(m.recording_id)
        metrics.UNDISPOSED.set(self._spool.undisposed_count)

    def _arm_retry(self) -> None:
        """While some source's disposal is failing, retry them all every `retry_seconds` (event loop)."""
        if self._retry is not None or not self._spool.undisposed_count:
            return
        self._retry = asyncio.get_running_loop().call_later(self._retry_seconds, self._retry_failed)

    def _retry_failed(self) -> None:
        self._retry = None
        for m in self._spool.undisposed():
            if m.recording_id not in self._under_way:
                try:
                    self.start(m)
                except RuntimeError:  # the executor is shut down: the agent is stopping
                    return

    def _recover(self, pending: list[str]) -> None:
        known: set[str] = set()
        for rid in pending:
            if (m := self._spool.load(rid)) is not None:
                known.add(rid)
                self._attempt(m)
        for m in self._spool.undisposed():
            if m.recording_id not in known:
                known.add(m.recording_id)
                self._attempt(m)
        # Every manifest, also one recovery kept as evidence (its package missing before verification):
        # its plaintext under the private name may be the only copy left.
        known |= {m.recording_id for m in self._spool.manifests()}
        for w in self._watches:
            self._finish_orphans(w, known)
        metrics.UNDISPOSED.set(self._spool.undisposed_count)

    def _finish_orphans(self, w: WatchConfig, known: set[str]) -> None:
        """A private `.disposing` file whose recording the spool no longer knows (left by an agent before
        this one, which released the manifest without finishing the disposal) is finished here.

        Safe by the spool's invariants, not by a guess: the name is made only after a commit, and a
        manifest leaves the spool only after the repository confirmed its package (release) or as
        never committed, whose source was not renamed. So its package is in the repository."""
        if w.dispose == "keep":
            return  # a keep watch never makes private names
        skip = w.move_to
        for dirpath, dirnames, filenames in os.walk(w.path):
            here = Path(dirpath)
            if skip is not None:
                dirnames[:] = [d for d in dirnames if here / d != skip]
            if not w.recursive:
                dirnames[:] = []
            for name in filenames:
                if (match := _PRIVATE.fullmatch(name)) is None or match["rid"] in known:
                    continue
                path = here / name
                try:
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    if w.dispose == "move" and w.move_to is not None:
                        dest = w.move_to / here.relative_to(w.path) / match["rid"]
                        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                        shutil.move(path, dest)
                        fsync_dir(dest.parent)
                    else:
                        path.unlink()
                    fsync_dir(here)
                except DurabilityError:
                    raise
                except OSError as e:
                    log.error("dispose-failed", extra={"fields": {"recording_id": match["rid"], "path": str(path),
                                                                  "dispose": w.dispose, "reason": failure_reason(e),
                                                                  "error": str(e)}})
                    continue
                log.warning("disposed-orphan", extra={"fields": {
                    "recording_id": match["rid"], "path": str(path), "dispose": w.dispose,
                    "why": "its package was released (confirmed by the repository) before its disposal finished"}})


def _remove_marker(m: Manifest) -> bool:
    """Remove `m`'s completion marker, if it has one still there, durably (its directory fsynced).
    Returns whether there was one."""
    if not m.marker:
        return False
    marker = Path(m.marker)
    try:
        marker.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(marker.parent)
    return True


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
    fsync_dir(src.parent)
