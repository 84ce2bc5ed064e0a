"""`mediaseal run`: the agent daemon (watch, seal, spool, deliver) until SIGTERM."""

from __future__ import annotations

import argparse
from pathlib import Path

from mediaseal.agent.cli._options import SubParsers, command


def register(sub: SubParsers) -> None:
    sp = command(sub, "run", cmd_run, "run the agent (no --config: embedded default under ./mediaseal-data/)",
                 "mediaseal run --config /etc/mediaseal/mediaseal.toml",
                 "mediaseal run          # a try-out: ./mediaseal-data/capture is watched")
    sp.add_argument("--config", type=Path, metavar="FILE",
                    help="TOML config, e.g. /etc/mediaseal/mediaseal.toml (default: the embedded default)")
    sp.add_argument("--log-format", choices=("text", "json"), help="overrides [agent] log_format")


def cmd_run(args: argparse.Namespace) -> None:
    from mediaseal.agent.run import run  # the daemon's imports (event loop, watcher) only for this command

    run(args.config, args.log_format)
