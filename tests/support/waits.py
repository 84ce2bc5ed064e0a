"""Waiting in tests: until a condition holds, with a generous ceiling; never a fixed sleep.

The machine the suite runs on may be loaded (two cores shared by many jobs): a passing test may run
many times slower than on an idle machine, and must still pass. So:

- A wait ends as soon as what it waits for holds. Its ceiling only bounds how long a *failing* test
  takes, so it is generous (`CEILING`, 120 s) and is never what a test asserts on.
- A wait that runs out raises AssertionError naming what it waited for (`what`) and, when given, the
  state it last saw (`detail`), so the failure reads as the test's own.
- A test that claims something happens *promptly* (before a periodic scan, a retry, a timer) proves it by
  making the slower path impossible within the ceiling (a rescan interval longer than the ceiling, say),
  not by a short timeout: then a broken fast path still fails, at the ceiling, and load cannot fail it.
- Only checks that something does *not* happen wait a fixed, short window: load can make such a check
  weaker, never make it fail a correct program.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CEILING = 120.0  # seconds: the bound of every wait for something that must happen


class Deadline:
    """One ceiling shared by the several waits of a loop: `left()` is what remains of it."""

    def __init__(self, timeout: float = CEILING, what: str = "the condition") -> None:
        self.timeout = timeout
        self.what = what
        self.end = time.monotonic() + timeout

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def fail(self, detail: str = "") -> AssertionError:
        """The error to raise when it ran out (raise it: `raise deadline.fail(...)`)."""
        return AssertionError(f"timed out after {self.timeout:g} s waiting for {self.what}"
                              + (f": {detail}" if detail else ""))


def wait_until(predicate: Callable[[], T], *, what: str, timeout: float = CEILING, interval: float = 0.05,
               detail: Callable[[], object] | None = None) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout` seconds
    naming `what` (and `detail()`, the state last seen, when given)."""
    deadline = Deadline(timeout, what)
    while not (value := predicate()):
        if deadline.expired():
            raise deadline.fail(str(detail()) if detail is not None else "")
        time.sleep(interval)
    return value


async def until(predicate: Callable[[], T], *, what: str, timeout: float = CEILING, interval: float = 0.01,
                detail: Callable[[], object] | None = None) -> T:
    """`wait_until` for a test on an event loop: the loop keeps running while it polls."""
    deadline = Deadline(timeout, what)
    while not (value := predicate()):
        if deadline.expired():
            raise deadline.fail(str(detail()) if detail is not None else "")
        await asyncio.sleep(interval)
    return value
