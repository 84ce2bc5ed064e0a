"""The capture-directory side: what happens to a source once its package is committed in the spool.

>>> disposal = Disposal(config.watch, spool, executor)
>>> done = disposal.start(manifest)     # in a worker thread; tracked until it finishes
>>> await disposal.settled(rid)         # delivery waits here before the spool copy is released
>>> disposal.dispose(manifest)          # the same, in the calling thread (recovery, a replay)

Invariants:
- A source is disposed only after its package and manifest are durable (the caller's order: commit,
  then disposal), and the spool copy is released only after the disposal is done (`settled`), so a
  crash in the middle of either is finished from the manifest on the next start.
- Idempotent: a replay after a crash (the manifest still SPOOLED) finds the source gone, or under its
  private name, and finishes the job; "keep" is remembered in the spool (`Spool.mark_kept`).
- Never the wrong file: the name is taken from the producer first (one atomic rename to a dotfile the
  watcher ignores) and only then is the file under it compared with the manifest's `SourceIdentity`.
  A newer recording renamed over the name in between is given back, never deleted.

This is the module's whole surface (`Disposal.start`, `settled`, `dispose`): the capture side can be
rewritten behind it without the intake or the delivery changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

from mediaseal.agent.config import WatchConfig
from mediaseal.agent.writers import refuse_if_open
from mediaseal.buffer.manifest import DISPOSE_MODES, DisposeMode, Manifest, SourceIdentity
from mediaseal.buffer.spool import Spool
from mediaseal.plumbing.durable import fsync_dir

log = logging.getLogger("mediaseal.pipeline")

__all__ = ["DISPOSE_MODES", "Disposal", "DisposeMode"]


class Disposal:
    """Disposes committed recordings' sources and tracks the ones under way."""

    def __init__(self, watches: Sequence[WatchConfig], spool: Spool, executor: Executor) -> None:
        self._watches = watches
        self._spool = spool
        self._executor = executor
        self._under_way: dict[str, asyncio.Future[None]] = {}  # recording id -> its disposal

    def start(self, m: Manifest) -> asyncio.Future[None]:
        """Dispose of `m`'s source in a worker thread; `settled(m.recording_id)` waits for it."""
        rid = m.recording_id
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self.dispose, m)
        self._under_way[rid] = fut
        fut.add_done_callback(lambda _f: self._under_way.pop(rid, None))
        return fut

    async def settled(self, recording_id: str) -> None:
        """Return once no disposal of `recording_id` is under way (its failure is the intake's to report)."""
        if (fut := self._under_way.get(recording_id)) is not None:
            await asyncio.wait([fut])

    def dispose(self, m: Manifest) -> None:
        """Apply the watch's disposal to a committed recording's source. Idempotent on replay."""
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
                return  # disposed already (before a crash) or removed by someone else
        identity = m.source_identity
        if identity is None or not identity.same_file(SourceIdentity.of(os.stat(grabbed, follow_symlinks=False))):
            log.warning("source-changed-after-seal",
                        extra={"fields": {"recording_id": m.recording_id, "path": m.source}})
            _give_back(grabbed, src)
            return
        if m.dispose == "move" and m.move_to:
            watch_root = next((w.path for w in self._watches if w.path in src.parents), src.parent)
            dest = Path(m.move_to) / src.relative_to(watch_root)
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.move(grabbed, dest)
            fsync_dir(dest.parent)
        else:
            grabbed.unlink()
        fsync_dir(src.parent)
        if m.marker:
            with contextlib.suppress(FileNotFoundError):
                Path(m.marker).unlink()
        log.info("disposed", extra={"fields": {"recording_id": m.recording_id, "path": m.source,
                                                "dispose": m.dispose}})


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
