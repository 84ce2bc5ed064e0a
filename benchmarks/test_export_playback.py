"""Bulk export and seek playback, each figure a ratio to a plain baseline measured in the same run
(interleaved rounds, medians).

- export: `run_export` of 10 packages (4 MiB each) from one moto bucket to another (SSE-S3), without
  and with PGP (gpg, recipient generated in batch mode in a throwaway GNUPGHOME), against a plain
  aioboto3 get_object + put_object (SSE-S3) copy of the same objects at the same concurrency (4);
- playback: time to first byte of a seek ~40 min into 16 kB/s audio, 64 KiB long, through
  `RemotePackage.open` + the first piece of `iter_range` (first open) and through `iter_range` on an
  opened package (later seeks), against `os.pread` of the same 64 KiB of the package file. A
  `file://` source: moto reads whole objects per GET, so a large package there measures moto.

moto runs in this process (a thread), so both sides share its CPU cost; the ratio is what matters.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3_support
from agent_harness import PASSPHRASE, make_keyring

from benchmarks._support import MiB, PatternReader, emit, interleave, report_latency, report_throughput
from mediaseal import codec
from mediaseal.export.playback import RemotePackage
from mediaseal.keys.keyring import Keyring
from mediaseal.uploader import FilesystemRepository

RECORDINGS = 10
REC_SIZE = int(os.environ.get("MEDIASEAL_BENCH_EXPORT_MB", "4")) * MiB
BIG_SIZE = int(os.environ.get("MEDIASEAL_BENCH_PLAYBACK_MB", "1024")) * MiB
SEEK_OFFSET = 40 * 60 * 16000  # 40 min of 16 kB/s audio
SEEK_LENGTH = 64 * 1024
CONCURRENCY = 4  # ExportOptions' default, used by both sides
GPG = shutil.which("gpg")


@pytest.fixture(scope="module")
def ring(bench_dir: str) -> Iterator[tuple[codec.Recipient, codec.Unwrapper]]:
    """A passphrase-protected keyring (as the CLI's --keyring): its recipient and its unlocked unwrapper."""
    path = make_keyring(Path(bench_dir) / "export-keyring")
    kr = Keyring.open(path)
    yield kr.recipient(), kr.unlock(PASSPHRASE)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pgp_cert(bench_dir: str) -> Iterator[Path]:
    if GPG is None:
        pytest.skip("gpg is not installed")
    home = Path(bench_dir) / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run([GPG, "--batch", "--passphrase", "", "--quick-gen-key", "Auditor <auditor@example.com>",
                    "default", "default", "never"], env=env, check=True, capture_output=True)
    cert = Path(bench_dir) / "auditor.asc"
    cert.write_bytes(subprocess.run([GPG, "--armor", "--export", "auditor@example.com"], env=env, check=True,
                                    capture_output=True).stdout)
    yield cert
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True)


class _Quiet:
    def start(self, total: int, total_bytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def done(self, key: str, outcome: str, detail: str) -> None: ...
    def stop(self) -> None: ...


@pytest.fixture(scope="module")
def source_bucket(moto: Any, ring: tuple[codec.Recipient, codec.Unwrapper]) -> tuple[str, list[str]]:
    """RECORDINGS packages of REC_SIZE random bytes (1 MiB chunks) under s3://<bucket>/site-a/."""
    import io

    recipient, _ = ring
    bucket = s3_support.make_bucket(moto.url)
    s3 = s3_support.boto3_client(moto.url)
    rnd = random.Random(7)
    keys = []
    for i in range(RECORDINGS):
        rid = f"rec-{i:03d}"
        meta = codec.Metadata(rid, "call", "audio/wav", f"call-{i}.wav", "2026-11-28T10:00:00Z", "bench-agent")
        header, k = codec.new_package(meta, [recipient])
        out = io.BytesIO()
        codec.seal(io.BytesIO(rnd.randbytes(REC_SIZE)), out, header, k)
        key = f"site-a/call/2026/11/28/{rid}.mseal"
        s3.put_object(Bucket=bucket, Key=key, Body=out.getvalue())
        keys.append(key)
    return bucket, keys


def _plain_copy(endpoint: str, src: str, keys: list[str], dst: str, prefix: str) -> None:
    import aioboto3

    async def go() -> None:
        slots = asyncio.Semaphore(CONCURRENCY)
        async with aioboto3.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
            async def one(key: str) -> None:
                async with slots:
                    resp = await s3.get_object(Bucket=src, Key=key)
                    async with resp["Body"] as body:
                        data = await body.read()
                    await s3.put_object(Bucket=dst, Key=f"{prefix}/{key}", Body=data, ServerSideEncryption="AES256")

            await asyncio.gather(*(one(k) for k in keys))

    asyncio.run(go())


def _empty(endpoint: str, bucket: str) -> None:
    """Drop every object of the destination between runs (moto holds them in memory)."""
    s3 = s3_support.boto3_client(endpoint)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objs:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": objs})


@pytest.mark.parametrize("pgp", [False, True], ids=["plain", "pgp"])
def test_export_vs_plain_copy(benchmark: Any, moto: Any, ring: Any, source_bucket: Any, request: Any,
                              pgp: bool) -> None:
    from mediaseal.export.bulk import ExportOptions, run_export

    _, unwrapper = ring
    src, keys = source_bucket
    cert = request.getfixturevalue("pgp_cert") if pgp else None
    dst = s3_support.make_bucket(moto.url)
    n = [0]

    def measured() -> None:
        n[0] += 1
        opts = ExportOptions(source=f"s3://{src}/site-a", dest=f"s3://{dst}/case-{n[0]}", sse="AES256",
                             pgp_recipient=cert, concurrency=CONCURRENCY, endpoint_url=moto.url)
        report = asyncio.run(run_export(opts, unwrapper, _Quiet()))
        assert report.exported == RECORDINGS, report.summary()
        assert not report.failed, report.summary()

    paired = interleave(benchmark, lambda: _plain_copy(moto.url, src, keys, dst, f"raw-{n[0]}"), measured,
                        rounds=9, warmup=1, after=lambda: _empty(moto.url, dst))
    total = RECORDINGS * REC_SIZE
    what = "with PGP (gpg)" if pgp else "no PGP"
    report_throughput(benchmark, f"export {RECORDINGS} x {REC_SIZE // MiB} MiB, SSE-S3, {what}", paired, total,
                      "plain S3 get+put copy")
    for side, secs in (("export", paired.measured_median), ("plain copy", paired.baseline_median)):
        emit(f"  {side} ({what}): {RECORDINGS / secs:.1f} recordings/s, {total / secs / 1e6:.1f} MB/s")


@pytest.fixture(scope="module")
def big_package(bench_dir: str, ring: tuple[codec.Recipient, codec.Unwrapper]) -> Iterator[tuple[Path, str]]:
    """A BIG_SIZE recording sealed once (1 MiB chunks) into a file repository; deleted afterwards."""
    recipient, _ = ring
    root = Path(bench_dir) / "file-repo"
    key = "call/2026/11/28/rec-big.mseal"
    path = root / key
    path.parent.mkdir(parents=True)
    meta = codec.Metadata("rec-big", "call", "audio/wav", "big.wav", "2026-11-28T10:00:00Z", "bench-agent")
    header, k = codec.new_package(meta, [recipient])
    with open(path, "wb", buffering=0) as dst:
        codec.seal(PatternReader(BIG_SIZE), dst, header, k)
    try:
        yield root, key
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _offsets(pkg: RemotePackage, count: int, seed: int) -> list[tuple[int, int]]:
    """(plaintext offset, package offset of the chunk holding it) around 40 min in, `count` different chunks."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        off = SEEK_OFFSET + rnd.randrange(-8 * MiB, 8 * MiB)
        out.append((off, pkg.layout.chunk_span(off // pkg.header.chunk_size)[0]))
    return out


OPENS = 10  # first opens per round
SEEKS = 20  # later seeks per round


def test_playback_first_open_ttfb(benchmark: Any, ring: Any, big_package: Any) -> None:
    _, unwrapper = ring
    root, key = big_package
    path = root / key

    async def first_bytes(offsets: list[tuple[int, int]]) -> None:
        for off, _ in offsets:
            pkg = await RemotePackage.open(FilesystemRepository(root), key, unwrapper)
            async for piece in pkg.iter_range(off, SEEK_LENGTH):
                assert piece
                break

    probe = asyncio.run(RemotePackage.open(FilesystemRepository(root), key, unwrapper))
    offsets = _offsets(probe, OPENS, 1)

    def baseline() -> None:
        for _, pos in offsets:
            fd = os.open(path, os.O_RDONLY)
            try:
                assert len(os.pread(fd, SEEK_LENGTH, pos)) == SEEK_LENGTH
            finally:
                os.close(fd)

    paired = interleave(benchmark, baseline, lambda: asyncio.run(first_bytes(offsets)), rounds=7, warmup=1)
    report_latency(benchmark, f"playback TTFB, first open ({BIG_SIZE // MiB} MiB file:// package, seek ~40 min,"
                   f" 64 KiB)", paired, OPENS, "os.open+pread 64 KiB")


def test_playback_seek_ttfb(benchmark: Any, ring: Any, big_package: Any) -> None:
    _, unwrapper = ring
    root, key = big_package
    path = root / key
    state: dict[str, Any] = {}

    async def seeks(offsets: list[tuple[int, int]]) -> None:
        pkg = state["pkg"]
        for off, _ in offsets:
            async for piece in pkg.iter_range(off, SEEK_LENGTH):
                assert piece
                break

    async def opened() -> RemotePackage:
        return await RemotePackage.open(FilesystemRepository(root), key, unwrapper)

    state["pkg"] = asyncio.run(opened())
    offsets = _offsets(state["pkg"], SEEKS, 2)
    fd = os.open(path, os.O_RDONLY)

    def baseline() -> None:
        for _, pos in offsets:
            assert len(os.pread(fd, SEEK_LENGTH, pos)) == SEEK_LENGTH

    try:
        paired = interleave(benchmark, baseline, lambda: asyncio.run(seeks(offsets)), rounds=7, warmup=1)
    finally:
        os.close(fd)
    report_latency(benchmark, f"playback TTFB, later seeks on an opened package ({BIG_SIZE // MiB} MiB, 64 KiB)",
                   paired, SEEKS, "os.pread 64 KiB")
