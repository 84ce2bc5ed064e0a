"""The LKM from the command line, as operators run it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lkm_support as ls
import pytest
from support.process import one_line_error, run_cli

from mediaseal import codec
from mediaseal.keys.keyring import Keyring
from mediaseal.keys.lkm.audit import AuditChainError, verify_audit_log
from mediaseal.keys.lkm.client import LKMClient, load_client_credential

CLIENTS = [{"name": "export-1", "roles": ["unwrap"], "cert_names": ["export-1"],
            "credentials": [{"id": "exp-a", "secret": ls.secret("exp-a")}]}]


def ms(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*args, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("lkmcli")
    Keyring.init(d / "keyring", ls.PASSPHRASE)
    pki = ls.make_pki(d / "pki")
    clients = ls.write_clients(d / "clients.json", CLIENTS)
    cred = ls.write_credential(d / "exp-a.json", "exp-a")
    data = os.urandom(50_000)
    (d / "call.wav").write_bytes(data)
    r = ms("encrypt", d / "call.wav", "-o", d / "call.mseal", "--keyring", d / "keyring", "--recording-id", "rec-cli")
    assert r.returncode == 0, r.stderr
    return {"dir": d, "pki": pki, "clients": clients, "cred": cred, "data": data, "pkg": d / "call.mseal"}


@pytest.fixture(scope="module")
def server(world: dict[str, Any]) -> Iterator[ls.LKMServer]:
    d = world["dir"]
    with ls.LKMServer(ls.config(d / "srv", d / "keyring", world["pki"], world["clients"])) as srv:
        yield srv


def lkm_args(url: str, world: dict[str, Any]) -> list[str | Path]:
    return ["--lkm", url, "--lkm-credentials", world["cred"], "--lkm-ca", world["pki"].ca]


def test_decrypt_and_verify_through_the_lkm(server: ls.LKMServer, world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    r = ms("decrypt", world["pkg"], "-o", out, *lkm_args(server.url, world))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == world["data"] and r.stderr == b""
    r = ms("verify", world["pkg"], *lkm_args(server.url, world))
    assert r.returncode == 0 and b"rec-cli" in r.stdout
    # mTLS instead of a signature.
    cert, key = world["pki"].clients["export-1"]
    r = ms("decrypt", world["pkg"], "-o", tmp_path / "out2.wav", "--lkm", server.url, "--lkm-ca", world["pki"].ca,
           "--lkm-cert", cert, "--lkm-key", key)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out2.wav").read_bytes() == world["data"]


def test_lkm_down_is_one_line_and_exit_1(world: dict[str, Any], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = ms("decrypt", world["pkg"], "-o", tmp_path / "out.wav", *lkm_args(f"https://127.0.0.1:{port}", world))
    line = one_line_error(r)
    assert f"key service unreachable: https://127.0.0.1:{port}" in line
    assert not (tmp_path / "out.wav").exists()


def test_lkm_refusals_are_one_line(server: ls.LKMServer, world: dict[str, Any], tmp_path: Path) -> None:
    bad = ls.write_credential(tmp_path / "bad.json", "exp-a", tag="wrong")
    r = ms("decrypt", world["pkg"], "-o", tmp_path / "o", "--lkm", server.url, "--lkm-credentials", bad,
           "--lkm-ca", world["pki"].ca)
    assert "key service: unauthenticated: signature does not verify" in one_line_error(r)
    r = ms("decrypt", world["pkg"], "-o", tmp_path / "o", "--lkm", server.url.replace("https", "http"),
           "--lkm-credentials", world["cred"])
    assert "must be https" in one_line_error(r)


def test_lkm_serve_as_a_process(world: dict[str, Any], tmp_path: Path) -> None:
    """`mediaseal lkm serve` itself: starts, says where it listens, serves a decrypt, stops on SIGTERM."""
    d = world["dir"]
    audit = tmp_path / "audit.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    env["MEDIASEAL_KEYRING_PASSPHRASE"] = ls.PASSPHRASE.decode()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mediaseal.agent.cli", "lkm", "serve", "--keyring", str(d / "keyring"),
         "--clients", str(world["clients"]), "--audit-log", str(audit), "--tls-cert", str(world["pki"].server_cert),
         "--tls-key", str(world["pki"].server_key), "--listen", "127.0.0.1:0", "--rotation-check", "0"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        url, seen = None, []
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            if not line:
                break
            seen.append(line)
            m = re.search(r"listening url=(https://\S+)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        assert ls.secret("exp-a") not in "".join(seen) and ls.PASSPHRASE.decode() not in "".join(seen)
        r = ms("decrypt", world["pkg"], "-o", tmp_path / "out.wav", *lkm_args(url, world))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out.wav").read_bytes() == world["data"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert code == 0
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [x["operation"] for x in lines] == ["service.start", "unwrap", "service.stop"]
    assert ms("lkm", "audit-verify", audit).returncode == 0


def test_lkm_serve_configuration_errors_are_one_line(world: dict[str, Any], tmp_path: Path) -> None:
    d = world["dir"]
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"clients": CLIENTS}))
    os.chmod(clients, 0o644)
    base: list[str | Path] = ["lkm", "serve", "--keyring", d / "keyring", "--clients", clients, "--audit-log",
                              tmp_path / "a.jsonl", "--tls-cert", world["pki"].server_cert, "--tls-key",
                              world["pki"].server_key, "--listen", "127.0.0.1:0"]
    env = {"MEDIASEAL_KEYRING_PASSPHRASE": ls.PASSPHRASE.decode()}
    assert "holds secrets but is mode 0644" in one_line_error(ms(*base, env=env))
    os.chmod(clients, 0o600)
    assert "wrong passphrase" in one_line_error(ms(*base, env={"MEDIASEAL_KEYRING_PASSPHRASE": "nope"}))
    assert "needs --client-ca" in one_line_error(ms(*base, "--auth", "mtls", env=env))


def test_audit_verify_detects_a_removed_or_edited_line(server: ls.LKMServer, world: dict[str, Any],
                                                       tmp_path: Path) -> None:
    c = LKMClient(server.url, credential=load_client_credential(world["cred"]), ca_file=world["pki"].ca, cache_ttl=0)
    with world["pkg"].open("rb") as f:
        wraps = codec.read_header(f).wraps
    for _ in range(4):  # enough lines of its own in the server's log, whatever ran before on this server
        c.unwrap(wraps)
    log = server.config.audit_log
    r = ms("lkm", "audit-verify", log)
    assert r.returncode == 0, r.stderr
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 5 and r.stdout.decode().startswith(f"ok: {log}: {len(lines)} lines")
    head = r.stdout.decode().split()[-1]

    removed = tmp_path / "removed.jsonl"
    removed.write_bytes(b"".join(lines[:2] + lines[3:]))  # line 3 deleted
    line = one_line_error(ms("lkm", "audit-verify", removed))
    assert f"audit log {removed}: line 3: 1 line(s) removed" in line

    edited = tmp_path / "edited.jsonl"
    doc = json.loads(lines[2])
    doc["outcome"] = "forbidden" if doc["outcome"] == "ok" else "ok"
    changed = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    edited.write_bytes(b"".join([*lines[:2], changed, *lines[3:]]))
    assert f"audit log {edited}: line 3: this line was edited" in one_line_error(ms("lkm", "audit-verify", edited))

    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:-1]))  # the newest line lost: only an anchored head shows it
    assert verify_audit_log(cut).lines == len(lines) - 1
    assert "not the expected" in one_line_error(ms("lkm", "audit-verify", cut, "--expect-head", head))
    assert verify_audit_log(log, expect_head=head).head == head

    first = tmp_path / "first.jsonl"
    first.write_bytes(b"".join(lines[1:]))
    with pytest.raises(AuditChainError) as e:
        verify_audit_log(first)
    assert e.value.line == 1
    partial = tmp_path / "partial.jsonl"
    partial.write_bytes(b"".join(lines)[:-5])
    with pytest.raises(AuditChainError) as e:
        verify_audit_log(partial)
    assert e.value.line == len(lines)
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_bytes(b"".join([*lines[:1], lines[2], lines[1], *lines[3:]]))
    with pytest.raises(AuditChainError) as e:
        verify_audit_log(swapped)
    assert e.value.line == 2


# -- the systemd unit ----------------------------------------------------------------------------------------

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "mediaseal-lkm.service"


def test_lkm_unit_runs_a_real_command_line_hardened() -> None:
    from mediaseal.agent.cli import build_parser

    d: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            d.setdefault(key, []).append(value)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main" and "WatchdogSec" in one
    assert one["User"] not in ("", "root", "0") and one["UMask"] == "0077"
    for key, want in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
                      "CapabilityBoundingSet": "", "AmbientCapabilities": "", "LimitCORE": "0"}.items():
        assert one.get(key) == want, key
    argv = shlex.split(one["ExecStart"])
    assert argv[0] == "/opt/mediaseal/bin/mediaseal"
    args = build_parser().parse_args([a.replace("%d", "/run/credentials/x") for a in argv[1:]])
    assert (args.command, args.lkm_command) == ("lkm", "serve") and args.audit_log and args.client_ca
    assert all(not str(v).startswith("/etc/mediaseal/lkm/") for v in (args.passphrase_file, args.tls_key))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_lkm_unit_security_exposure(tmp_path: Path) -> None:
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/mediaseal/bin/mediaseal", str(Path(sys.executable).parent /
                                                                                 "mediaseal")))
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m and float(m.group(1)) <= 2.0, r.stdout + r.stderr
