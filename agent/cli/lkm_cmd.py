"""`mediaseal lkm serve|audit-verify`: the Local Key Manager (keys/lkm; its options live in keys.lkm.options)."""

from __future__ import annotations

import argparse

from mediaseal.agent.cli._options import SubParsers, actions, command
from mediaseal.keys.lkm import options as lkm_options


def register(sub: SubParsers) -> None:
    lkm_p = command(sub, "lkm", None, "the Local Key Manager: a key service whose private keys never leave it",
                    "mediaseal lkm serve --keyring /var/lib/mediaseal-lkm/keyring --clients clients.toml"
                    " --audit-log audit.jsonl --tls-cert tls.crt --tls-key tls.key --client-ca client-ca.pem",
                    "mediaseal lkm audit-verify audit.jsonl")
    lsub = actions(lkm_p, "lkm_command", "ACTION")
    lkm_options.add_serve_arguments(command(
        lsub, "serve", cmd_serve, "run the Local Key Manager HTTPS service",
        "mediaseal lkm serve --keyring /var/lib/mediaseal-lkm/keyring --passphrase-file pass --clients clients.toml"
        " --audit-log audit.jsonl --tls-cert tls.crt --tls-key tls.key --client-ca client-ca.pem"
        " --listen 0.0.0.0:8443"))
    lkm_options.add_audit_verify_arguments(command(
        lsub, "audit-verify", cmd_audit_verify, "check an LKM audit log's hash chain (exit 1: first bad line)",
        "mediaseal lkm audit-verify /var/log/mediaseal-lkm/audit.jsonl --expect-head SHA256"))


def cmd_serve(args: argparse.Namespace) -> None:
    from mediaseal.agent.log import setup_logging

    setup_logging(args.log_format)
    lkm_options.serve_command(args)  # keys.lkm.service: runs until SIGTERM/SIGINT


def cmd_audit_verify(args: argparse.Namespace) -> None:
    lkm_options.audit_verify_command(args)
