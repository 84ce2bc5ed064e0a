"""The AWS KMS mode: private keys at rest encrypted under a customer's KMS symmetric key.

>>> ring = Keyring.init(Path("keyring"), None, kms_key_id="alias/mediaseal")     # Encrypt, per key
>>> ring = Keyring.open(Path("keyring"), kms=KmsOptions(cache_seconds=60))       # public side: no KMS
>>> reader = codec.open_package(f, ring.unlock(None))                            # Decrypt, cached <= 60 s

`KmsProtector` is a `keys.protect.Protector`: `seal` calls KMS Encrypt and `open` calls KMS Decrypt,
each with an encryption context built from the envelope's associated data (keyring format, purpose
"kek" or "signer", kid), so an envelope moved to another key or use fails at KMS. Decrypt names the
key (KeyId), so KMS never decrypts under anything else. Calls go through plumbing.s3's client builder
(aioboto3; the command retry policy: `max_attempts` attempts in botocore's standard mode, as nothing
here backs off) and its error translation, with the standard chain: endpoint from
AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL (or `KmsOptions.endpoint_url`), credentials from the
environment, shared files, SSO or instance/container roles, region from
`KmsOptions.region`, AWS_REGION / AWS_DEFAULT_REGION, or the key ARN.

The recovered private key is held in memory by the keyring's unwrapper for at most
`cache_seconds` (the protector's `cache_seconds` attribute), then KMS is asked again: disabling the
key or removing the grant stops decryption within that time. A refusal raises KmsRefusedError
("KMS refused Decrypt ..."); an unreachable KMS raises KmsUnavailableError. Both are one line and
KeyringLockedError subclasses, so every caller that handles a locked keyring handles them.

Envelope on disk: {"kdf": "aws-kms", "key_id": <key ARN>, "ct": b64url(CiphertextBlob)}.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mediaseal.keys.errors import KeyringFormatError, KeyringLockedError
from mediaseal.keys.jwk import b64url_decode, b64url_encode

T = TypeVar("T")

AWS_KMS = "aws-kms"
DEFAULT_CACHE_SECONDS = 60.0  # how long a KMS-opened key stays usable after the KMS key is disabled
MAX_PLAINTEXT = 4096  # KMS Encrypt's limit; an RSA-4096 PKCS#8 key is about 2.4 KB
_AAD_PREFIX = b"mediaseal-keyring/1"
# Error codes that mean "KMS said no" (as opposed to "KMS could not be reached").
_REFUSALS = {
    "AccessDeniedException", "DisabledException", "KMSInvalidStateException", "NotFoundException",
    "InvalidCiphertextException", "IncorrectKeyException", "InvalidGrantTokenException", "InvalidKeyUsageException",
    "KeyUnavailableException", "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
    "ValidationException", "DryRunOperationException", "InvalidGrantIdException",
}


class KmsError(KeyringLockedError):
    """A KMS call did not give us the key."""


class KmsRefusedError(KmsError):
    """KMS answered and refused (key disabled or pending deletion, grant removed, access denied, wrong context)."""


class KmsUnavailableError(KmsError):
    """KMS could not be reached (network, timeout, throttling after retries, no credentials or region)."""


@dataclass(frozen=True)
class KmsOptions:
    """How to reach KMS, and how long a recovered private key may stay in memory."""

    cache_seconds: float = DEFAULT_CACHE_SECONDS
    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL / the AWS default
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION, else the key ARN's region
    profile: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_attempts: int = 3  # in all, the first included (plumbing.s3.COMMAND's figure)

    def __post_init__(self) -> None:
        if self.cache_seconds < 0:
            raise ValueError("cache_seconds must be >= 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")


def encryption_context(aad: bytes) -> dict[str, str]:
    """The KMS encryption context for a `keys.protect.key_aad` value: format, purpose and kid, in clear."""
    parts = aad.split(b"\x00")
    if len(parts) == 3 and parts[0] == _AAD_PREFIX:
        try:
            purpose, kid = parts[1].decode("ascii"), parts[2].decode("ascii")
        except UnicodeDecodeError:
            pass
        else:
            return {"mediaseal:keyring": _AAD_PREFIX.decode(), "mediaseal:purpose": purpose, "mediaseal:kid": kid}
    return {"mediaseal:aad": b64url_encode(aad)}


def region_of(key_id: str) -> str | None:
    """The region in a KMS key or alias ARN (arn:aws:kms:REGION:ACCOUNT:key/...), else None."""
    parts = key_id.split(":")
    return (parts[3] or None) if len(parts) >= 6 and parts[0] == "arn" and parts[2] == "kms" else None


class KmsProtector:
    """Seals with KMS Encrypt and opens with KMS Decrypt under one KMS key (id, ARN, alias or alias ARN)."""

    def __init__(self, key_id: str, options: KmsOptions | None = None) -> None:
        if not key_id or not key_id.isprintable():
            raise ValueError("a KMS key id, ARN or alias is required")
        self.key_id = key_id
        self.options = options or KmsOptions()
        self.key_arn: str | None = key_id if key_id.startswith("arn:") and ":key/" in key_id else None

    def __repr__(self) -> str:
        return f"KmsProtector({self.key_id!r})"

    @property
    def cache_seconds(self) -> float:
        """How long the keyring's unwrapper may keep what `open` returned (read by KeyringUnwrapper)."""
        return self.options.cache_seconds

    def seal(self, plaintext: bytes, aad: bytes) -> dict[str, Any]:
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"KMS Encrypt takes at most {MAX_PLAINTEXT} bytes")
        resp = run_sync(self._call("Encrypt", KeyId=self.key_id, Plaintext=plaintext,
                                   EncryptionContext=encryption_context(aad)))
        arn = str(resp["KeyId"])
        if self.key_arn is None:
            self.key_arn = arn  # an alias resolves to its key now; the keyring stores the key ARN
        return {"kdf": AWS_KMS, "key_id": arn, "ct": b64url_encode(resp["CiphertextBlob"])}

    def open(self, envelope: Mapping[str, Any], aad: bytes) -> bytes:
        if not isinstance(envelope, Mapping) or envelope.get("kdf") != AWS_KMS:
            kind = envelope.get("kdf") if isinstance(envelope, Mapping) else None
            raise KeyringFormatError(f"protected key: kdf {kind!r}, expected {AWS_KMS!r}")
        key_id, ct = envelope.get("key_id"), envelope.get("ct")
        if not isinstance(key_id, str) or not isinstance(ct, str):
            raise KeyringFormatError("protected key: key_id and ct must be strings")
        if self.key_arn is not None and key_id != self.key_arn:
            raise KeyringFormatError(f"protected key is sealed under {key_id}, not the KMS key {self.key_arn}")
        try:
            blob = b64url_decode(ct)
        except ValueError:
            raise KeyringFormatError("protected key: 'ct' must be unpadded base64url") from None
        resp = run_sync(self._call("Decrypt", KeyId=self.key_arn or key_id, CiphertextBlob=blob,
                                   EncryptionContext=encryption_context(aad)))
        return bytes(resp["Plaintext"])

    async def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        from mediaseal.plumbing import s3 as s3io

        o = self.options
        target = self.key_arn or self.key_id
        retries = s3io.COMMAND if o.max_attempts == s3io.COMMAND.total_attempts else \
            s3io.Retries(o.max_attempts, "KmsOptions.max_attempts")
        settings = s3io.ClientSettings(endpoint_url=o.endpoint_url, region=o.region, profile=o.profile,
                                       connect_timeout=o.connect_timeout, read_timeout=o.read_timeout,
                                       retries=retries)
        try:
            async with s3io.open_client(settings, "kms", region=region_of(target)) as kms:
                try:
                    resp: dict[str, Any] = await getattr(kms, _SNAKE[op])(**kwargs)
                except s3io.errors() as e:
                    raise s3io.translate(op, target, e) from None
                return resp
        except s3io.S3Error as e:
            if e.status:  # KMS answered
                detail = f"{e.code}: {e.detail}" if e.detail else e.code
                if e.code in _REFUSALS:
                    raise KmsRefusedError(f"KMS refused {op} with key {target}: {detail}") from None
                raise KmsUnavailableError(f"KMS {op} with key {target} failed: {detail}") from None
            if e.code in ("NoCredentialsError", "NoRegionError"):
                raise KmsUnavailableError(f"KMS {op} with key {target}: {e.detail}") from None
            raise KmsUnavailableError(f"KMS unreachable for {op} with key {target}: {e.detail}") from None


_SNAKE = {"Encrypt": "encrypt", "Decrypt": "decrypt"}


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion from synchronous code, also when this thread is running an event loop.

    The keyring (and codec's Unwrapper protocol) is synchronous; KMS calls are async (aioboto3). With
    no loop in this thread the coroutine runs on a fresh one here; inside a running loop it runs on a
    fresh loop in a worker thread (blocking the caller, as any synchronous key operation does).
    """
    import asyncio  # here, not at the top: opening a keyring (`mediaseal encrypt`) must not load asyncio
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kms") as pool:
        return pool.submit(asyncio.run, coro).result()
