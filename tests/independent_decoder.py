"""A second .mseal version-1 decoder, written only from docs/FORMAT.md.

It deliberately shares no code with `codec/` (it never imports it) and uses the `cryptography`
primitives directly. Section numbers (§) refer to docs/FORMAT.md. If this decoder and the codec
agree on the known-answer vectors, the document is complete enough to implement the format from.

It works on whole packages in memory (test vectors are small); it is not meant to be fast.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


# §8 error taxonomy (same names as the reference implementation, separate classes).
class CodecError(Exception):
    pass


class MalformedPackageError(CodecError):
    pass


class UnsupportedVersionError(MalformedPackageError):
    pass


class TruncatedPackageError(CodecError):
    pass


class NoMatchingKeyError(CodecError):
    pass


class AuthenticationError(CodecError):
    pass


ERRORS = {
    cls.__name__: cls
    for cls in (
        CodecError,
        MalformedPackageError,
        UnsupportedVersionError,
        TruncatedPackageError,
        NoMatchingKeyError,
        AuthenticationError,
    )
}

MAGIC = b"MSEAL"
TAG = 16
LABEL = b"mediaseal/v1 key schedule\x00"  # §3
META_MEMBERS = ("recording_id", "kind", "content_type", "original_name", "captured_at", "agent_id")
KINDS = ("call", "screen", "digital", "transcript")
RECORDING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
KID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True)
class WrapEntry:
    kid: str
    alg: str
    wrapped: bytes


@dataclass(frozen=True)
class ParsedHeader:
    chunk_size: int
    salt: bytes
    core: bytes
    metadata: dict[str, str]
    commitment: bytes
    header_mac: bytes
    wraps: tuple[WrapEntry, ...]
    authenticated: bytes
    size: int


@dataclass(frozen=True)
class Derived:
    info: bytes
    payload_key: bytes
    mac_key: bytes
    commitment: bytes
    header_mac: bytes


@dataclass(frozen=True)
class Decoded:
    header: ParsedHeader
    derived: Derived
    chunks: int
    plaintext: bytes


class _Cursor:
    """Reads header fields in order; running past the end is a truncated package (§6 step 1)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TruncatedPackageError("package ends inside its header")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def parse_header(data: bytes) -> ParsedHeader:
    """§2 and §6 step 1, in the order given there. `data` may run on into the body."""
    cur = _Cursor(data)
    prefix = cur.take(10)
    if prefix[0:5] != MAGIC:
        raise MalformedPackageError("bad magic")
    if prefix[5] != 1:
        raise UnsupportedVersionError(f"version {prefix[5]}")
    if prefix[7] != 0:
        raise UnsupportedVersionError("reserved byte is not zero")
    log2_chunk = prefix[6]
    if not 8 <= log2_chunk <= 24:
        raise MalformedPackageError("chunk size out of range")
    core_len = int.from_bytes(prefix[8:10], "big")
    if not 2 <= core_len <= 16384:
        raise MalformedPackageError("core length out of range")
    salt = cur.take(32)
    core = cur.take(core_len)
    commitment = cur.take(32)
    header_mac = cur.take(32)
    wraps_len = int.from_bytes(cur.take(2), "big")
    if not 1 <= wraps_len <= 16384:
        raise MalformedPackageError("wraps length out of range")
    wraps = _parse_wraps(cur.take(wraps_len))
    metadata = _parse_core(core)
    return ParsedHeader(
        chunk_size=1 << log2_chunk,
        salt=salt,
        core=core,
        metadata=metadata,
        commitment=commitment,
        header_mac=header_mac,
        wraps=wraps,
        authenticated=data[: 42 + core_len],
        size=108 + core_len + wraps_len,
    )


def _parse_wraps(block: bytes) -> tuple[WrapEntry, ...]:
    """§2.2: the wraps must fill the block exactly; any overrun is malformed (not truncated)."""

    def take(pos: int, n: int) -> bytes:
        if pos + n > len(block):
            raise MalformedPackageError("a wrap runs past the wraps block")
        return block[pos : pos + n]

    count = block[0]
    if not 1 <= count <= 16:
        raise MalformedPackageError("wrap count out of range")
    pos, wraps = 1, []
    for _ in range(count):
        kid_len = take(pos, 1)[0]
        kid_raw = take(pos + 1, kid_len)
        pos += 1 + kid_len
        alg_len = take(pos, 1)[0]
        alg_raw = take(pos + 1, alg_len)
        pos += 1 + alg_len
        wrapped_len = int.from_bytes(take(pos, 2), "big")
        wrapped = take(pos + 2, wrapped_len)
        pos += 2 + wrapped_len
        kid = kid_raw.decode("latin-1")
        if not KID.match(kid):
            raise MalformedPackageError("bad kid")
        if not 1 <= len(alg_raw) <= 32 or any(not 0x21 <= b <= 0x7E for b in alg_raw):
            raise MalformedPackageError("bad alg")
        if not 1 <= wrapped_len <= 1024:
            raise MalformedPackageError("bad wrapped length")
        wraps.append(WrapEntry(kid, alg_raw.decode("ascii"), wrapped))
    if pos != len(block):
        raise MalformedPackageError("bytes left over after the last wrap")
    return tuple(wraps)


def _parse_core(core: bytes) -> dict[str, str]:
    """§2.3."""
    try:
        text = core.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPackageError("core is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise MalformedPackageError("core starts with a byte-order mark")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise MalformedPackageError("core is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != set(META_MEMBERS):
        raise MalformedPackageError("core does not have exactly the six members")
    if not all(isinstance(v, str) for v in doc.values()):
        raise MalformedPackageError("core values must be strings")
    try:
        for v in doc.values():
            v.encode("utf-8")  # fails exactly on unpaired surrogates
    except UnicodeEncodeError:
        raise MalformedPackageError("core string holds an unpaired surrogate") from None
    if not RECORDING_ID.match(doc["recording_id"]):
        raise MalformedPackageError("bad recording_id")
    if doc["kind"] not in KINDS:
        raise MalformedPackageError("bad kind")
    for name in ("content_type", "original_name", "captured_at", "agent_id"):
        if len(doc[name]) > 4096:
            raise MalformedPackageError(f"{name} too long")
    return doc


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"member {name!r} occurs twice")  # becomes MalformedPackageError
        out[name] = value
    return out


def canonical_core(metadata: dict[str, str]) -> bytes:
    """§2.3 writer rule (used by the vector generator as a second encoder)."""
    return json.dumps(
        {name: metadata[name] for name in META_MEMBERS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def derive(dek: bytes, salt: bytes, authenticated: bytes) -> Derived:
    """§3."""
    info = LABEL + hashlib.sha256(authenticated).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=salt, info=info).derive(dek)
    mac_key = okm[32:64]
    return Derived(
        info=info,
        payload_key=okm[0:32],
        mac_key=mac_key,
        commitment=okm[64:96],
        header_mac=hmac.new(mac_key, authenticated, "sha256").digest(),
    )


def oaep(alg: str) -> padding.OAEP:
    """§4.1."""
    if alg == "RSA-OAEP-256":
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    if alg == "RSA-OAEP":
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    raise UnsupportedVersionError(f"unknown wrap alg {alg!r}")


def thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """§4.3: RFC 7638 JWK thumbprint (SHA-256) of an RSA public key."""
    nums = public_key.public_numbers()
    jwk = '{"e":"' + _b64u_int(nums.e) + '","kty":"RSA","n":"' + _b64u_int(nums.n) + '"}'
    return _b64u(hashlib.sha256(jwk.encode("ascii")).digest())


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64u_int(value: int) -> str:
    return _b64u(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def unwrap(header: ParsedHeader, private_keys: dict[str, rsa.RSAPrivateKey]) -> bytes:
    """§6 step 2 and §4.2: the first wrap whose kid we hold."""
    for w in header.wraps:
        key = private_keys.get(w.kid)
        if key is None:
            continue
        pad = oaep(w.alg)
        try:
            dek = key.decrypt(w.wrapped, pad)
        except ValueError:
            raise AuthenticationError("wrap does not decrypt") from None
        if len(dek) != 32:
            raise AuthenticationError("wrap does not hold a 32-byte key")
        return dek
    raise NoMatchingKeyError("no wrap for a key we hold")


def check_header(header: ParsedHeader, dek: bytes) -> Derived:
    """§3 / §6 step 3: both checks, constant time, before any chunk."""
    d = derive(dek, header.salt, header.authenticated)
    ok_commitment = hmac.compare_digest(d.commitment, header.commitment)
    ok_mac = hmac.compare_digest(d.header_mac, header.header_mac)
    if not (ok_commitment and ok_mac):
        raise AuthenticationError("header does not authenticate")
    return d


def layout(package_size: int, header_size: int, chunk_size: int) -> tuple[int, int]:
    """§5.1: (number of chunks N, plaintext size P) from the package size."""
    stride = chunk_size + TAG
    body = package_size - header_size
    if body < TAG:
        raise TruncatedPackageError("no final chunk")
    n = max(1, -(-body // stride))
    tail = body - (n - 1) * stride
    if tail < TAG:
        raise TruncatedPackageError("last chunk shorter than its tag")
    if n > 1 and tail == TAG:
        raise TruncatedPackageError("empty chunk after a full one")
    return n, body - TAG * n


def nonce(index: int, last: bool) -> bytes:
    """§5."""
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def open_chunk(aead: AESGCM, index: int, ciphertext: bytes, last: bool) -> bytes:
    """§6 step 4, including the truncation probe for the last chunk."""
    if len(ciphertext) < TAG:
        raise TruncatedPackageError("chunk shorter than its tag")
    try:
        return aead.decrypt(nonce(index, last), ciphertext, None)
    except InvalidTag:
        pass
    if last:
        try:
            aead.decrypt(nonce(index, False), ciphertext, None)
        except InvalidTag:
            pass
        else:
            raise TruncatedPackageError("package cut short at a chunk boundary")
    raise AuthenticationError(f"chunk {index} does not authenticate")


class Package:
    """An opened, header-checked package held in memory (a seekable reader, §6 step 5)."""

    def __init__(self, data: bytes, private_keys: dict[str, rsa.RSAPrivateKey]) -> None:
        self.data = data
        self.header = parse_header(data)
        self.derived = check_header(self.header, unwrap(self.header, private_keys))
        self.chunks, self.plaintext_size = layout(len(data), self.header.size, self.header.chunk_size)
        self._aead = AESGCM(self.derived.payload_key)
        self._final_checked = False

    def chunk(self, index: int) -> bytes:
        stride = self.header.chunk_size + TAG
        start = self.header.size + index * stride
        last = index == self.chunks - 1
        pt = open_chunk(self._aead, index, self.data[start : start + stride], last)
        if last:
            self._final_checked = True
        return pt

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """§5.2: plaintext [offset, offset + length), after the last chunk authenticated."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("negative offset or length")
        if not self._final_checked:
            self.chunk(self.chunks - 1)
        end = self.plaintext_size if length is None else min(offset + length, self.plaintext_size)
        if offset >= end:
            return b""
        c = self.header.chunk_size
        out = bytearray()
        for i in range(offset // c, (end - 1) // c + 1):
            out += self.chunk(i)
        base = (offset // c) * c
        return bytes(out[offset - base : end - base])


def decrypt(data: bytes, private_keys: dict[str, rsa.RSAPrivateKey]) -> Decoded:
    """Decrypt a whole package held in memory."""
    pkg = Package(data, private_keys)
    return Decoded(pkg.header, pkg.derived, pkg.chunks, pkg.read())
