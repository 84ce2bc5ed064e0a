"""Issue 15, findings 2 and 3: the playback server, over real HTTP on loopback, against what a producer or
whoever writes the repository can plant. Before the fix: a recording typed `text/html` (from its
extension, the producer's choice) or `image/svg+xml` was served as such on the player's own origin
with no Content-Security-Policy (stored XSS against a supervisor whose browser holds the player's
credentials), and a symlink in a file repository led the player to a package outside it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agent_harness import Agent, Setup, drop, make_keyring, packages
from conftest import CodecTestKek, CodecTestKeyring
from support.mounts import TmpfsUnavailable, tmpfs
from test_playback import make_package
from test_serve import TOKEN, get, tokens_file

from mediaseal.agent.config import content_type_for
from mediaseal.export.serve import PlaybackAuditLog, PlaybackServer, load_tokens
from mediaseal.export.source import open_source

ACTIVE = ["text/html", "image/svg+xml", "application/xhtml+xml", "text/javascript", "application/pdf",
          "text/xml", "multipart/x-mixed-replace"]
PASSIVE = ["audio/wav", "audio/ogg", "video/mp4", "text/plain"]


@pytest.fixture
async def player(tmp_path: Path, codec_kek: CodecTestKek,
                 codec_keyring: type[CodecTestKeyring]) -> AsyncIterator[tuple[str, Path]]:
    repo = tmp_path / "repository"
    repo.mkdir()
    source = open_source(f"file://{repo}")
    audit = PlaybackAuditLog(tmp_path / "audit.jsonl")
    srv = PlaybackServer(source, codec_keyring(codec_kek), audit=audit, tokens=load_tokens(tokens_file(tmp_path)))
    runner = await srv.start("127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", repo
    finally:
        await runner.cleanup()
        await source.close()
        audit.close()


def _plant(repo: Path, key: str, body: bytes) -> None:
    (repo / key).parent.mkdir(parents=True, exist_ok=True)
    (repo / key).write_bytes(body)


@pytest.mark.parametrize("ctype", ACTIVE + PASSIVE)
async def test_only_passive_types_are_served_as_themselves(player: tuple[str, Path], codec_kek: CodecTestKek,
                                                           ctype: str) -> None:
    """A package carrying an active type (made by hand: the agent no longer records one) is served as a
    download of application/octet-stream; passive ones as themselves. Every answer says
    `Content-Security-Policy: default-src 'none'; sandbox` and `nosniff`."""
    url, repo = player
    body = b"<html><script>alert(document.cookie)</script></html>"
    _plant(repo, "call/2026/11/28/rec-1.mseal", make_package(codec_kek, body, content_type=ctype))
    status, headers, got = await get(f"{url}/recordings/call/2026/11/28/rec-1.mseal")
    assert status == 200 and got == body
    assert headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert headers["X-Content-Type-Options"] == "nosniff"
    if ctype in PASSIVE:
        assert headers["Content-Type"].split(";")[0] == ctype and "Content-Disposition" not in headers
    else:
        assert headers["Content-Type"].split(";")[0] == "application/octet-stream", headers
        assert headers["Content-Disposition"] == "attachment"
    for path in ("/recordings/call/2026/11/28/none.mseal", "/elsewhere"):  # errors carry the policy too
        status, headers, _ = await get(url + path)
        assert status == 404 and headers["Content-Security-Policy"] == "default-src 'none'; sandbox"


async def test_a_symlink_in_the_file_repository_is_not_followed(player: tuple[str, Path], tmp_path: Path,
                                                                codec_kek: CodecTestKek) -> None:
    """Whoever writes the repository plants links: to a package outside it (a file), and a directory of
    the key path swapped for a link to a directory outside. Neither is served; a real package is."""
    url, repo = player
    outside = tmp_path / "outside" / "2026" / "11" / "28"
    outside.mkdir(parents=True)
    (outside / "secret.mseal").write_bytes(make_package(codec_kek, b"not in the repository"))
    _plant(repo, "call/2026/11/28/real.mseal", make_package(codec_kek, b"in the repository"))
    (repo / "call" / "2026" / "11" / "28" / "linked.mseal").symlink_to(outside / "secret.mseal")
    (repo / "screen").symlink_to(tmp_path / "outside")  # screen/2026/11/28/secret.mseal through a link
    status, _, got = await get(f"{url}/recordings/call/2026/11/28/real.mseal")
    assert (status, got) == (200, b"in the repository")
    for key in ("call/2026/11/28/linked.mseal", "screen/2026/11/28/secret.mseal"):
        status, _, got = await get(f"{url}/recordings/{key}")
        assert status in (404, 502) and b"not in the repository" not in got, (key, status, got)


def test_the_agent_never_records_an_active_type(tmp_path: Path) -> None:
    """From the extension (the producer's choice) or the config: an active type is never recorded."""
    for name in ("x.html", "x.svg", "x.xhtml", "x.js", "x.xml", "x.pdf"):
        assert content_type_for(name) == "application/octet-stream", name
    assert content_type_for("x.wav") in ("audio/wav", "audio/x-wav")
    assert content_type_for("x.txt") == "text/plain"
    setup = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring"),
                  watches=[{"path": str(tmp_path / "capture"), "kind": "transcript", "completion": "rename",
                            "content_type": "text/html"}])
    agent = Agent(setup)
    assert agent.exited() == 2
    assert any("watch[0].content_type: must be audio/*, video/* or text/plain" in ln for ln in agent.lines)
    setup.watches[0].pop("content_type")
    agent = Agent(setup)
    agent.wait_for("ready")
    drop(setup.capture(), "transcript.html", b"<script>alert(1)</script>")
    agent.wait_for("delivered")
    assert agent.stop() == 0
    from mediaseal import codec

    (package,) = packages(setup.repository)
    with open(package, "rb") as f:
        assert codec.read_header(f).metadata.content_type == "application/octet-stream"
    assert os.stat(package).st_size > 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    try:
        with tmpfs(tmp_path / "auditfs", 1 << 20) as mnt:
            yield mnt
    except TmpfsUnavailable as e:
        pytest.skip(str(e))


def _fill(path: Path) -> None:
    """Another writer takes every byte of the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)


async def test_nothing_is_served_when_the_audit_log_cannot_be_written(
        tmp_path: Path, small_disk: Path, codec_kek: CodecTestKek, codec_keyring: type[CodecTestKeyring]) -> None:
    """Issue 15, finding 12: with the audit log on a full disk the player streamed plaintext and logged
    nothing. Now the admission line is written and fsynced before the first byte; if it cannot be, 503."""
    repo = tmp_path / "repository"
    _plant(repo, "call/2026/11/28/rec-1.mseal", make_package(codec_kek, b"plaintext of a call" * 100))
    source = open_source(f"file://{repo}")
    audit = PlaybackAuditLog(small_disk / "audit.jsonl")
    srv = PlaybackServer(source, codec_keyring(codec_kek), audit=audit, tokens=load_tokens(tokens_file(tmp_path)))
    runner = await srv.start("127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}/recordings/call/2026/11/28/rec-1.mseal"
    try:
        _fill(small_disk / "filler")  # (the log is still empty: its first line needs a page the disk lacks)
        status, _, body = await get(url)
        assert status == 503 and b"plaintext" not in body and b"audit" in body, (status, body)
        (small_disk / "filler").unlink()
        status, _, body = await get(url)
        assert status == 200 and body.startswith(b"plaintext of a call")
        lines = [json.loads(x) for x in (small_disk / "audit.jsonl").read_text().splitlines()]
        assert [d.get("phase") for d in lines] == ["admitted", None], lines  # admitted, then the outcome
    finally:
        await runner.cleanup()
        await source.close()
        audit.close()


async def test_readers_that_stop_reading_are_bounded(tmp_path: Path, codec_kek: CodecTestKek,
                                                     codec_keyring: type[CodecTestKeyring]) -> None:
    """Issue 15, finding 13: authenticated readers that stop reading were kept for ever (~4.7 MiB each).
    Now a reader streams at most `per_reader` recordings at once (429 past that) and a write that does not
    complete within `write_seconds` closes the connection, which frees the reader's share again."""
    import asyncio

    repo = tmp_path / "repository"
    _plant(repo, "call/2026/11/28/big.mseal", make_package(codec_kek, os.urandom(24 << 20)))
    source = open_source(f"file://{repo}")
    audit = PlaybackAuditLog(tmp_path / "audit.jsonl")
    srv = PlaybackServer(source, codec_keyring(codec_kek), audit=audit, tokens=load_tokens(tokens_file(tmp_path)),
                         per_reader=2, write_seconds=2.0)
    runner = await srv.start("127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}/recordings/call/2026/11/28/big.mseal"
    stalled = []
    try:
        for _ in range(2):  # two requests whose answers are never read
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /recordings/call/2026/11/28/big.mseal HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the answer started: this reader holds a stream
            stalled.append((reader, writer))
        status, _, _ = await get(url, headers={"Range": "bytes=0-99"})
        assert status == 429, status
        for reader, _ in stalled:  # the server gives up on them: their connections end
            await asyncio.wait_for(_drain_until_closed(reader), timeout=120)
        status, _, body = await get(url, headers={"Range": "bytes=0-99"})
        assert status == 206 and len(body) == 100
        assert "stalled" in (tmp_path / "audit.jsonl").read_text()
    finally:
        for _, writer in stalled:
            writer.close()
        await runner.cleanup()
        await source.close()
        audit.close()


async def _drain_until_closed(reader: object) -> None:
    """Read nothing for a while (the stall), then whatever is buffered until the server closes."""
    import asyncio

    assert isinstance(reader, asyncio.StreamReader)
    await asyncio.sleep(3)  # longer than write_seconds: the stall the server must end
    while await reader.read(1 << 20):
        pass
