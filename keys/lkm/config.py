"""What `mediaseal lkm serve` is told: ServiceConfig, checked before anything is opened, and its loading.

>>> config = config_from_args(args)        # the `lkm serve` options (keys.lkm.options); LKMConfigError
>>> config.check(); config.mode             # "mtls+hmac" with a client CA, else "hmac", unless --auth says

The passphrase is not printed by repr. Every bound (body size, batch, queue, replay window) is
positive: a zero would refuse everything, or (for the queue) mean no bound at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mediaseal.keys.keyring import passphrase_from
from mediaseal.keys.keyset import DEFAULT_TTL_SECONDS
from mediaseal.keys.kms import DEFAULT_CACHE_SECONDS
from mediaseal.keys.lkm.auth import MODES, AuthMode
from mediaseal.keys.lkm.errors import LKMConfigError
from mediaseal.plumbing.http import HANDSHAKE_SECONDS, KEEPALIVE_SECONDS


@dataclass
class ServiceConfig:
    """Everything `lkm serve` is told. Secrets (the passphrase) are not printed by repr."""

    keyring: Path
    clients: Path
    audit_log: Path
    tls_cert: Path
    tls_key: Path
    passphrase: bytes | None = field(default=None, repr=False)
    client_ca: Path | None = None
    require_client_cert: bool = False
    auth_mode: AuthMode | str | None = None  # None: "mtls+hmac" with a client CA, else "hmac"
    host: str = "127.0.0.1"
    port: int = 8443
    genesys_keyring: Path | None = None
    replay_window: int = 300
    nonce_cache_size: int = 100_000
    kms_cache_seconds: float = DEFAULT_CACHE_SECONDS  # a KMS-protected keyring: KMS is asked again after this
    max_body: int = 256 * 1024
    max_batch: int = 256
    rate_limit: float = 200.0  # requests per second per client (burst: twice that); 0 turns it off
    address_rate_limit: float = 500.0  # per remote address, before authentication; 0 turns it off
    max_queue: int = 512  # RSA operations waiting for a worker thread before `overloaded`
    request_timeout: float = 30.0
    body_timeout: float = 10.0
    handshake_timeout: float = HANDSHAKE_SECONDS
    keepalive_timeout: float = KEEPALIVE_SECONDS
    keyset_ttl: int = DEFAULT_TTL_SECONDS
    keyset_out: Path | None = None
    rotation_check: float = 3600.0  # seconds between schedule checks; 0 turns the hook off
    hawk_require_payload_hash: bool = True
    workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))

    @property
    def mode(self) -> AuthMode:
        """The --auth mode in force (check() first: a mode that is not one is an LKMConfigError there)."""
        if self.auth_mode:
            return AuthMode(self.auth_mode)
        return AuthMode.BOTH if self.client_ca else AuthMode.HMAC

    def check(self) -> None:
        if self.auth_mode and self.auth_mode not in MODES:
            raise LKMConfigError(f"--auth must be one of {', '.join(MODES)}")
        if self.mode in (AuthMode.MTLS, AuthMode.BOTH) and self.client_ca is None:
            raise LKMConfigError(f"--auth {self.mode} needs --client-ca (the CA that issues client certificates)")
        if self.require_client_cert and self.client_ca is None:
            raise LKMConfigError("--require-client-cert needs --client-ca")
        bounds = {"max_body": self.max_body, "max_batch": self.max_batch, "max_queue": self.max_queue,
                  "replay_window": self.replay_window, "nonce_cache_size": self.nonce_cache_size,
                  "keyset_ttl": self.keyset_ttl}
        for name, value in bounds.items():
            if value < 1:
                raise LKMConfigError(f"{name.replace('_', '-')} must be positive")


def config_from_args(args: Any) -> ServiceConfig:
    """The ServiceConfig from `mediaseal lkm serve` options (see keys.lkm.options)."""
    host, _, port = str(args.listen).rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise LKMConfigError(f"--listen must be HOST:PORT, not {args.listen!r}")
    return ServiceConfig(
        keyring=Path(args.keyring), clients=Path(args.clients), audit_log=Path(args.audit_log),
        tls_cert=Path(args.tls_cert), tls_key=Path(args.tls_key),
        passphrase=passphrase_from(os.environ, args.passphrase_file),
        client_ca=Path(args.client_ca) if args.client_ca else None,
        require_client_cert=args.require_client_cert, auth_mode=args.auth, host=host.strip("[]"), port=int(port),
        genesys_keyring=Path(args.genesys_keyring) if args.genesys_keyring else None,
        replay_window=args.replay_window, max_body=args.max_body, max_batch=args.max_batch,
        rate_limit=args.rate_limit, request_timeout=args.request_timeout, keyset_ttl=args.keyset_ttl,
        keyset_out=Path(args.keyset_out) if args.keyset_out else None, rotation_check=args.rotation_check,
        hawk_require_payload_hash=not args.hawk_allow_unhashed_body, kms_cache_seconds=args.kms_cache_seconds,
    )
