"""Reading packages back out of a repository (`file:///dir` or `s3://bucket/prefix`), by key.

>>> src = open_source("s3://recordings/site-a")            # endpoint/credentials: the AWS chain
>>> await src.size("call/2026/11/28/rec-1.mseal")
>>> await src.read("call/2026/11/28/rec-1.mseal", 0, 65536)        # one ranged GET
>>> head, size = await src.read_head(key, 65536)       # first bytes and the size: one GET, no HEAD
>>> async for block in src.iter_read(key, offset, length, 1 << 20): ...   # one ranged GET, streamed
>>> async for obj in src.list("call/2026/"): obj.key, obj.size, obj.last_modified   # only *.mseal
>>> await src.close()
>>> split_url("s3://recordings/site-a/call/2026/11/28/rec-1.mseal")
('s3://recordings/site-a', 'call/2026/11/28/rec-1.mseal')

Keys are relative to the repository root, in the agent's layout `<kind>/<YYYY>/<MM>/<DD>/<id>.mseal`
(any relative key without empty, `.` or `..` segments is accepted). Reads are of ciphertext only;
nothing here decrypts or writes to disk. On S3, reads of a key are pinned to the ETag its `size()`
or `read_head()` saw (If-Match), so an object replaced mid-read (a re-wrap) fails cleanly instead of mixing versions.
Errors: SourceNotFoundError (no such package), SourceError (anything else, one line).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import os
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

__all__ = [
    "FileSource", "PackageSource", "S3Source", "SourceError", "SourceNotFoundError", "SourceObject",
    "open_source", "split_url",
]

SUFFIX = ".mseal"
_LAYOUT_TAIL = re.compile(r"(?:^|/)((?:call|screen|digital|transcript)/\d{4}/\d{2}/\d{2}/[^/]+\.mseal)$")


class SourceError(Exception):
    """A package could not be read from the repository."""


class SourceNotFoundError(SourceError):
    """No package under that key."""


@dataclass(frozen=True)
class SourceObject:
    key: str  # relative to the repository root
    size: int
    last_modified: datetime  # UTC


class PackageSource(Protocol):
    """A repository opened for reading. All methods are coroutines (or async iterators)."""

    url: str

    async def size(self, key: str) -> int: ...

    async def read(self, key: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the object, fewer only where the object ends."""
        ...

    def iter_read(self, key: str, offset: int, length: int, block: int) -> AsyncGenerator[bytes, None]:
        """The same range as blocks of exactly `block` bytes (the last may be shorter): one request."""
        ...

    async def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        """(the object's first `length` bytes, the object's size): one request on S3 (no HEAD)."""
        ...

    def list(self, prefix: str = "") -> AsyncGenerator[SourceObject, None]:
        """Every `.mseal` object whose key starts with `prefix`, in key order."""
        ...

    async def close(self) -> None: ...


def check_key(key: str) -> str:
    """`key` as a plain relative key (no leading slash, no empty/dot segments), else SourceError."""
    k = key.lstrip("/")
    if not k or any(seg in ("", ".", "..") for seg in k.split("/")) or "\x00" in k:
        raise SourceError(f"{key!r} is not a plain relative package key")
    return k


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")


def split_url(url: str) -> tuple[str, str]:
    """A single package's URL -> (repository URL, key).

    The repository root is where the agent's layout `<kind>/<YYYY>/<MM>/<DD>/<id>.mseal` starts; a
    path not in that layout is split at its last `/` (the object's directory is the repository).
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("s3", "file") or parsed.query or parsed.fragment:
        raise SourceError(f"not an s3://bucket/key or file:///path url: {url!r}")
    if parsed.scheme == "s3" and not parsed.netloc:
        raise SourceError(f"s3 url without a bucket: {url!r}")
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise SourceError(f"file url must be file:///absolute/path: {url!r}")
    path = unquote(parsed.path)
    m = _LAYOUT_TAIL.search(path)
    if m:
        root, key = path[: m.start(1)].rstrip("/"), m.group(1)
    else:
        root, _, key = path.rpartition("/")
    check_key(key)
    if any(seg in (".", "..") for seg in root.split("/")):
        raise SourceError(f"url has dot segments: {url!r}")
    base = f"s3://{parsed.netloc}" if parsed.scheme == "s3" else "file://"
    if parsed.scheme == "file":
        return f"file://{root or '/'}", key
    return (f"{base}/{root.strip('/')}" if root.strip("/") else base), key


def open_source(url: str, **s3_options: Any) -> PackageSource:
    """A source for `file:///abs/dir` or `s3://bucket/prefix`.

    `s3_options` are `uploader.s3.S3Options` fields (endpoint_url, region, profile, addressing_style,
    connect_timeout, read_timeout, ...); None values are dropped. A file:// url ignores them.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise SourceError(f"file url must be file:///absolute/dir: {url!r}")
        return FileSource(Path(unquote(parsed.path) or "/"))
    if parsed.scheme == "s3":
        return S3Source.from_url(url, **{k: v for k, v in s3_options.items() if v is not None})
    raise SourceError(f"repository url must be file:///dir or s3://bucket/prefix, not {url!r}")


# -- filesystem --------------------------------------------------------------------------------------


class FileSource:
    """A directory of packages (the filesystem repository's layout). Reads are `pread` in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def size(self, key: str) -> int:
        return (await self._stat(key)).st_size

    async def _stat(self, key: str) -> os.stat_result:
        p = self.path(key)
        try:
            st = await asyncio.to_thread(os.stat, p)
        except (FileNotFoundError, NotADirectoryError):  # no such key, or a key below a file
            raise SourceNotFoundError(f"no package {self.url}/{key}") from None
        except OSError as e:
            raise SourceError(f"cannot read {p}: {e.strerror}") from None
        if not os.path.isfile(p):
            raise SourceNotFoundError(f"no package {self.url}/{key} (not a file)")
        return st

    async def read(self, key: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        out = bytearray()
        async for block in self.iter_read(key, offset, length, max(length, 1)):
            out += block
        return bytes(out)

    async def iter_read(self, key: str, offset: int, length: int, block: int) -> AsyncGenerator[bytes, None]:
        _check_range(offset, length)
        if block <= 0:
            raise ValueError("block must be positive")
        p = self.path(key)
        try:
            fd = await asyncio.to_thread(os.open, p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise SourceNotFoundError(f"no package {self.url}/{key}") from None
        except OSError as e:
            raise SourceError(f"cannot read {p}: {e.strerror}") from None
        try:
            pos, end = offset, offset + length
            while pos < end:
                try:
                    data = await asyncio.to_thread(_pread_full, fd, min(block, end - pos), pos)
                except OSError as e:
                    raise SourceError(f"cannot read {p}: {e.strerror}") from None
                want = min(block, end - pos)
                if data:
                    yield data
                if len(data) < want:
                    return  # the file ends here
                pos += want
        finally:
            os.close(fd)

    async def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        size = await self.size(key)
        return await self.read(key, 0, min(length, size)), size

    async def list(self, prefix: str = "") -> AsyncGenerator[SourceObject, None]:
        for key, st in await asyncio.to_thread(self._walk, prefix):
            yield SourceObject(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, prefix: str) -> builtins.list[tuple[str, os.stat_result]]:
        found: list[tuple[str, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                if not name.endswith(SUFFIX) or name.startswith("."):  # ".name.tmp" staging files
                    continue
                key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((key, os.stat(os.path.join(dirpath, name))))
        found.sort()
        return found

    async def close(self) -> None:
        pass


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = os.pread(fd, n - got, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


# -- S3 ----------------------------------------------------------------------------------------------


class S3Source:
    """A bucket and prefix, read through one aioboto3 client made on first use.

    Retries: botocore's standard mode (3 attempts) for reads, which are idempotent. GetObject
    responses are not checksum-validated (ranged reads can't be); the package's AEAD is the check.
    """

    def __init__(self, bucket: str, prefix: str = "", **options: Any) -> None:
        from mediaseal.uploader.s3 import S3Options  # validates the options; imports aioboto3 only for S3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        known = {f.name for f in dataclasses.fields(S3Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SourceError(f"s3 source: unknown option(s) {', '.join(unknown)}")
        try:
            self.options = S3Options(**options)
        except Exception as e:  # PermanentRepositoryError naming the bad option
            raise SourceError(str(e)) from None
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self._etags: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Source:
        from mediaseal.uploader.base import RepositoryError
        from mediaseal.uploader.s3 import parse_s3_url

        try:
            bucket, prefix = parse_s3_url(url)
        except RepositoryError as e:
            raise SourceError(str(e)) from None
        return cls(bucket, prefix, **options)

    def object_key(self, key: str) -> str:
        k = check_key(key)
        return f"{self.prefix}/{k}" if self.prefix else k

    async def _get_client(self) -> Any:
        async with self._lock:
            if self._client is None:
                import aioboto3
                from aiobotocore.config import AioConfig
                from botocore.exceptions import BotoCoreError

                o = self.options
                s3cfg = {"addressing_style": o.addressing_style} if o.addressing_style else {}
                config = AioConfig(connect_timeout=o.connect_timeout, read_timeout=o.read_timeout,
                                   retries={"total_max_attempts": 3, "mode": "standard"},
                                   request_checksum_calculation="when_required",
                                   response_checksum_validation="when_required", s3=s3cfg)
                stack = contextlib.AsyncExitStack()
                try:
                    session = aioboto3.Session(profile_name=o.profile, region_name=o.region)
                    self._client = await stack.enter_async_context(
                        session.client("s3", endpoint_url=o.endpoint_url, config=config))
                except (BotoCoreError, ValueError) as e:
                    await stack.aclose()
                    raise SourceError(f"s3 source {self.url}: {e}") from None
                self._stack = stack
            return self._client

    def _error(self, op: str, key: str, e: BaseException) -> SourceError:
        from botocore.exceptions import ClientError

        where = f"s3://{self.bucket}/{self.object_key(key)}" if key else self.url
        if isinstance(e, ClientError):
            err = e.response.get("Error", {}) or {}
            code = str(err.get("Code") or "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return SourceNotFoundError(f"no package {where}")
            if code in ("PreconditionFailed", "412"):
                return SourceError(f"s3 {op} {where}: the object changed while it was being read")
            msg = str(err.get("Message") or "").strip()
            return SourceError(f"s3 {op} {where}: {code}" + (f" ({msg})" if msg and msg != code else ""))
        return SourceError(f"s3 {op} {where}: {e}")

    def _errors(self) -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError, OSError, asyncio.TimeoutError)

    async def size(self, key: str) -> int:
        client = await self._get_client()
        okey = self.object_key(key)
        try:
            head = await client.head_object(Bucket=self.bucket, Key=okey)
        except self._errors() as e:
            raise self._error("HeadObject", key, e) from None
        self._remember(okey, str(head.get("ETag") or ""))
        return int(head["ContentLength"])

    async def read(self, key: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        out = bytearray()
        async for block in self.iter_read(key, offset, length, max(length, 1)):
            out += block
        return bytes(out)

    async def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        if length <= 0:
            raise ValueError("length must be positive")
        client = await self._get_client()
        okey = self.object_key(key)
        try:
            resp = await client.get_object(Bucket=self.bucket, Key=okey, Range=f"bytes=0-{length - 1}")
            async with resp["Body"] as body:
                data = await body.read()
        except self._errors() as e:
            from botocore.exceptions import ClientError

            if isinstance(e, ClientError) and (e.response.get("Error", {}) or {}).get("Code") == "InvalidRange":
                return b"", await self.size(key)  # an empty object
            raise self._error("GetObject", key, e) from None
        self._remember(okey, str(resp.get("ETag") or ""))
        total = str(resp.get("ContentRange") or "").rpartition("/")[2]
        return bytes(data), int(total) if total.isdigit() else len(data)

    def _remember(self, okey: str, etag: str) -> None:
        self._etags.pop(okey, None)
        self._etags[okey] = etag
        while len(self._etags) > 4096:  # a long-running server reads many keys: keep the newest
            del self._etags[next(iter(self._etags))]

    async def iter_read(self, key: str, offset: int, length: int, block: int) -> AsyncGenerator[bytes, None]:
        _check_range(offset, length)
        if block <= 0:
            raise ValueError("block must be positive")
        if length == 0:
            return
        client = await self._get_client()
        okey = self.object_key(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": okey, "Range": f"bytes={offset}-{offset + length - 1}"}
        if self._etags.get(okey):
            args["IfMatch"] = self._etags[okey]
        try:
            resp = await client.get_object(**args)
        except self._errors() as e:
            from botocore.exceptions import ClientError

            if isinstance(e, ClientError) and (e.response.get("Error", {}) or {}).get("Code") == "InvalidRange":
                return  # the range starts at or past the end: nothing there
            raise self._error("GetObject", key, e) from None
        body = resp["Body"]
        buf = bytearray()
        try:
            async with body:
                while True:
                    try:
                        data = await body.read(min(1 << 20, max(block - len(buf), 1 << 16)))
                    except self._errors() as e:
                        raise self._error("GetObject", key, e) from None
                    if not data:
                        break
                    buf += data
                    while len(buf) >= block:
                        piece = bytes(buf[:block])
                        del buf[:block]
                        yield piece
            if buf:
                yield bytes(buf)
        finally:
            body.close()

    async def list(self, prefix: str = "") -> AsyncGenerator[SourceObject, None]:
        client = await self._get_client()
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix.lstrip("/")):
                for obj in page.get("Contents", []) or []:
                    k = str(obj["Key"])
                    if k.endswith(SUFFIX) and k.startswith(base):
                        lm = obj.get("LastModified")
                        yield SourceObject(k[len(base):], int(obj.get("Size", 0)),
                                           lm if isinstance(lm, datetime) else datetime.now(UTC))
        except self._errors() as e:
            raise self._error("ListObjectsV2", "", e) from None

    async def close(self) -> None:
        async with self._lock:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
