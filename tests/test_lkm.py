"""The Local Key Manager over real TLS on loopback: what it answers, what it refuses, and what it audits.

Every refusal test checks that the handler never ran (the service's handler counters) and that the
refusal is in the audit log (or, for a failed TLS handshake, that nothing reached HTTP at all).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lkm_support as ls
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mediaseal import codec
from mediaseal.keys.keyring import Keyring
from mediaseal.keys.keyset import load_signer, verify_keyset
from mediaseal.keys.lkm.auth import hawk_header, sign_request
from mediaseal.keys.lkm.client import ClientCredential, LKMClient, rewrap_package
from mediaseal.keys.lkm.errors import (
    ForbiddenError,
    KeyServiceUnreachableError,
    LKMUnknownKeyError,
    RateLimitedError,
    TooLargeError,
    UnauthenticatedError,
    UnwrapFailedError,
)
from mediaseal.keys.lkm.genesys import PKCS1_REFUSAL, keypair_id

CLIENTS = [
    {"name": "export-1", "roles": ["unwrap"], "cert_names": ["export-1"],
     "credentials": [{"id": "exp-a", "secret": ls.secret("exp-a")}, {"id": "exp-b", "secret": ls.secret("exp-b")}]},
    {"name": "admin-1", "roles": ["admin", "publish"], "cert_names": ["admin-1"],
     "credentials": [{"id": "adm", "secret": ls.secret("adm")}]},
    {"name": "genesys", "roles": ["unwrap"],
     "credentials": [{"id": "genesys-hawk", "secret": ls.secret("genesys-hawk"), "scheme": "hawk"}]},
    {"name": "genesys-admin", "roles": ["admin"],
     "credentials": [{"id": "genesys-admin", "secret": ls.secret("genesys-admin"), "scheme": "hawk"}]},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keyrings (made once: RSA key generation is slow), the PKI and the clients file."""
    d = tmp_path_factory.mktemp("lkm")
    Keyring.init(d / "keyring", ls.PASSPHRASE)
    Keyring.init(d / "genesys", ls.PASSPHRASE, alg=codec.RSA_OAEP)
    return {"dir": d, "pki": ls.make_pki(d / "pki"), "clients": ls.write_clients(d / "clients.json", CLIENTS)}


@pytest.fixture(scope="module")
def server(world: dict[str, Any]) -> Iterator[ls.LKMServer]:
    """--auth any with a client CA (certificates optional at TLS), the Genesys shim on."""
    d = world["dir"]
    cfg = ls.config(d / "any", d / "keyring", world["pki"], world["clients"], genesys_keyring=d / "genesys",
                    max_batch=8, max_body=64 * 1024)
    with ls.LKMServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(world: dict[str, Any]) -> Iterator[ls.LKMServer]:
    """--auth mtls: a client certificate is required; connecting without one is refused by the gate."""
    d = world["dir"]
    with ls.LKMServer(ls.config(d / "mtls", d / "keyring", world["pki"], world["clients"], auth_mode="mtls")) as srv:
        yield srv


def ring(world: dict[str, Any], name: str = "keyring") -> Keyring:
    return Keyring.open(world["dir"] / name)


def client(srv: ls.LKMServer, world: dict[str, Any], cred: str | None = "exp-a", cert: str | None = None,
           **kw: Any) -> LKMClient:
    pki: ls.PKI = world["pki"]
    c = pki.clients[cert] if cert else (None, None)
    return LKMClient(srv.url, credential=ClientCredential(cred, ls.secret(cred).encode()) if cred else None,
                     ca_file=pki.ca, cert_file=c[0], key_file=c[1], **kw)


def fresh_wrap(world: dict[str, Any], name: str = "keyring") -> tuple[bytes, codec.Wrap]:
    kr = ring(world, name)
    dek = os.urandom(32)
    cur = kr.current()
    return dek, codec.wrap_dek(dek, kr.public_key(cur.kid), cur.kid, cur.alg)


def unwrap_body(w: codec.Wrap, **extra: Any) -> bytes:
    return json.dumps({"kid": w.kid, "alg": w.alg, "wrapped": base64.b64encode(w.wrapped).decode(), **extra}).encode()


def signed(cred: str, method: str, path: str, body: bytes, **kw: Any) -> dict[str, str]:
    return {"Authorization": sign_request(cred, ls.secret(cred).encode(), method, path, body, **kw)}


def last_audit(srv: ls.LKMServer) -> dict[str, Any]:
    return srv.audit_lines()[-1]


# -- unwrap: the ways in ------------------------------------------------------------------------------------


def test_unwrap_over_hmac_and_the_audit_line_never_holds_the_dek(server: ls.LKMServer, world: dict[str, Any]) -> None:
    dek, w = fresh_wrap(world)
    assert client(server, world).unwrap([w]) == dek
    line = last_audit(server)
    assert line["operation"] == "unwrap" and line["outcome"] == "ok" and line["principal"] == "export-1"
    assert line["via"] == "hmac" and line["credential_id"] == "exp-a" and line["kid"] == w.kid
    text = server.config.audit_log.read_text()
    assert base64.b64encode(dek).decode() not in text and dek.hex() not in text
    assert ls.secret("exp-a") not in text and base64.b64encode(w.wrapped).decode() not in text
    assert os.stat(server.config.audit_log).st_mode & 0o777 == 0o600
    # The second credential of the same client works too (rotation: both live at once).
    dek2, w2 = fresh_wrap(world)
    assert client(server, world, "exp-b").unwrap([w2]) == dek2


def test_unwrap_over_mtls(mtls_server: ls.LKMServer, world: dict[str, Any]) -> None:
    dek, w = fresh_wrap(world)
    assert client(mtls_server, world, cred=None, cert="export-1").unwrap([w]) == dek
    assert last_audit(mtls_server)["via"] == "mtls"


def test_unwrap_over_mtls_and_hmac_together(server: ls.LKMServer, world: dict[str, Any]) -> None:
    dek, w = fresh_wrap(world)
    assert client(server, world, cred="exp-a", cert="export-1").unwrap([w]) == dek
    assert last_audit(server)["via"] == "mtls+hmac"


def test_recording_id_reaches_the_audit(server: ls.LKMServer, world: dict[str, Any]) -> None:
    dek, w = fresh_wrap(world)
    c = client(server, world)
    assert c._sync(lambda: c.unwrap_async([w], recording_id="rec-77")) == dek
    assert last_audit(server)["recording_id"] == "rec-77"


# -- refusals: the handler never runs -----------------------------------------------------------------------


def refused(srv: ls.LKMServer, operation: str, status: int, code: str, response: tuple[int, dict[str, str], bytes],
            before: int) -> dict[str, Any]:
    got_status, headers, body = response
    assert got_status == status, body
    doc = json.loads(body)
    assert doc["error"]["code"] == code and headers["x-request-id"] == doc["request_id"]
    assert srv.handler_calls(operation) == before  # the handler never ran
    line = last_audit(srv)
    assert line["request_id"] == doc["request_id"] and line["outcome"] == code and line["status"] == status
    assert line["operation"] == operation and "kid" not in line
    return line


def test_no_client_certificate_when_mtls_is_required(mtls_server: ls.LKMServer, world: dict[str, Any]) -> None:
    _, w = fresh_wrap(world)
    before = mtls_server.handler_calls("unwrap")
    body = unwrap_body(w)
    r = ls.raw(mtls_server.url, "POST", "/v1/unwrap", body, signed("exp-a", "POST", "/v1/unwrap", body),
               ctx=ls.tls_context(world["pki"]))
    line = refused(mtls_server, "unwrap", 401, "unauthenticated", r, before)
    assert line["principal"] is None and "certificate is required" in line["detail"]
    with pytest.raises(UnauthenticatedError, match="certificate is required"):
        client(mtls_server, world).unwrap([w])


def test_client_certificate_from_a_wrong_ca_fails_the_handshake(mtls_server: ls.LKMServer,
                                                               world: dict[str, Any]) -> None:
    _, w = fresh_wrap(world)
    before, lines = mtls_server.handler_calls("unwrap"), len(mtls_server.audit_lines())
    pki: ls.PKI = world["pki"]
    ctx = ls.tls_context(pki, client=pki.rogue["export-1"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ls.raw(mtls_server.url, "POST", "/v1/unwrap", unwrap_body(w), ctx=ctx)
    rogue = LKMClient(mtls_server.url, ca_file=pki.ca, cert_file=pki.rogue["export-1"][0],
                      key_file=pki.rogue["export-1"][1])
    with pytest.raises(KeyServiceUnreachableError, match="key service unreachable"):
        rogue.unwrap([w])
    # Nothing got as far as HTTP: no handler, no audit line.
    assert mtls_server.handler_calls("unwrap") == before and len(mtls_server.audit_lines()) == lines


def test_server_certificate_from_a_wrong_ca_is_refused_by_the_client(server: ls.LKMServer,
                                                                     world: dict[str, Any]) -> None:
    _, w = fresh_wrap(world)
    c = LKMClient(server.url, credential=ClientCredential("exp-a", ls.secret("exp-a").encode()),
                  ca_file=world["pki"].other_ca)
    with pytest.raises(KeyServiceUnreachableError, match="TLS certificate does not verify"):
        c.unwrap([w])


def test_require_client_cert_refuses_the_handshake(world: dict[str, Any]) -> None:
    d = world["dir"]
    cfg = ls.config(d / "strict", d / "keyring", world["pki"], world["clients"], auth_mode="mtls",
                    require_client_cert=True)
    with ls.LKMServer(cfg) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ls.raw(srv.url, "GET", "/v1/health", ctx=ls.tls_context(world["pki"]))
        status, _, _ = ls.raw(srv.url, "GET", "/v1/health", ctx=ls.tls_context(world["pki"], world["pki"].clients[
            "export-1"]))
        assert status == 200


def test_bad_signature(server: ls.LKMServer, world: dict[str, Any]) -> None:
    _, w = fresh_wrap(world)
    body = unwrap_body(w)
    before = server.handler_calls("unwrap")
    headers = {"Authorization": sign_request("exp-a", b"not the secret at all, but long enough", "POST",
                                             "/v1/unwrap", body)}
    line = refused(server, "unwrap", 401, "unauthenticated",
                   ls.raw(server.url, "POST", "/v1/unwrap", body, headers, ls.tls_context(world["pki"])), before)
    assert line["claimed_id"] == "exp-a" and "signature does not verify" in line["detail"]
    # A signature over another body does not carry over to this one.
    other = signed("exp-a", "POST", "/v1/unwrap", body + b" ")
    refused(server, "unwrap", 401, "unauthenticated",
            ls.raw(server.url, "POST", "/v1/unwrap", body, other, ls.tls_context(world["pki"])), before)


def test_replayed_request(server: ls.LKMServer, world: dict[str, Any]) -> None:
    dek, w = fresh_wrap(world)
    body = unwrap_body(w)
    headers = signed("exp-a", "POST", "/v1/unwrap", body)
    before = server.handler_calls("unwrap")
    status, _, answer = ls.raw(server.url, "POST", "/v1/unwrap", body, headers, ls.tls_context(world["pki"]))
    assert status == 200 and base64.b64decode(json.loads(answer)["dek"]) == dek
    line = refused(server, "unwrap", 401, "unauthenticated",
                   ls.raw(server.url, "POST", "/v1/unwrap", body, headers, ls.tls_context(world["pki"])), before + 1)
    assert "replayed" in line["detail"]


def test_a_captured_request_is_refused_after_a_restart(world: dict[str, Any]) -> None:
    """Issue 15, finding 4, against the real HTTPS service: a signed unwrap is answered, captured, the
    service restarted, and the same bytes sent again. Before, the in-memory nonce cache had forgotten
    them and the replay was answered with the DEK."""
    d = world["dir"]
    cfg = ls.config(d / "restart", d / "keyring", world["pki"], world["clients"])
    dek, w = fresh_wrap(world)
    body = unwrap_body(w)
    with ls.LKMServer(cfg) as first:
        headers = signed("exp-a", "POST", "/v1/unwrap", body)
        status, _, answer = ls.raw(first.url, "POST", "/v1/unwrap", body, headers, ls.tls_context(world["pki"]))
        assert status == 200 and base64.b64decode(json.loads(answer)["dek"]) == dek
    signed_at = int(headers["Authorization"].split('ts="')[1].split('"')[0])
    while int(time.time()) <= signed_at:  # the next second: a restart is never in the same one
        time.sleep(0.05)
    with ls.LKMServer(cfg) as second:
        before = second.handler_calls("unwrap")
        line = refused(second, "unwrap", 401, "unauthenticated",
                       ls.raw(second.url, "POST", "/v1/unwrap", body, headers, ls.tls_context(world["pki"])),
                       before)
        assert "before this service started" in line["detail"], line
        # A request signed now goes through.
        status, _, answer = ls.raw(second.url, "POST", "/v1/unwrap", body,
                                   signed("exp-a", "POST", "/v1/unwrap", body), ls.tls_context(world["pki"]))
        assert status == 200 and base64.b64decode(json.loads(answer)["dek"]) == dek


def test_tls_1_2_offers_only_aead_suites(server: ls.LKMServer, world: dict[str, Any]) -> None:
    """Issue 15, finding 11: TLS 1.2 accepted two CBC suites. A client offering only CBC (or only
    non-forward-secret) suites is refused at the handshake; one offering AES-GCM gets it."""
    import ssl

    for ciphers in ("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256:"
                    "ECDHE-RSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA",
                    "AES128-GCM-SHA256:AES256-GCM-SHA384"):
        ctx = ls.tls_context(world["pki"])
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ls.raw(server.url, "GET", "/v1/keyset", ctx=ctx)
    ctx = ls.tls_context(world["pki"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    assert ls.raw(server.url, "GET", "/v1/keyset", ctx=ctx)[0] == 200


def test_stale_timestamp(server: ls.LKMServer, world: dict[str, Any]) -> None:
    _, w = fresh_wrap(world)
    body = unwrap_body(w)
    before = server.handler_calls("unwrap")
    for skew in (-301, 301):
        headers = signed("exp-a", "POST", "/v1/unwrap", body, ts=int(time.time()) + skew)
        line = refused(server, "unwrap", 401, "unauthenticated",
                       ls.raw(server.url, "POST", "/v1/unwrap", body, headers, ls.tls_context(world["pki"])), before)
        assert "window" in line["detail"]


def test_wrong_role(server: ls.LKMServer, world: dict[str, Any]) -> None:
    _, w = fresh_wrap(world)
    before = server.handler_calls("unwrap")
    with pytest.raises(ForbiddenError, match="lacks the role unwrap"):
        client(server, world, "adm").unwrap([w])
    line = last_audit(server)
    assert line["outcome"] == "forbidden" and line["principal"] == "admin-1"
    assert server.handler_calls("unwrap") == before
    before = server.handler_calls("keys.list")
    with pytest.raises(ForbiddenError):
        client(server, world)._sync(lambda: client(server, world).keys())
    assert server.handler_calls("keys.list") == before


def test_unknown_paths_need_authentication_first(server: ls.LKMServer, world: dict[str, Any]) -> None:
    ctx = ls.tls_context(world["pki"])
    status, _, body = ls.raw(server.url, "GET", "/v1/secrets", ctx=ctx)
    assert status == 401
    status, _, body = ls.raw(server.url, "GET", "/v1/secrets", headers=signed("exp-a", "GET", "/v1/secrets", b""),
                             ctx=ctx)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, body = ls.raw(server.url, "GET", "/v1/unwrap", headers=signed("exp-a", "GET", "/v1/unwrap", b""),
                             ctx=ctx)
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


# -- what the handlers do -------------------------------------------------------------------------------------


def test_unwrap_failures_are_named(server: ls.LKMServer, world: dict[str, Any]) -> None:
    dek, w = fresh_wrap(world)
    c = client(server, world)
    flipped = codec.Wrap(w.kid, w.alg, bytes([w.wrapped[0] ^ 1]) + w.wrapped[1:])
    with pytest.raises(UnwrapFailedError) as bad:
        c.unwrap([flipped])
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    foreign = codec.wrap_dek(dek, other.public_key(), w.kid, w.alg)  # right kid, wrong key
    with pytest.raises(UnwrapFailedError) as wrong:
        c.unwrap([foreign])
    assert str(bad.value) == str(wrong.value)  # bad padding and wrong key are one answer
    unknown = codec.Wrap("A" * 43, w.alg, w.wrapped)
    with pytest.raises(codec.NoMatchingKeyError):
        c.unwrap([unknown])
    assert c.unwrap([unknown, w]) == dek  # the first wrap the service holds a key for
    status, _, body = ls.raw(server.url, "POST", "/v1/unwrap", b'{"kid": 1}',
                             signed("exp-a", "POST", "/v1/unwrap", b'{"kid": 1}'), ls.tls_context(world["pki"]))
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"


def test_batch_unwrap(server: ls.LKMServer, world: dict[str, Any]) -> None:
    pairs = [fresh_wrap(world) for _ in range(5)]
    flipped = codec.Wrap(pairs[0][1].kid, pairs[0][1].alg, bytes(len(pairs[0][1].wrapped)))
    items: list[codec.Wrap | tuple[codec.Wrap, str | None]] = [(w, f"rec-{i}") for i, (_, w) in enumerate(pairs)]
    items.insert(2, flipped)
    items.append(codec.Wrap("B" * 43, codec.RSA_OAEP_256, b"x" * 384))
    c = client(server, world)
    before = server.handler_calls("unwrap.batch")
    results = c._sync(lambda: c.unwrap_batch(items))
    assert [r for i, r in enumerate(results) if i not in (2, 6)] == [dek for dek, _ in pairs]
    assert isinstance(results[2], UnwrapFailedError) and isinstance(results[6], LKMUnknownKeyError)
    assert server.handler_calls("unwrap.batch") == before + 1
    line = last_audit(server)
    assert line["operation"] == "unwrap.batch" and len(line["items"]) == 7
    assert [i["outcome"] for i in line["items"]].count("ok") == 5 and line["items"][0]["recording_id"] == "rec-0"
    # Bounded: more than max_batch (8 here) is too large, and the handler refuses before any unwrap.
    big = [w for _, w in pairs] * 2
    with pytest.raises(TooLargeError):
        c._sync(lambda: client(server, world).unwrap_batch(big))


def test_body_size_is_bounded(server: ls.LKMServer, world: dict[str, Any]) -> None:
    body = b'{"kid": "' + b"x" * (80 * 1024) + b'"}'
    before = server.handler_calls("unwrap")
    r = ls.raw(server.url, "POST", "/v1/unwrap", body, signed("exp-a", "POST", "/v1/unwrap", body),
               ls.tls_context(world["pki"]))
    refused(server, "unwrap", 413, "too_large", r, before)


def test_rewrap_result_decrypts_with_codec(world: dict[str, Any], tmp_path: Path) -> None:
    """A package sealed to key A; a new key B becomes current; the service re-wraps the DEK for B."""
    d = tmp_path
    Keyring.init(d / "kr", ls.PASSPHRASE)  # its own keyring: this test rotates it
    kr = Keyring.open(d / "kr")
    old = kr.current().kid
    data = os.urandom(10_000)
    header, keys = codec.new_package(codec.Metadata("rec-rewrap", "call"), [kr.recipient()], 4096)
    src = io.BytesIO()
    codec.seal(io.BytesIO(data), src, header, keys)
    with ls.LKMServer(ls.config(d / "srv", d / "kr", world["pki"], world["clients"])) as srv:
        admin = client(srv, world, "adm")
        created = admin._sync(lambda: admin.create_key())
        new = created["key"]["kid"]
        assert created["current"] == new != old
        before = srv.handler_calls("rewrap")
        out = io.BytesIO()
        src.seek(0)
        rewrapped = rewrap_package(src, out, client(srv, world))
        assert [w.kid for w in rewrapped.wraps] == [new] and srv.handler_calls("rewrap") == before + 1
        line = last_audit(srv)
        assert line["kid"] == old and line["to_kid"] == new and line["recording_id"] == "rec-rewrap"
        # The old key retired: the service holds it no more; the re-wrapped package still opens.
        admin._sync(lambda: admin.set_state(old, "retired"))
        src.seek(0)
        with pytest.raises(LKMUnknownKeyError, match="none of the wraps"):
            rewrap_package(src, io.BytesIO(), client(srv, world))
    plain = io.BytesIO()
    out.seek(0)
    codec.open_package(out, Keyring.open(d / "kr").unlock(ls.PASSPHRASE)).decrypt_to(plain)
    assert plain.getvalue() == data


def test_keyset_is_public_signed_and_cached(server: ls.LKMServer, world: dict[str, Any]) -> None:
    ctx = ls.tls_context(world["pki"])
    status, headers, body = ls.raw(server.url, "GET", "/v1/keyset", ctx=ctx)
    assert status == 200
    keyset = verify_keyset(body, load_signer(ring(world).signer_pem()))
    assert keyset.current == ring(world).current().kid
    status, _, _ = ls.raw(server.url, "GET", "/v1/keyset", headers={"If-None-Match": headers["etag"]}, ctx=ctx)
    assert status == 304
    # Publishing needs the publish role; admin-1 has it, export-1 does not.
    admin = client(server, world, "adm")
    fresh = admin._sync(lambda: admin.request("POST", "/v1/keyset", {"ttl_seconds": 3600}, raw=True))
    assert verify_keyset(fresh, load_signer(ring(world).signer_pem())).serial > keyset.serial
    c = client(server, world)
    with pytest.raises(ForbiddenError):
        c._sync(lambda: c.request("POST", "/v1/keyset", {}))


def test_deep_health(server: ls.LKMServer, world: dict[str, Any]) -> None:
    status, _, body = ls.raw(server.url, "GET", "/v1/health", ctx=ls.tls_context(world["pki"]))
    assert status == 200
    assert json.loads(body) == {"status": "ok", "checks": {"keyring": "ok", "genesys_keyring": "ok",
                                                            "audit_log": "ok"}}


def test_rate_limit(world: dict[str, Any]) -> None:
    d = world["dir"]
    with ls.LKMServer(ls.config(d / "rate", d / "keyring", world["pki"], world["clients"], rate_limit=1.0)) as srv:
        c = client(srv, world, attempts=1)
        _, w = fresh_wrap(world)
        c.cache.ttl = 0
        outcomes = []
        for _ in range(5):
            try:
                c.unwrap([w])
                outcomes.append("ok")
            except RateLimitedError:
                outcomes.append("rate_limited")
        assert outcomes[:2] == ["ok", "ok"] and "rate_limited" in outcomes  # burst 2, then 1 per second
        assert last_audit(srv)["outcome"] == "rate_limited"


def test_audit_failure_closes_the_service(world: dict[str, Any]) -> None:
    """If an audit line can't be made durable, the answer does not go out, and nothing after it either."""
    d = world["dir"]
    with ls.LKMServer(ls.config(d / "broken", d / "keyring", world["pki"], world["clients"])) as srv:
        dek, w = fresh_wrap(world)
        c = client(srv, world, attempts=1)
        assert c.unwrap([w]) == dek
        assert srv.service.audit is not None
        os.close(srv.service.audit._fd)  # the disk goes away under the service
        c.cache.clear()
        with pytest.raises(Exception, match="unavailable") as e:
            c.unwrap([w])
        assert base64.b64encode(dek).decode() not in str(e.value)
        status, _, _ = ls.raw(srv.url, "GET", "/v1/health", ctx=ls.tls_context(world["pki"]))
        assert status == 503
        srv.service.audit._fd = os.open(os.devnull, os.O_WRONLY)  # let stop() close something


# -- the Genesys-compatible shim ---------------------------------------------------------------------------------


def hawk(cred: str, method: str, path: str, port: int, body: bytes | None = None, **kw: Any) -> dict[str, str]:
    return {"Authorization": hawk_header(cred, ls.secret(cred).encode(), method, path, "127.0.0.1", port,
                                         payload=body, content_type="application/json", **kw)}


def test_genesys_keypair_and_decrypt(server: ls.LKMServer, world: dict[str, Any]) -> None:
    ctx, port = ls.tls_context(world["pki"]), server.port
    path = "/key-management/v1/keypair"
    status, _, body = ls.raw(server.url, "POST", path, b"", hawk("genesys-admin", "POST", path, port), ctx)
    assert status == 200, body
    kp = json.loads(body)
    assert str(uuid.UUID(kp["id"])) == kp["id"] and isinstance(kp["dateCreated"], int)
    public = serialization.load_der_public_key(base64.b64decode(kp["publicKey"]))  # PKCS#1 RSAPublicKey DER
    assert base64.b64decode(kp["publicKey"])[:2] == b"\x30\x82" and isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 3072
    kid = ring(world, "genesys").current().kid
    assert keypair_id(kid) == kp["id"] and ring(world, "genesys").current().alg == codec.RSA_OAEP
    assert last_audit(server)["kid"] == kid and last_audit(server)["keypair_id"] == kp["id"]

    dek = os.urandom(32)
    wrapped = public.encrypt(dek, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    decrypt = "/key-management/v1/decrypt"
    doc = json.dumps({"keypairId": kp["id"], "body": base64.b64encode(wrapped).decode(), "decryptType": None}).encode()
    status, _, body = ls.raw(server.url, "POST", decrypt, doc, {**hawk("genesys-hawk", "POST", decrypt, port, doc),
                                                                "PureCloud-User-Id": "user-42"}, ctx)
    assert status == 200, body
    assert base64.b64decode(json.loads(body)["body"]) == dek
    line = last_audit(server)
    assert line["operation"] == "genesys.decrypt" and line["via"] == "hawk" and line["on_behalf_of"] == "user-42"

    # Hawk's replay rules hold.
    headers = hawk("genesys-hawk", "POST", decrypt, port, doc)
    assert ls.raw(server.url, "POST", decrypt, doc, headers, ctx)[0] == 200
    before = server.handler_calls("genesys.decrypt")
    refused(server, "genesys.decrypt", 401, "unauthenticated", ls.raw(server.url, "POST", decrypt, doc, headers, ctx),
            before)
    # Issue 15, finding 9: a MAC that does not cover the body (no hash=) is refused by default: whoever
    # saw one signed request could send any body under it. (Before, it was answered.)
    line = refused(server, "genesys.decrypt", 401, "unauthenticated",
                   ls.raw(server.url, "POST", decrypt, doc, hawk("genesys-hawk", "POST", decrypt, port), ctx), before)
    assert "payload hash" in line["detail"], line

    # OPTIONS answers without credentials (Genesys probes the endpoint with it).
    status, headers_, _ = ls.raw(server.url, "OPTIONS", decrypt, ctx=ctx)
    assert status == 200 and "POST" in headers_["allow"]


def test_genesys_refuses_pkcs1_and_foreign_credentials(server: ls.LKMServer, world: dict[str, Any]) -> None:
    ctx, port = ls.tls_context(world["pki"]), server.port
    kid = ring(world, "genesys").current().kid
    decrypt = "/key-management/v1/decrypt"
    doc = json.dumps({"keypairId": keypair_id(kid), "body": base64.b64encode(b"x" * 384).decode(),
                      "decryptType": "pkcs1"}).encode()
    status, _, body = ls.raw(server.url, "POST", decrypt, doc, hawk("genesys-hawk", "POST", decrypt, port, doc), ctx)
    assert status == 400 and json.loads(body)["error"] == {"code": "unsupported", "message": PKCS1_REFUSAL}
    assert "Bleichenbacher" in PKCS1_REFUSAL
    before = server.handler_calls("genesys.decrypt")
    # A mediaseal HMAC credential is not a Hawk credential, nor the other way round.
    r = ls.raw(server.url, "POST", decrypt, doc, signed("exp-a", "POST", decrypt, doc), ctx)
    refused(server, "genesys.decrypt", 401, "unauthenticated", r, before)
    assert r[1]["www-authenticate"] == "Hawk"
    r = ls.raw(server.url, "POST", "/v1/unwrap", doc, hawk("genesys-hawk", "POST", "/v1/unwrap", port, doc), ctx)
    assert r[0] == 401
    # The unwrap role can't create keypairs.
    path = "/key-management/v1/keypair"
    before = server.handler_calls("genesys.keypair")
    refused(server, "genesys.keypair", 403, "forbidden",
            ls.raw(server.url, "POST", path, b"", hawk("genesys-hawk", "POST", path, port), ctx), before)
    # A MAC for another host or port does not verify here.
    r = ls.raw(server.url, "POST", decrypt, doc, {"Authorization": hawk_header(
        "genesys-hawk", ls.secret("genesys-hawk").encode(), "POST", decrypt, "127.0.0.1", port + 1)}, ctx)
    assert r[0] == 401
    # Unknown keypair.
    doc = json.dumps({"keypairId": str(uuid.uuid4()), "body": base64.b64encode(b"x" * 384).decode()}).encode()
    status, _, body = ls.raw(server.url, "POST", decrypt, doc, hawk("genesys-hawk", "POST", decrypt, port, doc), ctx)
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_key"


def test_genesys_stale_hawk_gets_the_server_time(server: ls.LKMServer, world: dict[str, Any]) -> None:
    decrypt = "/key-management/v1/decrypt"
    headers = hawk("genesys-hawk", "POST", decrypt, server.port, b"{}", ts=int(time.time()) - 1000)
    status, resp_headers, _ = ls.raw(server.url, "POST", decrypt, b"{}", headers, ls.tls_context(world["pki"]))
    assert status == 401 and 'error="Stale timestamp"' in resp_headers["www-authenticate"]


def test_rotation_schedule_hook_runs_and_republishes(world: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The service calls mediaseal.keys.rotation.rotate_if_due(keyring, passphrase); a change re-signs the key set."""
    import mediaseal.keys.rotation

    calls: list[str] = []

    def fake_rotate_if_due(keyring: Keyring, passphrase: bytes | None) -> str:
        calls.append(keyring.current().kid)
        keyring.rotate(passphrase, pending=True)
        return "added a pending key"

    monkeypatch.setattr(mediaseal.keys.rotation, "rotate_if_due", fake_rotate_if_due)
    Keyring.init(tmp_path / "kr", ls.PASSPHRASE)
    cfg = ls.config(tmp_path / "srv", tmp_path / "kr", world["pki"], world["clients"], rotation_check=3600)
    with ls.LKMServer(cfg) as srv:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, _, body = ls.raw(srv.url, "GET", "/v1/keyset", ctx=ls.tls_context(world["pki"]))
            keyset = verify_keyset(body, load_signer(Keyring.open(tmp_path / "kr").signer_pem()))
            if len(keyset.keys) == 2:
                break
            time.sleep(0.1)
        assert calls and sorted(k.state for k in keyset.keys) == ["active", "pending"]


def test_sighup_reloads_the_clients_file(world: dict[str, Any], tmp_path: Path) -> None:
    d = world["dir"]
    clients = ls.write_clients(tmp_path / "clients.json", CLIENTS[:1])
    with ls.LKMServer(ls.config(tmp_path / "srv", d / "keyring", world["pki"], clients)) as srv:
        dek, w = fresh_wrap(world)
        new = client(srv, world, "exp-new")
        with pytest.raises(UnauthenticatedError):
            new.unwrap([w])
        rotated = [{**CLIENTS[0], "credentials": [CLIENTS[0]["credentials"][1],  # type: ignore[index]
                                                  {"id": "exp-new", "secret": ls.secret("exp-new")}]}]
        ls.write_clients(clients, rotated)
        srv.loop.call_soon_threadsafe(srv.service.reload_clients)
        deadline = time.monotonic() + 10
        while srv.service.registry.by_credential("exp-new") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert new.unwrap([w]) == dek
        with pytest.raises(UnauthenticatedError):  # the retired credential no longer works
            client(srv, world, "exp-a").unwrap([w])
        os.chmod(clients, 0o644)  # a bad file is logged and the previous one kept
        srv.loop.call_soon_threadsafe(srv.service.reload_clients)
        time.sleep(0.2)
        assert client(srv, world, "exp-b").unwrap([w]) == dek


def test_slow_clients_are_timed_out(world: dict[str, Any], tmp_path: Path) -> None:
    """A body that never arrives is a 408 (audited, handler not run); a TLS handshake that never starts is cut."""
    d = world["dir"]
    cfg = ls.config(tmp_path / "srv", d / "keyring", world["pki"], world["clients"], body_timeout=0.5,
                    handshake_timeout=0.5)
    with ls.LKMServer(cfg) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw_sock:
            time.sleep(1.0)
            assert raw_sock.recv(1) == b""  # closed by the server: no handshake within 0.5 s
        before = srv.handler_calls("unwrap")
        ctx = ls.tls_context(world["pki"])
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as tcp, \
                ctx.wrap_socket(tcp, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"POST /v1/unwrap HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{")
            answer = tls.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in answer
        assert srv.handler_calls("unwrap") == before and last_audit(srv)["outcome"] == "request_timeout"
