"""Round trips through codec/: whole packages, streams without seek, byte ranges, Layout arithmetic."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import secrets
import threading

import independent_decoder as spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaseal import codec

CS = 256
SIZES = [0, 1, CS - 1, CS, CS + 1, 5 * CS, 5 * CS + 3]
HYPOTHESIS = settings(max_examples=100, deadline=2000)


class StaticUnwrapper:
    """Hands back a known DEK: lets property tests skip RSA (wraps are tested elsewhere)."""

    def __init__(self, dek: bytes) -> None:
        self.dek = dek

    def unwrap(self, wraps):
        return self.dek


class NoSeek(io.RawIOBase):
    """A read-only stream without seek/tell/fileno that returns at most `step` bytes per call."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def seekable(self) -> bool:
        return False

    def seek(self, *args):
        raise io.UnsupportedOperation("seek")

    def tell(self):
        raise io.UnsupportedOperation("tell")


def make_package(pt: bytes, chunk_size: int = CS, dek: bytes | None = None, overlap: bool = True):
    """A package with a static DEK and a dummy wrap; returns (package bytes, SealResult, dek)."""
    dek = dek or secrets.token_bytes(32)
    wrap = codec.Wrap("test-kid", codec.RSA_OAEP_256, b"\x00" * 384)  # never unwrapped: StaticUnwrapper
    header, keys = codec.Header.create(codec.Metadata("rt-1"), dek, secrets.token_bytes(32), (wrap,), chunk_size)
    out = io.BytesIO()
    result = codec.seal(io.BytesIO(pt), out, header, keys, overlap=overlap, digest=True)
    return out.getvalue(), result, dek


# --- whole packages with real RSA wraps ----------------------------------------------------------


@pytest.fixture(scope="module")
def recipients(codec_kek, codec_kek2):
    return [
        codec.Recipient(codec_kek.kid, codec_kek.public_key),
        codec.Recipient(codec_kek2.kid, codec_kek2.public_key, codec.RSA_OAEP),
    ]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("overlap", [True, False])
def test_round_trip(size, overlap, recipients, codec_kek, codec_kek2, codec_keyring):
    pt = os.urandom(size)
    header, keys = codec.new_package(codec.Metadata("rec-1", "screen", "video/mp4"), recipients, chunk_size=CS)
    out = io.BytesIO()
    result = codec.seal(io.BytesIO(pt), out, header, keys, overlap=overlap, digest=True)
    package = out.getvalue()
    chunks = max(1, -(-size // CS))
    assert result == codec.SealResult(size, len(package), chunks, hashlib.sha256(package).hexdigest())
    assert len(package) == header.size + size + 16 * chunks

    for kek in (codec_kek, codec_kek2):  # each recipient alone can open it (RSA-OAEP-256 and RSA-OAEP)
        reader = codec.open_package(io.BytesIO(package), codec_keyring(kek))
        assert reader.header.metadata == codec.Metadata("rec-1", "screen", "video/mp4")
        assert reader.plaintext_size == size
        got = io.BytesIO()
        assert reader.decrypt_to(got) == size
        assert got.getvalue() == pt
    assert reader.verify() == size

    got = io.BytesIO()
    _, n = codec.decrypt_stream(io.BytesIO(package), got, codec_keyring(codec_kek))
    assert (got.getvalue(), n) == (pt, size)
    # The second decoder, written from docs/FORMAT.md, agrees on fresh random packages too.
    assert spec.decrypt(package, {codec_kek2.kid: codec_kek2.private_key}).plaintext == pt


def test_seal_digest_off_and_on_real_file(tmp_path):
    pt = os.urandom(3 * CS + 5)
    dek = secrets.token_bytes(32)
    header, keys = codec.Header.create(
        codec.Metadata("f-1"), dek, secrets.token_bytes(32), (codec.Wrap("k", codec.RSA_OAEP_256, b"x"),), CS
    )
    src, dst = tmp_path / "in.wav", tmp_path / "out.mseal"
    src.write_bytes(pt)
    with src.open("rb") as f, dst.open("wb") as g:
        result = codec.seal(f, g, header, keys)
    assert result.sha256 is None
    with src.open("rb") as f:
        result2 = codec.seal(f, io.BytesIO(), header, keys, digest=True)
    assert result2.sha256 == hashlib.sha256(dst.read_bytes()).hexdigest()  # same header and keys: same bytes
    with dst.open("rb") as f:  # a real file: the reader sizes it with fstat
        reader = codec.open_package(f, StaticUnwrapper(dek))
        out = io.BytesIO()
        reader.decrypt_to(out, offset=CS - 2, length=5)
    assert out.getvalue() == pt[CS - 2 : CS + 3]


# --- non-seekable streams ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_decrypt_stream_from_a_pipe(size):
    pt = os.urandom(size)
    package, _, dek = make_package(pt)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb", buffering=0) as f:
            f.write(package)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        with os.fdopen(r, "rb", buffering=0) as src:  # unbuffered: short reads straight from the pipe
            out = io.BytesIO()
            header, n = codec.decrypt_stream(src, out, StaticUnwrapper(dek))
    finally:
        writer.join()
    assert (out.getvalue(), n) == (pt, size)
    assert header.metadata.recording_id == "rt-1"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", [1, 7, 300])
def test_decrypt_stream_short_reads_without_seek(size, step):
    pt = os.urandom(size)
    package, _, dek = make_package(pt)
    out = io.BytesIO()
    _, n = codec.decrypt_stream(NoSeek(package, step), out, StaticUnwrapper(dek))
    assert (out.getvalue(), n) == (pt, size)


@pytest.mark.parametrize("size", SIZES)
def test_seal_from_a_source_with_short_reads(size):
    pt = os.urandom(size)
    dek = secrets.token_bytes(32)
    header, keys = codec.Header.create(
        codec.Metadata("s-1"), dek, secrets.token_bytes(32), (codec.Wrap("k", codec.RSA_OAEP_256, b"x"),), CS
    )
    a, b = io.BytesIO(), io.BytesIO()
    codec.seal(NoSeek(pt, 5), a, header, keys)
    codec.seal(io.BytesIO(pt), b, header, keys)
    assert a.getvalue() == b.getvalue()  # chunking depends on the bytes, not on how they arrive


# --- hypothesis: sizes and chunk sizes -------------------------------------------------------------


@HYPOTHESIS
@given(
    log2=st.integers(8, 12),
    chunks=st.integers(0, 5),
    extra=st.integers(-1, 1),
    data=st.data(),
)
def test_round_trip_any_size(log2, chunks, extra, data):
    cs = 1 << log2
    # Concentrate on the edges: k*C - 1, k*C, k*C + 1, plus anything in between.
    size = max(0, chunks * cs + extra) if data.draw(st.booleans()) else data.draw(st.integers(0, 5 * cs))
    pt = secrets.token_bytes(size)
    package, result, dek = make_package(pt, cs, overlap=data.draw(st.booleans()))
    assert result.chunks == max(1, -(-size // cs))
    assert result.sha256 == hashlib.sha256(package).hexdigest()
    reader = codec.open_package(io.BytesIO(package), StaticUnwrapper(dek))
    out = io.BytesIO()
    reader.decrypt_to(out)
    assert out.getvalue() == pt
    out = io.BytesIO()
    codec.decrypt_stream(NoSeek(package, 1000), out, StaticUnwrapper(dek))
    assert out.getvalue() == pt


# --- byte ranges -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranged():
    pt = secrets.token_bytes(7 * CS + 41)
    package, _, dek = make_package(pt)
    return pt, package, dek


@HYPOTHESIS
@given(offset=st.integers(0, 8 * CS + 50), length=st.integers(0, 8 * CS + 50))
def test_range_equals_slice(ranged, offset, length):
    pt, package, dek = ranged
    reader = codec.open_package(io.BytesIO(package), StaticUnwrapper(dek))
    seen: list[int] = []
    real_chunk = reader.chunk

    def spy(index: int):
        seen.append(index)
        return real_chunk(index)

    reader.chunk = spy  # type: ignore[method-assign]
    out = io.BytesIO()
    n = reader.decrypt_to(out, offset=offset, length=length)
    want = pt[offset : offset + length]
    assert (out.getvalue(), n) == (want, len(want))
    # Only the final chunk (checked first) and the chunks holding the range are read.
    last = reader.layout.chunks - 1
    expected = list(range(offset // CS, (offset + len(want) - 1) // CS + 1)) if want else []
    assert seen == [last, *expected]
    assert list(reader.layout.chunks_for(offset, length)) == expected


@HYPOTHESIS
@given(offset=st.integers(0, 7 * CS + 41))
def test_range_to_the_end(ranged, offset):
    pt, package, dek = ranged
    reader = codec.open_package(io.BytesIO(package), StaticUnwrapper(dek))
    out = io.BytesIO()
    reader.decrypt_to(out, offset=offset)
    assert out.getvalue() == pt[offset:]


def test_range_zero_length_still_authenticates_the_final_chunk(ranged):
    _pt, package, dek = ranged
    bad = bytearray(package)
    bad[-1] ^= 1
    reader = codec.open_package(io.BytesIO(bytes(bad)), StaticUnwrapper(dek))
    with pytest.raises(codec.AuthenticationError):
        reader.decrypt_to(io.BytesIO(), offset=10, length=0)


def test_range_offset_past_the_end_without_length_is_empty(ranged):
    """CODEC BUG: decrypt_to(offset > plaintext size) raises ValueError instead of writing nothing.

    PackageReader.iter_range computes length = plaintext_size - offset (negative) and hands it to
    Layout.chunks_for, which rejects it; slice semantics (and docs/FORMAT.md §5.2) say: no bytes.
    """
    pt, package, dek = ranged
    reader = codec.open_package(io.BytesIO(package), StaticUnwrapper(dek))
    out = io.BytesIO()
    assert reader.decrypt_to(out, offset=len(pt) + 1) == 0
    assert out.getvalue() == b""


def test_iter_range_pieces_survive_being_collected(ranged):
    """CODEC BUG: iter_range yields views into one reused buffer, so b"".join(reader.iter_range())
    silently returns wrong plaintext (every piece shows the last chunk read). It should yield bytes,
    or copies, or at least say so in its contract; decrypt_to is unaffected."""
    pt, package, dek = ranged
    reader = codec.open_package(io.BytesIO(package), StaticUnwrapper(dek))
    assert b"".join(reader.iter_range()) == pt


@pytest.fixture(scope="module")
def ranged_real(codec_kek):
    pt = secrets.token_bytes(3 * CS + 9)
    header, keys = codec.new_package(
        codec.Metadata("rr-1"), [codec.Recipient(codec_kek.kid, codec_kek.public_key)], chunk_size=CS
    )
    out = io.BytesIO()
    codec.seal(io.BytesIO(pt), out, header, keys)
    return pt, spec.Package(out.getvalue(), {codec_kek.kid: codec_kek.private_key})


@HYPOTHESIS
@given(offset=st.integers(0, 4 * CS), length=st.one_of(st.none(), st.integers(0, 4 * CS)))
def test_independent_decoder_ranges(ranged_real, offset, length):
    """The range rule of docs/FORMAT.md §5.2, as the second decoder implements it."""
    pt, package = ranged_real
    want = pt[offset:] if length is None else pt[offset : offset + length]
    assert package.read(offset, length) == want


# --- Layout --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "chunks", "plaintext"),
    [
        (16, 1, 0),  # the empty recording
        (17, 1, 1),
        (CS + 15, 1, CS - 1),
        (CS + 16, 1, CS),
        (CS + 16 + 17, 2, CS + 1),
        (3 * (CS + 16), 3, 3 * CS),
        (3 * (CS + 16) + 116, 4, 3 * CS + 100),
    ],
)
def test_layout_table(body, chunks, plaintext):
    layout = codec.Layout(header_size=500, chunk_size=CS, package_size=500 + body)
    assert (layout.chunks, layout.plaintext_size, layout.stride) == (chunks, plaintext, CS + 16)
    spans = [layout.chunk_span(i) for i in range(chunks)]
    assert spans[0][0] == 500
    assert all(b[0] == a[0] + a[1] for a, b in itertools.pairwise(spans))
    assert sum(length for _, length in spans) == body
    assert all(length == CS + 16 for _, length in spans[:-1])


@pytest.mark.parametrize("body", [0, 1, 15, CS + 16 + 16, 4 * (CS + 16) + 16])
def test_layout_rejects_impossible_sizes(body):
    with pytest.raises(codec.TruncatedPackageError):
        codec.Layout(header_size=500, chunk_size=CS, package_size=500 + body)


def test_layout_rejects_a_last_chunk_shorter_than_its_tag():
    """CODEC GAP: Layout accepts a body of k full strides plus 1..15 bytes (docs/FORMAT.md §5.1 says
    TruncatedPackageError) and reports a plaintext size for it; the error only comes when the last
    chunk is opened. Layout already rejects the sibling case (an empty chunk after a full one)."""
    with pytest.raises(codec.TruncatedPackageError):
        codec.Layout(header_size=500, chunk_size=CS, package_size=500 + 2 * (CS + 16) + 5)


@settings(max_examples=200, deadline=None)
@given(log2=st.integers(8, 24), size=st.integers(0, 1 << 34), header=st.integers(100, 40000))
def test_layout_arithmetic(log2, size, header):
    cs = 1 << log2
    chunks = max(1, -(-size // cs))
    layout = codec.Layout(header, cs, header + size + 16 * chunks)
    assert (layout.chunks, layout.plaintext_size) == (chunks, size)
    last_start, last_len = layout.chunk_span(chunks - 1)
    assert last_start == header + (chunks - 1) * (cs + 16)
    assert last_len == size - (chunks - 1) * cs + 16
    assert layout.chunks_for(0, size) == (range(chunks) if size else range(0))
    assert layout.chunks_for(size, 10) == range(0)
    assert layout.chunks_for(0, 0) == range(0)
    with pytest.raises(ValueError):
        layout.chunks_for(-1, 1)


def test_stride_and_nonce():
    assert codec.stride(256) == 272
    assert codec.nonce(0, False) == bytes(12)
    assert codec.nonce(0, True) == bytes(11) + b"\x01"
    assert codec.nonce(0x0102, False) == bytes(9) + b"\x01\x02\x00"
    assert codec.nonce((1 << 88) - 1, True) == b"\xff" * 11 + b"\x01"
    with pytest.raises(OverflowError):
        codec.nonce(1 << 88, False)
    assert spec.nonce(0x0102, True) == codec.nonce(0x0102, True)


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 3 * CS])
@pytest.mark.parametrize("hint", ["exact", "short", "long", "zero"])
def test_size_hint_only_sizes_buffers(size, hint, codec_kek, codec_keyring):
    """A wrong hint (the file grew or shrank since stat) must still seal exactly what was read."""
    hints = {"exact": size, "short": max(0, size - 1), "long": size + 10, "zero": 0}
    pt = os.urandom(size)
    recipient = codec.Recipient(codec_kek.kid, codec_kek.public_key)
    header, keys = codec.new_package(codec.Metadata("rec-hint"), [recipient], CS)
    out = io.BytesIO()
    result = codec.seal(io.BytesIO(pt), out, header, keys, digest=True, size_hint=hints[hint])
    assert result.plaintext_size == size and result.sha256 == hashlib.sha256(out.getvalue()).hexdigest()
    reader = codec.open_package(io.BytesIO(out.getvalue()), codec_keyring(codec_kek))
    assert b"".join(reader.iter_range()) == pt
