"""`mediaseal encrypt IN -o OUT`: seal a file (or stdin) to a keyring's or a signed key set's current key.

Needs no secret: only public keys are used. The content type is guessed from IN's name exactly as the
agent guesses it (agent.config.content_type_for), unless --content-type is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import sys
from pathlib import Path

from mediaseal import codec
from mediaseal.agent.cli import argtypes
from mediaseal.agent.cli._common import CommandError, open_in, open_out, read_file, refuse_existing
from mediaseal.agent.cli._options import SubParsers, command, output_options
from mediaseal.keys import keyring as kr
from mediaseal.keys import keyset as ks


def register(sub: SubParsers) -> None:
    sp = command(sub, "encrypt", cmd_encrypt, "encrypt a file (or - for stdin) into a .mseal package",
                 "mediaseal encrypt call.wav -o call.mseal --keyring /var/lib/mediaseal/keyring",
                 "mediaseal encrypt call.wav -o call.mseal --keyset keyset.json --signer signer.pem --kind call")
    sp.add_argument("input", metavar="IN", help="the recording, or - for stdin")
    output_options(sp)
    g = sp.add_argument_group("recipient (one of --keyring or --keyset)")
    g.add_argument("--keyring", metavar="DIR", help="encrypt to the keyring's current public key (no passphrase)")
    g.add_argument("--keyset", metavar="FILE", help="encrypt to the current key of a signed key set")
    g.add_argument("--signer", metavar="FILE", help="the key set signer's public key (PEM), with --keyset")
    g = sp.add_argument_group("metadata (authenticated, in the header)")
    g.add_argument("--recording-id", metavar="ID", help="the recording's id (not given: a fresh time-sortable id,"
                   " printed on stderr)")
    g.add_argument("--kind", default="call", choices=codec.KINDS, help="what the recording is")
    g.add_argument("--content-type", metavar="TYPE",
                   help="media type, e.g. audio/wav (not given: guessed from IN's name as the agent does)")
    g.add_argument("--agent-id", default="", metavar="ID", help="who sealed it (e.g. the host name)")
    sp.add_argument("--chunk-size", type=argtypes.chunk_size, default=codec.DEFAULT_CHUNK_SIZE, metavar="SIZE",
                    help="plaintext bytes per authenticated chunk, a power of two, e.g. 64KiB")


def new_recording_id(now: dt.datetime | None = None) -> str:
    """A fresh, time-sortable id for a recording that has no stable identity of its own."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}"


def recipient(args: argparse.Namespace) -> codec.Recipient:
    if args.keyring:
        return kr.Keyring.open(args.keyring).recipient()
    if args.keyset:
        if not args.signer:
            raise CommandError("--keyset needs --signer (the key set signer's public key)")
        signer = ks.load_signer(read_file(args.signer))
        return ks.verify_keyset(read_file(args.keyset), signer).recipient()
    raise CommandError("encrypt needs --keyring DIR or --keyset FILE --signer FILE")


def cmd_encrypt(args: argparse.Namespace) -> None:
    from mediaseal.agent.config import content_type_for

    refuse_existing(args.output, args.force)
    to = recipient(args)
    name = "" if args.input == "-" else Path(args.input).name
    metadata = codec.Metadata(
        recording_id=args.recording_id or new_recording_id(),
        kind=args.kind,
        content_type=content_type_for(name, args.content_type),
        original_name=name,
        captured_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        agent_id=args.agent_id,
    )
    header, keys = codec.new_package(metadata, [to], args.chunk_size)
    with open_in(args.input) as src, open_out(args.output, force=args.force) as dst:
        codec.seal(src, dst, header, keys)
    print(metadata.recording_id, file=sys.stderr)
