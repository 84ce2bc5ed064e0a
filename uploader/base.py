"""What a repository is: a place that stores a package under a key, confirms it, and reads it back.

>>> repo = open_repository("file:///srv/recordings")
>>> receipt = await repo.put(Upload(key, path, size, sha256, metadata))
>>> receipt.size == size and receipt.sha256 == sha256     # the confirm contract

`sha256` is the package's digest, computed from the spool file just before the first delivery that
needs one (`repo.needs_digest(path)`), not while sealing: hashing every byte costs more than the
encryption itself, and a repository that confirms by identity (a hard link on the spool's own
filesystem: the very inode that was sealed and fsynced) has no use for it. Such a put gets
`sha256=None` and its receipt carries None back.

Keys are deterministic (`<kind>/<YYYY>/<MM>/<DD>/<recording-id>.mseal`, plumbing.locations.RepositoryKey),
so a retry or a replay after a crash overwrites or finds the same object: exactly one object per recording.

The read side (`PackageReader`: head, ranged get, streamed get, list) is what playback, export, `decrypt
s3://...` and key re-wrap use; both repositories implement it, so nothing above reads S3 or the
directory tree on its own. Reads are of ciphertext only. Read errors are RepositoryErrors too, and
PackageNotFoundError when there is no package under the key.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from mediaseal.plumbing.locations import LocationError, RepositoryKey, RepositoryURL, parse_repository_url


class RepositoryError(Exception):
    """A delivery (or read) failed. `transient` ones are retried with backoff; the others are quarantined.
    `code` is the store's error code where it gave one (S3's, or the botocore exception's name)."""

    transient = True

    def __init__(self, message: str = "", code: str = "") -> None:
        super().__init__(message)
        self.code = code


class TransientRepositoryError(RepositoryError):
    transient = True


class PermanentRepositoryError(RepositoryError):
    """Needs an operator (no such bucket, access denied, a corrupt spool file): re-probed slowly."""

    transient = False


class PackageNotFoundError(PermanentRepositoryError):
    """No package under that key (a read)."""


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


@dataclass(frozen=True)
class StoredObject:
    """A package as listed: its key (relative to the repository root), size and modification time (UTC)."""

    key: str
    size: int
    last_modified: datetime


class PackageReader(Protocol):
    """A repository opened for reading. All methods are coroutines (or async iterators)."""

    @property
    def url(self) -> str: ...

    def location(self, key: str) -> str:
        """Where the package at `key` is, for messages and reports (a path, or s3://bucket/object-key)."""
        ...

    async def size(self, key: str) -> int:
        """The package's size (HEAD); PackageNotFoundError if there is none."""
        ...

    async def read(self, key: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the object, fewer only where the object ends."""
        ...

    def iter_read(self, key: str, offset: int, length: int, block: int) -> AsyncGenerator[bytes, None]:
        """The same range as blocks of exactly `block` bytes (the last may be shorter): one request."""
        ...

    async def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        """(the object's first `length` bytes, the object's size): one request on S3 (no HEAD)."""
        ...

    def list(self, prefix: str = "") -> AsyncGenerator[StoredObject, None]:
        """Every `.mseal` object whose key starts with `prefix`, in key order (dot-files skipped)."""
        ...

    async def close(self) -> None: ...


class Repository(Protocol):
    async def put(self, upload: Upload) -> Receipt:
        """Store the package at `upload.key` and return what the repository confirmed holding."""
        ...

    def needs_digest(self, path: Path) -> bool:
        """Whether delivering the spool file `path` needs its SHA-256 (False: confirmed by identity)."""
        ...

    async def probe(self) -> str:
        """Whether the repository takes packages now, without writing one: a short description of what
        answered, or RepositoryError naming why not (readiness asks this at start and periodically)."""
        ...

    async def close(self) -> None: ...


class HeaderRewriter(Protocol):
    """A repository that can replace a package's header in place, its body copied byte for byte (re-wrap)."""

    async def rewrite_head(self, key: str, old_head: int, new_head: bytes, *, part_size: int = 16 << 20) -> None:
        """Replace the first `old_head` bytes of the package at `key` with `new_head`, atomically: a reader
        sees the old package or the new one. Memory stays within about `part_size` (S3's upload parts)."""
        ...


class ReadableRepository(Repository, PackageReader, HeaderRewriter, Protocol):
    """What both repositories are: they deliver, read back and rewrite headers."""


def repository_location(url: str) -> RepositoryURL:
    """plumbing.locations.parse_repository_url, its LocationError as a PermanentRepositoryError."""
    try:
        return parse_repository_url(url)
    except LocationError as e:
        raise PermanentRepositoryError(str(e)) from None


def check_range(offset: int, length: int, block: int = 1) -> None:
    """The argument rules every PackageReader enforces (ValueError)."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    if block <= 0:
        raise ValueError("block must be positive")


async def read_all(reader: PackageReader, key: str, offset: int, length: int) -> bytes:
    """`reader.read` by way of `reader.iter_read`: one request, joined."""
    check_range(offset, length)
    out = bytearray()
    async for block in reader.iter_read(key, offset, length, max(length, 1)):
        out += block
    return bytes(out)


def repository_key(kind: str, captured_at: str, recording_id: str) -> str:
    """`<kind>/<YYYY>/<MM>/<DD>/<recording-id>.mseal`, the date from the RFC 3339 capture time (ValueError if not)."""
    try:
        return RepositoryKey.from_capture(kind, captured_at, recording_id).key
    except LocationError as e:
        raise ValueError(str(e)) from None
