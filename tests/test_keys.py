"""keys/: JWK thumbprints, protection at rest, the managed keyring, and the signed key set."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mediaseal import codec
from mediaseal.keys import (
    ACTIVE,
    DECRYPT_ONLY,
    PENDING,
    RETIRED,
    BadSignatureError,
    InvalidJWKError,
    Keyring,
    KeyringExistsError,
    KeyringLockedError,
    KeyringNotFoundError,
    KeySetExpiredError,
    KeySetFormatError,
    KeyStateError,
    MasterKeyProtector,
    PassphraseProtector,
    PassphraseRequiredError,
    PassphraseSourceError,
    WrongPassphraseError,
    key_aad,
    load_signer,
    passphrase_from,
    public_jwk,
    public_key_from_jwk,
    thumbprint,
    verify_keyset,
)
from mediaseal.keys.jwk import b64url_decode, b64url_encode

PW = b"correct horse battery staple"

# RFC 7638 section 3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknj"
    "hMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQ"
    "vRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_E = "AQAB"
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# -- shared keys: RSA-3072 generation is slow, so a few real KEKs are made once and handed out -----

@pytest.fixture
def pool(pooled_keks: list[rsa.RSAPrivateKey]) -> list[rsa.RSAPrivateKey]:
    return pooled_keks


pytestmark = pytest.mark.usefixtures("pooled_keks")


def seal_package(recipient: codec.Recipient, data: bytes) -> bytes:
    header, dek_keys = codec.new_package(codec.Metadata("rec-1", "call"), [recipient])
    out = io.BytesIO()
    codec.seal(io.BytesIO(data), out, header, dek_keys)
    return out.getvalue()


def open_package(package: bytes, unwrapper: codec.Unwrapper) -> bytes:
    out = io.BytesIO()
    codec.open_package(io.BytesIO(package), unwrapper).decrypt_to(out)
    return out.getvalue()


def wrap_kids(package: bytes) -> list[str]:
    return [w.kid for w in codec.read_header(io.BytesIO(package)).wraps]


# -- JWK -------------------------------------------------------------------------------------------

def test_rfc7638_thumbprint_vector():
    pub = public_key_from_jwk({"kty": "RSA", "n": RFC7638_N, "e": RFC7638_E, "alg": "RS256", "kid": "2011-04-29"})
    assert thumbprint(pub) == RFC7638_THUMBPRINT
    assert public_jwk(pub) == {"kty": "RSA", "n": RFC7638_N, "e": RFC7638_E}


@pytest.mark.parametrize("jwk", [
    {"kty": "EC", "n": RFC7638_N, "e": RFC7638_E},
    {"kty": "RSA", "n": RFC7638_N + "=", "e": RFC7638_E},               # padded
    {"kty": "RSA", "n": "AA" + RFC7638_N[:-2], "e": RFC7638_E},         # leading zero octet
    {"kty": "RSA", "n": RFC7638_N, "e": 65537},
    {"kty": "RSA", "e": RFC7638_E},
])
def test_jwk_rejects_malformed(jwk):
    with pytest.raises(InvalidJWKError):
        public_key_from_jwk(jwk)


def test_b64url_is_strict():
    assert b64url_decode(b64url_encode(b"\x00\xff\x10")) == b"\x00\xff\x10"
    for bad in ["AQAB=", "AQ+B", "AR", "A"]:  # "AR": non-zero trailing bits
        with pytest.raises(ValueError):
            b64url_decode(bad)


def test_generated_kek_is_rsa3072_f4(pool):
    for kek in pool:
        assert kek.key_size == 3072
        assert kek.public_key().public_numbers().e == 65537


# -- protection at rest ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: PassphraseProtector(PW), lambda: MasterKeyProtector(b"k" * 32)])
def test_protector_round_trip_and_aad_binding(make):
    p = make()
    env = p.seal(b"secret key bytes", key_aad("kek", "A" * 43))
    env = json.loads(json.dumps(env))  # JSON-able
    assert env["kdf"] in ("scrypt", "hkdf-sha256")
    assert b"secret key bytes" not in json.dumps(env).encode()
    assert p.open(env, key_aad("kek", "A" * 43)) == b"secret key bytes"
    for other in (key_aad("kek", "B" * 43), key_aad("signer", "A" * 43)):
        with pytest.raises(KeyringLockedError):
            p.open(env, other)


def test_protector_wrong_secret_is_named_and_quiet():
    env = PassphraseProtector(PW).seal(b"x", b"aad")
    with pytest.raises(WrongPassphraseError) as e:
        PassphraseProtector(b"hunter2").open(env, b"aad")
    assert "hunter2" not in str(e.value)
    assert "\n" not in str(e.value)
    env = MasterKeyProtector(b"a" * 32).seal(b"x", b"aad")
    with pytest.raises(KeyringLockedError) as e2:
        MasterKeyProtector(b"b" * 32).open(env, b"aad")
    assert not isinstance(e2.value, WrongPassphraseError)


# -- keyring ---------------------------------------------------------------------------------------

def test_init_open_list(tmp_path, pool):
    path = tmp_path / "keyring"
    kr = Keyring.init(path, PW)
    [rec] = kr.records()
    assert rec.kid == thumbprint(pool[0].public_key())
    assert (rec.state, rec.alg, kr.current().kid, kr.protection) == (ACTIVE, "RSA-OAEP-256", rec.kid, "passphrase")
    assert rec.activated_at is not None
    assert not (path / "master.key").exists()
    opened = Keyring.open(path)  # no secret anywhere in reach
    assert opened.records() == [rec]
    r = opened.recipient()
    assert (r.kid, r.alg) == (rec.kid, "RSA-OAEP-256")
    assert r.public_key.public_numbers() == pool[0].public_key().public_numbers()
    pem = serialization.load_pem_public_key((path / "public" / f"{rec.kid}.pem").read_bytes())
    assert isinstance(pem, rsa.RSAPublicKey)
    assert thumbprint(pem) == rec.kid


def test_init_refuses_existing(tmp_path):
    (tmp_path / "kr").mkdir()
    (tmp_path / "kr" / "something").write_text("x")
    with pytest.raises(KeyringExistsError):
        Keyring.init(tmp_path / "kr", PW)
    (tmp_path / "empty").mkdir()
    Keyring.init(tmp_path / "empty", None)  # an empty directory is fine
    with pytest.raises(KeyringExistsError):
        Keyring.init(tmp_path / "empty", None)
    with pytest.raises(KeyringNotFoundError):
        Keyring.open(tmp_path / "kr")


def test_rotate_activate_and_state_rules(tmp_path, pool):
    path = tmp_path / "kr"
    kr = Keyring.init(path, None)
    k0 = kr.current().kid
    k1 = kr.rotate(None).kid
    assert kr.current().kid == k1 == thumbprint(pool[1].public_key())
    assert {r.kid: r.state for r in kr.records()} == {k0: DECRYPT_ONLY, k1: ACTIVE}
    k2 = kr.rotate(None, pending=True).kid
    assert kr.current().kid == k1
    assert kr.record(k2).state == PENDING
    with pytest.raises(KeyStateError):
        kr.recipient(k0)  # decrypt-only: nothing new is sealed to it
    assert kr.recipient(k2).kid == k2  # pending: agents may warm up / dual-wrap

    kr.activate(k2, None)
    assert {r.kid: r.state for r in Keyring.open(path).records()} == {k0: DECRYPT_ONLY, k1: DECRYPT_ONLY, k2: ACTIVE}
    assert Keyring.open(path).current().kid == k2

    with pytest.raises(KeyStateError):
        kr.set_state(k2, RETIRED)  # current
    with pytest.raises(KeyStateError):
        kr.set_state(k2, DECRYPT_ONLY)
    with pytest.raises(KeyStateError):
        kr.set_state(k0, ACTIVE)  # only activate() makes a key current
    with pytest.raises(KeyStateError):
        kr.set_state(k0, PENDING)
    assert kr.set_state(k0, RETIRED).retired_at is not None
    for state in (DECRYPT_ONLY, PENDING, ACTIVE):
        with pytest.raises(KeyStateError):
            kr.set_state(k0, state)
    with pytest.raises(KeyStateError):
        kr.activate(k0, None)
    assert Keyring.open(path).record(k0).state == RETIRED


def test_files_and_dirs_are_private(tmp_path):
    path = tmp_path / "kr"
    for passphrase, sub in ((PW, "a"), (None, "b")):
        kr = Keyring.init(path / sub, passphrase)
        kr.rotate(passphrase, pending=True)
        kr.publish(passphrase)
    seen = 0
    for root, dirs, files in os.walk(path):
        for d in dirs:
            assert stat.S_IMODE(os.stat(Path(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(Path(root, f)).st_mode) == 0o600, f
            assert not f.endswith(".tmp"), f
            seen += 1
    assert seen >= 2 * 8  # keyring.json, signer.pem, private/signer.json, 2x public, 2x private, lock (+master.key)
    assert stat.S_IMODE(os.stat(path / "b" / "master.key").st_mode) == 0o600


@pytest.mark.parametrize("passphrase", [PW, None])
def test_no_plaintext_private_key_on_disk(tmp_path, pool, passphrase):
    path = tmp_path / "kr"
    kr = Keyring.init(path, passphrase)
    kr.rotate(passphrase)
    signer = kr._open_signer(kr._protector(passphrase))
    secrets_ = []
    for key in (pool[0], pool[1], signer):
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        secrets_ += [der, base64.b64encode(der), b64url_encode(der).encode()]
    for kek in pool[:2]:
        numbers = kek.private_numbers()
        secrets_.append(numbers.p.to_bytes(192, "big"))
        secrets_.append(kek.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    files = [Path(root, f) for root, _, fs in os.walk(path) for f in fs]
    assert len(files) >= 7
    for f in files:
        data = f.read_bytes()
        assert b"PRIVATE KEY" not in data, f
        for s in secrets_:
            assert s not in data, f


def test_wrong_or_missing_passphrase(tmp_path):
    path = tmp_path / "kr"
    kr = Keyring.init(path, PW)
    before = (path / "keyring.json").read_bytes()
    for call in (lambda: kr.unlock(b"hunter2"), lambda: kr.rotate(b"hunter2"), lambda: kr.publish(b"hunter2")):
        with pytest.raises(WrongPassphraseError) as e:
            call()
        msg = str(e.value)
        assert "hunter2" not in msg
        assert PW.decode() not in msg
        assert "\n" not in msg
    assert (path / "keyring.json").read_bytes() == before  # a bad passphrase changed nothing
    assert len(list((path / "private").iterdir())) == 2
    for call in (lambda: kr.unlock(None), lambda: kr.rotate(None), lambda: kr.publish(None)):
        with pytest.raises(PassphraseRequiredError):
            call()


def test_master_key_mode(tmp_path):
    path = tmp_path / "kr"
    kr = Keyring.init(path, None)
    assert kr.protection == "master-key"
    assert len((path / "master.key").read_bytes()) == 32
    package = seal_package(kr.recipient(), b"hello")
    assert open_package(package, Keyring.open(path).unlock(None)) == b"hello"
    assert open_package(package, kr.unlock(b"ignored in master-key mode")) == b"hello"

    (path / "master.key").write_bytes(secrets.token_bytes(32))
    with pytest.raises(KeyringLockedError) as e:
        kr.unlock(None)
    assert not isinstance(e.value, WrongPassphraseError)
    (path / "master.key").unlink()
    with pytest.raises(KeyringLockedError):
        kr.unlock(None)


def test_envelope_bound_to_its_kid(tmp_path):
    path = tmp_path / "kr"
    kr = Keyring.init(path, None)
    k0, k1 = kr.current().kid, kr.rotate(None).kid
    priv = path / "private"
    (priv / f"{k1}.json").write_bytes((priv / f"{k0}.json").read_bytes())  # k0's envelope under k1's name
    with pytest.raises(KeyringLockedError):
        kr.unlock(None)


def test_unwrap_round_trip_across_rotation(tmp_path, pool):
    path = tmp_path / "kr"
    kr = Keyring.init(path, PW)
    k0 = kr.current().kid
    old = seal_package(Keyring.open(path).recipient(), b"old recording" * 1000)
    k1 = kr.rotate(PW).kid
    new = seal_package(Keyring.open(path).recipient(), b"new recording")
    assert wrap_kids(old) == [k0]
    assert wrap_kids(new) == [k1]
    assert k0 != k1

    unwrapper = kr.unlock(PW)
    assert open_package(old, unwrapper) == b"old recording" * 1000  # decrypt-only still decrypts
    assert open_package(new, unwrapper) == b"new recording"

    kr.set_state(k0, RETIRED)
    with pytest.raises(codec.NoMatchingKeyError) as e:
        open_package(old, kr.unlock(PW))
    assert k0 in str(e.value)
    assert "retired" in str(e.value)

    foreign = pool[2].public_key()
    stranger = seal_package(codec.Recipient(thumbprint(foreign), foreign), b"x")
    with pytest.raises(codec.NoMatchingKeyError) as e:
        open_package(stranger, unwrapper)
    assert thumbprint(foreign) in str(e.value)


def test_rsa_oaep_sha1_keyring(tmp_path):
    kr = Keyring.init(tmp_path / "kr", None, alg=codec.RSA_OAEP)
    r = kr.recipient()
    assert r.alg == "RSA-OAEP"
    assert kr.current().alg == "RSA-OAEP"
    package = seal_package(r, b"genesys-style")
    assert [w.alg for w in codec.read_header(io.BytesIO(package)).wraps] == ["RSA-OAEP"]
    assert open_package(package, kr.unlock(None)) == b"genesys-style"
    # The same key under the other algorithm's name is not used: the algorithm is never inferred.
    mislabeled = seal_package(codec.Recipient(r.kid, r.public_key, codec.RSA_OAEP_256), b"x")
    with pytest.raises(codec.NoMatchingKeyError):
        open_package(mislabeled, kr.unlock(None))
    assert kr.rotate(None).alg == "RSA-OAEP"  # rotation keeps the keyring's algorithm


def test_passphrase_from(tmp_path):
    assert passphrase_from({}, None) is None
    assert passphrase_from({"MEDIASEAL_KEYRING_PASSPHRASE": ""}, None) is None
    assert passphrase_from({"MEDIASEAL_KEYRING_PASSPHRASE": "from env"}, None) == b"from env"
    f = tmp_path / "pw"
    f.write_bytes(b"from file\n")
    assert passphrase_from({"MEDIASEAL_KEYRING_PASSPHRASE": "from env"}, f) == b"from file"
    f.write_bytes(b"\n")
    with pytest.raises(PassphraseSourceError):
        passphrase_from({}, f)
    with pytest.raises(PassphraseSourceError):
        passphrase_from({}, tmp_path / "missing")


# -- key set ---------------------------------------------------------------------------------------

def test_publish_and_verify(tmp_path):
    path = tmp_path / "kr"
    kr = Keyring.init(path, PW)
    k0 = kr.current().kid
    k1 = kr.rotate(PW, pending=True).kid
    signer = load_signer((path / "signer.pem").read_bytes())
    ks = verify_keyset(kr.publish(PW, ttl_seconds=3600), signer)
    assert (ks.serial, ks.current) == (1, k0)
    assert {k.kid: k.state for k in ks.keys} == {k0: ACTIVE, k1: PENDING}
    assert ks.expires_at - ks.issued_at == timedelta(hours=1)
    package = seal_package(ks.recipient(), b"via key set")
    assert open_package(package, kr.unlock(PW)) == b"via key set"

    kr.activate(k1, PW)
    kr.set_state(k0, RETIRED)
    ks2 = verify_keyset(Keyring.open(path).publish(PW), signer)
    assert ks2.serial == 2
    assert ks2.current == k1
    assert [k.kid for k in ks2.keys] == [k1]  # retired keys are not published


@pytest.fixture
def signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def sign_doc(payload: dict, key: ed25519.Ed25519PrivateKey) -> bytes:
    """A key set document made independently of keys.keyset, so bad ones can be signed properly."""
    raw = json.dumps(payload).encode()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return json.dumps({
        "format": "mediaseal-keyset/1",
        "payload": b64url_encode(raw),
        "signature": b64url_encode(key.sign(raw)),
        "signer": b64url_encode(hashlib.sha256(pub).digest()),
    }).encode()


def jwk_entry(pub: rsa.RSAPublicKey, state: str, alg: str = "RSA-OAEP-256") -> dict:
    return {"kid": thumbprint(pub), "alg": alg, "state": state, **public_jwk(pub)}


@pytest.fixture
def good_payload(pool) -> dict:
    return {
        "issued_at": "2030-01-01T00:00:00Z",
        "expires_at": "2030-01-08T00:00:00Z",
        "serial": 5,
        "current": thumbprint(pool[0].public_key()),
        "keys": [jwk_entry(pool[0].public_key(), ACTIVE), jwk_entry(pool[1].public_key(), DECRYPT_ONLY)],
    }


NOW = datetime(2030, 1, 2, tzinfo=UTC)


def test_independent_document_verifies(good_payload, signing_key):
    ks = verify_keyset(sign_doc(good_payload, signing_key), signing_key.public_key(), now=NOW)
    assert ks.serial == 5
    assert ks.current == good_payload["current"]
    assert len(ks.keys) == 2


def test_tampered_payload(good_payload, signing_key):
    doc = json.loads(sign_doc(good_payload, signing_key))
    payload = json.loads(b64url_decode(doc["payload"]))
    payload["serial"] = 6
    doc["payload"] = b64url_encode(json.dumps(payload).encode())
    with pytest.raises(BadSignatureError):
        verify_keyset(json.dumps(doc).encode(), signing_key.public_key(), now=NOW)


def test_wrong_signer(good_payload, signing_key):
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(BadSignatureError):
        verify_keyset(sign_doc(good_payload, other), signing_key.public_key(), now=NOW)
    # Claiming the pinned signer's id does not help a document signed by someone else.
    doc = json.loads(sign_doc(good_payload, other))
    doc["signer"] = json.loads(sign_doc(good_payload, signing_key))["signer"]
    with pytest.raises(BadSignatureError):
        verify_keyset(json.dumps(doc).encode(), signing_key.public_key(), now=NOW)


def test_signature_checked_before_payload(signing_key):
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(BadSignatureError):
        verify_keyset(sign_doc({"garbage": True}, other), signing_key.public_key(), now=NOW)


def test_expired(good_payload, signing_key):
    doc = sign_doc(good_payload, signing_key)
    late = NOW + timedelta(days=7)
    with pytest.raises(KeySetExpiredError):
        verify_keyset(doc, signing_key.public_key(), now=late)
    assert verify_keyset(doc, signing_key.public_key(), now=late, max_staleness=timedelta(days=1)).serial == 5


def _kid_not_thumbprint(p, pool):
    p["keys"][1]["kid"] = thumbprint(pool[2].public_key())


def _no_current(p, pool):
    p["current"] = thumbprint(pool[2].public_key())


def _current_not_active(p, pool):
    p["keys"][0]["state"] = DECRYPT_ONLY


def _two_active(p, pool):
    p["keys"][1]["state"] = ACTIVE


def _current_rsa2048(p, pool):
    rfc = public_key_from_jwk({"kty": "RSA", "n": RFC7638_N, "e": RFC7638_E})
    p["keys"] = [jwk_entry(rfc, ACTIVE), p["keys"][1]]
    p["current"] = RFC7638_THUMBPRINT


def _bad_alg(p, pool):
    p["keys"][1]["alg"] = "RSA1_5"


def _extra_member(p, pool):
    p["note"] = "hi"


def _bad_state(p, pool):
    p["keys"][1]["state"] = "revoked"


@pytest.mark.parametrize("mutate", [_kid_not_thumbprint, _no_current, _current_not_active, _two_active,
                                    _current_rsa2048, _bad_alg, _extra_member, _bad_state])
def test_format_rules(good_payload, signing_key, pool, mutate):
    mutate(good_payload, pool)
    with pytest.raises(KeySetFormatError):
        verify_keyset(sign_doc(good_payload, signing_key), signing_key.public_key(), now=NOW)


def test_missing_current_member(good_payload, signing_key):
    del good_payload["current"]
    with pytest.raises(KeySetFormatError):
        verify_keyset(sign_doc(good_payload, signing_key), signing_key.public_key(), now=NOW)


def test_unknown_outer_format(good_payload, signing_key):
    doc = json.loads(sign_doc(good_payload, signing_key))
    doc["format"] = "mediaseal-keyset/2"
    with pytest.raises(KeySetFormatError):
        verify_keyset(json.dumps(doc).encode(), signing_key.public_key(), now=NOW)


def test_load_signer_rejects_non_ed25519(pool):
    pem = pool[0].public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeySetFormatError):
        load_signer(pem)
    with pytest.raises(KeySetFormatError):
        load_signer(b"not a pem")


def test_signer_pem_matches_published_signer(tmp_path):
    kr = Keyring.init(tmp_path / "kr", None)
    assert kr.signer_pem() == (tmp_path / "kr" / "signer.pem").read_bytes()
    assert verify_keyset(kr.publish(None), load_signer(kr.signer_pem())).serial == 1


def test_noncanonical_timestamp(good_payload, signing_key):
    good_payload["issued_at"] = "2030-1-1T00:00:00Z"
    with pytest.raises(KeySetFormatError):
        verify_keyset(sign_doc(good_payload, signing_key), signing_key.public_key(), now=NOW)
