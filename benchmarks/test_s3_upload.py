"""S3 delivery against moto's HTTP server on loopback, each figure a ratio to a raw aioboto3 upload
of the same bytes in the same run (interleaved rounds, medians).

- repository put: `S3Repository.put` (SHA-256 per part, HEAD verification, resumable state) against
  aioboto3's own `upload_file` (its transfer manager: multipart, no checksums, no verification);
- end to end: a recording dropped into the real agent (a subprocess) until its `delivered` event,
  against the same raw upload.

moto runs in this process (a thread), so both sides share its CPU cost; the ratio is what matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import s3_support
from agent_harness import Agent, Setup, make_keyring

from benchmarks._support import MiB, interleave, report_throughput

SIZE = int(os.environ.get("MEDIASEAL_BENCH_S3_MB", "64")) * MiB


def _raw_upload(endpoint: str, bucket: str, path: Path, key: str) -> None:
    import aioboto3

    async def go() -> None:
        async with aioboto3.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
            await s3.upload_file(str(path), bucket, key)

    asyncio.run(go())


def test_s3_repository_put_vs_raw_upload(benchmark: Any, moto: Any, bench_dir: str) -> None:
    from mediaseal.uploader import Upload
    from mediaseal.uploader.s3 import S3Options, S3Repository

    bucket = s3_support.make_bucket(moto.url)
    path = Path(bench_dir) / "s3-package.bin"
    path.write_bytes(os.urandom(SIZE))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    options = S3Options(endpoint_url=moto.url, region="us-east-1", put_threshold=32 * MiB)
    n = [0]

    def measured() -> None:
        n[0] += 1

        async def go() -> None:
            repo = S3Repository(bucket, "bench", options)
            try:
                receipt = await repo.put(Upload(f"call/p{n[0]}.mseal", path, SIZE, sha, {}))
                assert receipt.sha256 == sha
            finally:
                await repo.close()

        asyncio.run(go())

    paired = interleave(benchmark, lambda: _raw_upload(moto.url, bucket, path, f"raw/{n[0]}"), measured,
                        rounds=5, warmup=1)
    report_throughput(benchmark, f"S3 repository put ({SIZE // MiB} MiB, multipart, SHA-256, HEAD-verified)",
                      paired, SIZE, "raw aioboto3 upload_file", target=0.8)
    path.unlink()


def test_s3_e2e_drop_to_verified(benchmark: Any, moto: Any, bench_dir: str) -> None:
    bucket = s3_support.make_bucket(moto.url)
    root = Path(bench_dir) / "e2e-s3"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    setup = Setup(root=root, keyring=make_keyring(root / "keyring"),
                  watches=[{"path": str(root / "capture"), "kind": "call", "completion": "rename"}])
    setup.repo.update(url=f"s3://{bucket}/e2e", endpoint_url=moto.url, region="us-east-1")
    agent = Agent(setup)
    agent.wait_for("ready")
    source = Path(bench_dir) / "e2e-s3-source.bin"
    source.write_bytes(os.urandom(SIZE))
    staged = setup.capture() / ".incoming.part"
    n = [0]

    def measured() -> None:
        n[0] += 1
        name = f"rec-{n[0]}.bin"
        os.rename(staged, setup.capture() / name)
        agent.wait_for("delivered", where=lambda e: e["path"].endswith(name), timeout=300)

    try:
        paired = interleave(benchmark, lambda: _raw_upload(moto.url, bucket, source, f"raw/{n[0]}"), measured,
                            rounds=5, warmup=1, before=lambda: shutil.copyfile(source, staged),
                            after=lambda: staged.unlink(missing_ok=True))
        report_throughput(benchmark, f"e2e drop->verified in S3 ({SIZE // MiB} MiB)", paired, SIZE,
                          "raw aioboto3 upload_file")
    finally:
        agent.stop()
        source.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
