"""Finds complete recordings in the capture directories and hands them to the pipeline.

>>> watcher = Watcher(config.watch, rescan_seconds=30, is_busy=pipeline.is_busy)
>>> task = asyncio.create_task(watcher.run(queue, stop))  # Candidates arrive on queue until stop is set
>>> watcher.rescan_now()                                  # e.g. once the spool has freed space

The filesystem is the truth; watchfiles (inotify) events are only hints naming paths worth a look.
A full reconciliation scan runs at start, every `rescan_seconds` and on rescan_now(), so nothing is
missed after a restart, an inotify overflow or on a network filesystem.

Completion, per watch: `close` (the default): complete once no process has it open for writing
(agent/writers.py; inotify IN_CLOSE_WRITE, through asyncinotify, says when to look: watchfiles drops
close events) and its size and mtime held for a short re-check (`min(quiet_seconds, 0.5)`: a writer
that closes and reopens to append, as rtpengine may, is not cut); `rename`: any file whose name is not
a temp name is complete; `marker`: complete once its marker exists (`marker`, a template over
{path} {dir} {name} {stem}, or `<file><marker_suffix>`); `quiet`: complete once its mtime is
`quiet_seconds` old and its size and mtime equal the previous observation, if there was one.
In every mode a file still open for writing is not complete (invariant 8): it stays pending and is
looked at again on its close event or every second. Temp names (`temp_patterns` per watch, by
default `.*`, `*.part`, `*.tmp`, `*~`, matched against file and directory names, so anything in a
dot-directory too) and names not matching `pattern` are never candidates, nor are sidecars (`sidecars`
templates that put them beside their recording: `is_sidecar_name`), which are sealed with their
recording. Symlinks are never followed (a configured capture directory may itself be one), other
watches' directories and `move_to` directories are never entered.

A complete file may be emitted again by a later scan while it is still there and not `is_busy`:
the pipeline dedups. A file hinted while busy (changed while being sealed: the pipeline will re-do it)
is looked at again every second until it is emitted or a full scan takes over.

Memory stays flat for any backlog: directories are read with os.scandir iterators in a worker thread,
candidates are put on the bounded queue as they are found (a full queue pauses the scan), and per-file
state is kept only for files seen but not (yet) emitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from asyncinotify import Inotify, Mask
from watchfiles import Change, awatch

from mediaseal.agent.config import TEMP_PATTERNS, WatchConfig, sidecar_shape
from mediaseal.agent.metrics import RESCANS, UNREADABLE
from mediaseal.agent.writers import Writers, ignore_lease_breaks, open_writers_fd
from mediaseal.buffer.manifest import SourceIdentity

__all__ = ["Candidate", "Watcher", "has_recording", "is_sidecar_name", "is_temp_name", "marker_for", "sidecars_for"]

log = logging.getLogger("mediaseal.watcher")

UNREADABLE_RETRY_SECONDS = 60.0  # an unreadable file is looked at no more often than this, unless its ctime moves
_MIN_RECHECK = 0.25  # floor between quiet-mode looks, so quiet_seconds = 0 cannot spin
_BUSY_RECHECK = 1.0  # a hinted file that was busy (being sealed) is looked at again this often
_BATCH = 256  # candidates found per trip to the scanning thread
_MAX_HINTS = 1024  # per watch; past this a scan of the whole watch is cheaper than the list
_HINT_RETRY_SECONDS = 5.0  # how soon to try inotify again (missing directory, watch limit)
_OWN_PREFIX = ".mediaseal-"  # agent/disposal.py and agent/writers.py name their files so
_OPEN_RECHECK = 1.0  # a complete-looking file still open for writing is looked at again this often
_CLOSE_QUIET = 0.5  # completion = "close": size and mtime must hold this long after the last close
_MARKER_RECHECK = 1.0  # a marker template that may point outside the watch (no event names it) is polled


@dataclass(frozen=True)
class Candidate:
    """A complete recording: `identity` is from the lstat that judged it complete."""

    path: Path
    watch: WatchConfig
    identity: SourceIdentity
    marker: Path | None = None  # the sidecar that marked it complete (completion = "marker")


def is_temp_name(name: str, patterns: Sequence[str] = TEMP_PATTERNS) -> bool:
    """Names producers use while writing, never recordings (by default dotfiles, *.part, *.tmp, *~), and
    the agent's own `.mediaseal-*` names (a source being disposed of, a probe) whatever the patterns say."""
    return name.startswith(_OWN_PREFIX) or any(fnmatchcase(name, p) for p in patterns)


def marker_for(watch: WatchConfig, path: Path) -> Path:
    """The marker whose existence completes `path` (completion = "marker")."""
    if watch.marker is None:
        return path.with_name(path.name + watch.marker_suffix)
    return _render(watch.marker, path)


def sidecars_for(watch: WatchConfig, path: Path) -> list[Path]:
    """The sidecar files `path` carries (`sidecars`, templates like `marker`), in template order."""
    return [_render(t, path) for t in watch.sidecars]


def is_sidecar_name(watch: WatchConfig, name: str) -> bool:
    """Whether `name`, in a directory of this watch, is some recording's sidecar by a template that puts it
    beside its recording ("{dir}/{stem}.xml", "{path}.meta"). (A template into another directory should
    point outside the watch: docs/OPERATIONS.md.)"""
    return any(fnmatchcase(name, glob) for glob, *_ in _beside(watch.sidecars))


def has_recording(watch: WatchConfig, path: Path) -> bool:
    """Whether the sidecar `path` has its recording beside it. While it has, the sidecar is sealed with it,
    never on its own; one whose recording is gone (written after its recording was sealed, say) is an
    orphan, sealed as a recording of its own rather than left in plaintext."""
    name = path.name
    for glob, prefix, field, suffix in _beside(watch.sidecars):
        if not fnmatchcase(name, glob):
            continue
        core = name[len(prefix):len(name) - len(suffix)]
        if field == "name":
            if core != name and os.path.isfile(path.with_name(core)):
                return True
            continue
        try:
            with os.scandir(path.parent) as it:
                for e in it:
                    if (e.name != name and e.name.startswith(core) and Path(e.name).stem == core
                            and fnmatchcase(e.name, watch.pattern) and not is_sidecar_name(watch, e.name)
                            and e.is_file(follow_symlinks=False)):
                        return True
        except OSError:
            return True  # cannot tell: leave it for its recording (or the next scan)
    return False


@functools.cache
def _beside(templates: tuple[str, ...]) -> tuple[tuple[str, str, str, str], ...]:
    """(glob, literal prefix, field, literal suffix) for each template that puts a sidecar beside its
    recording (`config.sidecar_shape`)."""
    shapes = [shape for t in templates if (shape := sidecar_shape(t)) is not None]
    return tuple((_glob_escape(prefix) + "*" + _glob_escape(suffix), prefix, field, suffix)
                 for prefix, field, suffix in shapes)


def _glob_escape(text: str) -> str:
    """`text` as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def _sidecar_open(watch: WatchConfig, path: Path) -> bool:
    """Whether a sidecar of `path` is still being written (a recorder writes its metadata after the audio)."""
    for sidecar in sidecars_for(watch, path):
        try:
            fd = os.open(sidecar, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            continue  # none (yet), or not a file: sealing decides
        try:
            if open_writers_fd(fd) is Writers.OPEN:
                return True
        finally:
            os.close(fd)
    return False


def _render(template: str, path: Path) -> Path:
    text = template.format(path=path, dir=path.parent, name=path.name, stem=path.stem)
    return Path(os.path.normpath(text))


def _marker_suffix(watch: WatchConfig) -> str | None:
    """The suffix when the marker sits beside its recording as `<name><suffix>` (markers are then known
    by name, and a marker's own event points at its recording); None for other templates."""
    if watch.marker is None:
        return watch.marker_suffix
    rest = watch.marker.removeprefix("{path}")
    if rest != watch.marker and rest and "{" not in rest and "/" not in rest:
        return rest
    return None


def _never_busy(path: Path) -> bool:
    return False


# watchfiles groups events until none arrived for `step` ms (default 50): that delay is added to every
# recording's latency. 2 ms still groups a burst of creations into batches (events of one burst arrive
# microseconds apart), and a scan of each hinted path costs far less than the wait it saves.
_EVENT_STEP_MS = 2


class Watcher:
    """Emits Candidates for complete recordings under `watches` (see the module docstring)."""

    def __init__(
        self,
        watches: Sequence[WatchConfig],
        *,
        rescan_seconds: float,
        is_busy: Callable[[Path], bool] = _never_busy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not watches or rescan_seconds <= 0:
            raise ValueError("Watcher needs at least one watch and rescan_seconds > 0")
        self._scanner = _Scanner(watches, clock)
        ignore_lease_breaks()  # here, in the main thread: the writer check takes leases (agent/writers.py)
        self._rescan_seconds = rescan_seconds
        self._is_busy = is_busy
        self._clock = clock
        self._wake = asyncio.Event()
        self._rescan = True
        self._hints: dict[int, set[Path]] = {}
        self._flooded: set[int] = set()

    def set_owned(self, watch: WatchConfig, owned: bool) -> None:
        """Whether this agent holds `watch`'s lock (agent/ownership.py): one it does not hold (another
        agent's, or not there to lock yet) is not scanned, so no recording is sealed by two agents."""
        i = self._scanner.watches.index(watch)
        if owned:
            if i in self._scanner.unowned:
                self._scanner.unowned.discard(i)
                self.rescan_now()  # it may hold recordings already
        elif i not in self._scanner.unowned:
            self._scanner.unowned.add(i)
            self._hints.pop(i, None)

    def rescan_now(self) -> None:
        """Wake the loop for a full scan soon. Call from the event loop's thread."""
        self._rescan = True
        self._wake.set()

    async def run(self, out: asyncio.Queue[Candidate], stop: asyncio.Event) -> None:
        """Scan and emit into `out` until `stop` is set; `await out.put` is the backpressure."""
        # Our own stop event for awatch: it sets the event it was given when cancelled.
        halt = asyncio.Event()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mediaseal-watcher")
        hints = [asyncio.create_task(self._hint_loop(i, halt)) for i in range(len(self._scanner.watches))]
        closes = [asyncio.create_task(self._close_loop(i)) for i, w in enumerate(self._scanner.watches)
                  if not w.force_polling]
        main = asyncio.create_task(self._loop(out, executor))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({main, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.set()
            for task in closes:
                task.cancel()
            main.cancel()
            stopped.cancel()
            await asyncio.wait(hints, timeout=1.0)  # awatch sees halt within one 50 ms step
            for task in hints:
                task.cancel()
            await asyncio.gather(main, stopped, *hints, *closes, return_exceptions=True)
            executor.shutdown(wait=False, cancel_futures=True)
        if not main.cancelled() and (error := main.exception()) is not None:
            raise error

    async def _loop(self, out: asyncio.Queue[Candidate], executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            self._wake.clear()
            if self._rescan or loop.time() >= next_full:
                self._rescan = False
                self._hints, self._flooded = {}, set()  # the full scan covers them
                RESCANS.inc()
                await self._emit(out, self._scanner.full(), executor)
                next_full = loop.time() + self._rescan_seconds
                log.debug("rescan-done", extra={"fields": {"next_in": self._rescan_seconds}})  # every 30 s: debug
            else:
                items = [(i, self._scanner.watches[i].path) for i in self._flooded]
                items += [(i, p) for i, paths in self._hints.items() if i not in self._flooded for p in paths]
                self._hints, self._flooded = {}, set()
                items += self._scanner.take_due(self._clock())
                if items:
                    await self._emit(out, self._scanner.check(items), executor, hinted=True)
            delay = next_full - loop.time()
            due = self._scanner.next_due()
            if due is not None:
                delay = min(delay, due - self._clock())
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def _emit(
        self, out: asyncio.Queue[Candidate], found: Generator[Candidate, None, None], executor: ThreadPoolExecutor,
        *, hinted: bool = False,
    ) -> None:
        # The scan (stat calls, possibly over NFS) runs in a thread; only is_busy and put run here.
        loop = asyncio.get_running_loop()
        try:
            while batch := await loop.run_in_executor(executor, _take, found, _BATCH):
                for cand in batch:
                    if self._is_busy(cand.path):
                        if hinted:
                            # Something happened to it while it was being sealed (rewritten, truncated,
                            # renamed over): the pipeline re-does such a file, and this hint is the only
                            # news of it before the next full scan (rescan_seconds, 30 s by default).
                            self._scanner.later(cand, self._clock() + _BUSY_RECHECK)
                        continue
                    log.debug("complete", extra={"fields": {"path": str(cand.path)}})
                    await out.put(cand)
        finally:
            with contextlib.suppress(ValueError):  # still running in the thread if we were cancelled
                found.close()

    async def _hint_loop(self, i: int, halt: asyncio.Event) -> None:
        """Turn watchfiles events for one watch into hints; restart it if the directory is replaced."""
        watch = self._scanner.watches[i]
        reported = ""
        while not halt.is_set():
            try:
                root = os.stat(watch.path)
                async for changes in awatch(
                    watch.path, watch_filter=_hint_filter(watch.temp_patterns), stop_event=halt,
                    force_polling=watch.force_polling,
                    recursive=watch.recursive, ignore_permission_denied=True, yield_on_timeout=True,
                    step=_EVENT_STEP_MS,
                ):
                    if changes:
                        self._add_hints(i, changes)
                    elif not _same_dir(root, watch.path):
                        break  # replaced or removed: the old inotify watch would stay silent forever
            except FileNotFoundError:
                pass  # the scan reports a missing capture directory
            except Exception as e:  # (inotify watch limit, ...) scans still find everything, only later
                errors = _leaves(e)
                if not all(isinstance(x, OSError) for x in errors):
                    # Failed while watching, not while setting up: watchfiles gives up on a whole batch of
                    # events when one path in it is not UTF-8, so the batch's other paths are lost. A full
                    # scan now stands in for them, rather than the next periodic one.
                    self.rescan_now()
                error = "; ".join(str(x) for x in errors)
                if error != reported:
                    reported = error
                    log.warning("watch-events-unavailable", extra={"fields": {
                        "watch": str(watch.path), "error": error, "rescan_seconds": self._rescan_seconds}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), min(self._rescan_seconds, _HINT_RETRY_SECONDS))

    async def _close_loop(self, i: int) -> None:
        """IN_CLOSE_WRITE events for one watch as hints, so a file is looked at the moment its writer closed
        it (watchfiles drops close events). Runs until cancelled; rebuilt if the directory is replaced."""
        watch = self._scanner.watches[i]
        reported, restarted = "", False
        while True:
            try:
                with Inotify() as inotify:
                    # The root may be a symlink the operator configured: followed, unlike everything below it.
                    root = inotify.add_watch(watch.path, _DIR_EVENTS & ~Mask.DONT_FOLLOW)
                    for directory in await asyncio.to_thread(self._scanner.directories, i):
                        with contextlib.suppress(OSError):  # vanished, or not a directory any more
                            inotify.add_watch(directory, _DIR_EVENTS)
                    if restarted:
                        self.rescan_now()  # anything closed while no watch was in place
                    restarted = True
                    async for event in inotify:
                        if event.path is None:
                            if Mask.Q_OVERFLOW in event.mask:
                                self.rescan_now()
                            continue
                        if event.watch is root and Mask.IGNORED in event.mask:
                            break  # the capture directory itself went away
                        if Mask.ISDIR in event.mask:
                            if (watch.recursive and (Mask.CREATE | Mask.MOVED_TO) & event.mask
                                    and self._scanner.enterable(i, event.path)):
                                with contextlib.suppress(OSError):
                                    inotify.add_watch(event.path, _DIR_EVENTS)
                                self._add_hints(i, {(Change.added, str(event.path))})
                            continue
                        if Mask.CLOSE_WRITE in event.mask and _close_hint(watch, event.path.name):
                            self._add_hints(i, {(Change.modified, str(event.path))})
            except FileNotFoundError:
                pass  # the scan reports a missing capture directory
            except Exception as e:  # the inotify watch or instance limit: the per-second recheck still works
                if str(e) != reported:
                    reported = str(e)
                    log.warning("close-events-unavailable", extra={"fields": {"watch": str(watch.path),
                                                                              "error": reported}})
            await asyncio.sleep(_HINT_RETRY_SECONDS)

    def _add_hints(self, i: int, changes: set[tuple[Change, str]]) -> None:
        if i not in self._flooded:
            paths = self._hints.setdefault(i, set())
            paths.update(Path(p) for _, p in changes)
            if len(paths) > _MAX_HINTS:
                self._flooded.add(i)
                del self._hints[i]
        self._wake.set()


def _close_hint(watch: WatchConfig, name: str) -> bool:
    """Whether a close event names a possible recording (a marker's creation was hint enough already)."""
    suffix = _marker_suffix(watch) if watch.completion == "marker" else None
    return not is_temp_name(name, watch.temp_patterns) and not (suffix is not None and name.endswith(suffix))


_DIR_EVENTS = Mask.CLOSE_WRITE | Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR | Mask.DONT_FOLLOW | Mask.EXCL_UNLINK


def _leaves(e: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups: anyio wraps watchfiles' errors in a TaskGroup's."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def _hint_filter(patterns: Sequence[str]) -> Callable[[Change, str], bool]:
    def wanted(change: Change, path: str) -> bool:
        return not is_temp_name(os.path.basename(path), patterns)  # appends to x.part must not wake us
    return wanted


def _same_dir(before: os.stat_result, path: Path) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino)


def _take(found: Iterator[Candidate], n: int) -> list[Candidate]:
    return list(itertools.islice(found, n))


@dataclass
class _Note:
    """What the scanner remembers about a file it saw and did not emit; dropped when it vanishes."""

    watch: int
    state: str  # "pending" (quiet, still changing) | "unreadable" | "skipped" (reported once, ignored) | "busy"
    seen: int  # generation of the last full scan that saw it: the others are swept after a scan
    due: float | None = None  # wall-clock time to look again
    shape: tuple[int, int, int, int] = (0, 0, 0, 0)  # quiet: (dev, ino, size, mtime_ns) last observed
    since: float = 0.0  # quiet: since when `shape` is known to hold
    reported: bool = False  # unreadable already logged and counted
    ctime_ns: int = 0  # unreadable: the file's ctime when last found unreadable


class _Scanner:
    """The synchronous half: looks at the filesystem and judges completeness. Runs in one thread at a time."""

    def __init__(self, watches: Sequence[WatchConfig], clock: Callable[[], float]) -> None:
        self.watches = tuple(watches)
        self.clock = clock
        self.notes: dict[Path, _Note] = {}
        self.gen = 0
        self.missing: set[int] = set()
        self.unowned: set[int] = set()  # watches whose lock another agent holds: never scanned (set_owned)
        # Directories no scan enters: where "move" disposal puts sources, and other watches' roots.
        self.fences = frozenset([w.path for w in watches] + [w.move_to for w in watches if w.move_to is not None])

    def full(self) -> Generator[Candidate, None, None]:
        """Every complete file under every watch, then forget files that have vanished."""
        self.gen += 1
        for i, watch in enumerate(self.watches):
            if i not in self.unowned:
                yield from self._tree(i, watch.path)
        self.notes = {p: n for p, n in self.notes.items() if n.seen == self.gen}

    def check(self, items: Iterable[tuple[int, Path]]) -> Generator[Candidate, None, None]:
        """Look only at the hinted or due paths (directories: their whole subtree)."""
        emitted: set[Path] = set()
        for i, path in items:
            if i in self.unowned:
                continue
            for cand in self._check_one(i, path):
                if cand.path not in emitted:
                    emitted.add(cand.path)
                    yield cand

    def take_due(self, now: float) -> list[tuple[int, Path]]:
        due = [(p, n) for p, n in self.notes.items() if n.due is not None and n.due <= now]
        for _, note in due:
            note.due = None  # looking again sets a new due time, if one is still needed
        return [(n.watch, p) for p, n in due]

    def later(self, cand: Candidate, due: float) -> None:
        """Look at a (busy) candidate again at `due`, until the pipeline is done with it."""
        i = self.watches.index(cand.watch)
        self.notes[cand.path] = _Note(i, "busy", self.gen, due=due)

    def next_due(self) -> float | None:
        return min((n.due for n in self.notes.values() if n.due is not None), default=None)

    def enterable(self, i: int, directory: Path) -> bool:
        """Whether scans of watch `i` enter `directory` (a real directory, not temp-named, not fenced)."""
        watch = self.watches[i]
        if directory == watch.path or not directory.is_relative_to(watch.path) or not watch.recursive:
            return directory == watch.path
        d = watch.path
        for part in directory.relative_to(watch.path).parts:
            d = d / part
            if is_temp_name(part, watch.temp_patterns) or d in self.fences or not _is_real_dir(d):
                return False
        return True

    def directories(self, i: int) -> list[Path]:
        """The directories under watch `i` that its scans enter (for the close-event watches)."""
        watch, found = self.watches[i], list[Path]()
        if not watch.recursive:
            return found
        stack = [watch.path]
        while stack:
            with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
                for entry in entries:
                    path = Path(entry.path)
                    if (entry.is_dir(follow_symlinks=False) and not is_temp_name(entry.name, watch.temp_patterns)
                            and path not in self.fences):
                        found.append(path)
                        stack.append(path)
        return found

    def _tree(self, i: int, top: Path) -> Generator[Candidate, None, None]:
        watch = self.watches[i]
        stack = [top]  # paths, not open iterators: one directory handle open at a time
        while stack:
            directory = stack.pop()
            try:
                entries = os.scandir(directory)
            except (FileNotFoundError, NotADirectoryError) as e:
                if directory == watch.path:
                    self._root_missing(i, e)
                continue
            except OSError as e:
                self._skip(i, directory, f"cannot list directory: {e.strerror}", unreadable=True)
                continue
            if directory == watch.path:
                self._root_present(i)
            with entries:
                try:
                    for entry in entries:
                        path = Path(entry.path)
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                if (watch.recursive and not is_temp_name(entry.name, watch.temp_patterns)
                                        and path not in self.fences):
                                    stack.append(path)
                                continue
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue  # vanished between listing and stat
                        yield from self._consider(i, path, st)
                except OSError as e:  # reading the directory failed midway (EIO on a network share)
                    log.warning("scan-incomplete", extra={"fields": {"dir": str(directory), "error": str(e)}})

    def _check_one(self, i: int, path: Path) -> Iterator[Candidate]:
        watch = self.watches[i]
        if path == watch.path:
            yield from self._tree(i, path)
            return
        if not path.is_relative_to(watch.path):
            return
        parts = path.relative_to(watch.path).parts
        if not watch.recursive and len(parts) > 1:
            return
        directory = watch.path
        for part in parts[:-1]:  # every directory on the way must be a real, visible, unfenced one
            directory = directory / part
            if is_temp_name(part, watch.temp_patterns) or directory in self.fences or not _is_real_dir(directory):
                return
        try:
            st = os.lstat(path)
        except OSError:
            self.notes.pop(path, None)
            return
        if stat.S_ISDIR(st.st_mode):
            if watch.recursive and not is_temp_name(path.name, watch.temp_patterns) and path not in self.fences:
                yield from self._tree(i, path)
        elif watch.completion == "marker" and (suffix := _marker_suffix(watch)) and path.name.endswith(suffix):
            recording = path.with_name(path.name.removesuffix(suffix))
            with contextlib.suppress(OSError):
                st = os.lstat(recording)
                if not stat.S_ISDIR(st.st_mode):
                    yield from self._consider(i, recording, st)
        else:
            yield from self._consider(i, path, st)

    def _consider(self, i: int, path: Path, st: os.stat_result) -> Iterator[Candidate]:
        watch, name = self.watches[i], path.name
        if is_temp_name(name, watch.temp_patterns):
            return
        suffix = _marker_suffix(watch) if watch.completion == "marker" else None
        if suffix is not None and name.endswith(suffix):
            return
        if not fnmatchcase(name, watch.pattern):
            return
        if is_sidecar_name(watch, name) and has_recording(watch, path):
            return  # sealed with its recording
        if stat.S_ISLNK(st.st_mode):
            self._skip(i, path, "symbolic link, not followed")
            return
        if not stat.S_ISREG(st.st_mode):
            self._skip(i, path, "not a regular file")
            return
        now, note = self.clock(), self.notes.get(path)
        if note is not None:
            note.seen = self.gen
            # The slow retry spares a file nothing has changed about. A chmod, chown or ACL change (the
            # operator's fix) moves the ctime: look now, so the fix takes effect without waiting a minute.
            if (note.state == "unreadable" and note.due is not None and now < note.due
                    and note.ctime_ns == st.st_ctime_ns):
                return
        identity, marker = SourceIdentity.of(st), None
        if watch.completion == "marker":
            marker = marker_for(watch, path)
            if marker == path:
                return  # the marker template names the file itself: it is some recording's marker
            if not os.path.lexists(marker):
                if suffix is None:  # no event of ours may name the marker (another directory): poll it
                    self._pending(i, path, identity, now, now + _MARKER_RECHECK)
                return
        elif watch.completion == "quiet" and not self._quiet(i, path, identity, now, watch.quiet_seconds):
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.notes.pop(path, None)
            return
        except OSError as e:  # EACCES, EPERM, EIO...: say so once, then look once a minute (or once changed)
            reported = note is not None and note.reported
            if not reported:
                log.warning("unreadable", extra={"fields": {
                    "path": str(path), "error": e.strerror, "retry_seconds": UNREADABLE_RETRY_SECONDS}})
                UNREADABLE.inc()
            self.notes[path] = _Note(i, "unreadable", self.gen, due=now + UNREADABLE_RETRY_SECONDS, reported=True,
                                     ctime_ns=st.st_ctime_ns)
            return
        try:
            writers = open_writers_fd(fd)
        finally:
            os.close(fd)
        if writers is Writers.OPEN or _sidecar_open(watch, path):
            # Invariant 8, in every mode, for the recording and the sidecars it carries: its close event (or
            # a second) brings it back.
            self._pending(i, path, identity, now, now + _OPEN_RECHECK)
            return
        if watch.completion == "close":
            # Where writers cannot be seen (UNKNOWN: NFS, FUSE, another user's process) only time can tell.
            quiet = min(watch.quiet_seconds, _CLOSE_QUIET) if writers is Writers.NONE else watch.quiet_seconds
            if not self._quiet(i, path, identity, now, quiet):
                return
        note = self.notes.get(path)
        if note is not None and note.reported:
            log.info("readable-again", extra={"fields": {"path": str(path)}})
        self.notes.pop(path, None)
        yield Candidate(path, watch, identity, marker)

    def _pending(self, i: int, path: Path, ident: SourceIdentity, now: float, due: float) -> None:
        """Not complete yet (still open, no marker): look again at `due`, keeping what `_quiet` knows."""
        note = self.notes.get(path)
        shape = (ident.dev, ident.ino, ident.size, ident.mtime_ns)
        if note is not None and note.state == "pending" and note.shape == shape:
            since = note.since
        else:
            since = min(ident.mtime_ns / 1e9, now)
        reported = note is not None and note.reported
        self.notes[path] = _Note(i, "pending", self.gen, due=due, shape=shape, since=since, reported=reported)

    def _quiet(self, i: int, path: Path, ident: SourceIdentity, now: float, quiet: float) -> bool:
        """Complete once unchanged since the last look and `quiet` s old; else note when to look again."""
        note = self.notes.get(path)
        shape = (ident.dev, ident.ino, ident.size, ident.mtime_ns)
        previous = note if note is not None and note.state == "pending" else None
        if previous is not None and previous.shape == shape:
            since, changed = previous.since, False
        else:
            # An mtime in the future (clock skew on a network share) counts from now instead.
            since, changed = min(ident.mtime_ns / 1e9, now), previous is not None
        if not changed and now - since >= quiet:
            return True
        due = max(since + quiet, now + _MIN_RECHECK, now + quiet if changed else 0.0)
        reported = note is not None and note.reported
        self.notes[path] = _Note(i, "pending", self.gen, due=due, shape=shape, since=since, reported=reported)
        return False

    def _skip(self, i: int, path: Path, reason: str, *, unreadable: bool = False) -> None:
        note = self.notes.get(path)
        if note is None or note.state != "skipped":
            log.warning("skipped", extra={"fields": {"path": str(path), "reason": reason}})
            if unreadable:
                UNREADABLE.inc()
        self.notes[path] = _Note(i, "skipped", self.gen)

    def _root_missing(self, i: int, e: OSError) -> None:
        if i not in self.missing:
            self.missing.add(i)
            log.warning("capture-dir-missing", extra={"fields": {"watch": str(self.watches[i].path),
                                                                  "error": e.strerror}})

    def _root_present(self, i: int) -> None:
        if i in self.missing:
            self.missing.discard(i)
            log.info("capture-dir-present", extra={"fields": {"watch": str(self.watches[i].path)}})


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
