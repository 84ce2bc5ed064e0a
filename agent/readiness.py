"""Probes that tell whether the agent can do its job now: a capture directory, the repository.

>>> check = probe_watch(watch)                  # blocking (stat, a directory read): run it in a thread
>>> check = await probe_repository(repository)  # file://: the directory takes a write; S3: the bucket answers

Used by the health listener's /readyz (agent/service.py: at start, then every PROBE_SECONDS, each
result also a gauge) and by `mediaseal config check`. Readiness tells the truth (DESIGN invariant 7):
an agent watching a missing directory, or delivering to a bucket that does not exist, seals nothing
or delivers nothing, so it is not ready even though the process is fine.

The repository protocol has no probe of its own yet, so it is made of the public methods there are:
- file://: the root is a directory and an unnamed (O_TMPFILE) file can be written in it: proves the
  mount is there and writable, and leaves nothing behind;
- S3: `abort_orphans((), initiated_before=<the epoch>)`, a ListMultipartUploads of the prefix that by
  construction aborts nothing (every upload was initiated after 1970): it answers only if the bucket
  exists, the credentials are accepted and the endpoint is reachable; NoSuchBucket, AccessDenied and
  connection errors come back as RepositoryError. (It needs s3:ListBucketMultipartUploads, which the
  start-up clean-up needs anyway.) A `probe()` on the Repository protocol should replace this.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mediaseal.uploader import FilesystemRepository, Repository, RepositoryError

if TYPE_CHECKING:
    from mediaseal.agent.config import WatchConfig

__all__ = ["PROBE_SECONDS", "Check", "probe_directory", "probe_repository", "probe_watch"]

PROBE_SECONDS = 10.0  # how often the health listener probes the watches and the repository
PROBE_TIMEOUT = 30.0  # a repository that does not answer within this is not ready
_EPOCH = dt.datetime(1970, 1, 2, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str = ""


@runtime_checkable
class _ListsUploads(Protocol):
    """What the S3 repository offers that answers only when the bucket is there and we may use it."""

    async def abort_orphans(self, known_upload_ids: Collection[str], *,
                            initiated_before: dt.datetime | None = None) -> list[str]: ...


def probe_watch(watch: WatchConfig, *, need_write: bool = False) -> Check:
    """The capture directory is there, a directory, and can be listed (and, with `need_write`, written:
    `dispose` delete or move removes files from it)."""
    path = watch.path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check(False, f"{path} does not exist (a typo, or a share not mounted?)")
    except OSError as e:
        return Check(False, f"{path}: {e.strerror or e}")
    if not stat.S_ISDIR(st.st_mode):
        return Check(False, f"{path} is not a directory")
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as e:
        return Check(False, f"{path} cannot be listed: {e.strerror or e}")
    if need_write and not os.access(path, os.W_OK | os.X_OK):
        return Check(False, f"{path} is not writable by this user (dispose = {watch.dispose!r} removes sources)")
    return Check(True, str(path))


async def probe_repository(repository: Repository) -> Check:
    """Whether the repository takes packages now (see the module docstring for how it is asked)."""
    if isinstance(repository, FilesystemRepository):
        return await asyncio.to_thread(probe_directory, repository)
    if isinstance(repository, _ListsUploads):
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await repository.abort_orphans((), initiated_before=_EPOCH)
        except TimeoutError:
            return Check(False, f"no answer within {PROBE_TIMEOUT:.0f} s")
        except RepositoryError as e:
            return Check(False, str(e))
        return Check(True, "the bucket answers")
    return Check(True, "not probed (this repository has no probe)")


def probe_directory(repository: FilesystemRepository) -> Check:
    """A file:// repository's root is a directory that takes a write (blocking)."""
    root = repository.root
    if not root.is_dir():
        return Check(False, f"{root} is not there (not mounted?)")
    try:
        with tempfile.TemporaryFile(dir=root) as f:
            f.write(b"\0")
            f.flush()
    except OSError as e:
        return Check(False, f"{root} does not take writes: {e.strerror or e}")
    return Check(True, str(root))
