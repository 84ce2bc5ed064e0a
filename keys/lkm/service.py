"""`mediaseal lkm serve`: the reference Local Key Manager, an HTTPS service whose private keys never leave it.

>>> service = LKMService(ServiceConfig(keyring=..., clients=..., audit_log=..., tls_cert=..., tls_key=...))
>>> await service.start(); print(service.url); ...; await service.stop()

API (JSON; every answer carries X-Request-Id and Cache-Control: no-store; errors are
`{"error": {"code", "message"}, "request_id"}` with the codes of keys.lkm.errors):

    GET  /v1/health                  public   deep check: keyring opens, a test wrap/unwrap works, audit log writable
    GET  /v1/keyset                  public   the signed key set (ETag / If-None-Match)
    POST /v1/keyset                  publish  sign and serve a fresh key set {ttl_seconds?}
    GET  /v1/keys                    admin    key records and the current kid
    POST /v1/keys                    admin    new key {pending?: bool, alg?}: immediate rotation, or pending
    POST /v1/keys/{kid}/state        admin    {state: active | decrypt-only | retired}
    POST /v1/unwrap                  unwrap   {kid, alg, wrapped (base64), recording_id?} -> {dek (base64)}
    POST /v1/unwrap-batch            unwrap   {items: [as for unwrap], at most max_batch}
                                              -> {results: [{dek} | {error: {code, message}}]}
    POST /v1/rewrap                  unwrap or admin
                                              {header (base64 package header) | wraps: [...], recording_id?, to?}
                                              -> {wrap: {kid, alg, wrapped}, from: kid}; the DEK never leaves
    OPTIONS /key-management/v1/decrypt   public   (Genesys-compatible shim, with --genesys-keyring)
    POST /key-management/v1/decrypt      unwrap, Hawk   {keypairId, body (base64), decryptType: null} -> {body}
    POST /key-management/v1/keypair      admin, Hawk    -> {id (UUID), publicKey (base64 PKCS#1 DER), dateCreated (ms)}

Every request passes one gate (`_gate`) before any handler: authentication (mTLS / signed request / Hawk),
replay and rate checks, then the role. A request that fails there never reaches its handler; either way
one audit line is made durable before the answer goes out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography.hazmat.primitives import serialization

from mediaseal import codec
from mediaseal.keys.jwk import KID_PATTERN
from mediaseal.keys.keyring import KeyRecord, passphrase_from
from mediaseal.keys.keyset import DEFAULT_TTL_SECONDS, STATES, parse_time, strict_json
from mediaseal.keys.lkm.audit import AuditLog
from mediaseal.keys.lkm.auth import (
    ADMIN,
    FAMILY_HAWK,
    FAMILY_V1,
    MODE_BOTH,
    MODE_HMAC,
    MODE_MTLS,
    MODES,
    PUBLISH,
    UNWRAP,
    Authenticator,
    ClientRegistry,
    NonceCache,
    Principal,
    RequestFacts,
    cert_names,
)
from mediaseal.keys.lkm.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    InternalError,
    LKMConfigError,
    LKMError,
    LKMUnknownKeyError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    RequestTimeoutError,
    TooLargeError,
    UnavailableError,
    UnsupportedError,
)
from mediaseal.keys.lkm.keystore import KeyLoader, KeyStore, open_keyring

_log = logging.getLogger("mediaseal.lkm")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

GENESYS_PREFIX = "/key-management/v1"
# keypairId = UUIDv5(this namespace, kid): stable, stateless, and a kid is found again from its id.
GENESYS_NAMESPACE = uuid.UUID("6f1c7a52-3d0e-5b8f-9a41-2c6d8e0f7b13")
PKCS1_REFUSAL = (
    'decryptType "pkcs1" (RSA PKCS#1 v1.5) is refused: a service that answers PKCS#1 v1.5 decryptions is a '
    "Bleichenbacher padding oracle for every key it holds; wrap with RSA-OAEP (decryptType null)")
_RECORDING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEADER_SAFE = re.compile(r"[^A-Za-z0-9._:@/+=-]")
MAX_WRAPPED = 1024
MAX_HEADER_B64 = 64 * 1024
HEALTH_CACHE_SECONDS = 5.0
REFRESH_EVERY_SECONDS = 1.0


@dataclass
class ServiceConfig:
    """Everything `lkm serve` is told. Secrets (the passphrase) are not printed by repr."""

    keyring: Path
    clients: Path
    audit_log: Path
    tls_cert: Path
    tls_key: Path
    passphrase: bytes | None = field(default=None, repr=False)
    client_ca: Path | None = None
    require_client_cert: bool = False
    auth_mode: str | None = None  # None: "mtls+hmac" with a client CA, else "hmac"
    host: str = "127.0.0.1"
    port: int = 8443
    genesys_keyring: Path | None = None
    replay_window: int = 300
    nonce_cache_size: int = 100_000
    max_body: int = 256 * 1024
    max_batch: int = 256
    rate_limit: float = 200.0  # requests per second per client (burst: twice that); 0 turns it off
    address_rate_limit: float = 500.0  # per remote address, before authentication; 0 turns it off
    max_queue: int = 512  # RSA operations waiting for a worker thread before `overloaded`
    request_timeout: float = 30.0
    body_timeout: float = 10.0
    handshake_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    keyset_ttl: int = DEFAULT_TTL_SECONDS
    keyset_out: Path | None = None
    rotation_check: float = 3600.0  # seconds between schedule checks; 0 turns the hook off
    hawk_require_payload_hash: bool = False
    workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))

    @property
    def mode(self) -> str:
        return self.auth_mode or (MODE_BOTH if self.client_ca else MODE_HMAC)

    def check(self) -> None:
        if self.mode not in MODES:
            raise LKMConfigError(f"--auth must be one of {', '.join(MODES)}")
        if self.mode in (MODE_MTLS, MODE_BOTH) and self.client_ca is None:
            raise LKMConfigError(f"--auth {self.mode} needs --client-ca (the CA that issues client certificates)")
        if self.require_client_cert and self.client_ca is None:
            raise LKMConfigError("--require-client-cert needs --client-ca")
        for name in ("max_body", "max_batch", "max_queue", "replay_window", "nonce_cache_size", "keyset_ttl"):
            if getattr(self, name) < 1:
                raise LKMConfigError(f"{name.replace('_', '-')} must be positive")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation: str
    roles: frozenset[str] = frozenset()  # any one of these; empty with public=False: nobody
    public: bool = False
    family: str = FAMILY_V1


ROUTES = (
    Route("GET", "/v1/health", "health", public=True),
    Route("GET", "/v1/keyset", "keyset.get", public=True),
    Route("POST", "/v1/keyset", "keyset.publish", frozenset({PUBLISH})),
    Route("GET", "/v1/keys", "keys.list", frozenset({ADMIN})),
    Route("POST", "/v1/keys", "keys.create", frozenset({ADMIN})),
    Route("POST", "/v1/keys/{kid}/state", "keys.state", frozenset({ADMIN})),
    Route("POST", "/v1/unwrap", "unwrap", frozenset({UNWRAP})),
    Route("POST", "/v1/unwrap-batch", "unwrap.batch", frozenset({UNWRAP})),
    Route("POST", "/v1/rewrap", "rewrap", frozenset({UNWRAP, ADMIN})),
)
GENESYS_ROUTES = (
    Route("OPTIONS", f"{GENESYS_PREFIX}/decrypt", "genesys.options", public=True, family=FAMILY_HAWK),
    Route("POST", f"{GENESYS_PREFIX}/decrypt", "genesys.decrypt", frozenset({UNWRAP}), family=FAMILY_HAWK),
    Route("POST", f"{GENESYS_PREFIX}/keypair", "genesys.keypair", frozenset({ADMIN}), family=FAMILY_HAWK),
)


@dataclass
class _Call:
    """One request's passage through the gate: what the audit line is made of."""

    request_id: str
    started: float
    operation: str
    body: bytes = b""
    principal: Principal | None = None
    claimed_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # kid, recording_id, ... set by the handler


_CALL = web.RequestKey("mediaseal_lkm_call", _Call)


class RateLimiter:
    """Token buckets by key (client name or remote address), the number of keys bounded."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float | None:
        """None if the request may go ahead, else seconds until it could."""
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


class _TLSSite(web.BaseSite):
    """aiohttp's TCPSite, plus a TLS handshake timeout (a peer that never finishes its handshake is dropped)."""

    __slots__ = ("_bound", "_handshake_timeout", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext,
                 handshake_timeout: float) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=128)
        self._host, self._port, self._handshake_timeout = host, port, handshake_timeout
        self._bound: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        host, port = self._bound or (self._host, self._port)
        return f"https://{f'[{host}]' if ':' in host else host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog, reuse_address=True,
            ssl_handshake_timeout=self._handshake_timeout)
        sock = self._server.sockets[0]
        self._bound = (self._host, sock.getsockname()[1])


class _ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's request-handler logger, minus tracebacks for malformed requests.

    aiohttp logs every request it can't parse (bad request line, header too long, bad chunked encoding...:
    its HttpProcessingError, answered 400) with a full traceback at ERROR. That is
    the client's mistake, expected on any listener, and a stream of them would fill the log with
    tracebacks: here it is one INFO line naming the problem. Anything else (a bug) keeps its traceback.
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


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None, require_client_cert: bool) -> ssl.SSLContext:
    """TLS 1.2+ with the server's certificate; client certificates verified against `client_ca` when given.

    Without `require_client_cert` a client may connect without a certificate and is then refused (or
    not) by the gate, which audits it; a certificate that is presented but does not verify always
    fails the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise LKMConfigError(f"can't load the TLS certificate {cert} / key {key}: {e}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise LKMConfigError(f"can't load the client CA bundle {client_ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def keypair_id(kid: str) -> str:
    """The Genesys keypairId of a kid."""
    return str(uuid.uuid5(GENESYS_NAMESPACE, kid))


class LKMService:
    """The service: key stores, the gate, the handlers, the audit log, and the HTTPS listener."""

    def __init__(self, config: ServiceConfig, *, clock: Callable[[], float] = time.time,
                 loader: KeyLoader = open_keyring) -> None:
        config.check()
        self.config = config
        self.clock = clock
        self.stats: Counter[str] = Counter()  # handler:<operation> each time a handler runs; outcome:<code>
        self._loader = loader
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="lkm-crypto")
        self._queued = 0
        self._client_limit = RateLimiter(config.rate_limit, 2 * config.rate_limit)
        self._address_limit = RateLimiter(config.address_rate_limit, 2 * config.address_rate_limit)
        self._admin_lock = asyncio.Lock()
        self._handlers: dict[Handler, Route] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._health: tuple[float, int, dict[str, Any]] | None = None
        self._last_refresh = 0.0
        self._keyset: bytes = b""
        self._keyset_etag = ""
        self._keyset_issued = 0.0
        self._runner: web.AppRunner | None = None
        self._site: _TLSSite | None = None
        self.audit: AuditLog | None = None
        self.store: KeyStore | None = None
        self.genesys: KeyStore | None = None
        self.registry = ClientRegistry.load(config.clients)
        self.authenticator = Authenticator(
            self.registry, NonceCache(config.nonce_cache_size, config.replay_window), mode=config.mode,
            window=config.replay_window, require_hawk_payload_hash=config.hawk_require_payload_hash, clock=clock)

    # -- life cycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._site is None:
            raise RuntimeError("the service is not started")
        return self._site.name

    async def start(self) -> None:
        """Open everything, then listen. On any failure what was opened is closed again before the error goes up."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        ssl_context = server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.client_ca, cfg.require_client_cert)
        self.store = await self._run(KeyStore, cfg.keyring, cfg.passphrase, loader=self._loader)
        if cfg.genesys_keyring is not None:
            self.genesys = await self._run(KeyStore, cfg.genesys_keyring, cfg.passphrase, loader=self._loader)
        self.audit = AuditLog(cfg.audit_log, clock=self.clock)
        await self._publish()
        await self.audit.start()
        await self.audit.append({
            "operation": "service.start", "outcome": "ok", "kid": self.store.ring.current().kid,
            "auth_mode": cfg.mode, "genesys": self.genesys is not None, "pid": os.getpid(),
        })

        @web.middleware
        async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._gate(request, handler)

        app = web.Application(client_max_size=cfg.max_body, middlewares=[gate])
        app.on_response_prepare.append(self._headers)
        for route in ROUTES + (GENESYS_ROUTES if self.genesys is not None else ()):
            handler = self._endpoint(route)
            app.router.add_route(route.method, route.path, handler)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=cfg.keepalive_timeout,
                                     max_line_size=8190, max_field_size=8190, max_headers=64,
                                     logger=http_protocol_logger("mediaseal.lkm.http"))
        await self._runner.setup()
        self._site = _TLSSite(self._runner, cfg.host, cfg.port, ssl_context, cfg.handshake_timeout)
        try:
            await self._site.start()
        except OSError as e:
            raise LKMConfigError(f"can't listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="lkm-housekeeping"))
        _log.info("listening", extra={"fields": {
            "url": self.url, "auth": cfg.mode, "genesys": self.genesys is not None,
            "current_kid": self.store.ring.current().kid}})

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.audit is not None:
            if self.audit.started:
                with contextlib.suppress(LKMError):
                    await self.audit.append({"operation": "service.stop", "outcome": "ok", "pid": os.getpid()})
            await self.audit.close()
            self.audit = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    def reload_clients(self) -> None:
        """SIGHUP: read the clients file again (a credential added or removed); a bad file keeps the old one."""
        try:
            registry = ClientRegistry.load(self.config.clients)
        except LKMConfigError as e:
            _log.error("clients file not reloaded; keeping the previous one", extra={"fields": {"error": str(e)}})
            return
        self.registry = self.authenticator.registry = registry
        _log.info("clients file reloaded", extra={"fields": {"clients": len(registry.clients)}})

    async def _housekeeping(self) -> None:
        """Re-sign the key set at half its life; run the rotation schedule hook."""
        cfg = self.config
        next_rotation = time.monotonic()
        while True:
            if cfg.rotation_check > 0 and time.monotonic() >= next_rotation:
                next_rotation = time.monotonic() + cfg.rotation_check
                try:
                    await self._rotation_hook()
                except Exception as e:  # the schedule must never take the service down
                    _log.error("scheduled rotation check failed", extra={"fields": {"error": str(e)}})
            if self.clock() - self._keyset_issued > cfg.keyset_ttl / 2:
                try:
                    await self._publish()
                except Exception as e:
                    _log.error("key set refresh failed", extra={"fields": {"error": str(e)}})
            await asyncio.sleep(min(60.0, cfg.keyset_ttl / 4))

    async def _rotation_hook(self) -> None:
        # --- ROTATION HOOK (issue 5; the schedule logic belongs to keys.rotation) -----------------
        # The service runs the same schedule as `mediaseal keys rotate --if-due`:
        # keys.rotation.rotate_if_due(keyring, passphrase) does at most one due step (pending key,
        # activation after the grace period) and describes it; it is called here every
        # `rotation_check` seconds, under the store's lock, and a change republishes the key set.
        # (Looked up at run time so the service still runs where keys.rotation is absent.)
        try:
            rotation = importlib.import_module("mediaseal.keys.rotation")
        except ModuleNotFoundError:
            return
        rotate_if_due = getattr(rotation, "rotate_if_due", None)
        if not callable(rotate_if_due):
            return
        store = self._store()
        async with self._admin_lock:
            serial_before = [(r.kid, r.state) for r in store.ring.records()]
            what = await self._run(store.apply, lambda ring, passphrase: rotate_if_due(ring, passphrase))
            if [(r.kid, r.state) for r in store.ring.records()] != serial_before:
                _log.info("scheduled rotation", extra={"fields": {"step": str(what)}})
                await self._publish()

    async def _publish(self) -> None:
        store = self._store()
        document = await self._run(store.publish, self.config.keyset_ttl)
        self._keyset = document
        self._keyset_etag = '"' + hashlib.sha256(document).hexdigest()[:32] + '"'
        self._keyset_issued = self.clock()
        if self.config.keyset_out is not None:
            await self._run(_write_atomic, self.config.keyset_out, document)
        _log.info("key set published", extra={"fields": {"serial": store.ring.serial,
                                                          "current_kid": store.ring.current().kid}})

    async def _refresh(self) -> None:
        """Pick up keyring changes made by others (at most once a second); republish if there were any."""
        now = time.monotonic()
        if now - self._last_refresh < REFRESH_EVERY_SECONDS:
            return
        self._last_refresh = now
        store = self._store()
        try:
            changed = await self._run(store.refresh)
        except Exception as e:
            raise UnavailableError(f"the keyring can't be opened: {e}") from None
        if self.genesys is not None:
            await self._run(self.genesys.refresh)
        if changed:
            async with self._admin_lock:
                await self._publish()

    def _store(self) -> KeyStore:
        if self.store is None:
            raise UnavailableError("the service is not started")
        return self.store

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _crypto(self, fn: Callable[..., T], *args: Any, weight: int = 1) -> T:
        """RSA work on the worker threads, with a bound on how much may wait: past it, `overloaded`."""
        if self._queued + weight > self.config.max_queue:
            raise OverloadedError("too many key operations queued; try again shortly", retry_after=1)
        self._queued += weight
        try:
            return await self._run(fn, *args)
        finally:
            self._queued -= weight

    # -- the gate -----------------------------------------------------------------------------------

    def _endpoint(self, route: Route) -> Handler:
        method = getattr(self, "_op_" + route.operation.replace(".", "_"))

        async def handler(request: web.Request) -> web.StreamResponse:
            self.stats[f"handler:{route.operation}"] += 1
            result: web.StreamResponse = await method(request)
            return result

        self._handlers[handler] = route
        return handler

    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = self._handlers.get(request.match_info.handler)
        family = route.family if route else (FAMILY_HAWK if request.path.startswith(GENESYS_PREFIX) else FAMILY_V1)
        call = _Call(uuid.uuid4().hex, time.monotonic(), route.operation if route else "unknown")
        request[_CALL] = call
        response: web.StreamResponse
        try:
            if self.audit is None or self.audit.broken is not None:
                raise UnavailableError("the audit log is not writable; nothing is answered unaudited")
            retry = self._address_limit.take(request.remote or "?")
            if retry is not None:
                raise RateLimitedError("too many requests from this address", retry_after=retry)
            if route is None or not route.public:
                call.claimed_id = _claimed_id(request.headers.get("Authorization"))
                call.body = await self._read_body(request)
                facts = RequestFacts(
                    method=request.method, path_qs=request.raw_path, host=request.headers.get("Host", ""),
                    authorization=request.headers.get("Authorization"),
                    content_type=request.headers.get("Content-Type", ""), body=call.body,
                    cert_names=_peer_names(request))
                call.principal = self.authenticator.authenticate(facts, family)
                retry = self._client_limit.take(call.principal.name)
                if retry is not None:
                    raise RateLimitedError("this client is over its request rate", retry_after=retry)
                if route is None:
                    _raise_route_error(request)
                    raise NotFoundError("no such endpoint")
                if not route.roles & call.principal.client.roles:
                    raise ForbiddenError(f"client {call.principal.name} lacks the role "
                                         f"{' or '.join(sorted(route.roles))} for {route.operation}")
            await self._refresh()
            try:
                async with asyncio.timeout(self.config.request_timeout):
                    response = await handler(request)
            except TimeoutError:
                raise OverloadedError(f"the request took longer than {self.config.request_timeout:g} s",
                                      retry_after=1) from None
            outcome = "ok"
        except LKMError as e:
            response, outcome = self._error_response(e, call, family), e.code
            call.fields.setdefault("detail", e.message)
        except web.HTTPException as e:  # aiohttp's own (e.g. a malformed request line); answered in our shape
            err = _from_http_exception(e)
            response, outcome = self._error_response(err, call, family), err.code
            call.fields.setdefault("detail", err.message)
        except Exception:
            _log.exception("internal error", extra={"fields": {"request_id": call.request_id}})
            err = InternalError("internal error; the service log has the details under this request id")
            response, outcome = self._error_response(err, call, family), err.code
        self.stats[f"outcome:{outcome}"] += 1
        try:
            await self._audit(request, call, outcome, response.status)
        except LKMError as e:  # the line is not on disk: whatever the handler made does not go out
            response = self._error_response(e, call, family)
        response.headers["X-Request-Id"] = call.request_id
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.config.max_body:
            raise TooLargeError(f"request body is larger than {self.config.max_body} bytes")
        try:
            async with asyncio.timeout(self.config.body_timeout):
                return await request.read()
        except TimeoutError:
            raise RequestTimeoutError(f"request body not received within {self.config.body_timeout:g} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise TooLargeError(f"request body is larger than {self.config.max_body} bytes") from None

    def _error_response(self, e: LKMError, call: _Call, family: str) -> web.Response:
        headers = dict(e.headers)
        if e.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(e.retry_after + 0.999)))
        if e.status == 401 and "WWW-Authenticate" not in headers:
            headers["WWW-Authenticate"] = "Hawk" if family == FAMILY_HAWK else "MediaSeal-HMAC-SHA256"
        return web.json_response({"error": {"code": e.code, "message": e.message}, "request_id": call.request_id},
                                 status=e.status, headers=headers, dumps=_dumps)

    async def _audit(self, request: web.Request, call: _Call, outcome: str, status: int) -> None:
        assert self.audit is not None
        p = call.principal
        entry: dict[str, Any] = {
            "request_id": call.request_id, "operation": call.operation, "method": request.method,
            "path": request.path[:256], "remote": request.remote, "outcome": outcome, "status": status,
            "latency_ms": round((time.monotonic() - call.started) * 1000, 3),
            "principal": p.name if p else None,
        }
        if p is not None:
            entry["via"] = p.via
            if p.credential_id is not None:
                entry["credential_id"] = p.credential_id
        elif call.claimed_id is not None:
            entry["claimed_id"] = call.claimed_id
        entry.update(call.fields)
        await self.audit.append(entry)

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = "mediaseal-lkm"
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"

    # -- /v1 ------------------------------------------------------------------------------------------

    async def _op_health(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_CACHE_SECONDS:
            checks: dict[str, str] = {}
            ok = True
            for name, store in (("keyring", self.store), ("genesys_keyring", self.genesys)):
                if store is None:
                    continue
                try:
                    await self._crypto(store.self_test)
                    checks[name] = "ok"
                except Exception as e:
                    ok, checks[name] = False, f"failing: {type(e).__name__}"
            audit_ok = self.audit is not None and self.audit.broken is None
            checks["audit_log"] = "ok" if audit_ok else "failing"
            ok = ok and audit_ok
            self._health = (now, 200 if ok else 503, {"status": "ok" if ok else "failing", "checks": checks})
        return web.json_response(self._health[2], status=self._health[1], dumps=_dumps)

    async def _op_keyset_get(self, request: web.Request) -> web.StreamResponse:
        headers = {"ETag": self._keyset_etag, "Cache-Control": "no-cache"}
        if self._keyset_etag in _etags(request.headers.get("If-None-Match", "")):
            return web.Response(status=304, headers=headers)
        return web.Response(body=self._keyset, content_type="application/json", headers=headers)

    async def _op_keyset_publish(self, request: web.Request) -> web.StreamResponse:
        doc = _doc(request, optional={"ttl_seconds"})
        ttl = doc.get("ttl_seconds", self.config.keyset_ttl)
        if not _is_int(ttl) or not 60 <= ttl <= 366 * 86400:
            raise BadRequestError("ttl_seconds must be a whole number from 60 to 31622400")
        async with self._admin_lock:
            document = await self._run(self._store().publish, ttl)
            self._keyset, self._keyset_issued = document, self.clock()
            self._keyset_etag = '"' + hashlib.sha256(document).hexdigest()[:32] + '"'
        _call(request).fields["serial"] = self._store().ring.serial
        return web.Response(body=document, content_type="application/json", headers={"ETag": self._keyset_etag})

    async def _op_keys_list(self, request: web.Request) -> web.StreamResponse:
        ring = self._store().ring
        current = ring.current().kid
        return _json({"current": current, "keys": [{**r.to_json(), "current": r.kid == current}
                                                   for r in ring.records()]})

    async def _op_keys_create(self, request: web.Request) -> web.StreamResponse:
        doc = _doc(request, optional={"pending", "alg"})
        pending = doc.get("pending", False)
        alg = doc.get("alg")
        if not isinstance(pending, bool):
            raise BadRequestError("pending must be true or false")
        if alg is not None and alg not in codec.WRAP_ALGORITHMS:
            raise UnsupportedError(f"alg must be one of {', '.join(codec.WRAP_ALGORITHMS)}")
        store = self._store()
        async with self._admin_lock:
            rec = await self._run(store.create, pending=pending, alg=alg)
            await self._publish()
        _call(request).fields.update(kid=rec.kid, state=rec.state)
        return _json({"key": rec.to_json(), "current": store.ring.current().kid}, status=201)

    async def _op_keys_state(self, request: web.Request) -> web.StreamResponse:
        kid = request.match_info["kid"]
        if not KID_PATTERN.fullmatch(kid):
            raise BadRequestError("kid must be a 43-character base64url JWK thumbprint")
        doc = _doc(request, required={"state"})
        state = doc["state"]
        if state not in STATES or state == "pending":
            raise BadRequestError("state must be active, decrypt-only or retired")
        _call(request).fields.update(kid=kid, state=state)
        store = self._store()
        async with self._admin_lock:
            rec = await self._run(store.set_state, kid, state)
            await self._publish()
        return _json({"key": rec.to_json(), "current": store.ring.current().kid})

    async def _op_unwrap(self, request: web.Request) -> web.StreamResponse:
        doc = _doc(request, required={"kid", "alg", "wrapped"}, optional={"recording_id"})
        wrap, recording_id = _wrap_item(doc)
        _call(request).fields.update(kid=wrap.kid, recording_id=recording_id)
        dek = await self._crypto(self._store().unwrap, wrap)
        return _json({"dek": _b64(dek)})

    async def _op_unwrap_batch(self, request: web.Request) -> web.StreamResponse:
        doc = _doc(request, required={"items"})
        items = doc["items"]
        if not isinstance(items, list) or not items:
            raise BadRequestError("items must be a non-empty list")
        if len(items) > self.config.max_batch:
            raise TooLargeError(f"a batch holds at most {self.config.max_batch} items")
        parsed: list[tuple[codec.Wrap, str | None] | LKMError] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not {"kid", "alg", "wrapped"} <= set(item) <= {
                    "kid", "alg", "wrapped", "recording_id"}:
                raise BadRequestError(f"items[{i}] must have kid, alg, wrapped and may have recording_id")
            try:
                parsed.append(_wrap_item(item, f"items[{i}]."))
            except LKMError as e:
                parsed.append(e)
        store = self._store()
        if self._queued + len(items) > self.config.max_queue:
            raise OverloadedError("too many key operations queued; try again shortly", retry_after=1)

        async def one(p: tuple[codec.Wrap, str | None] | LKMError) -> dict[str, Any]:
            if isinstance(p, LKMError):
                return {"error": {"code": p.code, "message": p.message}}
            try:
                return {"dek": _b64(await self._crypto(store.unwrap, p[0]))}
            except LKMError as e:
                return {"error": {"code": e.code, "message": e.message}}

        results = await asyncio.gather(*(one(p) for p in parsed))
        _call(request).fields["items"] = [
            {"kid": p[0].kid, "recording_id": p[1], "outcome": r.get("error", {}).get("code", "ok")}
            if not isinstance(p, LKMError) else {"outcome": p.code}
            for p, r in zip(parsed, results, strict=True)]
        return _json({"results": results})

    async def _op_rewrap(self, request: web.Request) -> web.StreamResponse:
        doc = _doc(request, optional={"header", "wraps", "recording_id", "to"})
        if ("header" in doc) == ("wraps" in doc):
            raise BadRequestError("give exactly one of header (the package header, base64) or wraps")
        header: codec.Header | None = None
        recording_id = doc.get("recording_id")
        if "header" in doc:
            raw = _b64_member(doc, "header", MAX_HEADER_B64)
            try:
                header = codec.parse_header(raw)
            except codec.CodecError as e:
                raise BadRequestError(f"header is not a package header: {e}") from None
            wraps = list(header.wraps)
            recording_id = header.metadata.recording_id
        else:
            if not isinstance(doc["wraps"], list) or not 1 <= len(doc["wraps"]) <= 16:
                raise BadRequestError("wraps must be a list of 1 to 16 wraps")
            wraps = []
            for i, w in enumerate(doc["wraps"]):
                if not isinstance(w, dict) or set(w) != {"kid", "alg", "wrapped"}:
                    raise BadRequestError(f"wraps[{i}] must have exactly kid, alg and wrapped")
                wraps.append(_wrap_item(w, f"wraps[{i}].")[0])
        if recording_id is not None and not (isinstance(recording_id, str) and _RECORDING_ID.fullmatch(recording_id)):
            raise BadRequestError("recording_id must be 1-128 characters of A-Z a-z 0-9 . _ -")
        to = doc.get("to")
        if to is not None and (not isinstance(to, str) or not KID_PATTERN.fullmatch(to)):
            raise BadRequestError("to must be a kid")
        call = _call(request)
        call.fields.update(recording_id=recording_id, kid=[w.kid for w in wraps])
        new, used = await self._crypto(_rewrap, self._store(), wraps, header, to)
        call.fields.update(kid=used, to_kid=new.kid)
        return _json({"wrap": {"kid": new.kid, "alg": new.alg, "wrapped": _b64(new.wrapped)}, "from": used})

    # -- the Genesys-compatible shim ----------------------------------------------------------------------

    async def _op_genesys_options(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, headers={"Allow": "POST, OPTIONS"})

    async def _op_genesys_decrypt(self, request: web.Request) -> web.StreamResponse:
        doc = _doc(request, required={"keypairId", "body"}, optional={"decryptType"}, lenient=True)
        call = _call(request)
        keypair, body, decrypt_type = doc["keypairId"], doc["body"], doc.get("decryptType")
        if not isinstance(keypair, str) or len(keypair) > 64:
            raise BadRequestError("keypairId must be a keypair id (a UUID)")
        call.fields.update(keypair_id=keypair, on_behalf_of=_user_id(request))
        if decrypt_type is not None:
            if decrypt_type == "pkcs1":
                raise UnsupportedError(PKCS1_REFUSAL)
            raise BadRequestError('decryptType must be null (RSA-OAEP); "pkcs1" is refused')
        if not isinstance(body, str):
            raise BadRequestError("body must be the base64 of the wrapped key")
        wrapped = _b64_decode(body.replace("\r", "").replace("\n", ""), "body", MAX_WRAPPED)
        assert self.genesys is not None
        kid = _kid_of_keypair(self.genesys, keypair)
        call.fields["kid"] = kid
        dek = await self._crypto(self.genesys.unwrap_oaep_sha1, kid, wrapped)
        return _json({"body": _b64(dek)})

    async def _op_genesys_keypair(self, request: web.Request) -> web.StreamResponse:
        store = self.genesys
        assert store is not None
        async with self._admin_lock:
            rec: KeyRecord = await self._run(store.create, alg=codec.RSA_OAEP)
        der = store.ring.public_key(rec.kid).public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.PKCS1)
        created = int(parse_time(rec.created_at).timestamp() * 1000)
        _call(request).fields.update(kid=rec.kid, keypair_id=keypair_id(rec.kid), on_behalf_of=_user_id(request))
        return _json({"id": keypair_id(rec.kid), "publicKey": _b64(der), "dateCreated": created})


# -- helpers ---------------------------------------------------------------------------------------------


def _rewrap(store: KeyStore, wraps: list[codec.Wrap], header: codec.Header | None,
            to: str | None) -> tuple[codec.Wrap, str]:
    """Unwrap the first wrap held here (checking the package's key commitment when the header came), wrap anew."""
    failure: LKMError | None = None
    for w in wraps:
        try:
            dek = store.unwrap(w)
        except LKMUnknownKeyError:
            continue
        except LKMError as e:
            failure = e
            continue
        if header is not None:
            try:
                header.open(dek)
            except codec.AuthenticationError:
                raise ConflictError("the unwrapped key does not open this package header "
                                    "(wrong wrap, or the header was altered)") from None
        return store.wrap(dek, to), w.kid
    if failure is not None:
        raise failure
    raise LKMUnknownKeyError("none of the wraps is for a usable key here: "
                             + ", ".join(w.kid for w in wraps))


def _kid_of_keypair(store: KeyStore, keypair: str) -> str:
    for rec in store.ring.records():
        if keypair_id(rec.kid) == keypair.lower():
            return rec.kid
    raise LKMUnknownKeyError(f"no keypair {keypair} here")


def _call(request: web.Request) -> _Call:
    return request[_CALL]


def _doc(request: web.Request, required: set[str] | frozenset[str] = frozenset(),
         optional: set[str] | frozenset[str] = frozenset(), *, lenient: bool = False) -> dict[str, Any]:
    """The request body as a JSON object with exactly these members (`lenient`: others are ignored)."""
    body = _call(request).body
    if not body.strip() and not required:
        return {}

    try:
        doc = strict_json(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadRequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequestError("the body must be a JSON object")
    missing = set(required) - set(doc)
    unknown = set(doc) - set(required) - set(optional)
    if missing:
        raise BadRequestError(f"missing member(s): {', '.join(sorted(missing))}")
    if unknown and not lenient:
        raise BadRequestError(f"unknown member(s): {', '.join(sorted(unknown))}")
    return doc


def _wrap_item(doc: dict[str, Any], where: str = "") -> tuple[codec.Wrap, str | None]:
    kid, alg, recording_id = doc["kid"], doc["alg"], doc.get("recording_id")
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise BadRequestError(f"{where}kid must be a 43-character base64url JWK thumbprint")
    if not isinstance(alg, str) or alg not in codec.WRAP_ALGORITHMS:
        raise UnsupportedError(f"{where}alg must be one of {', '.join(codec.WRAP_ALGORITHMS)}")
    if recording_id is not None and (not isinstance(recording_id, str) or not _RECORDING_ID.fullmatch(recording_id)):
        raise BadRequestError(f"{where}recording_id must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return codec.Wrap(kid, alg, _b64_member(doc, "wrapped", MAX_WRAPPED, where)), recording_id


def _b64_member(doc: dict[str, Any], name: str, max_bytes: int, where: str = "") -> bytes:
    value = doc[name]
    if not isinstance(value, str):
        raise BadRequestError(f"{where}{name} must be a base64 string")
    return _b64_decode(value, where + name, max_bytes)


def _b64_decode(value: str, name: str, max_bytes: int) -> bytes:
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise BadRequestError(f"{name} is longer than {max_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{name} is not base64") from None
    if not data:
        raise BadRequestError(f"{name} is empty")
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=_dumps)


def _etags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


def _user_id(request: web.Request) -> str | None:
    """Genesys sends the user behind a request in PureCloud-User-Id; kept for the audit, sanitised."""
    value = request.headers.get("PureCloud-User-Id")
    return _HEADER_SAFE.sub("?", value[:128]) if value else None


def _claimed_id(authorization: str | None) -> str | None:
    """The credential id a request claims (for the audit of a refusal), sanitised; never more of the header."""
    if not authorization:
        return None
    m = re.search(r'\bid="([^"]{1,128})"', authorization)
    return _HEADER_SAFE.sub("?", m.group(1)) if m else None


def _peer_names(request: web.Request) -> frozenset[str] | None:
    transport = request.transport
    if transport is None:
        return None
    return cert_names(transport.get_extra_info("peercert"))


def _raise_route_error(request: web.Request) -> None:
    exc = getattr(request.match_info, "http_exception", None)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        raise MethodNotAllowedError(f"{request.method} is not allowed here (allowed: "
                                    f"{', '.join(sorted(exc.allowed_methods))})")


def _from_http_exception(e: web.HTTPException) -> LKMError:
    if e.status == 413:
        return TooLargeError("request body is too large")
    if e.status == 404:
        return NotFoundError("no such endpoint")
    if e.status == 405:
        return MethodNotAllowedError("method not allowed")
    return BadRequestError(e.reason or "bad request")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # a key set is public
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- the command -------------------------------------------------------------------------------------------


def _sd_notify(message: str) -> None:
    """systemd's readiness protocol (Type=notify), if NOTIFY_SOCKET is set. Best effort."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        s.sendall(message.encode())


async def _watchdog() -> None:
    """WATCHDOG=1 from the event loop every third of WatchdogSec (when systemd asks for it): a wedged loop restarts."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return
    while True:
        _sd_notify("WATCHDOG=1")
        await asyncio.sleep(int(usec) / 3e6)


async def serve(config: ServiceConfig, *, ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT. SIGHUP re-reads the clients file."""
    service = LKMService(config)
    await service.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_clients)
    _sd_notify("READY=1\nSTATUS=serving " + service.url)
    watchdog = asyncio.create_task(_watchdog(), name="lkm-watchdog")
    if ready is not None:
        ready(service.url)
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        _sd_notify("STOPPING=1")
        _log.info("stopping")
        await service.stop()


def config_from_args(args: Any) -> ServiceConfig:
    """The ServiceConfig from `mediaseal lkm serve` options (see keys.lkm.options)."""
    host, _, port = str(args.listen).rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise LKMConfigError(f"--listen must be HOST:PORT, not {args.listen!r}")
    return ServiceConfig(
        keyring=Path(args.keyring), clients=Path(args.clients), audit_log=Path(args.audit_log),
        tls_cert=Path(args.tls_cert), tls_key=Path(args.tls_key),
        passphrase=passphrase_from(os.environ, args.passphrase_file),
        client_ca=Path(args.client_ca) if args.client_ca else None,
        require_client_cert=args.require_client_cert, auth_mode=args.auth, host=host.strip("[]"), port=int(port),
        genesys_keyring=Path(args.genesys_keyring) if args.genesys_keyring else None,
        replay_window=args.replay_window, max_body=args.max_body, max_batch=args.max_batch,
        rate_limit=args.rate_limit, request_timeout=args.request_timeout, keyset_ttl=args.keyset_ttl,
        keyset_out=Path(args.keyset_out) if args.keyset_out else None, rotation_check=args.rotation_check,
        hawk_require_payload_hash=args.hawk_require_payload_hash,
    )


def serve_command(args: Any) -> None:
    """`mediaseal lkm serve`: build the config, serve until told to stop. Errors are LKMError (one line)."""
    config = config_from_args(args)
    asyncio.run(serve(config))
