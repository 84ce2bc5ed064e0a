"""Child processes of the suite: one harness that reads a child's stderr as it comes, and one reaper.

Every process a test starts and talks to while it runs (the agent, a `mediaseal ...` command, the Local
Key Manager, a server fed hostile input) is a `Child`:

    child = Child(mediaseal_argv("run", "--config", cfg, "--log-format", "json"), env=child_env(), cwd=d)
    child.wait_for("ready")                        # a JSON log event (consumed from `events`)
    child.wait_line(re.compile(r"listening"))      # a stderr line, JSON or not (not consumed)
    child.stop()                                   # SIGTERM, then its exit code

Invariants (what the tests and the secrets audit rely on):
- A thread reads stderr to its end, so a child never blocks on a full pipe, and every line is kept, in
  order, without its newline (`lines`), with its arrival time (`times`, monotonic clock).
- Each line is also an event on `events`: a JSON object as it is, any other line as
  `{"event": "_text", "text": line}`; the end of stderr adds `{"event": "_exit"}`, which stays last (a
  wait puts it back), so every waiter learns of an exit at once instead of at its ceiling (and says so,
  with the child's last lines).
- Waits end on what they wait for, or fail at a generous ceiling (support.waits.CEILING) naming it.
- Every Child is registered with the reaper when it starts. `reap("test")` (tests/conftest.py, after
  each test) deals with the children of lifetime "test": kills those still running (a failed assertion
  skips a test's own stop) and calls each one's `reaped()` once. `reap("session")` does the same for
  all, at the end of the session and, as a last resort, at interpreter exit (atexit), so that no child
  outlives the run, benchmarks included.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from support.waits import CEILING, Deadline

Lifetime = Literal["test", "session"]  # reaped after each test, or only at the end of the session
Event = dict[str, Any]

TAIL = 15  # log lines quoted in a failed wait's message


def child_env(env: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The test's environment (moto's fake AWS credentials included) without MEDIASEAL_* settings,
    unbuffered, plus `env` and `extra`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    out.update(extra)
    return out


def mediaseal_argv(*args: str | Path) -> list[str]:
    """The installed command line (`python -m mediaseal.agent.cli ARGS`) in this interpreter."""
    return [sys.executable, "-m", "mediaseal.agent.cli", *map(str, args)]


def run_cli(*args: str | Path, env: Mapping[str, str] | None = None, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """One `mediaseal ARGS` to completion, in the test's environment (`child_env`) plus `env`."""
    return subprocess.run(mediaseal_argv(*args), env=child_env(env), input=input, capture_output=True,
                          timeout=timeout, check=False)


def one_line_error(r: subprocess.CompletedProcess[bytes]) -> str:
    """The single `mediaseal: error: ...` line an expected failure prints (exit 1, no traceback)."""
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mediaseal: error: "), err
    assert "Traceback" not in err
    return lines[0]


@dataclass(frozen=True)
class Line:
    """A stderr line that matched: when it came, the line, and the match."""

    t: float
    text: str
    match: re.Match[str]


class Child:
    """A child process: stderr read by a thread into `lines`/`times`/`events`, stdout discarded, or
    collected into `stdout` (text) when `capture_stdout`."""

    def __init__(self, argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, capture_stdout: bool = False, lifetime: Lifetime = "test",
                 name: str = "") -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.lifetime: Lifetime = lifetime
        self.lines: list[str] = []
        self.times: list[float] = []
        self.events: queue.Queue[Event] = queue.Queue()
        self.stdout = ""
        self.started = time.monotonic()
        self.ended: float | None = None  # when finish/stop/kill saw it exit
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            self.argv, env=dict(env) if env is not None else child_env(), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL, stderr=subprocess.PIPE)
        _register(self)
        self._threads = [threading.Thread(target=self._read_err, name=f"{self.name}-stderr", daemon=True)]
        if capture_stdout:
            self._threads.append(threading.Thread(target=self._read_out, name=f"{self.name}-stdout", daemon=True))
        for t in self._threads:
            t.start()

    # -- the readers ----------------------------------------------------------------------------------------

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            with self._cond:
                self.lines.append(line)
                self.times.append(time.monotonic())
                self._cond.notify_all()
            self.on_line(line, doc if isinstance(doc, dict) else None)
            self.events.put(doc if isinstance(doc, dict) else {"event": "_text", "text": line})
        with self._cond:
            self._eof = True
            self._cond.notify_all()
        self.events.put({"event": "_exit"})

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read().decode(errors="replace")

    def on_line(self, line: str, doc: Event | None) -> None:
        """Called on the reader thread for every line, before it becomes an event (`doc`: its JSON)."""

    # -- waiting ------------------------------------------------------------------------------------------

    def tail(self, n: int = TAIL) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def timed_lines(self) -> list[tuple[float, str]]:
        """(arrival time, line) for every stderr line so far."""
        with self._cond:
            return list(zip(self.times, self.lines, strict=True))

    @property
    def stderr(self) -> str:
        """Everything it wrote to stderr so far."""
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, event: str | tuple[str, ...], timeout: float = CEILING,
                 where: Callable[[Event], bool] | None = None, count: int = 1) -> list[Event]:
        """Block until `count` log events named `event` (or any of several names), matching `where`, have
        come; others are passed over (consumed). Fails at `timeout`, or at once when the child has exited
        (`finish()` is how to wait for an exit)."""
        names = (event,) if isinstance(event, str) else event
        deadline = Deadline(timeout, f"{count} x {event!r} from {self.name}")
        got: list[Event] = []
        while len(got) < count:
            if deadline.expired():
                raise deadline.fail(f"got {len(got)}; last lines:\n{self.tail()}")
            try:
                doc = self.events.get(timeout=deadline.left())
            except queue.Empty:
                continue
            if doc.get("event") == "_exit":
                self.events.put(doc)  # stays last, for every later wait
                raise AssertionError(f"{self.name} exited ({self.proc.wait()}) while waiting for {event!r}:\n"
                                     + self.tail())
            if doc.get("event") in names and (where is None or where(doc)):
                got.append(doc)
        return got

    def wait_line(self, pattern: re.Pattern[str], timeout: float = CEILING) -> Line:
        """The first stderr line (since the start; nothing is consumed) matching `pattern`, waiting for it.
        Fails at `timeout`, or at once when stderr ends without one."""
        deadline = Deadline(timeout, f"a line matching {pattern.pattern!r} from {self.name}")
        seen = 0
        with self._cond:
            while True:
                for t, line in zip(self.times[seen:], self.lines[seen:], strict=True):
                    if m := pattern.search(line):
                        return Line(t, line, m)
                seen = len(self.lines)
                if self._eof or deadline.expired():
                    raise deadline.fail(f"exit {self.proc.poll()}; last lines:\n" + "\n".join(self.lines[-TAIL:]))
                self._cond.wait(deadline.left())

    # -- ending -------------------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = CEILING) -> int:
        """Wait for it to exit by itself; its exit code, once its output is all read."""
        code = self.proc.wait(timeout=timeout)
        self.ended = self.ended or time.monotonic()
        for t in self._threads:
            t.join(timeout=CEILING)
        return code

    def stop(self, timeout: float = CEILING) -> int:
        """SIGTERM (if still running), then its exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.finish(timeout)

    def kill(self) -> int:
        """SIGKILL (if still running): no shutdown at all; then its exit code."""
        if self.alive():
            self.proc.kill()
        return self.finish()

    def reaped(self) -> None:
        """Called once by the reaper, after the child has exited (subclasses hand over what they kept)."""


# -- the reaper ----------------------------------------------------------------------------------------------

_CHILDREN: list[Child] = []
_LOCK = threading.Lock()


def _register(child: Child) -> None:
    with _LOCK:
        _CHILDREN.append(child)


def reap(lifetime: Lifetime = "test") -> None:
    """Kill every registered child of `lifetime` ("session": every child) still running, and call each
    one's `reaped()`; they are then forgotten. Safe to call again (it finds nothing left)."""
    with _LOCK:
        mine = [c for c in _CHILDREN if lifetime == "session" or c.lifetime == lifetime]
        _CHILDREN[:] = [c for c in _CHILDREN if c not in mine]
    for child in reversed(mine):
        if child.alive():
            child.proc.kill()
        try:
            child.finish()
        finally:
            child.reaped()


atexit.register(reap, "session")
