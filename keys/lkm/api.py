"""The Local Key Manager's own /v1 API: the handlers, each behind the gate (keys.lkm.gate).

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

A handler sees an authenticated, authorised request whose body the gate has read; it validates every
member strictly (unknown members refused, sizes bounded before decoding), does its RSA work on the
service's worker threads (`KeyWork.crypto`, bounded: past `max_queue`, `overloaded`), and notes the
ids it touched (kid, recording_id, never key material) for the audit line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web

from mediaseal import codec
from mediaseal.keys.jwk import KID_PATTERN
from mediaseal.keys.keyset import STATES
from mediaseal.keys.lkm.auth import Role
from mediaseal.keys.lkm.config import ServiceConfig
from mediaseal.keys.lkm.errors import (
    BadRequestError,
    ConflictError,
    LKMError,
    LKMUnknownKeyError,
    TooLargeError,
    UnsupportedError,
)
from mediaseal.keys.lkm.gate import Handler, Route, call_of, request_doc
from mediaseal.keys.lkm.keystore import KeyStore
from mediaseal.plumbing.http import json_response

T = TypeVar("T")
_RECORDING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_WRAPPED = 1024
MAX_HEADER_B64 = 64 * 1024


@dataclass(frozen=True)
class PublishedKeySet:
    """The signed key set being served, and its ETag."""

    document: bytes = b""
    etag: str = ""


class KeyWork(Protocol):
    """What the handlers rely on from the service (keys.lkm.service.LKMService)."""

    @property
    def config(self) -> ServiceConfig: ...

    @property
    def admin_lock(self) -> asyncio.Lock:
        """Held around every change to a keyring and the key set published after it."""

    @property
    def keyset(self) -> PublishedKeySet: ...

    def keystore(self) -> KeyStore:
        """The main keyring's store; UnavailableError before the service started."""

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` on a worker thread (keyring work that may block)."""

    async def crypto(self, fn: Callable[..., T], *args: Any) -> T:
        """RSA work on a worker thread; `overloaded` if `max_queue` operations already wait."""

    def check_room(self, n: int) -> None:
        """`overloaded` unless `n` more RSA operations may queue."""

    async def publish(self, ttl: int | None = None) -> PublishedKeySet:
        """Sign and serve a fresh key set (the caller holds `admin_lock`)."""

    async def health(self) -> tuple[int, dict[str, Any]]:
        """The deep check's status and body."""


class V1API:
    """The /v1 handlers over the service's key work."""

    def __init__(self, work: KeyWork) -> None:
        self.work = work

    def routes(self) -> list[tuple[Route, Handler]]:
        return [
            (Route("GET", "/v1/health", "health", public=True), self.health),
            (Route("GET", "/v1/keyset", "keyset.get", public=True), self.keyset_get),
            (Route("POST", "/v1/keyset", "keyset.publish", frozenset({Role.PUBLISH})), self.keyset_publish),
            (Route("GET", "/v1/keys", "keys.list", frozenset({Role.ADMIN})), self.keys_list),
            (Route("POST", "/v1/keys", "keys.create", frozenset({Role.ADMIN})), self.keys_create),
            (Route("POST", "/v1/keys/{kid}/state", "keys.state", frozenset({Role.ADMIN})), self.keys_state),
            (Route("POST", "/v1/unwrap", "unwrap", frozenset({Role.UNWRAP})), self.unwrap),
            (Route("POST", "/v1/unwrap-batch", "unwrap.batch", frozenset({Role.UNWRAP})), self.unwrap_batch),
            (Route("POST", "/v1/rewrap", "rewrap", frozenset({Role.UNWRAP, Role.ADMIN})), self.rewrap),
        ]

    async def health(self, request: web.Request) -> web.StreamResponse:
        status, body = await self.work.health()
        return json_response(body, status)

    async def keyset_get(self, request: web.Request) -> web.StreamResponse:
        keyset = self.work.keyset
        headers = {"ETag": keyset.etag, "Cache-Control": "no-cache"}
        if keyset.etag in _etags(request.headers.get("If-None-Match", "")):
            return web.Response(status=304, headers=headers)
        return web.Response(body=keyset.document, content_type="application/json", headers=headers)

    async def keyset_publish(self, request: web.Request) -> web.StreamResponse:
        doc = request_doc(request, optional={"ttl_seconds"})
        ttl = doc.get("ttl_seconds", self.work.config.keyset_ttl)
        if not _is_int(ttl) or not 60 <= ttl <= 366 * 86400:
            raise BadRequestError("ttl_seconds must be a whole number from 60 to 31622400")
        async with self.work.admin_lock:
            keyset = await self.work.publish(ttl)
        call_of(request).fields["serial"] = self.work.keystore().ring.serial
        return web.Response(body=keyset.document, content_type="application/json", headers={"ETag": keyset.etag})

    async def keys_list(self, request: web.Request) -> web.StreamResponse:
        ring = self.work.keystore().ring
        current = ring.current().kid
        return json_response({"current": current, "keys": [{**r.to_json(), "current": r.kid == current}
                                                           for r in ring.records()]})

    async def keys_create(self, request: web.Request) -> web.StreamResponse:
        doc = request_doc(request, optional={"pending", "alg"})
        pending = doc.get("pending", False)
        alg = doc.get("alg")
        if not isinstance(pending, bool):
            raise BadRequestError("pending must be true or false")
        if alg is not None and alg not in codec.WRAP_ALGORITHMS:
            raise UnsupportedError(f"alg must be one of {', '.join(codec.WRAP_ALGORITHMS)}")
        store = self.work.keystore()
        async with self.work.admin_lock:
            rec = await self.work.run(store.create, pending=pending, alg=alg)
            await self.work.publish()
        call_of(request).fields.update(kid=rec.kid, state=rec.state)
        return json_response({"key": rec.to_json(), "current": store.ring.current().kid}, 201)

    async def keys_state(self, request: web.Request) -> web.StreamResponse:
        kid = request.match_info["kid"]
        if not KID_PATTERN.fullmatch(kid):
            raise BadRequestError("kid must be a 43-character base64url JWK thumbprint")
        doc = request_doc(request, required={"state"})
        state = doc["state"]
        if state not in STATES or state == "pending":
            raise BadRequestError("state must be active, decrypt-only or retired")
        call_of(request).fields.update(kid=kid, state=state)
        store = self.work.keystore()
        async with self.work.admin_lock:
            rec = await self.work.run(store.set_state, kid, state)
            await self.work.publish()
        return json_response({"key": rec.to_json(), "current": store.ring.current().kid})

    async def unwrap(self, request: web.Request) -> web.StreamResponse:
        doc = request_doc(request, required={"kid", "alg", "wrapped"}, optional={"recording_id"})
        wrap, recording_id = _wrap_item(doc)
        call_of(request).fields.update(kid=wrap.kid, recording_id=recording_id)
        dek = await self.work.crypto(self.work.keystore().unwrap, wrap)
        return json_response({"dek": b64(dek)})

    async def unwrap_batch(self, request: web.Request) -> web.StreamResponse:
        doc = request_doc(request, required={"items"})
        items = doc["items"]
        if not isinstance(items, list) or not items:
            raise BadRequestError("items must be a non-empty list")
        if len(items) > self.work.config.max_batch:
            raise TooLargeError(f"a batch holds at most {self.work.config.max_batch} items")
        parsed: list[tuple[codec.Wrap, str | None] | LKMError] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not {"kid", "alg", "wrapped"} <= set(item) <= {
                    "kid", "alg", "wrapped", "recording_id"}:
                raise BadRequestError(f"items[{i}] must have kid, alg, wrapped and may have recording_id")
            try:
                parsed.append(_wrap_item(item, f"items[{i}]."))
            except LKMError as e:
                parsed.append(e)
        store = self.work.keystore()
        self.work.check_room(len(items))

        async def one(p: tuple[codec.Wrap, str | None] | LKMError) -> dict[str, Any]:
            if isinstance(p, LKMError):
                return {"error": {"code": p.code, "message": p.message}}
            try:
                return {"dek": b64(await self.work.crypto(store.unwrap, p[0]))}
            except LKMError as e:
                return {"error": {"code": e.code, "message": e.message}}

        results = await asyncio.gather(*(one(p) for p in parsed))
        call_of(request).fields["items"] = [
            {"kid": p[0].kid, "recording_id": p[1], "outcome": r.get("error", {}).get("code", "ok")}
            if not isinstance(p, LKMError) else {"outcome": p.code}
            for p, r in zip(parsed, results, strict=True)]
        return json_response({"results": results})

    async def rewrap(self, request: web.Request) -> web.StreamResponse:
        doc = request_doc(request, optional={"header", "wraps", "recording_id", "to"})
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
        call = call_of(request)
        call.fields.update(recording_id=recording_id, kid=[w.kid for w in wraps])
        new, used = await self.work.crypto(_rewrap, self.work.keystore(), wraps, header, to)
        call.fields.update(kid=used, to_kid=new.kid)
        return json_response({"wrap": {"kid": new.kid, "alg": new.alg, "wrapped": b64(new.wrapped)}, "from": used})


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
    return b64_decode(value, where + name, max_bytes)


def b64_decode(value: str, name: str, max_bytes: int) -> bytes:
    """Strict base64 of 1 to `max_bytes` bytes, its length checked before decoding (BadRequestError)."""
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise BadRequestError(f"{name} is longer than {max_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{name} is not base64") from None
    if not data:
        raise BadRequestError(f"{name} is empty")
    return data


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _etags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}
