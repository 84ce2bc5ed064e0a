"""4. Chunk-size sweep: file-to-file seal (overlap=True) at 64 KiB .. 4 MiB chunks, each against the same
1 MiB plain copy baseline (interleaved per chunk size), to justify the 1 MiB default."""

from __future__ import annotations

import pytest

from benchmarks._support import (
    SOURCE_SIZE,
    FreshPackage,
    MiB,
    interleave,
    plain_copy,
    remove,
    report_throughput,
    seal_file,
)

KiB = 1024


@pytest.mark.parametrize(
    "chunk_size", [64 * KiB, 256 * KiB, MiB, 2 * MiB, 4 * MiB], ids=["64KiB", "256KiB", "1MiB", "2MiB", "4MiB"]
)
def test_chunk_sweep(benchmark, source_file, out_path, recipient, chunk_size) -> None:
    pkg = FreshPackage(recipient, chunk_size)
    label = f"{chunk_size // KiB} KiB" if chunk_size < MiB else f"{chunk_size // MiB} MiB"

    def measured() -> None:
        seal_file(source_file, out_path, pkg.header, pkg.keys)

    paired = interleave(
        benchmark, lambda: plain_copy(source_file, out_path), measured, before=pkg.renew, after=lambda: remove(out_path)
    )
    ratio = report_throughput(
        benchmark, f"chunk-sweep seal-file chunk={label}", paired, SOURCE_SIZE, "plain 1 MiB copy"
    )
    benchmark.extra_info["chunk_size"] = chunk_size
    assert ratio > 0
