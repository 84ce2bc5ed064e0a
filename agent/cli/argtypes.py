"""Value types for the command line's options: one place, one wording for their errors.

Each is an argparse `type=`: it returns the parsed value or raises ArgumentTypeError, which argparse
turns into a usage error (exit 2) naming the option. String defaults go through the same function,
so a default is written the way a user would type it (and shown that way in --help).
"""

from __future__ import annotations

import argparse
import datetime as dt

HostPort = tuple[str, int]


def nonempty(value: str) -> str:
    """A non-empty string (an empty one is a shell variable that expanded to nothing, not a choice)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def count(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def positive(text: str) -> int:
    """A whole number >= 1."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def seconds(text: str) -> float:
    """A duration in seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def size(text: str) -> int:
    """Bytes: `65536`, `64MiB`, `1GiB`, `1GB` (the config file's syntax)."""
    from mediaseal.agent.config import parse_size  # here: the config module is large, and --help needs none of it

    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError("size must be at least 1 byte")
    return value


def chunk_size(text: str) -> int:
    """A package chunk size: a power of two from 256 B to 16 MiB."""
    value = size(text)
    if value & (value - 1) or not 256 <= value <= 16 << 20:
        raise argparse.ArgumentTypeError("chunk size must be a power of two from 256 B to 16 MiB")
    return value


def date(text: str) -> dt.date:
    """A day, YYYY-MM-DD."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    value = count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port (0-65535): {text!r}")
    return value


def listen(text: str) -> HostPort:
    """`HOST:PORT` to bind, as every listening command spells it; an IPv6 host in brackets: `[::1]:8750`."""
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, port(port_text)
