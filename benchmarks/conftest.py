"""Shared fixtures for the benchmarks (run them by path: `make bench`, or
`.venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-only -s`).

Environment:
  MEDIASEAL_BENCH_DIR     where the temporary files go (default: the system temp dir)
  MEDIASEAL_BENCH_MB      size of the file-to-file source, MiB (default 64; keep to 64..128, since each round
                          writes two files of this size and the VMs throttle bursts over ~300 MiB)
  MEDIASEAL_BENCH_ROUNDS  measured rounds per benchmark (default 15), plus MEDIASEAL_BENCH_WARMUP (default 1)
  MEDIASEAL_BENCH_FSYNC=1 include fsync in both sides of every file benchmark (default: excluded from both)
  MEDIASEAL_BENCH_STRICT=1 assert the ratio targets (default: report only)

tests/ is on sys.path here too (pyproject.toml's [tool.pytest.ini_options] `pythonpath`): the benchmarks
that drive the agent or moto import the suite's support modules (agent_harness, s3_support, support).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from support import process

from benchmarks._support import (
    FSYNC,
    REPORT,
    SOURCE_SIZE,
    STRICT,
    CachedUnwrapper,
    KeyUnwrapper,
    MiB,
    Package,
    machine_info,
    remove,
)
from mediaseal import codec


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """No child process (the agent of the end-to-end benchmarks) outlives its benchmark: tests/support's
    one reaper, as after every test (importable here through pyproject.toml's pytest `pythonpath`)."""
    yield
    process.reap("test")


@pytest.fixture(scope="module")
def moto() -> Iterator[Any]:
    """moto on loopback with fake AWS credentials (tests/s3_support.py), for the S3 benchmarks."""
    import s3_support

    with s3_support.moto_running() as server:
        yield server


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """A test-only RSA-3072 KEK, generated once per session (never stored)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture(scope="session")
def recipient(rsa_key: rsa.RSAPrivateKey) -> codec.Recipient:
    return codec.Recipient("bench-kek", rsa_key.public_key())


@pytest.fixture(scope="session")
def key_unwrapper(rsa_key: rsa.RSAPrivateKey) -> KeyUnwrapper:
    return KeyUnwrapper("bench-kek", rsa_key)


@pytest.fixture(scope="session")
def bench_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mediaseal-bench-", dir=os.environ.get("MEDIASEAL_BENCH_DIR"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def out_path(bench_dir: str) -> Iterator[str]:
    """A fresh output file name in the same directory as the inputs; removed after every run."""
    path = os.path.join(bench_dir, "out.bin")
    yield path
    remove(path)


def write_random(path: str, size: int, seed: bytes = b"\x00" * 32) -> None:
    """`size` deterministic, incompressible bytes (an AES-CTR keystream), written 1 MiB at a time."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(enc.update(zeros[:n]))
            left -= n


@pytest.fixture
def source_file(bench_dir: str) -> Iterator[str]:
    """The recording a file benchmark reads: SOURCE_SIZE bytes of random-looking data, written afresh for
    each benchmark, as a recording that has just been finished would be.

    Fresh matters: on this kernel a just-written file sits in the page cache in large folios and reads at
    about twice the speed of the same file once its pages have been reclaimed and read back, which moves
    the copy baseline (and so every file ratio) by up to ~30%. docs/BENCHMARKS.md has the figures.
    """
    path = os.path.join(bench_dir, "source.bin")
    write_random(path, SOURCE_SIZE)
    yield path
    remove(path)


@pytest.fixture
def package(
    bench_dir: str, source_file: str, recipient: codec.Recipient, key_unwrapper: KeyUnwrapper
) -> Iterator[Package]:
    """source_file sealed (1 MiB chunks), for the decrypt benchmarks; written afresh like source_file."""
    path = os.path.join(bench_dir, "source.mseal")
    header, keys = codec.new_package(codec.Metadata("bench-decrypt"), [recipient])
    with open(source_file, "rb", buffering=0) as src, open(path, "wb", buffering=0) as dst:
        result = codec.seal(src, dst, header, keys)
    dek = key_unwrapper.unwrap(header.wraps)
    yield Package(path, result.plaintext_size, result.package_size, CachedUnwrapper(dek))
    remove(path)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"mediaseal bench: source {SOURCE_SIZE // MiB} MiB, fsync {'included' if FSYNC else 'excluded'},"
        f" strict {'on' if STRICT else 'off'}"
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    tr = terminalreporter
    tr.section("mediaseal benchmark ratios (same-run baselines, medians)")
    info = machine_info(os.environ.get("MEDIASEAL_BENCH_DIR") or tempfile.gettempdir())
    tr.write_line("machine: " + "; ".join(f"{k}={v}" for k, v in info.items()))
    for line in REPORT:
        tr.write_line(line)
