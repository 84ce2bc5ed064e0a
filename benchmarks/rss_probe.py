"""Peak RSS of sealing a generated recording of SIZE bytes to os.devnull, in a process of its own.

    python -m benchmarks.rss_probe SIZE PUBLIC_KEY_PEM [--chunk-size N] [--no-overlap] [--digest]

(from the repository root: a module of the benchmarks package, so it imports benchmarks._support as
every benchmark does, without editing sys.path).

Prints one JSON object: the size, ru_maxrss (KiB) after imports and set-up and at the end, and VmHWM.
Run it through a forking shell (test_5_rss.py does): a process exec'd straight from a big parent inherits
that parent's ru_maxrss.
The source is a PatternReader, so the recording never exists in memory or on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from benchmarks._support import PatternReader
from mediaseal import codec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("size", type=int)
    p.add_argument("public_key")
    p.add_argument("--chunk-size", type=int, default=codec.DEFAULT_CHUNK_SIZE)
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--digest", action="store_true")
    a = p.parse_args()
    with open(a.public_key, "rb") as f:
        public_key = load_pem_public_key(f.read())
    header, keys = codec.new_package(
        codec.Metadata("bench-rss"), [codec.Recipient("bench-kek", public_key)], a.chunk_size
    )
    src = PatternReader(a.size, seed=3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.devnull, "wb", buffering=0) as dst:
        result = codec.seal(src, dst, header, keys, overlap=not a.no_overlap, digest=a.digest)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump(
        {
            "size": a.size,
            "plaintext_size": result.plaintext_size,
            "chunks": result.chunks,
            "maxrss_before_kib": before,
            "maxrss_kib": peak,
            "vmhwm_kib": _vmhwm(),
        },
        sys.stdout,
    )


def _vmhwm() -> int:
    """The address space's peak RSS (KiB): unlike ru_maxrss, never inherited from a parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


if __name__ == "__main__":
    main()
