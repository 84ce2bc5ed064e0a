"""Test support for the Local Key Manager: a throwaway PKI, clients files, and the service on loopback.

>>> pki = make_pki(tmp_path)                        # CA, server cert (localhost/127.0.0.1), client certs
>>> with LKMServer(config(tmp_path, keyring, pki, clients_file)) as srv:
...     LKMClient(srv.url, credential=..., ca_file=pki.ca).unwrap([wrap])

The service runs on its own event loop in a thread, bound to 127.0.0.1 on a port the OS picks,
with real TLS, so tests talk to it exactly as a remote client would (and can read its counters).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import ipaddress
import json
import os
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *, server: bool,
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    if server:
        san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        san = x509.SubjectAlternativeName([x509.DNSName(cn)])
        eku = ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_pki(d: Path, client_names: tuple[str, ...] = ("export-1", "admin-1", "stranger")) -> PKI:
    """A CA, a server certificate for localhost/127.0.0.1, client certificates, and the same from a second CA."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("mediaseal test CA")
    other_key, other_cert = _ca("untrusted test CA")
    pem = serialization.Encoding.PEM
    pki = PKI(d, _write(d / "ca.pem", ca_cert.public_bytes(pem), 0o644),
              _write(d / "other-ca.pem", other_cert.public_bytes(pem), 0o644), d / "server.pem", d / "server.key")
    key, cert = _leaf(ca_key, ca_cert, "localhost", server=True)
    _write(pki.server_cert, cert.public_bytes(pem), 0o644)
    _write(pki.server_key, _key_pem(key))
    # A server certificate from the untrusted CA (for "the client does not trust the server").
    key, cert = _leaf(other_key, other_cert, "localhost", server=True)
    _write(d / "rogue-server.pem", cert.public_bytes(pem), 0o644)
    _write(d / "rogue-server.key", _key_pem(key))
    for name in client_names:
        for issuer_key, issuer_cert, table, prefix in ((ca_key, ca_cert, pki.clients, ""),
                                                       (other_key, other_cert, pki.rogue, "rogue-")):
            key, cert = _leaf(issuer_key, issuer_cert, name, server=False)
            table[name] = (_write(d / f"{prefix}{name}.pem", cert.public_bytes(pem), 0o644),
                           _write(d / f"{prefix}{name}.key", _key_pem(key)))
    return pki


# -- clients files and credentials ---------------------------------------------------------------------------


def secret(tag: str) -> str:
    return f"test-secret-{tag}-" + "x" * 32


def write_clients(path: Path, clients: list[dict[str, Any]]) -> Path:
    """A clients file (JSON), mode 0600."""
    return _write(path, json.dumps({"clients": clients}, indent=2).encode())


def write_credential(path: Path, cred_id: str, tag: str | None = None) -> Path:
    return _write(path, json.dumps({"id": cred_id, "secret": secret(tag or cred_id)}).encode())


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
