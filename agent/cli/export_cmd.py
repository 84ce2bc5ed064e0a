"""`mediaseal export --repository URL --dest s3://...`: bulk export (export/bulk.py), resumable.

Interrupted (Ctrl-C, SIGINT): asyncio.run cancels the export, whose open multipart uploads are aborted on
the way out (export.bulk's per-recording `abort` runs on any exception, cancellation included); then the
command prints the exact command line that resumes it (a re-run skips what is done) and exits 130.
`--source` is the former spelling of `--repository`. The export writes no local file (--dest is S3).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mediaseal import codec
from mediaseal.agent.cli import argtypes
from mediaseal.agent.cli._common import CommandError, async_unwrapper, program, read_file
from mediaseal.agent.cli._options import SubParsers, command, repository_options, unwrap_options

EXIT_INTERRUPTED = 130


def register(sub: SubParsers) -> None:
    sp = command(sub, "export", cmd_export,
                 "bulk export: decrypt recordings (optionally OpenPGP-encrypt them) into a bucket; resumable",
                 "mediaseal export --repository s3://recordings/site-a --dest s3://audit/case-7 --sse aws:kms"
                 " --sse-kms-key-id alias/audit --since 2026-01-01 --keyring /var/lib/mediaseal/keyring",
                 "mediaseal export --repository file:///srv/recordings --dest s3://audit/case-8 --ids ids.txt"
                 " --pgp-recipient auditor.asc --lkm https://lkm:8443 --lkm-credentials client.toml")
    repository_options(sp, legacy=("--source",), help_="the repository to read: s3://bucket/prefix or file:///dir"
                       " (--endpoint-url serves both buckets)")
    sp.add_argument("--dest", required=True, metavar="URL", help="s3://bucket/prefix to write to")
    g = sp.add_argument_group("selection (every filter given must match)")
    g.add_argument("--prefix", default="", metavar="P", help="only keys under this prefix of the repository,"
                   " e.g. call/2026/")
    g.add_argument("--kind", action="append", choices=codec.KINDS, help="only this kind (repeatable)")
    g.add_argument("--since", type=argtypes.date, metavar="YYYY-MM-DD", help="only recordings of this day or later")
    g.add_argument("--until", type=argtypes.date, metavar="YYYY-MM-DD", help="only recordings of this day or"
                   " earlier")
    g.add_argument("--ids", metavar="FILE", help="only these recording ids (one per line)")
    g = sp.add_argument_group("output protection")
    g.add_argument("--pgp-recipient", metavar="CERT", help="encrypt each recording to this OpenPGP certificate,"
                   " e.g. auditor.asc")
    g.add_argument("--sse", choices=("AES256", "aws:kms"), help="server-side encryption of the exported objects")
    g.add_argument("--sse-kms-key-id", metavar="ID", help="the KMS key for --sse aws:kms, e.g. alias/audit")
    sp.add_argument("--concurrency", type=argtypes.positive, default=4, metavar="N", help="recordings in flight")
    unwrap_options(sp)


def cmd_export(args: argparse.Namespace) -> None:
    import asyncio

    from mediaseal.export.bulk import ExportOptions, Report, Selection, parse_ids, run_export

    if args.sse == "aws:kms" and not args.sse_kms_key_id:
        raise CommandError("--sse aws:kms needs --sse-kms-key-id")
    if args.sse_kms_key_id and args.sse != "aws:kms":
        raise CommandError("--sse-kms-key-id goes with --sse aws:kms")
    ids = parse_ids(read_file(args.ids).decode("utf-8", "replace")) if args.ids else None
    options = ExportOptions(
        source=args.repository, dest=args.dest, sse=args.sse, sse_kms_key_id=args.sse_kms_key_id,
        selection=Selection(prefix=args.prefix, kinds=frozenset(args.kind or ()), since=args.since,
                            until=args.until, ids=ids),
        pgp_recipient=Path(args.pgp_recipient) if args.pgp_recipient else None,
        concurrency=args.concurrency, endpoint_url=args.endpoint_url,
    )

    async def run() -> Report:
        async with async_unwrapper(args) as unwrapper:
            return await run_export(options, unwrapper)

    try:
        report = asyncio.run(run())
    except KeyboardInterrupt:
        print(f"mediaseal: export interrupted (open uploads aborted, finished recordings kept); to resume, run:"
              f" {resume_line(args)}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    for failure in report.failed:
        print(f"mediaseal: error: {failure.key}: {failure.error}", file=sys.stderr)
    print(report.summary())
    if report.failed:
        raise CommandError(f"{len(report.failed)} recording(s) failed to export (listed above)")


def resume_line(args: argparse.Namespace) -> str:
    """The command line that resumes this export: this one, as given (a re-run skips what is done)."""
    return shlex.join([*program(), *args.command_line])
