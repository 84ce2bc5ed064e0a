"""The body of a package: where its chunks are, which one is the last, how each is opened. No I/O.

Every reader of a package (the seekable file reader, the stream reader, playback's ranged reads from
a repository, the export stream) feeds this module with bytes it fetched itself; none of them
re-states the layout or the last-chunk rule (docs/FORMAT.md §5 and §6):

- `Layout` is the size arithmetic (§5.1). Every chunk but the last is full and the last holds at
  least one byte (unless the recording is empty and it is the only chunk), so the package size alone
  fixes the chunk count, the plaintext size and every chunk's span; a size no writer can produce is
  TruncatedPackageError before any chunk is read.
- `Body` is random access to a package of known size. `plan(offset, length)` names the package bytes
  to fetch for a plaintext range -- whole chunks only, because a tag covers a whole chunk -- and cuts
  the range out of what they decrypt to (§5.2). `open_into(i, ...)` sets the last flag exactly when
  i is the final chunk, and opens no other chunk until the final one verified (§6 step 5): its flag
  is the only proof of where the package ends, so before that a package cut at a chunk boundary
  would pass as a shorter recording. Sizes are claims until then.
- `BodyStream` decrypts a stream of unknown length in order (§6 step 6), sans-I/O in the style of
  asyncio's BufferedProtocol: the caller reads ciphertext straight into `buffer()` (readinto, no
  copy) and reports it with `received(n)`, then calls `end()` at the end of the stream. A chunk is
  the last when the stream ends inside it or right after it, so the chunk before is held back until
  more than a tag of the next one came; the same layout rules as `Layout` then hold for streams.

A chunk's plaintext is released only after its tag verified (ChunkOpener wipes the buffer
otherwise). Buffers belong to the callers of `Body` (a package shared by concurrent ranges needs one
per range); `BodyStream` owns its own: two strides and one chunk. Returned views into a buffer are
valid until the next call that writes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

from mediaseal.codec.errors import OffsetPastEndError, TruncatedPackageError
from mediaseal.codec.header import Header, Keys
from mediaseal.codec.stream import TAG_SIZE, ChunkOpener, stride

PastEnd = Literal["error", "empty"]
"""What a range that starts past the end of the recording gives: OffsetPastEndError, or no bytes."""

_NOTHING = memoryview(b"")


@dataclass(frozen=True)
class Layout:
    """Where things are in a package of a known total size (§5.1). Pure arithmetic.

    The body length alone fixes the chunk count, because every chunk but the last is full and the
    last is non-empty (unless the recording is empty and it is the only one).
    """

    header_size: int
    chunk_size: int
    package_size: int

    def __post_init__(self) -> None:
        body = self.package_size - self.header_size
        if body < TAG_SIZE:
            raise TruncatedPackageError("package has no final chunk")
        last = body - (self.chunks - 1) * self.stride
        if last < TAG_SIZE:
            raise TruncatedPackageError("package ends inside a chunk's tag")
        if self.chunks > 1 and last == TAG_SIZE:
            raise TruncatedPackageError("package ends with an empty chunk after a full one")

    # Cached: a seeking player plans a range per request, so these are on its path.
    @cached_property
    def stride(self) -> int:
        return stride(self.chunk_size)

    @cached_property
    def chunks(self) -> int:
        body = self.package_size - self.header_size
        return max(1, -(-body // self.stride))

    @cached_property
    def plaintext_size(self) -> int:
        body = self.package_size - self.header_size
        return body - self.chunks * TAG_SIZE

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset in the package, length) of chunk `index`'s ciphertext."""
        start = self.header_size + index * self.stride
        return start, min(self.stride, self.package_size - start)

    def chunks_span(self, chunks: range) -> tuple[int, int]:
        """(offset in the package, length) of the ciphertext of consecutive `chunks`, one after another."""
        start = self.header_size + chunks.start * self.stride
        return start, min(self.header_size + chunks.stop * self.stride, self.package_size) - start

    def chunks_for(self, offset: int, length: int) -> range:
        """The chunks holding plaintext bytes [offset, offset + length) (§5.2; none past the end)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        end = min(offset + length, self.plaintext_size)
        if offset >= end:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)


class Span(NamedTuple):  # tuples: one is made per range request, and they are cheap to make
    """Package bytes [offset, offset + length): the ciphertext of `chunks`, whole, one after another."""

    offset: int
    length: int
    chunks: range


class Plan(NamedTuple):
    """How to read plaintext [start, end): open `final` first (when it is not None), then the chunks
    of `span` in order, releasing `cut(i, plaintext of chunk i)` of each."""

    start: int
    end: int
    chunk_size: int
    span: Span  # the chunks holding the range; no chunks when the range is empty
    final: Span | None  # the final chunk, while it has not verified: even an empty range checks it

    @property
    def spans(self) -> tuple[Span, ...]:
        """What to fetch, in the order it is opened."""
        return tuple(s for s in (self.final, self.span) if s is not None and s.chunks)

    def cut(self, index: int, plaintext: memoryview) -> memoryview:
        """The part of chunk `index`'s plaintext that lies inside the range."""
        base = index * self.chunk_size
        return plaintext[max(self.start - base, 0) : self.end - base]


class Body:
    """The chunks of an opened package of known size (header checked, payload key derived).

    It holds no buffers, so one Body serves concurrent ranges (playback shares a package between
    requests); its one state is `final_checked`, which only ever turns true.
    """

    def __init__(self, header: Header, keys: Keys, package_size: int) -> None:
        self.layout = Layout(header.size, header.chunk_size, package_size)
        self.chunk_size = header.chunk_size
        self.chunks = self.layout.chunks
        self.last = self.chunks - 1
        self.plaintext_size = self.layout.plaintext_size
        self.final_span = self.span(range(self.last, self.chunks))
        self.final_checked = False  # the final chunk verified: the sizes are proven
        self._opener = ChunkOpener(keys.payload)
        self._full, self._final_len = self.layout.stride, self.final_span.length  # chunk lengths, for open_into

    def span(self, chunks: range) -> Span:
        """The package bytes holding `chunks` (consecutive, within the package)."""
        if not chunks:
            return Span(self.layout.header_size, 0, chunks)
        return Span(*self.layout.chunks_span(chunks), chunks)

    def plan(self, offset: int, length: int | None = None, *, past_end: PastEnd = "error") -> Plan:
        """The reads for plaintext [offset, offset + length), clipped at the end (None: to the end).

        An offset greater than the plaintext size is OffsetPastEndError, or with `past_end="empty"`
        an empty range, as slices and docs/FORMAT.md §5.2 have it (an offset equal to the size is an
        empty range either way). An empty plan still names the final chunk until it verified, so an
        empty answer never hides a truncated package.
        """
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        size = self.plaintext_size
        if offset > size and past_end == "error":
            raise OffsetPastEndError(offset, size)
        end = size if length is None else min(offset + length, size)
        start = min(offset, end)
        chunks = self.layout.chunks_for(start, end - start)
        final = None if self.final_checked else self.final_span
        return Plan(start, end, self.chunk_size, self.span(chunks), final)

    def open_into(self, index: int, ciphertext: memoryview, out: memoryview) -> int:
        """Open chunk `index` from its whole ciphertext into `out`; return the plaintext length."""
        if not 0 <= index < self.chunks:
            raise IndexError(f"chunk {index} is not in this package ({self.chunks} chunks)")
        last = index == self.last
        if not (last or self.final_checked):
            raise RuntimeError("the final chunk must verify before any other is opened (FORMAT.md §6 step 5)")
        want = self._final_len if last else self._full
        if len(ciphertext) != want:
            if len(ciphertext) < want:
                raise TruncatedPackageError(f"package ends inside chunk {index}")
            raise ValueError(f"chunk {index} is {want} bytes, not {len(ciphertext)}")
        n = self._opener.open_into(index, ciphertext, out, last)
        if last:
            self.final_checked = True
        return n


class BodyStream:
    """Sequential decryption of a package body whose length is not known (pipes, sockets, streams).

    >>> s = BodyStream(header, keys)
    >>> while n := src.readinto(s.buffer()):
    ...     dst.write(s.received(n))
    >>> dst.write(s.end())

    Chunk i (`_index`) is held in one stride buffer while chunk i + 1 arrives in the other; chunk i
    is opened as not-last once more than TAG_SIZE bytes of chunk i + 1 came (a chunk after it holds
    plaintext), and `end()` opens whichever is the last. An empty chunk after a full one, or a chunk
    shorter than its tag, is TruncatedPackageError before the chunk before it is opened, as `Layout`
    says for the same bytes at rest: a streaming and a seekable reader give the same error.
    """

    def __init__(self, header: Header, keys: Keys) -> None:
        self._opener = ChunkOpener(keys.payload)
        self._stride = stride(header.chunk_size)
        self._bufs = (memoryview(bytearray(self._stride)), memoryview(bytearray(self._stride)))
        self._pt = memoryview(bytearray(header.chunk_size))
        self._held = 0  # which buffer holds chunk `_index`
        self._held_len = 0  # bytes of chunk `_index` received (a full stride once it is held back)
        self._ahead_len = 0  # bytes of chunk `_index + 1` received, in the other buffer
        self._index = 0
        self._opened = False  # chunk `_index` opened (as not-last)
        self._ended = False
        self.released = 0  # plaintext bytes handed out so far

    def buffer(self) -> memoryview:
        """Where the next ciphertext bytes go (never empty); report them with `received`."""
        if self._ended:
            raise ValueError("the stream has ended")
        if self._held_len < self._stride:
            return self._bufs[self._held][self._held_len :]
        return self._bufs[1 - self._held][self._ahead_len :]

    def received(self, n: int) -> memoryview:
        """`n` bytes were written at the start of `buffer()`: the plaintext now released (maybe none)."""
        if not 0 < n <= len(self.buffer()):
            raise ValueError("received more bytes than buffer() had room for, or none")
        if self._held_len < self._stride:
            self._held_len += n
            return _NOTHING
        self._ahead_len += n
        out = _NOTHING
        if not self._opened and self._ahead_len > TAG_SIZE:
            out = self._open(self._bufs[self._held], last=False)
            self._opened = True
        if self._ahead_len == self._stride:  # chunk i + 1 is full: hold it back in turn
            self._held, self._ahead_len, self._index, self._opened = 1 - self._held, 0, self._index + 1, False
        return out

    def feed(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """`received` for bytes that came in blocks of their own (one copy): each released piece."""
        view = memoryview(data)
        while view:
            buf = self.buffer()
            k = min(len(buf), len(view))
            buf[:k] = view[:k]
            view = view[k:]
            if out := self.received(k):
                yield out

    def end(self) -> memoryview:
        """The stream ended: open the last chunk (checking that it is one) and return its plaintext."""
        self._ended = True
        held, ahead = self._held_len, self._ahead_len
        if held < self._stride:  # only the first chunk is ever held short
            if held < TAG_SIZE:
                raise TruncatedPackageError("package has no final chunk")
            return self._open(self._bufs[self._held][:held], last=True)
        if ahead == 0:
            return self._open(self._bufs[self._held], last=True)
        if ahead < TAG_SIZE:
            raise TruncatedPackageError("package ends inside a chunk's tag")
        if ahead == TAG_SIZE:
            raise TruncatedPackageError("package ends with an empty chunk after a full one")
        self._index += 1  # chunk i went out as not-last when chunk i + 1 passed its tag
        return self._open(self._bufs[1 - self._held][:ahead], last=True)

    def _open(self, ciphertext: memoryview, last: bool) -> memoryview:
        n = self._opener.open_into(self._index, ciphertext, self._pt, last)
        self.released += n
        return self._pt[:n]
