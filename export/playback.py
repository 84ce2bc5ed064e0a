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
    """An opened package in a repository: header checked, DEK unwrapped, final chunk authenticated."""

    def __init__(self, source: PackageSource, key: str, header: codec.Header, keys: codec.Keys,
                 package_size: int, head: bytes) -> None:
        self.source, self.key = source, key
        self.header = header
        self.layout = codec.Layout(header.size, header.chunk_size, package_size)
        self._opener = codec.ChunkOpener(keys.payload)
        self._head = head  # the package's first bytes (ciphertext), as read for the header
        self._final_checked = False
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
        return self.layout.plaintext_size

    async def _fetch(self, offset: int, length: int) -> bytes:
        if offset + length <= len(self._head):
            return self._head[offset:offset + length]
        data = await self.source.read(self.key, offset, length)
        self.stats.requests += 1
        self.stats.bytes += len(data)
        return data

    async def check_final(self) -> None:
        """Authenticate the final chunk (once): the package is as long as its size says, not cut short."""
        if self._final_checked:
            return
        async for _ in self._chunks(range(self.layout.chunks - 1, self.layout.chunks)):
            pass
        self._final_checked = True

    async def _chunks(self, indexes: range) -> AsyncGenerator[memoryview, None]:
        """Plaintext of consecutive chunks, each authenticated before it is yielded: one ranged read.

        Each view is valid until the next one is produced (one buffer, reused).
        """
        if not indexes:
            return
        last = self.layout.chunks - 1
        first_off, _ = self.layout.chunk_span(indexes.start)
        end_off = sum(self.layout.chunk_span(indexes.stop - 1))
        pt = memoryview(bytearray(self.header.chunk_size))
        if end_off <= len(self._head):
            blocks = _blocks_of(self._head[first_off:end_off], self.layout.stride)
        else:
            self.stats.requests += 1
            blocks = self.source.iter_read(self.key, first_off, end_off - first_off, self.layout.stride)
        index = indexes.start
        async with contextlib.aclosing(blocks):  # an abandoned range closes its GET now, not at gc
            async for ct in blocks:
                want = self.layout.chunk_span(index)[1] if index < indexes.stop else 0
                if len(ct) != want:
                    raise codec.TruncatedPackageError(f"package ends inside chunk {index}")
                self.stats.bytes += len(ct)
                n = self._opener.open_into(index, memoryview(ct), pt, index == last)
                yield pt[:n]
                index += 1
        if index != indexes.stop:
            raise codec.TruncatedPackageError(f"package ends inside chunk {index}")

    async def iter_range(self, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        """Plaintext [offset, offset + length) clipped to the recording, one piece per chunk."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length is None:
            length = max(0, self.plaintext_size - offset)
        end = min(offset + length, self.plaintext_size)
        cs = self.header.chunk_size
        chunks = self.layout.chunks_for(offset, length)
        # The final chunk is checked alongside the range's own GET, and awaited before the first piece.
        final = None if self._final_checked else asyncio.ensure_future(self.check_final())
        try:
            index = chunks.start
            async with contextlib.aclosing(self._chunks(chunks)) as pieces:
                async for pt in pieces:
                    if final is not None:
                        await final
                        final = None
                    base = index * cs
                    yield bytes(pt[max(offset - base, 0):min(end - base, len(pt))])
                    index += 1
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
