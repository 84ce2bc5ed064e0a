"""Repositories: where packages go (filesystem, S3) and the confirm contract they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mediaseal.uploader.base import (
    PermanentRepositoryError,
    Receipt,
    Repository,
    RepositoryError,
    TransientRepositoryError,
    Upload,
    repository_key,
)
from mediaseal.uploader.breaker import CircuitBreaker
from mediaseal.uploader.filesystem import FilesystemRepository

__all__ = [
    "CircuitBreaker", "FilesystemRepository", "PermanentRepositoryError", "Receipt", "Repository", "RepositoryError",
    "TransientRepositoryError", "Upload", "open_repository", "repository_key",
]


def open_repository(url: str, **options: Any) -> Repository:
    """A repository for `file:///abs/path` or `s3://bucket/prefix`.

    `options` are `uploader.s3.S3Options` fields (endpoint_url, region, profile, storage_class, sse,
    sse_kms_key_id, part_size, put_threshold, concurrency, ...), so the agent can pass its whole
    `[repository]` table: `open_repository(**dataclasses.asdict(config.repository))`. A file:// url
    ignores them. An unknown option or an invalid value is a PermanentRepositoryError naming it.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FilesystemRepository(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        import dataclasses

        from mediaseal.uploader.s3 import S3Options, S3Repository  # imports aioboto3: only when S3 is used

        known = {f.name for f in dataclasses.fields(S3Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PermanentRepositoryError(f"s3 repository: unknown option(s) {', '.join(unknown)}")
        return S3Repository.from_url(url, S3Options(**options))
    raise PermanentRepositoryError(f"repository url scheme {parsed.scheme!r} is not supported")
