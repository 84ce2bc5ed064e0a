"""`mediaseal export`: real S3 (moto server), real gpg, the real command (in-process and as a subprocess)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_harness import PASSPHRASE, make_keyring

from mediaseal import codec
from mediaseal.agent import cli
from mediaseal.keys.keyring import Keyring
from mediaseal.uploader.base import repository_key

GPG = "/usr/bin/gpg"
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not os.path.exists(GPG), reason="gpg is not installed")


@dataclass(frozen=True)
class Rec:
    rid: str
    kind: str
    day: str  # YYYY-MM-DD
    sha256: str
    size: int
    key: str  # in the source repository


def _seal(ring: Path, rid: str, kind: str, day: str, data: bytes, name: str, ctype: str) -> bytes:
    recipient = Keyring.open(ring).recipient()
    meta = codec.Metadata(rid, kind, ctype, name, f"{day}T10:00:00Z", "test-agent")
    header, keys = codec.new_package(meta, [recipient], 64 * 1024)
    out = io.BytesIO()
    codec.seal(io.BytesIO(data), out, header, keys)
    return out.getvalue()


def _s3(url: str):
    import s3_support

    return s3_support.boto3_client(url)


def _upload_recordings(url: str, bucket: str, ring: Path, count: int, seed: int, prefix: str = "site-a",
                       ) -> list[Rec]:
    rnd = random.Random(seed)
    s3 = _s3(url)
    recs = []
    kinds = ("call", "screen", "digital", "transcript")
    for i in range(count):
        rid = f"rec-{seed}-{i:03d}"
        kind = kinds[i % 4]
        day = f"2026-11-{10 + i % 5:02d}"
        # sizes: empty, tiny, a few chunks, and two above the 8 MiB part size (multipart)
        size = 0 if i == 0 else (9 * (1 << 20) + 123 if i in (1, 2) else rnd.randrange(1, 300_000))
        data = rnd.randbytes(size)
        name, ctype = (f"call-{i}.wav", "audio/wav") if kind == "call" else ("", "video/mp4")
        package = _seal(ring, rid, kind, day, data, name, ctype)
        key = f"{prefix}/" + repository_key(kind, f"{day}T10:00:00Z", rid)
        s3.put_object(Bucket=bucket, Key=key, Body=package)
        recs.append(Rec(rid, kind, day, hashlib.sha256(data).hexdigest(), size, key))
    return recs


@pytest.fixture(scope="module")
def world(moto_server, tmp_path_factory):
    """A keyring, a source bucket with 20 recordings, a gpg home with an auditor key (made by gpg)."""
    import s3_support

    tmp = tmp_path_factory.mktemp("export")
    ring = make_keyring(tmp / "keyring")
    source = s3_support.make_bucket(moto_server.url)
    recs = _upload_recordings(moto_server.url, source, ring, 20, seed=1)
    home = tmp / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run([GPG, "--batch", "--passphrase", "", "--quick-gen-key", "Auditor <auditor@example.com>",
                    "default", "default", "never"], env=env, check=True, capture_output=True)
    cert = tmp / "auditor.asc"
    cert.write_bytes(subprocess.run([GPG, "--armor", "--export", "auditor@example.com"], env=env, check=True,
                                    capture_output=True).stdout)
    yield {"ring": ring, "source": source, "recs": recs, "gnupghome": home, "cert": cert, "tmp": tmp}
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True)


@pytest.fixture
def passphrase_env(monkeypatch):
    monkeypatch.setenv("MEDIASEAL_KEYRING_PASSPHRASE", PASSPHRASE.decode())


def _export(url: str, world, dest: str, *extra: str, source: str | None = None) -> int:
    return cli.main(["export", "--repository", f"s3://{source or world['source']}/site-a", "--dest", dest,
                     "--keyring", str(world["ring"]), "--endpoint-url", url, *extra])


def _objects(url: str, bucket: str) -> dict[str, int]:
    out = {}
    for page in _s3(url).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def _get(url: str, bucket: str, key: str) -> bytes:
    return _s3(url).get_object(Bucket=bucket, Key=key)["Body"].read()


def _expected_keys(recs: list[Rec], prefix: str, pgp: bool) -> dict[str, Rec]:
    keys = {}
    for r in recs:
        y, m, d = r.day.split("-")
        ext = "wav" if r.kind == "call" else "mp4"
        base = f"{prefix}/year={y}/month={m}/day={d}/{r.rid}"
        keys[f"{base}.{ext}" + (".pgp" if pgp else "")] = r
        keys[f"{base}_metadata.json"] = r
    return keys


def test_export_sse_s3_plaintext_then_rerun_skips(moto_server, world, passphrase_env, capsys):
    import s3_support

    url, recs = moto_server.url, world["recs"]
    dest = s3_support.make_bucket(url)
    t0 = time.monotonic()
    assert _export(url, world, f"s3://{dest}/case-1", "--sse", "AES256") == 0
    elapsed = time.monotonic() - t0
    err = capsys.readouterr()
    assert err.err.count("export: exported ") == 20, err.err
    assert "20 exported" in err.out
    objects = _objects(url, dest)
    expected = _expected_keys(recs, "case-1", pgp=False)
    assert set(objects) == set(expected)
    s3 = _s3(url)
    for key, rec in expected.items():
        head = s3.head_object(Bucket=dest, Key=key)
        assert head["ServerSideEncryption"] == "AES256"
        if key.endswith("_metadata.json"):
            doc = json.loads(_get(url, dest, key))
            assert doc["plaintext"] == {"size": rec.size, "sha256": rec.sha256}
            assert doc["recording"]["recording_id"] == rec.rid
            assert doc["kid"] == Keyring.open(world["ring"]).current().kid
            assert doc["pgp"] is None
            assert doc["source"]["key"] == rec.key.removeprefix("site-a/")
        else:
            assert hashlib.sha256(_get(url, dest, key)).hexdigest() == rec.sha256
    print(f"\n[export] {len(recs)} recordings, {sum(r.size for r in recs) / 1e6:.1f} MB in {elapsed:.2f} s",
          file=sys.stderr)

    # Re-running finds every recording done (metadata present and matching): nothing is written again.
    assert _export(url, world, f"s3://{dest}/case-1", "--sse", "AES256") == 0
    out = capsys.readouterr()
    assert "0 exported, 20 already exported" in out.out
    assert _objects(url, dest) == objects


def test_export_sse_kms_with_pgp_decrypts_with_gpg(moto_server, world, passphrase_env, capsys):
    import s3_support

    url, recs = moto_server.url, world["recs"]
    dest = s3_support.make_bucket(url)
    kms_key = s3_support.make_kms_key(url)
    assert _export(url, world, f"s3://{dest}/case-2", "--sse", "aws:kms", "--sse-kms-key-id", kms_key,
                   "--pgp-recipient", str(world["cert"]), "--concurrency", "6") == 0
    capsys.readouterr()
    expected = _expected_keys(recs, "case-2", pgp=True)
    assert set(_objects(url, dest)) == set(expected)
    s3 = _s3(url)
    env = {**os.environ, "GNUPGHOME": str(world["gnupghome"])}
    fingerprint = None
    for key, rec in expected.items():
        head = s3.head_object(Bucket=dest, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"].endswith(kms_key.rsplit("/", 1)[-1])
        body = _get(url, dest, key)
        if key.endswith("_metadata.json"):
            doc = json.loads(body)
            fingerprint = doc["pgp"]["recipient_fingerprint"]
            assert doc["plaintext"]["sha256"] == rec.sha256
            continue
        packets = subprocess.run([GPG, "--batch", "--list-packets"], input=body, env=env,
                                 capture_output=True).stdout.decode()
        assert ":encrypted data packet:" in packets and "mdc_method: 2" in packets  # SEIPD v1 (gpg 2.2)
        assert ":aead encrypted packet:" not in packets
        plain = subprocess.run([GPG, "--batch", "--quiet", "--decrypt"], input=body, env=env,
                               capture_output=True, check=True).stdout
        assert hashlib.sha256(plain).hexdigest() == rec.sha256, key
    listed = subprocess.run([GPG, "--with-colons", "--fingerprint", "auditor@example.com"], env=env,
                            capture_output=True, check=True).stdout.decode()
    assert fingerprint is not None and fingerprint.upper() in listed


def test_killed_export_resumes_without_duplicates(moto_server, world, fault_proxy):
    import s3_support

    url, recs = moto_server.url, world["recs"]
    dest = s3_support.make_bucket(url)
    fault_proxy.delay(0.25, when=lambda r: r.op == "PutObject")  # slow enough to be killed midway
    env = {**os.environ, "MEDIASEAL_KEYRING_PASSPHRASE": PASSPHRASE.decode(), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "mediaseal.agent.cli", "export", "--repository", f"s3://{world['source']}/site-a",
            "--dest", f"s3://{dest}/case-3", "--keyring", str(world["ring"]), "--sse", "AES256",
            "--concurrency", "1"]
    proc = subprocess.Popen([*argv, "--endpoint-url", fault_proxy.url], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, cwd=ROOT)
    seen = 0
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(b"export: exported "):
            seen += 1
            if seen == 4:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = _objects(url, dest)
    assert 4 <= sum(k.endswith("_metadata.json") for k in partial) < 20

    fault_proxy.clear()
    done = subprocess.run([*argv, "--endpoint-url", url], env=env, capture_output=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    summary = done.stdout.decode()
    skipped = int(summary.split(" already exported")[0].rsplit(", ", 1)[1])
    assert skipped >= 4
    assert f"{20 - skipped} exported" in summary
    assert set(_objects(url, dest)) == set(_expected_keys(recs, "case-3", pgp=False))  # one of each, no extras
    uploads = _s3(url).list_multipart_uploads(Bucket=dest).get("Uploads", [])
    assert len(uploads) <= 1  # at most the one the kill interrupted


def test_tampered_and_wrong_key_fail_only_themselves(moto_server, world, passphrase_env, capsys, tmp_path):
    import s3_support

    url = moto_server.url
    source = s3_support.make_bucket(url)
    recs = _upload_recordings(url, source, world["ring"], 6, seed=7)
    s3 = _s3(url)
    # Flip a byte in the body of one package; seal another to a keyring the export doesn't have.
    victim = recs[3]
    data = bytearray(_get(url, source, victim.key))
    data[-40] ^= 0x01
    s3.put_object(Bucket=source, Key=victim.key, Body=bytes(data))
    other = make_keyring(tmp_path / "other")
    stranger = "rec-stranger"
    key = "site-a/" + repository_key("call", "2026-11-12T10:00:00Z", stranger)
    s3.put_object(Bucket=source, Key=key, Body=_seal(other, stranger, "call", "2026-11-12", b"x" * 5000, "s.wav",
                                                     "audio/wav"))
    dest = s3_support.make_bucket(url)
    assert _export(url, world, f"s3://{dest}/case-4", "--sse", "AES256", source=source) == 1
    err = capsys.readouterr().err
    assert f"mediaseal: error: {victim.key.removeprefix('site-a/')}: " in err
    assert f"mediaseal: error: {key.removeprefix('site-a/')}: no key" in err
    assert "2 recording(s) failed to export" in err
    assert "Traceback" not in err
    good = [r for r in recs if r is not victim]
    assert set(_objects(url, dest)) == set(_expected_keys(good, "case-4", pgp=False))


def test_filters_select_by_kind_date_and_ids(moto_server, world, passphrase_env, capsys, tmp_path):
    import s3_support

    url, recs = moto_server.url, world["recs"]
    dest = s3_support.make_bucket(url)
    assert _export(url, world, f"s3://{dest}/k", "--kind", "call", "--since", "2026-11-11",
                   "--until", "2026-11-13") == 0
    want = [r for r in recs if r.kind == "call" and "2026-11-11" <= r.day <= "2026-11-13"]
    assert want and set(_objects(url, dest)) == set(_expected_keys(want, "k", pgp=False))
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# auditor's list\n{recs[5].rid}\n\n{recs[17].rid}\n")
    dest2 = s3_support.make_bucket(url)
    assert _export(url, world, f"s3://{dest2}", "--ids", str(ids)) == 0
    keys = set(_objects(url, dest2))  # no --dest prefix: the layout starts at the bucket's root
    assert keys == {k.removeprefix("/") for k in _expected_keys([recs[5], recs[17]], "", pgp=False)}
    capsys.readouterr()


def test_bad_recipient_and_options_fail_at_start(moto_server, world, passphrase_env, capsys, tmp_path):
    import s3_support

    url = moto_server.url
    dest = s3_support.make_bucket(url)
    junk = tmp_path / "junk.asc"
    junk.write_text("not a key\n")
    assert _export(url, world, f"s3://{dest}", "--pgp-recipient", str(junk)) == 1
    err = capsys.readouterr().err
    assert err.startswith("mediaseal: error: ") and "not an OpenPGP certificate" in err
    assert err.count("\n") == 1
    assert _export(url, world, f"s3://{dest}", "--sse", "aws:kms") == 1
    assert "--sse-kms-key-id" in capsys.readouterr().err
    assert _export(url, world, f"s3://{dest}-missing") == 1
    assert "-missing does not exist" in capsys.readouterr().err

    # Certificates gpg itself made, but that can't be encrypted to: sign-only, and expired.
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    gen = [GPG, "--batch", "--passphrase", "", "--quick-gen-key"]
    subprocess.run([*gen, "Signer <s@example.com>", "ed25519", "sign", "never"], env=env, check=True,
                   capture_output=True)
    subprocess.run([*gen, "Old <o@example.com>", "future-default", "default", "seconds=1"], env=env, check=True,
                   capture_output=True)
    time.sleep(2)
    try:
        for email, words in (("s@example.com", "no usable encryption subkey"), ("o@example.com", "expired")):
            cert = tmp_path / f"{email}.asc"
            cert.write_bytes(subprocess.run([GPG, "--armor", "--export", email], env=env, check=True,
                                            capture_output=True).stdout)
            assert _export(url, world, f"s3://{dest}", "--pgp-recipient", str(cert)) == 1
            err = capsys.readouterr().err
            assert words in err and err.count("\n") == 1, err
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True)
    assert _objects(url, dest) == {}


def test_lkm_unwraps_in_batches(moto_server, world, tmp_path, capsys):
    """With --lkm, the window's DEKs come from one batch request, not one request per recording."""
    import lkm_support as ls
    import s3_support

    pki = ls.make_pki(tmp_path / "pki")
    clients = ls.write_clients(tmp_path / "clients.json", [
        {"name": "export-1", "roles": ["unwrap"], "cert_names": ["export-1"],
         "credentials": [{"id": "exp-a", "secret": ls.secret("exp-a")}]}])
    cred = ls.write_credential(tmp_path / "exp-a.json", "exp-a")
    url = moto_server.url
    dest = s3_support.make_bucket(url)
    with ls.LKMServer(ls.config(tmp_path / "srv", world["ring"], pki, clients, passphrase=PASSPHRASE)) as srv:
        rc = cli.main(["export", "--repository", f"s3://{world['source']}/site-a", "--dest", f"s3://{dest}/lkm",
                       "--lkm", srv.url, "--lkm-credentials", str(cred), "--lkm-ca", str(pki.ca),
                       "--endpoint-url", url])
        assert rc == 0, capsys.readouterr().err
        assert srv.handler_calls("unwrap.batch") == 1
        assert srv.handler_calls("unwrap") == 0
    assert set(_objects(url, dest)) == set(_expected_keys(world["recs"], "lkm", pgp=False))


def test_file_source_with_the_progress_bar(moto_server, world, tmp_path):
    """A file:// repository works as a source; the rich progress bar runs through a whole export."""
    import asyncio

    import s3_support
    from rich.console import Console

    from mediaseal.export.bulk import ExportOptions, RichProgress, run_export

    url = moto_server.url
    repo = tmp_path / "repo"
    for r in world["recs"][:5]:
        p = repo / r.key.removeprefix("site-a/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_get(url, world["source"], r.key))
    dest = s3_support.make_bucket(url)
    screen = io.StringIO()
    progress = RichProgress(Console(file=screen, force_terminal=True, width=120))
    unwrapper = Keyring.open(world["ring"]).unlock(PASSPHRASE)
    report = asyncio.run(run_export(ExportOptions(source=f"file://{repo}", dest=f"s3://{dest}/f", sse="AES256",
                                                  endpoint_url=url), unwrapper, progress))
    assert (report.exported, report.skipped, report.failed) == (5, 0, [])
    assert set(_objects(url, dest)) == set(_expected_keys(world["recs"][:5], "f", pgp=False))
    assert "5/5" in screen.getvalue()
