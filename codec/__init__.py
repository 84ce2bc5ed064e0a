"""The .mseal package format: header, streaming AES-256-GCM body, DEK wraps. Pure and synchronous.

>>> header, keys = new_package(Metadata("rec-1", "call"), [Recipient(kid, public_key)])
>>> seal(open("in.wav", "rb"), open("out.mseal", "wb"), header, keys)
>>> open_package(open("out.mseal", "rb"), keyring).decrypt_to(sys.stdout.buffer)
"""

from mediaseal.codec.body import Body, BodyStream, Layout, PastEnd, Plan, Span
from mediaseal.codec.errors import (
    AuthenticationError,
    CodecError,
    MalformedPackageError,
    NoMatchingKeyError,
    OffsetPastEndError,
    TruncatedPackageError,
    UnsupportedVersionError,
)
from mediaseal.codec.header import (
    DEFAULT_CHUNK_SIZE,
    KINDS,
    Header,
    Keys,
    Metadata,
    derive_keys,
    parse_header,
    read_header,
)
from mediaseal.codec.package import (
    PackageReader,
    Recipient,
    SealResult,
    Unwrapper,
    decrypt_stream,
    new_package,
    open_package,
    rewrap,
    seal,
)
from mediaseal.codec.stream import TAG_SIZE, ChunkOpener, ChunkSealer, nonce, stride
from mediaseal.codec.wrap import RSA_OAEP, RSA_OAEP_256, WRAP_ALGORITHMS, Wrap, unwrap_dek, wrap_dek

__all__ = [
    "DEFAULT_CHUNK_SIZE", "KINDS", "RSA_OAEP", "RSA_OAEP_256", "TAG_SIZE", "WRAP_ALGORITHMS",
    "AuthenticationError", "Body", "BodyStream", "ChunkOpener", "ChunkSealer", "CodecError", "Header", "Keys",
    "Layout", "MalformedPackageError", "Metadata", "NoMatchingKeyError", "OffsetPastEndError", "PackageReader",
    "PastEnd", "Plan", "Recipient", "SealResult", "Span", "TruncatedPackageError", "UnsupportedVersionError",
    "Unwrapper", "Wrap", "decrypt_stream", "derive_keys", "new_package", "nonce", "open_package", "parse_header",
    "read_header", "rewrap", "seal", "stride", "unwrap_dek", "wrap_dek",
]
