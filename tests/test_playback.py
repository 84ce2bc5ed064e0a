"""Playback: range decryption straight from a repository (real S3 through moto and the fault proxy)."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CodecTestKek, CodecTestKeyring
from s3_support import FaultProxy, MotoServer, boto3_client

from mediaseal import codec
from mediaseal.export.playback import RemotePackage
from mediaseal.export.source import SourceNotFoundError, open_source, split_url

CS = 4096
STRIDE = CS + codec.TAG_SIZE
KEY = "call/2026/11/28/rec-1.mseal"


def make_package(kek: CodecTestKek, data: bytes, *, recording_id: str = "rec-1", chunk_size: int = CS,
                 content_type: str = "audio/wav") -> bytes:
    meta = codec.Metadata(recording_id, "call", content_type, captured_at="2026-11-28T10:00:00Z")
    header, keys = codec.new_package(meta, [codec.Recipient(kek.kid, kek.public_key)], chunk_size)
    out = io.BytesIO()
    codec.seal(io.BytesIO(data), out, header, keys, overlap=False)
    return out.getvalue()


def put(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    boto3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=body)


@pytest.fixture(scope="module")
def plaintext() -> bytes:
    return random.Random(6).randbytes(50 * CS + 1234)  # 51 chunks, a short final one


@pytest.fixture(scope="module")
def package(codec_kek: CodecTestKek, plaintext: bytes) -> bytes:
    return make_package(codec_kek, plaintext)


def ranges_fetched(proxy: FaultProxy) -> list[tuple[int, int]]:
    out = []
    for r in proxy.requests("GetObject"):
        lo, hi = r.headers["range"].removeprefix("bytes=").split("-")
        out.append((int(lo), int(hi)))
    return out


async def test_random_ranges_from_s3_equal_the_slice_and_fetch_only_their_chunks(
        fault_proxy: FaultProxy, s3_bucket: str, codec_kek: CodecTestKek, codec_keyring: type[CodecTestKeyring],
        plaintext: bytes, package: bytes) -> None:
    put(fault_proxy.url, s3_bucket, f"site-a/{KEY}", package)
    source = open_source(f"s3://{s3_bucket}/site-a", endpoint_url=fault_proxy.url)
    try:
        fault_proxy.forget()
        pkg = await RemotePackage.open(source, KEY, codec_keyring(codec_kek))
        # Opening: the first 64 KiB (holds the header; its Content-Range gives the size) and the final
        # chunk: nothing else, not even a HEAD.
        assert fault_proxy.count("HeadObject") == 0
        head_size = pkg.header.size
        last_off = head_size + 50 * STRIDE
        assert ranges_fetched(fault_proxy) == [(0, 65535), (last_off, len(package) - 1)]
        assert pkg.plaintext_size == len(plaintext)
        assert pkg.metadata.content_type == "audio/wav"

        rng = random.Random(1)
        cases = [(0, 1), (0, CS), (CS - 1, 2), (len(plaintext) - 1, 1), (len(plaintext) - 5000, 5000),
                 (0, len(plaintext)), (len(plaintext), 10), (123, 0)]
        cases += [(rng.randrange(len(plaintext)), rng.choice([1, 100, CS, 3 * CS + 7, 20 * CS]))
                  for _ in range(40)]
        for offset, length in cases:
            fault_proxy.forget()
            got = await pkg.read_range(offset, length)
            assert got == plaintext[offset:offset + length], (offset, length)
            end = min(offset + length, len(plaintext))
            if offset >= end:
                assert ranges_fetched(fault_proxy) == []
                continue
            first, last = offset // CS, (end - 1) // CS
            want = [(head_size + first * STRIDE, min(head_size + (last + 1) * STRIDE, len(package)) - 1)]
            # Chunks inside the first 64 KiB read are served from it, with no request at all.
            if want and want[0][1] < 65536:
                want = []
            assert ranges_fetched(fault_proxy) == want, (offset, length)
            assert fault_proxy.count("HeadObject") == 0
        fault_proxy.forget()
        with pytest.raises(codec.OffsetPastEndError, match=f"past the end of the recording \\({len(plaintext)} bytes"):
            async for _ in pkg.iter_range(len(plaintext) + 1, 10, past_end="error"):
                pass
        assert ranges_fetched(fault_proxy) == []  # refused before any read
    finally:
        await source.close()


async def test_truncated_and_tampered_packages_fail(moto_server: MotoServer, s3_bucket: str,
                                                    codec_kek: CodecTestKek, codec_keyring: type[CodecTestKeyring],
                                                    plaintext: bytes, package: bytes) -> None:
    header_size = codec.parse_header(package).size
    cut = package[:header_size + 30 * STRIDE]  # whole chunks: only the last-chunk flag can tell
    put(moto_server.url, s3_bucket, "cut.mseal", cut)
    bad = bytearray(package)
    bad[header_size + 40 * STRIDE + 100] ^= 1
    put(moto_server.url, s3_bucket, "bad.mseal", bytes(bad))
    source = open_source(f"s3://{s3_bucket}", endpoint_url=moto_server.url)
    try:
        with pytest.raises(codec.TruncatedPackageError):
            await RemotePackage.open(source, "cut.mseal", codec_keyring(codec_kek))
        pkg = await RemotePackage.open(source, "bad.mseal", codec_keyring(codec_kek))
        assert await pkg.read_range(0, 40 * CS) == plaintext[:40 * CS]  # the chunks before are fine
        pieces: list[bytes] = []

        async def drain() -> None:
            async for piece in pkg.iter_range(38 * CS, 5 * CS):
                pieces.append(piece)

        with pytest.raises(codec.AuthenticationError):
            await drain()
        assert b"".join(pieces) == plaintext[38 * CS:40 * CS]  # nothing of chunk 40 came out
        with pytest.raises(SourceNotFoundError):
            await RemotePackage.open(source, "missing.mseal", codec_keyring(codec_kek))
    finally:
        await source.close()


async def test_wrong_key_and_swapped_wrap_fail_before_any_chunk(moto_server: MotoServer, s3_bucket: str,
                                                                codec_kek: CodecTestKek, codec_kek2: CodecTestKek,
                                                                codec_keyring: type[CodecTestKeyring],
                                                                package: bytes) -> None:
    put(moto_server.url, s3_bucket, KEY, package)
    source = open_source(f"s3://{s3_bucket}", endpoint_url=moto_server.url)
    try:
        with pytest.raises(codec.NoMatchingKeyError):
            await RemotePackage.open(source, KEY, codec_keyring(codec_kek2))
    finally:
        await source.close()


async def test_file_source_lists_reads_and_splits(tmp_path: Path, codec_kek: CodecTestKek,
                                                  codec_keyring: type[CodecTestKeyring], plaintext: bytes,
                                                  package: bytes) -> None:
    (tmp_path / "call/2026/11/28").mkdir(parents=True)
    (tmp_path / KEY).write_bytes(package)
    (tmp_path / "call/2026/11/28/.rec-2.mseal.tmp").write_bytes(b"x")
    (tmp_path / "call/2026/11/28/notes.txt").write_bytes(b"x")
    small = make_package(codec_kek, b"tiny", recording_id="rec-3")
    (tmp_path / "rec-3.mseal").write_bytes(small)
    source = open_source(f"file://{tmp_path}")
    listed = [(o.key, o.size) async for o in source.list()]
    assert listed == [(KEY, len(package)), ("rec-3.mseal", len(small))]
    assert [o.key async for o in source.list("call/")] == [KEY]
    assert await source.read(KEY, len(package) - 3, 10) == package[-3:]
    pkg = await RemotePackage.open(source, KEY, codec_keyring(codec_kek))
    assert await pkg.read_range(5 * CS + 17, 9 * CS) == plaintext[5 * CS + 17:14 * CS + 17]
    tiny = await RemotePackage.open(source, "rec-3.mseal", codec_keyring(codec_kek))
    assert await tiny.read_range() == b"tiny" and tiny.stats.requests == 1  # one read held it all

    assert split_url(f"file://{tmp_path}/{KEY}") == (f"file://{tmp_path}", KEY)
    assert split_url("s3://b/site-a/call/2026/11/28/x.mseal") == ("s3://b/site-a", "call/2026/11/28/x.mseal")
    assert split_url("s3://b/call/2026/11/28/x.mseal") == ("s3://b", "call/2026/11/28/x.mseal")
    assert split_url("s3://b/odd/place/x.mseal") == ("s3://b/odd/place", "x.mseal")
    for bad in ("http://x/y.mseal", "s3://b/../x.mseal", "s3:///x.mseal"):
        with pytest.raises(Exception, match="url|key|bucket"):
            split_url(bad)


def test_cli_decrypts_s3_url_with_offset_and_length(moto_server: MotoServer, s3_bucket: str,
                                                    fault_proxy: FaultProxy, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    env |= {"MEDIASEAL_KEYRING_PASSPHRASE": "pb", "AWS_ENDPOINT_URL_S3": fault_proxy.url}

    def ms(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", *map(str, args)], env=env,
                              capture_output=True, timeout=60, check=False)

    ring = tmp_path / "kr"
    assert ms("keys", "init", "--keyring", ring).returncode == 0
    data = random.Random(2).randbytes(300_000)
    (tmp_path / "in.wav").write_bytes(data)
    r = ms("encrypt", tmp_path / "in.wav", "-o", tmp_path / "p.mseal", "--keyring", ring, "--chunk-size", "4KiB")
    assert r.returncode == 0, r.stderr
    put(moto_server.url, s3_bucket, f"site/{KEY}", (tmp_path / "p.mseal").read_bytes())
    url = f"s3://{s3_bucket}/site/{KEY}"

    fault_proxy.forget()
    r = ms("decrypt", url, "-o", tmp_path / "part", "--keyring", ring, "--offset", "150000", "--length", "10000")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "part").read_bytes() == data[150000:160000]
    fetched = sum(hi - lo + 1 for lo, hi in ranges_fetched(fault_proxy))
    assert fetched < 65536 + 2 * STRIDE + 4 * STRIDE  # header block + final chunk + the 3-4 chunks needed

    r = ms("decrypt", url, "-o", tmp_path / "all", "--keyring", ring)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "all").read_bytes() == data
    r = ms("decrypt", f"file://{tmp_path}/p.mseal", "-o", "-", "--keyring", ring, "--offset", "1", "--length", "5")
    assert r.returncode == 0 and r.stdout == data[1:6], r.stderr
    r = ms("decrypt", f"file://{tmp_path}/p.mseal", "-o", tmp_path / "past", "--keyring", ring, "--offset", "300001")
    assert r.returncode == 1 and "past the end of the recording (300000 bytes)" in r.stderr.decode(), r.stderr
    assert not (tmp_path / "past").exists()

    r = ms("decrypt", f"s3://{s3_bucket}/site/call/2026/11/28/nope.mseal", "-o", tmp_path / "x", "--keyring", ring)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("mediaseal: error: no package") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


async def test_lkm_key_provider_over_a_repository(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> None:
    """The LKM client (a synchronous unwrap that runs its own loop) works from RemotePackage's worker thread."""
    import lkm_support as ls

    from mediaseal.keys.keyring import Keyring
    from mediaseal.keys.lkm.client import client_from_options

    ring = Keyring.init(tmp_path / "keyring", ls.PASSPHRASE)
    pki = ls.make_pki(tmp_path / "pki", ("export-1",))
    clients = ls.write_clients(tmp_path / "clients.json", [
        {"name": "export-1", "roles": ["unwrap"], "cert_names": ["export-1"],
         "credentials": [{"id": "exp-a", "secret": ls.secret("exp-a")}]}])
    cred = ls.write_credential(tmp_path / "exp-a.json", "exp-a")
    data = random.Random(4).randbytes(20 * CS)
    header, keys = codec.new_package(codec.Metadata("rec-lkm", "call"), [ring.recipient()], CS)
    out = io.BytesIO()
    codec.seal(io.BytesIO(data), out, header, keys, overlap=False)
    put(moto_server.url, s3_bucket, KEY, out.getvalue())
    source = open_source(f"s3://{s3_bucket}", endpoint_url=moto_server.url)
    with ls.LKMServer(ls.config(tmp_path / "srv", tmp_path / "keyring", pki, clients)) as srv:
        client = client_from_options(srv.url, credentials=cred, ca=pki.ca)
        try:
            pkg = await RemotePackage.open(source, KEY, client)
            assert await pkg.read_range(3 * CS + 5, 2 * CS) == data[3 * CS + 5:5 * CS + 5]
        finally:
            await source.close()


async def test_s3_source_lists_only_packages_under_its_prefix(moto_server: MotoServer, s3_bucket: str) -> None:
    for key in ("site/call/2026/11/28/a.mseal", "site/screen/2026/11/27/b.mseal", "site/notes.txt",
                "other/call/2026/11/28/c.mseal"):
        put(moto_server.url, s3_bucket, key, b"x" * 10)
    source = open_source(f"s3://{s3_bucket}/site", endpoint_url=moto_server.url)
    try:
        listed = [o async for o in source.list()]
        assert [(o.key, o.size) for o in listed] == [("call/2026/11/28/a.mseal", 10), ("screen/2026/11/27/b.mseal", 10)]
        assert listed[0].last_modified.tzinfo is not None
        assert [o.key async for o in source.list("screen/")] == ["screen/2026/11/27/b.mseal"]
        assert await source.read_head("call/2026/11/28/a.mseal", 4) == (b"xxxx", 10)
        assert [b async for b in source.iter_read("call/2026/11/28/a.mseal", 1, 9, 4)] == [b"xxxx", b"xxxx", b"x"]
        assert await source.read("call/2026/11/28/a.mseal", 10, 5) == b""
        with pytest.raises(SourceNotFoundError):
            await source.size("call/2026/11/28/zzz.mseal")
    finally:
        await source.close()
