"""RSA public keys as JWKs, and their RFC 7638 thumbprints (the `kid` of every KEK).

>>> jwk = public_jwk(public_key)          # {"kty": "RSA", "n": "...", "e": "AQAB"}
>>> kid = thumbprint(public_key)          # base64url(SHA-256(canonical JWK)), 43 chars
>>> public_key_from_jwk(jwk).public_numbers() == public_key.public_numbers()
True
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import rsa

from mediaseal.keys.errors import InvalidJWKError

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
KID_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest, unpadded


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of `b64url_encode`: no padding, no whitespace, no non-canonical trailing bits.

    Raises ValueError. Strictness matters because kids and signatures are compared as strings.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _uint_to_b64(value: int) -> str:
    # Big-endian, minimal length (RFC 7518 section 6.3.1): no leading zero octets.
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _b64_to_uint(text: object, name: str) -> int:
    if not isinstance(text, str):
        raise InvalidJWKError(f"JWK member {name!r} must be a string")
    try:
        raw = b64url_decode(text)
    except ValueError as e:
        raise InvalidJWKError(f"JWK member {name!r}: {e}") from None
    if not raw or raw[0] == 0:
        raise InvalidJWKError(f"JWK member {name!r} is not a minimal big-endian integer")
    return int.from_bytes(raw, "big")


def public_jwk(pub: rsa.RSAPublicKey) -> dict[str, str]:
    """The RSA public key as a JWK with exactly the required members kty, n and e."""
    numbers = pub.public_numbers()
    return {"kty": "RSA", "n": _uint_to_b64(numbers.n), "e": _uint_to_b64(numbers.e)}


def thumbprint(pub: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url unpadded) of an RSA public key."""
    jwk = public_jwk(pub)
    # Canonical form: required members only, lexicographic order, no whitespace, UTF-8.
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def public_key_from_jwk(d: Mapping[str, object]) -> rsa.RSAPublicKey:
    """Parse an RSA public JWK (other members are ignored here; callers check them). Raises InvalidJWKError."""
    if d.get("kty") != "RSA":
        raise InvalidJWKError(f"JWK kty must be 'RSA', not {d.get('kty')!r}")
    n = _b64_to_uint(d.get("n"), "n")
    e = _b64_to_uint(d.get("e"), "e")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as err:
        raise InvalidJWKError(f"JWK is not a valid RSA public key: {err}") from None
