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
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Literal, get_args

from mediaseal.agent import metrics
from mediaseal.agent.config import WatchConfig
from mediaseal.agent.crash import crash_point
from mediaseal.agent.watcher import marker_for
from mediaseal.agent.writers import refuse_if_open
from mediaseal.buffer.manifest import DISPOSE_MODES, RECORDING_ID, DisposeMode, Manifest, SourceIdentity
from mediaseal.buffer.spool import Spool
from mediaseal.plumbing.dirfd import make_dirs, opened_dir
from mediaseal.plumbing.durable import DurabilityError, fsync, write_all

log = logging.getLogger("mediaseal.pipeline")

__all__ = ["DISPOSE_FAILURE_REASONS", "DISPOSE_MODES", "Disposal", "DisposeFailure", "DisposeMode", "failure_reason"]

# Why a source could not be disposed of (the `reason` of `dispose-failed` and of the metric's label).
DisposeFailure = Literal["permission-denied", "read-only-filesystem", "busy", "no-space", "other"]
DISPOSE_FAILURE_REASONS: tuple[DisposeFailure, ...] = get_args(DisposeFailure)
for _reason in DISPOSE_FAILURE_REASONS:  # at zero from the start, so increase() sees the first failure
    metrics.DISPOSE_FAILURES.labels(_reason)

_PRIVATE = re.compile(rf"\.mediaseal-(?P<rid>{RECORDING_ID.pattern})\.disposing")


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
        Raises OSError where the capture directory refuses (see `_attempt`), including ELOOP/ENOTDIR
        where a directory of the source's path was swapped for a symlink (nothing is done through it)."""
        if m.dispose == "keep":
            self._spool.mark_kept(m.recording_id)
            log.info("disposed", extra={"fields": {"recording_id": m.recording_id, "path": m.source,
                                                    "dispose": "keep"}})
            return
        src = Path(m.source)
        w = self.watch_of(src)
        # Every step acts on one name in a directory descriptor reached from the watch without following
        # a symlink (plumbing/dirfd.py): whoever writes the capture directory can swap a directory of the
        # path for a link at any moment, and an operation by path would then land wherever it points.
        with opened_dir(w.path, src.parent) as d:
            if refuse_if_open(src, m.recording_id, dir_fd=d):  # invariant 8: the watcher brings it back
                return
            # The name is taken from the producer first (one atomic rename to a dotfile the watcher
            # ignores), and only then is the file under it checked: checking `src` and then unlinking
            # `src` would delete a new recording renamed over the name in between (a producer reusing
            # names right after a recording is sealed does exactly that). A replay after a crash finds
            # `grabbed`.
            grabbed = f".mediaseal-{m.recording_id}.disposing"
            if not _exists_at(d, grabbed):
                try:
                    os.rename(src.name, grabbed, src_dir_fd=d, dst_dir_fd=d)
                except FileNotFoundError:
                    # Disposed already (before a crash) or removed by someone else. The marker normally
                    # went before the source; an agent before this one removed it after, so it may still
                    # be here. Logged at info only when something was left to do (a restart replays every
                    # manifest).
                    (log.info if self._remove_marker(m, w) else log.debug)("disposed", extra={"fields": {
                        "recording_id": m.recording_id, "path": m.source, "dispose": m.dispose,
                        "replayed": True}})
                    return
                crash_point("after-dispose-rename")
            identity = m.source_identity
            if identity is None or not identity.same_file(
                    SourceIdentity.of(os.stat(grabbed, dir_fd=d, follow_symlinks=False))):
                log.warning("source-changed-after-seal",
                            extra={"fields": {"recording_id": m.recording_id, "path": m.source}})
                _give_back(d, grabbed, src)
                return
            # The marker before the source (see the module docstring), durably: a marker back from a
            # power cut with its source gone would make the next recording under the name look complete.
            self._remove_marker(m, w)
            crash_point("after-dispose-marker")
            if m.dispose == "move" and w.move_to is not None:
                _move_out(w, src.parent, d, grabbed, src.name)
            else:
                with contextlib.suppress(FileNotFoundError):  # a replay after the unlink, before the fsync
                    os.unlink(grabbed, dir_fd=d)
            fsync(d, src.parent)
        crash_point("after-dispose-source")
        log.info("disposed", extra={"fields": {"recording_id": m.recording_id, "path": m.source,
                                                "dispose": m.dispose}})

    def watch_of(self, path: Path) -> WatchConfig:
        """The watch `path` lies under (manifests are validated on load: agent/pipeline.py)."""
        for w in self._watches:
            if path.is_relative_to(w.path) and path != w.path:
                return w
        raise OSError(errno.EPERM, "not under any configured watch", str(path))

    def _remove_marker(self, m: Manifest, w: WatchConfig) -> bool:
        """Remove `m`'s completion marker, if it has one still there, durably (its directory fsynced),
        through a directory descriptor reached from the nearest directory it shares with the watch
        (an rtpengine marker sits in a sibling of the watch). Returns whether there was one."""
        if not m.marker:
            return False
        marker = Path(m.marker)
        if w.completion != "marker" or marker != marker_for(w, Path(m.source)):
            # Only the marker the watch names for this source (the config may have changed since, or
            # the manifest is not what it claims): any other file is not the agent's to remove.
            log.warning("marker-not-removed", extra={"fields": {"recording_id": m.recording_id, "marker": m.marker,
                                                                "why": "not the marker this watch names"}})
            return False
        anchor = Path(os.path.commonpath([w.path, marker.parent]))
        try:
            with opened_dir(anchor, marker.parent) as d:
                try:
                    os.unlink(marker.name, dir_fd=d)
                except FileNotFoundError:
                    return False
                fsync(d, marker.parent)
        except FileNotFoundError:
            return False  # its directory is gone too
        return True

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
        # fwalk: each directory is entered through a descriptor without following symlinks, and the
        # names below act on it (dir_fd), so a directory swapped for a link mid-walk leads nowhere.
        try:
            os.stat(w.path)
        except OSError:
            return  # missing or unreadable: readiness says so, and there is nothing to finish in it
        # From the watch's real path: a configured capture directory may itself be a symlink, which fwalk
        # would not enter; nothing below it is followed.
        real = Path(os.path.realpath(w.path))
        for dirpath, dirnames, filenames, d in os.fwalk(real, follow_symlinks=False):
            here = w.path / Path(dirpath).relative_to(real)
            if not w.recursive:
                dirnames[:] = []
            for name in filenames:
                if (match := _PRIVATE.fullmatch(name)) is None or match["rid"] in known:
                    continue
                path = here / name
                try:
                    if not stat.S_ISREG(os.stat(name, dir_fd=d, follow_symlinks=False).st_mode):
                        continue
                    if w.dispose == "move" and w.move_to is not None:
                        _move_out(w, here, d, name, match["rid"])
                    else:
                        os.unlink(name, dir_fd=d)
                    fsync(d, here)
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


def _exists_at(d: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=d, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _names(name: str) -> Iterator[str]:
    """`name`, then `<stem>-1<suffix>`, `<stem>-2<suffix>`, ...: where a file goes when its name is taken."""
    p = Path(name)
    yield name
    for n in range(1, 1000):
        yield f"{p.stem}-{n}{p.suffix}"
    raise FileExistsError(f"no free name for {name}")


def _move_out(w: WatchConfig, here: Path, src_dir: int, name: str, dest_name: str) -> None:
    """Move `name` (in `src_dir`, the descriptor of `here` under the watch) to the same relative place
    under the watch's `move_to` (made 0700 as needed; it lies outside every watch), durably."""
    assert w.move_to is not None
    rel = here.relative_to(w.path)
    os.makedirs(w.move_to, mode=0o700, exist_ok=True)  # the configured directory itself
    with make_dirs(w.move_to, w.move_to / rel) as dest:
        _move(src_dir, name, dest, dest_name)
        fsync(dest, w.move_to / rel)


def _move(src_dir: int, name: str, dest_dir: int, dest_name: str) -> None:
    """Move one file between directory descriptors: a rename where both are on one filesystem, else a
    copy (created O_EXCL, fsynced) and an unlink. An existing file under the destination name is never
    replaced: the moved one takes a free name beside it."""
    target = next(t for t in _names(dest_name) if not _exists_at(dest_dir, t))
    try:
        os.rename(name, target, src_dir_fd=src_dir, dst_dir_fd=dest_dir)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        fout = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=dest_dir)
        try:
            while chunk := os.read(fin, 1 << 20):
                write_all(fout, chunk)
            fsync(fout, target)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    os.unlink(name, dir_fd=src_dir)


def _give_back(d: int, grabbed: str, src: Path) -> None:
    """Return a file taken by mistake (a newer recording under the name) without replacing whatever is
    under the name by now: link, which refuses an existing name, then drop the private one. If the name
    is taken again, the file keeps a visible name of its own, so it is still sealed and nothing is lost."""
    for target in _names(src.name):
        try:
            os.link(grabbed, target, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
            break
        except FileExistsError:
            continue
        except OSError:  # no hard links here: a rename, checked first (a narrower window, never a loss of both)
            if _exists_at(d, target):
                continue
            os.rename(grabbed, target, src_dir_fd=d, dst_dir_fd=d)
            break
    if target != src.name:
        log.warning("source-renamed", extra={"fields": {"path": str(src), "renamed_to": str(src.with_name(target))}})
    with contextlib.suppress(FileNotFoundError):
        os.unlink(grabbed, dir_fd=d)
    fsync(d, src.parent)
