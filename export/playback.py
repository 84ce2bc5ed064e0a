"""Range decryption of a package straight from a repository: fetch only the chunks a range needs.

>>> pkg = await RemotePackage.open(source, "call/2026/11/28/rec-1.mseal", unwrapper)
>>> pkg.metadata.content_type, pkg.plaintext_size       # both authenticated by now
>>> async for piece in pkg.iter_range(40 * 60 * 16000, 16000): out.write(piece)

What `open` does, in order: one ranged GET of the first 64 KiB, whose Content-Range also gives the
size (a header is at most ~32 KiB, so that always holds it; for a package smaller than that it is
the whole package, and nothing more is fetched); parse;
unwrap the DEK through the unwrapper in a worker thread (keyrings, the LKM client and KMS keyrings
are all synchronous `unwrap(wraps)`); check commitment and header MAC; then authenticate the final
chunk (one ranged GET of at most a chunk), so a package cut short can never pass as a shorter
recording and `plaintext_size` is proven before anything is released. No plaintext is kept.

`iter_range` then makes one ranged GET spanning exactly the chunks that hold the range and opens
them one by one as they arrive: memory is two chunks whatever the range, and a chunk that does
not authenticate raises before any of its bytes come out (earlier, authenticated pieces have already
been yielded). Nothing touches disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from mediaseal import codec
from mediaseal.codec.header import MAX_HEADER
from mediaseal.export.source import PackageSource

__all__ = ["FIRST_READ", "FetchStats", "RemotePackage"]

FIRST_READ = 64 * 1024


@dataclass
class FetchStats:
    """What this package cost in repository reads (for tests and benchmarks)."""

    requests: int = 0
    bytes: int = 0


class RemotePackage:
    """An opened package in a repository: header checked, DEK unwrapped, final chunk authenticated.

    The reads are all this class does: `codec.Body` plans them, sets the last flags and opens no chunk
    of a range before the final chunk verified.
    """

    def __init__(self, source: PackageSource, key: str, header: codec.Header, keys: codec.Keys,
                 package_size: int, head: bytes) -> None:
        self.source, self.key = source, key
        self.header = header
        self.body = codec.Body(header, keys, package_size)
        self.layout = self.body.layout
        self._head = head  # the package's first bytes (ciphertext), as read for the header
        self.stats = FetchStats()

    @classmethod
    async def open(cls, source: PackageSource, key: str, unwrapper: codec.Unwrapper, *,
                   check_final: bool = True) -> RemotePackage:
        """Open `key`; with `check_final=False` the final chunk is authenticated later, by the first
        `iter_range` (concurrently with that range's GET, still before any of its bytes come out) or
        `check_final()`: one round trip less before the first byte of a seek."""
        head, size = await source.read_head(key, FIRST_READ)
        try:
            header = codec.parse_header(head)
        except codec.TruncatedPackageError:
            if len(head) >= size or len(head) >= MAX_HEADER:
                raise
            head = await source.read(key, 0, min(MAX_HEADER, size))  # only with a smaller FIRST_READ
            header = codec.parse_header(head)
        dek = await asyncio.to_thread(unwrapper.unwrap, header.wraps)
        keys = header.open(dek)
        del dek
        pkg = cls(source, key, header, keys, size, head)
        pkg.stats.requests, pkg.stats.bytes = 1, len(head)
        if check_final:
            await pkg.check_final()
        return pkg

    @property
    def metadata(self) -> codec.Metadata:
        return self.header.metadata

    @property
    def plaintext_size(self) -> int:
        return self.body.plaintext_size

    def _blocks(self, span: codec.Span) -> AsyncGenerator[bytes, None]:
        """The ciphertext of `span`, one chunk per block: from the first read if it holds it, else one GET."""
        end = span.offset + span.length
        if end <= len(self._head):
            return _blocks_of(self._head[span.offset:end], self.layout.stride)
        self.stats.requests += 1
        return self.source.iter_read(self.key, span.offset, span.length, self.layout.stride)

    def _open(self, index: int, ct: bytes, pt: memoryview) -> memoryview:
        self.stats.bytes += len(ct)
        return pt[:self.body.open_into(index, memoryview(ct), pt)]

    async def check_final(self) -> None:
        """Authenticate the final chunk (once): the package is as long as its size says, not cut short."""
        if self.body.final_checked:
            return
        span = self.body.final_span
        async with contextlib.aclosing(self._blocks(span)) as blocks:
            ct = await anext(blocks, b"")  # nothing at all: the package ends before it
        self._open(span.chunks.start, ct, memoryview(bytearray(self.header.chunk_size)))

    async def iter_range(self, offset: int = 0, length: int | None = None, *,
                         past_end: codec.PastEnd = "empty") -> AsyncGenerator[bytes, None]:
        """Plaintext [offset, offset + length) clipped to the recording, one piece per chunk.

        An offset past the end gives no bytes, or OffsetPastEndError with `past_end="error"` (before
        any read). Memory: one chunk of plaintext per call (a package is shared by concurrent ranges).
        """
        plan = self.body.plan(offset, length, past_end=past_end)
        # The final chunk is checked alongside the range's own GET, and awaited before its first chunk opens.
        final = None if plan.final is None else asyncio.ensure_future(self.check_final())
        try:
            if plan.span.chunks:
                pt = memoryview(bytearray(self.header.chunk_size))
                async with contextlib.aclosing(self._blocks(plan.span)) as blocks:  # closed now, not at gc
                    for index in plan.span.chunks:
                        ct = await anext(blocks, b"")  # the source ended early: the chunk is short
                        if final is not None:
                            await final
                            final = None
                        yield bytes(plan.cut(index, self._open(index, ct, pt)))
            if final is not None:
                await final
                final = None
        finally:
            if final is not None:
                final.cancel()
                with contextlib.suppress(BaseException):
                    await final

    async def read_range(self, offset: int = 0, length: int | None = None) -> bytes:
        """The whole range in memory (for small ranges and tests)."""
        return b"".join([piece async for piece in self.iter_range(offset, length)])


async def _blocks_of(data: bytes, size: int) -> AsyncGenerator[bytes, None]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
