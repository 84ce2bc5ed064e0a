"""What a repository is to the agent: a place that stores a package under a key and confirms it.

>>> repo = open_repository("file:///srv/recordings")
>>> receipt = await repo.put(Upload(key, path, size, sha256, metadata))
>>> receipt.size == size and receipt.sha256 == sha256     # the confirm contract

`sha256` is the package's digest, computed from the spool file just before the first delivery that
needs one (`repo.needs_digest(path)`), not while sealing: hashing every byte costs more than the
encryption itself, and a repository that confirms by identity (a hard link on the spool's own
filesystem: the very inode that was sealed and fsynced) has no use for it. Such a put gets
`sha256=None` and its receipt carries None back.

Keys are deterministic (`<kind>/<YYYY>/<MM>/<DD>/<recording-id>.mseal`), so a retry or a replay after
a crash overwrites or finds the same object: exactly one object per recording.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class RepositoryError(Exception):
    """A delivery failed. `transient` ones are retried with backoff; the others are quarantined."""

    transient = True


class TransientRepositoryError(RepositoryError):
    transient = True


class PermanentRepositoryError(RepositoryError):
    """Needs an operator (no such bucket, access denied, a corrupt spool file): re-probed slowly."""

    transient = False


@dataclass
class Upload:
    """One package to deliver. `state` carries resumable progress; `save` persists it (the manifest)."""

    key: str
    path: Path
    size: int
    sha256: str | None  # None only where `needs_digest` said no (confirmed by identity)
    metadata: dict[str, str]
    state: dict[str, Any] = field(default_factory=dict)
    save: Callable[[dict[str, Any]], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Receipt:
    """What the repository confirmed it holds."""

    size: int
    sha256: str | None  # what the Upload carried, once confirmed


class Repository(Protocol):
    async def put(self, upload: Upload) -> Receipt:
        """Store the package at `upload.key` and return what the repository confirmed holding."""
        ...

    def needs_digest(self, path: Path) -> bool:
        """Whether delivering the spool file `path` needs its SHA-256 (False: confirmed by identity)."""
        ...

    async def close(self) -> None: ...


def repository_key(kind: str, captured_at: str, recording_id: str) -> str:
    """`<kind>/<YYYY>/<MM>/<DD>/<recording-id>.mseal`, the date from the RFC 3339 capture time."""
    y, m, d = captured_at[0:4], captured_at[5:7], captured_at[8:10]
    if not (y.isdigit() and m.isdigit() and d.isdigit()):
        raise ValueError(f"capture time {captured_at!r} is not RFC 3339")
    return f"{kind}/{y}/{m}/{d}/{recording_id}.mseal"
