"""The suite-wide secrets and file-mode audit (tests/secrets_audit.py) can fail, and is fed by the hooks.

Positive controls: a DEK, the passphrase, a private key, an LKM secret and the AWS credentials planted in a
log line or a manifest, and 0644 / 0755 modes in a spool or repository, are each reported by name; the
same set-up without the plants reports nothing. Then a real agent and a real command line run, and the
registry holds their logs, scrapes, trees and keyring, and the audit over them knows the package's DEK.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import secrets_audit
from agent_harness import PASSPHRASE, Agent, Setup, drop, make_keyring
from secrets_audit import Registry, Tree, audit

from mediaseal import codec
from mediaseal.keys.keyring import Keyring


@pytest.fixture(scope="module")
def keyring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keyring(tmp_path_factory.mktemp("kr") / "keyring")


def spool_with_package(root: Path, keyring: Path) -> tuple[Path, bytes]:
    """A spool as the agent leaves it (0700 / 0600) holding one package and its manifest; and its DEK."""
    packages = root / "packages"
    packages.mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    ring = Keyring.open(keyring)
    header, keys = codec.new_package(codec.Metadata("rec-audit", "call", original_name="a.wav"), [ring.recipient()])
    pkg = packages / "rec-audit.mseal"
    with open(os.open(pkg, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        codec.seal(io.BytesIO(b"recording" * 1000), f, header, keys)
    manifest = packages / "rec-audit.json"
    manifest.write_bytes(b'{"recording_id":"rec-audit","state":"spooled"}')
    os.chmod(manifest, 0o600)
    with open(pkg, "rb") as f:
        dek = ring.unlock(PASSPHRASE).unwrap(codec.read_header(f).wraps)
    return pkg, dek


def registry_for(spool: Path, repository: Path, keyring: Path, log: list[str]) -> Registry:
    reg = Registry()
    reg.trees[spool] = Tree(spool, include_root=True)
    reg.trees[repository] = Tree(repository, include_root=False)
    reg.keyring(keyring, [PASSPHRASE])
    reg.text("agent #1 log", "\n".join(log).encode())
    return reg


def test_the_audit_reports_every_planted_secret_and_loose_mode(tmp_path: Path, keyring_template: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = make_keyring(tmp_path / "keyring", keyring_template)
    spool, repository = tmp_path / "buffer", tmp_path / "repository"
    repository.mkdir(mode=0o755)  # the operator's directory: its own mode is not the agent's business
    pkg, dek = spool_with_package(spool, keyring)
    log = ['{"event":"ready"}', '{"event":"spooled","recording_id":"rec-audit"}']

    clean = audit(registry_for(spool, repository, keyring, log))
    assert clean.findings == [], clean.findings  # the control: the same set-up without the plants
    assert clean.counts["DEKs"] == 1 and clean.counts["keyrings opened"] == 1
    assert clean.counts["files mode-checked"] == 2 and clean.counts["dirs mode-checked"] == 2

    from cryptography.hazmat.primitives import serialization

    kid = Keyring.open(keyring).current().kid
    pem = Keyring.open(keyring).unlock(PASSPHRASE).private_key(kid).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted/aws+secret/for-the-audit-test-0001")
    log += [f'{{"event":"sealing","debug":"{dek.hex()}"}}',
            f'{{"event":"unlock-failed","error":"wrong passphrase {PASSPHRASE.decode()}"}}',
            f'{{"event":"oops","key":"{pem.splitlines()[20]}"}}',
            '{"event":"lkm","auth":"test-secret-exp-a-' + "x" * 32 + '"}',
            '{"event":"s3","creds":"planted/aws+secret/for-the-audit-test-0001"}']
    (spool / "packages" / "rec-audit.json").write_bytes(
        b'{"recording_id":"rec-audit","dek":"' + base64.b64encode(dek) + b'"}')
    loose = spool / "packages" / "loose.json"
    loose.write_bytes(b"{}")
    os.chmod(loose, 0o644)
    (repository / "call").mkdir(mode=0o755)
    os.chmod(repository / "call", 0o755)

    report = audit(registry_for(spool, repository, keyring, log))
    found = "\n".join(report.findings)
    assert f"agent #1 log line 3: DEK of {pkg} (hex)" in found, found
    assert "agent #1 log line 4: the harness keyring passphrase (raw)" in found, found
    assert f"agent #1 log line 5: private KEK {kid[:12]} (PEM) (PEM line)" in found, found
    assert "agent #1 log line 6: LKM client secret test-secret-exp-a-xx..." in found, found
    assert "agent #1 log line 7: AWS_SECRET_ACCESS_KEY (moto's credentials) (raw)" in found, found
    assert f"file {spool / 'packages' / 'rec-audit.json'}: DEK of {pkg} (base64)" in found, found
    assert f"mode 0644 (want 0600) on file {loose}" in found, found
    assert f"mode 0755 (want 0700) on directory {repository / 'call'}" in found, found
    assert len(report.findings) == 8, found
    assert "secrets audit: 8 problem(s)" in report.message()


def test_files_the_test_planted_before_the_agent_ran_are_not_the_agents(tmp_path: Path) -> None:
    spool = tmp_path / "buffer"
    (spool / "staging").mkdir(parents=True)
    os.chmod(spool, 0o700)
    os.chmod(spool / "staging", 0o700)
    planted = spool / "staging" / "leftover.part"
    planted.write_bytes(b"x")
    os.chmod(planted, 0o644)
    reg = Registry()
    reg.tree(spool, include_root=True)  # the snapshot the harness takes before the first agent starts
    later = spool / "staging" / "made-later.part"
    later.write_bytes(b"y")
    os.chmod(later, 0o644)
    report = audit(reg)
    assert report.findings == [f"mode 0644 (want 0600) on file {later}"]
    assert report.counts["planted by the test, not checked"] == 1


def test_the_hooks_register_agents_scrapes_and_command_lines(tmp_path: Path, keyring_template: Path) -> None:
    """A real agent (with a metrics listener) and a real command line: what the suite-wide audit will see."""
    import agent_harness

    setup = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring", keyring_template),
                  watches=[{"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename"}])
    agent = Agent(setup, env={"MEDIASEAL_METRICS__ENABLED": "true", "MEDIASEAL_METRICS__LISTEN": "127.0.0.1:0"})
    agent.wait_for("ready")
    drop(setup.capture(), "hook.wav", os.urandom(20_000))
    agent.wait_for("delivered")
    assert agent.stop() == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    env["MEDIASEAL_KEYRING_PASSPHRASE"] = "a passphrase this command was given"
    r = subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", "keys", "list", "--keyring", str(setup.keyring)],
                       capture_output=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    agent_harness.reap()  # what the conftest fixture does after the test

    reg = secrets_audit.REGISTRY
    wheres = [w for w, _ in reg.texts]
    assert "agent #1 log" in wheres and "agent #1 /metrics" in wheres and "agent #1 /readyz" in wheres, wheres
    assert any(w.startswith("`mediaseal keys list") and w.endswith("stdout") for w in wheres), wheres
    assert set(reg.trees) == {setup.spool, setup.repository}
    assert b"a passphrase this command was given" in reg.keyrings[setup.keyring]
    assert any(s.label.startswith("MEDIASEAL_KEYRING_PASSPHRASE given to `mediaseal keys list")
               for s in reg.secrets)
    report = audit(reg)
    assert report.findings == [], report.findings
    assert report.counts["DEKs"] == 1 and report.counts["agents"] == 1 and report.counts["metrics scrapes"] == 3
    assert report.counts["agent log lines"] >= 5 and report.counts["files mode-checked"] >= 1
