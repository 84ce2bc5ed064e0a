"""`mediaseal config check`: validate a config without starting the agent (like `nginx -t`).

What it checks, in the order the agent would meet it: the file parses and every rule holds (the
agent's own `load_config`); each capture directory is there and can be listed (and written, where
`dispose` removes sources), `move_to` likewise; the spool can be created or written; the key source
loads and verifies (the public part only, as the agent reads it); the repository answers (file://: a
write test; S3: the bucket answers with these credentials; agent/readiness.py). It changes nothing:
no spool is created, no key set cache written, no lock taken.

Exit 0 with a short summary on stdout; 1 with one line per problem on stderr (then a count); 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mediaseal.agent.cli._common import CommandError
from mediaseal.agent.cli._options import SubParsers, actions, command

if TYPE_CHECKING:
    from mediaseal.agent.config import Config


def register(sub: SubParsers) -> None:
    sp = command(sub, "config", None, "check a configuration without starting the agent",
                 "mediaseal config check --config /etc/mediaseal/mediaseal.toml")
    acts = actions(sp, "config_action", "ACTION")
    check = command(acts, "check", cmd_check, "validate a config: rules, paths, permissions, keys, repository",
                    "mediaseal config check --config /etc/mediaseal/mediaseal.toml",
                    "sudo -u mediaseal mediaseal config check --config /etc/mediaseal/mediaseal.toml",
                    description="Validate a config as the agent would load it, without starting it: the rules,"
                                " the paths and their permissions, the key source, the repository. Run it as"
                                " the agent's user. Exit 0 with a summary, or 1 with one line per problem.")
    check.add_argument("--config", type=Path, metavar="FILE",
                       help="TOML config, e.g. /etc/mediaseal/mediaseal.toml (default: the embedded default)")


def cmd_check(args: argparse.Namespace) -> None:
    import asyncio
    import sys

    from mediaseal.agent.config import load_config

    config = load_config(args.config, os.environ)  # ConfigError: one line, exit 1
    problems, summary = asyncio.run(_check(config))
    where = str(args.config) if args.config is not None else "the embedded default"
    if problems:
        for p in problems:
            print(f"mediaseal: config check: {p}", file=sys.stderr)
        raise CommandError(f"config {where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
    print(f"config {where} OK: " + "; ".join(summary))


class _Warnings(logging.Handler):
    """The agent's own warning lines (key-refresh-failed, ...) become problems instead of log output."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {}) or {}
        self.lines.append(f"{record.getMessage()}: {fields.get('error') or fields.get('reason') or ''}".rstrip(": "))


async def _check(config: Config) -> tuple[list[str], list[str]]:
    from mediaseal.agent.config import check_layout
    from mediaseal.agent.keysource import PublicKeys
    from mediaseal.agent.readiness import probe_repository, probe_watch
    from mediaseal.agent.run import open_configured_repository
    from mediaseal.uploader import RepositoryError

    problems: list[str] = check_layout(config)
    summary: list[str] = []
    for i, w in enumerate(config.watch):
        c = probe_watch(w, need_write=w.dispose in ("delete", "move"))
        if not c.ok:
            problems.append(f"watch[{i}].path: {c.detail}")
        if w.move_to is not None and not _writable_dir(w.move_to):
            problems.append(f"watch[{i}].move_to: {w.move_to} is not a directory this user can write")
    summary.append(f"{len(config.watch)} watch{'es' if len(config.watch) > 1 else ''} "
                   f"({', '.join(f'{w.kind}: {w.path}' for w in config.watch)})")
    spool = config.buffer.path
    if spool.exists():
        if not _writable_dir(spool):
            problems.append(f"buffer.path: {spool} is not a directory this user can write")
    else:
        parent = next((p for p in spool.parents if p.exists()), None)
        if parent is None or not _writable_dir(parent):
            problems.append(f"buffer.path: {spool} does not exist and cannot be created here")
    summary.append(f"spool {spool}")

    root = logging.getLogger("mediaseal")
    warnings = _Warnings()
    saved = (root.level, root.propagate, root.handlers[:])
    root.handlers[:] = [warnings]
    root.setLevel(logging.WARNING)
    root.propagate = False
    try:
        keys = PublicKeys(config.keys)  # no cache: a check writes nothing
        if await keys.refresh() and (recipient := keys.current()) is not None:
            summary.append(f"key {recipient.kid}")
        else:
            problems += [f"keys: {line}" for line in warnings.lines] or ["keys: no valid public key"]
        warnings.lines.clear()
        try:
            repository = open_configured_repository(config)
        except RepositoryError as e:
            problems.append(f"repository: {e}")
        else:
            try:
                c = await probe_repository(repository)
            finally:
                await repository.close()
            if c.ok:
                summary.append(f"repository {config.repository.url} ({c.detail})")
            else:
                problems.append(f"repository: {c.detail}")
    finally:
        root.setLevel(saved[0])
        root.propagate = saved[1]
        root.handlers[:] = saved[2]
    return problems, summary


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
