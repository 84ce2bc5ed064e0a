"""The AWS KMS mode against moto's KMS over HTTP on loopback (AWS_ENDPOINT_URL points at it).

moto 5.2's KMS Decrypt does not look at the key's state (moto/kms/models.py `decrypt`: a disabled
key still decrypts). Real KMS answers DisabledException, so `kms_key_state` makes moto do the same
for the test's duration; everything else (HTTP, signing, encryption context checks) is moto's own.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support.waits import wait_until

from mediaseal import codec
from mediaseal.keys.errors import KeyringFormatError
from mediaseal.keys.keyring import KMS, Keyring
from mediaseal.keys.keyset import load_signer, verify_keyset
from mediaseal.keys.kms import KmsOptions, KmsProtector, KmsRefusedError, KmsUnavailableError, encryption_context
from mediaseal.keys.protect import key_aad

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def kms_key_state(monkeypatch):
    """moto's Decrypt refuses a disabled key with DisabledException, as KMS does."""
    from moto.core.exceptions import JsonRESTError
    from moto.kms.models import KmsBackend

    original = KmsBackend.decrypt

    def decrypt(self, ciphertext_blob, encryption_context, key_id=None):
        plaintext, arn = original(self, ciphertext_blob=ciphertext_blob, encryption_context=encryption_context,
                                  key_id=key_id)
        key = self.keys[self.get_key_id(arn)]
        if key.key_state != "Enabled":
            raise JsonRESTError("DisabledException", f"{arn} is disabled.")
        return plaintext, arn

    monkeypatch.setattr(KmsBackend, "decrypt", decrypt)


@pytest.fixture
def kms(moto_server, kms_key_state, monkeypatch):
    """A fresh KMS key with an alias; AWS_ENDPOINT_URL points at moto (the standard variable, nothing else)."""
    import s3_support

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    client = s3_support.boto3_client(moto_server.url, "kms")
    arn = s3_support.make_kms_key(moto_server.url)
    alias = f"alias/mediaseal-test-{uuid.uuid4().hex[:8]}"
    client.create_alias(AliasName=alias, TargetKeyId=arn)
    return {"arn": arn, "id": arn.rsplit("/", 1)[1], "alias": alias, "client": client, "url": moto_server.url}


def seal_package(ring: Keyring, data: bytes) -> bytes:
    header, dek_keys = codec.new_package(codec.Metadata("rec-kms", "call"), [ring.recipient()], 4096)
    out = io.BytesIO()
    codec.seal(io.BytesIO(data), out, header, dek_keys)
    return out.getvalue()


def decrypt(package: bytes, unwrapper: codec.Unwrapper) -> bytes:
    out = io.BytesIO()
    codec.open_package(io.BytesIO(package), unwrapper).decrypt_to(out)
    return out.getvalue()


def test_kms_keyring_revocation_within_the_cache_ttl(kms, tmp_path) -> None:
    path = tmp_path / "keyring"
    ring = Keyring.init(path, None, kms_key_id=kms["alias"])
    assert ring.protection == KMS and ring.kms_key_arn == kms["arn"]  # the alias resolved and pinned
    assert not (path / "master.key").exists()
    kid = ring.current().kid
    for name in (f"{kid}.json", "signer.json"):
        envelope = json.loads((path / "private" / name).read_bytes())
        assert envelope["kdf"] == "aws-kms" and envelope["key_id"] == kms["arn"]

    # The public side never calls KMS: it works with KMS pointed at nothing at all.
    offline = Keyring.open(path, kms=KmsOptions(endpoint_url="http://127.0.0.1:9", max_attempts=1))
    data = os.urandom(10_000)
    package = seal_package(offline, data)

    ttl = 8.0  # long enough that the "still cached" step below holds on a loaded machine
    unwrapper = Keyring.open(path, kms=KmsOptions(cache_seconds=ttl)).unlock(None)
    assert decrypt(package, unwrapper) == data
    cached_at = time.monotonic()
    signer = load_signer(ring.signer_pem())
    assert verify_keyset(ring.publish(None), signer).current == kid  # the signer opens under KMS too

    kms["client"].disable_key(KeyId=kms["id"])
    assert decrypt(package, unwrapper) == data  # still cached: revocation is bounded by the TTL, not instant
    assert time.monotonic() - cached_at < ttl, "the machine was too slow to see the cached window"

    def refused() -> KmsRefusedError | None:
        try:
            decrypt(package, unwrapper)
        except KmsRefusedError as refusal:
            return refusal
        return None

    error = wait_until(refused, timeout=ttl + 120, interval=0.2, what="the revocation to take effect after the TTL")
    assert time.monotonic() - cached_at >= ttl * 0.9  # not before the TTL: the cache held it
    e = pytest.ExceptionInfo.from_exception(error)
    message = str(e.value)
    assert "KMS refused Decrypt" in message and "DisabledException" in message and "\n" not in message
    with pytest.raises(KmsRefusedError):
        ring.publish(None)
    # Nothing else broke: new packages are still sealed to the public key, and a revoked keyring
    # keeps failing cleanly rather than serving from a stale cache.
    package2 = seal_package(Keyring.open(path), b"after revocation")
    with pytest.raises(KmsRefusedError):
        decrypt(package2, unwrapper)

    kms["client"].enable_key(KeyId=kms["id"])
    assert decrypt(package, unwrapper) == data
    assert decrypt(package2, unwrapper) == b"after revocation"
    new = Keyring.open(path).rotate(None)  # a new KEK is sealed under KMS as well
    assert json.loads((path / "private" / f"{new.kid}.json").read_bytes())["kdf"] == "aws-kms"


def test_the_lkm_key_store_honours_the_kms_cache_ttl(kms, tmp_path) -> None:
    """Issue 15, finding 7: the LKM's key store kept KMS-opened private keys for ever, so disabling the KMS
    key did not stop unwraps. Now KMS is asked again after `--kms-cache-seconds`: unwraps stop, then
    resume when the key is enabled again."""
    import functools

    from mediaseal.keys.lkm.keystore import KeyStore, open_keyring

    path = tmp_path / "keyring"
    ring = Keyring.init(path, None, kms_key_id=kms["alias"])
    dek = os.urandom(32)
    wrap = codec.wrap_dek(dek, ring.public_key(ring.current().kid), ring.current().kid, ring.current().alg)
    ttl = 3.0
    store = KeyStore(path, None, loader=functools.partial(open_keyring, kms_cache_seconds=ttl))
    assert store.unwrap(wrap) == dek
    kms["client"].disable_key(KeyId=kms["id"])

    def refused() -> KmsRefusedError | None:
        try:
            store.unwrap(wrap)
        except KmsRefusedError as e:
            return e
        return None

    wait_until(refused, timeout=ttl + 120, interval=0.2, what="unwraps to stop after the KMS key was disabled")
    kms["client"].enable_key(KeyId=kms["id"])
    assert store.unwrap(wrap) == dek


def test_encryption_context_binds_envelope_to_key_and_purpose(kms, tmp_path) -> None:
    path = tmp_path / "keyring"
    ring = Keyring.init(path, None, kms_key_id=kms["arn"])
    kid = ring.current().kid
    assert encryption_context(key_aad("kek", kid)) == {
        "mediaseal:keyring": "mediaseal-keyring/1", "mediaseal:purpose": "kek", "mediaseal:kid": kid}
    protector = KmsProtector(kms["arn"])
    envelope = json.loads((path / "private" / f"{kid}.json").read_bytes())
    assert len(protector.open(envelope, key_aad("kek", kid))) > 1000
    with pytest.raises(KmsRefusedError, match="InvalidCiphertextException"):
        protector.open(envelope, key_aad("signer", kid))  # same ciphertext, another purpose
    import s3_support

    other = s3_support.make_kms_key(kms["url"])
    with pytest.raises(KeyringFormatError, match="not the KMS key"):
        KmsProtector(other).open(envelope, key_aad("kek", kid))


def test_kms_unreachable_is_one_clear_error(kms, tmp_path) -> None:
    path = tmp_path / "keyring"
    Keyring.init(path, None, kms_key_id=kms["arn"])
    ring = Keyring.open(path, kms=KmsOptions(endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=1))
    with pytest.raises(KmsUnavailableError, match="KMS unreachable"):
        ring.unlock(None)


def test_init_refused_by_kms_leaves_nothing(kms, tmp_path) -> None:
    with pytest.raises(KmsRefusedError, match="NotFoundException"):
        Keyring.init(tmp_path / "keyring", None, kms_key_id="alias/mediaseal-no-such-alias")
    assert not (tmp_path / "keyring").exists()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_cli_kms_keyring_decrypt_refused_exit_1(kms, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}  # AWS_ENDPOINT_URL -> moto
    ring = tmp_path / "keyring"
    init = run_cli("keys", "init", "--keyring", str(ring), "--kms-key-id", kms["alias"], env=env)
    assert init.returncode == 0, init.stderr
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(5000))
    assert run_cli("encrypt", str(src), "-o", str(tmp_path / "p.mseal"), "--keyring", str(ring),
                   env=env).returncode == 0
    ok = run_cli("decrypt", str(tmp_path / "p.mseal"), "-o", str(tmp_path / "out.bin"), "--keyring", str(ring),
                 "--kms-cache-seconds", "0", env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()

    kms["client"].disable_key(KeyId=kms["id"])
    refused = run_cli("decrypt", str(tmp_path / "p.mseal"), "-o", str(tmp_path / "out2.bin"), "--keyring",
                      str(ring), env=env)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("mediaseal: error: ") and "KMS refused Decrypt" in refused.stderr
    assert kms["arn"] in refused.stderr
    assert not (tmp_path / "out2.bin").exists()


async def test_kms_keyring_used_from_inside_an_event_loop(kms, tmp_path) -> None:
    """An async caller (the LKM service) may call the synchronous keyring from its loop thread."""
    ring = Keyring.init(tmp_path / "keyring", None, kms_key_id=kms["arn"])
    package = seal_package(ring, b"from a coroutine")
    assert decrypt(package, Keyring.open(ring.path).unlock(None)) == b"from a coroutine"
