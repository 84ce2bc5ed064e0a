"""The S3 repository: packages as objects in a bucket, through aioboto3.

>>> repo = S3Repository.from_url("s3://recordings/site-a", S3Options(region="eu-west-1", sse="aws:kms"))
>>> receipt = await repo.put(upload)     # objects land at `site-a/<kind>/<YYYY>/<MM>/<DD>/<id>.mseal`
>>> await repo.abort_orphans(known_upload_ids)   # at start-up
>>> await repo.close()

What `put` does, and what a Receipt means here:

- Below `put_threshold`: one PutObject carrying `x-amz-checksum-sha256` (the base64 of the package's
  SHA-256, the value the agent computed from the spool file and recorded in the manifest before the
  first attempt).
- Above it: a multipart upload created with ChecksumAlgorithm=SHA256; each part carries its own
  SHA-256; the part size is raised (in whole MiB) so no package needs more than `max_parts` parts.
  Parts are read from the spool file with `preadv` into per-part buffers; at most `concurrency`
  part buffers exist per repository (all uploads share them), so in-flight bytes stay at or below
  `concurrency x max(part size, put_threshold)`.
- Resumable: the upload id, then every completed part's number/ETag/SHA-256/size, are handed to
  `upload.save` as they complete (the agent writes them into the recording's manifest). Given that
  state again, `put` lists the parts, keeps those whose size and checksum still match the bytes on
  disk (re-read and re-hashed), sends the rest and completes. A vanished upload id starts over.
- Every byte sent is hashed again on the way out: the full-object SHA-256 of what was read must
  equal `upload.sha256` (else PermanentRepositoryError: a spool file that is not what was sealed is
  never delivered), and what the repository reports must equal what was sent:
  * the per-request checksum S3 verifies itself (a mismatch is BadDigest: the part is re-sent);
  * the MD5 ETag of each request, for stores that do not verify checksums (moto does not), unless
    the response says SSE-KMS / SSE-C (whose ETags are not MD5s) or `verify_etag=False`;
  * HEAD with ChecksumMode=ENABLED: size, and the SHA-256 (single PUT) or the composite
    `b64(sha256(part digests))-N` (multipart; a value without the `-N` suffix is accepted too).
  Only then does the Receipt carry `upload.sha256`. A verification mismatch is transient (re-send).
- Errors: plumbing.s3.translate classifies every failure (connection refused/reset, timeouts, 5xx,
  SlowDown/throttling, RequestTimeout, BadDigest -> transient; AccessDenied, NoSuchBucket, bad
  credentials, KMS key problems, other 4xx -> permanent); here they become Transient- or
  PermanentRepositoryErrors keeping S3's code (`e.code`). A HEAD of an object that is not there yet
  is transient (send it again). Retries: plumbing.s3.AGENT for delivery (botocore's own retries are
  off: the agent backs off), plumbing.s3.COMMAND for a repository opened for reading by a command.
- Reads (the PackageReader side): HEAD, ranged and streamed GETs pinned to the ETag that `size()` or
  `read_head()` saw (If-Match), so an object replaced mid-read (a re-wrap) fails cleanly instead of
  mixing versions; listing of `*.mseal` objects. GetObject responses are not checksum-validated
  (ranged reads can't be); the package's AEAD is the check. Not found is PackageNotFoundError.
- `rewrite_head` (re-wrap): the object rewritten with a new header, the body streamed from a GET
  pinned to the ETag read (single PUT up to one part, multipart above), its metadata kept.

Credentials and endpoint come from the standard chain: `endpoint_url` when set, else botocore's own
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / profile `endpoint_url`; `profile` or the default chain
(environment, shared files, SSO, container and instance roles) for credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mediaseal.plumbing import s3 as s3io
from mediaseal.plumbing.locations import SUFFIX, LocationError, RepositoryURL
from mediaseal.uploader.base import (
    PackageNotFoundError,
    PermanentRepositoryError,
    Receipt,
    RepositoryError,
    StoredObject,
    TransientRepositoryError,
    Upload,
    check_range,
    read_all,
    repository_location,
)

__all__ = [
    "MAX_PARTS", "MIN_PART_SIZE", "S3Options", "S3Repository",
    "parse_s3_url", "plan_part_size",
]

T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30
MIN_PART_SIZE = 5 * MiB  # S3: every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PUT_SIZE = 5 * GiB
MAX_PARTS = 10_000
_SEND_ATTEMPTS = 3  # a request whose bytes the repository reports differently is re-sent this often per put

_DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_MISMATCH_CODES = frozenset({"SizeMismatch", "ChecksumMismatch", "NoSuchKey"})  # verification said: not it
_SPOOL_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


@dataclass(frozen=True)
class S3Options:
    """How to reach and write the bucket. Field names match the agent's `[repository]` keys."""

    endpoint_url: str | None = None  # None: botocore's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / config
    region: str | None = None
    profile: str | None = None
    storage_class: str | None = None  # e.g. STANDARD_IA; None: the bucket's default
    sse: str | None = None  # None | "AES256" | "aws:kms"
    sse_kms_key_id: str | None = None  # with sse = "aws:kms"; None: the account's aws/s3 key
    part_size: int = 16 * MiB  # raised per package as needed to stay within max_parts
    put_threshold: int = 64 * MiB  # packages up to this size go in one PutObject
    concurrency: int = 4  # part buffers in flight, per repository (shared by concurrent puts)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # a silent peer for this long fails the request (transient)
    # A request carrying a body must finish within connect + read timeouts + body / min_send_rate:
    # aiohttp's read timeout only starts once the body is written, so a peer that stops reading
    # mid-body (TCP window shut) would otherwise hold the request forever.
    min_send_rate: int = 64 * 1024  # bytes per second
    addressing_style: str | None = None  # "path" | "virtual" | None (botocore decides)
    max_parts: int = MAX_PARTS
    verify_etag: bool = True  # compare MD5 ETags (not for stores whose non-KMS ETags aren't MD5s)

    def __post_init__(self) -> None:
        def bad(msg: str) -> PermanentRepositoryError:
            return PermanentRepositoryError(f"s3 repository: {msg}")

        if self.sse not in (None, "AES256", "aws:kms"):
            raise bad(f"sse must be AES256 or aws:kms, not {self.sse!r}")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise bad("sse_kms_key_id needs sse = \"aws:kms\"")
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise bad(f"part_size must be between 5 MiB and 5 GiB, not {self.part_size}")
        if not 0 <= self.put_threshold <= MAX_PUT_SIZE:
            raise bad(f"put_threshold must be between 0 and 5 GiB, not {self.put_threshold}")
        if self.concurrency < 1:
            raise bad(f"concurrency must be at least 1, not {self.concurrency}")
        if not 1 <= self.max_parts <= MAX_PARTS:
            raise bad(f"max_parts must be between 1 and {MAX_PARTS}, not {self.max_parts}")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise bad(f"addressing_style must be path or virtual, not {self.addressing_style!r}")
        if self.connect_timeout <= 0 or self.read_timeout <= 0 or self.min_send_rate <= 0:
            raise bad("timeouts and min_send_rate must be positive")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix") (plumbing.locations); the prefix may be empty."""
    where = repository_location(url)
    if where.scheme != "s3":
        raise PermanentRepositoryError(f"not an s3://bucket/prefix url: {url!r}")
    return where.bucket, where.prefix


def plan_part_size(size: int, part_size: int, max_parts: int = MAX_PARTS) -> int:
    """The part size for a package of `size` bytes: `part_size`, raised to whole MiB so that the
    package needs at most `max_parts` parts."""
    ps = max(part_size, MIN_PART_SIZE)
    if -(-size // ps) > max_parts:
        ps = -(-size // max_parts)
        ps = -(-ps // MiB) * MiB
    if ps > MAX_PART_SIZE:
        raise PermanentRepositoryError(f"a {size}-byte package does not fit in {max_parts} parts of <= 5 GiB")
    return ps


@dataclass
class _Part:
    number: int
    etag: str
    digest: bytes  # raw SHA-256 of the part
    md5: str | None  # hex MD5 of the part, when ETags are checked
    size: int

    @property
    def b64(self) -> str:
        return _b64(self.digest)


class S3Repository:
    """A bucket (and a key prefix) holding packages. One aioboto3 client, created on first use.

    `retries`: plumbing.s3.AGENT (the default: the agent's deliveries, which back off themselves) or
    plumbing.s3.COMMAND (a command reading or re-wrapping, with no backoff of its own).
    """

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None, *,
                 retries: s3io.Retries = s3io.AGENT) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = o = options or S3Options()
        self.settings = s3io.ClientSettings(
            endpoint_url=o.endpoint_url, region=o.region, profile=o.profile, connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout, retries=retries, addressing_style=o.addressing_style,
            max_pool_connections=max(10, 2 * o.concurrency), payload_signing=False)
        try:
            self._client = s3io.LazyClient(self.settings)
        except s3io.S3Error as e:
            raise _repository_error(e) from None
        self._requests = s3io.S3Bucket(None, bucket, settings=self.settings, min_send_rate=o.min_send_rate)
        self._slots = asyncio.Semaphore(self.options.concurrency)
        self._want_md5 = self.options.verify_etag and self.options.sse != "aws:kms"
        self._etags: dict[str, str] = {}  # object key -> the ETag reads are pinned to
        self._root = RepositoryURL("s3", bucket=bucket, prefix=self.prefix)

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None, *,
                 retries: s3io.Retries = s3io.AGENT) -> S3Repository:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, options, retries=retries)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, key: str) -> str:
        try:
            return self._root.object_key(key)
        except LocationError as e:
            raise PermanentRepositoryError(str(e)) from None

    # -- the Repository protocol ----------------------------------------------------------------

    def needs_digest(self, path: Path) -> bool:
        """Always: every request carries its SHA-256 and the object is confirmed by checksum."""
        return True

    async def put(self, upload: Upload) -> Receipt:
        if upload.sha256 is None:
            raise ValueError("an S3 delivery needs the package's SHA-256 (needs_digest is True)")
        okey = self.object_key(upload.key)
        await self._io(upload.path, _check_size, upload.path, upload.size)
        client = await self._get_client()
        if upload.size <= self.options.put_threshold:
            return await self._put_single(client, upload, okey)
        return await _Multipart(self, client, upload, okey).run()

    async def close(self) -> None:
        await self._client.close()

    async def probe(self) -> str:
        """One ListMultipartUploads under the prefix (a permission the start-up orphan sweep needs anyway;
        HeadBucket would need s3:ListBucket and answers a missing bucket with a bare 404): NoSuchBucket,
        AccessDenied and connection failures come back as RepositoryError naming them. Aborts nothing."""
        client = await self._get_client()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "MaxUploads": 1}
        if self.prefix:
            kwargs["Prefix"] = self.prefix + "/"
        await self._call("ListMultipartUploads", self.url, client.list_multipart_uploads(**kwargs))
        return "the bucket answers"

    # -- start-up housekeeping ----------------------------------------------------------------------

    async def abort_orphans(self, known_upload_ids: Collection[str], *,
                            initiated_before: datetime | None = None) -> list[str]:
        """Abort the multipart uploads under this prefix whose id is not in `known_upload_ids` (the
        ids the spool's manifests hold: `state["upload_id"]`), optionally only those initiated before a
        (timezone-aware) time: when other agents write under the same prefix, their in-progress uploads
        are not this agent's to end. Call it before deliveries start.
        Returns the aborted upload ids."""
        client = await self._get_client()
        known = set(known_upload_ids)
        aborted: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.prefix:
            kwargs["Prefix"] = self.prefix + "/"
        while True:
            page = await self._call("ListMultipartUploads", self.url, client.list_multipart_uploads(**kwargs))
            for u in page.get("Uploads", []):
                if u["UploadId"] in known:
                    continue
                if initiated_before is not None and u.get("Initiated") and u["Initiated"] >= initiated_before:
                    continue
                try:
                    await self._call("AbortMultipartUpload", u["Key"], client.abort_multipart_upload(
                        Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]))
                except TransientRepositoryError as e:
                    if e.code != "NoSuchUpload":
                        raise
                aborted.append(u["UploadId"])
            if not page.get("IsTruncated") or not page.get("NextKeyMarker"):
                return aborted
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    # -- the read side (PackageReader) ------------------------------------------------------------------

    async def _read_call(self, op: str, okey: str, aw: Awaitable[T]) -> T:
        """A read request: not found is PackageNotFoundError, a changed object says so."""
        try:
            return await self._requests.call(op, okey, aw)
        except s3io.S3Error as e:
            raise self._read_error(op, okey, e) from None

    def _read_error(self, op: str, okey: str, e: s3io.S3Error) -> RepositoryError:
        where = self._where(okey)
        if isinstance(e, s3io.S3NotFoundError):
            return PackageNotFoundError(f"no package {where}")
        if e.code in ("PreconditionFailed", "412"):
            return TransientRepositoryError(f"s3 {op} {where}: the object changed while it was being read", e.code)
        return (TransientRepositoryError if e.transient else PermanentRepositoryError)(str(e), e.code)

    def location(self, key: str) -> str:
        return self._where(self.object_key(key))

    def _remember(self, okey: str, etag: str) -> None:
        self._etags.pop(okey, None)
        self._etags[okey] = etag
        while len(self._etags) > 4096:  # a long-running server reads many keys: keep the newest
            del self._etags[next(iter(self._etags))]

    async def size(self, key: str) -> int:
        okey = self.object_key(key)
        client = await self._get_client()
        head = await self._read_call("HeadObject", okey, client.head_object(Bucket=self.bucket, Key=okey))
        self._remember(okey, str(head.get("ETag") or ""))
        return int(head["ContentLength"])

    async def read(self, key: str, offset: int, length: int) -> bytes:
        return await read_all(self, key, offset, length)

    async def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        if length <= 0:
            raise ValueError("length must be positive")
        okey = self.object_key(key)
        client = await self._get_client()
        try:
            resp = await self._requests.call("GetObject", okey, client.get_object(
                Bucket=self.bucket, Key=okey, Range=f"bytes=0-{length - 1}"))
            async with resp["Body"] as body:
                data = await self._requests.call("GetObject", okey, body.read())
        except s3io.S3Error as e:
            if e.code == "InvalidRange":
                return b"", await self.size(key)  # an empty object
            raise self._read_error("GetObject", okey, e) from None
        self._remember(okey, str(resp.get("ETag") or ""))
        total = str(resp.get("ContentRange") or "").rpartition("/")[2]
        return bytes(data), int(total) if total.isdigit() else len(data)

    async def iter_read(self, key: str, offset: int, length: int, block: int) -> AsyncGenerator[bytes, None]:
        check_range(offset, length, block)
        if length == 0:
            return
        okey = self.object_key(key)
        async for piece in self._stream(okey, offset, offset + length - 1, block, self._etags.get(okey)):
            yield piece

    async def _stream(self, okey: str, first: int, last: int | None, block: int,
                      etag: str | None) -> AsyncGenerator[bytes, None]:
        """Bytes first..last (None: to the end) of the object, in blocks of `block` (the last shorter),
        from one GET, If-Match `etag` when given."""
        client = await self._get_client()
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": okey,
                                "Range": f"bytes={first}-" + ("" if last is None else str(last))}
        if etag:
            args["IfMatch"] = etag
        try:
            resp = await self._requests.call("GetObject", okey, client.get_object(**args))
        except s3io.S3Error as e:
            if e.code == "InvalidRange":
                return  # the range starts at or past the end: nothing there
            raise self._read_error("GetObject", okey, e) from None
        body = resp["Body"]
        buf = bytearray()
        try:
            async with body:
                while True:
                    data = await self._read_call("GetObject", okey,
                                                 body.read(min(1 << 20, max(block - len(buf), 1 << 16))))
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

    async def list(self, prefix: str = "") -> AsyncGenerator[StoredObject, None]:
        client = await self._get_client()
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=base + prefix.lstrip("/")).__aiter__()
        while True:
            try:
                page = await self._requests.call("ListObjectsV2", self.url, pages.__anext__())
            except StopAsyncIteration:
                return
            except s3io.S3Error as e:
                raise self._read_error("ListObjectsV2", self.url, e) from None
            for obj in page.get("Contents", []) or []:
                k = str(obj["Key"])
                if k.endswith(SUFFIX) and k.startswith(base) and not k.rsplit("/", 1)[-1].startswith("."):
                    lm = obj.get("LastModified")
                    yield StoredObject(k[len(base):], int(obj.get("Size", 0)),
                                       lm if isinstance(lm, datetime) else datetime.now(UTC))

    async def rewrite_head(self, key: str, old_head: int, new_head: bytes, *, part_size: int = 16 * MiB) -> None:
        """Rewrite the object with `new_head` in place of its first `old_head` bytes, streaming: at most one
        part in memory, nothing on disk. Its metadata, content type, storage class and encryption are kept;
        a `package-sha256` in its metadata is recomputed (a first pass hashes the stream). Every GET is
        pinned to the ETag of the version whose header was read."""
        okey = self.object_key(key)
        client = await self._get_client()
        info = await self._read_call("HeadObject", okey, client.head_object(Bucket=self.bucket, Key=okey))
        etag = self._etags.get(okey) or str(info["ETag"])
        if str(info["ETag"]) != etag:
            raise TransientRepositoryError(
                f"s3 HeadObject {self._where(okey)}: the object changed while it was being read", "PreconditionFailed")
        args: dict[str, Any] = {k: info[k] for k in _COPIED if info.get(k)}
        if args.get("StorageClass") == "STANDARD":
            del args["StorageClass"]
        if "package-sha256" in args.get("Metadata", {}):
            digest = hashlib.sha256(new_head)
            async for block in self._stream(okey, old_head, None, part_size, etag):
                digest.update(block)
            args["Metadata"] = {**args["Metadata"], "package-sha256": digest.hexdigest()}
        upload = s3io.StreamingUpload(self._bucket(client), okey, part_size, args)
        try:
            await upload.write(new_head)
            async for block in self._stream(okey, old_head, None, part_size, etag):
                await upload.write(block)
            await upload.finish()
        except s3io.S3Error as e:
            await upload.abort()
            raise self._read_error("rewrite", okey, e) from None
        except BaseException:
            await upload.abort()
            raise
        self._etags.pop(okey, None)

    # -- single PUT -----------------------------------------------------------------------------------

    async def _put_single(self, client: Any, upload: Upload, okey: str) -> Receipt:
        last: RepositoryError | None = None
        md5: str | None = None
        b64 = ""
        async with self._slots:  # the whole body is one buffer
            for _ in range(_SEND_ATTEMPTS):
                data = await self._io(upload.path, _read_range, upload.path, 0, upload.size)
                digest, md5 = await asyncio.to_thread(_digests, data, self._want_md5)
                _check_sealed_hash(upload, digest.hex())
                b64 = _b64(digest)
                try:
                    resp = await self._call("PutObject", okey, client.put_object(
                        Bucket=self.bucket, Key=okey, Body=data, ContentLength=upload.size,
                        ChecksumAlgorithm="SHA256", ChecksumSHA256=b64, **self._object_args(upload)),
                        body=upload.size)
                except TransientRepositoryError as e:
                    if e.code not in _DIGEST_CODES:
                        raise
                    last = e
                    continue
                finally:
                    del data
                problem = self._echo_problem(resp, b64, md5)
                if problem is None:
                    last = None
                    break
                last = TransientRepositoryError(f"s3 PutObject {self._where(okey)}: {problem}", "ChecksumMismatch")
        if last is not None:
            raise last
        return await self._verify(client, upload, okey, b64, None, md5)

    # -- shared pieces ------------------------------------------------------------------------------

    def _object_args(self, upload: Upload) -> dict[str, Any]:
        args: dict[str, Any] = {
            "ContentType": "application/octet-stream",
            "Metadata": {**upload.metadata, "package-sha256": upload.sha256},
        }
        if self.options.storage_class:
            args["StorageClass"] = self.options.storage_class
        return {**args, **s3io.sse_args(self.options.sse, self.options.sse_kms_key_id)}

    def _etag_is_md5(self, resp: dict[str, Any]) -> bool:
        sse = str(resp.get("ServerSideEncryption") or "")
        return self.options.verify_etag and not sse.startswith("aws:kms") and not resp.get("SSECustomerAlgorithm")

    def _echo_problem(self, resp: dict[str, Any], b64: str, md5: str | None) -> str | None:
        """What is wrong with a PutObject/UploadPart answer, judged against what was sent."""
        echoed = resp.get("ChecksumSHA256")
        if echoed is not None and echoed != b64:
            return f"the repository computed SHA-256 {echoed}, sent {b64}"
        etag = str(resp.get("ETag") or "").strip('"')
        if md5 is not None and self._etag_is_md5(resp) and etag != md5:
            return f"ETag {etag} is not the MD5 of the bytes sent ({md5}): altered on the way"
        return None

    async def _verify(self, client: Any, upload: Upload, okey: str, checksum: str, parts: int | None,
                      md5_etag: str | None) -> Receipt:
        """HEAD the object; size and checksum (and MD5 ETag where meaningful) must match what was sent."""
        where = self._where(okey)
        head = await self._call("HeadObject", okey, client.head_object(
            Bucket=self.bucket, Key=okey, ChecksumMode="ENABLED"))
        if head.get("ContentLength") != upload.size:
            raise TransientRepositoryError(f"s3 verify {where}: holds {head.get('ContentLength')} bytes, "
                                           f"sent {upload.size}", "SizeMismatch")
        checked = False
        got = head.get("ChecksumSHA256")
        if got is not None:
            value, dash, count = str(got).partition("-")
            expected = checksum if parts is None else f"{checksum}-{parts}"
            if value != checksum or (dash and count != str(parts)):
                raise TransientRepositoryError(f"s3 verify {where}: checksum {got}, sent {expected}",
                                               "ChecksumMismatch")
            checked = True
        if md5_etag is not None and self._etag_is_md5(head):
            etag = str(head.get("ETag") or "").strip('"')
            if etag != md5_etag:
                raise TransientRepositoryError(f"s3 verify {where}: ETag {etag}, the bytes sent give {md5_etag}",
                                               "ChecksumMismatch")
            checked = True
        if not checked:
            raise PermanentRepositoryError(f"s3 verify {where}: the repository reports neither a SHA-256 checksum nor "
                                           "an MD5 ETag, so the object cannot be verified", "Unverifiable")
        return Receipt(upload.size, upload.sha256)

    async def _get_client(self) -> Any:
        try:
            return await self._client.get()
        except s3io.S3Error as e:
            raise _repository_error(e) from None

    def _bucket(self, client: Any) -> s3io.S3Bucket:
        return s3io.S3Bucket(client, self.bucket, settings=self.settings, min_send_rate=self.options.min_send_rate)

    async def _call(self, op: str, key: str, aw: Awaitable[T], body: int | None = None) -> T:
        """Await a botocore call, turning its failures into repository errors. A call sending `body`
        bytes is also bounded in time as a whole (see S3Options.min_send_rate)."""
        try:
            return await self._requests.call(op, key, aw, body)
        except s3io.S3Error as e:
            raise _repository_error(e) from None

    async def _io(self, path: Path, fn: Callable[..., T], *args: Any) -> T:
        """Run a spool file read in a thread, turning OS errors into repository errors."""
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            cls = PermanentRepositoryError if e.errno in _SPOOL_PERMANENT_ERRNOS else TransientRepositoryError
            raise cls(f"spool file {path}: {e.strerror or e}") from None

    def _where(self, target: str) -> str:
        return target if target.startswith("s3://") else f"s3://{self.bucket}/{target}"


class _Multipart:
    """One multipart put: resume or create, send parts, complete, verify."""

    def __init__(self, repo: S3Repository, client: Any, upload: Upload, okey: str) -> None:
        self.repo, self.client, self.upload, self.okey = repo, client, upload, okey
        self.where = repo._where(okey)
        self.state: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def run(self) -> Receipt:
        up = self.upload
        state = self._resumable(up.state)
        if state is not None and state.get("completed"):
            # A previous attempt completed the upload; if the object is what the spool holds, done.
            self.state = state
            parts, full = await self._parts(verify_only=True)
            _check_sealed_hash(up, full)
            try:
                return await self._verify(parts)
            except TransientRepositoryError as e:
                if e.code not in _MISMATCH_CODES:
                    raise
            state = None  # not there, or not these bytes: upload again
        listed: dict[int, dict[str, Any]] = {}
        if state is not None:
            self.state = state
            try:
                listed = await self._list_parts()
            except TransientRepositoryError as e:
                if e.code != "NoSuchUpload":
                    raise
                state = None  # aborted or expired: start over
        if state is None:
            await self._create()
        parts, full = await self._parts(listed=listed)
        if full != up.sha256:
            await self._abort_quietly()
            await self._save({})
            _check_sealed_hash(up, full)
        try:
            await self._requests().complete([s3io.Part(p.number, p.etag, p.b64, p.size) for p in parts])
        except TransientRepositoryError as e:
            if e.code in ("InvalidPart", "InvalidPartOrder"):
                # A part the store no longer has: the next attempt starts a new upload, so this one is
                # aborted now (left open, its parts are billed until the next start's orphan sweep).
                with contextlib.suppress(RepositoryError):
                    await self._abort_quietly()
                await self._save({})
                raise
            if e.code != "NoSuchUpload":
                raise
            # Completed by an earlier attempt whose answer was lost (or aborted): HEAD decides.
        await self._save({**self.state, "completed": True})
        try:
            return await self._verify(parts)
        except TransientRepositoryError as e:
            if e.code in _MISMATCH_CODES:
                await self._save({})  # the object is not what was sent: a fresh upload next time
            raise

    # -- state ------------------------------------------------------------------------------------

    def _resumable(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state if it belongs to this object and these bytes, else None."""
        up, repo = self.upload, self.repo
        try:
            ok = (isinstance(state.get("upload_id"), str) and state.get("bucket") == repo.bucket
                  and state.get("key") == self.okey and state.get("size") == up.size
                  and state.get("sha256") == up.sha256 and isinstance(state.get("part_size"), int)
                  and MIN_PART_SIZE <= state["part_size"] <= MAX_PART_SIZE
                  and -(-up.size // state["part_size"]) <= MAX_PARTS
                  and isinstance(state.get("parts"), list))
        except (TypeError, AttributeError):
            return None
        return {**state, "parts": list(state["parts"])} if ok else None

    async def _save(self, state: dict[str, Any]) -> None:
        """Persist `state` (the manifest); entries of `parts` are never mutated, so a shallow copy will do."""
        async with self._lock:
            self.state = state
            snapshot = {**state, "parts": list(state.get("parts", []))} if state else {}
            self.upload.state = snapshot
            if self.upload.save is not None:
                await self.upload.save(dict(snapshot))

    async def _record(self, part: _Part) -> None:
        async with self._lock:
            parts = [p for p in self.state["parts"] if p["n"] != part.number]
            parts.append({"n": part.number, "etag": part.etag, "sha256": part.b64, "size": part.size})
            parts.sort(key=lambda p: int(p["n"]))
            self.state = {**self.state, "parts": parts}
            snapshot = {**self.state, "parts": list(parts)}
            self.upload.state = snapshot
            if self.upload.save is not None:
                await self.upload.save(dict(snapshot))

    # -- requests ------------------------------------------------------------------------------------

    async def _create(self) -> None:
        repo, up = self.repo, self.upload
        part_size = plan_part_size(up.size, repo.options.part_size, repo.options.max_parts)
        requests = self._requests()
        resp = await requests.create(**repo._object_args(up))
        await self._save({"upload_id": requests.upload_id, "bucket": repo.bucket, "key": self.okey,
                          "size": up.size, "sha256": up.sha256, "part_size": part_size,
                          "etag_md5": repo._etag_is_md5(resp), "parts": []})

    def _requests(self) -> s3io.MultipartUpload:
        """The plumbing request layer for this upload (the saved upload id, if any), errors as ours."""
        return s3io.MultipartUpload(self.repo._bucket(self.client), self.okey, upload_id=self.state.get("upload_id"),
                                    call=self.repo._call)

    async def _list_parts(self) -> dict[int, dict[str, Any]]:
        return await self._requests().list_parts()

    async def _abort_quietly(self) -> None:
        await self._requests().abort()

    async def _parts(self, *, listed: dict[int, dict[str, Any]] | None = None,
                     verify_only: bool = False) -> tuple[list[_Part], str]:
        """Read the spool file in order (hashing it whole on the way) and hand each part to a task
        that keeps, sends or (verify_only) just digests it. Returns the parts and the file's SHA-256."""
        repo, up = self.repo, self.upload
        part_size: int = self.state["part_size"]
        count = max(1, -(-up.size // part_size))
        saved = {int(p["n"]): p for p in self.state.get("parts", [])}
        full = hashlib.sha256()
        done: dict[int, _Part] = {}
        try:
            async with asyncio.TaskGroup() as tg:
                for n in range(1, count + 1):
                    offset = (n - 1) * part_size
                    length = min(part_size, up.size - offset)
                    await repo._slots.acquire()
                    try:
                        buf = await repo._io(up.path, _read_range, up.path, offset, length, full)
                    except BaseException:
                        repo._slots.release()
                        raise
                    task = tg.create_task(self._part(n, offset, buf, saved.get(n), (listed or {}).get(n),
                                                     done, verify_only))
                    task.add_done_callback(lambda _t: repo._slots.release())
                    del buf
        except BaseExceptionGroup as eg:
            raise _most_telling(eg) from None
        return [done[n] for n in range(1, count + 1)], full.hexdigest()

    async def _part(self, n: int, offset: int, buf: io.BytesIO, saved: dict[str, Any] | None,
                    listed: dict[str, Any] | None, done: dict[int, _Part], verify_only: bool) -> None:
        repo, up = self.repo, self.upload
        length = _length(buf)
        digest, md5 = await asyncio.to_thread(_digests, buf, repo._want_md5)
        b64 = _b64(digest)
        if verify_only:
            done[n] = _Part(n, str(saved["etag"]) if saved else "", digest, md5, length)
            return
        if listed is not None and self._still_there(listed, saved, b64, md5, length):
            done[n] = _Part(n, str(listed["ETag"]), digest, md5, length)
            return
        last: RepositoryError | None = None
        for attempt in range(_SEND_ATTEMPTS):
            if attempt:  # re-read from disk: the copy in memory is not trusted either
                buf = await repo._io(up.path, _read_range, up.path, offset, length)
                again, md5 = await asyncio.to_thread(_digests, buf, repo._want_md5)
                if again != digest:
                    raise PermanentRepositoryError(f"spool file {up.path} changed while part {n} was uploaded")
            try:
                resp = await self._requests().upload_part(n, buf, length, b64)
            except TransientRepositoryError as e:
                if e.code not in _DIGEST_CODES:
                    raise
                last = e
                continue
            problem = repo._echo_problem(resp, b64, md5)
            if problem is not None:
                last = TransientRepositoryError(f"s3 UploadPart {self.where} part {n}: {problem}", "ChecksumMismatch")
                continue
            del buf
            part = _Part(n, str(resp["ETag"]), digest, md5, length)
            done[n] = part
            await self._record(part)
            return
        assert last is not None
        raise last

    def _still_there(self, listed: dict[str, Any], saved: dict[str, Any] | None, b64: str, md5: str | None,
                     length: int) -> bool:
        """Is the part the store lists exactly the bytes on disk? Its own SHA-256 if the store lists one
        (S3 does), else its MD5 ETag, else the ETag this agent saw when it sent a part with this SHA-256."""
        if listed.get("Size") != length:
            return False
        etag = str(listed.get("ETag") or "").strip('"')
        if listed.get("ChecksumSHA256") is not None:
            return bool(listed["ChecksumSHA256"] == b64)
        if md5 is not None and self.state.get("etag_md5") and self.repo.options.verify_etag:
            return etag == md5
        return saved is not None and saved.get("sha256") == b64 and str(saved.get("etag", "")).strip('"') == etag

    async def _verify(self, parts: list[_Part]) -> Receipt:
        composite = _b64(hashlib.sha256(b"".join(p.digest for p in parts)).digest())
        md5_etag = None
        if all(p.md5 is not None for p in parts):
            md5_etag = hashlib.md5(b"".join(bytes.fromhex(p.md5 or "") for p in parts),
                                   usedforsecurity=False).hexdigest() + f"-{len(parts)}"
        return await self.repo._verify(self.client, self.upload, self.okey, composite, len(parts), md5_etag)


# -- helpers --------------------------------------------------------------------------------------


_b64 = s3io.b64


# What a header rewrite keeps of the object it replaces.
_COPIED = ("ContentType", "Metadata", "StorageClass", "ServerSideEncryption", "SSEKMSKeyId", "CacheControl",
           "ContentDisposition", "ContentEncoding", "Expires", "BucketKeyEnabled")


def _check_size(path: Path, size: int) -> None:
    actual = os.stat(path).st_size
    if actual != size:
        raise PermanentRepositoryError(f"spool file {path} holds {actual} bytes, the manifest says {size}: "
                                       "not delivered")


def _check_sealed_hash(upload: Upload, actual: str) -> None:
    if actual != upload.sha256:
        raise PermanentRepositoryError(f"spool file {upload.path} has SHA-256 {actual[:16]}..., the manifest "
                                       f"says {str(upload.sha256)[:16]}...: not delivered (wrong bytes)")


def _read_range(path: Path, offset: int, length: int, full: Any = None) -> io.BytesIO:
    """`length` bytes at `offset` of `path`, read (preadv) straight into a BytesIO's own buffer, and fed
    to `full` if given. A BytesIO body is what aiohttp sends in 256 KiB slices, yielding in between;
    bytes-like bodies get copied whole, more than once, on the event loop."""
    buf = io.BytesIO()
    if length:
        buf.seek(length - 1)
        buf.write(b"\0")
        buf.seek(0)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with buf.getbuffer() as view:
            got = 0
            while got < length:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise PermanentRepositoryError(f"spool file {path} ends at {offset + got}, expected "
                                                   f"{offset + length} bytes: not delivered")
                got += n
            if full is not None:
                full.update(view)
    finally:
        os.close(fd)
    return buf


def _length(buf: io.BytesIO) -> int:
    with buf.getbuffer() as view:
        return len(view)


def _digests(buf: io.BytesIO, want_md5: bool) -> tuple[bytes, str | None]:
    with buf.getbuffer() as view:
        digest = hashlib.sha256(view).digest()
        md5 = hashlib.md5(view, usedforsecurity=False).hexdigest() if want_md5 else None
    return digest, md5


def _repository_error(e: s3io.S3Error) -> RepositoryError:
    """The delivery side's reading of a plumbing.s3 error: its class decides retry or quarantine."""
    if isinstance(e, s3io.S3NotFoundError) and e.code != "NoSuchBucket":
        return TransientRepositoryError(str(e), "NoSuchKey")  # HEAD of an object that is not (yet) there: send it again
    return (TransientRepositoryError if e.transient else PermanentRepositoryError)(str(e), e.code)


def _most_telling(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The error a TaskGroup's failure should surface as: permanent over transient over the rest."""
    flat: list[BaseException] = []

    def walk(g: BaseExceptionGroup[Any]) -> None:
        for x in g.exceptions:
            walk(x) if isinstance(x, BaseExceptionGroup) else flat.append(x)

    walk(eg)
    for kind in (PermanentRepositoryError, RepositoryError):
        for x in flat:
            if isinstance(x, kind):
                return x
    return next((x for x in flat if not isinstance(x, asyncio.CancelledError)), flat[0])
