"""What every command's parser shares: the help format, the option groups, and the former spellings.

Option groups are defined once here and added by each command that takes them, so one concept has one
name (and one help text) across commands:

- key provider (decrypt, verify, serve, export): `--keyring` + `--passphrase-file` + `--kms-cache-seconds`,
  or `--lkm URL` and its client options (keys.lkm.options);
- keyring (keys ...): `--keyring DIR` (required) + `--passphrase-file`;
- repository (serve, export, keys retire|rewrap, bench): `--repository URL` + `--endpoint-url URL`;
- output (encrypt, decrypt, keys publish): `-o/--output` + `--force` (an existing file is never replaced
  without it);
- listen (serve): `--listen HOST:PORT`, as `lkm serve` spells it.

Former spellings (`serve REPOSITORY`, `serve --host/--port`, `export --source`) stay accepted because
scripts depend on names (DESIGN section 7): hidden from --help, they store into the new option and print
one deprecation line on stderr. Nothing here imports more than argparse and light modules: `mediaseal
--help` builds every parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from mediaseal.agent.cli import argtypes
from mediaseal.keys.kms import DEFAULT_CACHE_SECONDS
from mediaseal.keys.lkm import options as lkm_options

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], None]
PARSER = "_parser"  # Namespace attribute: the given command's own parser
REQUIRED = "_required"  # Namespace attribute: (dest, flag) pairs checked after parsing (see require())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, as argparse.ArgumentDefaultsHelpFormatter does, but not for
    options whose default means "not given" (None, False, empty); epilogs (the examples) keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is argparse.SUPPRESS or default in (None, False, "", [], ()):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"  # a string default shows as typed (argparse converts it later)
        return text


def command(sub: SubParsers, name: str, handler: Handler | None, help_: str, *examples: str,
            description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with `help_` in the command list, the examples as its epilog, and `handler` to run."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=description or help_,
                                                 epilog=epilog, formatter_class=HelpFormatter)
    sp.set_defaults(**{PARSER: sp})
    if handler is not None:
        sp.set_defaults(func=handler)
    return sp


def command_parser(args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (innermost) command that was given, for a usage error found after parsing."""
    parser: argparse.ArgumentParser = getattr(args, PARSER)
    return parser


def actions(sp: argparse.ArgumentParser, dest: str, metavar: str) -> SubParsers:
    """The subcommand list of a command with actions (`keys init`, `lkm serve`, ...)."""
    return sp.add_subparsers(dest=dest, required=True, metavar=metavar)


# -- former spellings ------------------------------------------------------------------------------


def deprecated(old: str, new: str) -> None:
    print(f"mediaseal: warning: {old} is deprecated, use {new} (the old spelling will be removed)", file=sys.stderr)


class Deprecated(argparse.Action):
    """A former spelling of an option: stores into the new option's dest and says so on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, replacement: str, **kwargs: Any) -> None:
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string is None and values is None:
            return  # an optional positional not given: argparse calls its action with no value
        deprecated(option_string or f"the positional {self.metavar or self.dest.upper()}", self.replacement)
        setattr(namespace, self.dest, values)


def require(sp: argparse.ArgumentParser, *pairs: tuple[str, str]) -> None:
    """Options required once their former spellings are taken into account (argparse's own `required`
    would refuse the old spelling): main() checks them after parsing, as a usage error."""
    sp.set_defaults(**{REQUIRED: pairs})


def missing(args: argparse.Namespace) -> list[str]:
    return [flag for dest, flag in getattr(args, REQUIRED, ()) if getattr(args, dest, None) is None]


# -- option groups ---------------------------------------------------------------------------------


def _passphrase_file(g: argparse._ActionsContainer) -> None:
    g.add_argument("--passphrase-file", type=Path, metavar="FILE",
                   help="file holding the keyring passphrase (else $MEDIASEAL_KEYRING_PASSPHRASE; no passphrase:"
                        " the keyring's master.key), e.g. /run/credentials/mediaseal/passphrase")


def keyring_options(sp: argparse.ArgumentParser) -> None:
    """`keys ...`: the keyring to work on."""
    g = sp.add_argument_group("keyring")
    g.add_argument("--keyring", required=True, metavar="DIR", help="keyring directory, e.g. /var/lib/mediaseal/keyring")
    _passphrase_file(g)


def kms_options(g: argparse._ActionsContainer) -> None:
    g.add_argument("--kms-cache-seconds", type=argtypes.seconds, default=DEFAULT_CACHE_SECONDS, metavar="S",
                   help="KMS keyrings: keep a decrypted private key in memory at most S seconds")


def unwrap_options(sp: argparse.ArgumentParser) -> None:
    """Commands that decrypt: one key provider, a keyring (passphrase, master.key or KMS) or an LKM."""
    g = sp.add_argument_group("key provider (one of --keyring or --lkm)")
    g.add_argument("--keyring", metavar="DIR", help="unwrap with this keyring, e.g. /var/lib/mediaseal/keyring")
    _passphrase_file(g)
    kms_options(g)
    lkm_options.add_client_arguments(sp)


def repository_options(sp: argparse.ArgumentParser, *, required: bool = True, legacy: Sequence[str] = (),
                       legacy_positional: bool = False, help_: str | None = None) -> None:
    """`--repository URL` (file:///dir or s3://bucket/prefix) and the S3 endpoint; `legacy`: former option
    spellings, `legacy_positional`: the former positional REPOSITORY (serve)."""
    g = sp.add_argument_group("repository")
    g.add_argument("--repository", metavar="URL", help=help_ or "the repository: file:///dir or s3://bucket/prefix")
    for old in legacy:
        g.add_argument(old, dest="repository", metavar="URL", action=Deprecated, replacement="--repository")
    if legacy_positional:
        sp.add_argument("repository", nargs="?", metavar="REPOSITORY", action=Deprecated,
                        replacement="--repository URL")
    g.add_argument("--endpoint-url", metavar="URL",
                   help="S3 endpoint, e.g. https://s3.eu-west-1.amazonaws.com (default: the AWS chain,"
                        " AWS_ENDPOINT_URL_S3 or the region's)")
    if required:
        require(sp, ("repository", "--repository"))


def output_options(sp: argparse.ArgumentParser, *, stdout: bool = False) -> None:
    """`-o/--output` (never replaced without --force; written to a temp name and renamed when complete)."""
    sp.add_argument("-o", "--output", required=True, metavar="OUT",
                    help="output file" + (", or - for stdout" if stdout else "")
                         + "; a file appears only when complete" + (
                             " (stdout gets each chunk once it authenticated: a package that fails further on"
                             " leaves what came before it there, and exits non-zero)" if stdout else ""))
    sp.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")


def listen_option(sp: argparse.ArgumentParser, default: str) -> None:
    sp.add_argument("--listen", type=argtypes.listen, default=default, metavar="HOST:PORT",
                    help="address and port to bind, e.g. 0.0.0.0:8750 or [::1]:8750")


def json_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="one JSON document on stdout instead of text")
