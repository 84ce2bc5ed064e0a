"""The tamper matrix: every alteration of a package fails with a codec error, and no plaintext of an
affected chunk is ever released (docs/FORMAT.md §6 and §10).

Released bytes are checked for both readers: the seekable one (open_package + iter_range) opens the
last chunk before anything else, so it releases nothing unless the damage is in an earlier chunk and
the last one is intact; the streaming one (decrypt_stream) releases every chunk that verified before
the first damaged one, and nothing from that one on.
"""

from __future__ import annotations

import io
import itertools
import secrets
from collections.abc import Callable

import pytest

from mediaseal import codec

CS = 256
N_CHUNKS = 6  # five full chunks and a last one of 100 bytes
PT_SIZE = (N_CHUNKS - 1) * CS + 100
STRIDE = CS + 16

Result = tuple[bytes, BaseException | None]


def run_seekable(package: bytes, keyring) -> Result:
    out = io.BytesIO()
    try:
        reader = codec.open_package(io.BytesIO(package), keyring)
        for piece in reader.iter_range():
            out.write(piece)
    except Exception as e:
        return out.getvalue(), e
    return out.getvalue(), None


def run_stream(package: bytes, keyring) -> Result:
    out = io.BytesIO()
    try:
        codec.decrypt_stream(io.BytesIO(package), out, keyring)
    except Exception as e:
        return out.getvalue(), e
    return out.getvalue(), None


READERS: dict[str, Callable[[bytes, object], Result]] = {"seekable": run_seekable, "stream": run_stream}


class Sealed:
    """A package and its parts: header bytes, chunk ciphertexts, plaintext."""

    def __init__(self, recipients: list[codec.Recipient], pt: bytes, recording_id: str = "victim-1") -> None:
        self.header, keys = codec.new_package(codec.Metadata(recording_id, "call", "audio/wav"), recipients, CS)
        out = io.BytesIO()
        codec.seal(io.BytesIO(pt), out, self.header, keys)
        self.package = out.getvalue()
        self.pt = pt
        self.head = self.package[: self.header.size]
        body = self.package[self.header.size :]
        self.chunks = [body[i : i + STRIDE] for i in range(0, len(body), STRIDE)]


@pytest.fixture(scope="module")
def victim(codec_kek) -> Sealed:
    s = Sealed([codec.Recipient(codec_kek.kid, codec_kek.public_key)], secrets.token_bytes(PT_SIZE))
    assert len(s.chunks) == N_CHUNKS
    return s


@pytest.fixture(scope="module")
def other(codec_kek) -> Sealed:
    """Another package under the same KEK, with the same chunk size and shape."""
    return Sealed([codec.Recipient(codec_kek.kid, codec_kek.public_key)], secrets.token_bytes(PT_SIZE), "other-1")


@pytest.fixture(scope="module")
def keyring(codec_kek, codec_keyring):
    return codec_keyring(codec_kek)


def expected_release(orig: list[bytes], new: list[bytes], pt: bytes, reader: str) -> bytes:
    """What a reader may release from body `new` (a list of chunk-sized pieces) given the original.

    The first affected position is the first where the chunk differs, or where its last-ness differs
    (the nonce's flag). The streaming reader releases every chunk before it; the seekable reader
    releases the same, but only if the last chunk is untouched (it is checked first), else nothing.
    """
    j = 0
    while j < len(new) and j < len(orig) and new[j] == orig[j] and (j == len(new) - 1) == (j == len(orig) - 1):
        j += 1
    if reader == "seekable" and not (len(new) == len(orig) and new[-1] == orig[-1]):
        return b""
    return pt[: j * CS]


def check(package: bytes, keyring, reader: str, allowed: tuple[type[codec.CodecError], ...], released: bytes) -> None:
    written, err = READERS[reader](package, keyring)
    assert err is not None, "an altered package was accepted"
    assert isinstance(err, allowed), f"{type(err).__name__}: {err}"
    # Safety is "nothing of the affected chunk or after it": releasing less (a reader that spots the
    # damage while reading ahead) is allowed, releasing more never is.
    assert released.startswith(written), f"released {len(written)} bytes, at most {len(released)} allowed"


# --- the header, byte by byte ------------------------------------------------------------------------


def header_fields(s: Sealed) -> list[tuple[str, int, int, tuple[type[codec.CodecError], ...]]]:
    """(field, start, end, the errors a flipped bit there may give) covering every header byte."""
    M, U, A = codec.MalformedPackageError, codec.UnsupportedVersionError, codec.AuthenticationError
    T, K = codec.TruncatedPackageError, codec.NoMatchingKeyError
    L = len(s.header.core)
    (w,) = s.header.wraps
    p = 108 + L  # start of the wraps block
    kid_at = p + 2
    alg_at = kid_at + len(w.kid) + 1
    wl_at = alg_at + len(w.alg)
    fields = [
        ("magic", 0, 5, (M,)),
        ("version", 5, 6, (U,)),
        ("log2_chunk", 6, 7, (M, A)),  # out of range, or another chunk size that fails the header check
        ("reserved", 7, 8, (U,)),
        ("core_len", 8, 10, (M, T)),  # the core no longer parses, or runs past the end
        ("salt", 10, 42, (A,)),
        ("core", 42, 42 + L, (M, A)),  # invalid metadata, or valid metadata that fails the check
        ("commitment", 42 + L, 74 + L, (A,)),
        ("header_mac", 74 + L, 106 + L, (A,)),
        ("wraps_len", 106 + L, 108 + L, (M, T)),
        ("wrap_count", p, p + 1, (M,)),
        ("kid_len", p + 1, p + 2, (M,)),
        ("kid", kid_at, kid_at + len(w.kid), (M, K)),  # a bad character, or another (unknown) kid
        ("alg_len", alg_at - 1, alg_at, (M,)),
        ("alg", alg_at, alg_at + len(w.alg), (M, U)),  # not printable, or an unknown algorithm
        ("wrapped_len", wl_at, wl_at + 2, (M,)),
        ("wrapped", wl_at + 2, s.header.size, (A,)),
    ]
    assert fields[-1][2] == len(s.head)
    assert all(a[2] == b[1] for a, b in itertools.pairwise(fields))
    return fields


@pytest.mark.parametrize("reader", READERS)
def test_flipped_bit_in_every_header_byte(victim, keyring, reader):
    seen: set[str] = set()
    for field, start, end, allowed in header_fields(victim):
        for pos in range(start, end):
            bad = bytearray(victim.package)
            bad[pos] ^= 1 << (pos % 8)
            written, err = READERS[reader](bytes(bad), keyring)
            assert isinstance(err, allowed), f"{field} byte {pos}: {type(err).__name__}: {err}"
            assert written == b"", f"{field} byte {pos}: plaintext released"
            seen.add(field)
    assert len(seen) == 17


@pytest.mark.parametrize("bit", range(8))
def test_every_bit_of_the_prefix(victim, keyring, bit):
    for pos in range(10):
        bad = bytearray(victim.package)
        bad[pos] ^= 1 << bit
        written, err = run_seekable(bytes(bad), keyring)
        assert isinstance(err, codec.CodecError), f"byte {pos} bit {bit}: {err!r}"
        assert written == b""


# --- the body ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("index", range(N_CHUNKS))
@pytest.mark.parametrize("where", ["ciphertext", "tag"])
def test_flipped_bit_in_each_chunk(victim, keyring, reader, index, where):
    chunk = bytearray(victim.chunks[index])
    chunk[0 if where == "ciphertext" else -1] ^= 0x80
    new = [*victim.chunks[:index], bytes(chunk), *victim.chunks[index + 1 :]]
    released = expected_release(victim.chunks, new, victim.pt, reader)
    check(victim.head + b"".join(new), keyring, reader, (codec.AuthenticationError,), released)
    if index < N_CHUNKS - 1:  # a damaged chunk in the middle: the stream got exactly the chunks before it
        assert released == victim.pt[: index * CS]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("keep", range(N_CHUNKS))
def test_truncated_at_every_chunk_boundary(victim, keyring, reader, keep):
    new = victim.chunks[:keep]
    released = expected_release(victim.chunks, new, victim.pt, reader)
    check(victim.head + b"".join(new), keyring, reader, (codec.TruncatedPackageError,), released)
    if reader == "seekable":
        assert released == b""  # the final chunk is checked first


@pytest.mark.parametrize("reader", READERS)
def test_truncated_between_boundaries(victim, keyring, reader):
    for keep in range(N_CHUNKS):
        chunk = victim.chunks[keep]
        for cut in sorted({1, 15, 16, 17, len(chunk) // 2, len(chunk) - 1}):
            new = [*victim.chunks[:keep], chunk[:cut]]
            released = expected_release(victim.chunks, new, victim.pt, reader)
            check(victim.head + b"".join(new), keyring, reader, (codec.CodecError,), released)


@pytest.mark.parametrize("reader", READERS)
def test_truncated_inside_the_header(victim, keyring, reader):
    for cut in range(len(victim.head)):
        written, err = READERS[reader](victim.package[:cut], keyring)
        assert isinstance(err, codec.TruncatedPackageError), f"cut at {cut}: {err!r}"
        assert written == b""


def _reorderings(n: int) -> dict[str, list[int | str]]:
    """Chunk orders (indexes into the original chunks) for the structural attacks."""
    cases: dict[str, list[int | str]] = {}
    for i in range(n):
        cases[f"drop-{i}"] = [j for j in range(n) if j != i]
        cases[f"duplicate-{i}"] = [*range(i + 1), *range(i, n)]
    for i in range(n - 1):
        cases[f"swap-{i}-{i + 1}"] = [*range(i), i + 1, i, *range(i + 2, n)]
    cases["swap-0-last"] = [n - 1, *range(1, n - 1), 0]
    cases["reverse"] = list(reversed(range(n)))
    return cases


REORDERINGS = _reorderings(N_CHUNKS)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("order", REORDERINGS)
def test_dropped_duplicated_reordered_chunks(victim, keyring, reader, order):
    new = [victim.chunks[i] for i in REORDERINGS[order]]
    released = expected_release(victim.chunks, new, victim.pt, reader)
    # Dropping the last chunk is a truncation; everything else fails authentication.
    check(
        victim.head + b"".join(new), keyring, reader, (codec.AuthenticationError, codec.TruncatedPackageError), released
    )
    if order != f"drop-{N_CHUNKS - 1}":
        _written, err = READERS[reader](victim.head + b"".join(new), keyring)
        assert isinstance(err, codec.AuthenticationError), order


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("index", range(N_CHUNKS))
def test_chunk_spliced_from_another_package(victim, other, keyring, reader, index):
    new = [*victim.chunks[:index], other.chunks[index], *victim.chunks[index + 1 :]]
    released = expected_release(victim.chunks, new, victim.pt, reader)
    check(victim.head + b"".join(new), keyring, reader, (codec.AuthenticationError,), released)


@pytest.mark.parametrize("reader", READERS)
def test_header_swapped_between_packages(victim, other, codec_kek, keyring, reader):
    check(other.head + b"".join(victim.chunks), keyring, reader, (codec.AuthenticationError,), b"")
    # A header of another size shifts every chunk boundary as well.
    longer = Sealed(
        [codec.Recipient(codec_kek.kid, codec_kek.public_key)],
        secrets.token_bytes(PT_SIZE),
        "a-much-longer-recording-id-0123456789",
    )
    check(longer.head + b"".join(victim.chunks), keyring, reader, (codec.CodecError,), b"")


@pytest.mark.parametrize("reader", READERS)
def test_wrap_swapped_for_another_packages_wrap(victim, other, keyring, reader):
    swapped = victim.header.with_wraps(other.header.wraps).encode() + b"".join(victim.chunks)
    assert keyring.unwrap(other.header.wraps)  # the wrap itself is fine: it unwraps other's DEK ...
    check(swapped, keyring, reader, (codec.AuthenticationError,), b"")  # ... which fails the commitment
    with pytest.raises(codec.AuthenticationError):
        victim.header.open(keyring.unwrap(other.header.wraps))


# --- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_keyring_without_the_kid(victim, codec_kek2, codec_keyring, reader):
    check(victim.package, codec_keyring(codec_kek2), reader, (codec.NoMatchingKeyError,), b"")


@pytest.mark.parametrize("reader", READERS)
def test_right_kid_wrong_private_key(victim, codec_kek, codec_kek2, codec_keyring, reader):
    impostor = codec_keyring(extra={codec_kek.kid: codec_kek2.private_key})
    check(victim.package, impostor, reader, (codec.AuthenticationError,), b"")


def test_wrong_algorithm_name_for_the_wrap(victim, keyring):
    (w,) = victim.header.wraps
    relabelled = victim.header.with_wraps((codec.Wrap(w.kid, codec.RSA_OAEP, w.wrapped),))
    written, err = run_seekable(relabelled.encode() + b"".join(victim.chunks), keyring)
    assert isinstance(err, codec.AuthenticationError)
    assert written == b""


def test_unused_wrap_is_not_checked(codec_kek, codec_kek2, keyring):
    """By design (docs/FORMAT.md §10): wraps are not authenticated, so damage to a wrap the reader
    does not use goes unnoticed by that reader, and is caught by the commitment for the one who does."""
    s = Sealed(
        [codec.Recipient(codec_kek.kid, codec_kek.public_key), codec.Recipient(codec_kek2.kid, codec_kek2.public_key)],
        secrets.token_bytes(300),
    )
    bad = bytearray(s.package)
    bad[s.header.size - 10] ^= 1  # inside the second wrap's RSA ciphertext
    written, err = run_seekable(bytes(bad), keyring)
    assert err is None
    assert written == s.pt


def test_rewrap_keeps_the_body_and_needs_the_right_key(victim, codec_kek, codec_kek2, codec_keyring, keyring):
    out = io.BytesIO()
    new_header = codec.rewrap(
        io.BytesIO(victim.package), out, keyring, [codec.Recipient(codec_kek2.kid, codec_kek2.public_key)]
    )
    rewrapped = out.getvalue()
    assert rewrapped[new_header.size :] == b"".join(victim.chunks)
    assert new_header.authenticated == victim.header.authenticated
    assert [w.kid for w in new_header.wraps] == [codec_kek2.kid]
    written, err = run_seekable(rewrapped, codec_keyring(codec_kek2))
    assert err is None
    assert written == victim.pt
    assert isinstance(run_seekable(rewrapped, keyring)[1], codec.NoMatchingKeyError)
    impostor = codec_keyring(extra={codec_kek.kid: codec_kek2.private_key})
    with pytest.raises(codec.AuthenticationError):
        codec.rewrap(io.BytesIO(victim.package), io.BytesIO(), impostor, [])
