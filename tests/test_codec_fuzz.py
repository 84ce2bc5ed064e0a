"""Hostile bytes at the codec's readers: only CodecError subclasses come out, in bounded time
(hypothesis deadline) and bounded memory (tracemalloc peak per example)."""

from __future__ import annotations

import contextlib
import io
import secrets
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import independent_decoder as spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import codec

CS = 256
MAX_PEAK = 4 << 20  # bytes: a reader holds a header and a few chunks, never what a length field claims
FUZZ = settings(max_examples=500, deadline=1000)


@contextmanager
def bounded_memory(limit: int = MAX_PEAK) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes"


@pytest.fixture(scope="module")
def valid(codec_kek, codec_kek2, codec_keyring):
    """A valid 3-chunk package with two wraps, and a keyring for its first KEK."""
    header, keys = codec.new_package(
        codec.Metadata("fuzz-1", "digital", "video/mp4", "f.mp4", "2026-01-01T00:00:00Z", "agent"),
        [
            codec.Recipient(codec_kek.kid, codec_kek.public_key),
            codec.Recipient(codec_kek2.kid, codec_kek2.public_key, codec.RSA_OAEP),
        ],
        CS,
    )
    out = io.BytesIO()
    codec.seal(io.BytesIO(secrets.token_bytes(2 * CS + 77)), out, header, keys)
    return out.getvalue(), header, codec_keyring(codec_kek)


def only_codec_errors(fn: Callable[[], object]) -> None:
    with contextlib.suppress(codec.CodecError):  # anything else propagates and fails the test
        fn()


def read_all(package: bytes, keyring) -> None:
    """Every reading path over the same bytes."""
    only_codec_errors(lambda: codec.parse_header(package))
    only_codec_errors(lambda: codec.read_header(io.BytesIO(package)))
    only_codec_errors(lambda: codec.open_package(io.BytesIO(package), keyring).verify())
    only_codec_errors(lambda: codec.open_package(io.BytesIO(package), keyring).decrypt_to(io.BytesIO(), 100, 300))
    only_codec_errors(lambda: codec.decrypt_stream(io.BytesIO(package), io.BytesIO(), keyring))


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(valid, data):
    _, _, keyring = valid
    with bounded_memory():
        read_all(data, keyring)


@FUZZ
@given(
    log2=st.integers(0, 255),
    reserved=st.sampled_from([0, 0, 0, 1, 255]),
    core_len=st.one_of(st.integers(0, 0xFFFF), st.integers(0, 300)),
    rest=st.binary(max_size=3000),
)
def test_random_bytes_behind_a_plausible_prefix(valid, log2, reserved, core_len, rest):
    _, _, keyring = valid
    data = struct.pack(">5sBBBH", b"MSEAL", 1, log2, reserved, core_len) + rest
    with bounded_memory():
        read_all(data, keyring)


def _mutate(package: bytes, header: codec.Header, draw) -> bytes:
    """One structured mutation of a valid package, mostly aimed at the header."""
    data = bytearray(package)
    L = len(header.core)
    fields = {  # offset, size of each length/count field
        "log2_chunk": (6, 1),
        "core_len": (8, 2),
        "wraps_len": (106 + L, 2),
        "count": (108 + L, 1),
        "kid_len": (109 + L, 1),
    }
    kind = draw(st.sampled_from(["flip", "field", "splice", "truncate", "insert", "delete", "core"]))
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, header.size + 40), min_size=1, max_size=8)):
            data[pos % len(data)] ^= draw(st.integers(1, 255))
    elif kind == "field":
        off, size = fields[draw(st.sampled_from(sorted(fields)))]
        data[off : off + size] = draw(st.integers(0, (1 << (8 * size)) - 1)).to_bytes(size, "big")
    elif kind == "splice":
        at = draw(st.integers(0, header.size))
        data[at : at + draw(st.integers(0, 64))] = draw(st.binary(max_size=64))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=32))
    elif kind == "delete":
        at = draw(st.integers(0, len(data) - 1))
        del data[at : at + draw(st.integers(1, 32))]
    else:  # replace the core with other JSON-ish text of the same length (keeps every offset)
        text = draw(
            st.sampled_from(
                [
                    b'{"recording_id":1}',
                    b"[]",
                    b'"x"',
                    b"{}",
                    b'{"a":[[[[[[[[[[]]]]]]]]]]}',
                    b"1e999999",
                    b'{"recording_id":"\\ud800"}',
                    b"\xff\xfe",
                    b"\xef\xbb\xbf{}",
                    b"9" * 5000,
                    b"[" * 5000,
                ]
            )
        )
        data[42 : 42 + L] = (text * (L // len(text) + 1))[:L]
    return bytes(data)


@FUZZ
@given(st.data())
def test_mutated_valid_packages(valid, data):
    package, header, keyring = valid
    bad = _mutate(package, header, data.draw)
    with bounded_memory():
        read_all(bad, keyring)
        with contextlib.suppress(spec.CodecError):  # the decoder written from docs/FORMAT.md, likewise
            spec.decrypt(bad, keyring.keys)


def test_a_hostile_chunk_size_allocates_nothing_before_the_header_check(valid):
    """log2_chunk = 24 (16 MiB chunks) in an otherwise valid package: rejected by the header check,
    before any chunk buffer exists."""
    package, _, keyring = valid
    bad = bytearray(package)
    bad[6] = 24
    with bounded_memory(1 << 20):
        with pytest.raises(codec.AuthenticationError):
            codec.open_package(io.BytesIO(bytes(bad)), keyring)
        with pytest.raises(codec.AuthenticationError):
            codec.decrypt_stream(io.BytesIO(bytes(bad)), io.BytesIO(), keyring)


def test_largest_header_is_bounded(valid):
    """Headers near the bounds parse within the memory bound; one byte more in a length is refused."""
    _, header, _ = valid
    wraps = tuple(codec.Wrap("k" * 64, "X" * 32, b"\x01" * 1024) for _ in range(16))
    with pytest.raises(codec.MalformedPackageError):
        header.with_wraps(wraps)  # 1 + 16 * 1124 bytes > the 16 KiB wraps block
    big_core = (
        b'{"agent_id":"' + b"a" * 4096 + b'","captured_at":"","content_type":"","kind":"call",'
        b'"original_name":"","recording_id":"r"}'
    )
    prefix = struct.pack(">5sBBBH", b"MSEAL", 1, 8, 0, len(big_core))
    block = bytes([1, 1]) + b"k" + bytes([1]) + b"A" + struct.pack(">H", 1024) + b"\x00" * 1024
    data = prefix + bytes(32) + big_core + bytes(64) + struct.pack(">H", len(block)) + block
    with bounded_memory():
        h = codec.parse_header(data)
    assert h.size == len(data)
    assert h.metadata.agent_id == "a" * 4096
    over = data[:8] + struct.pack(">H", 16385) + data[10:]
    with pytest.raises(codec.MalformedPackageError):
        codec.parse_header(over)


@pytest.mark.parametrize("core", [b"[" * 16384, b'{"a":' * 3276 + b"1", b"[" * 1100 + b"]" * 1100])
def test_deeply_nested_metadata_is_malformed(core):
    """JSON nesting deep enough to exhaust the parser's recursion limit is a MalformedPackageError."""
    wraps = bytes([1, 1]) + b"k" + bytes([1]) + b"A" + b"\x00\x01\x00"
    data = struct.pack(">5sBBBH", b"MSEAL", 1, 8, 0, len(core)) + bytes(32) + core + bytes(64)
    data += struct.pack(">H", len(wraps)) + wraps
    with pytest.raises(codec.MalformedPackageError, match="metadata"):
        codec.parse_header(data)
