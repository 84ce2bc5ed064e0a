"""Whole packages: make one from a stream, read one back (all of it, or any byte range), re-wrap one.

>>> header, keys = new_package(Metadata("rec-1", "call"), [recipient])
>>> result = seal(src, dst, header, keys)                  # file objects in, package out
>>> reader = open_package(package_file, unwrapper)         # header checked before any chunk
>>> reader.decrypt_to(out, offset=40 * 60 * 16000, length=16000)

Everything here is synchronous and blocking; memory is a few chunks whatever the recording's size.
`seal` overlaps reading+sealing with writing on one helper thread (AES-GCM and file I/O release the
GIL), which is what takes it from ~0.7x to ~1x a plain copy.
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import rsa

from mediaseal.codec.body import Body, BodyStream, PastEnd
from mediaseal.codec.header import DEFAULT_CHUNK_SIZE, SALT_SIZE, Header, Keys, Metadata, read_header
from mediaseal.codec.stream import TAG_SIZE, ChunkSealer, stride
from mediaseal.codec.wrap import DEK_SIZE, RSA_OAEP_256, Wrap, wrap_dek


class ReadInto(Protocol):
    """What `seal` reads plaintext from: anything with `readinto` (the hot path reads in place)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Readable(ReadInto, Protocol):
    """What packages are read from: a binary file or pipe."""

    def read(self, size: int = -1, /) -> bytes: ...


class Seekable(Readable, Protocol):
    """A package read out of order (random access needs `seek`)."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class Writable(Protocol):
    def write(self, data: memoryview | bytes, /) -> int | None: ...


@dataclass(frozen=True)
class Recipient:
    """A public KEK a package is sealed to."""

    kid: str
    public_key: rsa.RSAPublicKey
    alg: str = RSA_OAEP_256


class Unwrapper(Protocol):
    """Anything that can turn one of a package's wraps back into its DEK (a keyring, a key service)."""

    def unwrap(self, wraps: Sequence[Wrap]) -> bytes:
        """Return the DEK from a wrap for a key this unwrapper holds; raise NoMatchingKeyError if none."""
        ...


@dataclass(frozen=True)
class SealResult:
    plaintext_size: int
    package_size: int
    chunks: int
    sha256: str | None  # of the package bytes, when asked for


def new_package(
    metadata: Metadata,
    recipients: Sequence[Recipient],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Header, Keys]:
    """A header for a new recording under a fresh DEK wrapped to every recipient.

    The DEK comes from the OS CSPRNG and is not returned: once the wraps and the derived keys exist,
    nothing needs it, so it goes out of scope here.
    """
    if not recipients:
        raise ValueError("a package needs at least one recipient")
    dek = secrets.token_bytes(DEK_SIZE)
    wraps = tuple(wrap_dek(dek, r.public_key, r.kid, r.alg) for r in recipients)
    return Header.create(metadata, dek, secrets.token_bytes(SALT_SIZE), wraps, chunk_size)


def seal(
    src: ReadInto,
    dst: Writable,
    header: Header,
    keys: Keys,
    *,
    overlap: bool = True,
    digest: bool = False,
    size_hint: int | None = None,
) -> SealResult:
    """Write `header` and then `src`, sealed chunk by chunk, to `dst`. Reads `src` to its end.

    `size_hint` (the expected plaintext size, e.g. from stat) only sizes the buffers: a recording
    shorter than one chunk is sealed with buffers of its own size and no helper thread, which is
    most of the cost of a small file. A source longer than hinted is still sealed whole.
    """
    cs = header.chunk_size
    buf = memoryview(bytearray(cs if size_hint is None or size_hint >= cs else size_hint + 1))
    n = 0
    if len(buf) < cs:
        # One byte past the hint shows whether the source really ends there.
        n = _read_full(src, buf)
        if n < len(buf):
            overlap = False
        else:  # longer than hinted: carry on with a full-size buffer
            grown = memoryview(bytearray(cs))
            grown[:n] = buf[:n]
            buf = grown
    size = stride(cs) if len(buf) == cs else n + TAG_SIZE
    sink: _Sink = _ThreadedSink(dst, size, digest) if overlap else _Sink(dst, size, digest)
    sealer = ChunkSealer(keys.payload, cs)
    # One input buffer, so a chunk is still cache-warm when it is sealed. A full chunk is the last one
    # only if nothing follows it: a one-byte look-ahead tells, and that byte starts the next chunk.
    peek = memoryview(bytearray(1))
    try:
        sink.put_bytes(header.encode())
        if len(buf) == cs:
            n += _read_full(src, buf[n:])
        total, chunks = n, 0
        while True:
            last = n < cs or _read_full(src, peek) == 0
            out = sink.buffer()
            sink.submit(out, sealer.seal_into(buf[:n], out, last))
            chunks += 1
            if last:
                break
            buf[0] = peek[0]
            n = 1 + _read_full(src, buf[1:])
            total += n
    except BaseException:
        sink.abort()
        raise
    written, sha = sink.close()
    return SealResult(total, written, chunks, sha)


class PackageReader:
    """Random access to an opened package in a seekable file. Only authenticated bytes come out.

    The file I/O is all this class does: `Body` plans the reads, sets the last flags and sees that
    the final chunk verified before any other chunk is opened.
    """

    def __init__(self, f: Seekable, header: Header, keys: Keys, package_size: int) -> None:
        self.header = header
        self.body = Body(header, keys, package_size)
        self.layout = self.body.layout
        self._f = f
        self._ct = memoryview(bytearray(self.layout.stride))
        self._pt = memoryview(bytearray(header.chunk_size))

    @property
    def plaintext_size(self) -> int:
        return self.body.plaintext_size

    def chunk(self, index: int) -> memoryview:
        """The plaintext of chunk `index` (valid until the next call)."""
        offset, length = self.layout.chunk_span(index)
        self._f.seek(offset)
        ct = self._ct[:length]
        n = self.body.open_into(index, ct[: _read_full(self._f, ct)], self._pt)
        return self._pt[:n]

    def iter_range(self, offset: int = 0, length: int | None = None, *, past_end: PastEnd = "empty") -> Iterator[bytes]:
        """Plaintext bytes [offset, offset + length), chunk by chunk (each piece its own bytes).

        The final chunk is authenticated first when the range does not reach it, so a package cut
        short at a chunk boundary can't pass as a shorter recording. An offset past the end gives no
        bytes, or OffsetPastEndError with `past_end="error"`.
        """
        for view in self._views(offset, length, past_end):
            yield bytes(view)

    def _views(self, offset: int, length: int | None, past_end: PastEnd) -> Iterator[memoryview]:
        # Views into one reused buffer: each is valid only until the next is produced.
        plan = self.body.plan(offset, length, past_end=past_end)
        if plan.final is not None:
            self.chunk(self.body.last)
        for i in plan.span.chunks:
            yield plan.cut(i, self.chunk(i))

    def decrypt_to(self, dst: Writable, offset: int = 0, length: int | None = None, *,
                   past_end: PastEnd = "empty") -> int:
        """Write plaintext [offset, offset + length) to `dst`; return the bytes written."""
        written = 0
        for piece in self._views(offset, length, past_end):
            _write_all(dst, piece)
            written += len(piece)
        return written

    def verify(self) -> int:
        """Authenticate every chunk (the final one first), keeping nothing; return the plaintext size."""
        if not self.body.final_checked:
            self.chunk(self.body.last)
        for i in range(self.body.last):
            self.chunk(i)
        return self.plaintext_size


def open_package(f: Seekable, unwrapper: Unwrapper) -> PackageReader:
    """Read and check the header of the package in seekable `f`, unwrap its DEK, and return a reader."""
    f.seek(0)
    header = read_header(f)
    keys = header.open(unwrapper.unwrap(header.wraps))
    return PackageReader(f, header, keys, _size_of(f))


def decrypt_stream(src: Readable, dst: Writable, unwrapper: Unwrapper) -> tuple[Header, int]:
    """Decrypt a package from a non-seekable stream to `dst`, in order; return (header, plaintext bytes).

    Each chunk is written only after it authenticated, but a failure later in the stream leaves the
    earlier chunks written: callers that must not release partial output write to a temp file.
    """
    header = read_header(src)
    body = BodyStream(header, header.open(unwrapper.unwrap(header.wraps)))
    while n := src.readinto(body.buffer()):  # straight into the stream's buffers: no copy
        if pt := body.received(n):
            _write_all(dst, pt)
    _write_all(dst, body.end())
    return header, body.released


def rewrap(src: Readable, dst: Writable, unwrapper: Unwrapper, recipients: Sequence[Recipient],
           *, keep_existing: bool = False) -> Header:
    """Copy the package in `src` to `dst` with its DEK wrapped to `recipients`; the body is untouched.

    The DEK is unwrapped and checked against the header's commitment first, so a package can't be
    re-wrapped with a wrong key. With `keep_existing`, wraps for other kids stay.
    """
    header = read_header(src)
    dek = unwrapper.unwrap(header.wraps)
    header.open(dek)
    new = [wrap_dek(dek, r.public_key, r.kid, r.alg) for r in recipients]
    kept = [w for w in header.wraps if keep_existing and w.kid not in {r.kid for r in recipients}]
    out = header.with_wraps(tuple(kept + new))
    dst.write(out.encode())
    while block := src.read(1 << 20):
        dst.write(block)
    return out


def _size_of(f: Seekable) -> int:
    try:
        return os.fstat(f.fileno()).st_size  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        pos = f.tell()
        size = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return size


def _read_full(f: ReadInto, buf: memoryview) -> int:
    """readinto until `buf` is full or the stream ends (pipes and sockets return short reads)."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


class _Sink:
    """Writes sealed chunks to `dst` (optionally hashing them) on the calling thread."""

    def __init__(self, dst: Writable, size: int, digest: bool) -> None:
        self._dst = dst
        self._sha = hashlib.sha256() if digest else None
        self._buf = memoryview(bytearray(size))
        self.written = 0

    def buffer(self) -> memoryview:
        return self._buf

    def put_bytes(self, data: bytes) -> None:
        self._write(memoryview(data))

    def submit(self, buf: memoryview, n: int) -> None:
        self._write(buf[:n])

    def _write(self, view: memoryview) -> None:
        if self._sha is not None:
            self._sha.update(view)
        _write_all(self._dst, view)
        self.written += len(view)

    def abort(self) -> None:
        pass

    def close(self) -> tuple[int, str | None]:
        return self.written, (self._sha.hexdigest() if self._sha is not None else None)


class _ThreadedSink(_Sink):
    """The same, but writing on a helper thread while the caller reads and seals the next chunk.

    A fixed set of buffers circulates between the two threads, which bounds memory and gives
    backpressure: the sealer waits for a free buffer when the writer falls behind.
    """

    BUFFERS = 2  # two in flight keep the writer busy; more only evict the cache (see docs/BENCHMARKS.md)

    def __init__(self, dst: Writable, size: int, digest: bool) -> None:
        super().__init__(dst, size, digest)
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(self.BUFFERS + (2 if digest else 0)):  # two more keep the hasher fed
            self._free.put(memoryview(bytearray(size)))
        # Each item: the bytes to write, and the buffer to hand back once written (None: nothing).
        self._full: queue.SimpleQueue[tuple[memoryview, memoryview | None] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        # With a digest, a second helper hashes each buffer after it is written (in order), so hashing
        # chunk i overlaps writing chunk i+1 instead of following it on the writer thread.
        self._hashq: queue.SimpleQueue[tuple[memoryview, memoryview | None] | None] = queue.SimpleQueue()
        self._hasher: threading.Thread | None = None
        if self._sha is not None:
            self._hasher = threading.Thread(target=self._hash_run, name="mediaseal-hasher", daemon=True)
            self._hasher.start()
        self._thread = threading.Thread(target=self._run, name="mediaseal-writer", daemon=True)
        self._thread.start()

    def _write(self, view: memoryview) -> None:  # the hasher thread does the digest
        _write_all(self._dst, view)
        self.written += len(view)

    def _hash_run(self) -> None:
        assert self._sha is not None
        while (item := self._hashq.get()) is not None:
            view, recycle = item
            self._sha.update(view)
            if recycle is not None:
                self._free.put(recycle)

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            view, recycle = item
            if self._error is None:
                try:
                    self._write(view)
                except BaseException as e:  # handed to the sealing thread, which raises it
                    self._error = e
            if self._hasher is not None:
                self._hashq.put(item)
            elif recycle is not None:
                self._free.put(recycle)
        if self._hasher is not None:
            self._hashq.put(None)
            self._hasher.join()

    def buffer(self) -> memoryview:
        if self._error is not None:
            raise self._error
        return self._free.get()

    def put_bytes(self, data: bytes) -> None:
        self._full.put((memoryview(data), None))

    def submit(self, buf: memoryview, n: int) -> None:
        self._full.put((buf[:n], buf))

    def abort(self) -> None:
        self._full.put(None)
        self._thread.join()

    def close(self) -> tuple[int, str | None]:
        self._full.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return super().close()


def _write_all(dst: Writable, view: memoryview) -> None:
    while view:
        n = dst.write(view)
        if n is None or n >= len(view):  # buffered writers write everything or raise
            return
        view = view[n:]

