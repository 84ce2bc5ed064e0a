"""The key service's side of a keyring: private keys opened on use, kept as long as their protection
allows (KMS: `cache_seconds`), never handed out.

>>> store = KeyStore(Path("/var/lib/mediaseal-lkm/keyring"), passphrase)
>>> dek = store.unwrap(Wrap(kid, "RSA-OAEP-256", wrapped))        # LKMUnknownKeyError / UnwrapFailedError
>>> new_wrap = store.wrap(dek)                                     # to the current key

Every method here is synchronous and may block (scrypt, RSA): the service calls them on worker
threads. Changes made to the keyring directory by anyone else (`mediaseal keys rotate` from a timer)
are picked up by `refresh`, which the service calls at most once a second.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from mediaseal.codec import RSA_OAEP, AuthenticationError, Wrap, unwrap_dek, wrap_dek
from mediaseal.codec.wrap import oaep_padding
from mediaseal.keys.errors import KeyStateError, UnknownKeyError
from mediaseal.keys.keyring import KeyRecord, Keyring
from mediaseal.keys.keyset import ENCRYPTABLE_STATES, RETIRED
from mediaseal.keys.kms import DEFAULT_CACHE_SECONDS, KmsOptions
from mediaseal.keys.lkm.errors import BadRequestError, ConflictError, LKMUnknownKeyError, UnwrapFailedError

T = TypeVar("T")
UNWRAP_FAILED = "the wrap does not decrypt under key {kid}"  # one message for bad padding and wrong key


class PrivateKeySource(Protocol):
    """Where private KEKs come from: `private_key(kid)` for any key of the keyring."""

    def private_key(self, kid: str) -> rsa.RSAPrivateKey: ...


KeyLoader = Callable[[Path, bytes | None], tuple[Keyring, PrivateKeySource]]


def open_keyring(path: Path, passphrase: bytes | None, *,
                 kms_cache_seconds: float = DEFAULT_CACHE_SECONDS) -> tuple[Keyring, PrivateKeySource]:
    """Open a managed keyring and check its secret (on the current key). The one place private keys come from.

    This is the seam for other protections: a KMS-protected keyring returns its own PrivateKeySource
    (and is selected here once `keys` knows how to open one).
    """
    ring = Keyring.open(path, kms=KmsOptions(cache_seconds=kms_cache_seconds))
    return ring, ring.unlock(passphrase)


def _key_view(ring: Keyring) -> tuple[object, ...]:
    return ring.current().kid, tuple((r.kid, r.alg, r.state) for r in ring.records())


class KeyStore:
    """A keyring plus its opened private keys; reloads when keyring.json changes on disk."""

    def __init__(self, path: Path, passphrase: bytes | None, *, loader: KeyLoader = open_keyring) -> None:
        self.path = Path(path)
        self._passphrase = passphrase
        self._loader = loader
        self._lock = threading.RLock()
        self._signature: tuple[int, int, int] | None = None
        self._ring, self._source = self._open()

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    @property
    def ring(self) -> Keyring:
        return self._ring

    @property
    def passphrase(self) -> bytes | None:
        return self._passphrase

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path / "keyring.json")
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _open(self) -> tuple[Keyring, PrivateKeySource]:
        signature = self._stat()
        ring, source = self._loader(self.path, self._passphrase)
        self._signature = signature
        return ring, source

    def refresh(self) -> bool:
        """Reload if keyring.json changed since it was read; True if the keys did (not only the key set serial).

        Keys are opened again from the new source. Publishing changes keyring.json too (the serial), so two services
        sharing a keyring would otherwise set each other republishing for ever.
        """
        with self._lock:
            if self._stat() == self._signature:
                return False
            before = _key_view(self._ring)
            self._ring, self._source = self._open()
            return _key_view(self._ring) != before

    def _changed(self) -> None:
        """After a change made through this store: the ring object is current; remember the file as read."""
        self._signature = self._stat()

    # -- lookups -------------------------------------------------------------------------------

    def record(self, kid: str) -> KeyRecord | None:
        try:
            return self._ring.record(kid)
        except UnknownKeyError:
            return None

    def usable_record(self, kid: str) -> KeyRecord:
        rec = self.record(kid)
        if rec is None:
            raise LKMUnknownKeyError(f"no key {kid} here")
        if rec.state == RETIRED:
            raise LKMUnknownKeyError(f"key {kid} is retired")
        return rec

    def private_key(self, kid: str) -> rsa.RSAPrivateKey:
        # The source keeps what it opened for as long as its protection allows: for ever under a passphrase,
        # `cache_seconds` under KMS (then KMS is asked again, so disabling the KMS key stops unwraps within
        # that time). A cache of its own here kept KMS-opened keys for ever (issue 15, finding 7).
        with self._lock:
            return self._source.private_key(kid)

    # -- the operations ----------------------------------------------------------------------------

    def unwrap(self, wrap: Wrap) -> bytes:
        """The DEK of one wrap. The key must be here, not retired, and of the wrap's algorithm."""
        rec = self.usable_record(wrap.kid)
        if rec.alg != wrap.alg:
            raise BadRequestError(f"key {wrap.kid} is {rec.alg}; the wrap says {wrap.alg}")
        try:
            return unwrap_dek(wrap, self.private_key(wrap.kid))
        except AuthenticationError:
            raise UnwrapFailedError(UNWRAP_FAILED.format(kid=wrap.kid)) from None

    def unwrap_oaep_sha1(self, kid: str, wrapped: bytes) -> bytes:
        """RSA-OAEP (SHA-1) decryption of any length of secret, for the Genesys-compatible shim."""
        rec = self.usable_record(kid)
        if rec.alg != RSA_OAEP:
            raise LKMUnknownKeyError(f"key {kid} is not an RSA-OAEP (SHA-1) key")
        try:
            return self.private_key(kid).decrypt(wrapped, oaep_padding(RSA_OAEP))
        except ValueError:
            raise UnwrapFailedError(UNWRAP_FAILED.format(kid=kid)) from None

    def wrap(self, dek: bytes, kid: str | None = None) -> Wrap:
        """Wrap `dek` to the current key, or to `kid` (which must be pending or active)."""
        rec = self._ring.current() if kid is None else self.record(kid)
        if rec is None:
            raise LKMUnknownKeyError(f"no key {kid} here")
        if rec.state not in ENCRYPTABLE_STATES:
            raise ConflictError(f"key {rec.kid} is {rec.state}: nothing new may be wrapped to it")
        return wrap_dek(dek, self._ring.public_key(rec.kid), rec.kid, rec.alg)

    def self_test(self) -> str:
        """Deep health: reload if changed, then wrap a random DEK to the current key and unwrap it. Returns the kid."""
        self.refresh()
        dek = os.urandom(32)
        w = self.wrap(dek)
        if self.unwrap(w) != dek:
            raise UnwrapFailedError("self-test unwrap returned a different key")
        return w.kid

    # -- changes (admin) ---------------------------------------------------------------------------

    def create(self, *, pending: bool = False, alg: str | None = None) -> KeyRecord:
        with self._lock:
            rec = self._ring.rotate(self._passphrase, pending=pending, alg=alg)
            self._changed()
            return rec

    def set_state(self, kid: str, state: str) -> KeyRecord:
        with self._lock:
            try:
                if state == "active":
                    rec = self._ring.activate(kid, self._passphrase)
                else:
                    rec = self._ring.set_state(kid, state)
            except UnknownKeyError:
                raise LKMUnknownKeyError(f"no key {kid} here") from None
            except KeyStateError as e:
                raise ConflictError(str(e)) from None
            self._changed()
            return rec

    def apply(self, fn: Callable[[Keyring, bytes | None], T]) -> T:
        """Run `fn(keyring, passphrase)` (a schedule step, say) under the store's lock, then note the file as read."""
        with self._lock:
            result = fn(self._ring, self._passphrase)
            self._changed()
            return result

    def publish(self, ttl_seconds: int) -> bytes:
        with self._lock:
            document = self._ring.publish(self._passphrase, ttl_seconds=ttl_seconds)
            self._changed()
            return document
