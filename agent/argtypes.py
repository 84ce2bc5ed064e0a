"""Value types for the command line's options: one place, one wording for their errors."""

from __future__ import annotations

import argparse

from mediaseal.agent.config import parse_size


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
