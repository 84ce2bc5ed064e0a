"""`mediaseal bench`: this host's own disks for the agent, against a plain copy (agent/bench.py measures)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from mediaseal.agent.cli import argtypes
from mediaseal.agent.cli._options import SubParsers, command, json_option, repository_options

if TYPE_CHECKING:
    from mediaseal.agent.bench import Report


def register(sub: SubParsers) -> None:
    sp = command(sub, "bench", cmd_bench,
                 "measure file-to-spool and end-to-end throughput on this host's disks vs a plain copy",
                 "mediaseal bench --dir /var/lib/mediaseal --size 64MiB --rounds 5",
                 "mediaseal bench --dir /var/lib/mediaseal --repository s3://recordings/bench --json",
                 description="Measure, on this host's own disks, sealing a file into the spool and the agent end to"
                             " end (drop -> delivered), each against a plain copy of the same bytes measured in the"
                             " same run (interleaved rounds, medians). Writes only in a temporary directory under"
                             " --dir.")
    sp.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), metavar="DIR",
                    help="the filesystem to measure (e.g. the spool's)")
    sp.add_argument("--size", type=argtypes.size, default="64MiB", metavar="SIZE",
                    help="size of the large recording (keep to 64-256MiB on throttled VMs)")
    sp.add_argument("--rounds", type=argtypes.positive, default=5, metavar="N", help="measured rounds")
    sp.add_argument("--warmup", type=argtypes.count, default=1, metavar="N", help="warm-up rounds, dropped")
    sp.add_argument("--small-count", type=argtypes.count, default=200, metavar="N",
                    help="64 KiB recordings per small-file round (0 skips the small-file rate)")
    repository_options(sp, required=False, help_="deliver to this repository (file:///dir or s3://bucket/prefix)"
                       " instead of a temporary file:// one; packages left in an s3:// repository are listed")
    sp.add_argument("--fsync", action="store_true",
                    help="include fsync in both sides of the file-to-spool figures (end to end always has it)")
    sp.add_argument("--timeout", type=argtypes.seconds, default=600.0, metavar="S",
                    help="seconds to wait for the agent at any one step")
    json_option(sp)


def cmd_bench(args: argparse.Namespace) -> None:
    from mediaseal.agent.bench import BenchError, BenchOptions, run_bench

    if args.repository is not None and urlparse(args.repository).scheme not in ("file", "s3"):
        raise BenchError(f"--repository {args.repository!r}: use file:///dir or s3://bucket/prefix")
    opts = BenchOptions(dir=args.dir.resolve(), size=args.size, rounds=args.rounds, warmup=args.warmup,
                        repository=args.repository, endpoint_url=args.endpoint_url, small_count=args.small_count,
                        fsync=args.fsync, timeout=args.timeout)
    progress = None if args.json else (lambda msg: print(f"mediaseal bench: {msg}", file=sys.stderr, flush=True))
    report = run_bench(opts, progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_table(report)


def print_table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    m, o = report.machine, report.options
    fs = m["filesystem"].split(" (", 1)[0]
    table = Table(title=f"mediaseal bench: {m['dir']} ({fs})", title_justify="left")
    for name, justify in (("measurement", "left"), ("MB/s", "right"), ("recordings/s", "right"),
                          ("baseline (same run)", "left"), ("MB/s", "right"), ("ratio", "right"),
                          ("other load", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in report.results.values():
        table.add_row(r.name, f"{r.mb_per_s:,.0f}", f"{r.recordings_per_s:,.1f}", r.baseline_name,
                      f"{r.baseline_mb_per_s:,.0f}", f"{r.ratio:.2f}x", f"{r.other_load_cores:.2f} cores")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    console.print(table)
    console.print(f"{m['cpu']}, {m['nproc']} cores; Python {m['python']}, cryptography {m['cryptography']}."
                  f" Medians of {o.rounds} round(s) after {o.warmup} warm-up, interleaved with the baseline;"
                  f" ratio = baseline time / measured time; MB = 10^6 bytes; fsync"
                  f" {'in both sides' if o.fsync else 'in neither side'} of file -> spool, in both end to end.",
                  highlight=False)
    busy = max((r.other_load_cores for r in report.results.values()), default=0.0)
    if busy > 0.2:
        console.print(f"Other processes used up to {busy:.2f} cores meanwhile: the agent's two-thread paths"
                      " lose more to them than a copy does, so these ratios understate it. Run again when"
                      " the host is quiet.", highlight=False)
    if report.left_in_repository:
        console.print(f"{len(report.left_in_repository)} benchmark package(s) left in {o.repository}"
                      " (agent id mediaseal-bench): remove them if unwanted; --json lists their keys.",
                      highlight=False)
