"""Directories an attacker can write, reached without following a symlink (DESIGN invariant 9).

>>> with opened_dir(watch.path, src.parent) as d:        # each component below the watch: O_NOFOLLOW
...     os.rename(src.name, private, src_dir_fd=d, dst_dir_fd=d)
...     os.unlink(private, dir_fd=d)

Whoever writes a capture directory can swap any directory in it for a symlink at any moment. An
operation by path (`os.unlink("/capture/sub/x.done")`) resolves every component again, so a check
made a moment earlier proves nothing: the unlink lands wherever `sub` points now. So every operation
under a capture directory goes through a descriptor of the directory it acts in, reached from a
trusted anchor (the configured directory, opened as configured: it may itself be a symlink the
operator made) one component at a time with `O_NOFOLLOW | O_DIRECTORY`, and then acts on a single
name (`dir_fd=`), which the kernel never resolves through a link. A swapped component fails with
ELOOP or ENOTDIR (an OSError like any refusal of the capture directory); it never redirects.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["make_dirs", "open_dir", "opened_dir", "single_name"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def single_name(name: str) -> str:
    """`name` if it names one entry of a directory (no separator, not "." or ".."): else ValueError."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"not a single file name: {name!r}")
    return name


def open_dir(anchor: Path | str, directory: Path | str, *, create: int | None = None) -> int:
    """A descriptor of `directory`, which must lie at or below `anchor`, reached from `anchor` one
    component at a time without following symlinks; `create`: the mode to make missing components with.
    The caller closes it."""
    anchor, directory = Path(os.path.normpath(anchor)), Path(os.path.normpath(directory))
    rel = directory.relative_to(anchor)  # ValueError if it is not below: never a walk upwards
    fd = os.open(anchor, _DIR_FLAGS)
    try:
        for part in rel.parts:
            if create is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(single_name(part), create, dir_fd=fd)
            nxt = os.open(single_name(part), _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def opened_dir(anchor: Path | str, directory: Path | str) -> Iterator[int]:
    fd = open_dir(anchor, directory)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def make_dirs(anchor: Path | str, directory: Path | str, mode: int = 0o700) -> Iterator[int]:
    """`opened_dir`, creating the missing components below `anchor` (0700) on the way."""
    fd = open_dir(anchor, directory, create=mode)
    try:
        yield fd
    finally:
        os.close(fd)
