"""The playback server over real HTTP, reading packages from real S3 (moto)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import CodecTestKek, CodecTestKeyring
from lkm_support import make_pki
from multidict import CIMultiDict
from s3_support import FaultProxy, MotoServer
from test_playback import CS, KEY, make_package, put

from mediaseal.export.serve import (
    UNSATISFIABLE,
    PlaybackAuditLog,
    PlaybackServer,
    ServeError,
    load_tokens,
    parse_range,
)
from mediaseal.export.source import open_source

TOKEN = "t" * 40
SIZE = 30 * CS + 777


@pytest.fixture(scope="module")
def media() -> bytes:
    return random.Random(9).randbytes(SIZE)


def tokens_file(d: Path) -> Path:
    p = d / "tokens"
    p.write_text(f"# playback tokens\nalice:{TOKEN}\nbob:{'b' * 40}\n")
    p.chmod(0o600)
    return p


class Running:
    def __init__(self, url: str, audit: Path, bucket: str) -> None:
        self.url, self.audit, self.bucket = url, audit, bucket

    def lines(self) -> list[dict[str, Any]]:
        """The outcome lines (one per request); the admission lines before them are `admissions()`."""
        return [d for d in map(json.loads, self.audit.read_text().splitlines()) if d.get("phase") != "admitted"]


@pytest.fixture
async def server(moto_server: MotoServer, s3_bucket: str, tmp_path: Path, codec_kek: CodecTestKek,
                 codec_keyring: type[CodecTestKeyring], media: bytes) -> AsyncIterator[Running]:
    put(moto_server.url, s3_bucket, f"site/{KEY}", make_package(codec_kek, media, content_type="audio/ogg"))
    source = open_source(f"s3://{s3_bucket}/site", endpoint_url=moto_server.url)
    audit = PlaybackAuditLog(tmp_path / "audit.jsonl")
    srv = PlaybackServer(source, codec_keyring(codec_kek), audit=audit, tokens=load_tokens(tokens_file(tmp_path)))
    runner = await srv.start("127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    try:
        yield Running(f"http://{host}:{port}", tmp_path / "audit.jsonl", s3_bucket)
    finally:
        await runner.cleanup()
        await source.close()
        audit.close()


async def get(url: str, headers: dict[str, str] | None = None, method: str = "GET",
              token: str | None = TOKEN) -> tuple[int, CIMultiDict[str], bytes]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=h) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def test_parse_range() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=50-5000", 100) == (50, 99)
    assert parse_range("bytes=0-0, 10-19", 100) == (0, 19)  # several ranges: one coalesced span
    assert parse_range("bytes=100-", 100) == UNSATISFIABLE
    assert parse_range("bytes=-0", 100) == UNSATISFIABLE
    assert parse_range("bytes=0-", 0) == UNSATISFIABLE
    for malformed in ("bytes=abc", "bytes=5-1", "items=0-1", "bytes", "bytes=-", "bytes=1-2-3", "bytes=,"):
        assert parse_range(malformed, 100) is None, malformed


async def test_full_and_range_requests_return_the_plaintext(server: Running, media: bytes) -> None:
    url = f"{server.url}/recordings/{KEY}"
    status, h, body = await get(url)
    assert status == 200 and body == media
    assert h["Content-Type"] == "audio/ogg" and h["Accept-Ranges"] == "bytes"
    assert h["Cache-Control"] == "no-store" and int(h["Content-Length"]) == SIZE

    cases = {
        "bytes=0-99": (0, 99),  # first bytes
        f"bytes={10 * CS - 5}-{13 * CS + 5}": (10 * CS - 5, 13 * CS + 5),  # middle, across chunks
        "bytes=-1000": (SIZE - 1000, SIZE - 1),  # suffix
        f"bytes={SIZE - 10}-": (SIZE - 10, SIZE - 1),  # open-ended
        f"bytes=100-{SIZE + 50}": (100, SIZE - 1),  # clipped at the end
        "bytes=5-9, 20-29": (5, 29),  # multi-range: one coalesced part
    }
    for rng, (first, last) in cases.items():
        status, h, body = await get(url, {"Range": rng})
        assert status == 206, rng
        assert h["Content-Range"] == f"bytes {first}-{last}/{SIZE}", rng
        assert body == media[first:last + 1], rng

    status, h, body = await get(url, {"Range": f"bytes={SIZE}-"})
    assert status == 416 and h["Content-Range"] == f"bytes */{SIZE}"
    assert json.loads(body)["error"] == "range-not-satisfiable"
    status, h, body = await get(url, {"Range": "bytes=nonsense"})  # malformed: ignored, RFC 9110 14.2
    assert status == 200 and body == media

    status, h, body = await get(url, {"Range": "bytes=0-0", "If-Range": h["ETag"]})
    assert status == 206 and body == media[:1]
    status, h, body = await get(url, {"Range": "bytes=0-0", "If-Range": '"other"'})
    assert status == 200 and len(body) == SIZE

    status, h, body = await get(url, method="HEAD")
    assert status == 200 and body == b"" and h["Content-Length"] == str(SIZE)

    status, _, body = await get(f"{server.url}/recordings/call/2026/11/28/nope.mseal")
    assert status == 404 and json.loads(body)["error"] == "not-found"

    lines = server.lines()
    assert lines[0]["who"] == "token:alice" and lines[0]["key"] == KEY and lines[0]["status"] == 200
    assert lines[0]["bytes"] == SIZE and lines[0]["served"] == f"0-{SIZE - 1}/{SIZE}"
    assert lines[1]["range"] == "bytes=0-99" and lines[1]["served"] == f"0-99/{SIZE}" and lines[1]["bytes"] == 100
    assert any(x["status"] == 416 for x in lines) and lines[-1]["status"] == 404
    assert stat.S_IMODE(server.audit.stat().st_mode) == 0o600
    assert media[:64] not in server.audit.read_bytes()


async def test_authentication_is_required(server: Running) -> None:
    url = f"{server.url}/recordings/{KEY}"
    for token in (None, "wrong" * 10, TOKEN + "x", "b" * 39):
        status, h, body = await get(url, token=token)
        assert status == 401 and h["WWW-Authenticate"].startswith("Bearer"), token
        assert json.loads(body)["error"] == "unauthenticated"
    status, _, _ = await get(url, {"Authorization": f"Basic {TOKEN}"}, token=None)
    assert status == 401
    status, _, _ = await get(url, token="b" * 40)
    assert status == 200
    for path, method in (("/", "GET"), ("/recordings/", "GET"), (f"/recordings/{KEY}", "DELETE")):
        status, _, _ = await get(server.url + path, token=None, method=method)
        assert status == 401, path
        status, _, _ = await get(server.url + path, method=method)
        assert status in (404, 405), path
    lines = server.lines()
    assert [x["status"] for x in lines][:6] == [401] * 5 + [200]
    assert len(lines) == 12
    assert lines[0]["who"] is None and lines[5]["who"] == "token:bob"
    assert TOKEN not in server.audit.read_text()


async def test_tampered_packages_send_no_unauthenticated_bytes(server: Running, moto_server: MotoServer,
                                                               codec_kek: CodecTestKek, media: bytes) -> None:
    from mediaseal import codec

    package = make_package(codec_kek, media)
    hs = codec.parse_header(package).size
    stride = CS + codec.TAG_SIZE
    mid = bytearray(package)
    mid[hs + 7 * stride + 10] ^= 0x40
    put(moto_server.url, server.bucket, "site/mid.mseal", bytes(mid))
    put(moto_server.url, server.bucket, "site/cut.mseal", package[:hs + 20 * stride])
    hdr = bytearray(package)
    hdr[20] ^= 1  # in the salt: every key changes
    put(moto_server.url, server.bucket, "site/hdr.mseal", bytes(hdr))

    for name in ("cut", "hdr"):  # found before any header is sent: a JSON error
        status, _, body = await get(f"{server.url}/recordings/{name}.mseal")
        assert status == 502 and json.loads(body)["error"] == "package-invalid", name

    # A chunk that fails mid-stream: everything before it arrives, nothing of it, then the connection closes.
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /recordings/mid.mseal HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                 "Range: bytes=100-\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206")
    assert body == media[100:7 * CS]
    lines = server.lines()
    assert lines[-1]["status"] == 206 and lines[-1]["bytes"] == 7 * CS - 100
    assert "AuthenticationError" in lines[-1]["error"]


async def test_seeks_cost_one_ranged_get_and_replaced_objects_reopen(
        fault_proxy: FaultProxy, s3_bucket: str, tmp_path: Path, codec_kek: CodecTestKek,
        codec_keyring: type[CodecTestKeyring], media: bytes) -> None:
    from mediaseal import codec

    package = make_package(codec_kek, media)
    put(fault_proxy.url, s3_bucket, KEY, package)
    hs, stride = codec.parse_header(package).size, CS + codec.TAG_SIZE
    source = open_source(f"s3://{s3_bucket}", endpoint_url=fault_proxy.url)
    audit = PlaybackAuditLog(tmp_path / "audit.jsonl")
    srv = PlaybackServer(source, codec_keyring(codec_kek), audit=audit, tokens=load_tokens(tokens_file(tmp_path)))
    runner = await srv.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/recordings/{KEY}"
    try:
        fault_proxy.forget()
        status, _, body = await get(url, {"Range": f"bytes={20 * CS}-{20 * CS + 9}"})
        assert status == 206 and body == media[20 * CS:20 * CS + 10]
        assert len(fault_proxy.requests("GetObject")) == 3  # header block, final chunk, chunk 20
        for n in (25, 17, 29):  # a player seeking: one ranged GET of one chunk each, no re-open
            fault_proxy.forget()
            status, _, body = await get(url, {"Range": f"bytes={n * CS + 1}-{n * CS + 2}"})
            assert status == 206 and body == media[n * CS + 1:n * CS + 3]
            assert [r.headers["range"] for r in fault_proxy.requests()] == \
                [f"bytes={hs + n * stride}-{hs + (n + 1) * stride - 1}"]

        other = random.Random(3).randbytes(SIZE)
        put(fault_proxy.url, s3_bucket, KEY, make_package(codec_kek, other))  # re-sealed: new ETag
        status, _, body = await get(url, {"Range": f"bytes={25 * CS}-{25 * CS + 99}"})
        assert status == 206 and body == other[25 * CS:25 * CS + 100]  # pinned read failed, re-opened
    finally:
        await runner.cleanup()
        await source.close()
        audit.close()


def test_refuses_to_start_without_authentication(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="authentication"):
        PlaybackServer(open_source(f"file://{tmp_path}"), CodecTestKeyring({}), audit=PlaybackAuditLog(tmp_path / "a"))
    loose = tokens_file(tmp_path)
    loose.chmod(0o644)
    with pytest.raises(ServeError, match="0600"):
        load_tokens(loose)
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ServeError, match="at least"):
        load_tokens(short)


async def test_mtls_client_certificate_is_required(tmp_path: Path, codec_kek: CodecTestKek,
                                                   codec_keyring: type[CodecTestKeyring], media: bytes) -> None:
    from mediaseal.plumbing.http import server_ssl_context

    pki = make_pki(tmp_path / "pki", ("player-1",))
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "r.mseal").write_bytes(make_package(codec_kek, media[:5000]))
    source = open_source(f"file://{tmp_path}/repo")
    audit = PlaybackAuditLog(tmp_path / "audit.jsonl")
    srv = PlaybackServer(source, codec_keyring(codec_kek), audit=audit, mtls=True)
    ctx = server_ssl_context(pki.server_cert, pki.server_key, pki.ca, require_client_cert=True)
    runner = await srv.start("127.0.0.1", 0, ctx)
    port = runner.addresses[0][1]
    try:
        ok = ssl.create_default_context(cafile=str(pki.ca))
        ok.load_cert_chain(*pki.clients["player-1"])
        async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/recordings/r.mseal",
                                                       headers={"Range": "bytes=-10"}, ssl=ok) as r:
            assert r.status == 206 and await r.read() == media[4990:5000]
        anonymous = ssl.create_default_context(cafile=str(pki.ca))

        async def without_certificate() -> None:
            async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/recordings/r.mseal",
                                                           ssl=anonymous) as r:
                await r.read()  # TLS 1.3 may report the refused certificate only here

        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await without_certificate()
        assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])["who"] == "cert:player-1"
    finally:
        await runner.cleanup()
        audit.close()


def test_cli_serve_end_to_end(tmp_path: Path, media: bytes) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    env["MEDIASEAL_KEYRING_PASSPHRASE"] = "pb"
    cli = [sys.executable, "-m", "mediaseal.agent.cli"]
    ring, repo = tmp_path / "kr", tmp_path / "repo"
    assert subprocess.run([*cli, "keys", "init", "--keyring", ring], env=env, capture_output=True).returncode == 0
    (tmp_path / "in.ogg").write_bytes(media)
    (repo / "call/2026/11/28").mkdir(parents=True)
    r = subprocess.run([*cli, "encrypt", tmp_path / "in.ogg", "-o", repo / KEY, "--keyring", ring,
                        "--content-type", "audio/ogg"], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr

    r = subprocess.run([*cli, "serve", "--repository", f"file://{repo}", "--audit-log", tmp_path / "a",
                        "--keyring", ring], env=env, capture_output=True, timeout=30)
    assert r.returncode == 1 and b"without authentication" in r.stderr and r.stderr.count(b"\n") == 1
    r = subprocess.run([*cli, "serve", "--repository", f"file://{repo}", "--audit-log", tmp_path / "a",
                        "--listen", "0.0.0.0:8750", "--tokens", tokens_file(tmp_path), "--keyring", ring],
                       env=env, capture_output=True, timeout=30)
    assert r.returncode == 1 and b"without TLS" in r.stderr

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([*cli, "serve", "--repository", f"file://{repo}", "--audit-log", tmp_path / "audit.jsonl",
                             "--tokens", tokens_file(tmp_path), "--keyring", ring, "--listen", f"127.0.0.1:{port}"],
                            env=env, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert b"serving" in proc.stderr.readline()

        async def fetch() -> tuple[int, CIMultiDict[str], bytes]:
            return await get(f"http://127.0.0.1:{port}/recordings/{KEY}", {"Range": "bytes=1000-1999"})

        status, h, body = asyncio.run(fetch())
        assert status == 206 and body == media[1000:2000] and h["Content-Type"] == "audio/ogg"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0
    admitted, outcome = map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())
    assert admitted["phase"] == "admitted" and outcome["served"] == admitted["served"] == f"1000-1999/{SIZE}"
