"""Key set sources (file, HTTPS with a private CA, S3) and the follower's rules, against real servers on loopback.

The HTTPS server is aiohttp with a throwaway CA (keyset_support); S3 is moto's ThreadedMotoServer
(the session fixture in conftest). The agent's own key source (agent/keysource.py) is driven
in-process here for its metric, log and staleness behaviour; tests/test_rotation.py runs the real
agent process against the HTTPS source.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from keyset_support import KeySetServer, TestCA

from mediaseal.agent import metrics
from mediaseal.agent.config import KeysConfig
from mediaseal.agent.keysource import PublicKeys
from mediaseal.keys.errors import BadSignatureError, KeySetExpiredError, KeySetFormatError
from mediaseal.keys.jwk import b64url_encode, public_jwk, thumbprint
from mediaseal.keys.keyring import Keyring
from mediaseal.keys.keyset import load_signer, signer_id
from mediaseal.keys.sources import (
    KeySetFile,
    KeySetFollower,
    KeySetHTTPS,
    KeySetRollbackError,
    KeySetS3,
    KeySetSourceError,
    open_keyset_source,
)

pytestmark = pytest.mark.usefixtures("pooled_keks")


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA.make(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def server(ca):
    s = KeySetServer(ca).start()
    yield s
    s.stop()


@pytest.fixture
def ring(tmp_path) -> Keyring:
    return Keyring.init(tmp_path / "keyring", None)  # master-key mode: no scrypt, quick


def signed(payload: dict, key: ed25519.Ed25519PrivateKey, fmt: str = "mediaseal-keyset/1") -> bytes:
    """A key set document signed independently of keys.keyset (which refuses to sign bad ones)."""
    raw = json.dumps(payload).encode()
    return json.dumps({"format": fmt, "payload": b64url_encode(raw), "signature": b64url_encode(key.sign(raw)),
                       "signer": signer_id(key.public_key())}).encode()


def entry(pub: rsa.RSAPublicKey, state: str) -> dict:
    return {"kid": thumbprint(pub), "alg": "RSA-OAEP-256", "state": state, **public_jwk(pub)}


def tampered(document: bytes) -> bytes:
    doc = json.loads(document)
    payload = bytearray(doc["payload"].encode())
    payload[40] = ord("A") if payload[40] != ord("A") else ord("B")
    doc["payload"] = payload.decode()
    return json.dumps(doc).encode()


# -- HTTPS ----------------------------------------------------------------------------------------


async def test_https_source_etag_rotation_tamper_and_rollback(server, ca, ring) -> None:
    first = ring.publish(None)
    server.document = first
    follower = KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), ring.signer)
    ks1 = await follower.refresh()
    assert ks1.current == ring.current().kid and ks1.serial == 1
    assert follower.etag == KeySetServer.etag_of(first)

    assert await follower.refresh() is ks1  # If-None-Match -> 304: the set in use stays
    assert (server.conditional, server.not_modified, server.hits) == (1, 1, 1)

    old = ring.current().kid
    ring.rotate(None)
    server.document = ring.publish(None)
    ks2 = await follower.refresh()
    assert ks2.serial == 2 and ks2.current == ring.current().kid != old
    assert ks2.key(old).state == "decrypt-only"

    server.document = tampered(ring.publish(None))  # serial 3, altered after signing
    with pytest.raises(BadSignatureError):
        await follower.refresh()
    assert follower.keyset is ks2  # the last valid set is kept

    server.document = first  # validly signed, but older: a replay
    with pytest.raises(KeySetRollbackError, match="serial 1, lower than the serial 2"):
        await follower.refresh()
    assert follower.keyset is ks2

    server.fail_with = 503
    with pytest.raises(KeySetSourceError, match="HTTP 503"):
        await follower.refresh()
    assert follower.keyset is ks2


async def test_https_source_needs_the_ca_bundle(server, ring) -> None:
    server.document = ring.publish(None)
    follower = KeySetFollower(KeySetHTTPS(server.url), ring.signer)  # system CAs don't know the test CA
    with pytest.raises(KeySetSourceError, match="certificate"):
        await follower.refresh()
    assert follower.keyset is None and server.hits == 0


async def test_https_source_down_is_one_plain_line(ca) -> None:
    """Connection refused: one line naming the host and the OS error (no object reprs, no addresses)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KeySetSourceError) as e:
        await KeySetHTTPS(f"https://127.0.0.1:{port}/keyset.json", ca_bundle=ca.ca_pem).fetch(None)
    text = str(e.value)
    assert f"unreachable: cannot connect to 127.0.0.1:{port}: " in text and "object at 0x" not in text, text
    assert "\n" not in text


async def test_rejected_documents(server, ca, ring) -> None:
    """Bad signature, unknown format, no current key, a non-RSA-3072 current key: each refused, old set kept."""
    signer = ed25519.Ed25519PrivateKey.generate()
    follower = KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), signer.public_key())
    kek = ring.public_key(ring.current().kid)
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()

    def payload(keys_: list, current: str, serial: int = 5) -> dict:
        return {"issued_at": "2020-01-01T00:00:00Z", "expires_at": "2999-01-01T00:00:00Z", "serial": serial,
                "current": current, "keys": keys_}

    server.document = signed(payload([entry(kek, "active")], thumbprint(kek)), signer)
    good = await follower.refresh()
    cases = [
        (signed(payload([entry(kek, "active")], thumbprint(kek), 6), ed25519.Ed25519PrivateKey.generate()),
         BadSignatureError),
        (signed(payload([entry(kek, "active")], thumbprint(kek), 6), signer, fmt="mediaseal-keyset/9"),
         KeySetFormatError),
        (signed(payload([entry(kek, "decrypt-only")], thumbprint(kek), 6), signer), KeySetFormatError),
        (signed(payload([entry(small, "active")], thumbprint(small), 6), signer), KeySetFormatError),
        (signed({**payload([entry(kek, "active")], thumbprint(kek), 6), "expires_at": "2020-01-02T00:00:00Z"},
                signer), KeySetExpiredError),
    ]
    for document, error in cases:
        server.document = document
        with pytest.raises(error):
            await follower.refresh()
        assert follower.keyset is good


# -- the agent's key source: metric, log line, staleness -------------------------------------------


async def test_agent_keysource_keeps_last_key_then_stops_intake(server, ca, ring, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mediaseal")
    signer_pem = tmp_path / "signer.pem"
    signer_pem.write_bytes(ring.signer_pem())
    server.document = ring.publish(None)
    config = KeysConfig(keyset=server.url, signer=signer_pem, ca_bundle=ca.ca_pem, refresh_seconds=0.1,
                        max_staleness_seconds=0.6)
    keys = PublicKeys(config)
    assert await keys.refresh()
    kid = ring.current().kid
    assert keys.current() is not None and keys.current().kid == kid
    assert any(r.getMessage() == "keyset-loaded" and r.fields["current"] == kid for r in caplog.records)

    def failures(reason: str) -> float:
        return metrics.REGISTRY.get_sample_value("mediaseal_key_refresh_failures_total", {"reason": reason}) or 0.0

    before = failures("BadSignatureError")
    server.document = tampered(ring.publish(None))
    assert not await keys.refresh()
    assert failures("BadSignatureError") == before + 1
    assert keys.current() is not None and keys.current().kid == kid  # still encrypting to the last valid key
    line = next(r for r in caplog.records if r.getMessage() == "key-refresh-failed")
    assert "signature" in line.fields["error"]

    server.fail_with = 503  # an outage: fine until the set is older than max_staleness_seconds
    before = failures("KeySetSourceError")
    assert not await keys.refresh()
    assert failures("KeySetSourceError") == before + 1
    assert keys.current() is not None
    await asyncio.sleep(0.7)
    assert keys.current() is None  # intake stops, with a clear line
    stale = [r for r in caplog.records if r.getMessage() == "key-set-stale"]
    assert len(stale) == 1 and "max_staleness_seconds" in stale[0].fields["error"]

    server.fail_with = None
    server.document = ring.publish(None)
    assert await keys.refresh()
    assert keys.current() is not None and keys.current().kid == kid
    assert any(r.getMessage() == "key-set-fresh" for r in caplog.records)


async def test_agent_keysource_says_stale_while_idle(server, ca, ring, tmp_path) -> None:
    """Regression: staleness was noticed only when something asked for the key (a recording arriving, a
    scrape of /metrics or /readyz); an idle agent whose key source stayed down said nothing. The refresh
    loop itself now logs `key-set-stale` once the set is older than max_staleness_seconds."""
    import threading

    signer_pem = tmp_path / "signer.pem"
    signer_pem.write_bytes(ring.signer_pem())
    server.document = ring.publish(None)
    keys = PublicKeys(KeysConfig(keyset=server.url, signer=signer_pem, ca_bundle=ca.ca_pem, refresh_seconds=0.05,
                                 max_staleness_seconds=0.3))
    assert await keys.refresh()
    said = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "key-set-stale":
                said.set()

    handler = Watch()
    logging.getLogger("mediaseal.keys").addHandler(handler)
    stop = asyncio.Event()
    task = asyncio.create_task(keys.run(stop))
    try:
        server.fail_with = 503  # down, and nobody calls keys.current()
        assert await asyncio.to_thread(said.wait, 10), "no key-set-stale line from an idle agent"
    finally:
        stop.set()
        await task
        logging.getLogger("mediaseal.keys").removeHandler(handler)
    assert keys.current() is None


# -- file and S3 -----------------------------------------------------------------------------------


async def test_file_source_validator(tmp_path, ring) -> None:
    path = tmp_path / "keyset.json"
    path.write_bytes(ring.publish(None))
    source = open_keyset_source(str(path))
    assert isinstance(source, KeySetFile)
    first = await source.fetch(None)
    assert first.data is not None and first.etag
    assert (await source.fetch(first.etag)).data is None
    tmp = tmp_path / "keyset.json.tmp"
    tmp.write_bytes(ring.publish(None))
    os.replace(tmp, path)
    assert (await source.fetch(first.etag)).data is not None
    with pytest.raises(KeySetSourceError, match="can't read"):
        await KeySetFile(tmp_path / "missing.json").fetch(None)


async def test_s3_source_against_moto(moto_server, ring) -> None:
    import s3_support

    bucket = s3_support.make_bucket(moto_server.url)
    s3 = s3_support.boto3_client(moto_server.url)
    first = ring.publish(None)
    s3.put_object(Bucket=bucket, Key="keys/keyset.json", Body=first)
    source = open_keyset_source(f"s3://{bucket}/keys/keyset.json", endpoint_url=moto_server.url)
    assert isinstance(source, KeySetS3)
    follower = KeySetFollower(source, load_signer(ring.signer_pem()))
    ks1 = await follower.refresh()
    assert ks1.serial == 1 and follower.etag == '"' + hashlib.md5(first).hexdigest() + '"'
    assert (await source.fetch(follower.etag)).data is None  # IfNoneMatch -> 304
    assert await follower.refresh() is ks1

    ring.rotate(None)
    s3.put_object(Bucket=bucket, Key="keys/keyset.json", Body=ring.publish(None))
    ks2 = await follower.refresh()
    assert ks2.serial == 2 and ks2.current == ring.current().kid

    s3.put_object(Bucket=bucket, Key="keys/keyset.json", Body=tampered(ring.publish(None)))
    with pytest.raises(BadSignatureError):
        await follower.refresh()
    s3.put_object(Bucket=bucket, Key="keys/keyset.json", Body=first)
    with pytest.raises(KeySetRollbackError):
        await follower.refresh()
    with pytest.raises(KeySetSourceError, match="NoSuchKey"):
        await KeySetFollower(KeySetS3(f"s3://{bucket}/nope.json", endpoint_url=moto_server.url),
                             ring.signer).refresh()
    assert follower.keyset is ks2


def test_open_source_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="https:// or s3://"):
        open_keyset_source("http://example.net/keyset.json")
    assert isinstance(open_keyset_source("/etc/mediaseal/keyset.json"), KeySetFile)
    assert isinstance(open_keyset_source("https://keys.example.net/ks.json", ca_bundle=Path("/ca.pem")), KeySetHTTPS)


# -- the saved copy (a restart remembers the set and its serial) ------------------------------------------


async def test_saved_key_set_survives_a_restart_with_its_serial(server, ca, ring, tmp_path) -> None:
    cache = tmp_path / "buffer" / "keyset.json"
    first = ring.publish(None)
    ring.rotate(None)
    second = ring.publish(None)
    server.document = second
    follower = KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), ring.signer, cache=cache)
    assert follower.restore() is None  # nothing saved yet
    ks2 = await follower.refresh()
    assert cache.read_bytes() == second and cache.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in cache.parent.iterdir()] == ["keyset.json"]  # no temp file left

    # A restart: a new follower over the same cache knows serial 2 before fetching anything ...
    again = KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), ring.signer, cache=cache)
    restored = again.restore()
    assert restored is not None and restored.serial == ks2.serial and restored.current == ks2.current
    assert again.confirmed_at is not None and abs(again.confirmed_at - cache.stat().st_mtime) < 1
    server.document = first  # ... so an older, validly signed set replayed to it is refused
    with pytest.raises(KeySetRollbackError, match="serial 1, lower than the serial 2"):
        await again.refresh()
    assert cache.read_bytes() == second  # and not saved over the newer one


async def test_a_fresh_agent_refuses_a_set_below_the_configured_min_serial(server, ca, ring, tmp_path) -> None:
    """Issue 15, finding 15: a fresh agent (or one whose spool, with its saved set, was wiped) had no
    serial to compare with, so an older validly signed set replayed to it was taken for its whole TTL.
    `keys.min_serial`, kept in the config outside the spool, is a floor: refused, before and after a
    restart (the saved copy too); the current set passes."""
    first = ring.publish(None)
    ring.rotate(None)
    second = ring.publish(None)
    server.document = first  # the replay, to an agent with nothing saved
    cache = tmp_path / "buffer" / "keyset.json"
    fresh = KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), ring.signer, cache=cache, min_serial=2)
    with pytest.raises(KeySetRollbackError, match="below the configured keys.min_serial 2"):
        await fresh.refresh()
    assert fresh.keyset is None and not cache.exists()
    without = KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), ring.signer)
    assert (await without.refresh()).serial == 1  # what happened before: the old set taken
    server.document = second
    assert (await fresh.refresh()).serial == 2
    cache.write_bytes(first)  # an old set planted as the saved copy
    with pytest.raises(KeySetRollbackError, match="min_serial"):
        KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), ring.signer, cache=cache,
                       min_serial=2).restore()


async def test_a_tampered_saved_key_set_is_refused_and_replaced(server, ca, ring, tmp_path) -> None:
    cache = tmp_path / "keyset.json"
    cache.write_bytes(tampered(ring.publish(None)))
    follower = KeySetFollower(KeySetHTTPS(server.url, ca_bundle=ca.ca_pem), ring.signer, cache=cache)
    with pytest.raises(BadSignatureError):
        follower.restore()
    assert follower.keyset is None
    server.document = ring.publish(None)
    await follower.refresh()
    assert cache.read_bytes() == server.document


async def test_agent_keys_start_from_the_saved_set_when_the_source_is_down(server, ca, ring, tmp_path,
                                                                           caplog) -> None:
    signer_pem = tmp_path / "signer.pem"
    signer_pem.write_bytes(ring.signer_pem())
    cache = tmp_path / "keyset.json"
    config = KeysConfig(keyset=server.url, signer=signer_pem, ca_bundle=ca.ca_pem, max_staleness_seconds=3600)
    server.document = ring.publish(None)
    assert await PublicKeys(config, cache=cache).refresh()
    os.utime(cache, (time.time() - 600, time.time() - 600))  # last confirmed ten minutes ago
    server.stop()
    keys = PublicKeys(config, cache=cache)
    assert await keys.refresh()  # the source is down, the saved set serves
    current = keys.current()
    assert current is not None and current.kid == ring.current().kid
    assert any(r.getMessage() == "key-refresh-failed" for r in caplog.records)
    stale = PublicKeys(KeysConfig(keyset=server.url, signer=signer_pem, ca_bundle=ca.ca_pem,
                                  max_staleness_seconds=60), cache=cache)
    assert await stale.refresh() and stale.current() is None  # older than allowed: intake would wait
    assert not await PublicKeys(config, cache=tmp_path / "none.json").refresh()  # nothing saved: no key
