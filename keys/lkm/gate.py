"""The gate every Local Key Manager request passes before any handler: authentication, limits, role, audit.

>>> gate = Gate(config, authenticator, audit, before=service.refresh, stats=service.stats)
>>> app = web.Application(client_max_size=config.max_body, middlewares=[gate.middleware()])
>>> gate.add(app, Route("POST", "/v1/unwrap", "unwrap", frozenset({UNWRAP})), api.unwrap)

In this order, and a request that fails a step never reaches its handler:

1. Fail closed: if the audit log is broken, every request is `unavailable` (nothing is answered unaudited).
2. The per-address rate limit (before authentication, so a flood of bad credentials is bounded too).
3. For every route that is not public (and for unknown paths, so a scanner learns nothing without
   credentials): the body is read within `body_timeout` and at most `max_body` bytes, then
   authenticated (mTLS / HMAC-signed request / Hawk: keys.lkm.auth, which holds the replay window and
   the nonce cache), then the per-client rate limit, then the route's role.
4. The handler runs within `request_timeout`.

Whatever the outcome, one audit line (request id, operation, principal or the id a refused request
claimed, outcome, status, latency, and the fields the handler noted) is durable before the answer goes
out; if it can't be written the answer is replaced by `unavailable`. Errors are LKMError, answered as
`{"error": {"code", "message"}, "request_id"}`; anything else is `internal`, its traceback in the
service log under the request id. Every answer carries X-Request-Id and Cache-Control: no-store.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from mediaseal.keys.keyset import strict_json
from mediaseal.keys.lkm.audit import ChainedAuditLog
from mediaseal.keys.lkm.auth import Authenticator, Family, Principal, RequestFacts, Role
from mediaseal.keys.lkm.config import ServiceConfig
from mediaseal.keys.lkm.errors import (
    BadRequestError,
    ForbiddenError,
    InternalError,
    LKMError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    RequestTimeoutError,
    TooLargeError,
    UnavailableError,
)
from mediaseal.plumbing.http import RateLimiter, json_response, peer_cert_names

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HEADER_UNSAFE = re.compile(r"[^A-Za-z0-9._:@/+=-]")
_log = logging.getLogger("mediaseal.lkm")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation: str
    roles: frozenset[Role] = frozenset()  # any one of these; empty with public=False: nobody
    public: bool = False
    family: Family = Family.V1


@dataclass
class Call:
    """One request's passage through the gate: what the audit line is made of."""

    request_id: str
    started: float
    operation: str
    body: bytes = b""
    principal: Principal | None = None
    claimed_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # kid, recording_id, ... set by the handler


_CALL = web.RequestKey("mediaseal_lkm_call", Call)


def call_of(request: web.Request) -> Call:
    """The gate's record of this request: its body (already read) and the fields for its audit line."""
    return request[_CALL]


def request_doc(request: web.Request, required: set[str] | frozenset[str] = frozenset(),
                optional: set[str] | frozenset[str] = frozenset(), *, lenient: bool = False) -> dict[str, Any]:
    """The body the gate read as a JSON object with exactly these members (`lenient`: others are ignored)."""
    body = call_of(request).body
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


def header_safe(value: str) -> str:
    """A client-supplied header value fit for the audit line: 128 characters, unusual ones as '?'."""
    return _HEADER_UNSAFE.sub("?", value[:128])


class Gate:
    """The middleware and the route table: see the module docstring for what a request goes through."""

    def __init__(self, config: ServiceConfig, authenticator: Authenticator, audit: ChainedAuditLog, *,
                 before: Callable[[], Awaitable[None]], stats: Counter[str],
                 hawk_prefixes: tuple[str, ...] = ()) -> None:
        self.config, self.authenticator, self.audit = config, authenticator, audit
        self.stats = stats  # handler:<operation> each time a handler runs; outcome:<code>
        self._before = before
        self._hawk_prefixes = hawk_prefixes
        self._client_limit = RateLimiter(config.rate_limit, 2 * config.rate_limit)
        self._address_limit = RateLimiter(config.address_rate_limit, 2 * config.address_rate_limit)
        self._routes: dict[Handler, Route] = {}

    def add(self, app: web.Application, route: Route, handler: Handler) -> None:
        """Serve `route` with `handler`, behind the gate."""

        async def endpoint(request: web.Request) -> web.StreamResponse:
            self.stats[f"handler:{route.operation}"] += 1
            return await handler(request)

        self._routes[endpoint] = route
        app.router.add_route(route.method, route.path, endpoint)

    def middleware(self) -> Middleware:
        @web.middleware
        async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._pass(request, handler)

        return gate

    @staticmethod
    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: the headers every answer carries."""
        response.headers["Server"] = "mediaseal-lkm"
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"

    async def _pass(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = self._routes.get(request.match_info.handler)
        family = route.family if route else (Family.HAWK if request.path.startswith(self._hawk_prefixes)
                                             else Family.V1)
        call = Call(uuid.uuid4().hex, time.monotonic(), route.operation if route else "unknown")
        request[_CALL] = call
        response: web.StreamResponse
        try:
            if self.audit.broken is not None:
                raise UnavailableError("the audit log is not writable; nothing is answered unaudited")
            retry = self._address_limit.take(request.remote or "?")
            if retry is not None:
                raise RateLimitedError("too many requests from this address", retry_after=retry)
            if route is None or not route.public:
                await self._authenticate(request, call, route, family)
            await self._before()
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

    async def _authenticate(self, request: web.Request, call: Call, route: Route | None, family: Family) -> None:
        call.claimed_id = _claimed_id(request.headers.get("Authorization"))
        call.body = await self._read_body(request)
        facts = RequestFacts(
            method=request.method, path_qs=request.raw_path, host=request.headers.get("Host", ""),
            authorization=request.headers.get("Authorization"),
            content_type=request.headers.get("Content-Type", ""), body=call.body,
            cert_names=peer_cert_names(request))
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

    def _error_response(self, e: LKMError, call: Call, family: Family) -> web.Response:
        headers = dict(e.headers)
        if e.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(e.retry_after + 0.999)))
        if e.status == 401 and "WWW-Authenticate" not in headers:
            headers["WWW-Authenticate"] = "Hawk" if family is Family.HAWK else "MediaSeal-HMAC-SHA256"
        return json_response({"error": {"code": e.code, "message": e.message}, "request_id": call.request_id},
                             e.status, headers)

    async def _audit(self, request: web.Request, call: Call, outcome: str, status: int) -> None:
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


def _claimed_id(authorization: str | None) -> str | None:
    """The credential id a request claims (for the audit of a refusal), sanitised; never more of the header."""
    if not authorization:
        return None
    m = re.search(r'\bid="([^"]{1,128})"', authorization)
    return header_safe(m.group(1)) if m else None


def _raise_route_error(request: web.Request) -> None:
    exc = request.match_info.http_exception
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
