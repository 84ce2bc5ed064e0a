"""The published key set: which KEKs exist, which one is current, signed (Ed25519) by the key service.

>>> doc = build_keyset(keys, current=kid, serial=7, signer=signing_key, ttl_seconds=86400)
>>> keyset = verify_keyset(doc, load_signer(open("signer.pem", "rb").read()))
>>> header, dek_keys = codec.new_package(metadata, [keyset.recipient()])

Document (JSON): {"format": "mediaseal-keyset/1", "payload": b64url(canonical JSON), "signature":
b64url(Ed25519 over the payload bytes), "signer": b64url(SHA-256(raw Ed25519 public key))}. The payload is
{"issued_at", "expires_at", "serial", "current", "keys": [{"kid", "alg", "kty", "n", "e", "state"}]}.
The signature is checked before anything inside the payload is looked at.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mediaseal.codec import WRAP_ALGORITHMS, Recipient
from mediaseal.keys.errors import (
    BadSignatureError,
    InvalidJWKError,
    KeySetExpiredError,
    KeySetFormatError,
    KeyStateError,
    UnknownKeyError,
)
from mediaseal.keys.jwk import KID_PATTERN, b64url_decode, b64url_encode, public_jwk, public_key_from_jwk, thumbprint

FORMAT = "mediaseal-keyset/1"


class KeyState(StrEnum):
    """A KEK's life: published as pending (agents warm up), active (current), decrypt-only, retired.

    A StrEnum, so key set documents and keyring.json keep the plain strings and compare equal to them.
    """

    PENDING = "pending"
    ACTIVE = "active"
    DECRYPT_ONLY = "decrypt-only"
    RETIRED = "retired"


PENDING, ACTIVE, DECRYPT_ONLY, RETIRED = KeyState.PENDING, KeyState.ACTIVE, KeyState.DECRYPT_ONLY, KeyState.RETIRED
STATES: tuple[KeyState, ...] = tuple(KeyState)
ENCRYPTABLE_STATES = (PENDING, ACTIVE)  # packages may be sealed to these (pending: warm dual wrapping)
CURRENT_KEY_BITS = 3072
MIN_KEY_BITS = 2048
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
MAX_DOCUMENT_SIZE = 1 << 20
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_OUTER_FIELDS = {"format", "payload", "signature", "signer"}
_PAYLOAD_FIELDS = {"issued_at", "expires_at", "serial", "current", "keys"}
_KEY_FIELDS = {"kid", "alg", "kty", "n", "e", "state"}


@dataclass(frozen=True)
class KeySetKey:
    """One published KEK: its kid (RFC 7638 thumbprint), wrap algorithm, state and public key."""

    kid: str
    alg: str
    state: str
    public_key: rsa.RSAPublicKey

    def to_json(self) -> dict[str, str]:
        return {"kid": self.kid, "alg": self.alg, **public_jwk(self.public_key), "state": self.state}


@dataclass(frozen=True)
class KeySet:
    """A verified key set. Only `verify_keyset` makes these from untrusted bytes."""

    serial: int
    issued_at: datetime
    expires_at: datetime
    current: str
    keys: tuple[KeySetKey, ...]

    def key(self, kid: str) -> KeySetKey:
        for k in self.keys:
            if k.kid == kid:
                return k
        raise UnknownKeyError(f"no key {kid} in key set serial {self.serial}")

    def recipient(self, kid: str | None = None) -> Recipient:
        """The codec recipient for the current key (or `kid`, which must be pending or active)."""
        k = self.key(self.current if kid is None else kid)
        if k.state not in ENCRYPTABLE_STATES:
            raise KeyStateError(f"key {k.kid} is {k.state}: nothing new may be sealed to it")
        return Recipient(kid=k.kid, public_key=k.public_key, alg=k.alg)


def signer_id(pub: ed25519.Ed25519PublicKey) -> str:
    """The signer's id: base64url(SHA-256 of the raw 32-byte Ed25519 public key)."""
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64url_encode(hashlib.sha256(raw).digest())


def load_signer(pem_bytes: bytes) -> ed25519.Ed25519PublicKey:
    """The pinned signer's public key from SubjectPublicKeyInfo PEM. Raises KeySetFormatError."""
    try:
        key = serialization.load_pem_public_key(pem_bytes)
    except (ValueError, TypeError) as e:
        raise KeySetFormatError(f"signer key is not a PEM public key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeySetFormatError(f"signer key is {type(key).__name__}, not Ed25519")
    return key


def format_time(t: datetime) -> str:
    """RFC 3339 UTC, whole seconds: the only timestamp form in keyrings and key sets."""
    return t.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: object) -> datetime:
    """Inverse of `format_time`; raises ValueError for anything else."""
    if not isinstance(text, str):
        raise ValueError("timestamp must be a string")
    t = datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    if format_time(t) != text:  # strptime also takes "2030-1-1T..."; only one spelling is valid
        raise ValueError("timestamp is not in canonical form")
    return t


def build_keyset(
    keys: Sequence[KeySetKey],
    current: str,
    serial: int,
    signer: ed25519.Ed25519PrivateKey,
    *,
    issued_at: datetime | None = None,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
) -> bytes:
    """Sign a key set document. It is verified before it is returned: nothing is published that agents reject."""
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    issued = (issued_at or datetime.now(UTC)).replace(microsecond=0)
    payload = _canonical({
        "issued_at": format_time(issued),
        "expires_at": format_time(issued + timedelta(seconds=ttl_seconds)),
        "serial": serial,
        "current": current,
        "keys": [k.to_json() for k in keys],
    })
    doc = _canonical({
        "format": FORMAT,
        "payload": b64url_encode(payload),
        "signature": b64url_encode(signer.sign(payload)),
        "signer": signer_id(signer.public_key()),
    })
    verify_keyset(doc, signer.public_key(), now=issued)
    return doc


def verify_keyset(
    data: bytes,
    signer: ed25519.Ed25519PublicKey,
    *,
    now: datetime | None = None,
    max_staleness: timedelta = timedelta(0),
) -> KeySet:
    """Check a key set document against the pinned `signer` and return it.

    Order: signature first (BadSignatureError), then the payload's rules (KeySetFormatError), then
    expiry (KeySetExpiredError: `now` is past expires_at + `max_staleness`).
    """
    payload = _verified_payload(data, signer)
    keyset = _parse_payload(payload)
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if now > keyset.expires_at + max_staleness:
        raise KeySetExpiredError(f"key set serial {keyset.serial} expired at {format_time(keyset.expires_at)}")
    return keyset


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def strict_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it, for documents that something is decided on: UTF-8, no duplicate members
    (parsers disagree on which one wins), no NaN/Infinity. Raises ValueError (or RecursionError)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("duplicate member")
        return out

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)


def _strict_loads(raw: bytes, what: str) -> Any:
    try:
        return strict_json(raw)
    except (ValueError, RecursionError) as e:
        raise KeySetFormatError(f"{what} is not valid JSON: {e}") from None


def _verified_payload(data: bytes, signer: ed25519.Ed25519PublicKey) -> bytes:
    if len(data) > MAX_DOCUMENT_SIZE:
        raise KeySetFormatError(f"key set document is larger than {MAX_DOCUMENT_SIZE} bytes")
    outer = _strict_loads(data, "key set document")
    if not isinstance(outer, dict) or set(outer) != _OUTER_FIELDS:
        raise KeySetFormatError(f"key set document must have exactly the members {sorted(_OUTER_FIELDS)}")
    expected = signer_id(signer)
    if outer["signer"] != expected:
        raise BadSignatureError(f"key set is signed by {outer['signer']!r}, not the pinned signer {expected}")
    try:
        payload = b64url_decode(outer["payload"])
        signature = b64url_decode(outer["signature"])
    except ValueError:
        raise BadSignatureError("key set payload or signature is not base64url") from None
    try:
        signer.verify(signature, payload)
    except InvalidSignature:
        raise BadSignatureError(f"key set signature does not verify with signer {expected}") from None
    # From here on the payload is authentic; the format member is outside it, so check it now.
    if outer["format"] != FORMAT:
        raise KeySetFormatError(f"unknown key set format {outer['format']!r}")
    return payload


def _parse_payload(payload: bytes) -> KeySet:
    p = _strict_loads(payload, "key set payload")
    if not isinstance(p, dict) or set(p) != _PAYLOAD_FIELDS:
        raise KeySetFormatError(f"key set payload must have exactly the members {sorted(_PAYLOAD_FIELDS)}")
    serial = p["serial"]
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        raise KeySetFormatError("key set serial must be a non-negative integer")
    try:
        issued_at, expires_at = parse_time(p["issued_at"]), parse_time(p["expires_at"])
    except ValueError:
        raise KeySetFormatError(f"key set timestamps must look like {TIME_FORMAT}") from None
    if expires_at <= issued_at:
        raise KeySetFormatError("key set expires_at must be after issued_at")
    if not isinstance(p["keys"], list) or not p["keys"]:
        raise KeySetFormatError("key set keys must be a non-empty list")
    keys = tuple(_parse_key(k) for k in p["keys"])
    kids = [k.kid for k in keys]
    if len(set(kids)) != len(kids):
        raise KeySetFormatError("key set lists a kid twice")
    current = p["current"]
    if not isinstance(current, str) or current not in kids:
        raise KeySetFormatError(f"key set current {current!r} is not one of its keys")
    active = [k for k in keys if k.state == ACTIVE]
    if [k.kid for k in active] != [current]:
        raise KeySetFormatError(f"key set must have exactly one active key, the current one {current}")
    if active[0].public_key.key_size != CURRENT_KEY_BITS:
        raise KeySetFormatError(f"current key {current} is RSA-{active[0].public_key.key_size}, not RSA-3072")
    return KeySet(serial, issued_at, expires_at, current, keys)


def _parse_key(k: object) -> KeySetKey:
    if not isinstance(k, dict) or set(k) != _KEY_FIELDS:
        raise KeySetFormatError(f"each key set key must have exactly the members {sorted(_KEY_FIELDS)}")
    kid, alg, state = k["kid"], k["alg"], k["state"]
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise KeySetFormatError(f"key set kid {kid!r} is not a SHA-256 JWK thumbprint")
    if alg not in WRAP_ALGORITHMS:
        raise KeySetFormatError(f"key {kid}: alg {alg!r} is not one of {', '.join(WRAP_ALGORITHMS)}")
    if state not in STATES:
        raise KeySetFormatError(f"key {kid}: state {state!r} is not one of {', '.join(STATES)}")
    try:
        pub = public_key_from_jwk(k)
    except InvalidJWKError as e:
        raise KeySetFormatError(f"key {kid}: {e}") from None
    if thumbprint(pub) != kid:  # recomputed: a kid is only as good as the key it names
        raise KeySetFormatError(f"key set kid {kid} is not the thumbprint of its key")
    if pub.key_size < MIN_KEY_BITS:
        raise KeySetFormatError(f"key {kid} is RSA-{pub.key_size}, below RSA-{MIN_KEY_BITS}")
    return KeySetKey(kid=kid, alg=alg, state=state, public_key=pub)
