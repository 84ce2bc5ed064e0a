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
- Errors: connection refused/reset, timeouts, 5xx, SlowDown/throttling, RequestTimeout, BadDigest
  -> TransientRepositoryError; AccessDenied, NoSuchBucket, bad credentials, KMS key problems,
  other 4xx -> PermanentRepositoryError. botocore's own retries are off (the agent backs off).

Credentials and endpoint come from the standard chain: `endpoint_url` when set, else botocore's own
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / profile `endpoint_url`; `profile` or the default chain
(environment, shared files, SSO, container and instance roles) for credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import io
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConfigNotFound,
    InvalidConfigError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
    SSOError,
    TokenRetrievalError,
    UnknownEndpointError,
)

from mediaseal.uploader.base import PermanentRepositoryError, Receipt, RepositoryError, TransientRepositoryError, Upload

__all__ = [
    "MAX_PARTS", "MIN_PART_SIZE", "S3Options", "S3PermanentError", "S3Repository", "S3TransientError",
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

# Error codes (ClientError `Code`) by class. Anything else: 5xx/408/429 transient, other 4xx permanent.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "PriorRequestNotComplete", "OperationAborted", "IncompleteBody",
    "BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "NoSuchUpload", "InvalidPart",
    "InvalidPartOrder", "KMS.ThrottlingException", "KMS.KMSInternalException",
})
_PERMANENT_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity", "NoSuchBucket",
    "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed", "RequestTimeTooSkewed",
    "InvalidArgument", "InvalidRequest", "InvalidStorageClass", "InvalidEncryptionAlgorithmError",
    "KMS.DisabledException", "KMS.NotFoundException", "KMS.KMSInvalidStateException",
    "KMS.InvalidKeyUsageException", "KMS.AccessDeniedException", "EntityTooSmall", "EntityTooLarge",
    "MetadataTooLarge", "NotImplemented", "MissingContentLength", "InvalidObjectState", "Forbidden",
    "UnauthorizedAccess", "403",
})
_DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_MISMATCH_CODES = frozenset({"SizeMismatch", "ChecksumMismatch", "NoSuchKey"})  # verification said: not it
# botocore errors an operator must fix (configuration, credentials); every other one (connections,
# timeouts, credential endpoints not answering) is transient.
_PERMANENT_BOTOCORE = (
    NoCredentialsError, PartialCredentialsError, NoRegionError, ProfileNotFound, ConfigNotFound,
    InvalidConfigError, ParamValidationError, UnknownEndpointError, SSOError, TokenRetrievalError,
)
_SPOOL_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


class S3TransientError(TransientRepositoryError):
    """A transient S3 failure; `code` is S3's error code (or the botocore exception's name)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class S3PermanentError(PermanentRepositoryError):
    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


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
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); the prefix may be empty."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise PermanentRepositoryError(f"not an s3://bucket/prefix url: {url!r}")
    if parsed.query or parsed.fragment:
        raise PermanentRepositoryError(f"s3 repository url {url!r} has a query or fragment")
    prefix = unquote(parsed.path).strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise PermanentRepositoryError(f"s3 repository prefix {prefix!r} has empty or dot segments")
    return parsed.netloc, prefix


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
    """A bucket (and a key prefix) holding packages. One aioboto3 client, created on first use."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options or S3Options()
        try:
            self._session = aioboto3.Session(profile_name=self.options.profile, region_name=self.options.region)
        except BotoCoreError as e:
            raise _translate_botocore("configure", f"s3://{bucket}", e) from None
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.options.concurrency)
        self._want_md5 = self.options.verify_etag and self.options.sse != "aws:kms"

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None) -> S3Repository:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, options)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, key: str) -> str:
        key = key.lstrip("/")
        if not key or any(seg in (".", "..") for seg in key.split("/")):
            raise PermanentRepositoryError(f"key {key!r} is not a plain relative key")
        return f"{self.prefix}/{key}" if self.prefix else key

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
        async with self._client_lock:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

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
                except S3TransientError as e:
                    if e.code != "NoSuchUpload":
                        raise
                aborted.append(u["UploadId"])
            if not page.get("IsTruncated") or not page.get("NextKeyMarker"):
                return aborted
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

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
                except S3TransientError as e:
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
                last = S3TransientError(f"s3 PutObject {self._where(okey)}: {problem}", "ChecksumMismatch")
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
        if self.options.sse:
            args["ServerSideEncryption"] = self.options.sse
        if self.options.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.options.sse_kms_key_id
        return args

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
            raise S3TransientError(f"s3 verify {where}: holds {head.get('ContentLength')} bytes, "
                                   f"sent {upload.size}", "SizeMismatch")
        checked = False
        got = head.get("ChecksumSHA256")
        if got is not None:
            value, dash, count = str(got).partition("-")
            expected = checksum if parts is None else f"{checksum}-{parts}"
            if value != checksum or (dash and count != str(parts)):
                raise S3TransientError(f"s3 verify {where}: checksum {got}, sent {expected}", "ChecksumMismatch")
            checked = True
        if md5_etag is not None and self._etag_is_md5(head):
            etag = str(head.get("ETag") or "").strip('"')
            if etag != md5_etag:
                raise S3TransientError(f"s3 verify {where}: ETag {etag}, the bytes sent give {md5_etag}",
                                       "ChecksumMismatch")
            checked = True
        if not checked:
            raise S3PermanentError(f"s3 verify {where}: the repository reports neither a SHA-256 checksum nor "
                                   "an MD5 ETag, so the object cannot be verified", "Unverifiable")
        return Receipt(upload.size, upload.sha256)

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                o = self.options
                s3cfg: dict[str, Any] = {"payload_signing_enabled": False}
                if o.addressing_style:
                    s3cfg["addressing_style"] = o.addressing_style
                config = AioConfig(
                    connect_timeout=o.connect_timeout, read_timeout=o.read_timeout,
                    retries={"total_max_attempts": 1, "mode": "standard"},  # the agent retries, with backoff
                    max_pool_connections=max(10, 2 * o.concurrency),
                    # Explicit SHA-256 on every write; no CRC32 added, no response checksum pass.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    # The body is covered by the signed x-amz-checksum-sha256 header, which S3 verifies;
                    # signing the payload too would hash every byte once more on the event loop (plain HTTP).
                    s3=s3cfg,
                )
                stack = contextlib.AsyncExitStack()
                try:
                    self._client = await stack.enter_async_context(
                        self._session.client("s3", endpoint_url=o.endpoint_url, config=config))
                except BotoCoreError as e:
                    await stack.aclose()
                    raise _translate_botocore("connect", self.url, e) from None
                except ValueError as e:  # a malformed endpoint url
                    await stack.aclose()
                    raise PermanentRepositoryError(f"s3 repository {self.url}: {e}") from None
                self._stack = stack
        return self._client

    async def _call(self, op: str, target: str, aw: Awaitable[T], body: int | None = None) -> T:
        """Await a botocore call, turning its failures into repository errors. A call sending `body`
        bytes is also bounded in time as a whole (see S3Options.min_send_rate)."""
        o = self.options
        limit = None if body is None else o.connect_timeout + o.read_timeout + body / o.min_send_rate
        try:
            async with asyncio.timeout(limit):
                return await aw
        except TimeoutError:
            if limit is None:
                raise S3TransientError(f"s3 {op} {self._where(target)}: timed out", "Timeout") from None
            raise S3TransientError(f"s3 {op} {self._where(target)}: no answer within {limit:.0f} s "
                                   f"(peer stopped reading or answering)", "RequestDeadline") from None
        except ClientError as e:
            raise _translate_client_error(op, self._where(target), e) from None
        except BotoCoreError as e:
            raise _translate_botocore(op, self._where(target), e) from None

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
        repo, up = self.repo, self.upload
        state = self._resumable(up.state)
        if state is not None and state.get("completed"):
            # A previous attempt completed the upload; if the object is what the spool holds, done.
            self.state = state
            parts, full = await self._parts(verify_only=True)
            _check_sealed_hash(up, full)
            try:
                return await self._verify(parts)
            except S3TransientError as e:
                if e.code not in _MISMATCH_CODES:
                    raise
            state = None  # not there, or not these bytes: upload again
        listed: dict[int, dict[str, Any]] = {}
        if state is not None:
            self.state = state
            try:
                listed = await self._list_parts()
            except S3TransientError as e:
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
            await repo._call("CompleteMultipartUpload", self.okey, self.client.complete_multipart_upload(
                Bucket=repo.bucket, Key=self.okey, UploadId=self.state["upload_id"],
                MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag, "ChecksumSHA256": p.b64}
                                           for p in parts]}))
        except S3TransientError as e:
            if e.code in ("InvalidPart", "InvalidPartOrder"):
                await self._save({})  # a part the store no longer has: start over next time
                raise
            if e.code != "NoSuchUpload":
                raise
            # Completed by an earlier attempt whose answer was lost (or aborted): HEAD decides.
        await self._save({**self.state, "completed": True})
        try:
            return await self._verify(parts)
        except S3TransientError as e:
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
        resp = await repo._call("CreateMultipartUpload", self.okey, self.client.create_multipart_upload(
            Bucket=repo.bucket, Key=self.okey, ChecksumAlgorithm="SHA256", **repo._object_args(up)))
        await self._save({"upload_id": resp["UploadId"], "bucket": repo.bucket, "key": self.okey,
                          "size": up.size, "sha256": up.sha256, "part_size": part_size,
                          "etag_md5": repo._etag_is_md5(resp), "parts": []})

    async def _list_parts(self) -> dict[int, dict[str, Any]]:
        repo = self.repo
        out: dict[int, dict[str, Any]] = {}
        marker = 0
        while True:
            resp = await repo._call("ListParts", self.okey, self.client.list_parts(
                Bucket=repo.bucket, Key=self.okey, UploadId=self.state["upload_id"], PartNumberMarker=marker))
            for p in resp.get("Parts", []):
                out[int(p["PartNumber"])] = p
            if not resp.get("IsTruncated") or not resp.get("NextPartNumberMarker"):
                return out
            marker = int(resp["NextPartNumberMarker"])

    async def _abort_quietly(self) -> None:
        with contextlib.suppress(RepositoryError):
            await self.repo._call("AbortMultipartUpload", self.okey, self.client.abort_multipart_upload(
                Bucket=self.repo.bucket, Key=self.okey, UploadId=self.state["upload_id"]))

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
                resp = await repo._call("UploadPart", self.okey, self.client.upload_part(
                    Bucket=repo.bucket, Key=self.okey, UploadId=self.state["upload_id"], PartNumber=n,
                    Body=buf, ContentLength=length, ChecksumAlgorithm="SHA256", ChecksumSHA256=b64),
                    body=length)
            except S3TransientError as e:
                if e.code not in _DIGEST_CODES:
                    raise
                last = e
                continue
            problem = repo._echo_problem(resp, b64, md5)
            if problem is not None:
                last = S3TransientError(f"s3 UploadPart {self.where} part {n}: {problem}", "ChecksumMismatch")
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


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


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


def _translate_client_error(op: str, where: str, e: ClientError) -> RepositoryError:
    err = e.response.get("Error", {}) or {}
    code = str(err.get("Code") or "")
    status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
    message = str(err.get("Message") or "").strip()
    text = f"s3 {op} {where}: {code or status}" + (f" ({message})" if message and message != code else "")
    if code in _TRANSIENT_CODES:
        return S3TransientError(text, code)
    if code in _PERMANENT_CODES:
        return S3PermanentError(text, code)
    if code == "404" or code == "NoSuchKey":  # HEAD of an object that is not (yet) there: send it again
        return S3TransientError(text, "NoSuchKey")
    if status >= 500 or status in (408, 429) or status == 0:
        return S3TransientError(text, code)
    return S3PermanentError(text, code)


def _translate_botocore(op: str, where: str, e: BotoCoreError) -> RepositoryError:
    text = f"s3 {op} {where}: {e}"
    if isinstance(e, _PERMANENT_BOTOCORE):
        return S3PermanentError(text, type(e).__name__)
    return S3TransientError(text, type(e).__name__)


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
