"""Hostile input at the servers (issue 9, "Figures"): the playback server (`mediaseal serve`) and the Local
Key Manager (`mediaseal lkm serve`), each a real process on loopback (tests/hostile_servers.py), fed
malformed, oversized and slow requests over raw sockets (tests/hostile_support.py).

Demanded of every hostile connection: an answer that is a refusal (4xx; a 2xx or 416 only where the
request still means something valid, and then with the right bytes), or the connection closed, within
BOUND seconds; a valid authenticated request right after it still succeeds; the server never exits, logs
no traceback, and its peak RSS stays within MEMORY_BOUND of what it was before the batch (plus a per-connection
allowance for the batches that hold hundreds of connections open at once). Each target's
figures go to reliability_support.hostile() (docs/RELIABILITY.md, "Hostile input"): executions, the
distinct failures (a short signature each; asserted empty) and the slowest single input.

The commands have no options for their connection timeouts, so the servers are started through their
entry points with short ones here (KEEPALIVE); MEDIASEAL_SOAK=1 runs the production values and many more
inputs. The codec's fuzz figures are in tests/test_codec_fuzz.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import selectors
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lkm_support as ls
import pytest
from hostile_support import Outcome, ServerProcess, connect, exchange
from reliability_support import SOAK, Hostile, hostile, sized

from mediaseal import codec
from mediaseal.export.serve import PER_READER
from mediaseal.keys.keyring import Keyring
from mediaseal.keys.lkm.auth import hawk_header, sign_request
from mediaseal.keys.lkm.genesys import keypair_id

MiB = 1 << 20
KEEPALIVE = 15.0 if SOAK else 2.0  # seconds a connection may take to send a whole request (production: 15)
BODY_TIMEOUT = 10.0 if SOAK else 2.0  # LKM: seconds for a request body (production: 10)
HANDSHAKE = 10.0 if SOAK else 2.0  # LKM: seconds for a TLS handshake (production: 10)
BOUND = max(KEEPALIVE, BODY_TIMEOUT, HANDSHAKE) + 5.0  # every hostile connection answered or closed within this
MEMORY_BOUND = 64 * MiB  # server peak RSS over its level before a batch (a few connections at a time)
# Batches that hold many connections open at once get this much more per connection: the servers take any
# number of connections, each costing memory until its timeout closes it (see test_*_slow_clients).
PER_CONNECTION = 512 * 1024  # a TLS connection: asyncio's 256 KiB TLS read buffer, aiohttp's protocol, parser
PER_STALLED_READER = 6 * MiB  # a reader that stopped reading: the 1 MiB chunk being written, its buffers
WORKERS = 4
SOAK_TIMEOUT = 1800 if SOAK else 300  # seconds per test (pytest-timeout); the soak form runs minutes
TOKEN = "hostile-playback-token-" + "p" * 24
READER_TOKEN = "hostile-stalled-readers-" + "r" * 24  # the readers that stop reading: their own principal
PASSPHRASE = "hostile test passphrase"
KEY = "call/2026/11/28/hostile-1.mseal"
LONG_KEY = "call/2026/11/28/hostile-long.mseal"


# -- what every batch shares --------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str  # the failure signature's first part: one per kind of input, not per input
    parts: list[bytes]
    gap: float = 0.0
    allowed: frozenset[int] | None = None  # None: any 4xx
    check: Callable[[Outcome], str | None] | None = None  # judges 2xx/4xx answers itself (and reads bodies)
    head: bool = False  # a HEAD request: the answer has no body


class Target:
    """A server under test (`srv`, `port`, `ctx`): how to make a request with valid credentials, and a valid
    request made and checked."""

    srv: ServerProcess
    ctx: ssl.SSLContext | None

    @property
    def port(self) -> int:
        return self.srv.port

    def request(self, method: str = "GET", path: str | None = None, headers: bytes = b"", body: bytes | None = None,
                auth: bool = True, version: bytes = b"HTTP/1.1", length: bool = True) -> bytes:
        raise NotImplementedError

    def valid(self) -> str | None:
        """Make one valid authenticated request; None if it succeeded, else what went wrong."""
        raise NotImplementedError

    def acceptable(self, out: Outcome) -> bool:
        """A refusal that is not a 4xx but still a bounded, named one."""
        return False


class Peak:
    """The server's peak RSS during a batch: VmHWM reset before it (Linux clear_refs), and sampled too."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv, self.samples = srv, [srv.rss()]
        self.base = srv.rss()
        self._stop = threading.Event()
        self._reset = True
        try:
            srv.reset_peak()
        except OSError:
            self._reset = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.samples.append(self.srv.rss())
            except (OSError, KeyError):
                return

    def growth(self) -> int:
        self._stop.set()
        self._thread.join(5)
        peak = max(self.samples)
        if self._reset and self.srv.alive():
            peak = max(peak, self.srv.peak_rss())
        return peak - self.base


SAMPLES: dict[str, bytes] = {}  # failure signature -> the first input that showed it (for the assertion message)


def _error_code(out: Outcome) -> str:
    err = _json(out).get("error")
    return str(err.get("code") if isinstance(err, dict) else err)[:40]


def judge(case: Case, out: Outcome, target: Target) -> str | None:
    problem = _judge(case, out, target)
    if problem is not None:
        SAMPLES.setdefault(problem, b"".join(case.parts)[:300])
    return problem


def _judge(case: Case, out: Outcome, target: Target) -> str | None:
    if out.status is None:
        if out.timed_out:
            return f"{case.kind}: neither an answer nor a close within {BOUND:g} s"
        return None  # closed: a refusal
    if case.check is not None:
        return case.check(out)
    if case.allowed is not None and out.status in case.allowed:
        return None
    if case.allowed is None and 400 <= out.status < 500:
        return None
    if target.acceptable(out):
        return None
    return f"{case.kind}: answered {out.status} ({_error_code(out)})"


def run_cases(row: Hostile, target: Target, cases: list[Case]) -> None:
    """Each case on a new connection, a valid request right after it (WORKERS at a time)."""

    def one(case: Case) -> tuple[float, list[str]]:
        out = exchange(target.port, case.parts, ctx=target.ctx, gap=case.gap, timeout=BOUND, body=True,
                       head_request=case.head)
        problems = [p for p in [judge(case, out, target)] if p]
        after = target.valid()
        if after:
            problems.append(f"{case.kind}: the valid request right after it failed ({after})")
        return out.elapsed, problems

    with ThreadPoolExecutor(WORKERS) as pool:
        for elapsed, problems in pool.map(one, cases):
            row.executions += 1
            row.slowest = max(row.slowest, elapsed)
            row.failures.update(problems)


def server_checks(row: Hostile, target: Target, mark: int, peak: Peak, allowance: int = 0) -> tuple[int, int]:
    """After a batch: alive, no traceback logged since `mark`, peak RSS within MEMORY_BOUND + `allowance`.
    Returns (growth, bound)."""
    growth, bound = peak.growth(), MEMORY_BOUND + allowance
    if not target.srv.alive():
        row.failures.add(f"the server exited ({target.srv.proc.returncode})")
    for tb in target.srv.tracebacks(mark):
        row.failures.add(f"traceback in the server log: {tb}")
    if growth > bound:
        row.failures.add(f"server peak RSS {growth / MiB:.0f} MiB over its level before the batch "
                         f"(bound {bound / MiB:.0f} MiB)")
    return growth, bound


def finish(row: Hostile, method: str, memory: tuple[int, int]) -> None:
    growth, bound = memory
    row.method = f"{method}; server peak RSS +{max(0, growth) / MiB:.1f} MiB (bound {bound / MiB:.0f})"
    assert not row.failures, f"{row.target}: " + "; ".join(f"{f} [first input: {SAMPLES.get(f, b'')!r}]"
                                                           for f in sorted(row.failures))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- inputs for any HTTP server ---------------------------------------------------------------------------------


def classic_cases(t: Target, rng: random.Random, path: str) -> list[Case]:
    """Malformed, oversized and smuggling-shaped requests, the same for both servers."""
    host = b"Host: localhost\r\n"
    r = t.request
    cases = [
        Case("garbage bytes", [rng.randbytes(rng.randrange(1, 2048)) + b"\r\n\r\n"]) for _ in range(5)
    ] + [
        Case("empty lines", [b"\r\n\r\n\r\n\r\n"]),
        Case("bare LF line ends", [r(path=path).replace(b"\r\n", b"\n")], allowed=frozenset({200, 206, 400})),
        Case("no HTTP version", [b"GET /\r\n\r\n"]),
        Case("HTTP/0.9 request", [b"GET /\r\n"]),
        Case("HTTP/2.0 version", [r(path=path, version=b"HTTP/2.0")]),
        Case("HTTP/9.9 version", [r(path=path, version=b"HTTP/9.9")]),
        Case("garbled version", [r(path=path, version=b"HTTP/1.x")]),
        Case("HTTP/1.0 request", [r(path=path, version=b"HTTP/1.0")], allowed=frozenset({200, 206})),
        Case("HTTP/2 preface", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
        Case("invalid method", [r("G@T", path)]),
        Case("lowercase method", [r("get", path)]),
        Case("long method", [r("A" * 10_000, path)]),
        Case("unknown method", [r("BREW", path)]),
        Case("CONNECT", [b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n"]),
        Case("TRACE", [r("TRACE", path)]),
        Case("OPTIONS *", [b"OPTIONS * HTTP/1.1\r\n" + host + b"\r\n"]),
        Case("absolute-form target", [r(path="http://evil.example" + path)],
             allowed=frozenset({200, 206, 400, 401, 404})),
        Case("long request line", [r(path="/" + "a" * 100_000)]),
        Case("request line of 8 KiB", [r(path="/" + "a" * 8180)]),
        Case("long header value", [r(path=path, headers=b"X-A: " + b"a" * 100_000 + b"\r\n")]),
        Case("1 MiB header", [r(path=path, headers=b"X-A: " + b"a" * MiB + b"\r\n")]),
        Case("long header name", [r(path=path, headers=b"X" * 20_000 + b": 1\r\n")]),
        Case("10,000 headers", [r(path=path, headers=b"".join(b"X-%d: y\r\n" % i for i in range(10_000)))]),
        Case("200 headers", [r(path=path, headers=b"".join(b"X-%d: y\r\n" % i for i in range(200)))]),
        Case("header without colon", [r(path=path, headers=b"NoColonHere\r\n")]),
        Case("space before colon", [r(path=path, headers=b"X-A : 1\r\n")]),
        Case("obs-fold continuation", [r(path=path, headers=b"X-A: a\r\n  b\r\n")]),
        Case("NUL in a header", [r(path=path, headers=b"X-A: a\x00b\r\n")]),
        Case("CR in a header", [r(path=path, headers=b"X-A: a\rb\r\n")]),
        Case("non-UTF-8 header value", [r(path=path, headers=b"X-A: \xff\xfe\xed\xa0\x80\r\n")],
             allowed=frozenset({200, 206, 400})),
        Case("non-UTF-8 Authorization", [r(path=path, auth=False,
                                            headers=b"Authorization: Bearer \xff\xfe\xed\xa0\x80\r\n")]),
        Case("non-UTF-8 Authorization, other scheme", [r(path=path, auth=False,
                                                         headers=b"Authorization: \xff\xfe x=\"\xc3\"\r\n")]),
        Case("8 KiB Authorization", [r(path=path, auth=False, headers=b"Authorization: Bearer " + b"t" * 8000
                                       + b"\r\n")]),
        Case("two Authorization headers", [r(path=path, headers=b"Authorization: Bearer x\r\n")],
             allowed=frozenset({200, 206, 400, 401})),
        Case("no Host", [r(path=path).replace(b"\r\nHost: localhost", b"\r\nX-No-Host: 1", 1)],
             allowed=frozenset({200, 206, 400, 401})),
        Case("two Hosts", [r(path=path, headers=host)], allowed=frozenset({200, 206, 400, 401})),
        Case("non-UTF-8 Host", [r(path=path).replace(b"Host: localhost", b"Host: h\xc3\xa9\xff", 1)],
             allowed=frozenset({200, 206, 400, 401})),
        Case("Host with a bad port", [r(path=path).replace(b"Host: localhost", b"Host: localhost:99999999", 1)],
             allowed=frozenset({200, 206, 400, 401})),
        Case("two different Content-Lengths", [r("POST", path, b"Content-Length: 7\r\n", b"hello!")]),
        Case("negative Content-Length", [r("POST", path, b"Content-Length: -1\r\n", b"", length=False)]),
        Case("non-numeric Content-Length", [r("POST", path, b"Content-Length: abc\r\n", b"", length=False)]),
        Case("Content-Length overflow", [r("POST", path, b"Content-Length: 99999999999999999999999\r\n", b"",
                                           length=False)]),
        Case("Content-Length with a sign", [r("POST", path, b"Content-Length: +5\r\n", b"hello", length=False)]),
        Case("Content-Length and chunked", [r("POST", path, b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n")]),
        Case("chunked: bad size", [_chunked(r, path, b"zz\r\nhello\r\n0\r\n\r\n")]),
        Case("chunked: huge size", [_chunked(r, path, b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n")]),
        Case("chunked: size of 40 digits", [_chunked(r, path, b"1" + b"0" * 40 + b"\r\nx\r\n0\r\n\r\n")]),
        Case("chunked: 100 KB extension", [_chunked(r, path, b"1;" + b"a" * 100_000 + b"\r\nx\r\n0\r\n\r\n")]),
        Case("chunked: size line of zeros", [_chunked(r, path, b"0" * 10_000 + b"1\r\nx\r\n0\r\n\r\n")]),
        Case("chunked: no CRLF after data", [_chunked(r, path, b"5\r\nhelloXX0\r\n\r\n")]),
        Case("chunked: 10,000 trailer lines", [_chunked(r, path, b"0\r\n" + b"X-T: y\r\n" * 10_000 + b"\r\n")]),
        Case("chunked: 1 MiB trailer", [_chunked(r, path, b"0\r\nX-T: " + b"y" * MiB + b"\r\n\r\n")]),
        Case("chunked: never finished", [_chunked(r, path, b"5\r\nhello\r\n")]),
        Case("Transfer-Encoding: gzip, chunked", [r("POST", path, b"Transfer-Encoding: gzip, chunked\r\n",
                                                    b"0\r\n\r\n", length=False)]),
        Case("Transfer-Encoding: chunked, identity", [r("POST", path, b"Transfer-Encoding: chunked, identity\r\n",
                                                        b"0\r\n\r\n", length=False)]),
        Case("unknown Transfer-Encoding", [r("POST", path, b"Transfer-Encoding: foo\r\n", b"x", length=False)]),
        Case("chunked in HTTP/1.0", [r("POST", path, b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n",
                                       length=False, version=b"HTTP/1.0")]),
        Case("Expect: 100-continue, no body", [r("POST", path, b"Expect: 100-continue\r\nContent-Length: 10\r\n",
                                                 length=False)]),
        Case("Upgrade: websocket", [r(path=path, headers=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")],
             allowed=frozenset({200, 206, 400, 401, 404, 405})),
        Case("Upgrade: h2c", [r(path=path, headers=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n")],
             allowed=frozenset({200, 206, 400, 401, 404})),
        Case("pipelined burst of 50", [r(path=path) * 50], allowed=frozenset({200, 206, 401, 404, 405})),
        Case("incomplete request line", [b"GET " + path.encode()]),
        Case("incomplete headers", [r(path=path, body=b"", length=False).removesuffix(b"\r\n")]),
    ]
    for raw in ("%zz", "%", "%0", "%00.mseal", "%2e%2e/%2e%2e/%2e%2e/etc/passwd", "..%2f..%2f..%2fkeyring.json",
                "%c0%ae%c0%ae/x.mseal", "%ff%fe.mseal", "%ed%a0%80.mseal", "%f4%90%80%80.mseal",
                "..\\..\\x.mseal", "a" * 4000 + ".mseal", "x.mseal?%zz=&&&=%&" + "a=1&" * 500, "x.mseal#frag",
                "/" * 300 + "x.mseal", "./././x.mseal", "%2F%2F%2F", "x.mseal;param", "\u00e9.mseal",
                "CON.mseal", "%252e%252e/x.mseal", "x%20y.mseal", "x%0d%0aSet-Cookie:%20a=b.mseal"):
        base = path.rsplit("/", 1)[0] + "/"
        cases.append(Case(f"percent-encoding {raw[:24]!r}", [r(path=base + raw)], allowed=frozenset({400, 401, 403,
                                                                                                     404, 405})))
    cases.append(Case("raw non-ASCII path", [r(path=path).replace(path.encode(), path.encode() + b"\xff\xfe", 1)]))
    cases.append(Case("raw control bytes in path", [r(path=path).replace(path.encode(), path.encode() + b"\x01\x7f",
                                                                         1)]))
    return cases


def _chunked(r: Callable[..., bytes], path: str, body: bytes) -> bytes:
    return r("POST", path, b"Transfer-Encoding: chunked\r\n", body, length=False)


SPECIAL = [b"\r\n", b"\n", b"\r", b"\x00", b":", b" ", b"%", b"%ff", b"\xff", b"\t", b",", b"-", b"=", b";",
           b"9" * 30, b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"\r\n\r\n", b"HTTP/1.1",
           b"\xc3\xa9", b"\xed\xa0\x80", b"\"", b"\\", b"Range: bytes=0-1\r\n", b"Authorization: x\r\n"]


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """1-4 mutations of a request: flips, special tokens inserted, spans deleted or repeated, lines swapped."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[at:at] = rng.choice(SPECIAL)
        elif kind == 2:
            del data[at:at + rng.randint(1, 16)]
        elif kind == 3:
            data[at:at] = data[at:at + rng.randint(1, 64)] * rng.randint(2, 50)
        elif kind == 4:
            lines = bytes(data).split(b"\r\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\r\n".join(lines))
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


# -- regression tests for what the batches below found ----------------------------------------------------------


def test_range_positions_are_ascii_digits_of_any_length() -> None:
    """A Range of more than 4300 digits was a ValueError from int() (a 500 and a traceback); digits of other
    scripts (which `\\d` and int() take) made a range of what RFC 9110 says is not one."""
    from mediaseal.export.serve import UNSATISFIABLE, parse_range

    assert parse_range("bytes=0-" + "9" * 5000, 100) == (0, 99)
    assert parse_range("bytes=" + "9" * 5000 + "-", 100) == UNSATISFIABLE
    assert parse_range("bytes=-" + "9" * 5000, 100) == (0, 99)
    assert parse_range("bytes=" + "0" * 5000 + "1-2", 100) == (1, 2)
    assert parse_range("bytes=\u0661-\u0662", 100) is None
    assert parse_range(f"bytes=5-{10**18 - 1}", 100) == (5, 99)


def test_a_hawk_host_header_that_is_not_ascii_is_unauthenticated() -> None:
    """Header bytes that are not UTF-8 arrive as lone surrogates; the Hawk MAC string could not encode them
    (a 500 and a traceback for an unauthenticated request)."""
    from mediaseal.keys.lkm.auth import split_host
    from mediaseal.keys.lkm.errors import UnauthenticatedError

    assert split_host("localhost:8443", 443) == ("localhost", 8443)
    assert split_host("[::1]", 443) == ("[::1]", 443)
    for bad in ("h\udcc3\udca9:443", "h\u00e9", "a b", "x\\y"):
        with pytest.raises(UnauthenticatedError, match="malformed"):
            split_host(bad, 443)


def test_a_hawk_content_type_that_is_not_utf8_does_not_match() -> None:
    """A Content-Type of bytes that are not UTF-8 (lone surrogates) under a valid Hawk MAC was a 500 and a
    traceback when the payload hash was computed; now it is hashed as sent and simply does not match."""
    from mediaseal.keys.lkm.auth import hawk_payload_hash

    assert hawk_payload_hash(b"{}", "application/\udcff\udcfejson") != hawk_payload_hash(b"{}", "application/json")


TargetT = TypeVar("TargetT", bound=Target)


def serving(srv: ServerProcess, target: TargetT) -> Iterator[TargetT]:
    """A fixture's body: the target answers a valid request, is used, then stops with exit 0 and no traceback."""
    try:
        assert target.valid() is None
        yield target
    finally:
        code = srv.stop()
    assert code == 0, srv.lines[-20:]
    assert not srv.tracebacks(), srv.tracebacks()


def test_malformed_requests_are_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp logs each request it can't parse with a traceback at ERROR; through http_protocol_logger it
    is one INFO line naming the problem, and anything else keeps its traceback."""
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from mediaseal.plumbing.http import http_protocol_logger

    log = http_protocol_logger("mediaseal.test.http")
    caplog.set_level(logging.DEBUG, "mediaseal.test.http")
    try:
        raise BadHttpMessage("Invalid method encountered:\n\n  b'\\x00'")
    except BadHttpMessage as e:
        log.exception("Error handling request from %s", "127.0.0.1", exc_info=e)
    try:
        raise ZeroDivisionError("a bug")
    except ZeroDivisionError as e:
        log.exception("Unhandled exception", exc_info=e)
    first, second = caplog.records
    assert first.levelno == logging.INFO and first.exc_info is None
    assert first.fields == {"what": "Error handling request from 127.0.0.1", "status": 400,  # type: ignore[attr-defined]
                            "error": "Invalid method encountered:"}
    assert second.levelno == logging.ERROR and second.exc_info is not None


# -- the playback server ----------------------------------------------------------------------------------------


@dataclass
class Playback(Target):
    srv: ServerProcess
    plaintext: bytes
    long_size: int
    ctx: ssl.SSLContext | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, method: str = "GET", path: str | None = None, headers: bytes = b"", body: bytes | None = None,
                auth: bool = True, version: bytes = b"HTTP/1.1", length: bool = True, token: str = TOKEN) -> bytes:
        body = body or b""
        head = f"{method} {path or '/recordings/' + KEY} ".encode() + version + b"\r\nHost: localhost\r\n"
        if auth:
            head += f"Authorization: Bearer {token}\r\n".encode()
        if body and length:
            head += f"Content-Length: {len(body)}\r\n".encode()
        return head + headers + b"\r\n" + body

    def ranged(self, spec: str, extra: bytes = b"") -> bytes:
        return self.request(headers=f"Range: {spec}\r\n".encode("utf-8", "surrogateescape") + extra)

    def valid(self) -> str | None:
        with self.lock:
            a = self.rng.randrange(len(self.plaintext))
            b = min(len(self.plaintext) - 1, a + self.rng.randrange(1, 50_000))
        out = exchange(self.port, [self.ranged(f"bytes={a}-{b}")], timeout=BOUND, body=True)
        if out.status != 206 or out.body != self.plaintext[a:b + 1]:
            return f"{out.describe()}, {len(out.body)} bytes"
        return None

    def media_check(self, kind: str) -> Callable[[Outcome], str | None]:
        """For requests that still mean something: 200 with the whole recording, 206 with exactly the range
        its Content-Range names, 416 naming the size, or another 4xx."""
        size = len(self.plaintext)

        def check(out: Outcome) -> str | None:
            if out.status == 200:
                return None if out.body == self.plaintext else f"{kind}: 200 with other bytes"
            if out.status == 206:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", out.headers.get("content-range", ""))
                if not m or int(m[3]) != size or out.body != self.plaintext[int(m[1]):int(m[2]) + 1]:
                    return f"{kind}: 206 with a wrong Content-Range or bytes"
                return None
            if out.status == 416:
                ok = out.headers.get("content-range") == f"bytes */{size}"
                return None if ok else f"{kind}: 416 without Content-Range bytes */size"
            if out.status is not None and 400 <= out.status < 500:
                return None
            return f"{kind}: answered {out.status} ({_error_code(out)})"

        return check


@pytest.fixture(scope="module")
def playback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Playback]:
    """A keyring, two recordings in a file:// repository (300 KB in 4 KiB chunks; 24 MiB in the default 1 MiB
    chunks, for slow readers), a tokens file, and the server as a process."""
    d = tmp_path_factory.mktemp("hostile-playback")
    ring = Keyring.init(d / "keyring", PASSPHRASE.encode())
    cur = ring.current()
    recipient = codec.Recipient(cur.kid, ring.public_key(cur.kid), cur.alg)
    rng = random.Random(11)
    plaintext = rng.randbytes(300_000 + 123)
    long_size = 24 * MiB + 5
    for key, data, chunk in ((KEY, plaintext, 4096), (LONG_KEY, rng.randbytes(long_size), codec.DEFAULT_CHUNK_SIZE)):
        header, keys = codec.new_package(codec.Metadata(Path(key).stem, "call", "audio/wav"), [recipient], chunk)
        out = io.BytesIO()
        codec.seal(io.BytesIO(data), out, header, keys)
        (d / "repo" / key).parent.mkdir(parents=True, exist_ok=True)
        (d / "repo" / key).write_bytes(out.getvalue())
    tokens = d / "tokens"
    tokens.write_text(f"hostile:{TOKEN}\nreaders:{READER_TOKEN}\n")
    tokens.chmod(0o600)
    srv = ServerProcess.start("playback", {
        "repository": f"file://{d / 'repo'}", "audit_log": d / "audit.jsonl", "tokens_file": tokens,
        "host": "127.0.0.1", "port": free_port(), "keepalive_timeout": KEEPALIVE,
        "keyring": d / "keyring", "passphrase": PASSPHRASE}, d / "run")
    yield from serving(srv, Playback(srv, plaintext, long_size))


def test_playback_a_key_below_a_recording_is_not_found(playback: Playback) -> None:
    """A key with a recording as a directory component (the soak's mutations made one) was a 502 from the
    file source's NotADirectoryError; it is no such recording."""
    out = exchange(playback.port, [playback.request(path=f"/recordings/{KEY}/x.mseal")], timeout=BOUND, body=True)
    assert out.status == 404, f"{out.describe()}: {out.body[:100]!r}"


@pytest.mark.timeout(SOAK_TIMEOUT)
def test_playback_malformed_requests(playback: Playback) -> None:
    t, rng = playback, random.Random(21)
    row = hostile("playback server: malformed requests", "")
    mark, peak = len(t.srv.lines), Peak(t.srv)
    size = len(t.plaintext)
    cases = classic_cases(t, rng, "/recordings/" + KEY)
    n_classic = len(cases)
    specs = ["bytes=0-0", "bytes=-1", "bytes=0-", f"bytes={size - 1}-", f"bytes={size}-", "bytes=-0", "bytes=5-1",
             "bytes=1-2-3", "bytes=,", "bytes= 1 - 2 ", "bytes=0-1,2-3,4-5", "bytes=0-10,5-15", "bytes=-5,0-4",
             "bytes=" + ",".join(["0-0"] * 1500), "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 9000, 13)),
             "bytes=0-" + "9" * 5000, "bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 5000,
             "bytes=" + "0" * 5000 + "1-2",
             "bytes=\u0661-\u0662", "items=0-1", "BYTES=0-1", "bytes=0x10-0x20", "bytes=1e3-2e3", "bytes=-", "bytes",
             "bytes=\x00-1", "bytes=18446744073709551616-", f"bytes={2**63}-{2**64}", "bytes=-18446744073709551617",
             "bytes=0-1;q=1", "bytes=\t0-1", "bytes=0-1,", ",,,,bytes=0-1", "bytes=" + "-" * 3000, "=0-1",
             "bytes=+1-2", "bytes=1--2", "bytes=99999999999999999999-1"]
    specs += [f"bytes={a}-{a + rng.randrange(0, 9000)}" for a in (rng.randrange(size + 100) for _ in range(20))]
    cases += [Case(f"Range {s[:20]!r}", [t.ranged(s)], check=t.media_check(f"Range {s[:20]!r}")) for s in specs]
    cases += [Case("If-Range with Range", [t.ranged("bytes=0-99", b"If-Range: " + v + b"\r\n")],
                   check=t.media_check("If-Range")) for v in (b'"x"', b"", b"W/\"a\"", b"\xff" * 40,
                                                              b"Sat, 01 Jan 2000 00:00:00 GMT")]
    cases.append(Case("HEAD with an absurd Range", [t.request("HEAD", headers=b"Range: bytes=9-1,-\r\n")],
                      allowed=frozenset({200, 206, 416}), head=True))
    cases.append(Case("GET with a 2 MiB body", [t.request(body=b"x" * (2 * MiB))], check=t.media_check("GET body")))
    cases.append(Case("GET with a 2 MiB chunked body", [t.request(headers=b"Transfer-Encoding: chunked\r\n",
                                                                  body=b"200000\r\n" + b"x" * (2 * MiB) +
                                                                  b"\r\n0\r\n\r\n", length=False)],
                      check=t.media_check("GET chunked body")))
    n_range = len(cases) - n_classic

    def mutated(raw: bytes) -> Case:
        bad = mutate(raw, rng)
        check = t.media_check("mutated request")

        def judged(out: Outcome) -> str | None:
            if out.status is not None and 200 <= out.status < 300 and TOKEN.encode() not in bad:
                return f"mutated request: {out.status} without the token"
            if out.status in (200, 206, 416):
                return check(out)
            if 400 <= (out.status or 400) < 500:
                return None
            return f"mutated request: answered {out.status} ({_error_code(out)})"

        return Case("mutated request", [bad], check=judged, head=bad.startswith(b"HEAD"))

    n_mut = sized(150, 4000)
    templates = [t.ranged("bytes=100-5000"), t.request(), t.ranged("bytes=-100", b"If-Range: \"x\"\r\n")]
    cases += [mutated(rng.choice(templates)) for _ in range(n_mut)]
    run_cases(row, t, cases)
    memory = server_checks(row, t, mark, peak)
    finish(row, f"raw sockets: {n_classic} malformed, oversized and smuggling-shaped requests, {n_range} absurd, "
                f"overlapping and malformed Range headers, {n_mut} mutated valid requests; a valid ranged GET "
                f"after each", memory)


def wait_all_closed(socks: list[socket.socket], timeout: float) -> list[float | None]:
    """Seconds until the server closed each socket (dropping what it sends), None for those still open."""
    t0 = time.monotonic()
    closed: list[float | None] = [None] * len(socks)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    try:
        while sel.get_map() and time.monotonic() - t0 < timeout:
            for key, _ in sel.select(0.1):
                s, i = key.fileobj, key.data
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError):
                    continue
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    closed[i] = time.monotonic() - t0
                    sel.unregister(s)
    finally:
        sel.close()
    return closed


def slowloris(port: int, first: bytes, ctx: ssl.SSLContext | None, every: float, limit: float) -> float | None:
    """Send `first`, then one more header byte every `every` seconds (never finishing the request) until the
    server closes the connection: the seconds that took, or None if it was still open after `limit`."""
    t0 = time.monotonic()
    try:
        sock = connect(port, ctx)
    except (OSError, ssl.SSLError):
        return 0.0
    drip = b"X-Slow-" + b"a" * 100_000
    with sock:
        try:
            sock.sendall(first)
            for b in drip:
                if time.monotonic() - t0 > limit:
                    return None
                sock.settimeout(every)
                try:
                    if sock.recv(65536) == b"":
                        return time.monotonic() - t0
                    continue  # an answer (a 4xx) came: keep reading until it closes
                except TimeoutError:
                    pass
                sock.sendall(bytes([b]))
        except (ConnectionError, ssl.SSLError, OSError):
            return time.monotonic() - t0
    return None


class ValidLoop:
    """Valid requests one after another while slow clients hold connections: each must succeed, promptly."""

    def __init__(self, target: Target, row: Hostile) -> None:
        self.target, self.row, self.count, self.slowest = target, row, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            problem = self.target.valid()
            took = time.monotonic() - t0
            self.count += 1
            self.slowest = max(self.slowest, took)
            if problem:
                self.row.failures.add(f"a valid request during slow clients failed ({problem})")
            elif took > 2.0:
                self.row.failures.add("a valid request during slow clients took over 2 s")
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(BOUND + 10)
        assert self.count > 0


@pytest.mark.timeout(SOAK_TIMEOUT)
def test_playback_slow_clients(playback: Playback) -> None:
    """Slowloris (a header byte every 0.2 s), idle connections, a request line that never ends, a body that
    trickles in, and readers that stop reading a 24 MiB answer: valid requests go on being served, every
    slow connection is closed within the keep-alive bound, and the stalled answers cost bounded memory."""
    t = playback
    row = hostile("playback server: slow clients", "")
    mark, peak = len(t.srv.lines), Peak(t.srv)
    loop = ValidLoop(t, row)
    n_loris, n_idle, n_readers = sized(12, 100), sized(200, 1000), sized(10, 50)
    limit = KEEPALIVE + 5.0
    with ThreadPoolExecutor(n_loris + 4) as pool:
        loris = [pool.submit(slowloris, t.port, f"GET /recordings/{KEY} HTTP/1.1\r\nHost: x\r\n".encode(), None,
                             0.2, limit) for _ in range(n_loris)]
        partial = pool.submit(slowloris, t.port, b"GET /recordings/" + b"a" * 50, None, 0.2, limit)
        trickle = pool.submit(exchange, t.port, [t.request(headers=b"Content-Length: 40\r\n")] + [b"x"] * 40,
                              gap=0.1, timeout=BOUND, body=True)
        idle = [socket.create_connection(("127.0.0.1", t.port)) for _ in range(n_idle)]
        readers, heads = [], []
        for _ in range(n_readers):  # ask for the whole long recording, read only the start of the answer
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            s.connect(("127.0.0.1", t.port))
            s.sendall(t.request(path=f"/recordings/{LONG_KEY}", token=READER_TOKEN))
            readers.append(s)
            heads.append(s.recv(4096))  # its answer has started (or was refused) before the next asks
        idle_closed = wait_all_closed(idle, limit)
        stalled_rss = t.srv.rss()
        for s in idle + readers:
            s.close()
        times = [f.result() for f in [*loris, partial]]
        trickled = trickle.result()
    loop.stop()
    # One principal streams at most PER_READER answers at once (issue 15, finding 13): the rest are refused.
    for i, h in enumerate(heads):
        want = b"HTTP/1.1 200" if i < PER_READER else b"HTTP/1.1 429"
        if not h.startswith(want):
            row.failures.add(f"slow reader {i}: answered {h[:12]!r}, not {want!r}")
    for took in times + idle_closed:
        if took is None:
            row.failures.add(f"a slow or idle connection was still open after {limit:g} s")
        else:
            row.slowest = max(row.slowest, took)
    if trickled.status not in (200, 206) or trickled.body != t.plaintext:
        row.failures.add(f"a GET whose body trickles in: {trickled.describe()}")
    row.executions += len(times) + len(idle_closed) + len(readers) + 1
    memory = server_checks(row, t, mark, peak, n_readers * PER_STALLED_READER
                           + (n_loris + n_idle + 2) * PER_CONNECTION // 8)  # plain HTTP: no TLS buffer
    finish(row, f"raw sockets: {n_loris} slowloris and 1 endless request line (a byte per 0.2 s), {n_idle} idle "
                f"connections, a trickled body, {n_readers} readers stalled on a 24 MiB answer ({PER_READER} streamed, "
                f"the rest 429; server RSS then "
                f"{stalled_rss / MiB:.0f} MiB), {loop.count} valid GETs meanwhile (slowest {loop.slowest:.2f} s); "
                f"keep-alive bound {KEEPALIVE:g} s", memory)


# -- the Local Key Manager --------------------------------------------------------------------------------------


@dataclass
class LKM(Target):
    srv: ServerProcess
    ctx: ssl.SSLContext
    wrap: codec.Wrap
    dek: bytes
    genesys_kid: str
    genesys_wrapped: bytes
    genesys_dek: bytes
    header: bytes  # a real package header with a wrap for this service's current key (for rewrap)
    admin_kid: str = "A" * 43  # a well-formed kid of no key here (state changes to it change nothing)

    def unwrap_body(self) -> bytes:
        w = self.wrap
        return json.dumps({"kid": w.kid, "alg": w.alg, "wrapped": base64.b64encode(w.wrapped).decode()}).encode()

    def request(self, method: str = "POST", path: str | None = None, headers: bytes = b"", body: bytes | None = None,
                auth: bool = True, version: bytes = b"HTTP/1.1", length: bool = True, cred: str = "exp-a") -> bytes:
        path = path or "/v1/unwrap"
        body = self.unwrap_body() if body is None else body
        head = f"{method} {path} ".encode() + version + f"\r\nHost: localhost:{self.port}\r\n".encode()
        if auth:
            signed = sign_request(cred, ls.secret(cred).encode(), method.upper(), path, body)
            head += f"Authorization: {signed}\r\n".encode()
        head += b"Content-Type: application/json\r\n"
        if length:
            head += f"Content-Length: {len(body)}\r\n".encode()
        return head + headers + b"\r\n" + body

    def hawk(self, body: bytes | None = None, path: str = "/key-management/v1/decrypt") -> bytes:
        if body is None:
            body = json.dumps({"keypairId": keypair_id(self.genesys_kid), "decryptType": None,
                               "body": base64.b64encode(self.genesys_wrapped).decode()}).encode()
        auth = hawk_header("gh", ls.secret("gh").encode(), "POST", path, "localhost", self.port, payload=body,
                           content_type="application/json")
        return (f"POST {path} HTTP/1.1\r\nHost: localhost:{self.port}\r\nAuthorization: {auth}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def valid(self) -> str | None:
        out = exchange(self.port, [self.request()], ctx=self.ctx, timeout=BOUND, body=True)
        for _ in range(3):  # the rate limits (per client, per address), which a batch may reach: wait as told
            if out.status != 429:
                break
            time.sleep(float(out.headers.get("retry-after", "1")))
            out = exchange(self.port, [self.request()], ctx=self.ctx, timeout=BOUND, body=True)
        if out.status != 200 or _json(out).get("dek") != base64.b64encode(self.dek).decode():
            return f"{out.describe()}: {out.body[:80]!r}"
        return None

    def acceptable(self, out: Outcome) -> bool:
        """Its rate limits (429) and `overloaded` (503) are named, bounded refusals too."""
        code = _json(out).get("error", {})
        code = code.get("code") if isinstance(code, dict) else None
        return (out.status, code) in ((429, "rate_limited"), (503, "overloaded"))

    def dek_check(self, kind: str, bad: bytes) -> Callable[[Outcome], str | None]:
        """A mutated request: a 4xx (or overloaded), or a 200 only with the right DEK (or from a public route)."""

        def check(out: Outcome) -> str | None:
            if (out.status is not None and 400 <= out.status < 500) or self.acceptable(out):
                return None
            if out.status == 200:
                doc = _json(out)
                if doc.get("dek") == base64.b64encode(self.dek).decode():
                    return None
                if doc.get("body") == base64.b64encode(self.genesys_dek).decode():
                    return None
                if re.match(rb"GET /v1/(health|keyset)[ ?]", bad) or bad.startswith(b"OPTIONS "):
                    return None
                return f"{kind}: 200 with something else ({out.body[:60]!r})"
            return f"{kind}: answered {out.status} ({_error_code(out)})"

        return check


def _json(out: Outcome) -> dict[str, object]:
    try:
        doc = json.loads(out.body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


@pytest.fixture(scope="module")
def lkm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LKM]:
    """Keyrings (its own and a Genesys one), a PKI, clients (unwrap over HMAC, admin, Hawk), and the service
    as a process, with the command's defaults but for the connection timeouts."""
    d = tmp_path_factory.mktemp("hostile-lkm")
    ring = Keyring.init(d / "keyring", ls.PASSPHRASE)
    genesys = Keyring.init(d / "genesys", ls.PASSPHRASE, alg=codec.RSA_OAEP)
    pki = ls.make_pki(d / "pki")
    clients = ls.write_clients(d / "clients.json", [
        {"name": "export-1", "roles": ["unwrap"], "credentials": [{"id": "exp-a", "secret": ls.secret("exp-a")}]},
        {"name": "admin-1", "roles": ["admin"], "credentials": [{"id": "adm", "secret": ls.secret("adm")}]},
        {"name": "genesys", "roles": ["unwrap"],
         "credentials": [{"id": "gh", "secret": ls.secret("gh"), "scheme": "hawk"}]}])
    srv = ServerProcess.start("lkm", {
        "keyring": d / "keyring", "clients": clients, "audit_log": d / "audit.jsonl", "tls_cert": pki.server_cert,
        "tls_key": pki.server_key, "passphrase": ls.PASSPHRASE.decode(), "host": "127.0.0.1", "port": 0,
        "genesys_keyring": d / "genesys", "rotation_check": 0, "keepalive_timeout": KEEPALIVE,
        "body_timeout": BODY_TIMEOUT, "handshake_timeout": HANDSHAKE}, d / "run")
    cur, gcur = ring.current(), genesys.current()
    dek, gdek = os.urandom(32), os.urandom(32)
    wrap = codec.wrap_dek(dek, ring.public_key(cur.kid), cur.kid, cur.alg)
    gwrap = codec.wrap_dek(gdek, genesys.public_key(gcur.kid), gcur.kid, codec.RSA_OAEP)
    header, _ = codec.new_package(codec.Metadata("hostile-lkm"), [codec.Recipient(cur.kid, ring.public_key(cur.kid),
                                                                                  cur.alg)], 4096)
    yield from serving(srv, LKM(srv, ls.tls_context(pki), wrap, dek, gcur.kid, gwrap.wrapped, gdek, header.encode()))


def random_json(rng: random.Random, depth: int = 0) -> object:
    members = ["kid", "alg", "wrapped", "recording_id", "items", "header", "wraps", "to", "keypairId", "body",
               "decryptType", "state", "ttl_seconds", "pending", "x", "", "\u0000", "\ud800"]
    kind = rng.randrange(12 if depth < 6 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**63, -(2**64), 10**300, 1.5, -0.0, 1e308])
    if kind in (3, 4, 5):
        return rng.choice(["", "A" * 43, "RSA-OAEP-256", "RSA-OAEP", "pkcs1", "active", "retired", "../../x",
                           "\u202e", "\ud800\udc00", "=" * 10, "AAAA", base64.b64encode(rng.randbytes(384)).decode(),
                           "x" * rng.randrange(5000), str(uuid.uuid4()), "\ud800"])
    if kind in (6, 7):
        return rng.choice(["a b", "%00", "\\u0000", "\x00", "\ufeff", " " * 100])
    if kind in (8, 9):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4 if depth else 300))]
    return {rng.choice(members): random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


def hostile_bodies(t: LKM, rng: random.Random, n: int) -> list[Case]:
    """Validly signed requests whose bodies are not: bad JSON, wrong types, bad base64, absurd sizes, every
    route that reads a body, and the same through the Hawk shim."""
    w = t.wrap
    fixed = [b"", b"{", b"}", b"[]", b"null", b"\"x\"", b"1", b"{\"kid\":}", b"{\"kid\":\"\xff\"}", b"\xef\xbb\xbf{}",
             b"{\"a\":NaN}", b"{\"a\":Infinity}", b"{\"a\":-Infinity}", b"{\"a\":1e999999}", b"{\"a\":" + b"9" * 5000
             + b"}", b"{\"kid\":\"\\ud800\"}", b"[" * 100_000, b"{\"a\":" * 20_000 + b"1" + b"}" * 20_000,
             b"{\"kid\":1,\"kid\":2}", b"\x00" * 100, b"{\"items\":[" + b"{}," * 1000 + b"{}]}",
             json.dumps({"items": [{"kid": w.kid, "alg": w.alg, "wrapped": "AA=="}] * 257}).encode(),
             json.dumps({"kid": w.kid, "alg": w.alg, "wrapped": "A" * 2000}).encode(),
             json.dumps({"kid": w.kid, "alg": w.alg, "wrapped": "not base64!"}).encode(),
             json.dumps({"kid": w.kid, "alg": w.alg, "wrapped": base64.b64encode(os.urandom(384)).decode()}).encode(),
             json.dumps({"kid": w.kid, "alg": "RSA1_5", "wrapped": "AAAA"}).encode(),
             json.dumps({"kid": w.kid, "alg": w.alg, "wrapped": "AAAA", "recording_id": "../" * 50}).encode(),
             json.dumps({"header": base64.b64encode(os.urandom(3000)).decode()}).encode(),
             json.dumps({"header": "A" * 100_000}).encode(),
             json.dumps({"wraps": [{"kid": w.kid, "alg": w.alg, "wrapped": "AAAA"}] * 17}).encode(),
             json.dumps({"wraps": [], "to": "x"}).encode(), json.dumps({"header": "", "wraps": []}).encode()]
    routes = ["/v1/unwrap", "/v1/unwrap-batch", "/v1/rewrap"]
    cases = [Case(f"signed body {b[:16]!r} to {p}", [t.request(path=p, body=b)], allowed=_LKM_REFUSALS)
             for b in fixed for p in routes]
    for _ in range(n // 4):  # rewrap with hostile package headers: mutations of a real one, and random bytes
        raw = mutate(t.header, rng) if rng.random() < 0.8 else rng.randbytes(rng.randrange(2000))
        cases.append(Case("rewrap of a mutated header", [t.request(path="/v1/rewrap", body=json.dumps(
            {"header": base64.b64encode(raw).decode()}).encode())], allowed=_LKM_REFUSALS | {200}))
    for _ in range(n):
        route = rng.choice([*routes, "/v1/keys/" + t.admin_kid + "/state", "hawk"])
        body = json.dumps(random_json(rng), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        if rng.random() < 0.2:
            body = mutate(body, rng)
        body = body[:300_000]  # over max-body only sometimes (test_lkm_oversized_bodies is about that)
        if route == "hawk":
            cases.append(Case("Hawk-signed random body", [t.hawk(body)], allowed=_LKM_REFUSALS))
        else:
            cred = "adm" if "/state" in route else "exp-a"
            cases.append(Case(f"signed random body to {route.split('/')[2]}",
                              [t.request(path=route, body=body, cred=cred)], allowed=_LKM_REFUSALS))
    for b in (b"{}", b"{\"keypairId\":[],\"body\":1}", b"{\"keypairId\":\"" + b"a" * 100 + b"\",\"body\":\"x\"}",
              json.dumps({"keypairId": keypair_id(t.genesys_kid), "body": "AAAA", "decryptType": "pkcs1"}).encode(),
              json.dumps({"keypairId": str(uuid.uuid4()), "body": "AAAA"}).encode(),
              json.dumps({"keypairId": keypair_id(t.genesys_kid), "body": "\r\n" * 1000}).encode()):
        cases.append(Case(f"Hawk-signed body {b[:16]!r}", [t.hawk(b)], allowed=_LKM_REFUSALS))
    return cases


_LKM_REFUSALS = frozenset({400, 401, 403, 404, 405, 408, 409, 413, 422})


@pytest.mark.timeout(SOAK_TIMEOUT)
def test_lkm_malformed_requests(lkm: LKM) -> None:
    t, rng = lkm, random.Random(31)
    row = hostile("LKM: malformed requests", "")
    mark, peak = len(t.srv.lines), Peak(t.srv)
    cases = classic_cases(t, rng, "/v1/unwrap")
    cases.append(Case("Hawk with a non-UTF-8 Host", [t.hawk().replace(b"Host: localhost", b"Host: h\xc3\xa9\xff", 1)],
                      allowed=frozenset({400, 401})))
    cases.append(Case("Hawk with a non-UTF-8 Content-Type", [t.hawk().replace(
        b"Content-Type: application/json", b"Content-Type: application/\xff\xfejson", 1)],
                      allowed=frozenset({400, 401})))
    cases.append(Case("Hawk with a bad port", [t.hawk().replace(b"Host: localhost:", b"Host: localhost:9", 1)],
                      allowed=frozenset({400, 401})))
    n_classic = len(cases) + 1
    n_bodies = sized(150, 2000)
    cases += hostile_bodies(t, rng, n_bodies)
    n_signed = len(cases) - n_classic

    def mutated(kind: str, raw: bytes) -> Case:
        bad = mutate(raw, rng)
        return Case(kind, [bad], check=t.dek_check(kind, bad))

    n_mut = sized(150, 2000)
    cases += [mutated("mutated signed request", t.request()) for _ in range(n_mut // 2)]
    cases += [mutated("mutated Hawk request", t.hawk()) for _ in range(n_mut - n_mut // 2)]
    for raw in ('MediaSeal-HMAC-SHA256 id="exp-a"', "MediaSeal-HMAC-SHA256 " + "x=\"1\", " * 600, "Hawk",
                'Hawk id="gh", ts="1", nonce="n", mac="m", mac="m"', 'Hawk id="gh", ts="99999999999999", nonce="n", '
                'mac="m"', "MediaSeal-HMAC-SHA256 id=\"\u00e9\"", "Bearer x", "MediaSeal-HMAC-SHA256 " + "=" * 4000):
        for path in ("/v1/unwrap", "/key-management/v1/decrypt"):
            enc = raw.encode("utf-8")
            cases.append(Case(f"bad Authorization {raw[:20]!r}", [t.request(path=path, auth=False,
                                                                             headers=b"Authorization: " + enc
                                                                             + b"\r\n")],
                              allowed=frozenset({400, 401})))
    out = exchange(t.port, [t.request()], ctx=None, timeout=BOUND)  # plain HTTP to the TLS port
    row.executions += 1
    row.slowest = max(row.slowest, out.elapsed)
    if out.timed_out or (out.status is not None and not 400 <= out.status < 500):
        row.failures.add(f"plain HTTP to the TLS port: {out.describe()}")
    run_cases(row, t, cases)
    memory = server_checks(row, t, mark, peak)
    finish(row, f"raw TLS sockets: {n_classic} malformed, oversized and smuggling-shaped requests, {n_signed} "
                f"validly signed (HMAC, Hawk) requests with hostile JSON bodies on every body-reading route, "
                f"{n_mut} mutated signed requests, 16 malformed Authorization headers; a valid unwrap after each",
           memory)


@pytest.mark.timeout(SOAK_TIMEOUT)
def test_lkm_oversized_bodies(lkm: LKM) -> None:
    t = lkm
    row = hostile("LKM: oversized bodies", "")
    mark, peak = len(t.srv.lines), Peak(t.srv)
    max_body = 256 * 1024
    big = b"{\"kid\":\"" + b"a" * (10 * MiB) + b"\"}"
    r = t.request
    too_large = frozenset({400, 413})
    cases = [
        Case("declared over max-body, no body", [r(body=b"", headers=f"Content-Length: {max_body + 1}\r\n".encode(),
                                                   length=False)], allowed=too_large),
        Case("declared 10 MiB and sent", [r(body=big)], allowed=too_large),
        Case("declared 2^63-1", [r(body=b"{}", length=False, headers=f"Content-Length: {2**63 - 1}\r\n".encode())],
             allowed=too_large),
        Case("declared 2^64", [r(body=b"{}", length=False, headers=f"Content-Length: {2**64}\r\n".encode())],
             allowed=too_large),
        Case("unsigned 10 MiB", [r(body=big, auth=False)], allowed=too_large),
        Case("10 MiB to a public route", [r("GET", "/v1/health", body=big, auth=False)],
             allowed=frozenset({200, 400, 413})),
        Case("chunked 10 MiB", [r(body=b"a00000\r\n" + big[:10 * MiB] + b"\r\n0\r\n\r\n", length=False,
                                  headers=b"Transfer-Encoding: chunked\r\n")], allowed=frozenset({400, 401, 413})),
        Case("chunked 1 MiB in 1-byte chunks", [r(body=b"1\r\na\r\n" * (MiB // 8) + b"0\r\n\r\n", length=False,
                                                  headers=b"Transfer-Encoding: chunked\r\n")],
             allowed=frozenset({400, 401, 413})),
        Case("chunked, size over max-body", [r(body=b"%x\r\n" % (max_body + 1) + b"a" * (max_body + 1)
                                               + b"\r\n0\r\n\r\n", length=False,
                                               headers=b"Transfer-Encoding: chunked\r\n")],
             allowed=frozenset({400, 401, 413})),
        Case("body longer than declared", [r(body=b"{}", length=False, headers=b"Content-Length: 2\r\n")
                                           + b"x" * MiB], allowed=frozenset({400, 401})),
        Case("signed body at max-body", [r(body=b"{\"kid\":\"" + b"a" * (max_body - 10) + b"\"}")],
             allowed=frozenset({400, 413})),
        Case("signed batch of 10,000 items", [r(path="/v1/unwrap-batch", body=json.dumps({"items": [
            {"kid": t.wrap.kid, "alg": t.wrap.alg, "wrapped": "AAAA"}] * 10_000}).encode())], allowed=too_large),
        Case("signed 250 KB header to rewrap", [r(path="/v1/rewrap", body=json.dumps(
            {"header": "A" * (250 * 1024)}).encode())], allowed=too_large),
        Case("Hawk-signed 10 MiB", [t.hawk(big)], allowed=frozenset({400, 401, 413})),
        Case("10 MiB request line", [b"POST /v1/unwrap?" + b"a" * (10 * MiB) + b" HTTP/1.1\r\n\r\n"]),
        Case("10 MiB of headers", [r(headers=b"".join(b"X-%d: " % i + b"a" * 8000 + b"\r\n" for i in range(1300)))]),
        Case("100 pipelined over-max-body requests", [r(body=b"", length=False,
                                                        headers=f"Content-Length: {max_body + 1}\r\n".encode())
                                                      * 100], allowed=too_large),
    ]
    n_fixed = len(cases)
    rng = random.Random(41)
    n_rand = sized(12, 200)
    for _ in range(n_rand):  # random sizes around the limit, declared honestly or not
        size = rng.choice([max_body - 1, max_body, max_body + 1, rng.randrange(max_body, 4 * MiB)])
        body = b"{\"kid\":\"" + b"a" * size + b"\"}"
        declared = rng.choice([len(body), len(body) // 2, len(body) + 10, max_body + 1])
        parts = [r(body=body, length=False, headers=f"Content-Length: {declared}\r\n".encode())]
        cases.append(Case("random size around max-body", parts, allowed=frozenset({400, 401, 408, 413})))
    run_cases(row, t, cases)
    memory = server_checks(row, t, mark, peak)
    finish(row, f"raw TLS sockets: {n_fixed} oversized requests (declared, sent, chunked, pipelined, signed and "
                f"unsigned, max-body {max_body // 1024} KiB) and {n_rand} random sizes around the limit; a valid "
                f"unwrap after each", memory)


@pytest.mark.timeout(SOAK_TIMEOUT)
def test_lkm_slow_clients(lkm: LKM) -> None:
    """A TCP connection that never starts TLS, a ClientHello that stops halfway, TLS then nothing, a header
    byte every 0.2 s, a body that trickles in or never comes, and many idle connections: valid unwraps go on
    being served, and each slow connection is closed (or refused with 408) within its timeout."""
    t = lkm
    row = hostile("LKM: slow clients", "")
    mark, peak = len(t.srv.lines), Peak(t.srv)
    loop = ValidLoop(t, row)
    n_loris, n_idle = sized(8, 60), sized(100, 800)
    limit = max(KEEPALIVE, HANDSHAKE, BODY_TIMEOUT) + 5.0
    signed = t.request()
    head, _, body = signed.partition(b"\r\n\r\n")
    with ThreadPoolExecutor(n_loris + 6) as pool:
        loris = [pool.submit(slowloris, t.port, b"POST /v1/unwrap HTTP/1.1\r\n", t.ctx, 0.2, limit)
                 for _ in range(n_loris)]
        trickle = pool.submit(exchange, t.port, [head + b"\r\n\r\n"] + [bytes([c]) for c in body], ctx=t.ctx,
                              gap=(BODY_TIMEOUT + 1) / len(body), timeout=BOUND, body=True)
        no_body = pool.submit(exchange, t.port, [head + b"\r\n\r\n"], ctx=t.ctx, timeout=BOUND, body=True)
        tcp_idle = [socket.create_connection(("127.0.0.1", t.port)) for _ in range(n_idle)]
        half_hello = [socket.create_connection(("127.0.0.1", t.port)) for _ in range(4)]
        for s in half_hello:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))  # a ClientHello, cut short
        tls_idle = [connect(t.port, t.ctx) for _ in range(sized(20, 200))]
        raw_closed = wait_all_closed(tcp_idle + half_hello, limit)
        tls_closed = [_wait_tls_closed(s, limit) for s in tls_idle]
        times = [f.result() for f in loris]
        trickled, unsent = trickle.result(), no_body.result()
    loop.stop()
    for took in times + raw_closed + tls_closed:
        if took is None:
            row.failures.add(f"a slow or idle connection was still open after {limit:g} s")
        else:
            row.slowest = max(row.slowest, took)
    for what, out in (("a body that trickles in", trickled), ("a body that never comes", unsent)):
        row.slowest = max(row.slowest, out.elapsed)
        if not (out.status == 408 or (out.status is None and out.closed)):
            row.failures.add(f"{what}: {out.describe()}")
        elif out.elapsed > BODY_TIMEOUT + 5:
            row.failures.add(f"{what}: refused only after {out.elapsed:.0f} s")
    row.executions += len(times) + len(raw_closed) + len(tls_closed) + 2
    memory = server_checks(row, t, mark, peak, (n_loris + n_idle + 4 + len(tls_idle) + 2) * PER_CONNECTION)
    finish(row, f"raw sockets: {n_loris} TLS slowloris (a byte per 0.2 s), {n_idle} idle TCP connections, 4 "
                f"ClientHellos cut short, {len(tls_idle)} idle TLS connections, a trickled and a missing body, "
                f"{loop.count} valid unwraps meanwhile (slowest {loop.slowest:.2f} s); timeouts: handshake "
                f"{HANDSHAKE:g} s, keep-alive {KEEPALIVE:g} s, body {BODY_TIMEOUT:g} s", memory)


def _wait_tls_closed(sock: ssl.SSLSocket, limit: float) -> float | None:
    t0 = time.monotonic()
    with sock:
        sock.settimeout(limit)
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return None
        except (ConnectionError, ssl.SSLError, OSError):
            pass
    return time.monotonic() - t0
