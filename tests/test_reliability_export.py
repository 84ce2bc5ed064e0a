"""Custody outages during decrypt and bulk export (issue 9): rows of the reliability fault table,
repository column "export".

- The Local Key Manager is a real `mediaseal lkm serve` process on loopback (HTTPS, signed requests),
  SIGKILLed while `mediaseal export` runs, or down when the export (or `mediaseal decrypt` of one
  recording) starts; then started again on the same port.
- The keyring's private keys are sealed under an AWS KMS key (moto's KMS over HTTP); the key is
  disabled before or during the export, then enabled again.

Every `mediaseal` run is a real subprocess; sources are S3 (moto) or a directory; the destination is a
moto bucket. Demanded of the run that meets the outage: exit 1, one `mediaseal: error:` line naming the
problem, no traceback; nothing half-exported (every object in the destination is a whole data object
with its metadata object, for exactly the recordings the run reported exported; no multipart upload
left), no plaintext on the local disk (the export's working and temp directories are scanned for the
marker every recording carries), the repository untouched. After the fix, a re-run of the same command
completes: every recording exported exactly once over both runs, with the ledger's SHA-256.
recover: fix -> first recording exported by the re-run; drain: fix -> the re-run done.
"""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from custody_support import (
    EXPORTED,
    Command,
    Corpus,
    LKMProcess,
    LKMWorld,
    check_export,
    dir_store,
    merge,
    one_error_line,
    read_destination,
    s3_store,
    snapshot_dir,
    snapshot_s3,
    wrong_objects,
)
from reliability_support import Check, assert_zero, plaintext_hits, record, sized
from support.process import child_env, reap

from mediaseal.keys.keyring import Keyring
from mediaseal.keys.kms import KmsOptions

EXPORT = "export"
MiB = 1 << 20
BATCH = 64  # export.bulk.ExportOptions.batch: the recordings whose DEKs one LKM batch request fetches


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    yield
    reap()


@pytest.fixture(scope="module")
def lkm_world(tmp_path_factory: pytest.TempPathFactory) -> LKMWorld:
    """A passphrase keyring only the LKM opens, a throwaway PKI, a clients file and an export credential."""
    import lkm_support as ls

    d = tmp_path_factory.mktemp("custody-lkm")
    Keyring.init(d / "keyring", ls.PASSPHRASE)
    clients = ls.write_clients(d / "clients.json", [
        {"name": "export-1", "roles": ["unwrap"], "cert_names": ["export-1"],
         "credentials": [{"id": "exp-a", "secret": ls.secret("exp-a")}]}])
    return LKMWorld(d, d / "keyring", ls.PASSPHRASE, ls.make_pki(d / "pki"), clients,
                    ls.write_credential(d / "exp-a.json", "exp-a"))


def dirs(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The export's working directory and an environment whose TMPDIR is under tmp_path (both scanned)."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    return work, child_env(TMPDIR=str(tmp))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there until the LKM starts


def small_sizes(rng: random.Random, n: int) -> list[int]:
    return [rng.choice([5000, 20_000, 70_000]) for _ in range(n)]


# -- the Local Key Manager -----------------------------------------------------------------------------------


def test_lkm_sigkilled_mid_export(tmp_path: Path, lkm_world: LKMWorld, moto_server: Any) -> None:
    """70 recordings from S3: the first window's 64 DEKs come in one batch request; the LKM is SIGKILLed
    as the first recording is exported, so the second window finds it gone."""
    import s3_support

    url = moto_server.url
    s3 = s3_support.boto3_client(url)
    source = s3_support.make_bucket(url)
    rng = random.Random(9)
    sizes = [0, 9 * MiB + 77, *small_sizes(rng, BATCH + 6 - 2)]  # an empty one, a multipart one (8 MiB parts)
    corpus = Corpus.make(lkm_world.keyring, "lkmkill", sizes, s3_store(s3, source, "site"))
    repository = snapshot_s3(s3, source)
    work, env = dirs(tmp_path)
    audit = tmp_path / "audit.jsonl"
    lkm = LKMProcess(lkm_world, audit).start()
    iterations = sized(1, 4)
    checks: list[Check] = []
    recover, drain = [], []
    for it in range(iterations):
        dest = s3_support.make_bucket(url)
        argv = ["export", "--repository", f"s3://{source}/site", "--dest", f"s3://{dest}/case",
                *lkm_world.client_args(lkm.url), "--endpoint-url", url]
        failing = Command([*argv, "--concurrency", "1"], env, work)
        failing.wait_line(EXPORTED)
        assert failing.proc.poll() is None, "the export ended before the LKM was killed"
        lkm.kill()
        line = one_error_line(failing, failing.finish())
        assert "key service unreachable" in line and lkm.url in line, line
        done_first = failing.exported()
        assert 1 <= len(done_first) < len(corpus), failing.stderr[-2000:]
        # Nothing half-exported: exactly the recordings reported exported are there, whole, with metadata.
        partial = read_destination(s3, dest, "case")
        assert partial.half == [] and wrong_objects(partial, corpus) == []
        assert set(partial.data) == set(partial.meta) == {k.rsplit("/", 1)[1].removesuffix(".mseal")
                                                          for k in done_first}
        leaked = plaintext_hits([tmp_path], [])
        assert snapshot_s3(s3, source) == repository, "the export changed the repository"

        fixed = time.monotonic()
        lkm.start()  # same port, same keyring, same audit log (left by a SIGKILL)
        rerun = Command(argv, env, work)
        assert rerun.finish() == 0, rerun.stderr[-3000:]
        assert (f"{len(corpus)} selected, {len(corpus) - len(done_first)} exported, {len(done_first)} already"
                f" exported, 0 failed") in rerun.stdout, rerun.stdout
        first = rerun.first_exported()
        assert first is not None and rerun.ended is not None
        recover.append(first - fixed)
        drain.append(rerun.ended - fixed)
        checks.append(check_export(read_destination(s3, dest, "case"), corpus, [failing, rerun],
                                   leaked + plaintext_hits([tmp_path], [])))
        checks[-1].orphans += partial.half
    lkm.stop()
    assert snapshot_s3(s3, source) == repository
    from mediaseal.keys.lkm.audit import verify_audit_log

    verify_audit_log(audit)  # the chain survived the SIGKILLs
    check = merge(checks)
    record(EXPORT, "LKM SIGKILLed mid-export, then restarted", check, iterations, recover, drain)
    assert_zero(check)


def test_lkm_down_when_export_starts(tmp_path: Path, lkm_world: LKMWorld, moto_server: Any) -> None:
    """A directory repository; nothing listens at the LKM's address when the export starts."""
    import s3_support

    url = moto_server.url
    s3 = s3_support.boto3_client(url)
    repo = tmp_path / "repository"
    rng = random.Random(10)
    corpus = Corpus.make(lkm_world.keyring, "lkmdown", [0, 2 * MiB, *small_sizes(rng, 6)], dir_store(repo))
    repository = snapshot_dir(repo)
    work, env = dirs(tmp_path)
    lkm = LKMProcess(lkm_world, tmp_path / "audit.jsonl")
    lkm.port = free_port()
    iterations = sized(1, 4)
    checks: list[Check] = []
    recover, drain = [], []
    for _ in range(iterations):
        dest = s3_support.make_bucket(url)
        argv = ["export", "--repository", f"file://{repo}", "--dest", f"s3://{dest}/case",
                *lkm_world.client_args(lkm.url), "--endpoint-url", url]
        failing = Command(argv, env, work)
        line = one_error_line(failing, failing.finish())
        assert "key service unreachable" in line and lkm.url in line, line
        assert failing.exported() == []
        partial = read_destination(s3, dest, "case")
        assert (partial.data, partial.meta, partial.half) == ({}, {}, [])
        leaked = plaintext_hits([tmp_path], [])
        assert snapshot_dir(repo) == repository

        fixed = time.monotonic()
        lkm.start()
        rerun = Command(argv, env, work)
        assert rerun.finish() == 0, rerun.stderr[-3000:]
        assert f"{len(corpus)} exported, 0 already exported, 0 failed" in rerun.stdout, rerun.stdout
        first = rerun.first_exported()
        assert first is not None and rerun.ended is not None
        recover.append(first - fixed)
        drain.append(rerun.ended - fixed)
        checks.append(check_export(read_destination(s3, dest, "case"), corpus, [failing, rerun],
                                   leaked + plaintext_hits([tmp_path], [])))
        lkm.stop()  # down again for the next iteration
    assert snapshot_dir(repo) == repository
    check = merge(checks)
    record(EXPORT, "LKM down when the export starts, then started", check, iterations, recover, drain)
    assert_zero(check)


def test_lkm_down_during_decrypt(tmp_path: Path, lkm_world: LKMWorld, moto_server: Any) -> None:
    """`mediaseal decrypt s3://...` of one recording while the LKM is SIGKILLed: no output, no temp file."""
    import s3_support

    url = moto_server.url
    s3 = s3_support.boto3_client(url)
    source = s3_support.make_bucket(url)
    corpus = Corpus.make(lkm_world.keyring, "lkmdec", [3 * MiB + 11], s3_store(s3, source, "site"))
    (rid, name), = corpus.ids.items()
    key = f"s3://{source}/site/call/2026/11/28/{rid}.mseal"
    repository = snapshot_s3(s3, source)
    work, env = dirs(tmp_path)
    env["AWS_ENDPOINT_URL_S3"] = url
    lkm = LKMProcess(lkm_world, tmp_path / "audit.jsonl").start()
    iterations = sized(1, 4)
    lost, leaked, orphans = [], [], []
    recover, drain = [], []
    for it in range(iterations):
        out = work / f"out-{it}.wav"
        lkm.kill()
        failing = Command(["decrypt", key, "-o", str(out), *lkm_world.client_args(lkm.url)], env, work)
        line = one_error_line(failing, failing.finish())
        assert "key service unreachable" in line and lkm.url in line, line
        assert not out.exists(), "a failed decrypt left its output file"
        orphans += [str(p) for p in work.iterdir()]  # no temp file beside the output either
        leaked += plaintext_hits([tmp_path], [])
        assert snapshot_s3(s3, source) == repository

        fixed = time.monotonic()
        lkm.start()
        ok = Command(["decrypt", key, "-o", str(out), *lkm_world.client_args(lkm.url)], env, work)
        assert ok.finish() == 0, ok.stderr
        assert ok.ended is not None
        recover.append(ok.ended - fixed)
        drain.append(ok.ended - fixed)
        if hashlib.sha256(out.read_bytes()).hexdigest() != corpus.ledger.sha[name]:
            lost.append(name)
        leaked += plaintext_hits([tmp_path], [out])  # the output itself is the plaintext asked for
        orphans += [str(p) for p in work.iterdir() if p != out]
        out.unlink()
    lkm.stop()
    check = Check(iterations, lost, [], leaked, orphans)
    record(EXPORT, "LKM SIGKILLed, decrypt of one recording, then restarted", check, iterations, recover, drain)
    assert_zero(check)


# -- AWS KMS ------------------------------------------------------------------------------------------------


@pytest.fixture
def kms_refuses_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto 5.2's KMS Decrypt ignores the key state; real KMS answers DisabledException (as in test_kms.py).
    This changes moto, the stand-in for AWS, never mediaseal: its requests still go over HTTP to moto."""
    from moto.core.exceptions import JsonRESTError
    from moto.kms.models import KmsBackend

    original = KmsBackend.decrypt

    def decrypt(self: Any, ciphertext_blob: bytes, encryption_context: Any, key_id: Any = None) -> Any:
        plaintext, arn = original(self, ciphertext_blob=ciphertext_blob, encryption_context=encryption_context,
                                  key_id=key_id)
        if self.keys[self.get_key_id(arn)].key_state != "Enabled":
            raise JsonRESTError("DisabledException", f"{arn} is disabled.")
        return plaintext, arn

    monkeypatch.setattr(KmsBackend, "decrypt", decrypt)


@pytest.fixture(scope="module")
def kms_world(moto_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A KMS key, a keyring whose private keys are sealed under it, and a directory repository of 12
    recordings sealed to that keyring (made once: RSA key generation is slow)."""
    import s3_support

    d = tmp_path_factory.mktemp("custody-kms")
    arn = s3_support.make_kms_key(moto_server.url)
    ring = Keyring.init(d / "keyring", None, kms_key_id=arn, kms=KmsOptions(endpoint_url=moto_server.url)).path
    rng = random.Random(11)
    corpus = Corpus.make(ring, "kms", [0, 2 * MiB, *small_sizes(rng, 10)], dir_store(d / "repository"))
    # moto 5.2 answers DisableKey/EnableKey by key id, not by ARN (HTTP 500)
    return {"arn": arn, "key_id": arn.rsplit("/", 1)[1], "ring": ring, "repo": d / "repository", "corpus": corpus}


@pytest.mark.parametrize("when", ["before", "during"])
def test_kms_key_disabled_export(tmp_path: Path, moto_server: Any, fault_proxy: Any, kms_refuses_disabled: None,
                                 kms_world: dict[str, Any], when: str) -> None:
    """A KMS-protected keyring; the KMS key disabled before the export, or as its first recording is
    exported (--kms-cache-seconds 0.5: the private key opened at start is asked for again within half a
    second, so revocation bites mid-export). S3 goes through the fault proxy, which slows PutObject
    (0.1 s) so the export is still running when the key is disabled and when the cached key expires."""
    import s3_support

    url = moto_server.url
    s3 = s3_support.boto3_client(url)
    kms = s3_support.boto3_client(url, "kms")
    arn, key_id, ring, repo, corpus = (kms_world[k] for k in ("arn", "key_id", "ring", "repo", "corpus"))
    kms.enable_key(KeyId=key_id)  # whatever a failed earlier test left
    repository = snapshot_dir(repo)
    work, env = dirs(tmp_path)
    env["AWS_ENDPOINT_URL_KMS"] = url  # the standard variable: mediaseal has no KMS endpoint option
    iterations = sized(1, 4)
    checks: list[Check] = []
    recover, drain = [], []
    for _ in range(iterations):
        dest = s3_support.make_bucket(url)
        argv = ["export", "--repository", f"file://{repo}", "--dest", f"s3://{dest}/case", "--keyring", str(ring),
                "--endpoint-url", fault_proxy.url]
        if when == "before":
            kms.disable_key(KeyId=key_id)
            failing = Command(argv, env, work)
        else:
            fault_proxy.delay(0.1, when=lambda r: r.op == "PutObject")
            argv += ["--kms-cache-seconds", "0.5"]
            failing = Command([*argv, "--concurrency", "1"], env, work)
            failing.wait_line(EXPORTED)
            assert failing.proc.poll() is None, "the export ended before the key was disabled"
            kms.disable_key(KeyId=key_id)
        line = one_error_line(failing, failing.finish())
        assert "KMS refused Decrypt" in line and "DisabledException" in line and arn in line, line
        done_first = failing.exported()
        assert (done_first == []) if when == "before" else (1 <= len(done_first) < len(corpus)), failing.stderr
        partial = read_destination(s3, dest, "case")
        assert partial.half == [] and wrong_objects(partial, corpus) == []
        assert set(partial.data) == set(partial.meta) == {k.rsplit("/", 1)[1].removesuffix(".mseal")
                                                          for k in done_first}
        leaked = plaintext_hits([tmp_path], [])
        assert snapshot_dir(repo) == repository

        fault_proxy.clear()
        fixed = time.monotonic()
        kms.enable_key(KeyId=key_id)
        rerun = Command(argv, env, work)
        assert rerun.finish() == 0, rerun.stderr[-3000:]
        assert (f"{len(corpus) - len(done_first)} exported, {len(done_first)} already exported, 0 failed"
                in rerun.stdout), rerun.stdout
        first = rerun.first_exported()
        assert first is not None and rerun.ended is not None
        recover.append(first - fixed)
        drain.append(rerun.ended - fixed)
        checks.append(check_export(read_destination(s3, dest, "case"), corpus, [failing, rerun],
                                   leaked + plaintext_hits([tmp_path], [])))
        checks[-1].orphans += partial.half
    assert snapshot_dir(repo) == repository
    check = merge(checks)
    record(EXPORT, f"KMS key disabled {when} the export, then enabled", check, iterations, recover, drain)
    assert_zero(check)
