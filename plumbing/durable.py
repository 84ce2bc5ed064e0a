"""One way to make a file's new content survive a crash: temp, fsync, rename, fsync the directory.

Every state file mediaseal writes (spool manifests, keyrings, key set caches, export resume state, the
filesystem repository's packages) goes through here, so the order and the failure policy are stated
once:

- The new content is written to a temp name beside the target (same directory, so the rename is
  atomic), fsynced, renamed over the target, and the directory is fsynced so the rename itself is
  durable. A reader sees the old content or the new, never a mix.
- A failed fsync raises DurabilityError and is never retried: after a failed fsync Linux may already
  have dropped the dirty pages, so a second fsync can "succeed" with the data lost. The agent stops
  (exit 3) on it; a command reports it and exits non-zero.
- Files are created 0600 (O_EXCL on the temp name, so a planted file is never written through), and a
  short os.write is retried until all bytes are written.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["DurabilityError", "atomic_open", "fsync", "fsync_dir", "write_all", "write_atomic"]


class DurabilityError(OSError):
    """fsync failed: the state on disk is unknown, so the caller must stop rather than go on."""


def fsync(fd: int, what: Path | str) -> None:
    """fsync `fd`, mapping a failure to DurabilityError (never retried: see the module docstring)."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise DurabilityError(e.errno, f"fsync of {what} failed: {e.strerror}") from None


def fsync_dir(path: Path | str) -> None:
    """Make the directory entries of `path` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd, path)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a single os.write may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(target: Path | str, mode: int = 0o600, *, sync_dir: bool = True) -> Iterator[BinaryIO]:
    """A binary file that replaces `target` durably when the block ends, and vanishes if it raises.

    The file is a fresh temp name beside the target (created O_EXCL with `mode`); on success it is
    fsynced, renamed over the target and (unless `sync_dir` is False, for a caller that batches the
    directory fsync of several renames) the directory is fsynced.
    """
    target = Path(target)
    tmp = _temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            fsync(f.fileno(), target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(target.parent)


def write_atomic(target: Path | str, data: bytes, mode: int = 0o600, *, sync_dir: bool = True) -> None:
    """Replace `target` with `data` durably (see atomic_open)."""
    with atomic_open(target, mode, sync_dir=sync_dir) as f:
        f.write(data)
