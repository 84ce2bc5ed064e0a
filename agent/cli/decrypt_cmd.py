"""`mediaseal decrypt IN -o OUT [--offset N] [--length M]`: OUT appears only if every chunk authenticated.

IN is a file (ranges read only the chunks they need), stdin (streamed; no range), or a package in a
repository (s3://bucket/key, file:///path: ranged reads). A range starting past the end of the recording
is an error (nothing is written), as HTTP's 416: an empty file would look like an empty recording.
"""

from __future__ import annotations

import argparse

from mediaseal import codec
from mediaseal.agent.cli import argtypes
from mediaseal.agent.cli._common import CommandError, async_unwrapper, open_in, open_out, refuse_existing, seekable
from mediaseal.agent.cli._common import unwrapper as sync_unwrapper
from mediaseal.agent.cli._options import SubParsers, command, output_options, unwrap_options


def register(sub: SubParsers) -> None:
    sp = command(sub, "decrypt", cmd_decrypt, "decrypt a package; OUT appears only if every chunk authenticated",
                 "mediaseal decrypt call.mseal -o call.wav --keyring /var/lib/mediaseal/keyring",
                 "mediaseal decrypt s3://recordings/site-a/call/2026/01/02/rec-1.mseal -o - --lkm https://lkm:8443"
                 " --lkm-credentials client.toml --offset 960000 --length 16000 | ffplay -")
    sp.add_argument("input", metavar="IN",
                    help="a package file, - for stdin, or a repository URL: s3://bucket/key or file:///path"
                         " (S3 endpoint and credentials from the AWS environment, e.g. AWS_ENDPOINT_URL_S3)")
    output_options(sp, stdout=True)
    g = sp.add_argument_group("range (plaintext bytes; needs a file or URL, not a pipe)")
    g.add_argument("--offset", type=argtypes.count, metavar="N",
                   help="first plaintext byte to decrypt, before the end of the recording (not given: 0)")
    g.add_argument("--length", type=argtypes.count, metavar="M",
                   help="number of plaintext bytes to decrypt, clipped to the end (not given: to the end)")
    unwrap_options(sp)


def check_range(offset: int, size: int) -> None:
    if offset and offset >= size:
        raise CommandError(f"--offset {offset} is past the end of the recording ({size} bytes)")


def cmd_decrypt(args: argparse.Namespace) -> None:
    refuse_existing(args.output, args.force)
    if args.input.startswith(("s3://", "file://")):
        decrypt_url(args)
        return
    unwrapper = sync_unwrapper(args)
    with open_in(args.input) as src:
        if not seekable(src):
            if args.offset is not None or args.length is not None:
                raise CommandError("--offset/--length need a seekable input (a file, not a pipe)")
            with open_out(args.output, force=args.force) as dst:
                codec.decrypt_stream(src, dst, unwrapper)
            return
        reader = codec.open_package(src, unwrapper)
        check_range(args.offset or 0, reader.layout.plaintext_size)
        with open_out(args.output, force=args.force) as dst:
            reader.decrypt_to(dst, args.offset or 0, args.length)


def decrypt_url(args: argparse.Namespace) -> None:
    """A package in a repository: ranged reads of only the chunks needed."""
    import asyncio

    from mediaseal.export.playback import RemotePackage
    from mediaseal.export.source import open_source, split_url

    async def run() -> None:
        repository, key = split_url(args.input)
        source = open_source(repository)
        try:
            async with async_unwrapper(args) as unwrapper:
                package = await RemotePackage.open(source, key, unwrapper)
                check_range(args.offset or 0, package.plaintext_size)
                with open_out(args.output, force=args.force) as dst:
                    async for piece in package.iter_range(args.offset or 0, args.length):
                        dst.write(piece)
        finally:
            await source.close()

    asyncio.run(run())
