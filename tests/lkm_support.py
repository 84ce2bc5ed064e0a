"""Test support for the Local Key Manager: a PKI (of support.pki), clients files, and the service on loopback.

>>> pki = make_pki(tmp_path)                        # CA, server cert (localhost/127.0.0.1), client certs
>>> with LKMServer(config(tmp_path, keyring, pki, clients_file)) as srv:
...     LKMClient(srv.url, credential=..., ca_file=pki.ca).unwrap([wrap])

The service runs on its own event loop in a thread, bound to 127.0.0.1 on a port the OS picks,
with real TLS, so tests talk to it exactly as a remote client would (and can read its counters).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.pki import ThrowawayCA, write_file

from mediaseal.keys.lkm.config import ServiceConfig
from mediaseal.keys.lkm.service import LKMService

PASSPHRASE = b"lkm test passphrase"


# -- PKI ------------------------------------------------------------------------------------------------


@dataclass
class PKI:
    dir: Path
    ca: Path  # the CA that issues the server's and the clients' certificates
    other_ca: Path  # a CA nobody trusts
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key), issued by `ca`
    rogue: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # same names, issued by `other_ca`


def make_pki(d: Path, client_names: tuple[str, ...] = ("export-1", "admin-1", "stranger")) -> PKI:
    """A CA, a server certificate for localhost/127.0.0.1, client certificates, and the same from a second CA."""
    d.mkdir(parents=True, exist_ok=True)
    ca, other = ThrowawayCA("mediaseal test CA"), ThrowawayCA("untrusted test CA")
    server = ca.issue(d, "server", "localhost", hosts=("localhost", "127.0.0.1"))
    pki = PKI(d, ca.write(d / "ca.pem"), other.write(d / "other-ca.pem"), server.cert, server.key)
    # A server certificate from the untrusted CA (for "the client does not trust the server").
    other.issue(d, "rogue-server", "localhost", hosts=("localhost", "127.0.0.1"))
    for name in client_names:
        for issuer, table, prefix in ((ca, pki.clients, ""), (other, pki.rogue, "rogue-")):
            leaf = issuer.issue(d, f"{prefix}{name}", name, client=True)
            table[name] = (leaf.cert, leaf.key)
    return pki


# -- clients files and credentials ---------------------------------------------------------------------------


def secret(tag: str) -> str:
    return f"test-secret-{tag}-" + "x" * 32


def write_clients(path: Path, clients: list[dict[str, Any]]) -> Path:
    """A clients file (JSON), mode 0600."""
    return write_file(path, json.dumps({"clients": clients}, indent=2).encode())


def write_credential(path: Path, cred_id: str, tag: str | None = None) -> Path:
    return write_file(path, json.dumps({"id": cred_id, "secret": secret(tag or cred_id)}).encode())


# -- the server ----------------------------------------------------------------------------------------------


class LKMServer:
    """An LKMService on its own loop in a thread. `url`, `service`, `audit_lines()`; a context manager."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.service = LKMService(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="lkm-test-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.service.start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> LKMServer:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._error is None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        self.loop.close()

    def __enter__(self) -> LKMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def handler_calls(self, operation: str) -> int:
        return self.service.stats[f"handler:{operation}"]

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.config.audit_log.read_bytes().splitlines()]

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop (to poke at the service from a test)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def config(d: Path, keyring: Path, pki: PKI, clients: Path, **overrides: Any) -> ServiceConfig:
    d.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "keyring": keyring, "clients": clients, "audit_log": d / "audit.jsonl", "tls_cert": pki.server_cert,
        "tls_key": pki.server_key, "passphrase": PASSPHRASE, "client_ca": pki.ca, "auth_mode": "any", "port": 0,
        "rotation_check": 0, "workers": 2,
    }
    values.update(overrides)
    return ServiceConfig(**values)


# -- raw HTTPS (for requests the client library would never send) ---------------------------------------------


def tls_context(pki: PKI, client: tuple[Path, Path] | None = None, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca or pki.ca))
    if client is not None:
        ctx.load_cert_chain(client[0], client[1])
    return ctx


def raw(url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
        ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request; (status, headers, body). TLS failures raise (ssl.SSLError, ConnectionError)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=15)
    try:
        conn.request(method, path, body=body or None, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
