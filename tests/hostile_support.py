"""Servers as processes and a raw HTTP(S) client that sends what no client library would.

Used by tests/test_reliability_hostile.py:

>>> srv = ServerProcess.start("playback", cfg, tmp_path)       # tests/hostile_servers.py in a subprocess
>>> out = exchange(srv.port, [b"GET / HTTP/1.1\\r\\n", b"Host: x\\r\\n\\r\\n"], gap=0.5)
>>> out.status, out.closed, out.elapsed
(401, False, 0.51)
>>> srv.rss(), srv.peak_rss(), srv.tracebacks(), srv.stop()

An `Outcome` is what one connection got: a status line (and head, and the body when asked for), or
the connection closed (or reset) without one, or nothing within the time bound (`timed_out`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import process
from support.waits import CEILING

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "hostile_servers.py"


URL = re.compile(r"(https?://(?:127\.0\.0\.1|localhost):\d+)")


class ServerProcess(process.Child):
    """A server subprocess (support.process.Child): its stderr collected by a thread, its URL from its first
    words, its memory from /proc. Started by a module's fixture, so the reaper leaves it to that fixture's
    stop() until the end of the session."""

    def __init__(self, kind: str, cfg: Path, env: dict[str, str]) -> None:
        super().__init__([sys.executable, LAUNCHER, kind, cfg], env=env, cwd=ROOT, lifetime="session",
                         name=f"the {kind} server")
        self.url = ""
        self.port = 0

    @classmethod
    def start(cls, kind: str, config: dict[str, Any], d: Path, timeout: float = CEILING) -> ServerProcess:
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / f"{kind}.json"
        cfg.write_text(json.dumps(config, default=str))
        cfg.chmod(0o600)
        env = process.child_env()
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        srv = cls(kind, cfg, env)
        try:
            srv.url = srv.wait_line(URL, timeout).match.group(1)
        except AssertionError as e:
            srv.kill()
            raise RuntimeError(f"{kind} server did not start: {e}") from None
        srv.port = int(srv.url.rsplit(":", 1)[1].split("/")[0])
        return srv

    def _status(self, field_name: str) -> int:
        """A /proc/<pid>/status field in bytes (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field_name)

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def log_since(self, mark: int) -> list[str]:
        return self.lines[mark:]

    def tracebacks(self, mark: int = 0) -> list[str]:
        """The exception line of each traceback the server logged since `mark` (a line count)."""
        lines = self.lines[mark:]
        out = []
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                rest = [x for x in lines[i + 1:] if x.strip() and not x.startswith((" ", "\t"))]
                out.append(rest[0].strip()[:160] if rest else "Traceback (unfinished)")
        return out

    def stop(self, timeout: float = CEILING) -> int:
        """SIGTERM; SIGKILL if it has not exited within `timeout`."""
        try:
            return super().stop(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()


# -- the raw client -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None = None  # None: no status line (closed, reset, or timed out)
    head: bytes = b""
    body: bytes = b""
    closed: bool = False  # the server closed (or reset) the connection
    timed_out: bool = False  # neither an answer nor a close within the time bound
    elapsed: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.status is not None:
            return f"status {self.status}"
        return "no answer within the bound" if self.timed_out else "closed without an answer"


def connect(port: int, ctx: ssl.SSLContext | None = None, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if ctx is None:
        return sock
    try:
        return ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def exchange(port: int, parts: list[bytes], *, ctx: ssl.SSLContext | None = None, gap: float = 0.0,
             timeout: float = 5.0, body: bool = False, head_request: bool = False) -> Outcome:
    """Send `parts` (with `gap` seconds between them) on a new connection; read the answer's head (and its
    body when `body`), within `timeout` seconds of the last byte sent."""
    out = Outcome()
    t0 = time.monotonic()
    try:
        sock = connect(port, ctx, timeout)
    except (ssl.SSLError, ConnectionError) as e:
        out.closed, out.elapsed = True, time.monotonic() - t0
        out.head = repr(e).encode()
        return out
    with sock:
        try:
            for i, part in enumerate(parts):
                if i and gap:
                    time.sleep(gap)  # pacing a slow client, not waiting for an event
                sock.sendall(part)
        except (ConnectionError, ssl.SSLError, OSError):
            out.closed = True  # the server gave up on us while we were sending: still read what it said
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = _recv(sock, deadline)
            if chunk is None:
                out.timed_out = True
                break
            if not chunk:
                out.closed = True
                break
            buf += chunk
        head, sep, rest = buf.partition(b"\r\n\r\n")
        while sep and re.match(rb"HTTP/1\.[01] 1\d\d", head):  # an interim answer (100 Continue): the next
            buf = rest
            while b"\r\n\r\n" not in buf:
                chunk = _recv(sock, deadline)
                if not chunk:
                    out.timed_out, out.closed = chunk is None, chunk == b""
                    break
                buf += chunk
            head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            out.head = head
            m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
            out.status = int(m.group(1)) if m else None
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.decode("latin-1").partition(":")
                out.headers[k.strip().lower()] = v.strip()
            if body and not head_request:
                want = int(out.headers.get("content-length", "-1"))
                while want < 0 or len(rest) < want:
                    chunk = _recv(sock, deadline)
                    if not chunk:
                        out.timed_out = chunk is None and want >= 0
                        break
                    rest += chunk
                out.body = rest if want < 0 else rest[:want]
        out.elapsed = time.monotonic() - t0
    return out


def _recv(sock: socket.socket, deadline: float) -> bytes | None:
    """Bytes, b"" at a close or reset, None at the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    sock.settimeout(left)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError, OSError):
        return b""


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes `sock` (reading and dropping whatever it sends), None if it did not."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        chunk = _recv(sock, deadline)
        if chunk is None:
            return None
        if not chunk:
            return time.monotonic() - t0
