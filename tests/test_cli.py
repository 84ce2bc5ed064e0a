"""The command line as a user runs it: real processes, real files, exit codes and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PASS = "cli test passphrase"


def ms(*args: str | Path, env: dict[str, str] | None = None, input: bytes | None = None,
       passphrase: bool = True) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    if passphrase:
        e["MEDIASEAL_KEYRING_PASSPHRASE"] = PASS
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", *map(str, args)], env=e, input=input,
                          capture_output=True, timeout=120, check=False)


def one_line_error(r: subprocess.CompletedProcess[bytes]) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mediaseal: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kr = tmp_path_factory.mktemp("cli") / "kr"
    r = ms("keys", "init", "--keyring", kr)
    assert r.returncode == 0, r.stderr
    kid = r.stdout.decode().strip()
    assert len(kid) == 43
    return kr


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory, keyring: Path) -> tuple[Path, Path, bytes]:
    d = tmp_path_factory.mktemp("sample")
    data = os.urandom(3 * 4096 + 123)
    src = d / "call.wav"
    src.write_bytes(data)
    pkg = d / "call.mseal"
    r = ms("encrypt", src, "-o", pkg, "--keyring", keyring, "--kind", "screen", "--recording-id", "rec-42",
           "--chunk-size", "4KiB", passphrase=False)
    assert r.returncode == 0, r.stderr
    return src, pkg, data


def test_encrypt_needs_no_secret_and_decrypt_round_trips(sample: tuple[Path, Path, bytes], keyring: Path,
                                                         tmp_path: Path) -> None:
    _, pkg, data = sample
    out = tmp_path / "out.wav"
    r = ms("decrypt", pkg, "-o", out, "--keyring", keyring)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    r = ms("decrypt", pkg, "-o", "-", "--keyring", keyring, "--offset", "4000", "--length", "5000")
    assert r.returncode == 0 and r.stdout == data[4000:9000]
    r = ms("decrypt", "-", "-o", "-", "--keyring", keyring, input=pkg.read_bytes())  # a pipe: streamed
    assert r.returncode == 0 and r.stdout == data


def test_decrypt_offset_past_the_end_is_an_error(sample: tuple[Path, Path, bytes], keyring: Path,
                                                 tmp_path: Path) -> None:
    _, pkg, data = sample
    out = tmp_path / "past.wav"
    r = ms("decrypt", pkg, "-o", out, "--keyring", keyring, "--offset", str(len(data) + 1))
    assert f"past the end of the recording ({len(data)} bytes)" in one_line_error(r)
    assert not out.exists()
    r = ms("decrypt", pkg, "-o", "-", "--keyring", keyring, "--offset", str(len(data)))  # at the end: no bytes
    assert r.returncode == 0 and r.stdout == b"", r.stderr


def test_inspect_and_verify(sample: tuple[Path, Path, bytes], keyring: Path) -> None:
    _, pkg, data = sample
    r = ms("inspect", pkg, "--json", passphrase=False)
    doc = json.loads(r.stdout)
    assert doc["metadata"]["recording_id"] == "rec-42" and doc["metadata"]["kind"] == "screen"
    assert doc["metadata"]["original_name"] == "call.wav"
    assert doc["chunk_size"] == 4096 and doc["chunks"] == 4 and doc["plaintext_size"] == len(data)
    kid = ms("keys", "list", "--keyring", keyring, "--json").stdout
    assert doc["wraps"] == [{"kid": json.loads(kid)[0]["kid"], "alg": "RSA-OAEP-256"}]
    text = ms("inspect", pkg, passphrase=False).stdout.decode()
    assert "rec-42" in text and "RSA-OAEP-256" in text
    r = ms("verify", pkg, "--keyring", keyring)
    assert r.returncode == 0 and b"4 chunks authenticated" in r.stdout


@pytest.mark.parametrize("where", ["header", "body", "tag", "truncate"])
def test_tampered_package_leaves_no_output(sample: tuple[Path, Path, bytes], keyring: Path, tmp_path: Path,
                                           where: str) -> None:
    _, pkg, _ = sample
    raw = bytearray(pkg.read_bytes())
    if where == "header":
        raw[60] ^= 1  # inside the metadata
    elif where == "body":
        raw[-3000] ^= 0x80
    elif where == "tag":
        raw[-1] ^= 1
    else:
        raw = raw[: len(raw) - 200]
    bad = tmp_path / "bad.mseal"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out.wav"
    line = one_line_error(ms("decrypt", bad, "-o", out, "--keyring", keyring))
    assert not out.exists() and list(tmp_path.iterdir()) == [bad], line
    one_line_error(ms("verify", bad, "--keyring", keyring))


def test_wrong_keyring_and_wrong_passphrase(sample: tuple[Path, Path, bytes], keyring: Path, tmp_path: Path) -> None:
    _, pkg, _ = sample
    other = tmp_path / "other"
    assert ms("keys", "init", "--keyring", other).returncode == 0
    line = one_line_error(ms("decrypt", pkg, "-o", tmp_path / "o", "--keyring", other))
    assert "wrap" in line or "key" in line
    line = one_line_error(ms("decrypt", pkg, "-o", tmp_path / "o", "--keyring", keyring,
                             env={"MEDIASEAL_KEYRING_PASSPHRASE": "wrong"}))
    assert "wrong" not in line.split(":", 2)[2].lower() or "passphrase" in line
    assert not (tmp_path / "o").exists()


def test_missing_input_and_bad_usage(tmp_path: Path, keyring: Path) -> None:
    one_line_error(ms("decrypt", tmp_path / "nope.mseal", "-o", tmp_path / "o", "--keyring", keyring))
    one_line_error(ms("inspect", __file__))  # not a package
    r = ms("encrypt", __file__, "-o", tmp_path / "x")  # no key source
    one_line_error(r)
    assert ms("bogus").returncode == 2


def test_rotate_then_old_and_new_packages_decrypt(tmp_path: Path) -> None:
    kr = tmp_path / "kr"
    first = ms("keys", "init", "--keyring", kr).stdout.decode().strip()
    src = tmp_path / "a.bin"
    src.write_bytes(b"old recording")
    assert ms("encrypt", src, "-o", tmp_path / "old.mseal", "--keyring", kr).returncode == 0
    second = ms("keys", "rotate", "--keyring", kr).stdout.decode().strip()
    assert second != first and len(second) == 43
    assert ms("encrypt", src, "-o", tmp_path / "new.mseal", "--keyring", kr).returncode == 0
    wraps = [json.loads(ms("inspect", tmp_path / n, "--json").stdout)["wraps"][0]["kid"]
             for n in ("old.mseal", "new.mseal")]
    assert wraps == [first, second]
    for n in ("old", "new"):
        r = ms("decrypt", tmp_path / f"{n}.mseal", "-o", "-", "--keyring", kr)
        assert r.stdout == b"old recording", r.stderr
    listing = json.loads(ms("keys", "list", "--keyring", kr, "--json").stdout)
    states = {k["kid"]: (k["state"], k["current"]) for k in listing}
    assert states == {first: ("decrypt-only", False), second: ("active", True)}


def test_publish_and_encrypt_to_keyset(tmp_path: Path, keyring: Path) -> None:
    ks = tmp_path / "keyset.json"
    r = ms("keys", "publish", "--keyring", keyring, "-o", ks)
    assert r.returncode == 0, r.stderr
    signer = tmp_path / "signer.pem"
    assert signer.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    src = tmp_path / "t.txt"
    src.write_bytes(b"transcript")
    pkg = tmp_path / "t.mseal"
    r = ms("encrypt", src, "-o", pkg, "--keyset", ks, "--signer", signer, "--kind", "transcript", passphrase=False)
    assert r.returncode == 0, r.stderr
    assert ms("decrypt", pkg, "-o", "-", "--keyring", keyring).stdout == b"transcript"
    doc = json.loads(ks.read_bytes())
    doc["signature"] = doc["signature"][:-4] + ("AAAA" if doc["signature"][-4:] != "AAAA" else "BBBB")
    ks.write_text(json.dumps(doc))
    one_line_error(ms("encrypt", src, "-o", tmp_path / "u.mseal", "--keyset", ks, "--signer", signer))
    assert not (tmp_path / "u.mseal").exists()


def test_keyring_files_are_private_and_hold_no_plaintext_key(keyring: Path) -> None:
    for p in [keyring, *keyring.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
        if p.is_file():
            assert b"PRIVATE KEY" not in p.read_bytes(), p


def test_big_file_round_trip_by_hash(tmp_path: Path, keyring: Path) -> None:
    data = os.urandom(5 * (1 << 20) + 7)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    assert ms("encrypt", src, "-o", tmp_path / "big.mseal", "--keyring", keyring).returncode == 0
    assert ms("decrypt", tmp_path / "big.mseal", "-o", tmp_path / "big.out", "--keyring", keyring).returncode == 0
    assert hashlib.sha256((tmp_path / "big.out").read_bytes()).digest() == hashlib.sha256(data).digest()
