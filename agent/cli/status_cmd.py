"""`mediaseal status`: the spool's state from its manifests (agent/status.py), and the agent's live view."""

from __future__ import annotations

import argparse
from pathlib import Path

from mediaseal.agent.cli._common import program
from mediaseal.agent.cli._options import SubParsers, command, json_option


def register(sub: SubParsers) -> None:
    sp = command(sub, "status", cmd_status, "show the spool's state from its manifests (no keys needed)",
                 "mediaseal status --config /etc/mediaseal/mediaseal.toml",
                 "sudo -u mediaseal mediaseal status --config /etc/mediaseal/mediaseal.toml --json",
                 description="Show the spool's state: packages per state, the oldest undelivered one, the last"
                             " errors; and the running agent's view if it answers.")
    sp.add_argument("--config", type=Path, metavar="FILE",
                    help="TOML config, e.g. /etc/mediaseal/mediaseal.toml (default: the embedded default)")
    json_option(sp)
    sp.add_argument("--no-agent", action="store_true", help="read the manifests only; don't ask the agent")


def cmd_status(args: argparse.Namespace) -> None:
    from mediaseal.agent.status import status_command

    status_command(args.config, as_json=args.json, ask_agent=not args.no_agent,
                   command=[*program(), *args.command_line])
