"""Test support for S3: moto's ThreadedMotoServer on loopback, and a fault-injecting HTTP proxy.

    server = MotoServer.start()                    # http://127.0.0.1:<random port>
    make_bucket(server.url, "bucket")
    proxy = FaultProxy(server.host, server.port).start()
    repo = S3Repository("bucket", "", S3Options(endpoint_url=proxy.url))

    proxy.fail(503, times=2, when=lambda r: r.op == "UploadPart")   # two 503s, then pass
    proxy.reset(after=1000, when=lambda r: r.op == "UploadPart" and r.part == 3)   # RST mid-body
    proxy.flip(when=lambda r: r.op == "PutObject", times=1)          # one flipped body byte
    proxy.hang()                                                     # read requests, never answer
    proxy.hang(read_body=False, when=lambda r: r.op == "UploadPart")  # stop reading mid-body
    proxy.refuse(); ...; proxy.listen()                              # connection refused, then back
    proxy.count("UploadPart"), proxy.seen                            # what went by

The proxy speaks just enough HTTP/1.1 (Content-Length and chunked bodies, keep-alive, Expect:
100-continue) to sit between botocore and moto. It runs its own asyncio loop in a thread, so tests on
any loop (or none) can use it. Rules are checked in the order added, against the request head
(method, path, query, headers) before the body is read; `times` counts matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from support.waits import CEILING

TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
# Removed for the test session so nothing real is reached or used.
SCRUBBED_ENV = (
    "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KMS", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
)


@contextlib.contextmanager
def aws_test_env() -> Iterator[None]:
    """Fake credentials and region for the duration; real ones (and proxies) are hidden.

    The fake credentials are distinctive (not "testing"): the suite-wide secrets audit looks for them in
    every log and output (tests/secrets_audit.py), which only means something if they can't occur by chance.
    moto accepts any credentials."""
    saved = {k: os.environ.get(k) for k in (*TEST_ENV, *SCRUBBED_ENV)}
    try:
        for k in SCRUBBED_ENV:
            os.environ.pop(k, None)
        os.environ.update(TEST_ENV)
        os.environ.update({"AWS_ACCESS_KEY_ID": "AKIAMEDIASEALTEST042",
                           "AWS_SECRET_ACCESS_KEY": "msTest/Secret+Key/0nlyForMoto/9f3Kq2Lx7Vw"})
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- moto --------------------------------------------------------------------------------------------


@dataclass
class MotoServer:
    server: Any
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(cls) -> MotoServer:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return cls(server, host, port)

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def moto_running() -> Iterator[MotoServer]:
    """moto on loopback, inside aws_test_env(), for the duration (the suite's session fixture and the
    S3 benchmarks' fixture)."""
    with aws_test_env():
        server = MotoServer.start()
        try:
            yield server
        finally:
            server.stop()


def unique_bucket(tag: str = "b") -> str:
    return f"ms-{tag}-{uuid.uuid4().hex[:12]}"


def boto3_client(endpoint_url: str, service: str = "s3", *, validate: bool = True) -> Any:
    """A plain (synchronous) boto3 client against moto, for setting up and inspecting. validate=False:
    GetObject does not check the stored checksum against the bytes (to look at corrupted objects)."""
    import boto3
    from botocore.config import Config

    config = Config(response_checksum_validation="when_supported" if validate else "when_required")
    return boto3.client(service, endpoint_url=endpoint_url, region_name="us-east-1", config=config,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def make_bucket(endpoint_url: str, name: str | None = None) -> str:
    name = name or unique_bucket()
    boto3_client(endpoint_url).create_bucket(Bucket=name)
    return name


def make_kms_key(endpoint_url: str) -> str:
    return str(boto3_client(endpoint_url, "kms").create_key(Description="mediaseal test")["KeyMetadata"]["Arn"])


# -- the fault proxy -----------------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the proxy saw it (the head; `body_len` once read) and what it did with it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    t: float = field(default_factory=time.monotonic)
    action: str = "pass"
    body_len: int = 0

    @property
    def op(self) -> str:
        """The S3 operation, as far as the proxy can tell from method, path and query."""
        q, m = self.query, self.method
        key = self.path.strip("/").count("/") >= 1
        if m == "PUT" and "partNumber" in q and "uploadId" in q:
            return "UploadPart"
        if m == "PUT":
            return "PutObject" if key else "CreateBucket"
        if m == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if m == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if m == "GET" and "uploadId" in q:
            return "ListParts"
        if m == "GET" and "uploads" in q:
            return "ListMultipartUploads"
        if m == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        if m == "HEAD":
            return "HeadObject" if key else "HeadBucket"
        if m == "GET":
            return "GetObject" if key else "ListObjects"
        return f"{m} {self.path}"

    @property
    def part(self) -> int | None:
        return int(self.query["partNumber"]) if "partNumber" in self.query else None


@dataclass
class Rule:
    when: Callable[[Seen], bool]
    action: str  # "status" | "reset" | "hang" | "stall" | "flip" | "delay"
    times: int | None = None  # None: every match
    status: int = 503
    code: str = "ServiceUnavailable"
    after: int = 0  # reset: body bytes read first; flip: the byte offset (-1: the middle)
    delay: float = 0.0
    hits: int = 0


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.seen: list[Seen] = []
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._seen_more = threading.Condition(self._lock)  # notified on every request recorded
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.active: dict[str, int] = {}  # requests being handled, by op
        self.max_active: dict[str, int] = {}  # the most handled at once, by op

    # -- control (from any thread) --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self.listen()
        return self

    def stop(self) -> None:
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CEILING)
        if not self._thread.is_alive():
            self._loop.close()

    def listen(self) -> None:
        """(Re)open the listening socket, on the same port once one was chosen."""
        self._run(self._listen())

    def refuse(self) -> None:
        """Stop listening and reset every open connection: new connections are refused."""
        self._run(self._refuse())

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail(self, status: int = 503, *, when: Callable[[Seen], bool] = lambda r: True, times: int | None = None,
             code: str | None = None) -> Rule:
        code = code or {500: "InternalError", 503: "ServiceUnavailable"}.get(status, str(status))
        return self.add(Rule(when, "status", times, status=status, code=code))

    def reset(self, *, when: Callable[[Seen], bool], after: int = 0, times: int | None = 1) -> Rule:
        return self.add(Rule(when, "reset", times, after=after))

    def hang(self, *, when: Callable[[Seen], bool] = lambda r: True, times: int | None = None,
             read_body: bool = True) -> Rule:
        """Never answer; read_body=False also stops reading the request (the sender's writes stall)."""
        return self.add(Rule(when, "hang" if read_body else "stall", times))

    def flip(self, *, when: Callable[[Seen], bool], offset: int = -1, times: int | None = 1) -> Rule:
        return self.add(Rule(when, "flip", times, after=offset))

    def delay(self, seconds: float, *, when: Callable[[Seen], bool] = lambda r: True,
              times: int | None = None) -> Rule:
        return self.add(Rule(when, "delay", times, delay=seconds))

    def clear(self) -> None:
        """Drop every rule (hanging connections stay hung until the client gives up)."""
        with self._lock:
            self._rules.clear()

    def requests(self, op: str | None = None, action: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if (op is None or s.op == op) and (action is None or s.action == action)]

    def count(self, op: str | None = None, action: str | None = None) -> int:
        return len(self.requests(op, action))

    def wait_for(self, op: str, at_least: int, timeout: float = 60.0) -> None:
        """Block until `at_least` requests of `op` were seen (AssertionError after `timeout` seconds)."""
        with self._seen_more:
            if not self._seen_more.wait_for(lambda: sum(s.op == op for s in self.seen) >= at_least, timeout):
                raise AssertionError(f"fewer than {at_least} {op} requests within {timeout} s")

    def forget(self) -> None:
        with self._lock:
            self.seen.clear()

    # -- the loop side ----------------------------------------------------------------------------------

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CEILING)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            _abort(w)

    async def _shutdown(self) -> None:
        await self._refuse()
        for t in list(self._tasks):
            t.cancel()

    def _match(self, seen: Seen) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if (rule.times is None or rule.hits < rule.times) and rule.when(seen):
                    rule.hits += 1
                    return rule
            return None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)
            self._seen_more.notify_all()

    def _enter(self, op: str) -> None:
        with self._lock:
            self.active[op] = self.active.get(op, 0) + 1
            self.max_active[op] = max(self.max_active.get(op, 0), self.active[op])

    def _leave(self, op: str) -> None:
        with self._lock:
            self.active[op] -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []  # 0 or 1 connection
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                seen, lines = _parse_head(head)
                rule = self._match(seen)
                seen.action = rule.action if rule else "pass"
                self._record(seen)
                self._enter(seen.op)
                try:
                    if not await self._exchange(seen, lines, rule, reader, writer, upstream):
                        return
                finally:
                    self._leave(seen.op)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            for _, uw in upstream:
                uw.close()
            with contextlib.suppress(Exception):
                writer.close()

    async def _exchange(self, seen: Seen, lines: list[bytes], rule: Rule | None, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter,
                        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> bool:
        """Handle one request; False when the client connection is done with."""
        if seen.headers.get("expect", "").lower() == "100-continue":
            lines = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if rule is not None and rule.action == "stall":
            await asyncio.Event().wait()  # neither reads on nor answers
        if rule is not None and rule.action == "reset":
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                if rule.after:
                    await reader.readexactly(min(rule.after, _content_length(seen)))
            _abort(writer)
            return False
        body = await _read_body(reader, seen.headers)
        seen.body_len = len(body)
        if rule is not None and rule.action == "hang":
            await asyncio.Event().wait()  # until the client gives up (or the proxy stops)
        if rule is not None and rule.action == "status":
            writer.write(_error_response(rule.status, rule.code, seen.method == "HEAD"))
            await writer.drain()
            return True
        if rule is not None and rule.action == "delay":
            await asyncio.sleep(rule.delay)
        if rule is not None and rule.action == "flip" and body:
            at = len(body) // 2 if rule.after < 0 else min(rule.after, len(body) - 1)
            flipped = bytearray(body)
            flipped[at] ^= 0x01
            body = bytes(flipped)
        if not upstream:
            upstream.append(await asyncio.open_connection(*self.upstream))
        ur, uw = upstream[0]
        uw.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await uw.drain()
        response, close = await _read_response(ur, seen.method)
        writer.write(response)
        await writer.drain()
        if close:
            uw.close()
            upstream.clear()
        return True


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer sees 'connection reset'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _parse_head(head: bytes) -> tuple[Seen, list[bytes]]:
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        name, _, value = ln.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return Seen(method, unquote(parts.path), query, headers), lines


def _content_length(seen: Seen) -> int:
    return int(seen.headers.get("content-length", "0") or 0)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    n = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(n) if n else b""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """The raw chunked encoding (forwarded as is)."""
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        out += line
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the empty line
                t = await reader.readuntil(b"\r\n")
                out += t
                if t == b"\r\n":
                    return bytes(out)
        out += await reader.readexactly(size + 2)


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[bytes, bool]:
    """One whole response from upstream, and whether upstream closes the connection after it."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 100:
            break
    headers: dict[str, str] = {}
    for ln in head[:-4].split(b"\r\n")[1:]:
        name, _, value = ln.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    close = headers.get("connection", "").lower() == "close" or head.startswith(b"HTTP/1.0")
    if method == "HEAD" or status in (204, 304):
        return head, close
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return head + await _read_chunked(reader), close
    if "content-length" in headers:
        return head + await reader.readexactly(int(headers["content-length"])), close
    return head + await reader.read(), True


def _error_response(status: int, code: str, head_only: bool) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by the fault proxy</Message></Error>").encode()
    reason = {500: "Internal Server Error", 503: "Service Unavailable", 403: "Forbidden"}.get(status, "Error")
    payload = b"" if head_only else body
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
