"""The playback server: `GET /recordings/<key>` streams a recording's plaintext, with HTTP Range seeking.

>>> server = PlaybackServer(open_source("s3://recordings/site-a"), unwrapper,
...                         tokens=load_tokens(Path("tokens")), audit=PlaybackAuditLog(Path("audit.jsonl")))
>>> runner = await server.start("127.0.0.1", 8750)     # or run_server(ServeOptions(...), unwrapper)

- Authentication on every request, no anonymous access ever: a bearer token from the tokens file
  (compared in constant time against every entry) and/or a client certificate verified against
  `client_ca` (mTLS, required at the handshake). When both are configured, both are required. The
  server refuses to start with neither, and refuses a non-loopback address without TLS.
- Ranges (RFC 9110): `bytes=a-b`, `bytes=a-`, `bytes=-n` -> 206 with Content-Range. Several ranges
  are answered with ONE 206 part spanning them all (coalesced, a permitted answer; no
  multipart/byteranges). No satisfiable range -> 416 with `Content-Range: bytes */<size>`. A Range
  header that does not parse (other unit, bad syntax, b < a) is ignored -> 200 with the whole
  recording, as RFC 9110 section 14.2 says. `If-Range` with a different ETag -> 200 full.
- Plaintext is never written anywhere but the socket: no temp files, no cache (and `Cache-Control:
  no-store` so browsers and proxies keep none either). Each piece sent has authenticated; a chunk
  that fails mid-stream closes the connection before any of its bytes go out (the client sees a
  short body). Failures found before the headers (tampered or truncated package, wrong key, missing
  object) are JSON errors: 404, 502 (package or repository), 503 (key service).
- Opened packages (header and derived keys, never plaintext) are kept in memory for 30 s (64 at
  most), so a player's stream of Range requests costs one ranged GET each; a revoked key (KMS) or a
  replaced object therefore takes up to 30 s to show. Reads stay pinned to the object's ETag.
- A connection that has not sent a whole request within 15 s (KEEPALIVE_SECONDS) of opening or of its
  last answer is closed (slow and idle clients), and so is a TLS handshake not done within 10 s; a
  request it can't parse is a 400, logged in one line. These limits, the TLS context and the JSON
  answers are plumbing.http's, the same as the Local Key Manager's.
- Audit: one JSON line per request (ts, remote, who, method, key, range asked, range served, status,
  bytes sent, ms, error) appended to a 0600 file; never a key, a token or a byte of media. It is an
  access record, not the Local Key Manager's hash-chained, fsynced, fail-closed audit
  (keys.lkm.audit.ChainedAuditLog): an answer here never waits on a disk flush, and a player's run of
  Range requests is a line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import ssl
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from mediaseal import codec
from mediaseal.export.playback import RemotePackage
from mediaseal.export.source import PackageSource, SourceError, SourceNotFoundError, check_key, open_source
from mediaseal.keys.errors import KeysError
from mediaseal.plumbing.credentials import CredentialsFileError, read_credentials_file
from mediaseal.plumbing.durable import write_all
from mediaseal.plumbing.http import (
    KEEPALIVE_SECONDS,
    ListenSite,
    TLSContextError,
    app_runner,
    json_response,
    peer_cert_names,
    server_ssl_context,
    strong_etag,
)
from mediaseal.plumbing.media import is_passive, passive_or_octet
from mediaseal.plumbing.notify import stop_requested

__all__ = [
    "DEFAULT_PORT", "PlaybackAuditLog", "PlaybackServer", "ServeError", "ServeOptions", "load_tokens", "parse_range",
    "run_server",
]

DEFAULT_PORT = 8750
OPEN_SECONDS = 30.0  # how long an opened package (its derived keys, in memory only) is reused
OPEN_MAX = 64
# Readers that stop reading hold a response's buffers (~4.7 MiB each) for as long as they like: each
# write must complete within WRITE_SECONDS, one principal streams at most PER_READER responses at once
# and the server at most STREAMS_MAX (issue 15, finding 13).
WRITE_SECONDS = 30.0
PER_READER = 8
STREAMS_MAX = 256
MIN_TOKEN_CHARS = 32
UNSATISFIABLE = "unsatisfiable"
# ASCII digits only (RFC 9110's DIGIT): `\d` would also take other scripts' digits, which int() reads.
_RANGE_PART = re.compile(r"([0-9]*)-([0-9]*)")
# A position longer than this is past any recording; int() refuses more than 4300 digits (CVE-2020-10735),
# and a Range header may hold 8 KiB of them, so longer ones are read as "huge" instead of converted.
_MAX_POSITION_DIGITS = 18
CSP = "default-src 'none'; sandbox"
log = logging.getLogger("mediaseal.serve")


class ServeError(Exception):
    """The server can't start as configured (one line)."""


# -- Range -------------------------------------------------------------------------------------------


def parse_range(value: str | None, size: int) -> tuple[int, int] | str | None:
    """A Range header against a representation of `size` bytes.

    (first, last) inclusive for the one range to send (several coalesce into one span), the string
    UNSATISFIABLE for a 416, or None to send everything (no header, or one that does not parse).
    """
    if value is None:
        return None
    unit, sep, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or not sep:
        return None
    spans: list[tuple[int, int]] = []
    parsed_any = False
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        m = _RANGE_PART.fullmatch(part)
        if not m or (not m[1] and not m[2]):
            return None
        parsed_any = True
        if not m[1]:  # suffix: the last n bytes
            n = _position(m[2])
            if n > 0 and size > 0:
                spans.append((max(0, size - n), size - 1))
            continue
        first = _position(m[1])
        last = _position(m[2]) if m[2] else size - 1
        if m[2] and last < first:
            return None
        if first < size:
            spans.append((first, min(last, size - 1)))
    if not parsed_any:
        return None
    if not spans:
        return UNSATISFIABLE
    return min(s for s, _ in spans), max(e for _, e in spans)


def _position(digits: str) -> int:
    """A byte position from a Range header; one of more than 18 significant digits is 10**18 (past any size)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_POSITION_DIGITS else 10**_MAX_POSITION_DIGITS


# -- authentication and audit ------------------------------------------------------------------------


def load_tokens(path: Path) -> list[tuple[str, bytes]]:
    """(name, SHA-256 of the token) per line `name:token` or `token`; # comments and blank lines skipped.

    The file must not be readable by group or others; tokens are at least 32 characters.
    """
    try:
        text = read_credentials_file(path, "tokens file", forbidden=0o077, fix="make it 0600").decode()
    except CredentialsFileError as e:
        raise ServeError(str(e)) from None
    except UnicodeDecodeError:
        raise ServeError(f"tokens file {path} is not UTF-8 text") from None
    tokens: list[tuple[str, bytes]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"token-{n}", name
        name, token = name.strip(), token.strip()
        if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
            raise ServeError(f"tokens file {path} line {n}: a token is at least {MIN_TOKEN_CHARS} printable "
                             f"characters without spaces")
        tokens.append((name, hashlib.sha256(token.encode()).digest()))
    if not tokens:
        raise ServeError(f"tokens file {path} holds no token")
    return tokens


class PlaybackAuditLog:
    """Append-only JSON lines, 0600, each line written whole (O_APPEND keeps lines from interleaving)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(self._fd, 0o600)
        except OSError as e:
            raise ServeError(f"cannot open the audit log {path}: {e.strerror}") from None

    def write(self, entry: Mapping[str, Any], *, durable: bool = False) -> None:
        """Append one line; `durable`: fsynced before returning. Raises OSError (a full disk, EIO)."""
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"
        write_all(self._fd, line.encode())
        if durable:
            os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


# -- the server --------------------------------------------------------------------------------------


class PlaybackServer:
    def __init__(self, source: PackageSource, unwrapper: codec.Unwrapper, *, audit: PlaybackAuditLog,
                 tokens: list[tuple[str, bytes]] | None = None, mtls: bool = False,
                 open_seconds: float = OPEN_SECONDS, open_max: int = OPEN_MAX,
                 keepalive_timeout: float = KEEPALIVE_SECONDS, write_seconds: float = WRITE_SECONDS,
                 per_reader: int = PER_READER, streams_max: int = STREAMS_MAX) -> None:
        if not tokens and not mtls:
            raise ServeError("refusing to serve without authentication: give a tokens file and/or a client CA (mTLS)")
        self.source, self.unwrapper, self.audit = source, unwrapper, audit
        self.tokens, self.mtls = tokens or [], mtls
        # Opened packages (header, derived keys; no plaintext), so a player's run of Range requests
        # costs one ranged GET each instead of header + unwrap + final chunk every time.
        self._opened: OrderedDict[str, tuple[float, RemotePackage]] = OrderedDict()
        self.open_seconds, self.open_max = open_seconds, open_max
        self.keepalive_timeout = keepalive_timeout
        self.write_seconds, self.per_reader, self.streams_max = write_seconds, per_reader, streams_max
        self._streams: Counter[str] = Counter()  # principal -> responses it is being streamed now

    async def package(self, key: str) -> RemotePackage:
        now = time.monotonic()
        hit = self._opened.get(key)
        if hit is not None and now - hit[0] < self.open_seconds:
            return hit[1]
        pkg = await RemotePackage.open(self.source, key, self.unwrapper, check_final=False)
        if self.open_seconds > 0 and self.open_max > 0:
            self._opened.pop(key, None)
            self._opened[key] = (now, pkg)
            while len(self._opened) > self.open_max:
                self._opened.popitem(last=False)
        return pkg

    def forget(self, key: str) -> None:
        self._opened.pop(key, None)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_get("/recordings/{key:.+}", self.recording)  # HEAD too (allow_head)
        app.router.add_route("*", "/{tail:.*}", self.recording)  # everything else: authenticated, audited, 404
        app.on_response_prepare.append(_harden)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
        runner = app_runner(self.app(), "mediaseal.serve.http", keepalive_timeout=self.keepalive_timeout)
        await runner.setup()
        try:
            await ListenSite(runner, host, port, ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def authenticate(self, request: web.Request) -> str | None:
        """Who is asking, or None. Every configured method must pass."""
        who: list[str] = []
        if self.mtls:
            names = peer_cert_names(request)
            if not names:
                return None
            who.append("cert:" + ",".join(sorted(names)))
        if self.tokens:
            scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                return None
            # surrogateescape: header bytes that are not UTF-8 arrive as lone surrogates (no token has them)
            digest = hashlib.sha256(credential.strip().encode("utf-8", "surrogateescape")).digest()
            match = None
            for name, want in self.tokens:  # every entry compared, in constant time each
                if hmac.compare_digest(want, digest):
                    match = name
            if match is None:
                return None
            who.append(f"token:{match}")
        return " ".join(who)

    async def recording(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        entry: dict[str, Any] = {
            "ts": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "remote": request.remote,
            "method": request.method, "key": request.match_info.get("key", "")[:1024],
            "range": (request.headers.get("Range") or None), "served": None, "who": None, "error": None,
        }
        if entry["range"] is not None:
            entry["range"] = entry["range"][:200]
        resp: web.StreamResponse | None = None
        sent = 0
        try:
            who = self.authenticate(request)
            if who is None:
                resp = _json(401, "unauthenticated", "a valid bearer token or client certificate is required")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="mediaseal"'
                return resp
            entry["who"] = who
            if "key" not in request.match_info or request.method not in ("GET", "HEAD"):
                resp = _json(404, "not-found", "only GET/HEAD /recordings/<key> is served here")
                return resp
            if self._streams[who] >= self.per_reader:
                resp = _json(429, "too-many-streams", f"at most {self.per_reader} recordings at once per reader")
                resp.headers["Retry-After"] = "1"
                return resp
            if sum(self._streams.values()) >= self.streams_max:
                resp = _json(503, "busy", "the server streams as many recordings as it may; try again shortly")
                resp.headers["Retry-After"] = "1"
                return resp
            self._streams[who] += 1
            try:
                resp, sent = await self._serve(request, entry)
            finally:
                self._streams[who] -= 1
                if not self._streams[who]:
                    del self._streams[who]
            return resp
        finally:
            entry["status"] = resp.status if resp is not None else 500
            entry["bytes"] = sent
            entry["ms"] = round((time.monotonic() - t0) * 1000, 1)
            try:
                self.audit.write(entry)
            except OSError as e:  # the admission line (if any) is on disk; say so where an operator looks
                self._audit_failed(e)

    def _audit_failed(self, e: OSError) -> None:
        log.error("audit-failed", extra={"fields": {"path": str(self.audit.path), "error": e.strerror or str(e)}})

    async def _serve(self, request: web.Request, entry: dict[str, Any]) -> tuple[web.StreamResponse, int]:
        key = request.match_info["key"]
        try:
            key = check_key(key)
        except SourceError:
            return _json(404, "not-found", "no such recording"), 0
        if not key.endswith(".mseal") or not _nameable(key):
            return _json(404, "not-found", "no such recording"), 0
        for attempt in (1, 2):
            was_open = key in self._opened
            try:
                pkg = await self.package(key)
            except (codec.CodecError, SourceError, KeysError) as e:
                return self._failure(e, entry), 0
            plan = self._plan(request, pkg)
            if isinstance(plan, web.Response) or request.method == "HEAD" or plan[3] == 0:
                try:  # no range to fetch: prove the size by the final chunk before answering
                    await pkg.check_final()
                except (codec.CodecError, SourceError) as e:
                    self.forget(key)
                    return self._failure(e, entry), 0
            if isinstance(plan, web.Response):
                return plan, 0
            status, headers, first, length = plan
            pieces = pkg.iter_range(first, length)
            try:
                # The first piece is fetched and authenticated before the status line goes out, so a
                # package that fails there (or was replaced since it was opened) is a clean JSON error.
                piece = await anext(pieces, b"") if request.method != "HEAD" else b""
            except (codec.CodecError, SourceError) as e:
                await pieces.aclose()
                self.forget(key)
                if was_open and attempt == 1:
                    continue  # perhaps re-wrapped or replaced since it was opened: open it afresh once
                return self._failure(e, entry), 0
            break
        entry["served"] = f"{first}-{first + length - 1}/{pkg.plaintext_size}" if length else f"-/{pkg.plaintext_size}"
        # Fail closed (invariant 10): the admission line is on disk before the first byte of plaintext
        # leaves; if it cannot be written (a full disk), nothing is served.
        try:  # the fsync off the event loop: the other streams go on meanwhile
            await asyncio.to_thread(self.audit.write, {**entry, "phase": "admitted"}, durable=True)
        except OSError as e:
            await pieces.aclose()
            entry["error"] = f"audit log: {e.strerror or e}"
            self._audit_failed(e)
            return _json(503, "audit", "the audit log cannot be written: nothing is served until it can"), 0
        resp = web.StreamResponse(status=status, headers=headers)
        sent = 0
        try:
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp, 0
            while piece:
                try:
                    async with asyncio.timeout(self.write_seconds):  # no task per piece, as wait_for makes
                        await resp.write(piece)
                except TimeoutError:  # a reader that stopped reading: its buffers are not held for ever
                    entry["error"] = f"reader stalled for {self.write_seconds:g} s after {sent} bytes: closed"
                    if request.transport is not None:
                        request.transport.close()
                    return resp, sent
                sent += len(piece)
                piece = await anext(pieces, b"")
        except (codec.CodecError, SourceError) as e:
            # The piece that failed never left; close so the client sees a short body, not a whole one.
            self.forget(key)
            entry["error"] = f"{type(e).__name__}: {e} (connection closed after {sent} bytes)"
            if request.transport is not None:
                request.transport.close()
            return resp, sent
        except ConnectionError:  # the client went away (a player seeking elsewhere): normal
            entry["error"] = f"client disconnected after {sent} bytes"
            return resp, sent
        finally:
            await pieces.aclose()
        await resp.write_eof()
        return resp, sent

    def _plan(self, request: web.Request, pkg: RemotePackage) -> web.Response | tuple[int, dict[str, str], int, int]:
        """(status, headers, first byte, length) for this request, or the 416 answer."""
        size = pkg.plaintext_size
        etag = strong_etag(pkg.header.salt + pkg.header.mac)
        rng = parse_range(request.headers.get("Range"), size)
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            rng = None
        # (Content-Security-Policy and nosniff: on every answer, `_harden`.)
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-store", "ETag": etag}
        if rng == UNSATISFIABLE:
            refused = _json(416, "range-not-satisfiable", f"the recording is {size} bytes")
            refused.headers.update(headers)
            refused.headers["Content-Range"] = f"bytes */{size}"
            return refused
        # Only passive types as themselves (plumbing/media.py): the type is the producer's choice, and a
        # recording typed text/html or image/svg+xml would be script on this origin. Anything else is a
        # download.
        ctype = pkg.metadata.content_type
        headers["Content-Type"] = passive_or_octet(ctype)
        if not is_passive(ctype):
            headers["Content-Disposition"] = "attachment"
        if isinstance(rng, tuple):
            first, last = rng
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            status = 206
        else:
            first, last, status = 0, size - 1, 200
        headers["Content-Length"] = str(last - first + 1)
        return status, headers, first, last - first + 1

    def _failure(self, e: Exception, entry: dict[str, Any]) -> web.Response:
        """The JSON answer for a failure found before the response started."""
        if isinstance(e, SourceNotFoundError):
            return _json(404, "not-found", "no such recording")
        entry["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, codec.NoMatchingKeyError):
            return _json(502, "no-key", "this server holds no key for the recording")
        if isinstance(e, codec.CodecError):
            return _json(502, "package-invalid", "the recording's package failed authentication")
        if isinstance(e, SourceError):
            return _json(502, "repository", "the repository could not be read")
        if isinstance(e, KeysError):
            return _json(503, "key-service", "the key provider could not unwrap the recording's key")
        raise e


def _nameable(key: str) -> bool:
    """Whether a repository could hold `key`: at most 1024 bytes (S3's limit) in segments of at most 255
    (a file name's). Longer ones are not found, rather than a filesystem error (ENAMETOOLONG) answered 502."""
    data = key.encode("utf-8", "surrogateescape")
    return len(data) <= 1024 and all(len(seg) <= 255 for seg in data.split(b"/"))


async def _harden(_request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors included: nothing in it runs (no script, no subresource, no same-origin
    document: finding 2), nothing is sniffed into an active type."""
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"


def _json(status: int, error: str, message: str) -> web.Response:
    """This server's error shape: {"error": code, "message"} (the LKM's is its own, keys.lkm.errors)."""
    return json_response({"error": error, "message": message}, status)


# -- running it --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeOptions:
    repository: str  # file:///dir or s3://bucket/prefix
    audit_log: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # mTLS: client certificates required and verified against this
    s3: dict[str, Any] = field(default_factory=dict)  # S3Options fields, e.g. endpoint_url
    keepalive_timeout: float = KEEPALIVE_SECONDS


def check_options(o: ServeOptions) -> None:
    if o.tokens_file is None and o.client_ca is None:
        raise ServeError("refusing to start without authentication: give --tokens FILE and/or --client-ca FILE")
    if (o.tls_cert is None) != (o.tls_key is None):
        raise ServeError("--tls-cert and --tls-key go together")
    if o.client_ca is not None and o.tls_cert is None:
        raise ServeError("--client-ca (mTLS) needs --tls-cert and --tls-key")
    if o.tls_cert is None and not _loopback(o.host):
        raise ServeError(f"refusing to listen on {o.host} without TLS: tokens and media would cross the network "
                         f"in clear (give --tls-cert/--tls-key, or bind to 127.0.0.1)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_server(o: ServeOptions, unwrapper: codec.Unwrapper) -> None:
    """Serve until SIGTERM/SIGINT."""

    check_options(o)
    tokens = load_tokens(o.tokens_file) if o.tokens_file is not None else None
    ctx = None
    if o.tls_cert is not None and o.tls_key is not None:
        try:
            ctx = server_ssl_context(o.tls_cert, o.tls_key, o.client_ca, require_client_cert=True)
        except TLSContextError as e:
            raise ServeError(str(e)) from None
    try:
        source = open_source(o.repository, **o.s3)
    except SourceError as e:
        raise ServeError(str(e)) from None
    audit = PlaybackAuditLog(o.audit_log)
    server = PlaybackServer(source, unwrapper, audit=audit, tokens=tokens, mtls=o.client_ca is not None,
                            keepalive_timeout=o.keepalive_timeout)
    try:
        runner = await server.start(o.host, o.port, ctx)
    except OSError as e:
        await source.close()
        audit.close()
        raise ServeError(f"cannot listen on {o.host}:{o.port}: {e.strerror}") from None
    scheme = "https" if ctx else "http"
    print(f"mediaseal: serving {o.repository} on {scheme}://{o.host}:{o.port}/recordings/ "
          f"(audit log {o.audit_log})", file=sys.stderr, flush=True)
    try:
        await stop_requested().wait()
    finally:
        await runner.cleanup()
        await source.close()
        audit.close()
