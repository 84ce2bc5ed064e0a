"""The `mediaseal` command line. Names are stable: scripts depend on them (DESIGN section 7).

One module per command (`<name>_cmd.py`: its parser beside its handler, as borg's archiver), the
shared option groups in `_options`, the shared run-time helpers in `_common`. This module assembles the
parser and maps errors to exit codes, in one place:

- 0: done; 1: an expected failure (a tampered package, a wrong key, a missing file, bad config): one
  line `mediaseal: error: ...` on stderr, no traceback; 2: a usage error (argparse's own message);
  130: interrupted (Ctrl-C). A traceback means a bug. `run` adds its own (agent/run.py, documented in
  docs/OPERATIONS.md): 3 a failed fsync, 4 another agent owns the spool or a capture directory.
  `config check` exits 1 with one line per problem.
- Imports are lazy per command: building the parser loads argparse, the codec's constants and the
  light key modules only; asyncio, aioboto3/botocore, aiohttp, prometheus_client and rich load inside
  the handlers that need them (tests/test_cli.py checks `--help` and `encrypt`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from mediaseal.agent.cli import (
    bench_cmd,
    completion_cmd,
    config_cmd,
    decrypt_cmd,
    encrypt_cmd,
    export_cmd,
    inspect_cmd,
    keys_cmd,
    lkm_cmd,
    run_cmd,
    serve_cmd,
    status_cmd,
    verify_cmd,
)
from mediaseal.agent.cli._common import CommandError
from mediaseal.agent.cli._options import HelpFormatter, command_parser, missing

__all__ = ["EXIT_CODES", "CommandError", "build_parser", "main", "version_line"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DISTRIBUTION = "mediaseal"

# In the order `mediaseal --help` lists them.
COMMANDS = (run_cmd, status_cmd, config_cmd, keys_cmd, encrypt_cmd, decrypt_cmd, inspect_cmd, verify_cmd, serve_cmd,
            export_cmd, lkm_cmd, bench_cmd, completion_cmd)

# The one table from expected failures to exit codes, first match wins. Classes are named rather than
# imported: a command's modules load only when it runs, and an exception of a module that was never
# imported cannot have been raised (so an entry whose module is not loaded is skipped, not imported).
EXIT_CODES: tuple[tuple[str, str, int], ...] = (
    ("mediaseal.agent.cli._common", "UsageError", EXIT_USAGE),
    ("mediaseal.agent.cli._common", "CommandError", EXIT_FAILURE),
    ("mediaseal.codec.errors", "CodecError", EXIT_FAILURE),
    ("mediaseal.keys.errors", "KeysError", EXIT_FAILURE),
    ("mediaseal.agent.config", "ConfigError", EXIT_FAILURE),
    ("mediaseal.agent.status", "StatusError", EXIT_FAILURE),
    ("mediaseal.agent.bench", "BenchError", EXIT_FAILURE),
    ("mediaseal.export.bulk", "ExportError", EXIT_FAILURE),
    ("mediaseal.export.pgp", "PgpError", EXIT_FAILURE),
    ("mediaseal.export.serve", "ServeError", EXIT_FAILURE),
    ("mediaseal.export.source", "SourceError", EXIT_FAILURE),
    ("mediaseal.plumbing.durable", "DurabilityError", EXIT_FAILURE),
)


def exit_code(e: BaseException) -> int | None:
    """The exit code of an expected failure, None for anything else (a bug: let it show its traceback)."""
    for module, name, code in EXIT_CODES:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(e, getattr(loaded, name)):
            return code
    return None


def version_line(distribution: str = DISTRIBUTION) -> str:
    """`mediaseal X.Y.Z`, from the installed distribution's metadata (the one place the version is)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"mediaseal {version(distribution)}"
    except PackageNotFoundError:
        return (f"mediaseal (version unknown: the {distribution!r} distribution is not installed;"
                " install it with pip to get one)")


class _Version(argparse.Action):
    """--version, reading the metadata only when asked (importlib.metadata costs start-up time)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mediaseal", description="Encrypt recordings into .mseal packages, and deliver, play and export them.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  mediaseal run --config /etc/mediaseal/mediaseal.toml\n"
               "  mediaseal encrypt call.wav -o call.mseal --keyring ./keyring\n"
               "  mediaseal decrypt call.mseal -o call.wav --keyring ./keyring\n"
               "`mediaseal COMMAND --help` shows a command's options and examples;"
               " `mediaseal completion bash` a completion script.")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if absent := missing(args):  # required options that have a former spelling (see _options.require)
        command_parser(args).error(f"the following arguments are required: {', '.join(absent)}")
    args.command_line = argv
    try:
        args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"mediaseal: error: {e}", file=sys.stderr)
        return code
    return 0
