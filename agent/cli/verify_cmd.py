"""`mediaseal verify IN`: authenticate a whole package (header, key commitment, every chunk), writing nothing."""

from __future__ import annotations

import argparse

from mediaseal import codec
from mediaseal.agent.cli._common import open_in, unwrapper
from mediaseal.agent.cli._options import SubParsers, command, unwrap_options


def register(sub: SubParsers) -> None:
    sp = command(sub, "verify", cmd_verify, "authenticate a whole package, writing nothing",
                 "mediaseal verify call.mseal --keyring /var/lib/mediaseal/keyring")
    sp.add_argument("input", metavar="IN", help="a package file, or - for stdin")
    unwrap_options(sp)


def cmd_verify(args: argparse.Namespace) -> None:
    with open_in(args.input) as src:
        reader = codec.open_package(src, unwrapper(args))
        size = reader.verify()
    print(f"ok: {reader.header.metadata.recording_id}, {size} bytes, {reader.layout.chunks} chunks authenticated")
