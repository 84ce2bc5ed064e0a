"""What every mediaseal HTTP listener shares: TLS, the listening site, protocol logging, rate limits, JSON.

>>> ctx = server_ssl_context(cert, key, client_ca, require_client_cert=True)
>>> runner = app_runner(app, "mediaseal.serve.http", keepalive_timeout=15.0); await runner.setup()
>>> site = ListenSite(runner, "127.0.0.1", 0, ctx, handshake_timeout=10.0); await site.start(); site.name

Three aiohttp listeners use it: the Local Key Manager (keys/lkm/service.py), the playback server
(export/serve.py) and the agent's health/metrics listener (agent/service.py). Each states its own
routes, authentication and error shape; what must hold the same on all three lives here, once:

- TLS: 1.2 at least, the server certificate loaded or a TLSContextError (one line, no traceback).
  Client certificates, when a CA is given, are verified against it; a presented certificate that
  does not verify always fails the handshake; `require_client_cert` decides whether no certificate
  at all fails it too (else the application decides, and can audit the refusal).
- Slow and idle clients are dropped: a TLS handshake not finished within `handshake_timeout`, and a
  connection that has not sent a whole request within `keepalive_timeout` of opening or of its last
  answer (aiohttp's own default lets a slowloris hold a connection for many minutes). Request lines
  and header fields are bounded (8190 bytes), and so is the number of headers (64).
- A request aiohttp cannot parse is its HttpProcessingError, answered 400 by aiohttp and logged here
  as ONE INFO line (a stream of them from a scanner must not fill the log with tracebacks); anything
  else (a bug) keeps its traceback. No access log: each server audits requests its own way.
- Rate limits are token buckets per key (a client name, a remote address) with a bounded number of
  keys, so a flood of new addresses costs bounded memory.
- JSON answers are compact ASCII and `Cache-Control: no-store` unless the caller says otherwise;
  strong ETags are 128 bits of a SHA-256 of what identifies the representation.

Imports nothing of ours (plumbing is the bottom layer): callers map TLSContextError to their errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import ssl
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

__all__ = [
    "HANDSHAKE_SECONDS", "KEEPALIVE_SECONDS", "ListenSite", "RateLimiter", "TLSContextError", "app_runner",
    "cert_names", "dumps", "http_protocol_logger", "json_response", "peer_cert_names", "server_ssl_context",
    "strong_etag",
]

# A connection that has not sent a whole request within this many seconds of opening (or of its last
# answer) is closed.
KEEPALIVE_SECONDS = 15.0
HANDSHAKE_SECONDS = 10.0  # a TLS handshake not finished by then is dropped (asyncio's default: 60)
MAX_LINE = 8190  # request line, and each header field
MAX_HEADERS = 64


class TLSContextError(Exception):
    """The certificate, its key or the client CA bundle can't be loaded (one line, naming the file)."""


TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!SHA1:!SHA256:!SHA384"


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None = None, *,
                       require_client_cert: bool) -> ssl.SSLContext:
    """TLS 1.2+ with the server's certificate; client certificates verified against `client_ca` when given.

    Without `require_client_cert` a client may connect without a certificate and the application
    decides (the LKM's gate refuses and audits it); a certificate that is presented but does not
    verify always fails the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: forward-secret AEAD suites only (OpenSSL's default list still offers CBC ones); TLS 1.3's
    # suites are all AEAD and not set here.
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TLSContextError(f"can't load the TLS certificate {cert} / key {key}: {e}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise TLSContextError(f"can't load the client CA bundle {client_ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def cert_names(peercert: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The names of a verified peer certificate (ssl.getpeercert() form): its SAN DNS/URI entries, or, only
    when it has none, its subject CN (RFC 6125 section 6.4.4: a CN beside a SAN is not an identity; a CA
    that checks the SAN it signs may not check the CN at all)."""
    if not peercert:
        return None
    names = {value for kind, value in peercert.get("subjectAltName", ()) if kind in ("DNS", "URI")}
    if not names:
        for rdn in peercert.get("subject", ()):
            names.update(value for key, value in rdn if key == "commonName")
    return frozenset(names)


def peer_cert_names(request: web.BaseRequest) -> frozenset[str] | None:
    """The names of the client certificate this request's connection verified, or None (none presented)."""
    transport = request.transport
    if transport is None:
        return None
    return cert_names(transport.get_extra_info("peercert"))


# -- logging -----------------------------------------------------------------------------------------


class _ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's request-handler logger, minus tracebacks for malformed requests.

    aiohttp logs every request it can't parse (bad request line, header too long, bad chunked
    encoding...: its HttpProcessingError, answered 400) with a full traceback at ERROR. That is the
    client's mistake, expected on any listener: here it is one INFO line naming the problem.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            first = (exc.message or "").strip().splitlines()[:1]
            self.logger.info("malformed request refused", extra={"fields": {
                "what": str(msg) % args if args else str(msg), "status": exc.code,
                "error": first[0][:200] if first else type(exc).__name__}})
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def http_protocol_logger(name: str) -> logging.LoggerAdapter[logging.Logger]:
    """The `logger` for an aiohttp AppRunner: malformed requests are one line each, never a traceback."""
    return _ProtocolLog(logging.getLogger(name), {})


# -- the listener ------------------------------------------------------------------------------------


def app_runner(app: web.Application, logger_name: str, *,
               keepalive_timeout: float = KEEPALIVE_SECONDS) -> web.AppRunner:
    """An AppRunner with the shared limits: no access log, no signal handling (the caller's), the
    keep-alive bound, bounded request lines, header fields and header count, the one-line protocol log."""
    return web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=keepalive_timeout,
                         max_line_size=MAX_LINE, max_field_size=MAX_LINE, max_headers=MAX_HEADERS,
                         logger=http_protocol_logger(logger_name))


class ListenSite(web.BaseSite):
    """aiohttp's TCPSite plus a TLS handshake timeout, and the address it really bound (port 0 too)."""

    __slots__ = ("_bound", "_handshake_timeout", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                 *, handshake_timeout: float = HANDSHAKE_SECONDS) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=128)
        self._host, self._port, self._handshake_timeout = host, port, handshake_timeout
        self._bound: tuple[str, int] | None = None

    @property
    def address(self) -> str:
        """host:port as bound ([v6]:port for an IPv6 address)."""
        host, port = self._bound or (self._host, self._port)
        return f"{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context is not None else 'http'}://{self.address}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog, reuse_address=True,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context is not None else None)
        bound = self._server.sockets[0].getsockname()
        # The name asked for (a TLS client checks it against the certificate), unless it was a wildcard.
        self._bound = (bound[0] if _unspecified(self._host) else self._host, bound[1])


def _unspecified(host: str) -> bool:
    try:
        return not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# -- requests and answers ----------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by key (client name or remote address), the number of keys bounded."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float | None:
        """None if the request may go ahead, else seconds until it could. A rate of 0 never limits."""
        if self.rate <= 0:
            return None
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return None


def strong_etag(data: bytes) -> str:
    """A strong ETag for a representation identified by `data` (128 bits of its SHA-256, quoted)."""
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def dumps(obj: Any) -> str:
    """Compact ASCII JSON, the form of every answer."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer, `Cache-Control: no-store` unless `headers` say otherwise."""
    merged = {"Cache-Control": "no-store", **(headers or {})}
    return web.json_response(obj, status=status, headers=merged, dumps=dumps)
