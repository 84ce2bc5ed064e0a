"""What the command handlers share at run time: the expected errors, inputs and outputs, key providers.

Invariants the handlers rely on:
- an output file appears only when complete (written to a temp name, fsynced, renamed: plumbing.durable),
  so a failed decryption leaves no file; and an existing file is never replaced without --force (checked
  before any work, so a refused command costs nothing);
- a key provider is exactly one of a keyring (passphrase, master.key or KMS) or an LKM; the LKM client's
  HTTP session is closed by `async_unwrapper` before its event loop ends;
- imports stay light (no asyncio, no AWS or HTTP client): `encrypt` and `decrypt` of a file start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import typing
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from mediaseal import codec
from mediaseal.keys import keyring as kr
from mediaseal.keys.kms import DEFAULT_CACHE_SECONDS, KmsOptions
from mediaseal.keys.lkm import options as lkm_options
from mediaseal.plumbing import durable


class CommandError(Exception):
    """An expected failure of a command, reported as one line (exit 1)."""


class UsageError(CommandError):
    """The command line itself is wrong in a way argparse cannot see (exit 2)."""


def program() -> list[str]:
    """How this process was started, for printed commands that must run as pasted: the console script as
    it was typed (`mediaseal`, `/opt/mediaseal/bin/mediaseal`), or this interpreter with `-m`."""
    main = sys.modules.get("__main__")
    spec = main.__spec__ if main is not None else None
    if spec is not None and spec.name.startswith(__package__ or "mediaseal.agent.cli"):
        return [sys.executable, "-m", "mediaseal.agent.cli"]
    argv0 = sys.argv[0] if sys.argv else ""
    return [argv0] if Path(argv0).name.startswith("mediaseal") else ["mediaseal"]


# -- inputs and outputs ----------------------------------------------------------------------------


def read_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None


@contextlib.contextmanager
def open_in(path: str) -> Iterator[io.BufferedReader]:
    """The input file, or stdin for `-`."""
    if path == "-":
        yield typing.cast(io.BufferedReader, sys.stdin.buffer)
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    with f:
        yield f


def refuse_existing(path: str | Path, force: bool) -> None:
    """An existing output is replaced only with --force (called before any work is done)."""
    if str(path) != "-" and not force and os.path.lexists(path):
        raise CommandError(f"{path} exists; give --force to replace it")


@contextlib.contextmanager
def open_out(path: str | Path, *, force: bool) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`, renamed into place only if the block succeeds (stdout for `-`).

    So a failed decryption (tampered, truncated, wrong key) leaves no output file at all.
    """
    if str(path) == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    refuse_existing(path, force)
    try:
        ctx = durable.atomic_open(path)
        f = ctx.__enter__()
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None
    with contextlib.ExitStack() as stack:
        stack.push(ctx.__exit__)
        yield f


def write_out(path: str | Path, data: bytes, *, force: bool) -> None:
    with open_out(path, force=force) as f:
        f.write(data)


def seekable(f: BinaryIO) -> bool:
    try:
        return f.seekable()
    except (AttributeError, ValueError):
        return False


def size_of(f: BinaryIO) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size if seekable(f) else None
    except (OSError, ValueError):
        return None


# -- key providers ---------------------------------------------------------------------------------


def passphrase(args: argparse.Namespace) -> bytes | None:
    return kr.passphrase_from(os.environ, getattr(args, "passphrase_file", None))


def kms(args: argparse.Namespace) -> KmsOptions:
    seconds = getattr(args, "kms_cache_seconds", None)
    return KmsOptions(cache_seconds=DEFAULT_CACHE_SECONDS if seconds is None else seconds)


def unwrapper(args: argparse.Namespace) -> codec.Unwrapper:
    """The one key provider the unwrap options name (an LKM client imports aiohttp only now)."""
    if args.lkm:
        if args.keyring:
            raise CommandError("--lkm and --keyring exclude each other: choose one key provider")
        return lkm_options.client_from_args(args)
    if args.keyring:
        return kr.Keyring.open(args.keyring, kms=kms(args)).unlock(passphrase(args))
    raise CommandError("decrypting needs a key provider: --keyring DIR or --lkm URL")


@contextlib.asynccontextmanager
async def async_unwrapper(args: argparse.Namespace) -> AsyncIterator[codec.Unwrapper]:
    """`unwrapper` for a command that runs an event loop: an LKM client is closed before the loop ends."""
    if args.lkm and not args.keyring:
        async with lkm_options.client_from_args(args) as client:
            yield client
        return
    yield unwrapper(args)
