"""The Genesys Cloud-compatible Local Key Manager shim (served with `--genesys-keyring`), behind the gate.

    OPTIONS /key-management/v1/decrypt   public   (Genesys probes it)
    POST /key-management/v1/decrypt      unwrap, Hawk   {keypairId, body (base64), decryptType: null} -> {body}
    POST /key-management/v1/keypair      admin, Hawk    -> {id (UUID), publicKey (base64 PKCS#1 DER), dateCreated (ms)}

Its own keyring (RSA-OAEP with SHA-1, what Genesys wraps with), never the main one. A keypairId is
UUIDv5(GENESYS_NAMESPACE, kid): stable, stateless, and the kid is found again from the id. PKCS#1 v1.5
(`decryptType: "pkcs1"`) is refused outright: answering it would make the service a Bleichenbacher
padding oracle for every key it holds. Members Genesys may add are ignored (lenient), and the user a
request is made for (PureCloud-User-Id) goes to the audit line, sanitised.
"""

from __future__ import annotations

import uuid

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from mediaseal import codec
from mediaseal.keys.keyring import KeyRecord
from mediaseal.keys.keyset import parse_time
from mediaseal.keys.lkm.api import MAX_WRAPPED, KeyWork, b64, b64_decode
from mediaseal.keys.lkm.auth import Family, Role
from mediaseal.keys.lkm.errors import BadRequestError, LKMUnknownKeyError, UnsupportedError
from mediaseal.keys.lkm.gate import Handler, Route, call_of, header_safe, request_doc
from mediaseal.keys.lkm.keystore import KeyStore
from mediaseal.plumbing.http import json_response

GENESYS_PREFIX = "/key-management/v1"
# keypairId = UUIDv5(this namespace, kid): stable, stateless, and a kid is found again from its id.
GENESYS_NAMESPACE = uuid.UUID("6f1c7a52-3d0e-5b8f-9a41-2c6d8e0f7b13")
PKCS1_REFUSAL = (
    'decryptType "pkcs1" (RSA PKCS#1 v1.5) is refused: a service that answers PKCS#1 v1.5 decryptions is a '
    "Bleichenbacher padding oracle for every key it holds; wrap with RSA-OAEP (decryptType null)")


def keypair_id(kid: str) -> str:
    """The Genesys keypairId of a kid."""
    return str(uuid.uuid5(GENESYS_NAMESPACE, kid))


class GenesysShim:
    """The shim's handlers over its own key store (`work.genesys`)."""

    def __init__(self, work: KeyWork, store: KeyStore) -> None:
        self.work, self.store = work, store

    def routes(self) -> list[tuple[Route, Handler]]:
        hawk, decrypt, keypair = Family.HAWK, f"{GENESYS_PREFIX}/decrypt", f"{GENESYS_PREFIX}/keypair"
        return [
            (Route("OPTIONS", decrypt, "genesys.options", public=True, family=hawk), self.options),
            (Route("POST", decrypt, "genesys.decrypt", frozenset({Role.UNWRAP}), family=hawk), self.decrypt),
            (Route("POST", keypair, "genesys.keypair", frozenset({Role.ADMIN}), family=hawk), self.keypair),
        ]

    async def options(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, headers={"Allow": "POST, OPTIONS"})

    async def decrypt(self, request: web.Request) -> web.StreamResponse:
        doc = request_doc(request, required={"keypairId", "body"}, optional={"decryptType"}, lenient=True)
        call = call_of(request)
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
        wrapped = b64_decode(body.replace("\r", "").replace("\n", ""), "body", MAX_WRAPPED)
        kid = _kid_of_keypair(self.store, keypair)
        call.fields["kid"] = kid
        dek = await self.work.crypto(self.store.unwrap_oaep_sha1, kid, wrapped)
        return json_response({"body": b64(dek)})

    async def keypair(self, request: web.Request) -> web.StreamResponse:
        async with self.work.admin_lock:
            rec: KeyRecord = await self.work.run(self.store.create, alg=codec.RSA_OAEP)
        der = self.store.ring.public_key(rec.kid).public_bytes(serialization.Encoding.DER,
                                                               serialization.PublicFormat.PKCS1)
        created = int(parse_time(rec.created_at).timestamp() * 1000)
        call_of(request).fields.update(kid=rec.kid, keypair_id=keypair_id(rec.kid), on_behalf_of=_user_id(request))
        return json_response({"id": keypair_id(rec.kid), "publicKey": b64(der), "dateCreated": created})


def _kid_of_keypair(store: KeyStore, keypair: str) -> str:
    for rec in store.ring.records():
        if keypair_id(rec.kid) == keypair.lower():
            return rec.kid
    raise LKMUnknownKeyError(f"no keypair {keypair} here")


def _user_id(request: web.Request) -> str | None:
    """Genesys sends the user behind a request in PureCloud-User-Id; kept for the audit, sanitised."""
    value = request.headers.get("PureCloud-User-Id")
    return header_safe(value) if value else None
