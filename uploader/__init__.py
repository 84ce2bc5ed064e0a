"""Repositories: where packages go (filesystem, S3), the confirm contract they share, and their read side."""

from __future__ import annotations

from typing import Any

from mediaseal.plumbing.locations import RepositoryURL
from mediaseal.uploader.base import (
    HeaderRewriter,
    PackageNotFoundError,
    PackageReader,
    PermanentRepositoryError,
    ReadableRepository,
    Receipt,
    Repository,
    RepositoryError,
    StoredObject,
    TransientRepositoryError,
    Upload,
    repository_key,
    repository_location,
)
from mediaseal.uploader.breaker import CircuitBreaker
from mediaseal.uploader.filesystem import FilesystemRepository

__all__ = [
    "CircuitBreaker", "FilesystemRepository", "HeaderRewriter", "PackageNotFoundError", "PackageReader",
    "PermanentRepositoryError", "Receipt", "ReadableRepository", "Repository", "RepositoryError", "StoredObject",
    "TransientRepositoryError", "Upload", "open_reader", "open_repository", "repository_key",
]


def _open(url: str, options: dict[str, Any], *, reading: bool) -> ReadableRepository:
    return open_location(repository_location(url), options, reading=reading)


def open_location(where: RepositoryURL, options: dict[str, Any], *, reading: bool) -> ReadableRepository:
    """The repository at a parsed location (see open_repository / open_reader)."""
    if where.scheme == "file":
        assert where.path is not None
        return FilesystemRepository(where.path)
    import dataclasses

    from mediaseal.plumbing import s3 as s3io
    from mediaseal.uploader.s3 import S3Options, S3Repository  # aioboto3 is imported on first use of S3

    known = {f.name for f in dataclasses.fields(S3Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PermanentRepositoryError(f"s3 repository: unknown option(s) {', '.join(unknown)}")
    return S3Repository(where.bucket, where.prefix, S3Options(**options),
                        retries=s3io.COMMAND if reading else s3io.AGENT)


def open_repository(url: str, **options: Any) -> ReadableRepository:
    """A repository to deliver to, for `file:///abs/path` (or a path) or `s3://bucket/prefix`.

    `options` are `uploader.s3.S3Options` fields (endpoint_url, region, profile, storage_class, sse,
    sse_kms_key_id, part_size, put_threshold, concurrency, ...), so the agent can pass its whole
    `[repository]` table: `open_repository(**dataclasses.asdict(config.repository))`. A file:// url
    ignores them. An unknown option or an invalid value is a PermanentRepositoryError naming it.
    S3 requests are made once each (plumbing.s3.AGENT): the agent's breaker does the backing off.
    """
    return _open(url, options, reading=False)


def open_reader(url: str, **options: Any) -> ReadableRepository:
    """The same repository opened by a command that reads (or re-wraps) it: None options are dropped,
    and S3 requests are retried by botocore (plumbing.s3.COMMAND), as nothing above backs off."""
    return _open(url, {k: v for k, v in options.items() if v is not None}, reading=True)
