"""The LKM's request authentication, without a server: Hawk against its specification's published
examples, the mediaseal signature, the replay cache, the clients file rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mediaseal.keys.lkm.auth import (
    FAMILY_HAWK,
    FAMILY_V1,
    MODE_ANY,
    MODE_BOTH,
    MODE_HMAC,
    MODE_MTLS,
    Authenticator,
    Client,
    ClientRegistry,
    Credential,
    NonceCache,
    RequestFacts,
    hawk_header,
    hawk_mac,
    hawk_normalized,
    hawk_payload_hash,
    parse_authorization,
    sign_request,
)
from mediaseal.keys.lkm.errors import LKMConfigError, OverloadedError, UnauthenticatedError
from mediaseal.plumbing.http import cert_names

# The Hawk README's "Protocol Example" and "Payload Validation" (hueniverse/hawk, as in hapijs/hawk's
# test/readme.js): these credentials, this request, these published values.
HAWK_ID, HAWK_KEY = "dh37fgj492je", b"werxhqb98rpaxn39848xrunpaw3489ruxnpa98w4rxn"
HAWK_TS, HAWK_NONCE, HAWK_EXT = 1353832234, "j4h3g2", "some-app-ext-data"
HAWK_GET_MAC = "6R4rV5iE+NPoym+WwjeHzjAGXUtLNIxmo1vpMofpLAE="
HAWK_PAYLOAD = b"Thank you for flying Hawk"
HAWK_PAYLOAD_HASH = "Yi9LfIIFRtBEPt74PVmbTF/xVAwPn7ub15ePICfgnuY="
HAWK_POST_MAC = "aSe1DERmZuRl3pI36/9BdZmnErTw3sNzOOAUlfeKjVw="
HAWK_GET_HEADER = (f'Hawk id="{HAWK_ID}", ts="{HAWK_TS}", nonce="{HAWK_NONCE}", ext="{HAWK_EXT}", '
                   f'mac="{HAWK_GET_MAC}"')
HAWK_POST_HEADER = (f'Hawk id="{HAWK_ID}", ts="{HAWK_TS}", nonce="{HAWK_NONCE}", hash="{HAWK_PAYLOAD_HASH}", '
                    f'ext="{HAWK_EXT}", mac="{HAWK_POST_MAC}"')
SECRET = b"s" * 40


def test_hawk_normalized_string_matches_the_specification() -> None:
    assert hawk_normalized(HAWK_TS, HAWK_NONCE, "GET", "/resource?a=1&b=2", "example.com", 8000, ext=HAWK_EXT) == (
        "hawk.1.header\n1353832234\nj4h3g2\nGET\n/resource?a=1&b=2\nexample.com\n8000\n\nsome-app-ext-data\n")


def test_hawk_mac_matches_the_specification_examples() -> None:
    resource = "/resource/1?b=1&a=2"  # the request of the header examples (http://example.com:8000/resource/1?b=1&a=2)
    assert hawk_mac(HAWK_KEY, hawk_normalized(HAWK_TS, HAWK_NONCE, "GET", resource, "example.com", 8000,
                                              ext=HAWK_EXT)) == HAWK_GET_MAC
    assert hawk_payload_hash(HAWK_PAYLOAD, "text/plain") == HAWK_PAYLOAD_HASH
    assert hawk_payload_hash(HAWK_PAYLOAD, "Text/Plain; charset=utf-8") == HAWK_PAYLOAD_HASH  # type only, lower case
    assert hawk_mac(HAWK_KEY, hawk_normalized(HAWK_TS, HAWK_NONCE, "POST", resource, "example.com", 8000,
                                              HAWK_PAYLOAD_HASH, HAWK_EXT)) == HAWK_POST_MAC
    assert hawk_header(HAWK_ID, HAWK_KEY, "GET", resource, "example.com", 8000, ts=HAWK_TS, nonce=HAWK_NONCE,
                       ext=HAWK_EXT) == HAWK_GET_HEADER
    assert hawk_header(HAWK_ID, HAWK_KEY, "POST", resource, "example.com", 8000, ts=HAWK_TS, nonce=HAWK_NONCE,
                       ext=HAWK_EXT, payload=HAWK_PAYLOAD, content_type="text/plain") == HAWK_POST_HEADER


def _hawk_auth(now: float = HAWK_TS, started: float | None = None, **kw: object) -> Authenticator:
    """An authenticator whose clock says `now`, started at `started` (default: now)."""
    registry = ClientRegistry([Client("genesys", frozenset({"unwrap"}),
                                      credentials=(Credential(HAWK_ID, HAWK_KEY, "hawk"),))])
    clock = [now if started is None else started]
    auth = Authenticator(registry, NonceCache(), clock=lambda: clock[0], **kw)  # type: ignore[arg-type]
    clock[0] = now
    return auth


def _facts(authorization: str | None, method: str = "GET", path: str = "/resource/1?b=1&a=2",
           host: str = "example.com:8000", body: bytes = b"", content_type: str = "",
           names: frozenset[str] | None = None) -> RequestFacts:
    return RequestFacts(method, path, host, authorization, content_type, body, names)


def test_hawk_server_accepts_the_specification_requests_once() -> None:
    auth = _hawk_auth()
    p = auth.authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)
    assert (p.name, p.via, p.credential_id) == ("genesys", "hawk", HAWK_ID)
    with pytest.raises(UnauthenticatedError, match="replayed"):
        auth.authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)
    post = _facts(HAWK_POST_HEADER, "POST", body=HAWK_PAYLOAD, content_type="text/plain")
    assert _hawk_auth().authenticate(post, FAMILY_HAWK).name == "genesys"
    # The MAC covers the payload hash; the hash must match the body actually sent.
    with pytest.raises(UnauthenticatedError, match="payload hash"):
        _hawk_auth().authenticate(_facts(HAWK_POST_HEADER, "POST", body=b"Thank you for flying Hawk!",
                                         content_type="text/plain"), FAMILY_HAWK)


@pytest.mark.parametrize("change", [
    {"method": "POST"}, {"path": "/resource/1?b=1&a=3"}, {"host": "example.com:8001"}, {"host": "example.org:8000"},
])
def test_hawk_mac_covers_method_resource_host_and_port(change: dict[str, str]) -> None:
    with pytest.raises(UnauthenticatedError, match="MAC does not verify"):
        _hawk_auth().authenticate(_facts(HAWK_GET_HEADER, **change), FAMILY_HAWK)


def test_hawk_stale_timestamp_gets_a_signed_server_time() -> None:
    with pytest.raises(UnauthenticatedError, match="timestamp") as e:
        _hawk_auth(now=HAWK_TS + 301).authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)
    challenge = e.value.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Hawk ts="{HAWK_TS + 301}", tsm="') and 'error="Stale timestamp"' in challenge
    # 300 s old is inside the window (for a service that was running then); ahead of the clock, only 10 s.
    assert _hawk_auth(now=HAWK_TS + 300, started=HAWK_TS - 1).authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)
    assert _hawk_auth(now=HAWK_TS - 10).authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)
    with pytest.raises(UnauthenticatedError, match="ahead of the server clock"):
        _hawk_auth(now=HAWK_TS - 11).authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)


def test_requests_signed_before_the_service_started_are_refused() -> None:
    """Issue 15, finding 4: the nonce cache lives in the process, so a request signed before it started
    may be a replay of one an earlier instance answered (captured, then replayed after a restart)."""
    with pytest.raises(UnauthenticatedError, match="before this service started"):
        _hawk_auth(now=HAWK_TS + 5, started=HAWK_TS + 1).authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)
    assert _hawk_auth(now=HAWK_TS + 5, started=HAWK_TS).authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)


def test_hawk_payload_hash_is_required_for_a_body_by_default() -> None:
    """Issue 15, finding 9: a MAC without hash= does not cover the body, so whoever saw one request could
    send any body under it. Required by default where there is a body; a GET has none to cover."""
    assert _hawk_auth().authenticate(_facts(HAWK_GET_HEADER), FAMILY_HAWK)
    with pytest.raises(UnauthenticatedError, match="payload hash"):
        _hawk_auth().authenticate(_facts(HAWK_GET_HEADER, body=b'{"x": 1}'), FAMILY_HAWK)
    # --hawk-allow-unhashed-body: the old behaviour, for a client that cannot send one (the MAC still
    # covers method, resource, host, timestamp and nonce).
    assert _hawk_auth(require_hawk_payload_hash=False).authenticate(_facts(HAWK_GET_HEADER, body=b'{"x": 1}'),
                                                                   FAMILY_HAWK)


@pytest.mark.parametrize("header", [
    "Hawk", "Basic abc", 'Hawk id="a", id="b", ts="1", nonce="n", mac="m"', 'Hawk id="a" ts="1" nonce="n" mac="m"',
    'Hawk id="a", ts="1", nonce="n", mac="m", bogus="x"', 'Hawk id="a", ts="1", nonce="n"', 'Hawk id="a\\"", ts="1"',
    "Hawk " + "x" * 5000,
])
def test_malformed_authorization_headers_are_refused(header: str) -> None:
    with pytest.raises(UnauthenticatedError):
        parse_authorization(header, "Hawk", {"id", "ts", "nonce", "mac"}, {"hash", "ext"})


# -- the mediaseal signature -----------------------------------------------------------------------------


def _registry(**extra: object) -> ClientRegistry:
    return ClientRegistry([
        Client("export-1", frozenset({"unwrap"}), frozenset({"export-1"}),
               (Credential("exp-old", SECRET), Credential("exp-new", b"n" * 40))),
        Client("admin-1", frozenset({"admin"}), frozenset({"admin-1"}), (Credential("adm", b"a" * 40),)),
    ])


def _signed(cred: str = "exp-old", secret: bytes = SECRET, body: bytes = b'{"a":1}', **kw: object) -> RequestFacts:
    h = sign_request(cred, secret, "POST", "/v1/unwrap", body, **kw)  # type: ignore[arg-type]
    return _facts(h, "POST", "/v1/unwrap", "localhost:8443", body)


def test_hmac_signature_binds_body_path_and_method_and_both_credentials_work() -> None:
    auth = Authenticator(_registry(), NonceCache(), mode=MODE_HMAC)
    assert auth.authenticate(_signed(), FAMILY_V1).credential_id == "exp-old"
    assert auth.authenticate(_signed("exp-new", b"n" * 40), FAMILY_V1).credential_id == "exp-new"  # rotation
    f = _signed()
    for changed in (RequestFacts(f.method, f.path_qs, f.host, f.authorization, "", b'{"a":2}', None),
                    RequestFacts(f.method, "/v1/rewrap", f.host, f.authorization, "", f.body, None),
                    RequestFacts("PUT", f.path_qs, f.host, f.authorization, "", f.body, None)):
        with pytest.raises(UnauthenticatedError, match="signature does not verify"):
            auth.authenticate(changed, FAMILY_V1)
    with pytest.raises(UnauthenticatedError, match="signature does not verify"):  # wrong secret, unknown id: same
        auth.authenticate(_signed(secret=b"z" * 40), FAMILY_V1)
    with pytest.raises(UnauthenticatedError, match="signature does not verify"):
        auth.authenticate(_signed(cred="nobody"), FAMILY_V1)
    with pytest.raises(UnauthenticatedError, match="signature does not verify"):  # a Hawk credential is not HMAC
        _hawk_auth().authenticate(_signed(HAWK_ID, HAWK_KEY), FAMILY_V1)


def test_hmac_replay_and_stale_timestamps() -> None:
    now = 1_800_000_000.0
    auth = Authenticator(_registry(), NonceCache(), mode=MODE_HMAC, clock=lambda: now)
    f = _signed(ts=int(now), nonce="nonce-1")
    auth.authenticate(f, FAMILY_V1)
    with pytest.raises(UnauthenticatedError, match="replayed"):
        auth.authenticate(f, FAMILY_V1)
    auth.authenticate(_signed(cred="exp-new", secret=b"n" * 40, ts=int(now), nonce="nonce-1"), FAMILY_V1)  # per cred
    for ts in (int(now) - 301, int(now) + 301):
        with pytest.raises(UnauthenticatedError, match="window"):
            auth.authenticate(_signed(ts=ts), FAMILY_V1)


def test_modes_decide_what_a_request_must_carry() -> None:
    reg = _registry()
    cert = frozenset({"export-1"})
    signed = _signed()
    cert_only = _facts(None, "POST", "/v1/unwrap", names=cert)
    both = RequestFacts(signed.method, signed.path_qs, signed.host, signed.authorization, "", signed.body, cert)
    assert Authenticator(reg, NonceCache(), mode=MODE_MTLS).authenticate(cert_only, FAMILY_V1).via == "mtls"
    with pytest.raises(UnauthenticatedError, match="certificate is required"):
        Authenticator(reg, NonceCache(), mode=MODE_MTLS).authenticate(_signed(), FAMILY_V1)
    with pytest.raises(UnauthenticatedError, match="signed request is required"):
        Authenticator(reg, NonceCache(), mode=MODE_BOTH).authenticate(cert_only, FAMILY_V1)
    assert Authenticator(reg, NonceCache(), mode=MODE_BOTH).authenticate(both, FAMILY_V1).via == "mtls+hmac"
    assert Authenticator(reg, NonceCache(), mode=MODE_ANY).authenticate(cert_only, FAMILY_V1).via == "mtls"
    admin_cert = RequestFacts(signed.method, signed.path_qs, signed.host, _signed(nonce="other").authorization, "",
                              signed.body, frozenset({"admin-1"}))
    with pytest.raises(UnauthenticatedError, match="different clients"):
        Authenticator(reg, NonceCache(), mode=MODE_ANY).authenticate(admin_cert, FAMILY_V1)
    with pytest.raises(UnauthenticatedError, match="not registered"):
        Authenticator(reg, NonceCache(), mode=MODE_ANY).authenticate(
            _facts(None, names=frozenset({"stranger"})), FAMILY_V1)
    with pytest.raises(UnauthenticatedError, match="authentication required"):
        Authenticator(reg, NonceCache(), mode=MODE_ANY).authenticate(_facts(None), FAMILY_V1)


def test_nonce_cache_is_bounded_in_size_and_time() -> None:
    cache = NonceCache(max_entries=2, window=300, per_credential=2)
    assert cache.add("hmac", "c", "n1", 1000, 1000.0) and cache.add("hmac", "c", "n2", 1000, 1000.0)
    with pytest.raises(OverloadedError):  # full of live nonces: refuse rather than forget one
        cache.add("hmac", "c", "n3", 1000, 1000.0)
    assert not cache.add("hmac", "c", "n1", 1000, 1100.0)
    assert cache.add("hmac", "c", "n3", 1400, 1302.0)  # n1, n2 expired (ts + window passed)
    assert len(cache) == 1


def test_one_credential_cannot_fill_the_nonce_cache_for_the_others() -> None:
    """Issue 15, finding 5: before, one authenticated client's nonces could fill the global cache and
    lock every other client out. Each credential now has its quota."""
    cache = NonceCache(max_entries=100, window=300)  # a quarter each by default
    for i in range(25):
        assert cache.add("hmac", "flood", f"n{i}", 1000, 1000.0)
    with pytest.raises(OverloadedError, match="this credential"):
        cache.add("hmac", "flood", "n25", 1000, 1000.0)
    assert all(cache.add("hmac", "other", f"n{i}", 1000, 1000.0) for i in range(25))
    assert cache.add("hmac", "flood", "again", 1400, 1302.0)  # the flood's nonces expired: room again


def test_cert_names_from_a_peer_certificate() -> None:
    peer = {"subject": ((("commonName", "export-1"),),), "subjectAltName": (("DNS", "export-1.example"),
                                                                          ("IP Address", "10.0.0.1"))}
    # Issue 15, finding 10: with a SAN, the CN is not an identity (before, both were honoured).
    assert cert_names(peer) == {"export-1.example"}
    assert cert_names({"subject": ((("commonName", "export-1"),),)}) == {"export-1"}
    assert cert_names({}) is None and cert_names(None) is None


# -- the clients file --------------------------------------------------------------------------------------------


def _clients_file(tmp_path: Path, doc: object, mode: int = 0o600, name: str = "clients.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc) if name.endswith(".json") else str(doc))
    os.chmod(p, mode)
    return p


def test_clients_file_toml_and_json(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("q" * 40 + "\n")
    os.chmod(tmp_path / "s", 0o600)
    toml = _clients_file(tmp_path, """
[[clients]]
name = "export-1"
roles = ["unwrap"]
cert_names = ["export-1.example"]
[[clients.credentials]]
id = "a"
secret = "0123456789abcdef0123456789abcdef"
[[clients.credentials]]
id = "b"
secret_file = "s"
not_after = "2099-01-01T00:00:00Z"
""", name="clients.toml")
    reg = ClientRegistry.load(toml)
    found = reg.by_credential("b")
    assert found is not None and found[1].secret == b"q" * 40 and "q" * 40 not in repr(found[1])
    assert reg.by_cert_names({"export-1.example"}) is not None
    # Issue 15, finding 11: a secret_file others may read is refused, like the clients file (before: read).
    os.chmod(tmp_path / "s", 0o644)
    with pytest.raises(LKMConfigError, match="secret_file"):
        ClientRegistry.load(toml)


def test_an_unknown_credential_id_costs_what_a_known_one_does() -> None:
    """Issue 15, finding 11: an unknown id was refused before any MAC, so a request with a large body
    answered measurably faster for unknown ids than for known ones (which ids exist leaked by time).
    Interleaved medians of 1 MiB bodies: the unknown path must cost at least half the known one."""
    import statistics
    import time

    body = os.urandom(1 << 20)
    auth = Authenticator(_registry(), NonceCache(), mode=MODE_HMAC)
    known = _signed("exp-old", b"not the secret, but long enough", body)
    unknown = _signed("nobody", b"not the secret, but long enough", body)
    times: dict[str, list[float]] = {"known": [], "unknown": []}
    for _ in range(40):
        for name, facts in (("known", known), ("unknown", unknown)):
            t0 = time.perf_counter()
            with pytest.raises(UnauthenticatedError):
                auth.authenticate(facts, FAMILY_V1)  # both refused: a wrong secret for exp-old, no such id
            times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(times["unknown"]) / statistics.median(times["known"])
    assert ratio > 0.5, f"unknown ids answer in {ratio:.2f}x the time of known ones"


@pytest.mark.parametrize(("doc", "match"), [
    ({"clients": [{"name": "x", "roles": ["root"], "cert_names": ["x"]}]}, "roles"),
    ({"clients": [{"name": "x", "roles": ["unwrap"]}]}, "never authenticate"),
    ({"clients": [{"name": "x", "roles": ["unwrap"], "credentials": [
        {"id": f"c{i}", "secret": "s" * 32} for i in range(3)]}]}, "at most 2"),
    ({"clients": [{"name": "x", "roles": ["unwrap"], "credentials": [{"id": "c", "secret": "short"}]}]}, "at least"),
    ({"clients": [{"name": "x", "roles": ["unwrap"], "cert_names": ["x"]},
                  {"name": "x", "roles": ["admin"], "cert_names": ["y"]}]}, "twice"),
    ({"clients": [{"name": "x", "roles": ["unwrap"], "cert_names": ["x"], "password": "p"}]}, "nothing else"),
    ({"clients": [{"name": "x", "roles": ["unwrap"], "credentials": [
        {"id": "c", "secret": "s" * 32, "scheme": "basic"}]}]}, "scheme"),
])
def test_clients_file_mistakes_are_named(tmp_path: Path, doc: object, match: str) -> None:
    with pytest.raises(LKMConfigError, match=match):
        ClientRegistry.load(_clients_file(tmp_path, doc))


def test_clients_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    doc = {"clients": [{"name": "x", "roles": ["unwrap"], "cert_names": ["x"]}]}
    with pytest.raises(LKMConfigError, match="mode 0644"):
        ClientRegistry.load(_clients_file(tmp_path, doc, 0o644))
    assert ClientRegistry.load(_clients_file(tmp_path, doc, 0o640)).clients


def test_credentials_expire(tmp_path: Path) -> None:
    doc = {"clients": [{"name": "x", "roles": ["unwrap"], "credentials": [
        {"id": "old", "secret": "s" * 32, "not_after": "2001-01-01T00:00:00Z"}]}]}
    auth = Authenticator(ClientRegistry.load(_clients_file(tmp_path, doc)), NonceCache())
    with pytest.raises(UnauthenticatedError, match="validity"):
        auth.authenticate(_signed("old", b"s" * 32), FAMILY_V1)
