"""A throwaway certificate authority for tests: a CA and the server and client certificates it issues.

    ca = ThrowawayCA("mediaseal test CA")
    ca.write(d / "ca.pem")                                          # what clients (or servers) trust
    server = ca.issue(d, "server", "localhost", hosts=("localhost", "127.0.0.1"))  # server.pem, server.key
    client = ca.issue(d, "export-1", "export-1", client=True)      # a client certificate (clientAuth)

Every key is EC P-256 and lives only in memory and in the files written, all valid from five minutes ago
(clock skew) for one day. Certificates are written 0644, private keys 0600 (as an operator's would be:
the services refuse, or the secrets audit flags, a private key others may read). A second `ThrowawayCA`
is a CA nobody trusts (for "the client does not trust the server" and rogue clients).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))


def _host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write `data` to `path` with `mode` (set after writing: the umask does not decide it)."""
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


class ThrowawayCA:
    """A self-signed CA (a CA certificate constrained to issue leaves only)."""

    def __init__(self, name: str = "mediaseal test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False))
        self.cert = _validity(builder).sign(self.key, hashes.SHA256())

    def write(self, path: Path) -> Path:
        """The CA certificate, PEM, mode 0644."""
        return write_file(path, self.cert.public_bytes(PEM), 0o644)

    def issue(self, directory: Path, stem: str, cn: str, *, hosts: Sequence[str] = (), client: bool = False) -> Issued:
        """`<stem>.pem` and `<stem>.key` in `directory`: a leaf for `cn` naming `hosts` (IP addresses or DNS
        names; default: `cn`) as its subject alternative names, for server authentication, or for client
        authentication when `client`."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .add_extension(x509.SubjectAlternativeName([_host(h) for h in hosts or (cn,)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        cert = _validity(builder).sign(self.key, hashes.SHA256())
        pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return Issued(write_file(directory / f"{stem}.pem", cert.public_bytes(PEM), 0o644),
                      write_file(directory / f"{stem}.key", pem))
