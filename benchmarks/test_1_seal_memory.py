"""1. The codec in memory: ChunkSealer.seal_into vs raw AESGCM.encrypt_into over the same 1 MiB buffers."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks._support import MiB, interleave, report_throughput
from mediaseal import codec

TOTAL = 64 * MiB
CHUNK = MiB
CHUNKS = TOTAL // CHUNK


def test_codec_in_memory(benchmark) -> None:
    plaintext = memoryview(bytearray(os.urandom(TOTAL)))
    out = memoryview(bytearray(CHUNKS * codec.stride(CHUNK)))
    pieces = [plaintext[i * CHUNK : (i + 1) * CHUNK] for i in range(CHUNKS)]
    outs = [out[i * codec.stride(CHUNK) : (i + 1) * codec.stride(CHUNK)] for i in range(CHUNKS)]
    key = os.urandom(32)
    raw = AESGCM(key)
    nonces = [codec.nonce(i, i == CHUNKS - 1) for i in range(CHUNKS)]

    def baseline() -> None:
        for n, p, o in zip(nonces, pieces, outs, strict=True):
            raw.encrypt_into(n, p, None, o)

    def measured() -> None:
        sealer = codec.ChunkSealer(key, CHUNK)
        for i, (p, o) in enumerate(zip(pieces, outs, strict=True)):
            sealer.seal_into(p, o, last=i == CHUNKS - 1)

    paired = interleave(benchmark, baseline, measured, rounds=31, warmup=3)
    report_throughput(benchmark, "codec-in-memory", paired, TOTAL, "raw AESGCM.encrypt_into", target=0.9)
