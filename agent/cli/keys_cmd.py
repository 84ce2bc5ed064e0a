"""`mediaseal keys init|rotate|schedule|retire|rewrap|list|publish`: the managed keyring's key-encryption keys.

Hints that name a command (retire: "re-wrap first") print one that runs as pasted: the same program,
keyring, passphrase file, repository and endpoint as the command that printed it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from mediaseal import codec
from mediaseal.agent.cli import argtypes
from mediaseal.agent.cli._common import CommandError, kms, passphrase, program, refuse_existing, write_out
from mediaseal.agent.cli._options import (
    SubParsers,
    actions,
    command,
    json_option,
    keyring_options,
    output_options,
    repository_options,
)
from mediaseal.keys import keyring as kr
from mediaseal.keys import keyset as ks

KR = "--keyring /var/lib/mediaseal/keyring"


def register(sub: SubParsers) -> None:
    keys_p = command(sub, "keys", None, "manage key-encryption keys (KEKs): init, rotate, schedule, retire, rewrap,"
                     " list, publish", f"mediaseal keys init {KR}", f"mediaseal keys list {KR}")
    ksub = actions(keys_p, "keys_command", "ACTION")

    sp = command(ksub, "init", cmd_init, "create a keyring with a new RSA-3072 KEK; prints its kid",
                 f"MEDIASEAL_KEYRING_PASSPHRASE=... mediaseal keys init {KR}",
                 f"mediaseal keys init {KR} --kms-key-id alias/mediaseal")
    keyring_options(sp)
    sp.add_argument("--alg", default=codec.RSA_OAEP_256, choices=codec.WRAP_ALGORITHMS, help="key wrapping algorithm")
    sp.add_argument("--kms-key-id", metavar="ARN|ALIAS", type=argtypes.nonempty,
                    help="seal the private keys with this AWS KMS symmetric key instead of a passphrase")

    sp = command(ksub, "rotate", cmd_rotate, "make a new current KEK now; the previous one becomes decrypt-only",
                 f"mediaseal keys rotate {KR}", f"mediaseal keys rotate {KR} --if-due    # from a timer")
    keyring_options(sp)
    sp.add_argument("--if-due", action="store_true",
                    help="only do what the schedule says is due (add a pending key, or activate one after its"
                         " grace period); prints what it did, exits 0 either way")

    sp = command(ksub, "schedule", cmd_schedule, "show or set the rotation schedule",
                 f"mediaseal keys schedule {KR}", f"mediaseal keys schedule {KR} --set monthly --grace 86400")
    keyring_options(sp)
    sp.add_argument("--set", choices=tuple(kr.SCHEDULE_PERIODS), metavar="EVERY",
                    help="daily | weekly | monthly | yearly | disabled")
    sp.add_argument("--grace", type=argtypes.count, metavar="SECONDS",
                    help="with --set: how long a scheduled key stays pending before it becomes current"
                         " (not given: 1 day)")

    sp = command(ksub, "retire", cmd_retire, "retire a key (final), unless packages in the repository still need it",
                 f"mediaseal keys retire KID {KR} --repository s3://recordings/site-a")
    keyring_options(sp)
    sp.add_argument("kid", metavar="KID",
                    help="the key to retire (see keys list; a KID that starts with - goes after --)")
    repository_options(sp)
    sp.add_argument("--force", action="store_true", help="retire even if packages still need the key")

    sp = command(ksub, "rewrap", cmd_rewrap, "re-wrap packages from older keys to the current key (bodies untouched)",
                 f"mediaseal keys rewrap {KR} --repository s3://recordings/site-a --from KID")
    keyring_options(sp)
    repository_options(sp)
    sp.add_argument("--from", dest="from_kid", metavar="KID", help="only packages wrapped to this key (default: all"
                    " older keys)")

    sp = command(ksub, "list", cmd_list, "list the keyring's keys (* marks the current one)",
                 f"mediaseal keys list {KR} --json")
    keyring_options(sp)
    json_option(sp)

    sp = command(ksub, "publish", cmd_publish, "write the signed key set document and the signer's public key",
                 f"mediaseal keys publish {KR} -o /srv/keyset/keyset.json --ttl 2592000")
    keyring_options(sp)
    output_options(sp)
    sp.add_argument("--signer-out", metavar="FILE",
                    help="where the signer's public key goes (not given: signer.pem beside -o)")
    sp.add_argument("--ttl", type=argtypes.positive, default=30 * 86400, metavar="SECONDS",
                    help="validity of the key set")


def cmd_init(args: argparse.Namespace) -> None:
    if args.kms_key_id:
        if args.passphrase_file:
            raise CommandError("--kms-key-id and --passphrase-file exclude each other: KMS protects the keys")
        ring = kr.Keyring.init(args.keyring, None, alg=args.alg, kms_key_id=args.kms_key_id)
        print(ring.current().kid)
        return
    secret = passphrase(args)
    ring = kr.Keyring.init(args.keyring, secret, alg=args.alg)
    if secret is None:
        print(
            f"mediaseal: warning: no passphrase given; private keys are protected by {ring.path}/master.key, "
            "which protects them only as well as that file (fine for the embedded default, not for production)",
            file=sys.stderr,
        )
    print(ring.current().kid)


def cmd_rotate(args: argparse.Namespace) -> None:
    from mediaseal.keys.rotation import rotate_if_due

    ring = kr.Keyring.open(args.keyring, kms=kms(args))
    if args.if_due:  # for a timer: exits 0 whether or not anything was due, saying what it did
        print(rotate_if_due(ring, passphrase(args)))
        return
    print(ring.rotate(passphrase(args)).kid)


def cmd_schedule(args: argparse.Namespace) -> None:
    from mediaseal.keys.rotation import next_rotation

    ring = kr.Keyring.open(args.keyring)
    if args.set is not None:
        try:
            ring.set_schedule(kr.RotationSchedule.make(args.set, args.grace))
        except ValueError as e:
            raise CommandError(str(e)) from None
    elif args.grace is not None:
        raise CommandError("--grace goes with --set")
    s = ring.schedule
    due = next_rotation(ring)
    print(f"schedule {s.every}, grace {s.grace_seconds} s; next pending key: "
          f"{ks.format_time(due) if due else 'never (disabled)'}")


def cmd_retire(args: argparse.Namespace) -> None:
    import asyncio

    from mediaseal.export.rewrap import retire_key
    from mediaseal.keys.rotation import KeyInUseError

    ring = kr.Keyring.open(args.keyring)
    try:
        print(asyncio.run(retire_key(ring, args.kid, args.repository, force=args.force,
                                     endpoint_url=args.endpoint_url)))
    except KeyInUseError as e:
        raise CommandError(f"{e}; to re-wrap them, run: {rewrap_hint(args)}") from None


def rewrap_hint(args: argparse.Namespace) -> str:
    """The `keys rewrap` that frees `args.kid`, with this command's keyring, passphrase file and repository."""
    argv = [*program(), "keys", "rewrap", "--keyring", str(args.keyring)]
    if args.passphrase_file:
        argv += ["--passphrase-file", str(args.passphrase_file)]
    argv += ["--repository", args.repository]
    if args.endpoint_url:
        argv += ["--endpoint-url", args.endpoint_url]
    return shlex.join([*argv, f"--from={args.kid}"])  # one token: a kid may start with "-"


def cmd_rewrap(args: argparse.Namespace) -> None:
    import asyncio

    from mediaseal.export.rewrap import rewrap_repository

    ring = kr.Keyring.open(args.keyring, kms=kms(args))
    report = asyncio.run(rewrap_repository(ring, passphrase(args), args.repository, from_kid=args.from_kid,
                                           endpoint_url=args.endpoint_url))
    for location, error in report.failed:
        print(f"mediaseal: error: {location}: {error}", file=sys.stderr)
    print(report.summary())
    if report.failed:
        raise CommandError(f"{len(report.failed)} package(s) could not be re-wrapped (listed above)")


def cmd_list(args: argparse.Namespace) -> None:
    ring = kr.Keyring.open(args.keyring)
    records = ring.records()
    current = ring.current().kid
    if args.json:
        print(json.dumps([{**r.to_json(), "current": r.kid == current} for r in records], indent=2))
        return
    for r in records:
        mark = "*" if r.kid == current else " "
        print(f"{mark} {r.kid}  {r.alg:<13} {r.state:<12} {r.created_at}")


def cmd_publish(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives import serialization

    out = Path(args.output)
    signer_out = Path(args.signer_out) if args.signer_out else out.with_name("signer.pem")
    refuse_existing(out, args.force)
    refuse_existing(signer_out, args.force)
    ring = kr.Keyring.open(args.keyring)
    document = ring.publish(passphrase(args), ttl_seconds=args.ttl)
    write_out(out, document, force=args.force)
    signer_pem = ring.signer.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_out(signer_out, signer_pem, force=args.force)
    print(f"{out} (signer: {signer_out})")
