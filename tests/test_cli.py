"""The command line as a user runs it: real processes, real files, exit codes and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.process import one_line_error, run_cli

PASS = "cli test passphrase"


def ms(*args: str | Path, env: dict[str, str] | None = None, input: bytes | None = None,
       passphrase: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*args, env={**({"MEDIASEAL_KEYRING_PASSPHRASE": PASS} if passphrase else {}), **(env or {})},
                   input=input)


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


# -- the command line as a new user expects it (issue 13) ------------------------------------------------------

HEAVY = ("asyncio", "aioboto3", "botocore", "aiohttp", "prometheus_client", "rich")


def loaded_modules(*args: str | Path) -> set[str]:
    """The top-level modules a real `mediaseal ARGS` run has loaded when it ends (its own process)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['mediaseal', *{[str(a) for a in args]!r}]\n"
            "try:\n    runpy.run_module('mediaseal.agent.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n")
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return set(r.stderr.decode().splitlines()[-1].split())


def test_help_and_encrypt_load_no_event_loop_nor_network_clients(tmp_path: Path, keyring: Path) -> None:
    assert not set(HEAVY) & loaded_modules("--help")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert not set(HEAVY) & loaded_modules("encrypt", empty, "-o", tmp_path / "e.mseal", "--keyring", keyring)
    assert (tmp_path / "e.mseal").exists()


def test_version_comes_from_the_installed_distribution() -> None:
    from importlib.metadata import version

    from mediaseal.agent.cli import version_line

    r = ms("--version")
    assert r.returncode == 0 and r.stdout.decode().strip() == f"mediaseal {version('mediaseal')}"
    assert "not installed" in version_line("mediaseal-no-such-distribution")


def test_every_command_has_examples_and_every_option_help() -> None:
    import argparse

    from mediaseal.agent.cli import build_parser

    def walk(p: argparse.ArgumentParser, path: str) -> int:
        n = 1
        assert p.epilog and p.epilog.startswith("example"), path
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    n += walk(sp, f"{path} {name}")
            elif a.help is not argparse.SUPPRESS:
                assert a.help, (path, a.option_strings or a.dest)
        return n

    assert walk(build_parser(), "mediaseal") > 15
    text = ms("export", "--help").stdout.decode()
    assert "(default: 4)" in text and "example" in text and "--source" not in text  # defaults shown, aliases hidden


def test_every_error_in_the_exit_code_table_is_a_real_exception() -> None:
    import importlib

    from mediaseal.agent.cli import EXIT_CODES

    for module, name, code in EXIT_CODES:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception) and code in (1, 2), (module, name)


def test_decrypt_offset_past_the_end_is_an_error(sample: tuple[Path, Path, bytes], keyring: Path,
                                                 tmp_path: Path) -> None:
    _, pkg, data = sample
    out = tmp_path / "part.wav"
    line = one_line_error(ms("decrypt", pkg, "-o", out, "--keyring", keyring, "--offset", str(len(data))))
    assert "past the end" in line and not out.exists()
    r = ms("decrypt", pkg, "-o", "-", "--keyring", keyring, "--offset", str(len(data) - 1))
    assert r.returncode == 0 and r.stdout == data[-1:]
    line = one_line_error(ms("decrypt", f"file://{pkg}", "-o", out, "--keyring", keyring, "--offset", "99999999"))
    assert "past the end" in line and not out.exists()


def test_outputs_are_not_replaced_without_force(sample: tuple[Path, Path, bytes], keyring: Path,
                                                tmp_path: Path) -> None:
    src, pkg, data = sample
    out = tmp_path / "taken"
    out.write_bytes(b"precious")
    for argv in (("encrypt", src, "-o", out, "--keyring", keyring), ("decrypt", pkg, "-o", out, "--keyring", keyring),
                 ("keys", "publish", "--keyring", keyring, "-o", out)):
        line = one_line_error(ms(*argv))
        assert "--force" in line and out.read_bytes() == b"precious", argv
    assert ms("decrypt", pkg, "-o", out, "--keyring", keyring, "--force").returncode == 0
    assert out.read_bytes() == data
    assert ms("keys", "publish", "--keyring", keyring, "-o", out, "--force").returncode == 0
    assert out.read_bytes().startswith(b"{")


def test_encrypt_guesses_the_content_type_as_the_agent_does(tmp_path: Path, keyring: Path) -> None:
    from mediaseal.agent.config import content_type_for

    for name in ("call.wav", "screen.mp4", "notes.unknownext"):
        src = tmp_path / name
        src.write_bytes(b"x")
        pkg = tmp_path / f"{name}.mseal"
        assert ms("encrypt", src, "-o", pkg, "--keyring", keyring).returncode == 0
        meta = json.loads(ms("inspect", pkg, "--json").stdout)["metadata"]
        assert meta["content_type"] == content_type_for(name), name
    assert content_type_for("call.wav").startswith("audio/")
    pkg = tmp_path / "given.mseal"
    assert ms("encrypt", tmp_path / "call.wav", "-o", pkg, "--keyring", keyring, "--content-type",
              "audio/ogg").returncode == 0
    assert json.loads(ms("inspect", pkg, "--json").stdout)["metadata"]["content_type"] == "audio/ogg"


def test_former_spellings_still_work_and_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    from mediaseal.agent.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "--source", "s3://rec/a", "--dest", "s3://out/b"])
    assert args.repository == "s3://rec/a"
    assert "--source is deprecated, use --repository" in capsys.readouterr().err
    args = parser.parse_args(["serve", "file:///srv/rec", "--audit-log", "a", "--host", "0.0.0.0", "--port", "9"])
    assert (args.repository, args.legacy_host, args.legacy_port) == ("file:///srv/rec", "0.0.0.0", 9)
    assert capsys.readouterr().err.count("deprecated") == 3
    args = parser.parse_args(["serve", "--repository", "file:///srv/rec", "--audit-log", "a", "--listen", "[::1]:0"])
    assert args.repository == "file:///srv/rec" and args.listen == ("::1", 0)
    assert parser.parse_args(["serve", "--repository", "x", "--audit-log", "a"]).listen == ("127.0.0.1", 8750)
    assert capsys.readouterr().err == ""
    r = ms("serve", "--audit-log", "a", "--tokens", "t")
    assert r.returncode == 2 and b"required: --repository" in r.stderr
    r = ms("export", "--dest", "s3://out/b")
    assert r.returncode == 2 and b"required: --repository" in r.stderr


def test_serve_default_port_is_the_servers() -> None:
    from mediaseal.agent.cli.serve_cmd import DEFAULT_LISTEN
    from mediaseal.export.serve import DEFAULT_PORT

    assert DEFAULT_LISTEN.endswith(f":{DEFAULT_PORT}")


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_is_generated_from_the_parser(shell: str, tmp_path: Path) -> None:
    import shutil

    r = ms("completion", shell)
    assert r.returncode == 0, r.stderr
    script = r.stdout.decode()
    for word in ("encrypt", "decrypt", "--keyring", "--repository", "--listen"):
        assert word in script, word
    if shell == "bash" and shutil.which("bash"):
        (tmp_path / "c.bash").write_text(script)
        assert subprocess.run(["bash", "-n", str(tmp_path / "c.bash")], check=False).returncode == 0


def test_retire_hint_runs_as_pasted(tmp_path: Path) -> None:
    import shlex

    kr = tmp_path / "kr"
    old = ms("keys", "init", "--keyring", kr).stdout.decode().strip()
    repo = tmp_path / "repo"
    (repo / "call" / "2026" / "01" / "02").mkdir(parents=True)
    src = tmp_path / "a.wav"
    src.write_bytes(b"a recording")
    assert ms("encrypt", src, "-o", repo / "call" / "2026" / "01" / "02" / "a.mseal", "--keyring", kr).returncode == 0
    assert ms("keys", "rotate", "--keyring", kr).returncode == 0
    # A kid is base64url: one in 64 starts with "-", so the kid goes after "--" and the hint's --from is
    # one token (found when a random kid was read as an option).
    line = one_line_error(ms("keys", "retire", "--keyring", kr, "--repository", f"file://{repo}", "--", old))
    hint = line.split("run: ", 1)[1]
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    e["MEDIASEAL_KEYRING_PASSPHRASE"] = PASS
    r = subprocess.run(shlex.split(hint), env=e, capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, (hint, r.stderr)
    assert f"--from={old}" in hint
    r = ms("keys", "retire", "--keyring", kr, "--repository", f"file://{repo}", "--", old)
    assert r.returncode == 0 and b"retired" in r.stdout, r.stderr


def test_ctrl_c_during_export_aborts_the_upload_and_prints_the_resume_line(tmp_path: Path, keyring: Path,
                                                                            moto_server: object,
                                                                            fault_proxy: object) -> None:
    import shlex
    import signal
    import time

    import s3_support

    url = moto_server.url  # type: ignore[attr-defined]
    dest = s3_support.make_bucket(url)
    repo = tmp_path / "repo"
    day = repo / "call" / "2026" / "01" / "02"
    day.mkdir(parents=True)
    big = tmp_path / "big.wav"
    big.write_bytes(os.urandom(9 * (1 << 20)))  # above the 8 MiB part size: a multipart upload
    assert ms("encrypt", big, "-o", day / "rec-big.mseal", "--keyring", keyring, "--recording-id",
              "rec-big").returncode == 0
    fault_proxy.hang(when=lambda seen: seen.op == "UploadPart")  # type: ignore[attr-defined]
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    e["MEDIASEAL_KEYRING_PASSPHRASE"] = PASS
    argv = ["export", "--repository", f"file://{repo}", "--dest", f"s3://{dest}/case",
            "--endpoint-url", fault_proxy.url, "--keyring", str(keyring)]  # type: ignore[attr-defined]
    proc = subprocess.Popen([sys.executable, "-m", "mediaseal.agent.cli", *argv], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not fault_proxy.requests("UploadPart"):  # type: ignore[attr-defined]
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    text = err.decode()
    assert "Traceback" not in text and "to resume, run: " in text, text
    s3 = s3_support.boto3_client(url)
    assert s3.list_multipart_uploads(Bucket=dest).get("Uploads", []) == []  # aborted, not left to bill
    fault_proxy.clear()  # type: ignore[attr-defined]
    resume = shlex.split(text.split("to resume, run: ", 1)[1].strip().splitlines()[0])
    assert resume[-len(argv):] == argv
    r = subprocess.run(resume, env=e, capture_output=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=dest).get("Contents", [])]
    assert "case/year=2026/month=01/day=02/rec-big.wav" in keys, keys


def test_export_progress_counts_bytes_as_bytes_and_recordings_as_recordings() -> None:
    import io
    import re

    from rich.console import Console

    from mediaseal.export.bulk import RichProgress

    screen = io.StringIO()
    bar = RichProgress(Console(file=screen, force_terminal=True, width=160))
    bar.start(3, 3_000_000)
    bar.advance(1_500_000)
    bar.done("call/2026/01/02/a.mseal", "exported", "")
    bar.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.getvalue())
    assert "1.5/3.0 MB" in text and "1/3 recordings" in text, text


def test_keys_init_refuses_an_empty_kms_key_id(tmp_path: Path) -> None:
    """`--kms-key-id "$ID"` with ID unset once made a master.key keyring instead of a KMS one, silently."""
    r = ms("keys", "init", "--keyring", tmp_path / "kr", "--kms-key-id", "", passphrase=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and "--kms-key-id" in err and "must not be empty" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "kr").exists()


def test_decrypt_to_stdout_of_a_package_failing_late_is_named_in_help_and_exit(tmp_path: Path,
                                                                               keyring: Path) -> None:
    """Issue 15, finding 16: to stdout, chunks go out as each authenticates, so a package whose last chunk
    was tampered with leaves its authenticated prefix there. That is said in --help, and the exit says
    the rest failed; to a file, nothing appears."""
    data = os.urandom(200_000)
    src = tmp_path / "call.wav"
    src.write_bytes(data)
    pkg = tmp_path / "call.mseal"
    assert ms("encrypt", src, "-o", pkg, "--keyring", keyring).returncode == 0
    raw = bytearray(pkg.read_bytes())
    raw[-1] ^= 1  # the last chunk's tag
    pkg.write_bytes(bytes(raw))
    r = ms("decrypt", pkg, "-o", "-", "--keyring", keyring)
    assert r.returncode != 0 and data.startswith(r.stdout) and len(r.stdout) < len(data), (r.returncode, len(r.stdout))
    out = tmp_path / "out.wav"
    assert ms("decrypt", pkg, "-o", out, "--keyring", keyring).returncode != 0 and not out.exists()
    helptext = " ".join(ms("decrypt", "--help").stdout.decode().split())
    assert "stdout gets each chunk once it authenticated" in helptext and "exits non-zero" in helptext
