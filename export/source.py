"""Reading packages back out of a repository (a path, `file:///dir` or `s3://bucket/prefix`), by key.

>>> src = open_source("s3://recordings/site-a")            # endpoint/credentials: the AWS chain
>>> await src.size("call/2026/11/28/rec-1.mseal")
>>> await src.read("call/2026/11/28/rec-1.mseal", 0, 65536)        # one ranged GET
>>> head, size = await src.read_head(key, 65536)       # first bytes and the size: one GET, no HEAD
>>> async for block in src.iter_read(key, offset, length, 1 << 20): ...   # one ranged GET, streamed
>>> async for obj in src.list("call/2026/"): obj.key, obj.size, obj.last_modified   # only *.mseal
>>> await src.close()
>>> split_url("s3://recordings/site-a/call/2026/11/28/rec-1.mseal")
('s3://recordings/site-a', 'call/2026/11/28/rec-1.mseal')

A source is the uploader's repository opened for reading (`uploader.open_reader`: the read side of
FilesystemRepository and S3Repository, with the command retry policy), so the layout, the S3 client,
its error translation and the ETag pinning exist once; this module only names them for the reading
side. Keys are relative to the repository root, in the agent's layout `<kind>/<YYYY>/<MM>/<DD>/<id>.mseal`
(any plain relative key is accepted). Reads are of ciphertext only; nothing here decrypts or writes.
Errors: SourceNotFoundError (no such package), SourceError (anything else, one line): the uploader's
PackageNotFoundError and RepositoryError.
"""

from __future__ import annotations

from typing import Any

from mediaseal.plumbing.locations import LocationError, check_relative_key, split_package_url
from mediaseal.uploader import (
    PackageNotFoundError,
    PackageReader,
    PermanentRepositoryError,
    ReadableRepository,
    RepositoryError,
    StoredObject,
    open_reader,
)

__all__ = [
    "PackageSource", "SourceError", "SourceNotFoundError", "SourceObject", "check_key", "open_source", "split_url",
]

# The reading side's names for the uploader's read-side types (one definition, in uploader.base).
PackageSource = PackageReader
SourceError = RepositoryError
SourceNotFoundError = PackageNotFoundError
SourceObject = StoredObject


def check_key(key: str) -> str:
    """`key` as a plain relative key (no leading slash, no empty/dot segments), else SourceError."""
    try:
        return check_relative_key(key)
    except LocationError as e:
        raise PermanentRepositoryError(str(e)) from None


def split_url(url: str) -> tuple[str, str]:
    """A single package's URL -> (repository URL, key) (plumbing.locations.split_package_url)."""
    try:
        repository, key = split_package_url(url)
    except LocationError as e:
        raise PermanentRepositoryError(str(e)) from None
    return str(repository), key


def open_source(url: str, **s3_options: Any) -> ReadableRepository:
    """A source for `file:///abs/dir` or `s3://bucket/prefix`.

    `s3_options` are `uploader.s3.S3Options` fields (endpoint_url, region, profile, addressing_style,
    connect_timeout, read_timeout, ...); None values are dropped. A file:// url ignores them.
    """
    return open_reader(url, **s3_options)
