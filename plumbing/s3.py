"""S3 and KMS access, once: the client, its retry policy, what its failures mean, and multipart writes.

>>> settings = ClientSettings(endpoint_url=url, retries=COMMAND)          # or AGENT, see below
>>> async with open_client(settings) as s3:                               # a one-shot use
...     bucket = S3Bucket(s3, "recordings")
...     head = await bucket.call("HeadObject", key, s3.head_object(Bucket="recordings", Key=key))
>>> lazy = LazyClient(settings)                                           # a long-lived user
>>> up = StreamingUpload(bucket, key, part_size=8 << 20, object_args={"ContentType": "video/mp4"})
>>> await up.write(data); size, checksum = await up.finish()              # or `await up.abort()`

**Retries: one policy per kind of use**, never a per-call-site figure:
- AGENT (1 attempt, botocore retries off): the long-lived uploader has its own backoff (the
  per-repository circuit breaker: one jittered probe per interval, quarantine for permanent errors);
  botocore retrying underneath would multiply each probe's duration and hide the outage from it.
- COMMAND (3 attempts in botocore's standard mode, exponential backoff with jitter): everything that
  has no backoff of its own (export, playback and `decrypt` reads, re-wrap, key set fetches, KMS calls).
  Reads and these writes are idempotent (same key, same bytes), so a retry never duplicates anything.
Timeouts are the caller's (they are user options); the defaults are the agent's figures.

**Errors**: `translate(op, where, exc)` turns a botocore ClientError or BotoCoreError, an aiohttp
client error, an OSError or a timeout into one of

    S3Error                       (.code: S3's error code or the exception's name, .status, .detail)
    ├── S3TransientError          5xx, 408/429, throttling, timeouts, connections, BadDigest, NoSuchUpload
    └── S3PermanentError          other 4xx, configuration and credential problems
        ├── S3NotFoundError       NoSuchKey, 404, NotFound, NoSuchBucket
        └── S3AccessDeniedError   AccessDenied, 403, expired or invalid credentials, KMS access denied

whose message is one line (`s3 HeadObject s3://b/k: NoSuchKey (The key does not exist)`), so callers
map the class to their own errors and keep the code for their decisions and messages.

**Multipart**: `MultipartUpload` is the request layer (create with ChecksumAlgorithm=SHA256, parts
each with their SHA-256, list, complete, abort); it keeps no state beyond the upload id, so a
resumable caller persists the id and its parts itself and passes the id back (`upload_id=`).
`StreamingUpload` writes a stream of unknown length through it: a single PutObject when the whole
stream fits one part, else multipart with at most one part buffered. Nothing is at the key before
`finish`; `abort` ends an unfinished multipart upload.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

__all__ = [
    "AGENT", "COMMAND", "ClientSettings", "LazyClient", "MultipartUpload", "Part", "Retries", "S3AccessDeniedError",
    "S3Bucket", "S3Error", "S3NotFoundError", "S3PermanentError", "S3TransientError", "StreamingUpload", "b64",
    "client_config", "errors", "make_session", "open_client", "sse_args", "translate",
]

T = TypeVar("T")
MiB = 1 << 20


@dataclass(frozen=True)
class Retries:
    """How many attempts botocore makes per request (standard mode), and why that many."""

    total_attempts: int
    why: str


AGENT = Retries(1, "the agent backs off itself (circuit breaker, jittered probes): botocore must not")
COMMAND = Retries(3, "no backoff of its own: botocore's standard mode retries transient errors with jitter")


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the service. None: botocore's own chain (AWS_ENDPOINT_URL_S3 / _KMS, AWS_REGION, ...)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: Retries = COMMAND
    addressing_style: str | None = None  # "path" | "virtual" | "auto" | None (botocore decides)
    max_pool_connections: int = 10
    # False: the body is covered by the signed x-amz-checksum-sha256 header (which S3 verifies), so it
    # is not hashed a second time for the signature (on plain HTTP botocore would, on the event loop).
    payload_signing: bool = True


def client_config(s: ClientSettings) -> Any:
    """The AioConfig for `s`: explicit SHA-256 checksums only (none added, none validated on reads:
    ranged GETs can't be, and the package's AEAD is the check of what was read)."""
    from aiobotocore.config import AioConfig

    s3cfg: dict[str, Any] = {} if s.payload_signing else {"payload_signing_enabled": False}
    if s.addressing_style:
        s3cfg["addressing_style"] = s.addressing_style
    return AioConfig(connect_timeout=s.connect_timeout, read_timeout=s.read_timeout,
                     retries={"total_max_attempts": s.retries.total_attempts, "mode": "standard"},
                     max_pool_connections=s.max_pool_connections,
                     request_checksum_calculation="when_required", response_checksum_validation="when_required",
                     s3=s3cfg)


def make_session(s: ClientSettings) -> Any:
    """The aioboto3 session for `s` (profile, region); a missing profile or bad config raises S3Error.
    It loads botocore's data (a noticeable fraction of a second): long-lived users make it up front."""
    import aioboto3

    try:
        return aioboto3.Session(profile_name=s.profile, region_name=s.region)
    except Exception as e:  # botocore's ProfileNotFound, ConfigParseError, ...
        raise translate("configure", s.profile or "the AWS configuration", e) from None


@contextlib.asynccontextmanager
async def open_client(s: ClientSettings, service: Literal["s3", "kms"] = "s3", *,
                      region: str | None = None, session: Any = None) -> AsyncIterator[Any]:
    """A client for one use; set-up failures (bad profile, malformed endpoint) raise S3Error.
    `region` is a fallback for when neither the settings nor the environment name one (KMS: the key ARN's);
    `session` one made by make_session (else one is made here)."""
    session = session if session is not None else make_session(s)
    try:
        name = s.region or session.region_name or region
        cm = session.client(service, endpoint_url=s.endpoint_url, region_name=name, config=client_config(s))
    except Exception as e:  # botocore errors, and ValueError for a malformed endpoint url
        raise translate("connect", s.endpoint_url or service, e) from None
    try:
        client = await cm.__aenter__()
    except Exception as e:
        raise translate("connect", s.endpoint_url or service, e) from None
    try:
        yield client
    except BaseException as e:
        if not await cm.__aexit__(type(e), e, e.__traceback__):
            raise
    else:
        await cm.__aexit__(None, None, None)


class LazyClient:
    """One client for a long-lived user, made on first use (under a lock) and closed by `close`."""

    def __init__(self, settings: ClientSettings, service: Literal["s3", "kms"] = "s3") -> None:
        self.settings, self.service = settings, service
        self._session = make_session(settings)  # now: a bad profile fails at construction, not mid-delivery
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(
                    open_client(self.settings, self.service, session=self._session))
                self._stack = stack
        return self._client

    async def close(self) -> None:
        async with self._lock:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


# -- errors -----------------------------------------------------------------------------------------


class S3Error(Exception):
    """An S3 (or KMS) request failed. `transient`: waiting and retrying may help."""

    transient = False

    def __init__(self, message: str, code: str = "", status: int = 0, detail: str = "") -> None:
        super().__init__(message)
        self.code, self.status, self.detail = code, status, detail


class S3TransientError(S3Error):
    transient = True


class S3PermanentError(S3Error):
    """Needs someone to act (configuration, credentials, permissions, a request the store refuses)."""


class S3NotFoundError(S3PermanentError):
    """No such object (or bucket: `code` says which)."""


class S3AccessDeniedError(S3PermanentError):
    """Refused: permissions or credentials."""


# Error codes (ClientError `Code`) by class. Anything else: 5xx/408/429 transient, other 4xx permanent.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "PriorRequestNotComplete", "OperationAborted", "IncompleteBody",
    "BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "NoSuchUpload", "InvalidPart",
    "InvalidPartOrder", "KMS.ThrottlingException", "KMS.KMSInternalException", "KMSInternalException",
    "DependencyTimeoutException",
})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
DENIED_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidToken", "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidSecurity",
    "KMS.AccessDeniedException", "Forbidden", "UnauthorizedAccess", "UnrecognizedClientException", "403",
})
PERMANENT_CODES = frozenset({
    "AccountProblem", "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed", "InvalidArgument", "InvalidRequest", "InvalidStorageClass",
    "InvalidEncryptionAlgorithmError", "KMS.DisabledException", "KMS.NotFoundException",
    "KMS.KMSInvalidStateException", "KMS.InvalidKeyUsageException", "EntityTooSmall", "EntityTooLarge",
    "MetadataTooLarge", "NotImplemented", "MissingContentLength", "InvalidObjectState",
})


def translate(op: str, where: str, e: BaseException) -> S3Error:
    """The S3Error for a failed request `op` on `where` (a URL), or for a failure setting up a client."""
    from botocore.exceptions import (
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

    if isinstance(e, S3Error):
        return e
    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code") or "")
        status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        detail = " ".join(str(err.get("Message") or "").split())
        text = f"s3 {op} {where}: {code or status}" + (f" ({detail})" if detail and detail != code else "")
        cls: type[S3Error]
        if code in TRANSIENT_CODES:
            cls = S3TransientError
        elif code in NOT_FOUND_CODES or (not code and status == 404):
            cls = S3NotFoundError
        elif code in DENIED_CODES or (not code and status == 403):
            cls = S3AccessDeniedError
        elif code in PERMANENT_CODES:
            cls = S3PermanentError
        elif status >= 500 or status in (408, 429) or status == 0:
            cls = S3TransientError
        else:
            cls = S3PermanentError
        return cls(text, code, status, detail)
    name = type(e).__name__
    detail = " ".join(str(e).split()) or name
    text = f"s3 {op} {where}: {detail}"
    # botocore errors an operator must fix (configuration, credentials); every other one (connections,
    # timeouts, credential endpoints not answering) is transient.
    if isinstance(e, (NoCredentialsError, PartialCredentialsError, SSOError, TokenRetrievalError)):
        return S3AccessDeniedError(text, name, 0, detail)
    if isinstance(e, (NoRegionError, ProfileNotFound, ConfigNotFound, InvalidConfigError, ParamValidationError,
                      UnknownEndpointError, ValueError)):
        return S3PermanentError(text, name, 0, detail)
    if isinstance(e, TimeoutError):
        return S3TransientError(f"s3 {op} {where}: timed out", "Timeout", 0, "timed out")
    return S3TransientError(text, name, 0, detail)  # BotoCoreError, aiohttp.ClientError, OSError


def errors() -> tuple[type[BaseException], ...]:
    """Everything `translate` knows how to read (for `except errors() as e: raise translate(...)`)."""
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError, S3Error)


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def sse_args(sse: str | None, kms_key_id: str | None) -> dict[str, str]:
    """The server-side encryption arguments of a PutObject / CreateMultipartUpload."""
    args: dict[str, str] = {}
    if sse:
        args["ServerSideEncryption"] = sse
    if kms_key_id:
        args["SSEKMSKeyId"] = kms_key_id
    return args


# -- requests ---------------------------------------------------------------------------------------


class Caller(Protocol):
    """Runs one request: awaits it, bounded in time, and raises the caller's error type on failure."""

    async def __call__(self, op: str, key: str, aw: Awaitable[T], body: int | None = None) -> T: ...


class S3Bucket:
    """One bucket through one client; `call` awaits a request and raises S3Error on its failure.

    With `min_send_rate`, a request carrying `body` bytes must finish within connect + read timeouts +
    body / min_send_rate: aiohttp's read timeout only starts once the body is written, so a peer that
    stops reading mid-body (TCP window shut) would otherwise hold the request forever.
    """

    def __init__(self, client: Any, bucket: str, *, settings: ClientSettings | None = None,
                 min_send_rate: int | None = None) -> None:
        self.client, self.name = client, bucket
        self.settings = settings or ClientSettings()
        self.min_send_rate = min_send_rate

    def url(self, key: str) -> str:
        return key if key.startswith("s3://") else f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    async def call(self, op: str, key: str, aw: Awaitable[T], body: int | None = None) -> T:
        s = self.settings
        limit = None if body is None or not self.min_send_rate else \
            s.connect_timeout + s.read_timeout + body / self.min_send_rate
        try:
            async with asyncio.timeout(limit):
                return await aw
        except TimeoutError:
            if limit is None:
                raise S3TransientError(f"s3 {op} {self.url(key)}: timed out", "Timeout") from None
            raise S3TransientError(f"s3 {op} {self.url(key)}: no answer within {limit:.0f} s "
                                   "(peer stopped reading or answering)", "RequestDeadline") from None
        except errors() as e:
            raise translate(op, self.url(key), e) from None


@dataclass(frozen=True)
class Part:
    """A part the store accepted: what CompleteMultipartUpload needs, and what a resume checks."""

    number: int
    etag: str
    sha256: str  # base64, as sent in x-amz-checksum-sha256
    size: int

    def completed(self) -> dict[str, Any]:
        return {"PartNumber": self.number, "ETag": self.etag, "ChecksumSHA256": self.sha256}


class MultipartUpload:
    """The requests of one multipart upload of `key` (bucket.name); `call` runs each (default: bucket.call).

    Stateless but for `upload_id`: a resumable caller persists it (and each Part) and passes it back.
    """

    def __init__(self, bucket: S3Bucket, key: str, *, upload_id: str | None = None,
                 call: Caller | None = None) -> None:
        self.bucket, self.key, self.upload_id = bucket, key, upload_id
        self._call: Caller = call or bucket.call

    async def create(self, **object_args: Any) -> dict[str, Any]:
        """Start the upload (SHA-256 checksums); returns the response (for its encryption fields)."""
        b = self.bucket
        resp: dict[str, Any] = await self._call("CreateMultipartUpload", self.key, b.client.create_multipart_upload(
            Bucket=b.name, Key=self.key, ChecksumAlgorithm="SHA256", **object_args))
        self.upload_id = str(resp["UploadId"])
        return resp

    async def upload_part(self, number: int, body: Any, length: int, sha256: str) -> dict[str, Any]:
        """Send part `number` (`sha256` = base64 SHA-256 of `body`, which S3 verifies); the raw response."""
        b = self.bucket
        resp: dict[str, Any] = await self._call("UploadPart", self.key, b.client.upload_part(
            Bucket=b.name, Key=self.key, UploadId=self._id, PartNumber=number, Body=body, ContentLength=length,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=sha256), body=length)
        return resp

    async def list_parts(self) -> dict[int, dict[str, Any]]:
        """The parts the store holds for this upload, by number (paginated)."""
        b = self.bucket
        out: dict[int, dict[str, Any]] = {}
        marker = 0
        while True:
            resp = await self._call("ListParts", self.key, b.client.list_parts(
                Bucket=b.name, Key=self.key, UploadId=self._id, PartNumberMarker=marker))
            for p in resp.get("Parts", []):
                out[int(p["PartNumber"])] = p
            if not resp.get("IsTruncated") or not resp.get("NextPartNumberMarker"):
                return out
            marker = int(resp["NextPartNumberMarker"])

    async def complete(self, parts: Sequence[Part]) -> dict[str, Any]:
        b = self.bucket
        resp: dict[str, Any] = await self._call("CompleteMultipartUpload", self.key, b.client.complete_multipart_upload(
            Bucket=b.name, Key=self.key, UploadId=self._id,
            MultipartUpload={"Parts": [p.completed() for p in parts]}))
        return resp

    async def abort(self) -> None:
        """Abort, ignoring failures (an orphan upload is aborted at the next start-up or expires)."""
        if self.upload_id is None:
            return
        b = self.bucket
        upload_id, self.upload_id = self.upload_id, None
        with contextlib.suppress(Exception):
            await self._call("AbortMultipartUpload", self.key, b.client.abort_multipart_upload(
                Bucket=b.name, Key=self.key, UploadId=upload_id))

    @property
    def _id(self) -> str:
        if self.upload_id is None:
            raise RuntimeError("the multipart upload was not created")
        return self.upload_id

    @staticmethod
    def composite(digests: Sequence[bytes]) -> str:
        """S3's full-object checksum of a multipart upload: b64(sha256(part digests))-N."""
        return f"{b64(hashlib.sha256(b''.join(digests)).digest())}-{len(digests)}"


class StreamingUpload:
    """A stream of unknown length written to `key`: one PutObject if it fits a part, else multipart.

    At most one part is buffered. `finish` returns (bytes stored, the checksum S3 should then report:
    base64 SHA-256, or the composite `...-N`). A PutObject/UploadPart answer that echoes a different
    SHA-256 than was sent fails (S3PermanentError "ChecksumMismatch").
    """

    def __init__(self, bucket: S3Bucket, key: str, part_size: int, object_args: Mapping[str, Any] | None = None,
                 ) -> None:
        if part_size < 5 * MiB:
            raise ValueError("the part size must be at least 5 MiB")
        self.bucket, self.key, self.part_size = bucket, key, part_size
        self.object_args = dict(object_args or {})
        self.buf = bytearray()
        self.multipart: MultipartUpload | None = None
        self.parts: list[Part] = []
        self.digests: list[bytes] = []
        self.size = 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data
        while len(self.buf) >= self.part_size:
            part = bytes(self.buf[:self.part_size])
            del self.buf[:self.part_size]
            await self._send_part(part)

    async def _send_part(self, part: bytes) -> None:
        if self.multipart is None:
            self.multipart = MultipartUpload(self.bucket, self.key)
            await self.multipart.create(**self.object_args)
        digest = hashlib.sha256(part).digest()
        n = len(self.parts) + 1
        resp = await self.multipart.upload_part(n, part, len(part), b64(digest))
        self._check_echo("UploadPart", resp, b64(digest))
        self.parts.append(Part(n, str(resp["ETag"]), b64(digest), len(part)))
        self.digests.append(digest)
        self.size += len(part)

    async def finish(self) -> tuple[int, str]:
        if self.multipart is None:
            data = bytes(self.buf)
            self.buf.clear()
            checksum = b64(hashlib.sha256(data).digest())
            b = self.bucket
            resp = await b.call("PutObject", self.key, b.client.put_object(
                Bucket=b.name, Key=self.key, Body=data, ContentLength=len(data), ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum, **self.object_args), body=len(data))
            self._check_echo("PutObject", resp, checksum)
            return len(data), checksum
        if self.buf:
            await self._send_part(bytes(self.buf))
            self.buf.clear()
        await self.multipart.complete(self.parts)
        self.multipart.upload_id = None
        return self.size, MultipartUpload.composite(self.digests)

    async def abort(self) -> None:
        if self.multipart is not None:
            await self.multipart.abort()

    def _check_echo(self, op: str, resp: Mapping[str, Any], sent: str) -> None:
        echoed = resp.get("ChecksumSHA256")
        if echoed is not None and echoed != sent:
            raise S3PermanentError(f"s3 {op} {self.bucket.url(self.key)}: the store computed SHA-256 {echoed}, "
                                   f"sent {sent}", "ChecksumMismatch")

