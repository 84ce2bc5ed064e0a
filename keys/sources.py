"""Where published key sets come from, and how an agent follows one safely.

>>> source = open_keyset_source("https://keys.example.net/keyset.json", ca_bundle=Path("/etc/mediaseal/ca.pem"))
>>> follower = KeySetFollower(source, load_signer(pinned_pem))
>>> keyset = await follower.refresh()      # verified, or raises and keeps the last valid set
>>> keyset.recipient()                     # the current public KEK

Sources (`open_keyset_source`): a file path (KeySetFile), an `https://` URL (KeySetHTTPS: system CAs,
or a CA bundle file of its own), an `s3://bucket/key` object (KeySetS3, through plumbing.s3: the
standard endpoint, region and credential chain, the command retry policy, its error translation).
Each fetch sends the validator of the last document (HTTP If-None-Match / S3 IfNoneMatch with its
ETag; a file's size, mtime and inode) and "not modified" keeps the set in use. (The names say "key
set" because export.source reads packages, a different thing, from repositories.)

`KeySetFollower.refresh` accepts a document only if, in this order: it is signed by the pinned
Ed25519 signer (checked before anything in it is read), its format and rules hold (exactly one
current key, RSA-3072), it has not expired, and its serial is not lower than the serial in use
(KeySetRollbackError: an old, validly signed set replayed). Anything else raises a KeySetError
subclass whose class name is the failure's reason, and the last valid set stays in use.
Only public keys ever pass through here.

With `cache=PATH` the follower keeps the set in use on disk (the signed document as fetched, 0600,
written atomically through plumbing.durable; its mtime is when the source last confirmed it).
`restore()` reads it back at start: it is checked exactly like a fetched document, and then it is
both the key to use while the source is down and the floor for the rollback check, so a restart does
not forget the serial.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ed25519

from mediaseal.keys.errors import KeySetError, KeySetExpiredError
from mediaseal.keys.keyset import MAX_DOCUMENT_SIZE, KeySet, format_time, verify_keyset
from mediaseal.plumbing.durable import write_atomic
from mediaseal.plumbing.locations import LocationError, parse_s3_object_url

DEFAULT_TIMEOUT = 10.0


class KeySetSourceError(KeySetError):
    """The key set could not be fetched (unreachable, HTTP error, missing object or file, too large)."""


class KeySetRollbackError(KeySetError):
    """A validly signed key set older (lower serial) than the one in use: refused."""


@dataclass(frozen=True)
class Fetched:
    """One fetch: the document (None: not modified since `etag`) and its validator."""

    data: bytes | None
    etag: str | None


class KeySetSource(Protocol):
    """Something a key set document can be fetched from."""

    @property
    def location(self) -> str: ...

    async def fetch(self, etag: str | None) -> Fetched:
        """The document, or Fetched(None, etag) if it is unchanged since `etag`. Raises KeySetSourceError."""
        ...


class KeySetFile:
    """A key set file. Its validator is (size, mtime, inode): an atomic replace always changes it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def location(self) -> str:
        return str(self.path)

    async def fetch(self, etag: str | None) -> Fetched:
        return await asyncio.to_thread(self._fetch, etag)

    def _fetch(self, etag: str | None) -> Fetched:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                tag = f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"
                if etag is not None and tag == etag:
                    return Fetched(None, etag)
                data = f.read(MAX_DOCUMENT_SIZE + 1)
        except OSError as e:
            raise KeySetSourceError(f"can't read key set {self.path}: {e.strerror}") from None
        _check_size(data, self.location)
        return Fetched(data, tag)


class KeySetHTTPS:
    """A key set at an https:// URL; `ca_bundle` (PEM) replaces the system CAs for this source."""

    def __init__(self, url: str, *, ca_bundle: Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.netloc:
            raise ValueError(f"not an https:// URL: {url!r}")
        self.url = url
        self.ca_bundle = ca_bundle
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None

    @property
    def location(self) -> str:
        return self.url

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            try:
                self._ssl = ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)
            except (OSError, ssl.SSLError) as e:
                raise KeySetSourceError(f"can't load CA bundle {self.ca_bundle}: {e}") from None
        return self._ssl

    async def fetch(self, etag: str | None) -> Fetched:
        import aiohttp

        headers = {"Accept": "application/json"}
        if etag is not None:
            headers["If-None-Match"] = etag
        timeout = aiohttp.ClientTimeout(total=self.timeout, connect=min(self.timeout, 5.0))
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                    self.url, headers=headers, ssl=self._context(), allow_redirects=False) as resp:
                if resp.status == 304 and etag is not None:
                    return Fetched(None, etag)
                if resp.status != 200:
                    raise KeySetSourceError(f"key set {self.url}: HTTP {resp.status} {resp.reason or ''}".rstrip())
                data = await resp.content.read(MAX_DOCUMENT_SIZE + 1)
                new_etag = resp.headers.get("ETag")
        except aiohttp.ClientConnectorError as e:
            # Its str() names our SSLContext by repr (a memory address in every log line): say it plainly.
            raise KeySetSourceError(f"key set {self.url} unreachable: cannot connect to {e.host}:{e.port}: "
                                    f"{_one_line(e.os_error)}") from None
        except aiohttp.ClientError as e:
            raise KeySetSourceError(f"key set {self.url} unreachable: {_one_line(e)}") from None
        except TimeoutError:
            raise KeySetSourceError(f"key set {self.url}: timed out after {self.timeout:g} s") from None
        _check_size(data, self.location)
        return Fetched(data, new_etag)


class KeySetS3:
    """A key set object `s3://bucket/key`, read with GetObject (IfNoneMatch the last ETag)."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            self.bucket, self.key = parse_s3_object_url(url)
        except LocationError as e:
            raise ValueError(str(e)) from None
        self.url = url
        self.endpoint_url, self.region, self.profile, self.timeout = endpoint_url, region, profile, timeout

    @property
    def location(self) -> str:
        return self.url

    async def fetch(self, etag: str | None) -> Fetched:
        from mediaseal.plumbing import s3 as s3io

        settings = s3io.ClientSettings(endpoint_url=self.endpoint_url, region=self.region, profile=self.profile,
                                       connect_timeout=min(self.timeout, 5.0), read_timeout=self.timeout,
                                       retries=s3io.COMMAND)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if etag is not None:
            args["IfNoneMatch"] = etag
        try:
            async with s3io.open_client(settings) as s3:
                bucket = s3io.S3Bucket(s3, self.bucket, settings=settings)
                resp = await bucket.call("GetObject", self.key, s3.get_object(**args))
                if resp.get("ContentLength", 0) > MAX_DOCUMENT_SIZE:
                    raise KeySetSourceError(f"key set {self.url} is larger than {MAX_DOCUMENT_SIZE} bytes")
                async with resp["Body"] as body:
                    data = await bucket.call("GetObject", self.key, body.read())
        except s3io.S3Error as e:
            if etag is not None and (e.code in ("304", "NotModified") or e.status == 304):
                return Fetched(None, etag)
            if e.status or not e.transient:  # the store answered (or the configuration is wrong)
                raise KeySetSourceError(f"key set {self.url}: {e.code or e.status}: {e.detail}".rstrip(": ")) \
                    from None
            raise KeySetSourceError(f"key set {self.url} unreachable: {e.detail}") from None
        _check_size(data, self.location)
        return Fetched(data, resp.get("ETag"))


def open_keyset_source(spec: str, *, ca_bundle: Path | None = None, endpoint_url: str | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> KeySetSource:
    """The source for a config's `keyset` value: a file path, https:// URL or s3:// URL."""
    scheme = urlsplit(spec).scheme if "://" in spec else ""
    if scheme == "https":
        return KeySetHTTPS(spec, ca_bundle=ca_bundle, timeout=timeout)
    if scheme == "s3":
        return KeySetS3(spec, endpoint_url=endpoint_url, timeout=timeout)
    if scheme:
        raise ValueError(f"key set source must be a file path, https:// or s3:// URL (got {spec!r})")
    return KeySetFile(Path(spec))


class KeySetFollower:
    """The last valid key set from one source, refreshed on request (see the module docstring)."""

    def __init__(self, source: KeySetSource, signer: ed25519.Ed25519PublicKey, *, cache: Path | None = None,
                 min_serial: int = 0) -> None:
        self.source = source
        self.signer = signer
        self.cache = cache
        # A floor kept outside the spool (the agent's config): a fresh agent, or one whose spool was wiped,
        # has no set to compare with and would take any older validly signed one (issue 15, finding 15).
        self.min_serial = min_serial
        self.keyset: KeySet | None = None  # the set in use: the last one that passed every check
        self.etag: str | None = None
        self.digest: str | None = None  # SHA-256 of the document in use
        self.confirmed_at: float | None = None  # wall-clock time the source last served or confirmed it

    def restore(self, now: datetime | None = None) -> KeySet | None:
        """The set a previous run kept in `cache`, if it still passes every check (else None)."""
        if self.cache is None:
            return None
        try:
            data = self.cache.read_bytes()
            mtime = self.cache.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:
            raise KeySetSourceError(f"saved key set {self.cache}: {e.strerror}") from None
        _check_size(data, str(self.cache))
        keyset = self._floor(verify_keyset(data, self.signer, now=now or datetime.now(UTC)), str(self.cache))
        self.keyset, self.etag = keyset, None
        self.digest = hashlib.sha256(data).hexdigest()
        self.confirmed_at = min(mtime, (now or datetime.now(UTC)).timestamp())
        return keyset

    def _floor(self, keyset: KeySet, where: str) -> KeySet:
        if keyset.serial < self.min_serial:
            raise KeySetRollbackError(f"key set from {where} has serial {keyset.serial}, below the configured "
                                      f"keys.min_serial {self.min_serial}: refused (rollback)")
        return keyset

    def _save(self, data: bytes) -> None:
        """Atomically replace the cache (temp, fsync, rename, fsync dir): a crash leaves old or new."""
        if self.cache is None:
            return
        self.cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.cache, data)

    def _confirmed(self) -> None:
        self.confirmed_at = datetime.now(UTC).timestamp()
        if self.cache is not None:
            # The source still serves it: its age restarts (no fsync needed). A failure only makes the
            # age after a restart count from the older mtime.
            with contextlib.suppress(OSError):
                os.utime(self.cache)

    async def refresh(self, now: datetime | None = None) -> KeySet:
        """Fetch and check; returns the set in use (new or unchanged). Raises KeySetError, keeping the old set."""
        now = now or datetime.now(UTC)
        fetched = await self.source.fetch(self.etag if self.keyset is not None else None)
        if fetched.data is None:
            assert self.keyset is not None
            if now > self.keyset.expires_at:
                raise KeySetExpiredError(f"key set serial {self.keyset.serial} from {self.source.location} expired"
                                         f" at {format_time(self.keyset.expires_at)} and was not replaced")
            self._confirmed()
            return self.keyset
        keyset = self._floor(verify_keyset(fetched.data, self.signer, now=now), self.source.location)
        if self.keyset is not None and keyset.serial < self.keyset.serial:
            raise KeySetRollbackError(f"key set from {self.source.location} has serial {keyset.serial}, lower than"
                                      f" the serial {self.keyset.serial} in use: refused (rollback)")
        digest, previous = hashlib.sha256(fetched.data).hexdigest(), self.digest
        self.keyset, self.etag, self.digest = keyset, fetched.etag, digest
        if digest == previous:
            self._confirmed()
            return keyset
        self.confirmed_at = datetime.now(UTC).timestamp()
        try:
            await asyncio.to_thread(self._save, fetched.data)
        except OSError as e:
            # In use all the same (the next refresh confirms it); only a restart would fall back to
            # the older saved set, which is still signed and checked, then fetch this one again.
            raise KeySetSourceError(f"key set serial {keyset.serial} is in use but could not be saved to"
                                    f" {self.cache}: {e.strerror}") from None
        return keyset


def _check_size(data: bytes, where: str) -> None:
    if len(data) > MAX_DOCUMENT_SIZE:
        raise KeySetSourceError(f"key set {where} is larger than {MAX_DOCUMENT_SIZE} bytes")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
