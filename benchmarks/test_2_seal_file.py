"""2. File to file: codec.seal vs a plain 1 MiB readinto/write copy of the same file, each to a fresh file in
the same directory (fsync excluded from both by default; MEDIASEAL_BENCH_FSYNC=1 includes it in both)."""

from __future__ import annotations

import hashlib
import os

import pytest

from benchmarks._support import (
    FSYNC,
    SOURCE_SIZE,
    FreshPackage,
    MiB,
    interleave,
    plain_copy,
    remove,
    report_throughput,
    seal_file,
)


@pytest.mark.parametrize(
    ("name", "overlap", "digest", "target"),
    [
        ("seal-file overlap=True", True, False, 0.9),
        ("seal-file overlap=False", False, False, None),
        ("seal-file overlap=True digest=True", True, True, None),
    ],
    ids=["overlap", "no-overlap", "overlap-digest"],
)
def test_seal_file(benchmark, source_file, out_path, recipient, name, overlap, digest, target) -> None:
    pkg = FreshPackage(recipient)

    def before() -> None:
        pkg.renew()

    def measured() -> None:
        result = seal_file(source_file, out_path, pkg.header, pkg.keys, overlap=overlap, digest=digest)
        assert result.plaintext_size == SOURCE_SIZE

    paired = interleave(
        benchmark, lambda: plain_copy(source_file, out_path), measured, before=before, after=lambda: remove(out_path)
    )
    report_throughput(benchmark, name, paired, SOURCE_SIZE, "plain copy", target=target)


def test_copy_with_sha256(benchmark, source_file, out_path) -> None:
    """Context for digest=True: what SHA-256 alone costs a plain copy (hashing inline, one thread)."""

    def measured() -> None:
        buf = memoryview(bytearray(MiB))
        sha = hashlib.sha256()
        with open(source_file, "rb", buffering=0) as src, open(out_path, "wb", buffering=0) as dst:
            while n := src.readinto(buf):
                sha.update(buf[:n])
                dst.write(buf[:n])
            if FSYNC:
                os.fsync(dst.fileno())

    paired = interleave(benchmark, lambda: plain_copy(source_file, out_path), measured, after=lambda: remove(out_path))
    report_throughput(benchmark, "copy+sha256 (context)", paired, SOURCE_SIZE, "plain copy")
