"""Command-line options of `mediaseal lkm ...` and of the `--lkm` key provider (argparse only: no heavy imports).

agent/cli/lkm_cmd.py and agent/cli/_options.py wire these into the parser;
the commands themselves live in keys.lkm.service / keys.lkm.audit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mediaseal.keys.keyset import DEFAULT_TTL_SECONDS
from mediaseal.keys.kms import DEFAULT_CACHE_SECONDS
from mediaseal.keys.lkm.auth import DEFAULT_WINDOW, MODES

if TYPE_CHECKING:
    from mediaseal.keys.lkm.client import LKMClient


def add_serve_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--keyring", required=True, type=Path, metavar="DIR", help="the keyring whose keys this serves")
    sp.add_argument("--passphrase-file", type=Path, metavar="FILE",
                    help="file holding the keyring passphrase (else $MEDIASEAL_KEYRING_PASSPHRASE)")
    sp.add_argument("--clients", required=True, type=Path, metavar="FILE",
                    help="clients file (TOML or JSON): names, roles, certificate names, credentials")
    sp.add_argument("--audit-log", required=True, type=Path, metavar="FILE",
                    help="hash-chained JSON-lines audit log (created 0600, appended, fsynced)")
    sp.add_argument("--tls-cert", required=True, type=Path, metavar="FILE", help="server certificate chain (PEM)")
    sp.add_argument("--tls-key", required=True, type=Path, metavar="FILE", help="server private key (PEM)")
    sp.add_argument("--client-ca", type=Path, metavar="FILE", help="CA bundle that issues client certificates (mTLS)")
    sp.add_argument("--require-client-cert", action="store_true",
                    help="refuse TLS handshakes without a client certificate (default: the gate refuses and audits)")
    sp.add_argument("--auth", choices=MODES, default=None,
                    help="what /v1 requests must carry (default: mtls+hmac with --client-ca, else hmac)")
    sp.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT",
                    help="address and port to bind, e.g. 0.0.0.0:8443")
    sp.add_argument("--genesys-keyring", type=Path, metavar="DIR",
                    help="enable the Genesys-compatible /key-management/v1 shim over this (RSA-OAEP) keyring")
    sp.add_argument("--kms-cache-seconds", type=float, default=DEFAULT_CACHE_SECONDS, metavar="S",
                    help="a KMS-protected keyring: how long an opened key is used before KMS is asked again "
                         "(disabling the KMS key stops unwraps within this time)")
    sp.add_argument("--hawk-allow-unhashed-body", action="store_true",
                    help="accept Hawk requests with a body their MAC does not cover (no hash=); by default "
                         "they are refused, as the body could be swapped under a captured signature")
    sp.add_argument("--replay-window", type=int, default=DEFAULT_WINDOW, metavar="SECONDS",
                    help="accepted clock difference for signed requests")
    sp.add_argument("--max-body", type=int, default=256 * 1024, metavar="BYTES", help="largest request body")
    sp.add_argument("--max-batch", type=int, default=256, metavar="N", help="most wraps in one unwrap-batch")
    sp.add_argument("--rate-limit", type=float, default=200.0, metavar="PER_SECOND",
                    help="requests per second per client, burst twice that (0: off)")
    sp.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="longest time one request may take")
    sp.add_argument("--keyset-ttl", type=int, default=DEFAULT_TTL_SECONDS, metavar="SECONDS",
                    help="validity of the key sets this signs (re-signed at half-life)")
    sp.add_argument("--keyset-out", type=Path, metavar="FILE", help="also write each key set published here")
    sp.add_argument("--rotation-check", type=float, default=3600.0, metavar="SECONDS",
                    help="how often to run the rotation schedule (keys.rotation), 0: never")
    sp.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format on stderr")


def add_audit_verify_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", type=Path, metavar="FILE", help="the audit log, e.g. /var/log/mediaseal-lkm/audit.jsonl")
    sp.add_argument("--expect-head", metavar="SHA256",
                    help="the chain head last logged by the service: also detects lost newest lines")


def add_client_arguments(sp: argparse.ArgumentParser) -> None:
    """--lkm URL and friends, for commands that unwrap (decrypt, verify, export)."""
    sp.add_argument("--lkm", metavar="URL", help="unwrap through this Local Key Manager (https://HOST:PORT)")
    sp.add_argument("--lkm-credentials", type=Path, metavar="FILE",
                    help="the client credential (TOML/JSON with id and secret) for signed requests")
    sp.add_argument("--lkm-ca", type=Path, metavar="FILE", help="CA bundle for the service's certificate")
    sp.add_argument("--lkm-cert", type=Path, metavar="FILE", help="client certificate (PEM) for mutual TLS")
    sp.add_argument("--lkm-key", type=Path, metavar="FILE", help="client certificate key (PEM)")
    sp.add_argument("--lkm-timeout", type=float, default=30.0, metavar="SECONDS", help="read timeout per attempt")


def client_from_args(args: Any) -> LKMClient:
    """The LKMClient for --lkm options (imports aiohttp only now)."""
    from mediaseal.keys.lkm.client import client_from_options

    return client_from_options(args.lkm, credentials=args.lkm_credentials, ca=args.lkm_ca, cert=args.lkm_cert,
                               key=args.lkm_key, timeout=args.lkm_timeout)


def audit_verify_command(args: Any) -> None:
    """`mediaseal lkm audit-verify FILE`: ok line on stdout and exit 0; else AuditChainError (exit 1)."""
    from mediaseal.keys.lkm.audit import verify_audit_log

    summary = verify_audit_log(args.file, expect_head=args.expect_head)
    print(f"ok: {args.file}: {summary.lines} lines, chain intact, head {summary.head}", file=sys.stdout)


def serve_command(args: Any) -> None:
    from mediaseal.keys.lkm.service import serve_command as serve

    serve(args)
