"""The agent end to end: a real process, real inotify, real files, a filesystem repository.

Synchronisation is on the agent's own log events; assertions are on what the repository holds after
decrypting every package (the ledger), on the spool, and on the capture directories.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_harness import (
    PASSPHRASE,
    Agent,
    Setup,
    decrypt_all,
    drop,
    packages,
    spool_files,
)

from mediaseal.keys.keyring import Keyring


def assert_delivered_once(setup: Setup, ledger: dict[str, str]) -> None:
    got = decrypt_all(setup.repository, setup.keyring)
    assert {n: len(v) for n, v in got.items() if n in ledger} == dict.fromkeys(ledger, 1)
    assert {n: v[0] for n, v in got.items()} == ledger
    assert spool_files(setup.spool) == []


def test_end_to_end_mixed_sizes_two_kinds(setup: Setup) -> None:
    setup.watches.append({"path": str(setup.root / "screens"), "kind": "screen", "completion": "rename"})
    agent = Agent(setup)
    agent.wait_for("ready")
    rng = random.Random(7)
    sizes = [0, 1, 4095, 1 << 20, (1 << 20) + 1, 3 << 20, 50 << 20] + [rng.randrange(0, 2 << 20) for _ in range(43)]
    ledger: dict[str, str] = {}
    for i, size in enumerate(sizes):
        d = setup.capture(i % 2)
        ledger[f"rec-{i:02d}.bin"] = drop(d, f"rec-{i:02d}.bin", rng.randbytes(size))
    agent.wait_for("delivered", count=len(sizes), timeout=180)
    assert agent.stop() == 0
    assert_delivered_once(setup, ledger)
    assert list(setup.capture(0).iterdir()) == [] and list(setup.capture(1).iterdir()) == []
    kinds = {p.relative_to(setup.repository).parts[0] for p in packages(setup.repository)}
    assert kinds == {"call", "screen"}


def test_dispose_move_and_keep(setup: Setup) -> None:
    moved = setup.root / "done"
    setup.watches[0].update(dispose="move", move_to=str(moved))
    setup.watches.append({"path": str(setup.root / "kept"), "kind": "transcript", "completion": "rename",
                          "dispose": "keep"})
    setup.agent["rescan_seconds"] = 0.5
    agent = Agent(setup)
    agent.wait_for("ready")
    (setup.capture(0) / "sub").mkdir()
    a = drop(setup.capture(0) / "sub", "a.wav", b"a" * 3000)
    k = drop(setup.capture(1), "chat.txt", b"hello" * 100)
    agent.wait_for("delivered", count=2)
    assert (moved / "sub" / "a.wav").read_bytes() == b"a" * 3000
    assert not (setup.capture(0) / "sub" / "a.wav").exists()
    assert (setup.capture(1) / "chat.txt").exists()  # kept, and never sealed a second time:
    agent.wait_for("rescan-done", count=3)
    assert agent.stop() == 0
    assert sum('"sealing"' in line and "chat.txt" in line for line in agent.lines) == 1
    got = decrypt_all(setup.repository, setup.keyring)
    assert got == {"a.wav": [a], "chat.txt": [k]}


def test_awkward_names_and_races(setup: Setup) -> None:
    """Newlines, unicode and 255-byte names, empty files, a name reused for a new recording, and a
    file deleted before the agent gets to it."""
    agent = Agent(setup)
    agent.wait_for("ready")
    # 246 x's + ".wav" + the producer's ".part" = 255 bytes, the longest name the filesystem takes
    names = ["line\nbreak.wav", "\u00e7a\u011fr\u0131-\u901a\u8a71-\U0001f4de.wav", "x" * 246 + ".wav", "empty.wav",
             "tab\tand space.wav"]
    ledger = {n: drop(setup.capture(), n, b"" if n == "empty.wav" else os.urandom(5000)) for n in names}
    agent.wait_for("delivered", count=len(names), timeout=60)
    second = drop(setup.capture(), "empty.wav", b"a new recording under a reused name")
    agent.wait_for("delivered", where=lambda e: e["path"].endswith("empty.wav"), timeout=60)
    gone = setup.capture() / "gone.wav"
    gone.write_bytes(b"short-lived")
    gone.unlink()
    agent.wait_for("rescan-done", timeout=30)
    assert agent.stop() == 0
    got = decrypt_all(setup.repository, setup.keyring)
    assert sorted(got.pop("empty.wav")) == sorted([ledger.pop("empty.wav"), second])  # both kept
    assert got == {n: [h] for n, h in ledger.items()}
    assert len(packages(setup.repository)) == len(names) + 1


def test_quiet_mode_waits_for_a_slow_writer(setup: Setup) -> None:
    setup.watches[0].update(completion="quiet", quiet_seconds=1.0)
    agent = Agent(setup)
    agent.wait_for("ready")
    path = setup.capture() / "slow.wav"
    last_write = 0.0
    with open(path, "wb") as f:
        for _ in range(8):  # a write every 0.3 s for ~2.4 s: never quiet for 1 s
            f.write(os.urandom(10_000))
            f.flush()
            last_write = time.time()
            time.sleep(0.3)
    (spooled,) = agent.wait_for("sealing", timeout=30)
    assert spooled_time(spooled) >= last_write + 0.9
    agent.wait_for("delivered")
    agent.stop()
    assert len(decrypt_all(setup.repository, setup.keyring)["slow.wav"]) == 1


def spooled_time(event: dict[str, Any]) -> float:
    ts = event["ts"]  # 2026-11-28T18:00:00.123Z
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000


def test_marker_mode_waits_for_the_marker(setup: Setup) -> None:
    setup.watches[0].update(completion="marker", marker_suffix=".done")
    capture = setup.capture()
    capture.mkdir()
    (capture / "a.wav").write_bytes(b"A" * 5000)  # no marker yet
    (capture / "b.wav").write_bytes(b"B" * 5000)
    (capture / "b.wav.done").write_bytes(b"")
    agent = Agent(setup)
    (ev,) = agent.wait_for("delivered")
    assert ev["path"].endswith("b.wav")  # a.wav was seen by the same scan but has no marker
    assert (capture / "a.wav").exists() and not (capture / "b.wav.done").exists()
    (capture / "a.wav.done").write_bytes(b"")
    (ev,) = agent.wait_for("delivered")
    assert ev["path"].endswith("a.wav")
    agent.stop()
    assert sorted(os.listdir(capture)) == []


def test_file_rewritten_during_sealing_is_redone(setup: Setup) -> None:
    setup.watches[0].update(completion="quiet", quiet_seconds=0.5)
    capture = setup.capture()
    capture.mkdir()
    big = capture / "big.raw"
    big.write_bytes(b"\x01" * (160 << 20))
    os.utime(big, (time.time() - 10, time.time() - 10))  # already quiet
    agent = Agent(setup)
    agent.wait_for("sealing")
    with open(big, "ab") as f:  # the producer appends while the agent is reading
        f.write(b"late bytes")
    # The append lands while the agent reads (it re-does the recording: `redo`) or before its open (it
    # seals the grown file straight away; issue 14's seal takes its identity from the descriptor it
    # reads): either way what is delivered is the file as the producer left it, never a mix.
    (first,) = agent.wait_for(("redo", "spooled"), timeout=60)
    if first["event"] == "spooled":
        assert first["bytes"] == (160 << 20) + len(b"late bytes"), first
    agent.wait_for("delivered", timeout=60)
    agent.stop()
    got = decrypt_all(setup.repository, setup.keyring)
    assert got == {"big.raw": [hashlib.sha256(b"\x01" * (160 << 20) + b"late bytes").hexdigest()]}


def test_no_plaintext_ever_in_spool_or_repository(setup: Setup) -> None:
    marker = b"PLAINTEXT-MARKER" * 4  # 64 bytes; a recording made only of this pattern
    found: list[str] = []
    done = threading.Event()
    scans = [0]

    def scanner() -> None:
        while not done.is_set():
            for root in (setup.spool, setup.repository):
                for p in root.rglob("*"):
                    try:
                        with open(p, "rb") as f:
                            while block := f.read(1 << 20):
                                if marker in block:
                                    found.append(str(p))
                    except (IsADirectoryError, FileNotFoundError, PermissionError):
                        continue
            scans[0] += 1

    agent = Agent(setup)
    agent.wait_for("ready")
    t = threading.Thread(target=scanner)
    t.start()
    try:
        sha = drop(setup.capture(), "marker.raw", marker * ((200 << 20) // len(marker)))
        agent.wait_for("delivered", timeout=120)
    finally:
        done.set()
        t.join()
    agent.stop()
    assert found == [] and scans[0] > 1
    assert decrypt_all(setup.repository, setup.keyring) == {"marker.raw": [sha]}


def test_no_secret_in_spool_manifests_or_logs(setup: Setup) -> None:
    """The DEKs (recovered here with the private key the agent never has), the keyring passphrase and
    the private key bytes appear in no spool file, manifest or log line, in any common encoding."""
    import base64

    repo = setup.repository
    agent = Agent(setup, env={"MEDIASEAL_KEYRING_PASSPHRASE": PASSPHRASE.decode()})
    agent.wait_for("ready")
    os.rename(repo, repo.with_name("offline"))  # keep the packages and manifests in the spool
    for i in range(3):
        drop(setup.capture(), f"s{i}.wav", os.urandom(300_000))
    agent.wait_for("spooled", count=3)
    unwrapper = Keyring.open(setup.keyring).unlock(PASSPHRASE)
    secrets_: list[bytes] = [PASSPHRASE]
    for pkg in (setup.spool / "packages").glob("*.mseal"):
        from mediaseal.codec import read_header

        with open(pkg, "rb") as f:
            dek = unwrapper.unwrap(read_header(f).wraps)
        secrets_ += [dek, dek.hex().encode(), base64.b64encode(dek), base64.urlsafe_b64encode(dek).rstrip(b"=")]
    from cryptography.hazmat.primitives import serialization

    der = unwrapper.private_key(Keyring.open(setup.keyring).current().kid).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    secrets_ += [der[-64:], base64.b64encode(der)[100:164]]
    blobs = [p.read_bytes() for p in setup.spool.rglob("*") if p.is_file()]  # packages and manifests
    assert len(blobs) >= 6
    os.rename(repo.with_name("offline"), repo)
    agent.wait_for("delivered", count=3, timeout=60)
    agent.stop()
    blobs += [("\n".join(agent.lines)).encode()]
    assert len(secrets_) == 1 + 3 * 4 + 2
    for s in secrets_:
        assert not any(s in b for b in blobs), s[:8]


@pytest.mark.parametrize("point", ["mid-encrypt", "after-staging-fsync", "mid-commit", "after-commit", "after-delivery",
                                   "mid-release"])
def test_crash_at_named_points_loses_and_duplicates_nothing(setup: Setup, point: str) -> None:
    capture = setup.capture()
    capture.mkdir()
    rng = random.Random(point)
    ledger = {f"r{i}.bin": drop(capture, f"r{i}.bin", rng.randbytes(rng.choice([3 << 20, 70_000, 0])))
              for i in range(6)}
    crashed = Agent(setup, env={"MEDIASEAL_CRASH_AT": f"{point}:2"})
    assert crashed.exited() == 86, "\n".join(crashed.lines[-10:])
    drain(Agent(setup), setup)
    assert_delivered_once(setup, ledger)
    assert os.listdir(capture) == []


def drain(agent: Agent, setup: Setup) -> None:
    """Let `agent` run until the capture directories and the spool are empty, then stop it."""
    agent.wait_for("ready")
    while any(list(setup.capture(i).iterdir()) for i in range(len(setup.watches))) or spool_files(setup.spool):
        agent.wait_for("delivered", timeout=60)  # woken by each delivery, never by a timer
    assert agent.stop() == 0


def test_random_sigkills_under_load(setup: Setup) -> None:
    iterations = int(os.environ.get("MEDIASEAL_KILL_ITERATIONS", "200" if os.environ.get("MEDIASEAL_SOAK") else "20"))
    capture = setup.capture()
    capture.mkdir()
    rng = random.Random(1234)
    ledger: dict[str, str] = {}
    for it in range(iterations):
        for j in range(3):
            name = f"k{it:03d}-{j}.bin"
            ledger[name] = drop(capture, name, rng.randbytes(rng.choice([0, 5000, 300_000, 2 << 20])))
        agent = Agent(setup)
        agent.wait_for("ready", timeout=60)
        time.sleep(rng.uniform(0, 0.4))  # the kill lands at a random instant: that is the test
        agent.kill()
    drain(Agent(setup), setup)
    assert_delivered_once(setup, ledger)


def test_spool_full_pauses_intake_and_resumes(setup: Setup) -> None:
    setup.buffer["max_bytes"] = (2 << 20) + 300_000  # room for two 1 MiB packages
    repo = setup.repository
    agent = Agent(setup)
    agent.wait_for("ready")
    moved = repo.with_name("repository-offline")
    os.rename(repo, moved)  # the repository is unreachable: packages pile up in the spool
    ledger = {f"f{i}.bin": drop(setup.capture(), f"f{i}.bin", os.urandom(1 << 20)) for i in range(5)}
    seen = {"disposed": 0, "intake-paused": 0}  # (a source is disposed just after "spooled", beside intake)
    while seen["disposed"] < 2 or not seen["intake-paused"]:
        seen[agent.wait_for(("disposed", "intake-paused"))[0]["event"]] += 1
    assert len(list(setup.capture().iterdir())) == 3  # the rest wait, untouched, where they were
    os.rename(moved, repo)
    agent.wait_for("delivered", count=5, timeout=120)
    agent.stop()
    assert_delivered_once(setup, ledger)


def test_key_rotation_while_running(setup: Setup) -> None:
    agent = Agent(setup)
    (ready,) = agent.wait_for("key-current")
    first = ready["kid"]
    drop(setup.capture(), "before.wav", b"x" * 1000)
    agent.wait_for("delivered")
    new = Keyring.open(setup.keyring).rotate(PASSPHRASE).kid
    agent.wait_for("key-current", where=lambda e: e["kid"] == new, timeout=30)
    drop(setup.capture(), "after.wav", b"y" * 1000)
    agent.wait_for("delivered")
    agent.stop()
    kids = {}
    for p in packages(setup.repository):
        from mediaseal.codec import read_header

        with open(p, "rb") as f:
            h = read_header(f)
        kids[h.metadata.original_name] = h.wraps[0].kid
    assert kids == {"before.wav": first, "after.wav": new}
    assert set(decrypt_all(setup.repository, setup.keyring)) == {"before.wav", "after.wav"}


def test_backlog_of_2000_small_files_with_flat_memory(setup: Setup) -> None:
    capture = setup.capture()
    capture.mkdir()
    ledger = {f"b{i:04d}.txt": drop(capture, f"b{i:04d}.txt", os.urandom(4096)) for i in range(2000)}
    agent = Agent(setup)
    agent.wait_for("delivered", count=2000, timeout=240)
    hwm_kib = _vm_hwm_kib(agent.proc.pid)
    agent.stop()
    assert_delivered_once(setup, ledger)
    # Flat: the whole agent (interpreter, cryptography, boto3 imports) stays far below a size that
    # would grow with the backlog; 2,000 x a 1 MiB chunk buffer would be ~2 GiB.
    assert hwm_kib < 200 * 1024, hwm_kib


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_embedded_default_make_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    proc = subprocess.Popen([sys.executable, "-m", "mediaseal.agent.cli", "run"], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    lines = []
    for raw in proc.stderr:
        lines.append(raw.decode())
        if "drop recordings into" in lines[-1]:
            break
    base = tmp_path / "mediaseal-data"
    assert {p.name for p in base.iterdir()} == {"capture", "buffer", "buffer.key", "repository", "keyring"}, lines
    data = os.urandom(100_000)
    drop(base / "capture", "hello.wav", data)
    for raw in proc.stderr:
        lines.append(raw.decode())
        if " delivered " in lines[-1]:
            break
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    (pkg,) = packages(base / "repository")
    assert pkg.relative_to(base / "repository").parts[0] == "call"
    r = subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", "decrypt", str(pkg), "-o", "-", "--keyring",
                        str(base / "keyring")], env=env, capture_output=True, check=False)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    assert list((base / "capture").iterdir()) == []
    for p in [base, *base.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p


def test_a_name_that_is_not_utf8_is_delivered(setup: Setup) -> None:
    """Any bytes but / and NUL make a legal name; the package keeps undecodable ones as \\xNN text."""
    agent = Agent(setup)
    agent.wait_for("ready")
    name = os.fsdecode(b"caller-\xff\xfe.wav")
    sha = drop(setup.capture(), name, os.urandom(7000))
    agent.wait_for("delivered", timeout=60)
    assert agent.stop() == 0
    assert not any('"intake-error"' in line for line in agent.lines)
    assert decrypt_all(setup.repository, setup.keyring) == {"caller-\\xff\\xfe.wav": [sha]}


@pytest.mark.parametrize("taken", ["the sealed one", "a newer one"])
def test_disposal_never_deletes_a_newer_recording_under_the_same_name(setup: Setup, taken: str) -> None:
    """Disposal takes the name away from the producer (rename to a private dotfile) before it checks the
    file; a crash can come right after that rename. Either file may be the one taken: the sealed one
    (deleted on the replay) or a newer recording renamed over the name after sealing (given back, then
    sealed and delivered itself). Checking the name and then unlinking it would delete the newer one."""
    setup.capture().mkdir(parents=True, exist_ok=True)
    first = drop(setup.capture(), "reused.wav", os.urandom(9000))
    crashed = Agent(setup, env={"MEDIASEAL_CRASH_AT": "after-commit:1"})
    assert crashed.exited(timeout=60) == 86
    (manifest,) = (setup.spool / "packages").glob("*.json")
    grabbed = setup.capture() / f".mediaseal-{manifest.stem}.disposing"
    src = setup.capture() / "reused.wav"
    if taken == "the sealed one":
        os.rename(src, grabbed)
        second = drop(setup.capture(), "reused.wav", os.urandom(7000))
    else:
        second = drop(setup.capture(), "reused.wav", os.urandom(7000))  # renamed over the sealed one
        os.rename(src, grabbed)
    agent = Agent(setup)
    agent.wait_for("delivered", count=2, timeout=60)
    assert agent.stop() == 0
    assert sorted(decrypt_all(setup.repository, setup.keyring)["reused.wav"]) == sorted([first, second])
    assert list(setup.capture().iterdir()) == []
