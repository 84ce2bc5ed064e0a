"""Who is calling the Local Key Manager: clients and credentials, HMAC-signed requests, Hawk, mutual TLS.

>>> registry = ClientRegistry.load(Path("/etc/mediaseal/lkm-clients.toml"))
>>> auth = Authenticator(registry, NonceCache(), mode=MODE_ANY)
>>> principal = auth.authenticate(facts, family=FAMILY_V1)        # raises UnauthenticatedError

Clients file (TOML, or JSON with the same shape), readable by the service user only (no "other"
permission bits, no group write):

    [[clients]]
    name = "export-1"
    roles = ["unwrap"]                      # any of: unwrap, admin, publish
    cert_names = ["export-1.example.com"]   # optional: mTLS identities (SAN DNS/URI names or subject CN)
    [[clients.credentials]]                 # at most two per client: the old and the new during rotation
    id = "export-1-2025a"
    secret = "..."                          # >= 32 characters (or secret_file = "/path"); never logged
    scheme = "hmac"                         # "hmac" (the /v1 API) or "hawk" (the Genesys-compatible shim)
    not_after = "2026-01-01T00:00:00Z"      # optional; not_before likewise

The mediaseal request signature (`Authorization: MediaSeal-HMAC-SHA256 id="..", ts="..", nonce="..", sig=".."`)
is HMAC-SHA256 under the credential's secret over, each followed by a newline:

    MEDIASEAL-HMAC-SHA256 / credential id / ts (Unix seconds) / nonce / METHOD / path?query / hex SHA-256 of the body

Hawk (https://github.com/hueniverse/hawk, the protocol example in its README) is the same idea in the
shape Genesys Cloud speaks: `Authorization: Hawk id, ts, nonce, [hash], [ext], mac` with the MAC over
`hawk.1.header / ts / nonce / METHOD / resource / host / port / hash / ext`, HMAC-SHA256 only here.

Both: a timestamp more than `window` seconds from the service clock is refused, and so is a nonce
seen before for the same credential while its timestamp could still be accepted (the nonce cache is
bounded in size and time; when it is full of live nonces requests are refused, never let through).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from mediaseal.keys.lkm.errors import LKMConfigError, OverloadedError, UnauthenticatedError
from mediaseal.plumbing.credentials import CredentialsFileError, read_credentials_file


class Role(StrEnum):
    """What a client may do (the clients file's `roles`); a route names the roles that may call it."""

    UNWRAP = "unwrap"
    ADMIN = "admin"
    PUBLISH = "publish"


class AuthMode(StrEnum):
    """`lkm serve --auth`: which proofs of identity a /v1 request must bring."""

    MTLS = "mtls"  # a registered client certificate
    HMAC = "hmac"  # a signed request
    BOTH = "mtls+hmac"  # both, of the same client
    ANY = "any"  # either


class Family(StrEnum):
    """Which routes a request is for: the own /v1 API, or the Genesys-compatible shim (Hawk only)."""

    V1 = "v1"
    HAWK = "hawk"


UNWRAP, ADMIN, PUBLISH = Role.UNWRAP, Role.ADMIN, Role.PUBLISH
ROLES = tuple(Role)
SCHEME_HMAC, SCHEME_HAWK = "hmac", "hawk"
MODE_MTLS, MODE_HMAC, MODE_BOTH, MODE_ANY = AuthMode.MTLS, AuthMode.HMAC, AuthMode.BOTH, AuthMode.ANY
MODES = tuple(m.value for m in AuthMode)
FAMILY_V1, FAMILY_HAWK = Family.V1, Family.HAWK

HMAC_AUTH_SCHEME = "MediaSeal-HMAC-SHA256"
HMAC_STRING_PREFIX = "MEDIASEAL-HMAC-SHA256"
DEFAULT_WINDOW = 300
DEFAULT_NONCE_CACHE = 100_000
MIN_SECRET_CHARS = 32
MAX_CREDENTIALS_PER_CLIENT = 2
MAX_AUTH_HEADER = 4096

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
_CRED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~+/=@:-]{0,127}")
_NONCE = re.compile(r"[A-Za-z0-9._~+/=-]{1,64}")
_TS = re.compile(r"[0-9]{1,12}")
# An auth parameter: name="value", the value any printable ASCII but `"` and `\` (as Hawk allows).
_PARAM = re.compile(r'\s*([a-z]+)="([ !#-\[\]-~]*)"\s*(,|$)')
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


# -- clients and credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """One shared secret of a client. `secret` is never printed (repr hides it)."""

    id: str
    secret: bytes = field(repr=False)
    scheme: str = SCHEME_HMAC
    not_before: datetime | None = None
    not_after: datetime | None = None

    def live(self, now: float) -> bool:
        t = datetime.fromtimestamp(now, UTC)
        return (self.not_before is None or t >= self.not_before) and (self.not_after is None or t < self.not_after)


@dataclass(frozen=True)
class Client:
    """A caller of the service: its roles, its mTLS identities and its (at most two) credentials."""

    name: str
    roles: frozenset[Role]
    cert_names: frozenset[str] = frozenset()
    credentials: tuple[Credential, ...] = ()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: which client, and how it proved it (mtls, hmac, mtls+hmac, hawk)."""

    client: Client
    via: str
    credential_id: str | None = None

    @property
    def name(self) -> str:
        return self.client.name



def load_secret_document(path: Path, what: str, fix: str, *, detail: bool = True) -> Any:
    """A TOML (.toml, else JSON) file that holds secrets: refused if others may read it or the group write it.

    `detail`: whether a parse error's own message goes into the LKMConfigError (not for a file that
    holds a single secret, whose parse error could point into it).
    """
    try:
        raw = read_credentials_file(path, what, forbidden=0o027, fix=fix)
    except CredentialsFileError as e:
        raise LKMConfigError(str(e)) from None
    kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
    try:
        text = raw.decode("utf-8")
        return tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as e:
        raise LKMConfigError(f"{what} {path} is not valid {kind}" + (f": {e}" if detail else "")) from None

class ClientRegistry:
    """The clients file, parsed and checked. Lookups by credential id and by certificate name."""

    def __init__(self, clients: Iterable[Client], source: str = "<memory>") -> None:
        self.source = source
        self.clients: dict[str, Client] = {}
        self._by_credential: dict[str, tuple[Client, Credential]] = {}
        self._by_cert_name: dict[str, Client] = {}
        for c in clients:
            if c.name in self.clients:
                raise LKMConfigError(f"{source}: client {c.name!r} appears twice")
            self.clients[c.name] = c
            for cred in c.credentials:
                if cred.id in self._by_credential:
                    raise LKMConfigError(f"{source}: credential id {cred.id!r} appears twice")
                self._by_credential[cred.id] = (c, cred)
            for n in c.cert_names:
                if n in self._by_cert_name:
                    raise LKMConfigError(f"{source}: certificate name {n!r} belongs to two clients")
                self._by_cert_name[n] = c

    @classmethod
    def load(cls, path: Path) -> ClientRegistry:
        """Read a clients file (.toml, else JSON). Refuses files others can read or anyone but the owner can write."""
        path = Path(path)
        doc = load_secret_document(path, "clients file", "allow no access to others and no group write (chmod 0600 "
                                   "or 0640)")
        return cls.from_document(doc, str(path), base=path.parent)

    @classmethod
    def from_document(cls, doc: object, source: str = "<memory>", base: Path | None = None) -> ClientRegistry:
        if not isinstance(doc, dict) or set(doc) != {"clients"} or not isinstance(doc["clients"], list):
            raise LKMConfigError(f"{source}: expected exactly one member, a list 'clients'")
        return cls((_client(c, i, source, base) for i, c in enumerate(doc["clients"], 1)), source)

    def by_credential(self, credential_id: str) -> tuple[Client, Credential] | None:
        return self._by_credential.get(credential_id)

    def by_cert_names(self, names: Iterable[str]) -> Client | None:
        """The client one of these certificate names belongs to (a certificate naming two clients: none)."""
        found = {self._by_cert_name[n].name: self._by_cert_name[n] for n in names if n in self._by_cert_name}
        return next(iter(found.values())) if len(found) == 1 else None


def _client(d: object, index: int, source: str, base: Path | None) -> Client:
    where = f"{source}: clients[{index}]"
    if not isinstance(d, dict) or not {"name", "roles"} <= set(d) <= {"name", "roles", "cert_names", "credentials"}:
        raise LKMConfigError(f"{where}: needs name and roles; may have cert_names and credentials; nothing else")
    name, roles = d["name"], d["roles"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LKMConfigError(f"{where}: name must be 1-128 characters of A-Z a-z 0-9 . _ @ : -")
    where = f"{source}: client {name!r}"
    if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
        raise LKMConfigError(f"{where}: roles must be a non-empty list of {', '.join(ROLES)}")
    cert_names = d.get("cert_names", [])
    if not isinstance(cert_names, list) or not all(isinstance(n, str) and 0 < len(n) <= 255 for n in cert_names):
        raise LKMConfigError(f"{where}: cert_names must be a list of names")
    creds = d.get("credentials", [])
    if not isinstance(creds, list):
        raise LKMConfigError(f"{where}: credentials must be a list")
    if len(creds) > MAX_CREDENTIALS_PER_CLIENT:
        raise LKMConfigError(f"{where}: at most {MAX_CREDENTIALS_PER_CLIENT} credentials per client "
                             "(the current one and the next, while rotating)")
    if not cert_names and not creds:
        raise LKMConfigError(f"{where}: has neither cert_names nor credentials, so it can never authenticate")
    credentials = tuple(_credential(c, f"{where} credential {i}", base) for i, c in enumerate(creds, 1))
    return Client(name, frozenset(Role(r) for r in roles), frozenset(cert_names), credentials)


def _credential(d: object, where: str, base: Path | None) -> Credential:
    allowed = {"id", "secret", "secret_file", "scheme", "not_before", "not_after"}
    if not isinstance(d, dict) or "id" not in d or not set(d) <= allowed or ("secret" in d) == ("secret_file" in d):
        raise LKMConfigError(f"{where}: needs id and exactly one of secret / secret_file "
                             "(may have scheme, not_before, not_after)")
    cid = d["id"]
    if not isinstance(cid, str) or not _CRED_ID.fullmatch(cid):
        raise LKMConfigError(f"{where}: id must be 1-128 characters of A-Z a-z 0-9 . _ ~ + / = @ : -")
    if "secret_file" in d:
        secret_path = Path(str(d["secret_file"]))
        if base is not None and not secret_path.is_absolute():
            secret_path = base / secret_path
        try:  # refused if others may read it, as the clients file is (issue 15, finding 11)
            raw = read_credentials_file(secret_path, "secret_file", forbidden=0o007, fix="chmod 0640 or 0600")
            secret_text = raw.decode("utf-8").removesuffix("\n")
        except CredentialsFileError as e:
            raise LKMConfigError(f"{where} ({cid}): {e}") from None
        except UnicodeDecodeError as e:
            raise LKMConfigError(f"{where} ({cid}): can't read secret_file {secret_path}: {e}") from None
    else:
        secret_text = d["secret"]
    if not isinstance(secret_text, str) or len(secret_text) < MIN_SECRET_CHARS:
        raise LKMConfigError(f"{where} ({cid}): the secret must be at least {MIN_SECRET_CHARS} characters")
    scheme = d.get("scheme", SCHEME_HMAC)
    if scheme not in (SCHEME_HMAC, SCHEME_HAWK):
        raise LKMConfigError(f"{where} ({cid}): scheme must be {SCHEME_HMAC!r} or {SCHEME_HAWK!r}")
    times: dict[str, datetime | None] = {}
    for k in ("not_before", "not_after"):
        v = d.get(k)
        try:
            times[k] = None if v is None else datetime.strptime(str(v), _TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            raise LKMConfigError(f"{where} ({cid}): {k} must look like 2026-01-31T00:00:00Z") from None
    return Credential(cid, secret_text.encode("utf-8"), scheme, times["not_before"], times["not_after"])


_DUMMY_SECRET = b"\0" * 32  # the MAC an unknown credential id costs (never compared with anything)
FUTURE_SKEW = 10  # seconds a request's timestamp may be ahead of the service clock

# -- the nonce cache --------------------------------------------------------------------------------


class NonceCache:
    """Nonces seen, each kept until its timestamp falls out of the window. Bounded: full means refuse.

    The cache lives in this process, so it says nothing about requests signed before the process
    started: the authenticator refuses those (`Authenticator.started`), which closes the replay of a
    captured request after a restart. Each credential has its own quota (`per_credential`,
    a quarter of the whole by default): one client flooding it with fresh nonces is refused (429), the
    others go on.

    Not thread-safe: the service uses it from its event loop only.
    """

    def __init__(self, max_entries: int = DEFAULT_NONCE_CACHE, window: int = DEFAULT_WINDOW, *,
                 per_credential: int | None = None) -> None:
        if max_entries < 1 or window < 1:
            raise ValueError("max_entries and window must be positive")
        self.max_entries = max_entries
        self.window = window
        self.per_credential = per_credential or max(1, max_entries // 4)
        self._seen: dict[tuple[str, str, str], float] = {}
        self._expiry: list[tuple[float, tuple[str, str, str]]] = []
        self._count: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, scheme: str, credential_id: str, nonce: str, ts: int, now: float) -> bool:
        """Record a nonce; False if it was seen before (a replay). Raises OverloadedError when full."""
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            if self._seen.get(key, now + 1) <= now:
                del self._seen[key]
                owner = key[:2]
                self._count[owner] -= 1
                if not self._count[owner]:
                    del self._count[owner]
        key = (scheme, credential_id, nonce)
        if key in self._seen:
            return False
        if self._count.get((scheme, credential_id), 0) >= self.per_credential:
            raise OverloadedError("this credential's replay cache is full of live nonces; try again shortly",
                                  retry_after=1)
        if len(self._seen) >= self.max_entries:
            raise OverloadedError("replay cache is full of live nonces; try again shortly", retry_after=1)
        expires = ts + self.window + 1  # after this, the timestamp alone rejects the request
        self._seen[key] = expires
        self._count[(scheme, credential_id)] = self._count.get((scheme, credential_id), 0) + 1
        heapq.heappush(self._expiry, (expires, key))
        return True


# -- request facts and the authenticator ------------------------------------------------------------


@dataclass(frozen=True)
class RequestFacts:
    """What authentication looks at, taken from an HTTP request (so this module needs no web framework)."""

    method: str
    path_qs: str  # the raw request target: path and query exactly as sent
    host: str  # the Host header
    authorization: str | None
    content_type: str
    body: bytes
    cert_names: frozenset[str] | None  # names from a verified client certificate, None if none was presented
    default_port: int = 443


class Authenticator:
    """Turns request facts into a Principal, or raises UnauthenticatedError. Never lets a request through by default."""

    def __init__(self, registry: ClientRegistry, nonces: NonceCache, *, mode: AuthMode | str = MODE_HMAC,
                 window: int = DEFAULT_WINDOW, require_hawk_payload_hash: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.registry = registry
        self.nonces = nonces
        self.mode = AuthMode(mode)
        self.window = window
        self.require_hawk_payload_hash = require_hawk_payload_hash
        self.clock = clock
        self.started = clock()  # requests signed before this are refused (see NonceCache)

    def authenticate(self, facts: RequestFacts, family: Family) -> Principal:
        if family == FAMILY_HAWK:
            return self._hawk(facts)
        cert_client: Client | None = None
        if self.mode != MODE_HMAC and facts.cert_names is not None:
            cert_client = self.registry.by_cert_names(facts.cert_names)
            if cert_client is None:
                raise UnauthenticatedError("the client certificate is not registered to any client")
        # A signature that is present is always checked, whatever the mode: a bad one is never ignored.
        signed = self._hmac(facts) if facts.authorization is not None else None
        if self.mode in (MODE_MTLS, MODE_BOTH) and cert_client is None:
            raise UnauthenticatedError("a client certificate is required")
        if self.mode in (MODE_HMAC, MODE_BOTH) and signed is None:
            raise UnauthenticatedError(f"a signed request is required ({HMAC_AUTH_SCHEME})")
        if cert_client is not None and signed is not None:
            if signed[0].name != cert_client.name:
                raise UnauthenticatedError("the client certificate and the signature belong to different clients")
            return Principal(cert_client, "mtls+hmac", signed[1])
        if signed is not None:
            return Principal(signed[0], "hmac", signed[1])
        if cert_client is not None:
            return Principal(cert_client, "mtls")
        raise UnauthenticatedError(f"authentication required ({HMAC_AUTH_SCHEME} signature or client certificate)")

    # -- the mediaseal signature ---------------------------------------------------------------

    def _hmac(self, facts: RequestFacts) -> tuple[Client, str]:
        params = parse_authorization(facts.authorization or "", HMAC_AUTH_SCHEME, required={"id", "ts", "nonce", "sig"})
        client, cred = self._credential(params["id"], SCHEME_HMAC, facts)
        ts = _timestamp(params["ts"])
        nonce = params["nonce"]
        if not _NONCE.fullmatch(nonce):
            raise UnauthenticatedError("nonce must be 1-64 characters of A-Z a-z 0-9 . _ ~ + / = -")
        expected = hmac_signature(cred.secret, cred.id, ts, nonce, facts.method, facts.path_qs, facts.body)
        if not hmac.compare_digest(expected.encode(), params["sig"].encode()):
            raise UnauthenticatedError("signature does not verify (or unknown credential)")
        self._fresh(SCHEME_HMAC, cred, ts, nonce)
        return client, cred.id

    # -- Hawk -------------------------------------------------------------------------------------

    def _hawk(self, facts: RequestFacts) -> Principal:
        params = parse_authorization(facts.authorization or "", "Hawk", required={"id", "ts", "nonce", "mac"},
                                     optional={"hash", "ext", "app", "dlg"})
        client, cred = self._credential(params["id"], SCHEME_HAWK, facts)
        ts = _timestamp(params["ts"])
        host, port = split_host(facts.host, facts.default_port)
        expected = hawk_mac(cred.secret, hawk_normalized(
            ts, params["nonce"], facts.method, facts.path_qs, host, port, params.get("hash", ""),
            params.get("ext", ""), params.get("app"), params.get("dlg")))
        if not hmac.compare_digest(expected.encode(), params["mac"].encode()):
            raise UnauthenticatedError("Hawk MAC does not verify (or unknown credential)")
        if "hash" in params:
            actual = hawk_payload_hash(facts.body, facts.content_type)
            if not hmac.compare_digest(actual.encode(), params["hash"].encode()):
                raise UnauthenticatedError("Hawk payload hash does not match the body")
        elif self.require_hawk_payload_hash and facts.body:
            # A MAC that does not cover the body lets whoever sees one request send another body under it.
            raise UnauthenticatedError("Hawk payload hash (hash=) is required for a request with a body")
        try:
            self._fresh(SCHEME_HAWK, cred, ts, params["nonce"])
        except UnauthenticatedError as e:
            if "timestamp" in e.message:  # Hawk tells an authenticated client the server's time, signed
                now = int(self.clock())
                e.headers["WWW-Authenticate"] = (
                    f'Hawk ts="{now}", tsm="{hawk_timestamp_mac(cred.secret, now)}", error="Stale timestamp"')
            raise
        return Principal(client, "hawk", cred.id)

    # -- shared ------------------------------------------------------------------------------------

    def _credential(self, credential_id: str, scheme: str, facts: RequestFacts) -> tuple[Client, Credential]:
        found = self.registry.by_credential(credential_id)
        if found is None or found[1].scheme != scheme:
            # Same words as a bad MAC: which credential ids exist is not for strangers to learn. Nor the
            # time: a known id costs a MAC over the body, so an unknown one costs the same (finding 11).
            hmac_signature(_DUMMY_SECRET, credential_id, 0, "0", facts.method, facts.path_qs, facts.body)
            raise UnauthenticatedError("signature does not verify (or unknown credential)")
        return found

    def _fresh(self, scheme: str, cred: Credential, ts: int, nonce: str) -> None:
        now = self.clock()
        if abs(now - ts) > self.window:
            raise UnauthenticatedError(f"timestamp is outside the +/-{self.window} s window (server time {int(now)})")
        if ts > now + FUTURE_SKEW:
            # A future timestamp would hold its nonce in the cache for longer than the window.
            raise UnauthenticatedError(f"timestamp is more than {FUTURE_SKEW} s ahead of the server clock "
                                       f"(server time {int(now)})")
        if ts < int(self.started):
            # This process has not seen the nonces of requests signed before it started: one of them
            # may be a replay of a request an earlier instance answered. A client signs afresh.
            raise UnauthenticatedError("timestamp is before this service started (sign the request again)")
        if not cred.live(now):
            raise UnauthenticatedError(f"credential {cred.id} is outside its validity period")
        if not self.nonces.add(scheme, cred.id, nonce, ts, now):
            raise UnauthenticatedError("replayed request: this nonce was already used")


def _timestamp(text: str) -> int:
    if not _TS.fullmatch(text):
        raise UnauthenticatedError("ts must be Unix time in whole seconds")
    return int(text)


def parse_authorization(value: str, scheme: str, required: set[str], optional: set[str] | frozenset[str] = frozenset(),
                        ) -> dict[str, str]:
    """Parse `Scheme a="1", b="2"`. Unknown, repeated or missing parameters are errors (UnauthenticatedError)."""
    if len(value) > MAX_AUTH_HEADER:
        raise UnauthenticatedError("Authorization header is too long")
    head, _, rest = value.strip().partition(" ")
    if head.lower() != scheme.lower() or not rest.strip():
        raise UnauthenticatedError(f"expected an Authorization header of scheme {scheme}")
    params: dict[str, str] = {}
    pos, rest = 0, rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or (m.group(3) == "" and m.end() != len(rest)):
            raise UnauthenticatedError(f"malformed {scheme} Authorization header")
        name, val = m.group(1), m.group(2)
        if name in params or name not in required | optional:
            raise UnauthenticatedError(f"{scheme} Authorization header has a repeated or unknown parameter {name!r}")
        params[name] = val
        pos = m.end()
    missing = required - set(params)
    if missing:
        raise UnauthenticatedError(f"{scheme} Authorization header lacks {', '.join(sorted(missing))}")
    return params


def split_host(host_header: str, default_port: int) -> tuple[str, int]:
    """Host and port from a Host header ("example.com:8000", "[::1]:8443", "example.com")."""
    h = host_header.strip()
    # Printable ASCII only: header bytes that are not UTF-8 arrive as lone surrogates, which the Hawk MAC
    # string can't encode (that was a 500 and a traceback for an unauthenticated request).
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[!-9;-Z^-~]+)(?::([0-9]{1,5}))?", h)
    if not m:
        raise UnauthenticatedError("the Host header is malformed")
    return m.group(1).lower(), int(m.group(2)) if m.group(2) else default_port


# -- the mediaseal signature: both ends -------------------------------------------------------------


def hmac_string(credential_id: str, ts: int, nonce: str, method: str, path_qs: str, body: bytes) -> bytes:
    """The string a mediaseal request signature covers."""
    body_hash = hashlib.sha256(body).hexdigest()
    lines = [HMAC_STRING_PREFIX, credential_id, str(ts), nonce, method.upper(), path_qs, body_hash]
    return ("\n".join(lines) + "\n").encode("utf-8")


def hmac_signature(secret: bytes, credential_id: str, ts: int, nonce: str, method: str, path_qs: str,
                   body: bytes) -> str:
    mac = hmac.digest(secret, hmac_string(credential_id, ts, nonce, method, path_qs, body), "sha256")
    return base64.b64encode(mac).decode("ascii")


def sign_request(credential_id: str, secret: bytes, method: str, path_qs: str, body: bytes, *,
                 ts: int | None = None, nonce: str | None = None) -> str:
    """The Authorization header value for a request (client side). A fresh nonce each call."""
    ts = int(time.time()) if ts is None else ts
    nonce = nonce or base64.urlsafe_b64encode(os.urandom(18)).decode("ascii")
    sig = hmac_signature(secret, credential_id, ts, nonce, method, path_qs, body)
    return f'{HMAC_AUTH_SCHEME} id="{credential_id}", ts="{ts}", nonce="{nonce}", sig="{sig}"'


# -- Hawk: both ends ------------------------------------------------------------------------------------


def hawk_normalized(ts: int, nonce: str, method: str, resource: str, host: str, port: int, payload_hash: str = "",
                    ext: str = "", app: str | None = None, dlg: str | None = None, kind: str = "header") -> str:
    """Hawk's normalized request string (each value followed by a newline; ext escaped)."""
    ext_escaped = ext.replace("\\", "\\\\").replace("\n", "\\n")
    s = "".join(f"{v}\n" for v in (f"hawk.1.{kind}", ts, nonce, method.upper(), resource, host.lower(), port,
                                    payload_hash, ext_escaped))
    if app is not None:
        s += f"{app}\n{dlg or ''}\n"
    return s


def hawk_mac(key: bytes, normalized: str) -> str:
    """base64(HMAC-SHA256(key, normalized string))."""
    return base64.b64encode(hmac.digest(key, normalized.encode("utf-8"), "sha256")).decode("ascii")


def hawk_payload_hash(payload: bytes, content_type: str) -> str:
    """base64(SHA-256("hawk.1.payload\\n" + media type, lower case, no parameters + "\\n" + payload + "\\n"))."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    # surrogateescape: a Content-Type that is not UTF-8 arrives as lone surrogates; hash the bytes as sent
    # (it then just does not match) rather than fail to encode them (that was a 500 and a traceback).
    return base64.b64encode(hashlib.sha256(
        b"hawk.1.payload\n" + media_type.encode("utf-8", "surrogateescape") + b"\n" + payload + b"\n").digest(),
    ).decode("ascii")


def hawk_timestamp_mac(key: bytes, ts: int) -> str:
    """The `tsm` a server sends with its time in a stale-timestamp challenge."""
    return base64.b64encode(hmac.digest(key, f"hawk.1.ts\n{ts}\n".encode(), "sha256")).decode("ascii")


def hawk_header(credential_id: str, key: bytes, method: str, resource: str, host: str, port: int, *,
                ts: int | None = None, nonce: str | None = None, ext: str = "", payload: bytes | None = None,
                content_type: str = "") -> str:
    """A Hawk Authorization header value (client side: tests, and anyone integrating with the shim)."""
    ts = int(time.time()) if ts is None else ts
    nonce = nonce or base64.urlsafe_b64encode(os.urandom(6)).decode("ascii")
    payload_hash = hawk_payload_hash(payload, content_type) if payload is not None else ""
    mac = hawk_mac(key, hawk_normalized(ts, nonce, method, resource, host, port, payload_hash, ext))
    parts = [f'id="{credential_id}"', f'ts="{ts}"', f'nonce="{nonce}"']
    if payload_hash:
        parts.append(f'hash="{payload_hash}"')
    if ext:
        parts.append(f'ext="{ext}"')
    parts.append(f'mac="{mac}"')
    return "Hawk " + ", ".join(parts)
