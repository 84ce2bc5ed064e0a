"""Test support for key set sources: a throwaway CA (support.pki) and an HTTPS key set server on loopback.

    ca = TestCA.make(tmp_path)                    # ca.pem, server.pem, server.key for 127.0.0.1
    server = KeySetServer(ca).start()             # https://127.0.0.1:<port>/keyset.json
    server.document = ring.publish(passphrase)    # what it serves now (ETag: its SHA-256)
    server.hits, server.not_modified              # 200s and 304s served
    server.fail_with = 503                        # an outage (None: back)
    server.stop()

The server runs aiohttp on its own loop in a thread, so in-process async tests and agent
subprocesses alike can use it. It honours If-None-Match (304 when the ETag matches).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from support.pki import ThrowawayCA
from support.waits import CEILING


@dataclass(frozen=True)
class TestCA:
    """support.pki's throwaway CA as the key set server uses it: the CA certificate and one server
    certificate for `host` (its only subject alternative name)."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    __test__ = False  # not a test class

    @classmethod
    def make(cls, directory: Path, host: str = "127.0.0.1") -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        ca = ThrowawayCA("mediaseal test CA")
        server = ca.issue(directory, "server", host, hosts=(host,))
        return cls(ca.write(directory / "ca.pem"), server.cert, server.key)


class KeySetServer:
    """Serves `document` at /keyset.json over TLS with the test CA's server certificate."""

    def __init__(self, ca: TestCA, path: str = "/keyset.json") -> None:
        self.ca = ca
        self.path = path
        self.document = b""
        self.fail_with: int | None = None
        self.hits = 0
        self.not_modified = 0
        self.conditional = 0  # requests that carried If-None-Match
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.path}"

    @staticmethod
    def etag_of(document: bytes) -> str:
        return '"' + hashlib.sha256(document).hexdigest()[:32] + '"'

    def start(self) -> KeySetServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="keyset-https", daemon=True)
        self._thread.start()
        assert ready.wait(CEILING), "key set server did not start"
        return self

    async def _start(self) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            if self.fail_with is not None:
                return web.Response(status=self.fail_with, text="unavailable")
            document = self.document
            etag = self.etag_of(document)
            if "If-None-Match" in request.headers:
                self.conditional += 1
                if request.headers["If-None-Match"] == etag:
                    self.not_modified += 1
                    return web.Response(status=304, headers={"ETag": etag})
            self.hits += 1
            return web.Response(body=document, content_type="application/json", headers={"ETag": etag})

        app = web.Application()
        app.router.add_get(self.path, handle)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.ca.cert_pem, self.ca.key_pem)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # Port 0 the first time; after stop(), start() binds the same port again (same URL).
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=ctx, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(CEILING)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(CEILING)
        loop.close()
        self._loop = None
