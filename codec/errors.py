"""The codec's named errors. Every failure to read a package is one of these; nothing else escapes."""

from __future__ import annotations


class CodecError(Exception):
    """Base class: the package could not be produced or read."""


class MalformedPackageError(CodecError):
    """The bytes are not a well-formed package (bad magic, bad lengths, bad metadata)."""


class UnsupportedVersionError(MalformedPackageError):
    """A package of a format version (or feature) this codec does not implement."""


class AuthenticationError(CodecError):
    """A check failed: the header, a wrap or a chunk was altered, or the key is not this package's."""


class TruncatedPackageError(CodecError):
    """The package ends early: a chunk or the final (last-flagged) chunk is missing."""


class NoMatchingKeyError(CodecError):
    """None of the package's DEK wraps is for a key the caller holds."""


class OffsetPastEndError(CodecError, ValueError):
    """A range asked for that starts past the end of the recording: the package is fine, the request is
    not (readers that follow slice semantics, as docs/FORMAT.md §5.2 does, give no bytes instead)."""

    def __init__(self, offset: int, plaintext_size: int) -> None:
        super().__init__(f"offset {offset} is past the end of the recording ({plaintext_size} bytes)")
        self.offset = offset
        self.plaintext_size = plaintext_size
