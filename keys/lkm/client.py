"""The `lkm` key provider: unwrap DEKs through a Local Key Manager, whose private keys never leave it.

>>> client = LKMClient("https://lkm.example:8443", credential=load_client_credential(Path("lkm.toml")),
...                    ca_file=Path("ca.pem"))
>>> reader = codec.open_package(f, client)                 # a codec.Unwrapper: synchronous unwrap(wraps)
>>> async with client:
...     deks = await client.unwrap_batch([(wrap, "rec-1"), (wrap2, "rec-2")])   # bytes or an LKMError each

Requests are signed (MediaSeal-HMAC-SHA256, a fresh nonce per attempt) when a credential is given,
and carry a client certificate when one is given; the server is verified against `ca_file` (or the
system store). Connect and read timeouts apply to every attempt; only 429/503 answers and timeouts
are retried (at most `attempts` tries, full-jitter exponential backoff, Retry-After honoured up to
the cap) and only for idempotent calls. DEKs are cached in memory for `cache_ttl` seconds (at most
`cache_size` of them; 0 turns the cache off), keyed by the wrap, so a package read twice costs one
round trip. An unreachable service is one KeyServiceUnreachableError ("key service unreachable: ...").
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
import random
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import aiohttp
from yarl import URL

from mediaseal import codec
from mediaseal.keys.lkm.auth import MIN_SECRET_CHARS, load_secret_document, sign_request
from mediaseal.keys.lkm.errors import (
    ERROR_CLASSES,
    RETRYABLE_CODES,
    KeyServiceUnreachableError,
    LKMConfigError,
    LKMError,
    LKMUnknownKeyError,
    ProtocolError,
    UnwrapFailedError,
)

T = TypeVar("T")
MAX_RESPONSE = 4 << 20
_session_var: contextvars.ContextVar[aiohttp.ClientSession | None] = contextvars.ContextVar(
    "lkm_session", default=None)


@dataclass(frozen=True)
class ClientCredential:
    """The client's signing credential: its id and shared secret (repr hides the secret)."""

    id: str
    secret: bytes = field(repr=False)


def load_client_credential(path: Path) -> ClientCredential:
    """A credentials file: TOML (.toml) or JSON with `id` and `secret`; no access for others allowed."""
    path = Path(path)
    doc = load_secret_document(path, "LKM credentials file",
                               "allow no access to others and no group write (chmod 0600)", detail=False)
    if not isinstance(doc, dict) or set(doc) != {"id", "secret"} or not all(isinstance(v, str) for v in doc.values()):
        raise LKMConfigError(f"LKM credentials file {path} must have exactly the string members id and secret")
    if len(doc["secret"]) < MIN_SECRET_CHARS:
        raise LKMConfigError(f"LKM credentials file {path}: the secret must be at least {MIN_SECRET_CHARS} characters")
    return ClientCredential(doc["id"], doc["secret"].encode("utf-8"))


def client_ssl_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise LKMConfigError(f"can't load the LKM client TLS files: {e}") from None
    return ctx


class _DEKCache:
    """DEKs by wrap, each for `ttl` seconds, at most `size` of them (least recently used go first)."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float]) -> None:
        self.ttl, self.size, self.clock = ttl, size, clock
        self._items: OrderedDict[tuple[str, str, bytes], tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(w: codec.Wrap) -> tuple[str, str, bytes]:
        return w.kid, w.alg, hashlib.sha256(w.wrapped).digest()

    def get(self, w: codec.Wrap) -> bytes | None:
        if self.ttl <= 0 or self.size <= 0:
            return None
        k = self.key(w)
        with self._lock:
            item = self._items.get(k)
            if item is None:
                return None
            if item[1] <= self.clock():
                del self._items[k]
                return None
            self._items.move_to_end(k)
            return item[0]

    def put(self, w: codec.Wrap, dek: bytes) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        with self._lock:
            self._items[self.key(w)] = (dek, self.clock() + self.ttl)
            self._items.move_to_end(self.key(w))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class LKMClient:
    """A Local Key Manager client. Synchronous `unwrap` (codec.Unwrapper) and async calls for everything."""

    def __init__(self, url: str, *, credential: ClientCredential | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 30.0, attempts: int = 4, backoff_base: float = 0.2, backoff_cap: float = 5.0,
                 cache_ttl: float = 60.0, cache_size: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        base = URL(url)
        if base.scheme != "https" or not base.host:
            raise LKMConfigError(f"the key service URL must be https://HOST[:PORT][/PATH], not {url!r}")
        if cert_file is None and key_file is not None:
            raise LKMConfigError("a client key needs its certificate (--lkm-cert)")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.url = str(base).rstrip("/")
        self.credential = credential
        self._ssl = client_ssl_context(ca_file, cert_file, key_file)
        self._timeout = aiohttp.ClientTimeout(total=connect_timeout + read_timeout, connect=connect_timeout,
                                              sock_connect=connect_timeout, sock_read=read_timeout)
        self.attempts, self.backoff_base, self.backoff_cap = attempts, backoff_base, backoff_cap
        self.cache = _DEKCache(cache_ttl, cache_size, clock)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"LKMClient({self.url!r})"

    # -- codec.Unwrapper ---------------------------------------------------------------------------------

    def unwrap(self, wraps: Sequence[codec.Wrap]) -> bytes:
        """The package's DEK, from the cache or the service. Blocks; usable from any thread."""
        for w in wraps:
            dek = self.cache.get(w)
            if dek is not None:
                return dek
        return self._sync(lambda: self.unwrap_async(wraps))

    def rewrap(self, header: codec.Header, to: str | None = None) -> codec.Wrap:
        """A new wrap of the package's DEK for the service's current key (or `to`); the DEK stays in the service."""
        return self._sync(lambda: self.rewrap_async(header, to))

    # -- async --------------------------------------------------------------------------------------------

    async def unwrap_async(self, wraps: Sequence[codec.Wrap], recording_id: str | None = None) -> bytes:
        """Try the wraps in order; the first the service holds a key for gives the DEK."""
        for w in wraps:
            dek = self.cache.get(w)
            if dek is not None:
                return dek
        failure: LKMError | None = None
        skipped: list[str] = []
        for w in wraps:
            if w.alg not in codec.WRAP_ALGORITHMS:
                skipped.append(f"{w.kid} ({w.alg})")
                continue
            doc: dict[str, Any] = {"kid": w.kid, "alg": w.alg, "wrapped": _b64(w.wrapped)}
            if recording_id is not None:
                doc["recording_id"] = recording_id
            try:
                answer = await self.request("POST", "/v1/unwrap", doc)
            except LKMUnknownKeyError:
                skipped.append(w.kid)
                continue
            except UnwrapFailedError as e:
                failure = e
                continue
            dek = _b64_answer(answer, "dek")
            self.cache.put(w, dek)
            return dek
        if failure is not None:
            raise failure
        raise codec.NoMatchingKeyError(
            f"the key service at {self.url} holds no usable key for the package's wraps: {', '.join(skipped)}")

    async def unwrap_batch(self, items: Sequence[codec.Wrap | tuple[codec.Wrap, str | None]],
                           ) -> list[bytes | LKMError]:
        """One DEK (or the error for it) per item, in order. Cached ones are not asked for again."""
        pairs = [(i, None) if isinstance(i, codec.Wrap) else i for i in items]
        out: list[bytes | LKMError | None] = [self.cache.get(w) for w, _ in pairs]
        todo = [n for n, d in enumerate(out) if d is None]
        for start in range(0, len(todo), 256):
            chunk = todo[start:start + 256]
            docs = []
            for n in chunk:
                w, rid = pairs[n]
                d: dict[str, Any] = {"kid": w.kid, "alg": w.alg, "wrapped": _b64(w.wrapped)}
                if rid is not None:
                    d["recording_id"] = rid
                docs.append(d)
            answer = await self.request("POST", "/v1/unwrap-batch", {"items": docs})
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list) or len(results) != len(chunk):
                raise ProtocolError(f"key service at {self.url}: the batch answer does not match the request")
            for n, r in zip(chunk, results, strict=True):
                if isinstance(r, dict) and "dek" in r:
                    dek = _b64_answer(r, "dek")
                    self.cache.put(pairs[n][0], dek)
                    out[n] = dek
                else:
                    out[n] = _error_from(r.get("error") if isinstance(r, dict) else None, self.url, None)
        return [d if d is not None else ProtocolError("missing result") for d in out]

    async def rewrap_async(self, header: codec.Header, to: str | None = None) -> codec.Wrap:
        doc: dict[str, Any] = {"header": _b64(header.encode())}
        if to is not None:
            doc["to"] = to
        answer = await self.request("POST", "/v1/rewrap", doc)
        w = answer.get("wrap") if isinstance(answer, dict) else None
        if not isinstance(w, dict) or not isinstance(w.get("kid"), str) or not isinstance(w.get("alg"), str):
            raise ProtocolError(f"key service at {self.url}: the rewrap answer has no wrap")
        return codec.Wrap(w["kid"], w["alg"], _b64_answer(w, "wrapped"))

    async def health(self) -> Any:
        return await self.request("GET", "/v1/health")

    async def keyset(self) -> bytes:
        """The signed key set document (verify it with keys.verify_keyset before use)."""
        return await self.request("GET", "/v1/keyset", raw=True)  # type: ignore[no-any-return]

    async def keys(self) -> Any:
        return await self.request("GET", "/v1/keys")

    async def create_key(self, *, pending: bool = False, alg: str | None = None) -> Any:
        doc: dict[str, Any] = {"pending": pending}
        if alg is not None:
            doc["alg"] = alg
        return await self.request("POST", "/v1/keys", doc, idempotent=False)

    async def set_state(self, kid: str, state: str) -> Any:
        return await self.request("POST", f"/v1/keys/{kid}/state", {"state": state}, idempotent=False)

    # -- plumbing -----------------------------------------------------------------------------------------

    async def __aenter__(self) -> LKMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32), timeout=self._timeout)

    def _session_now(self) -> aiohttp.ClientSession:
        s = _session_var.get()
        if s is not None:
            return s
        if self._session is None or self._session.closed:
            self._session = self._new_session()
        return self._session

    def _sync(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run an async call to completion on a private event loop with its own short-lived session."""

        async def run() -> T:
            session = self._new_session()
            token = _session_var.set(session)
            try:
                return await fn()
            finally:
                _session_var.reset(token)
                await session.close()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(run())
        with ThreadPoolExecutor(max_workers=1) as pool:  # called from inside an event loop: use another thread
            return pool.submit(asyncio.run, run()).result()

    async def request(self, method: str, path: str, doc: Any = None, *, idempotent: bool = True,
                      raw: bool = False) -> Any:
        """One API call: signed, retried on 429/503/timeouts if idempotent; errors as LKMError subclasses."""
        body = b"" if doc is None else json.dumps(doc, separators=(",", ":")).encode()
        url = URL(self.url + path, encoded=True)
        last: str = ""
        for attempt in range(1, self.attempts + 1):
            headers = {"Accept": "application/json"}
            if doc is not None:
                headers["Content-Type"] = "application/json"
            if self.credential is not None:
                headers["Authorization"] = sign_request(self.credential.id, self.credential.secret, method,
                                                        url.raw_path_qs, body)
            retry_after: float | None = None
            try:
                async with self._session_now().request(method, url, data=body or None, headers=headers,
                                                       allow_redirects=False) as resp:
                    data = await _read_bounded(resp)
                    status, retry_header = resp.status, resp.headers.get("Retry-After")
            except TimeoutError:
                last = f"no answer within the timeout ({attempt} attempt{'s' if attempt > 1 else ''})"
                if idempotent and attempt < self.attempts:
                    await asyncio.sleep(self._backoff(attempt, None))
                    continue
                raise KeyServiceUnreachableError(f"key service unreachable: {self.url}: {last}") from None
            except aiohttp.ClientConnectorCertificateError as e:
                raise KeyServiceUnreachableError(
                    f"key service unreachable: {self.url}: its TLS certificate does not verify "
                    f"({e.certificate_error})") from None
            except aiohttp.ClientSSLError as e:
                raise KeyServiceUnreachableError(f"key service unreachable: {self.url}: TLS handshake failed "
                                                 f"({_reason(e)})") from None
            except aiohttp.ClientConnectorError as e:
                raise KeyServiceUnreachableError(f"key service unreachable: {self.url}: {_reason(e)}") from None
            except aiohttp.ClientError as e:  # the connection closed under us (a refused client certificate, ...)
                raise KeyServiceUnreachableError(f"key service unreachable: {self.url}: {_reason(e)}") from None
            if 200 <= status < 300:
                if raw:
                    return data
                try:
                    return json.loads(data)
                except ValueError:
                    raise ProtocolError(f"key service at {self.url} answered HTTP {status} with non-JSON") from None
            if status == 304:
                return b"" if raw else None
            try:
                retry_after = float(retry_header) if retry_header else None
            except ValueError:
                retry_after = None
            err = _error_from(_error_doc(data), self.url, status, retry_after)
            if idempotent and err.code in RETRYABLE_CODES and attempt < self.attempts:
                await asyncio.sleep(self._backoff(attempt, retry_after))
                continue
            raise err
        raise KeyServiceUnreachableError(f"key service unreachable: {self.url}: {last}")  # pragma: no cover

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))  # noqa: S311
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_cap))
        return delay


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    out = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        out += chunk
        if len(out) > MAX_RESPONSE:
            raise ProtocolError(f"key service answer is larger than {MAX_RESPONSE} bytes")
    return bytes(out)


def _error_doc(data: bytes) -> Any:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None


def _error_from(error: Any, url: str, status: int | None, retry_after: float | None = None) -> LKMError:
    if (not isinstance(error, dict) or error.get("code") not in ERROR_CLASSES
            or not isinstance(error.get("message"), str)):
        what = f"HTTP {status}" if status is not None else "an item"
        return ProtocolError(f"key service at {url} answered {what} without an error this client knows")
    cls = ERROR_CLASSES[error["code"]]
    return cls(f"key service: {error['code']}: {error['message']}", retry_after=retry_after)


def _reason(e: BaseException) -> str:
    os_error = getattr(e, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64_answer(doc: Any, name: str) -> bytes:
    value = doc.get(name) if isinstance(doc, dict) else None
    try:
        if isinstance(value, str) and (data := base64.b64decode(value, validate=True)):
            return data
    except ValueError:
        pass
    raise ProtocolError(f"key service answer has no valid base64 {name!r}")


def rewrap_package(src: BinaryIO, dst: BinaryIO, client: LKMClient, *, to: str | None = None,
                   keep_existing: bool = False) -> codec.Header:
    """Copy a package with a new wrap from the service (the DEK never leaves it); the body is untouched."""
    header = codec.read_header(src)
    new = client.rewrap(header, to)
    kept = tuple(w for w in header.wraps if keep_existing and w.kid != new.kid)
    out = header.with_wraps((*kept, new))
    dst.write(out.encode())
    while block := src.read(1 << 20):
        dst.write(block)
    return out


def client_from_options(url: str, *, credentials: Path | None = None, ca: Path | None = None,
                        cert: Path | None = None, key: Path | None = None, timeout: float = 30.0) -> LKMClient:
    """The client the command line's --lkm options describe."""
    if credentials is None and cert is None:
        raise LKMConfigError("--lkm needs a way to authenticate: --lkm-credentials FILE and/or --lkm-cert/--lkm-key")
    credential = load_client_credential(credentials) if credentials is not None else None
    return LKMClient(url, credential=credential, ca_file=ca, cert_file=cert, key_file=key, read_timeout=timeout)
