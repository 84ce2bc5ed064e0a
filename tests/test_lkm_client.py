"""The LKM client against a scripted HTTPS stub: what it retries (429/503/timeouts only, bounded, each
attempt freshly signed), what it does not, and its DEK cache."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lkm_support as ls
import pytest
from aiohttp import web

from mediaseal import codec
from mediaseal.keys.lkm.client import ClientCredential, LKMClient, load_client_credential
from mediaseal.keys.lkm.errors import (
    KeyServiceUnreachableError,
    LKMConfigError,
    OverloadedError,
    ProtocolError,
    UnauthenticatedError,
)

DEK = os.urandom(32)
WRAP = codec.Wrap("K" * 43, codec.RSA_OAEP_256, b"w" * 384)


class Stub:
    """HTTPS on loopback answering from a script of (status, body, delay) steps; records what came in."""

    def __init__(self, pki: ls.PKI) -> None:
        self.script: list[tuple[int, Any, float]] = []
        self.seen: list[dict[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        status, body, delay = self.script.pop(0) if self.script else (200, {"dek": base64.b64encode(DEK).decode()}, 0)
        if delay:
            await asyncio.sleep(delay)
        if isinstance(body, bytes):
            return web.Response(status=status, body=body)
        headers = {"Retry-After": "0"} if status in (429, 503) else {}
        return web.json_response(body, status=status, headers=headers)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=1)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
        self.loop.run_until_complete(site.start())
        self.url = f"https://127.0.0.1:{site.port}"
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def err(code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": f"scripted {code}"}, "request_id": "r"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ls.PKI:
    return ls.make_pki(tmp_path_factory.mktemp("pki"), client_names=())


@pytest.fixture(scope="module")
def stub(pki: ls.PKI) -> Iterator[Stub]:
    s = Stub(pki)
    yield s
    s.stop()
    s.thread.join(10)


@pytest.fixture
def fresh(stub: Stub) -> Iterator[Stub]:
    stub.script.clear()
    stub.seen.clear()
    return stub


def make(stub: Stub, pki: ls.PKI, **kw: Any) -> LKMClient:
    kw.setdefault("backoff_base", 0.01)
    return LKMClient(stub.url, credential=ClientCredential("c", b"s" * 32), ca_file=pki.ca, **kw)


def test_retries_429_and_503_with_a_fresh_signature_each_time(fresh: Stub, pki: ls.PKI) -> None:
    fresh.script[:] = [(503, err("overloaded"), 0), (429, err("rate_limited"), 0)]
    assert make(fresh, pki).unwrap([WRAP]) == DEK
    assert len(fresh.seen) == 3
    assert len({h["Authorization"] for h in fresh.seen}) == 3  # new nonce (and signature) per attempt


def test_retries_are_bounded(fresh: Stub, pki: ls.PKI) -> None:
    fresh.script[:] = [(503, err("overloaded"), 0)] * 5
    with pytest.raises(OverloadedError, match="scripted overloaded"):
        make(fresh, pki, attempts=3).unwrap([WRAP])
    assert len(fresh.seen) == 3


def test_other_errors_are_not_retried(fresh: Stub, pki: ls.PKI) -> None:
    fresh.script[:] = [(401, err("unauthenticated"), 0)]
    with pytest.raises(UnauthenticatedError):
        make(fresh, pki).unwrap([WRAP])
    assert len(fresh.seen) == 1
    fresh.script[:] = [(503, err("overloaded"), 0)]
    c = make(fresh, pki)
    with pytest.raises(OverloadedError):  # creating a key is not idempotent: never retried
        c._sync(lambda: c.create_key())
    assert len(fresh.seen) == 2


def test_timeouts_are_retried_then_unreachable(fresh: Stub, pki: ls.PKI) -> None:
    fresh.script[:] = [(200, {"dek": base64.b64encode(DEK).decode()}, 1.5)]
    assert make(fresh, pki, read_timeout=0.3).unwrap([WRAP]) == DEK
    assert len(fresh.seen) == 2
    fresh.seen.clear()
    fresh.script[:] = [(200, {}, 1.5)] * 3
    with pytest.raises(KeyServiceUnreachableError, match=r"key service unreachable: .*no answer within the timeout"):
        make(fresh, pki, read_timeout=0.3, attempts=3).unwrap([WRAP])
    assert len(fresh.seen) == 3


def test_not_the_protocol(fresh: Stub, pki: ls.PKI) -> None:
    fresh.script[:] = [(502, b"<html>bad gateway</html>", 0)]
    with pytest.raises(ProtocolError, match="HTTP 502"):
        make(fresh, pki).unwrap([WRAP])
    fresh.script[:] = [(200, {"dek": "%%%"}, 0)]
    with pytest.raises(ProtocolError, match="no valid base64"):
        make(fresh, pki).unwrap([WRAP])


def test_dek_cache_ttl_and_size(fresh: Stub, pki: ls.PKI) -> None:
    now = [1000.0]
    c = make(fresh, pki, cache_ttl=30, cache_size=2, clock=lambda: now[0])
    assert c.unwrap([WRAP]) == DEK and c.unwrap([WRAP]) == DEK
    assert len(fresh.seen) == 1  # the second came from memory
    now[0] += 31
    c.unwrap([WRAP])
    assert len(fresh.seen) == 2  # expired: asked again
    others = [codec.Wrap("K" * 43, codec.RSA_OAEP_256, bytes([i]) * 384) for i in range(3)]
    for w in others:
        c.unwrap([w])
    assert len(c.cache) == 2  # bounded; the least recently used went first
    c.unwrap([others[0]])
    assert len(fresh.seen) == 6
    off = make(fresh, pki, cache_ttl=0)
    off.unwrap([WRAP])
    off.unwrap([WRAP])
    assert len(fresh.seen) == 8


def test_sync_unwrap_works_inside_an_event_loop(fresh: Stub, pki: ls.PKI) -> None:
    async def inside() -> bytes:
        return make(fresh, pki).unwrap([WRAP])

    assert asyncio.run(inside()) == DEK


def test_batch_keeps_order_and_uses_the_cache(fresh: Stub, pki: ls.PKI) -> None:
    w2 = codec.Wrap("K" * 43, codec.RSA_OAEP_256, b"2" * 384)
    d2 = os.urandom(32)
    fresh.script[:] = [(200, {"results": [{"dek": base64.b64encode(d2).decode()},
                                          {"error": {"code": "unwrap_failed", "message": "m"}}]}, 0)]
    c = make(fresh, pki)
    c.cache.put(WRAP, DEK)
    bad = codec.Wrap("K" * 43, codec.RSA_OAEP_256, b"3" * 384)
    results = c._sync(lambda: c.unwrap_batch([WRAP, (w2, "rec-2"), bad]))
    assert results[0] == DEK and results[1] == d2 and isinstance(results[2], codec.AuthenticationError)
    assert len(fresh.seen) == 1  # one request, for the two not cached


def test_credentials_file(tmp_path: Path) -> None:
    p = ls.write_credential(tmp_path / "c.json", "exp-a")
    cred = load_client_credential(p)
    assert cred.id == "exp-a" and ls.secret("exp-a") not in repr(cred)
    os.chmod(p, 0o604)
    with pytest.raises(LKMConfigError, match="mode 0604"):
        load_client_credential(p)
    (tmp_path / "c.toml").write_text('id = "x"\nsecret = "short"\n')
    os.chmod(tmp_path / "c.toml", 0o600)
    with pytest.raises(LKMConfigError, match="at least 32"):
        load_client_credential(tmp_path / "c.toml")
    with pytest.raises(LKMConfigError, match="https"):
        LKMClient("http://127.0.0.1:1")
