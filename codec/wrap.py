"""DEK wrapping with RSA-OAEP (JOSE names). The algorithm is always named, never inferred.

>>> w = wrap_dek(dek, public_key, kid="...")            # RSA-OAEP-256 by default
>>> unwrap_dek(w, private_key) == dek
True
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mediaseal.codec.errors import AuthenticationError, UnsupportedVersionError

RSA_OAEP_256 = "RSA-OAEP-256"  # OAEP with SHA-256 and MGF1-SHA-256: the default
RSA_OAEP = "RSA-OAEP"  # OAEP with SHA-1 and MGF1-SHA-1: interop with existing Local Key Managers
WRAP_ALGORITHMS = (RSA_OAEP_256, RSA_OAEP)
DEK_SIZE = 32


@dataclass(frozen=True)
class Wrap:
    """One wrapped copy of the DEK: `kid` names the KEK (RFC 7638 thumbprint), `alg` the JOSE algorithm."""

    kid: str
    alg: str
    wrapped: bytes


def oaep_padding(alg: str) -> padding.OAEP:
    """The OAEP parameters a JOSE algorithm name stands for."""
    if alg == RSA_OAEP_256:
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    if alg == RSA_OAEP:
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
    raise UnsupportedVersionError(f"unsupported wrap algorithm {alg!r}")


def wrap_dek(dek: bytes, public_key: rsa.RSAPublicKey, kid: str, alg: str = RSA_OAEP_256) -> Wrap:
    """Encrypt `dek` to `public_key`."""
    if len(dek) != DEK_SIZE:
        raise ValueError("a DEK is 32 bytes")
    return Wrap(kid=kid, alg=alg, wrapped=public_key.encrypt(dek, oaep_padding(alg)))


def unwrap_dek(wrap: Wrap, private_key: rsa.RSAPrivateKey) -> bytes:
    """Recover the DEK. Any OAEP failure is one indistinguishable AuthenticationError."""
    pad = oaep_padding(wrap.alg)
    try:
        dek = private_key.decrypt(wrap.wrapped, pad)
    except ValueError:
        raise AuthenticationError(f"DEK wrap for key {wrap.kid} does not decrypt") from None
    if len(dek) != DEK_SIZE:
        raise AuthenticationError(f"DEK wrap for key {wrap.kid} does not hold a 32-byte key")
    return dek
