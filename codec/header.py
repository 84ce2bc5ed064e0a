"""The package header: layout, strict bounded parsing, and the key schedule that binds it.

A header is three parts (docs/FORMAT.md has the bytes):

    authenticated part   prefix(10) | salt(32) | core (metadata JSON)
    checks               commitment(32) | header MAC(32)
    wraps                wraps_len(u16) | count(u8) | wrap...      <- not authenticated

Every key is derived from the DEK *and* the authenticated part, so changing any byte of it changes
every key. The wraps sit outside on purpose: a package can be re-wrapped to a new KEK without touching
its body, and a swapped-in wrap yields a different DEK, which fails the commitment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mediaseal.codec.errors import (
    AuthenticationError,
    MalformedPackageError,
    TruncatedPackageError,
    UnsupportedVersionError,
)
from mediaseal.codec.wrap import DEK_SIZE, Wrap

MAGIC = b"MSEAL"
VERSION = 1
PREFIX = struct.Struct(">5sBBBH")  # magic, version, log2(chunk size), reserved (0), core length
SALT_SIZE = 32
CHECK_SIZE = 32  # commitment and header MAC, each
MIN_LOG2_CHUNK, MAX_LOG2_CHUNK = 8, 24  # 256 B .. 16 MiB: a reader never allocates more than that
DEFAULT_CHUNK_SIZE = 1 << 20  # chosen by the chunk-size sweep in docs/BENCHMARKS.md
MAX_CORE = 16 * 1024
MAX_WRAPS_LEN = 16 * 1024
MAX_WRAPS = 16
MAX_WRAPPED = 1024  # an RSA-8192 ciphertext; RSA-3072 wraps are 384 bytes
KDF_INFO = b"mediaseal/v1 key schedule\x00"
MAX_HEADER = PREFIX.size + SALT_SIZE + MAX_CORE + 2 * CHECK_SIZE + 2 + MAX_WRAPS_LEN

class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


KINDS = ("call", "screen", "digital", "transcript")
_RECORDING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ALG = re.compile(r"[\x21-\x7e]{1,32}")
_META_FIELDS = ("recording_id", "kind", "content_type", "original_name", "captured_at", "agent_id")


@dataclass(frozen=True)
class Metadata:
    """What the recording is. Authenticated, but not secret: `inspect` shows it without keys."""

    recording_id: str
    kind: str = "call"
    content_type: str = "application/octet-stream"
    original_name: str = ""
    captured_at: str = ""  # RFC 3339, UTC
    agent_id: str = ""

    def __post_init__(self) -> None:
        if not _RECORDING_ID.fullmatch(self.recording_id):
            # The id becomes part of a repository key, so it must never carry a path separator.
            raise MalformedPackageError(f"recording id {self.recording_id!r} is not 1-128 of [A-Za-z0-9._-]")
        if self.kind not in KINDS:
            raise MalformedPackageError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in _META_FIELDS[2:]:
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 4096:
                raise MalformedPackageError(f"metadata field {name} must be a string of at most 4096 chars")

    def encode(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, UTF-8. (Readers MAC the stored bytes, not a re-encoding.)"""
        return json.dumps(
            {name: getattr(self, name) for name in _META_FIELDS},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()

    @classmethod
    def decode(cls, core: bytes) -> Metadata:
        try:
            doc = json.loads(core.decode("utf-8"), object_pairs_hook=_unique_members)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise MalformedPackageError("header metadata is not UTF-8 JSON with unique members") from None
        if not isinstance(doc, dict) or set(doc) != set(_META_FIELDS):
            raise MalformedPackageError("header metadata does not have exactly the version-1 fields")
        if not all(isinstance(v, str) for v in doc.values()):
            raise MalformedPackageError("header metadata values must be strings")
        try:
            for v in doc.values():
                v.encode("utf-8")
        except UnicodeEncodeError:
            # JSON escapes can spell lone surrogates, which are not text: refuse them here rather
            # than let them blow up whoever prints or re-encodes the metadata later.
            raise MalformedPackageError("header metadata holds an unpaired surrogate") from None
        return cls(**doc)


def _unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Parsers disagree on which duplicate wins; two readers of the same authenticated bytes must
    # never see two different recording ids, so duplicates are malformed.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate member")
    return doc


@dataclass(frozen=True)
class Keys:
    """What the key schedule yields for one package."""

    payload: bytes  # AES-256-GCM key for the chunks
    mac: bytes  # HMAC-SHA-256 key for the header
    commitment: bytes  # stored in the header: proves this DEK is the one the package was made with


def derive_keys(dek: bytes, salt: bytes, authenticated: bytes) -> Keys:
    """HKDF-SHA-256(ikm=DEK, salt, info=label || SHA-256(authenticated part)) -> 96 bytes."""
    if len(dek) != DEK_SIZE:
        raise AuthenticationError("a DEK is 32 bytes")
    info = KDF_INFO + hashlib.sha256(authenticated).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=salt, info=info).derive(dek)
    return Keys(payload=okm[:32], mac=okm[32:64], commitment=okm[64:])


@dataclass(frozen=True)
class Header:
    """A parsed (or freshly made) header. `size` bytes long; the body follows it directly."""

    chunk_size: int
    salt: bytes
    core: bytes
    commitment: bytes
    mac: bytes
    wraps: tuple[Wrap, ...]
    metadata: Metadata

    @classmethod
    def create(
        cls,
        metadata: Metadata,
        dek: bytes,
        salt: bytes,
        wraps: tuple[Wrap, ...],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> tuple[Header, Keys]:
        """A header for a new package, and the keys its body is sealed with."""
        _check_chunk_size(chunk_size)
        if len(salt) != SALT_SIZE:
            raise ValueError("the salt is 32 bytes")
        core = metadata.encode()
        if len(core) > MAX_CORE:
            raise MalformedPackageError("metadata is larger than 16 KiB")
        authenticated = _prefix(chunk_size, len(core)) + salt + core
        keys = derive_keys(dek, salt, authenticated)
        mac = hmac.digest(keys.mac, authenticated, "sha256")
        header = cls(chunk_size, salt, core, keys.commitment, mac, tuple(wraps), metadata)
        header.encode_wraps()  # validates the wraps now rather than at write time
        return header, keys

    @property
    def authenticated(self) -> bytes:
        return _prefix(self.chunk_size, len(self.core)) + self.salt + self.core

    @property
    def size(self) -> int:
        return len(self.authenticated) + 2 * CHECK_SIZE + len(self.encode_wraps())

    def encode(self) -> bytes:
        return self.authenticated + self.commitment + self.mac + self.encode_wraps()

    def encode_wraps(self) -> bytes:
        if not 1 <= len(self.wraps) <= MAX_WRAPS:
            raise MalformedPackageError(f"a package carries 1 to {MAX_WRAPS} wraps")
        out = bytearray([len(self.wraps)])
        for w in self.wraps:
            _check_wrap(w)
            kid, alg = w.kid.encode(), w.alg.encode()
            out += bytes([len(kid)]) + kid + bytes([len(alg)]) + alg + struct.pack(">H", len(w.wrapped))
            out += w.wrapped
        if len(out) > MAX_WRAPS_LEN:
            raise MalformedPackageError("wraps are larger than 16 KiB")
        return struct.pack(">H", len(out)) + bytes(out)

    def with_wraps(self, wraps: tuple[Wrap, ...]) -> Header:
        """The same header with other wraps: the authenticated part and so the body stay valid."""
        h = Header(self.chunk_size, self.salt, self.core, self.commitment, self.mac, tuple(wraps), self.metadata)
        h.encode_wraps()
        return h

    def open(self, dek: bytes) -> Keys:
        """Check that `dek` is this package's key and the header is intact; return the body keys.

        Both checks run before any chunk is touched, in constant time. A wrong DEK (a wrap swapped
        in from another package) fails the commitment; an edited header changes every derived key.
        """
        keys = derive_keys(dek, self.salt, self.authenticated)
        commitment_ok = hmac.compare_digest(keys.commitment, self.commitment)
        mac_ok = hmac.compare_digest(hmac.digest(keys.mac, self.authenticated, "sha256"), self.mac)
        if not (commitment_ok and mac_ok):
            raise AuthenticationError("header does not authenticate under this package's DEK")
        return keys


def _prefix(chunk_size: int, core_len: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, chunk_size.bit_length() - 1, 0, core_len)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size & (chunk_size - 1) or not (1 << MIN_LOG2_CHUNK) <= chunk_size <= (1 << MAX_LOG2_CHUNK):
        raise ValueError("chunk size must be a power of two from 256 B to 16 MiB")


def _check_wrap(w: Wrap) -> None:
    if not _KID.fullmatch(w.kid) or not _ALG.fullmatch(w.alg) or not 1 <= len(w.wrapped) <= MAX_WRAPPED:
        raise MalformedPackageError("a wrap has a bad kid, alg or wrapped-key length")


def read_header(f: _Reader) -> Header:
    """Parse a header from the current position of `f`, reading exactly its bytes.

    Every length is checked against its bound before anything is allocated, so a hostile header
    costs at most MAX_HEADER bytes of memory, and only codec errors come out.
    """
    magic, version, log2_chunk, reserved, core_len = PREFIX.unpack(_read_exact(f, PREFIX.size))
    if magic != MAGIC:
        raise MalformedPackageError("not a mediaseal package (bad magic)")
    if version != VERSION:
        raise UnsupportedVersionError(f"package format version {version} is not supported (this reads 1)")
    if reserved != 0:
        raise UnsupportedVersionError("package uses a header flag this version does not know")
    if not MIN_LOG2_CHUNK <= log2_chunk <= MAX_LOG2_CHUNK:
        raise MalformedPackageError(f"chunk size 2^{log2_chunk} is out of range")
    if not 2 <= core_len <= MAX_CORE:
        raise MalformedPackageError(f"header metadata length {core_len} is out of range")
    salt = _read_exact(f, SALT_SIZE)
    core = _read_exact(f, core_len)
    commitment = _read_exact(f, CHECK_SIZE)
    mac = _read_exact(f, CHECK_SIZE)
    (wraps_len,) = struct.unpack(">H", _read_exact(f, 2))
    if not 1 <= wraps_len <= MAX_WRAPS_LEN:
        raise MalformedPackageError(f"wraps length {wraps_len} is out of range")
    wraps = _parse_wraps(_read_exact(f, wraps_len))
    return Header(1 << log2_chunk, salt, core, commitment, mac, wraps, Metadata.decode(core))


def parse_header(data: bytes) -> Header:
    """`read_header` over bytes already in memory (they may run on into the body)."""
    import io

    return read_header(io.BytesIO(data))


def _parse_wraps(block: bytes) -> tuple[Wrap, ...]:
    count, pos, wraps = block[0], 1, []
    if not 1 <= count <= MAX_WRAPS:
        raise MalformedPackageError(f"wrap count {count} is out of range")
    try:
        for _ in range(count):
            kid_len = block[pos]
            kid = block[pos + 1 : pos + 1 + kid_len].decode("ascii")
            pos += 1 + kid_len
            alg_len = block[pos]
            alg = block[pos + 1 : pos + 1 + alg_len].decode("ascii")
            pos += 1 + alg_len
            (wrapped_len,) = struct.unpack_from(">H", block, pos)
            wrapped = block[pos + 2 : pos + 2 + wrapped_len]
            pos += 2 + wrapped_len
            if len(wrapped) != wrapped_len:
                raise MalformedPackageError("a wrap runs past the wraps block")
            w = Wrap(kid=kid, alg=alg, wrapped=wrapped)
            _check_wrap(w)
            wraps.append(w)
    except (IndexError, struct.error, UnicodeDecodeError):
        raise MalformedPackageError("the wraps block is malformed") from None
    if pos != len(block):
        raise MalformedPackageError("the wraps block has trailing bytes")
    return tuple(wraps)


def _read_exact(f: _Reader, n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:  # pipes may return short reads; an empty read is the end
        more = f.read(n - len(data))
        if not more:
            raise TruncatedPackageError("package ends inside its header")
        data += more
    return data
