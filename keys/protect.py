"""Protection of private keys at rest: an AEAD envelope under a key derived from a passphrase or master key.

>>> p = PassphraseProtector(b"correct horse battery staple")
>>> aad = key_aad("kek", kid)                      # binds the envelope to this key and purpose
>>> envelope = p.seal(pkcs8_der, aad)              # JSON-able dict, safe to write to disk
>>> p.open(envelope, aad) == pkcs8_der
True

A protector is anything with `seal`/`open` (a KMS-backed one can map `aad` to an encryption context).
`open` raises a KeyringLockedError subclass for a wrong secret and KeyringFormatError for a malformed
envelope; AES-GCM can't tell a wrong secret from an altered envelope, and the messages say so.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mediaseal.keys.errors import KeyringFormatError, KeyringLockedError, WrongPassphraseError
from mediaseal.keys.jwk import b64url_decode, b64url_encode

CIPHER = "A256GCM"
SCRYPT = "scrypt"
HKDF_SHA256 = "hkdf-sha256"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MASTER_KEY_SIZE = 32
_SALT_SIZE = 16
_NONCE_SIZE = 12
_HKDF_INFO = b"mediaseal-keyring/1 key protection"
# Envelopes are read from disk: bound the work factor an altered envelope can demand of us.
_SCRYPT_N_RANGE = (2**14, 2**20)

Envelope = dict[str, Any]


def key_aad(purpose: str, kid: str) -> bytes:
    """The associated data that ties an envelope to one key and one use, so it can't be moved to another."""
    if "\x00" in purpose or "\x00" in kid:
        raise ValueError("purpose and kid must not contain NUL")
    return b"mediaseal-keyring/1\x00" + purpose.encode() + b"\x00" + kid.encode()


class Protector(Protocol):
    """Seals and opens private key material at rest."""

    def seal(self, plaintext: bytes, aad: bytes) -> Envelope:
        """Encrypt `plaintext` bound to `aad`; return a JSON-able envelope naming its "kdf"."""
        ...

    def open(self, envelope: Mapping[str, Any], aad: bytes) -> bytes:
        """Return the plaintext of an envelope made by `seal` with the same `aad`."""
        ...

    @property
    def cache_seconds(self) -> float | None:
        """How long a key opened through this protector may stay in memory before it is opened again
        (KMS: so revoking access takes effect within it); None: for as long as the unwrapper lives."""
        ...


class PassphraseProtector:
    """scrypt (N=2**15, r=8, p=1, random 16-byte salt per envelope) -> AES-256-GCM (random nonce)."""

    def __init__(self, passphrase: bytes) -> None:
        if not passphrase:
            raise ValueError("an empty passphrase protects nothing")
        self._passphrase = passphrase

    def __repr__(self) -> str:
        return "PassphraseProtector(<secret>)"

    def _key(self, salt: bytes, n: int, r: int, p: int) -> bytes:
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(self._passphrase)

    def seal(self, plaintext: bytes, aad: bytes) -> Envelope:
        salt, nonce = secrets.token_bytes(_SALT_SIZE), secrets.token_bytes(_NONCE_SIZE)
        ct = AESGCM(self._key(salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(nonce, plaintext, aad)
        return {
            "kdf": SCRYPT, "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": b64url_encode(salt),
            "cipher": CIPHER, "nonce": b64url_encode(nonce), "ct": b64url_encode(ct),
        }

    cache_seconds: float | None = None  # opened keys stay for as long as the unwrapper lives

    def open(self, envelope: Mapping[str, Any], aad: bytes) -> bytes:
        _check_kind(envelope, SCRYPT)
        n, r, p = (_int(envelope, k) for k in ("n", "r", "p"))
        if not (_SCRYPT_N_RANGE[0] <= n <= _SCRYPT_N_RANGE[1] and n & (n - 1) == 0) or r != SCRYPT_R or p != SCRYPT_P:
            raise KeyringFormatError(f"protected key: scrypt parameters n={n} r={r} p={p} out of range")
        key = self._key(_bytes(envelope, "salt", _SALT_SIZE), n, r, p)
        try:
            return AESGCM(key).decrypt(_bytes(envelope, "nonce", _NONCE_SIZE), _bytes(envelope, "ct"), aad)
        except InvalidTag:
            raise WrongPassphraseError("wrong passphrase (or the protected key was altered)") from None


class MasterKeyProtector:
    """HKDF-SHA-256 from a 32-byte master key (random 16-byte salt per envelope) -> AES-256-GCM."""

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_SIZE:
            raise KeyringLockedError(f"a master key is {MASTER_KEY_SIZE} bytes, this one is {len(key)}")
        self._master = key

    def __repr__(self) -> str:
        return "MasterKeyProtector(<secret>)"

    def _key(self, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO).derive(self._master)

    def seal(self, plaintext: bytes, aad: bytes) -> Envelope:
        salt, nonce = secrets.token_bytes(_SALT_SIZE), secrets.token_bytes(_NONCE_SIZE)
        ct = AESGCM(self._key(salt)).encrypt(nonce, plaintext, aad)
        return {
            "kdf": HKDF_SHA256, "salt": b64url_encode(salt),
            "cipher": CIPHER, "nonce": b64url_encode(nonce), "ct": b64url_encode(ct),
        }

    cache_seconds: float | None = None  # opened keys stay for as long as the unwrapper lives

    def open(self, envelope: Mapping[str, Any], aad: bytes) -> bytes:
        _check_kind(envelope, HKDF_SHA256)
        key = self._key(_bytes(envelope, "salt", _SALT_SIZE))
        try:
            return AESGCM(key).decrypt(_bytes(envelope, "nonce", _NONCE_SIZE), _bytes(envelope, "ct"), aad)
        except InvalidTag:
            raise KeyringLockedError("the master key does not open the protected key (or it was altered)") from None


def _check_kind(envelope: Mapping[str, Any], kdf: str) -> None:
    if not isinstance(envelope, Mapping):
        raise KeyringFormatError("protected key: envelope is not a JSON object")
    if envelope.get("kdf") != kdf:
        raise KeyringFormatError(f"protected key: kdf {envelope.get('kdf')!r}, expected {kdf!r}")
    if envelope.get("cipher") != CIPHER:
        raise KeyringFormatError(f"protected key: cipher {envelope.get('cipher')!r}, expected {CIPHER!r}")


def _int(envelope: Mapping[str, Any], name: str) -> int:
    value = envelope.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise KeyringFormatError(f"protected key: {name!r} must be an integer")
    return value


def _bytes(envelope: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    try:
        value = b64url_decode(envelope.get(name, ""))  # a non-string is a ValueError there
    except ValueError:
        raise KeyringFormatError(f"protected key: {name!r} must be unpadded base64url") from None
    if size is not None and len(value) != size:
        raise KeyringFormatError(f"protected key: {name!r} must be {size} bytes")
    return value
