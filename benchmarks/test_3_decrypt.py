"""3. The reading side: whole-package decrypt vs a plain copy of the package; range-decrypt latency; RSA-3072
wrap and unwrap (RSA-OAEP-256) per operation.

Throughput figures open the package with an unwrapper that hands back the DEK unwrapped beforehand, so
they include the header parse, key schedule and header checks but not the RSA private operation, which
is measured on its own below.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks._support import (
    FSYNC,
    CachedUnwrapper,
    MiB,
    NullSink,
    Package,
    PatternReader,
    interleave,
    plain_copy,
    remove,
    report_latency,
    report_throughput,
)
from mediaseal import codec

RANGE_PACKAGE_SIZE = 256 * MiB
RANGE_LENGTH = 64 * 1024
CALLS_PER_ROUND = 50


def test_decrypt_to(benchmark, package: Package, out_path) -> None:
    def measured() -> None:
        with open(package.path, "rb", buffering=0) as src, open(out_path, "wb", buffering=0) as dst:
            n = codec.open_package(src, package.unwrapper).decrypt_to(dst)
            if FSYNC:
                os.fsync(dst.fileno())
        assert n == package.plaintext_size

    paired = interleave(benchmark, lambda: plain_copy(package.path, out_path), measured, after=lambda: remove(out_path))
    report_throughput(
        benchmark, "decrypt PackageReader.decrypt_to", paired, package.plaintext_size, "plain copy of the package"
    )


def test_decrypt_stream(benchmark, package: Package, out_path) -> None:
    def measured() -> None:
        with open(package.path, "rb", buffering=0) as src, open(out_path, "wb", buffering=0) as dst:
            _, n = codec.decrypt_stream(src, dst, package.unwrapper)
            if FSYNC:
                os.fsync(dst.fileno())
        assert n == package.plaintext_size

    paired = interleave(benchmark, lambda: plain_copy(package.path, out_path), measured, after=lambda: remove(out_path))
    report_throughput(benchmark, "decrypt decrypt_stream", paired, package.plaintext_size, "plain copy of the package")


@pytest.fixture(scope="module")
def big_package(bench_dir, recipient, key_unwrapper) -> Iterator[tuple[str, bytes]]:
    """A 256 MiB package sealed from a generated stream (no plaintext file): (path, DEK)."""
    path = os.path.join(bench_dir, "range.mseal")
    header, keys = codec.new_package(codec.Metadata("bench-range"), [recipient])
    with open(path, "wb", buffering=0) as dst:
        codec.seal(PatternReader(RANGE_PACKAGE_SIZE, seed=7), dst, header, keys)
    try:
        yield path, key_unwrapper.unwrap(header.wraps)
    finally:
        remove(path)


class RawChunks:
    """The floor for a range read: seek, readinto and AESGCM.decrypt_into of whole chunks, nothing else."""

    def __init__(self, f, header: codec.Header, payload_key: bytes, package_size: int) -> None:
        self.f = f
        self.layout = codec.Layout(header.size, header.chunk_size, package_size)
        self.aead = AESGCM(payload_key)
        self.ct = memoryview(bytearray(self.layout.stride))
        self.pt = memoryview(bytearray(header.chunk_size))

    def chunk(self, index: int) -> None:
        offset, length = self.layout.chunk_span(index)
        self.f.seek(offset)
        self.f.readinto(self.ct[:length])
        last = index == self.layout.chunks - 1
        self.aead.decrypt_into(codec.nonce(index, last), self.ct[:length], None, self.pt[: length - codec.TAG_SIZE])


@pytest.mark.parametrize(
    ("where", "offset"),
    [
        ("aligned", RANGE_PACKAGE_SIZE // 2),  # one chunk
        ("straddling", RANGE_PACKAGE_SIZE // 2 - RANGE_LENGTH // 2),  # two chunks
    ],
    ids=["aligned", "straddling"],
)
def test_range_decrypt(benchmark, big_package, where, offset) -> None:
    """Time per call of a 64 KiB range from the middle of a 256 MiB package, on an open reader (what a
    seeking player does); the floor is reading and decrypting the chunk(s) that hold it by hand."""
    path, dek = big_package
    with open(path, "rb", buffering=0) as f:
        reader = codec.open_package(f, CachedUnwrapper(dek))
        reader.decrypt_to(NullSink(), offset, RANGE_LENGTH)  # the one-off final-chunk check, outside the timing
        raw = RawChunks(f, reader.header, reader.header.open(dek).payload, reader.layout.package_size)
        chunks = list(reader.layout.chunks_for(offset, RANGE_LENGTH))
        sink = NullSink()

        def baseline() -> None:
            for _ in range(CALLS_PER_ROUND):
                for i in chunks:
                    raw.chunk(i)

        def measured() -> None:
            for _ in range(CALLS_PER_ROUND):
                assert reader.decrypt_to(sink, offset, RANGE_LENGTH) == RANGE_LENGTH

        paired = interleave(benchmark, baseline, measured, rounds=15, warmup=2)
    report_latency(
        benchmark,
        f"range-decrypt 64 KiB {where} ({len(chunks)} chunk)",
        paired,
        CALLS_PER_ROUND,
        "raw chunk read+decrypt",
    )


def test_range_decrypt_cold(benchmark, big_package, key_unwrapper) -> None:
    """The first range read of a package: open_package (header parse, RSA-3072 unwrap, key schedule, header
    checks), the final-chunk check, then the 64 KiB range. Floor: the RSA unwrap and two raw chunks."""
    path, dek = big_package
    offset = RANGE_PACKAGE_SIZE // 2
    calls = 10
    with open(path, "rb", buffering=0) as f:
        header = codec.read_header(f)
        size = os.fstat(f.fileno()).st_size
        raw = RawChunks(f, header, header.open(dek).payload, size)
        final = raw.layout.chunks - 1
        middle = offset // header.chunk_size
        wrap = header.wraps[0]
        sink = NullSink()

        def baseline() -> None:
            for _ in range(calls):
                codec.unwrap_dek(wrap, key_unwrapper.private_key)
                raw.chunk(final)
                raw.chunk(middle)

        def measured() -> None:
            for _ in range(calls):
                codec.open_package(f, key_unwrapper).decrypt_to(sink, offset, RANGE_LENGTH)

        paired = interleave(benchmark, baseline, measured, rounds=9, warmup=1)
    report_latency(
        benchmark, "range-decrypt 64 KiB cold (open + unwrap + final check)", paired, calls, "raw unwrap + 2 raw chunks"
    )


def test_rsa_wrap(benchmark, recipient) -> None:
    """codec.wrap_dek (RSA-OAEP-256, RSA-3072) vs the raw cryptography call it makes."""
    dek = secrets.token_bytes(32)
    pad = codec.wrap.oaep_padding(codec.RSA_OAEP_256)
    pub = recipient.public_key
    ops = 200

    def baseline() -> None:
        for _ in range(ops):
            pub.encrypt(dek, pad)

    def measured() -> None:
        for _ in range(ops):
            codec.wrap_dek(dek, pub, recipient.kid)

    paired = interleave(benchmark, baseline, measured, rounds=9, warmup=1)
    report_latency(benchmark, "rsa-3072 wrap (RSA-OAEP-256)", paired, ops, "raw public_key.encrypt")


def test_rsa_unwrap(benchmark, recipient, rsa_key) -> None:
    """codec.unwrap_dek (RSA-OAEP-256, RSA-3072) vs the raw cryptography call it makes."""
    dek = secrets.token_bytes(32)
    w = codec.wrap_dek(dek, recipient.public_key, recipient.kid)
    pad = codec.wrap.oaep_padding(codec.RSA_OAEP_256)
    ops = 20

    def baseline() -> None:
        for _ in range(ops):
            rsa_key.decrypt(w.wrapped, pad)

    def measured() -> None:
        for _ in range(ops):
            assert codec.unwrap_dek(w, rsa_key) == dek

    paired = interleave(benchmark, baseline, measured, rounds=9, warmup=1)
    report_latency(benchmark, "rsa-3072 unwrap (RSA-OAEP-256)", paired, ops, "raw private_key.decrypt")
