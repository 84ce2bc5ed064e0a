"""Rotation: the schedule (injected clock, and the CLI once), retire, rewrap (filesystem and S3), and the
real agent following an HTTPS key set through a scheduled rotation.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from agent_harness import PASSPHRASE, Agent, Setup, decrypt_all, drop
from cryptography.hazmat.primitives.asymmetric import rsa
from keyset_support import KeySetServer, TestCA
from test_keyset_sources import tampered

from mediaseal import codec
from mediaseal.export.rewrap import retire_key, rewrap_repository
from mediaseal.keys.errors import KeyStateError
from mediaseal.keys.jwk import thumbprint
from mediaseal.keys.keyring import Keyring, RotationSchedule
from mediaseal.keys.keyset import parse_time
from mediaseal.keys.rotation import (
    KeyInUseError,
    add_period,
    next_rotation,
    rotate_if_due,
)

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("pooled_keks")


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_add_period_calendar() -> None:
    assert add_period(t("2024-01-31T10:00:00"), "monthly") == t("2024-02-29T10:00:00")
    assert add_period(t("2023-12-15T00:00:00"), "monthly") == t("2024-01-15T00:00:00")
    assert add_period(t("2024-02-29T00:00:00"), "yearly") == t("2025-02-28T00:00:00")
    assert add_period(t("2024-03-01T00:00:00"), "weekly") == t("2024-03-08T00:00:00")
    assert add_period(t("2024-03-01T00:00:00"), "daily") == t("2024-03-02T00:00:00")
    with pytest.raises(ValueError, match="grace_seconds must be shorter"):
        RotationSchedule.make("daily", 86400)
    assert RotationSchedule.make("daily").grace_seconds == 21600
    assert RotationSchedule.make("monthly").grace_seconds == 86400


def test_rotate_if_due_with_injected_clock(tmp_path) -> None:
    ring = Keyring.init(tmp_path / "keyring", None)
    a = ring.current().kid
    t0 = parse_time(ring.current().activated_at)
    assert "disabled" in rotate_if_due(ring, None, now=t0 + timedelta(days=400))
    ring.set_schedule(RotationSchedule.make("weekly", 86400))
    assert Keyring.open(ring.path).schedule == RotationSchedule("weekly", 86400)  # stored in keyring.json
    assert next_rotation(ring) == t0 + timedelta(days=6)

    said = rotate_if_due(ring, None, now=t0 + timedelta(days=5))
    assert said.startswith("not due") and ring.current().kid == a and len(ring.records()) == 1

    said = rotate_if_due(ring, None, now=t0 + timedelta(days=6))
    b = next(r.kid for r in ring.records() if r.kid != a)
    assert said.startswith(f"created pending key {b}")
    assert ring.record(b).state == "pending" and ring.current().kid == a  # agents get warm first

    said = rotate_if_due(ring, None, now=t0 + timedelta(days=6, hours=23))
    assert f"pending key {b} becomes current after" in said and ring.record(b).state == "pending"

    said = rotate_if_due(ring, None, now=t0 + timedelta(days=7))
    assert said.startswith(f"activated key {b}")
    assert ring.current().kid == b and ring.record(a).state == "decrypt-only"
    assert next_rotation(ring) == t0 + timedelta(days=13)
    assert rotate_if_due(ring, None, now=t0 + timedelta(days=8)).startswith("not due")

    # A pending key left behind by a manual "rotate now" is never activated over the newer key.
    ring.rotate(None, pending=True, at=t0 + timedelta(days=8))
    c = ring.records()[-1].kid
    ring.rotate(None, at=t0 + timedelta(days=9))
    d = ring.current().kid
    said = rotate_if_due(ring, None, now=t0 + timedelta(days=10))
    assert f"superseded pending key {c}" in said and ring.record(c).state == "decrypt-only"
    assert ring.current().kid == d


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    return subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, cwd=ROOT, timeout=120)


def test_cli_schedule_and_rotate_if_due(tmp_path) -> None:
    path = tmp_path / "keyring"
    ring = Keyring.init(path, PASSPHRASE)
    env = {"MEDIASEAL_KEYRING_PASSPHRASE": PASSPHRASE.decode()}
    out = cli("keys", "schedule", "--keyring", str(path), "--set", "monthly", "--grace", "3600")
    assert out.returncode == 0 and out.stdout.startswith("schedule monthly, grace 3600 s"), out.stderr
    out = cli("keys", "rotate", "--if-due", "--keyring", str(path), env=env)
    assert out.returncode == 0 and out.stdout.startswith("not due"), out.stderr

    # Make the current key two months old (keyring.json is plain JSON; nothing secret changes).
    doc = json.loads((path / "keyring.json").read_text())
    doc["keys"][0]["activated_at"] = (datetime.now(UTC) - timedelta(days=62)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (path / "keyring.json").write_text(json.dumps(doc))
    out = cli("keys", "rotate", "--if-due", "--keyring", str(path), env=env)
    assert out.returncode == 0 and out.stdout.startswith("created pending key"), out.stderr
    ring = Keyring.open(path)
    assert [r.state for r in ring.records()] == ["active", "pending"]

    bad = cli("keys", "schedule", "--keyring", str(path), "--set", "daily", "--grace", "86400")
    assert bad.returncode == 1 and "shorter than the daily period" in bad.stderr
    nopass = cli("keys", "rotate", "--if-due", "--keyring", str(path))
    assert nopass.returncode == 1 and "passphrase" in nopass.stderr and "Traceback" not in nopass.stderr


# -- retire and rewrap -------------------------------------------------------------------------------


def seal(recipients: list[codec.Recipient], data: bytes, rid: str, chunk: int = 4096) -> bytes:
    header, dek_keys = codec.new_package(codec.Metadata(rid, "call", captured_at="2024-05-01T10:00:00Z"),
                                         recipients, chunk)
    out = io.BytesIO()
    codec.seal(io.BytesIO(data), out, header, dek_keys)
    return out.getvalue()


def body(package: bytes) -> bytes:
    return package[codec.parse_header(package).size:]


class OnlyKey:
    """An unwrapper holding exactly one private key."""

    def __init__(self, kid: str, key: rsa.RSAPrivateKey) -> None:
        self.kid, self.key = kid, key

    def unwrap(self, wraps):
        for w in wraps:
            if w.kid == self.kid:
                return codec.unwrap_dek(w, self.key)
        raise codec.NoMatchingKeyError(f"no wrap for {self.kid}")


def plaintext(package: bytes, unwrapper) -> bytes:
    out = io.BytesIO()
    codec.open_package(io.BytesIO(package), unwrapper).decrypt_to(out)
    return out.getvalue()


def test_retire_refuses_used_key_and_rewrap_filesystem(tmp_path, kek_pool) -> None:
    path = tmp_path / "keyring"
    ring = Keyring.init(path, PASSPHRASE)
    a = ring.current().kid
    foreign = kek_pool[3].public_key()  # a key some other holder keeps (the pool's last key: not in this ring)
    foreign_r = codec.Recipient(thumbprint(foreign), foreign)
    repo = tmp_path / "repository"
    day = repo / "call" / "2024" / "05" / "01"
    day.mkdir(parents=True)
    originals: dict[str, bytes] = {}
    data: dict[str, bytes] = {}
    for i, recipients in enumerate([[ring.recipient()], [ring.recipient()], [ring.recipient(), foreign_r]]):
        data[f"rec-{i}"] = os.urandom(10_000 + i)
        originals[f"rec-{i}"] = seal(recipients, data[f"rec-{i}"], f"rec-{i}")
        (day / f"rec-{i}.mseal").write_bytes(originals[f"rec-{i}"])
    ring.rotate(PASSPHRASE)
    b = ring.current().kid
    (day / "rec-new.mseal").write_bytes(seal([ring.recipient()], b"already current", "rec-new"))
    url = f"file://{repo}"
    env = {"MEDIASEAL_KEYRING_PASSPHRASE": PASSPHRASE.decode()}

    refused = cli("keys", "retire", "--keyring", str(path), "--repository", url, "--", a)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"key {a} is still needed by 3 package(s)" in refused.stderr and "keys rewrap" in refused.stderr
    assert Keyring.open(path).record(a).state == "decrypt-only"
    with pytest.raises(KeyStateError, match="current"):
        asyncio.run(retire_key(Keyring.open(path), b, url))

    out = cli("keys", "rewrap", "--keyring", str(path), "--repository", url, f"--from={a}", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"rewrapped 3 package(s) to key {b}; 1 left as they were; 0 failed"
    assert sorted(p.name for p in day.iterdir()) == ["rec-0.mseal", "rec-1.mseal", "rec-2.mseal", "rec-new.mseal"]

    out = cli("keys", "retire", "--keyring", str(path), "--repository", url, "--", a)
    assert out.returncode == 0 and out.stdout.startswith(f"retired key {a}"), out.stderr
    ring = Keyring.open(path)
    assert ring.record(a).state == "retired"
    only_b = OnlyKey(b, ring.unlock(PASSPHRASE).private_key(b))
    for rid, original in originals.items():
        now = (day / f"{rid}.mseal").read_bytes()
        assert body(now) == body(original)  # bodies byte-identical: nothing was re-encrypted
        kids = [w.kid for w in codec.parse_header(now).wraps]
        assert kids == ([foreign_r.kid, b] if rid == "rec-2" else [b])  # the other holder's wrap stays
        assert plaintext(now, only_b) == data[rid]
        assert plaintext(now, ring.unlock(PASSPHRASE)) == data[rid]  # a is retired: b did it


async def test_retire_and_rewrap_s3(moto_server, tmp_path) -> None:
    import s3_support

    bucket = s3_support.make_bucket(moto_server.url)
    s3 = s3_support.boto3_client(moto_server.url)
    ring = Keyring.init(tmp_path / "keyring", None)
    a = ring.current().kid
    sizes = {"small": 3000, "large": 6 << 20}  # "large" crosses the 5 MiB part size: multipart rewrite
    originals, data = {}, {}
    import hashlib

    for name, size in sizes.items():
        data[name] = os.urandom(size)
        originals[name] = seal([ring.recipient()], data[name], name, chunk=1 << 20)
        s3.put_object(Bucket=bucket, Key=f"site/call/2024/05/01/{name}.mseal", Body=originals[name],
                      ContentType="application/vnd.mediaseal", Metadata={
                          "package-sha256": hashlib.sha256(originals[name]).hexdigest(), "kind": "call"})
    s3.put_object(Bucket=bucket, Key="site/readme.txt", Body=b"not a package")
    ring.rotate(None)
    b = ring.current().kid
    url = f"s3://{bucket}/site"

    with pytest.raises(KeyInUseError, match=f"needed by 2 package\\(s\\) in {url}"):
        await retire_key(ring, a, url, endpoint_url=moto_server.url)
    report = await rewrap_repository(ring, None, url, endpoint_url=moto_server.url, part_size=5 << 20)
    assert (len(report.rewrapped), report.unchanged, report.failed) == (2, 0, [])
    said = await retire_key(ring, a, url, endpoint_url=moto_server.url)
    assert said.startswith(f"retired key {a} (0 package(s)")

    unwrapper = ring.unlock(None)
    for name in sizes:
        obj = s3.get_object(Bucket=bucket, Key=f"site/call/2024/05/01/{name}.mseal")
        now = obj["Body"].read()
        assert body(now) == body(originals[name])
        assert [w.kid for w in codec.parse_header(now).wraps] == [b]
        assert obj["ContentType"] == "application/vnd.mediaseal"
        assert obj["Metadata"] == {"package-sha256": hashlib.sha256(now).hexdigest(), "kind": "call"}
        assert plaintext(now, unwrapper) == data[name]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# -- the real agent, fed by an HTTPS key set, through a scheduled rotation ----------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA.make(tmp_path_factory.mktemp("ca"))


def test_agent_follows_https_keyset_through_scheduled_rotation(tmp_path, ca) -> None:
    ring = Keyring.init(tmp_path / "keyring", PASSPHRASE)
    ring.set_schedule(RotationSchedule.make("weekly", 3600))
    a = ring.current().kid
    t0 = parse_time(ring.current().activated_at)
    (tmp_path / "signer.pem").write_bytes(ring.signer_pem())
    server = KeySetServer(ca).start()
    try:
        first = ring.publish(PASSPHRASE)
        server.document = first
        setup = Setup(root=tmp_path, keyring=ring.path, watches=[
            {"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename"}],
            keys={"keyset": server.url, "signer": str(tmp_path / "signer.pem"), "ca_bundle": str(ca.ca_pem),
                  "refresh_seconds": 0.2})
        agent = Agent(setup, env={"MEDIASEAL_KEYS__KEYRING": ""})  # keyset instead of the harness's keyring
        kid_of: dict[str, str] = {}
        ledger: dict[str, str] = {}

        def record(name: str) -> None:
            ledger[name] = drop(setup.capture(), name, os.urandom(20_000))
            event = agent.wait_for("spooled", where=lambda d: d["path"].endswith("/" + name))[0]
            kid_of[name] = event["kid"]
            agent.wait_for("delivered", where=lambda d: d["path"].endswith("/" + name))

        agent.wait_for("ready")
        record("1-before.wav")

        said = rotate_if_due(ring, PASSPHRASE, now=t0 + timedelta(days=7) - timedelta(seconds=3600))
        b = ring.records()[-1].kid
        assert said.startswith(f"created pending key {b}")
        server.document = ring.publish(PASSPHRASE)
        agent.wait_for("keyset-loaded", where=lambda d: d["pending"] == b and d["current"] == a)
        record("2-pending.wav")  # pending: agents know the key but still encrypt to the current one

        assert rotate_if_due(ring, PASSPHRASE, now=t0 + timedelta(days=7)).startswith(f"activated key {b}")
        server.document = ring.publish(PASSPHRASE)
        agent.wait_for("key-current", where=lambda d: d["kid"] == b)
        record("3-after.wav")

        server.document = tampered(ring.publish(PASSPHRASE))
        agent.wait_for("key-refresh-failed", where=lambda d: "signature" in d["error"])
        server.document = first  # an old, validly signed set: a rollback
        agent.wait_for("key-refresh-failed", where=lambda d: "rollback" in d["error"])
        record("4-after-tamper.wav")
        assert agent.stop() == 0
    finally:
        server.stop()

    assert kid_of == {"1-before.wav": a, "2-pending.wav": a, "3-after.wav": b, "4-after-tamper.wav": b}
    assert server.not_modified > 0  # refreshes used the ETag
    got = decrypt_all(setup.repository, ring.path)  # old packages still decrypt (a is decrypt-only)
    assert {n: v[0] for n, v in got.items()} == ledger
    assert Keyring.open(ring.path).record(a).state == "decrypt-only"
