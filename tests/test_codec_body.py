"""codec.body, the one chunk reader: range plans, the last-chunk rule, and the streaming feeder.

The expectations are written from docs/FORMAT.md (§5, §5.1, §5.2, §6), not from codec/: chunk i
holds plaintext [i*C, min((i+1)*C, P)) and sits at package offset H + i*S; a plan's reads are the
fewest whole chunks that cover the range; what they decrypt to, cut, is the slice of the plaintext;
a cut, a reordering or a missing last flag fails, the same way for the seekable and the stream reader.
"""

from __future__ import annotations

import io
import secrets

import independent_decoder as spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaseal import codec

TAG = 16
PROPERTY = settings(max_examples=150, deadline=None)


class StaticUnwrapper:
    """Hands back a known DEK: the wraps are tested elsewhere."""

    def __init__(self, dek: bytes) -> None:
        self.dek = dek

    def unwrap(self, wraps: object) -> bytes:
        return self.dek


class Made:
    """A package with a static DEK and a dummy wrap, and its parts."""

    def __init__(self, pt: bytes, chunk_size: int) -> None:
        self.dek = secrets.token_bytes(32)
        wrap = codec.Wrap("test-kid", codec.RSA_OAEP_256, b"\x00" * 384)  # never unwrapped
        self.header, self.keys = codec.Header.create(
            codec.Metadata("body-1"), self.dek, secrets.token_bytes(32), (wrap,), chunk_size)
        out = io.BytesIO()
        codec.seal(io.BytesIO(pt), out, self.header, self.keys, overlap=False)
        self.package, self.pt, self.cs = out.getvalue(), pt, chunk_size
        self.hs, self.stride = self.header.size, chunk_size + TAG
        body = self.package[self.hs:]
        self.chunks = [body[i : i + self.stride] for i in range(0, len(body), self.stride)]

    def body(self, package: bytes | None = None) -> codec.Body:
        return codec.Body(self.header, self.keys, len(self.package if package is None else package))

    def with_body(self, chunks: list[bytes]) -> bytes:
        return self.package[: self.hs] + b"".join(chunks)


@st.composite
def made(draw: st.DrawFn, min_chunks: int = 1, max_chunks: int = 9) -> Made:
    cs = 1 << draw(st.integers(8, 10))
    smallest = (min_chunks - 1) * cs + 1 if min_chunks > 1 else 0  # the fewest bytes that make min_chunks
    edges = [s for s in (0, 1, cs - 1, cs, cs + 1, 3 * cs) if s >= smallest]
    size = draw(st.one_of(st.integers(smallest, max_chunks * cs), st.sampled_from(edges)))
    return Made(secrets.token_bytes(size), cs)


def open_span(body: codec.Body, package: bytes, span: codec.Span) -> list[memoryview]:
    """Open every chunk of `span` from its bytes, as a reader that fetched them would."""
    out = []
    for k, index in enumerate(span.chunks):
        lo = span.offset + k * (body.chunk_size + TAG)
        ct = memoryview(package[lo : min(lo + body.chunk_size + TAG, span.offset + span.length)])
        pt = memoryview(bytearray(body.chunk_size))
        out.append(pt[: body.open_into(index, ct, pt)])
    return out


def read(body: codec.Body, package: bytes, offset: int, length: int | None, past_end: codec.PastEnd) -> bytes:
    plan = body.plan(offset, length, past_end=past_end)
    if plan.final is not None:
        open_span(body, package, plan.final)
    pieces = open_span(body, package, plan.span)
    return b"".join(bytes(plan.cut(i, pt)) for i, pt in zip(plan.span.chunks, pieces, strict=True))


def stream(m: Made, package: bytes, cuts: list[int]) -> bytes:
    """BodyStream over the body of `package`, received in pieces cut at `cuts` (via buffer/received)."""
    s = codec.BodyStream(m.header, m.keys)
    body, out, pos = memoryview(package)[m.hs :], bytearray(), 0
    for cut in [*sorted({min(c, len(body)) for c in cuts}), len(body)]:
        while pos < cut:
            buf = s.buffer()
            k = min(len(buf), cut - pos)
            buf[:k] = body[pos : pos + k]
            pos += k
            out += s.received(k)
    out += s.end()
    return bytes(out)


def both_fail(m: Made, bad: bytes, error: type[codec.CodecError]) -> None:
    """The seekable and the streaming path give `error` for `bad`, and the seekable one releases nothing."""
    with pytest.raises(error):
        codec.open_package(io.BytesIO(bad), StaticUnwrapper(m.dek)).decrypt_to(io.BytesIO())
    with pytest.raises(error):
        codec.decrypt_stream(io.BytesIO(bad), io.BytesIO(), StaticUnwrapper(m.dek))
    with pytest.raises(error):
        stream(m, bad, [])


# --- range plans ------------------------------------------------------------------------------------


@PROPERTY
@given(m=made(), data=st.data())
def test_a_plan_is_the_fewest_whole_chunks_covering_the_range(m: Made, data: st.DataObject) -> None:
    p = len(m.pt)
    offset = data.draw(st.integers(0, p + 2 * m.cs))
    length = data.draw(st.one_of(st.none(), st.integers(0, p + 2 * m.cs)))
    body = m.body()
    n, size = spec.layout(len(m.package), m.hs, m.cs)  # §5.1, the second decoder's reading
    assert (body.chunks, body.plaintext_size) == (n, size) == (len(m.chunks), p)
    if offset > p:
        with pytest.raises(codec.OffsetPastEndError) as e:
            body.plan(offset, length)
        assert (e.value.offset, e.value.plaintext_size) == (offset, p)
        assert isinstance(e.value, ValueError)
    plan = body.plan(offset, length, past_end="empty")
    end = p if length is None else min(offset + length, p)
    want = m.pt[offset:end]
    # The final chunk comes first (it has not verified yet), on its own span.
    assert plan.final == codec.Span(m.hs + (n - 1) * m.stride, len(m.chunks[-1]), range(n - 1, n))
    chunks = plan.span.chunks
    if not want:
        assert not chunks and plan.span.length == 0 and plan.spans == (plan.final,)
    else:
        # Covering and minimal: every chunk holds a byte of the range, and together they hold all of it.
        assert all(i * m.cs < end and offset < min((i + 1) * m.cs, p) for i in chunks)
        assert chunks.start * m.cs <= offset and end <= min(chunks.stop * m.cs, p)
        assert chunks.step == 1
        assert plan.span.offset == m.hs + chunks.start * m.stride
        assert plan.span.length == sum(len(m.chunks[i]) for i in chunks)
        assert plan.spans == (plan.final, plan.span)
    assert read(body, m.package, offset, length, "empty") == want
    if offset <= p:
        assert read(m.body(), m.package, offset, length, "error") == want
    # Once the final chunk verified, plans no longer ask for it.
    assert body.final_checked and body.plan(offset, length, past_end="empty").final is None


@PROPERTY
@given(m=made(), offset=st.integers(0, 12 << 10), length=st.one_of(st.none(), st.integers(0, 12 << 10)))
def test_readers_that_use_the_plan_give_the_slice(m: Made, offset: int, length: int | None) -> None:
    want = m.pt[offset:] if length is None else m.pt[offset : offset + length]
    reader = codec.open_package(io.BytesIO(m.package), StaticUnwrapper(m.dek))
    assert b"".join(reader.iter_range(offset, length)) == want
    if offset > len(m.pt):
        with pytest.raises(codec.OffsetPastEndError):
            reader.decrypt_to(io.BytesIO(), offset, length, past_end="error")
    else:
        out = io.BytesIO()
        assert reader.decrypt_to(out, offset, length, past_end="error") == len(want) and out.getvalue() == want


def test_an_offset_at_the_end_is_an_empty_range_not_an_error() -> None:
    m = Made(b"x" * 300, 256)
    body = m.body()
    assert read(body, m.package, 300, None, "error") == b"" == read(body, m.package, 300, 5, "error")
    empty = Made(b"", 256)
    assert read(empty.body(), empty.package, 0, None, "error") == b""
    with pytest.raises(codec.OffsetPastEndError, match="offset 1 is past the end of the recording"):
        empty.body().plan(1)


def test_negative_ranges_are_refused_before_any_read() -> None:
    body = Made(b"abc", 256).body()
    for offset, length in ((-1, None), (0, -1)):
        with pytest.raises(ValueError, match="negative"):
            body.plan(offset, length)
    assert not body.final_checked


def test_no_chunk_opens_before_the_final_one() -> None:
    m = Made(secrets.token_bytes(3 * 256 + 5), 256)
    body = m.body()
    pt = memoryview(bytearray(256))
    with pytest.raises(RuntimeError, match="final chunk"):
        body.open_into(0, memoryview(m.chunks[0]), pt)
    assert body.open_into(3, memoryview(m.chunks[3]), pt) == 5 and body.final_checked
    assert bytes(pt[: body.open_into(0, memoryview(m.chunks[0]), pt)]) == m.pt[:256]
    with pytest.raises(codec.TruncatedPackageError, match="inside chunk 1"):
        body.open_into(1, memoryview(m.chunks[1][:-1]), pt)
    with pytest.raises(IndexError):
        body.open_into(4, memoryview(m.chunks[3]), pt)


# --- the streaming feeder ---------------------------------------------------------------------------


@PROPERTY
@given(m=made(), cuts=st.lists(st.integers(0, 10 * 1040), max_size=12))
def test_the_stream_gives_the_plaintext_however_the_body_is_cut(m: Made, cuts: list[int]) -> None:
    assert stream(m, m.package, cuts) == m.pt
    s = codec.BodyStream(m.header, m.keys)
    out = b"".join(bytes(pt) for pt in s.feed(m.package[m.hs :])) + bytes(s.end())
    assert out == m.pt and s.released == len(m.pt)
    with pytest.raises(ValueError, match="ended"):
        s.buffer()


def test_the_stream_holds_a_full_chunk_back_until_more_than_a_tag_follows() -> None:
    m = Made(secrets.token_bytes(2 * 256 + 1), 256)
    s = codec.BodyStream(m.header, m.keys)
    body = memoryview(m.package)[m.hs :]

    def give(n: int) -> bytes:
        buf = s.buffer()
        buf[:n] = body[:n]
        return bytes(s.received(n))

    assert give(272) == b""  # chunk 0, full: it may still be the last
    body = body[272:]
    assert give(16) == b""  # a tag's worth of chunk 1: an empty chunk after a full one would be cut short
    body = body[16:]
    assert give(1) == m.pt[:256]  # chunk 1 holds plaintext: chunk 0 is not the last
    body = body[1:]
    with pytest.raises(ValueError):
        s.received(0)


# --- cuts, reorderings and a missing last flag fail, the same way for both readers -----------------


@PROPERTY
@given(m=made(), data=st.data())
def test_a_package_cut_anywhere_fails(m: Made, data: st.DataObject) -> None:
    body_len = len(m.package) - m.hs
    keep = data.draw(st.integers(0, body_len - 1))
    bad = m.package[: m.hs + keep]
    at_boundary = keep % m.stride == 0 and keep > 0
    tail = keep - (max(1, -(-keep // m.stride)) - 1) * m.stride
    truncated = keep < TAG or at_boundary or tail < TAG or (keep > m.stride and tail == TAG)
    both_fail(m, bad, codec.TruncatedPackageError if truncated else codec.AuthenticationError)


@PROPERTY
@given(m=made(min_chunks=2), data=st.data())
def test_reordered_chunks_fail(m: Made, data: st.DataObject) -> None:
    i, j = sorted(data.draw(st.lists(st.integers(0, len(m.chunks) - 1), min_size=2, max_size=2, unique=True)))
    chunks = list(m.chunks)
    chunks[i], chunks[j] = chunks[j], chunks[i]
    both_fail(m, m.with_body(chunks), codec.AuthenticationError)


def _sealed_by_hand(m: Made, flags: list[bool]) -> bytes:
    """m's body re-sealed with the given last flags (FORMAT.md §5), bypassing ChunkSealer's rules."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(m.keys.payload)
    pieces = [m.pt[i * m.cs : (i + 1) * m.cs] for i in range(len(m.chunks))] or [b""]
    return m.with_body([aead.encrypt(spec.nonce(i, flag), piece, None) for i, (piece, flag)
                        in enumerate(zip(pieces, flags, strict=True))])


@PROPERTY
@given(m=made())
def test_a_final_chunk_without_its_last_flag_is_a_truncation(m: Made) -> None:
    n = len(m.chunks)
    assert _sealed_by_hand(m, [False] * (n - 1) + [True]) == m.package  # the rule, restated from §5
    both_fail(m, _sealed_by_hand(m, [False] * n), codec.TruncatedPackageError)


@PROPERTY
@given(m=made(min_chunks=2), data=st.data())
def test_a_last_flag_on_an_earlier_chunk_fails(m: Made, data: st.DataObject) -> None:
    n = len(m.chunks)
    i = data.draw(st.integers(0, n - 2))
    both_fail(m, _sealed_by_hand(m, [k == i for k in range(n - 1)] + [True]), codec.AuthenticationError)
