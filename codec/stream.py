"""The STREAM construction over AES-256-GCM (as in age and Tink's streaming AEAD).

The body is a sequence of chunks. Chunk i holds `chunk_size` bytes of plaintext (the last one
1..chunk_size, or 0 when the whole recording is empty) followed by a 16-byte tag, so chunk i always
starts at i * (chunk_size + 16): any byte range can be found without reading what precedes it.

The nonce is the chunk counter (11 bytes, big-endian) followed by a last-chunk flag byte. Because the
counter is in the nonce, chunks can't be reordered, dropped or duplicated; because the flag is, a
package can't be cut short at a chunk boundary; and because every package has its own payload key
(fresh DEK, fresh salt), chunks can't be spliced in from another package.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mediaseal.codec.errors import AuthenticationError, TruncatedPackageError

TAG_SIZE = 16
_MAX_COUNTER = 1 << 88
_LAST = b"\x01"
_NOT_LAST = b"\x00"


def nonce(index: int, last: bool) -> bytes:
    if not 0 <= index < _MAX_COUNTER:
        raise OverflowError("chunk counter out of range")
    return index.to_bytes(11, "big") + (_LAST if last else _NOT_LAST)


def stride(chunk_size: int) -> int:
    """Ciphertext bytes per full chunk."""
    return chunk_size + TAG_SIZE


class ChunkSealer:
    """Seals chunks in order: `seal_into` for each full chunk, then one call with `last=True`.

    >>> s = ChunkSealer(keys.payload, chunk_size)
    >>> n = s.seal_into(plaintext_view, out_view, last=False)
    """

    def __init__(self, key: bytes, chunk_size: int) -> None:
        self._aead = AESGCM(key)
        self._chunk_size = chunk_size
        self._index = 0
        self._finished = False

    def seal_into(self, plaintext: memoryview, out: memoryview, last: bool) -> int:
        """Encrypt `plaintext` into `out` (len(plaintext) + 16 bytes); return the bytes written."""
        if self._finished:
            raise ValueError("the last chunk has been sealed already")
        n = len(plaintext)
        # Only the last chunk may be short, so the body length alone fixes where chunks start.
        if n > self._chunk_size or (not last and n != self._chunk_size):
            raise ValueError("only the last chunk may be shorter than the chunk size")
        # An empty last chunk is only allowed as the only chunk (an empty recording); otherwise the
        # previous full chunk should have been the last: one encoding per plaintext.
        if last and n == 0 and self._index != 0:
            raise ValueError("an empty last chunk follows a full one; seal that one as last")
        self._aead.encrypt_into(nonce(self._index, last), plaintext, None, out[: n + TAG_SIZE])
        self._index += 1
        self._finished = last
        return n + TAG_SIZE

    @property
    def finished(self) -> bool:
        return self._finished


class ChunkOpener:
    """Opens chunks by index, in any order: random access is the point.

    `open_into` releases plaintext only after the chunk's tag checked; on failure the output buffer
    is wiped, because AES-GCM's decrypt_into has already written unauthenticated bytes into it.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def open_into(self, index: int, ciphertext: memoryview, out: memoryview, last: bool) -> int:
        """Decrypt chunk `index` into `out`; return the plaintext length."""
        n = len(ciphertext) - TAG_SIZE
        if n < 0:
            raise TruncatedPackageError(f"chunk {index} is shorter than its tag")
        target = out[:n]
        try:
            self._aead.decrypt_into(nonce(index, last), ciphertext, None, target)
        except InvalidTag:
            target[:] = bytes(n)
            if last and self._opens_as_not_last(index, ciphertext):
                # A message can't end without a last-flagged chunk: this one was cut short.
                raise TruncatedPackageError(f"package is truncated after chunk {index}") from None
            raise AuthenticationError(f"chunk {index} does not authenticate (tampered or misplaced)") from None
        return n

    def _opens_as_not_last(self, index: int, ciphertext: memoryview) -> bool:
        try:
            self._aead.decrypt(nonce(index, False), bytes(ciphertext), None)
        except InvalidTag:
            return False
        return True
