"""Probes that tell whether the agent can do its job now: a capture directory, the repository.

>>> check = probe_watch(watch)                  # blocking (stat, a directory read): run it in a thread
>>> check = await probe_repository(repository)  # file://: the directory takes a write; S3: the bucket answers

Used by the health listener's /readyz (agent/service.py: at start, then every PROBE_SECONDS, each
result also a gauge) and by `mediaseal config check`. Readiness tells the truth (DESIGN invariant 7):
an agent watching a missing directory, or delivering to a bucket that does not exist, seals nothing
or delivers nothing, so it is not ready even though the process is fine.

The repository answers through its own `probe()` (the Repository protocol, uploader/base.py): file://
checks that the root is a directory that takes a write (a temporary file, gone at once); S3 sends one
ListMultipartUploads of the prefix, which answers only if the bucket exists, the credentials are
accepted and the endpoint is reachable (it needs s3:ListBucketMultipartUploads, which the start-up
orphan sweep needs anyway); NoSuchBucket, AccessDenied and connection errors come back as
RepositoryError naming them.
"""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mediaseal.uploader import Repository, RepositoryError

if TYPE_CHECKING:
    from mediaseal.agent.config import WatchConfig

__all__ = ["PROBE_SECONDS", "Check", "probe_repository", "probe_watch"]

PROBE_SECONDS = 10.0  # how often the health listener probes the watches and the repository
PROBE_TIMEOUT = 30.0  # a repository that does not answer within this is not ready


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str = ""


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
    """Whether the repository takes packages now: its own `probe()` (Repository protocol), bounded."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return Check(True, await repository.probe())
    except TimeoutError:
        return Check(False, f"no answer within {PROBE_TIMEOUT:.0f} s")
    except RepositoryError as e:
        return Check(False, str(e))
