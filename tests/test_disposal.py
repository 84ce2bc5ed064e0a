"""Disposal as it really fails (issue 14, observations 3, 4 and 5): real agent processes, real kills
and real refusals of the capture directory; nothing of ours is patched.

The faults are made by the kernel, not by the agent: `strace` stops or kills the agent at the exact
system call of a disposal step (`-P <path>`: only calls on that one file), a SIGKILL lands while it is
held there, and `chattr +i` makes a capture directory the agent (root) can read but not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agent_harness import Agent, Setup, decrypt_all, drop, make_keyring, spool_files
from reliability_outages import METRICS_ENV, Scrape, wait_metric

from mediaseal.agent.config import WatchConfig
from mediaseal.agent.disposal import Disposal
from mediaseal.agent.intake import recording_id
from mediaseal.buffer.manifest import Manifest, SourceIdentity
from mediaseal.buffer.spool import Spool

MiB = 1 << 20
AGENT_ID = "test-agent"  # agent_harness.Setup's [agent] id


@pytest.fixture(scope="session")
def keyring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keyring(tmp_path_factory.mktemp("kr") / "keyring")


@pytest.fixture
def setup(tmp_path: Path, keyring_template: Path) -> Setup:
    s = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring", keyring_template), watches=[
        {"path": str(tmp_path / "capture"), "kind": "call", "completion": "marker", "marker_suffix": ".done"},
    ])
    s.agent["rescan_seconds"] = 0.5
    s.capture().mkdir(parents=True)
    return s


def need_strace() -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")


def strace(directory: Path, inject: str, when: str) -> list[str]:
    """Run the agent under strace, injecting `inject` into the unlinkat calls in `directory`, the `when`-th
    of them (strace's syntax: "2", "2+"). The disposal unlinks one name at a time in a descriptor of the
    directory (plumbing/dirfd.py), so a call is told by its place: in marker mode the marker goes first
    (1), the source's private name second (2)."""
    return ["strace", "-f", "-qq", "-o", os.devnull, "-P", str(directory), "-e", "trace=unlink,unlinkat",
            "-e", f"inject=unlink,unlinkat:{inject}:when={when}"]


def traced_pid(agent: Agent) -> int:
    """The agent's own pid under its strace."""
    children = Path(f"/proc/{agent.proc.pid}/task/{agent.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def private_name(setup: Setup, name: str) -> Path:
    """Where disposal takes `name` (its `.mediaseal-<id>.disposing`), computed as the agent will."""
    src = setup.capture() / name
    ident = SourceIdentity.of_path(src)
    assert ident is not None
    return src.with_name(f".mediaseal-{recording_id(AGENT_ID, src, ident)}.disposing")


def complete(setup: Setup, name: str, data: bytes) -> str:
    """A producer in marker mode: the recording, then its `.done` marker. Returns the SHA-256."""
    sha = drop(setup.capture(), name, data)
    (setup.capture() / f"{name}.done").touch()
    return sha


def wait_until(what: str, cond: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (cond() if callable(cond) else cond):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


# -- observation 3: marker mode, a kill between the source and its marker ---------------------------------


def test_marker_mode_kill_at_the_marker_unlink_leaves_no_marker_behind(setup: Setup) -> None:
    """SIGKILL at the very unlink of the `.done` marker (strace kills the agent on that call, before it
    runs). The next start must finish the disposal (a `disposed` line, no marker left), and the next
    recording under the same name, written in place with a pause, must wait for its own marker: before
    the fix the old marker stayed for ever and the new recording was sealed, and deleted, half-written."""
    need_strace()
    first = complete(setup, "call.wav", os.urandom(300_000))
    marker = setup.capture() / "call.wav.done"
    killed = Agent(setup, prefix=strace(marker.parent, "error=ENOENT:signal=KILL", "1"))
    assert killed.exited(timeout=120) in (-signal.SIGKILL, 128 + signal.SIGKILL), "\n".join(killed.lines[-10:])

    agent = Agent(setup)
    agent.wait_for("disposed", where=lambda d: d["path"].endswith("call.wav"), timeout=30)
    assert not marker.exists(), "the marker survived the restart"
    assert not [p for p in setup.capture().iterdir() if p.name.startswith(".mediaseal-")]
    # The next recording under the same name, written in place: half of it, held open meanwhile.
    with open(setup.capture() / "call.wav", "wb") as f:
        half = os.urandom(MiB)
        f.write(half)
        f.flush()
        # Another recording, complete, goes through whole scans while call.wav waits for its marker.
        other = complete(setup, "other.wav", os.urandom(5000))
        agent.wait_for("delivered", where=lambda d: d["path"].endswith("other.wav"), timeout=60)
        assert not [ln for ln in agent.lines if '"event": "sealing"' in ln and 'call.wav"' in ln], \
            "call.wav was sealed with no marker"
        rest = os.urandom(MiB)
        f.write(rest)
    marker.touch()
    agent.wait_for("delivered", where=lambda d: d["path"].endswith("call.wav"), timeout=60)
    wait_until("the capture directory is empty", lambda: not any(setup.capture().iterdir()))
    assert agent.stop() == 0
    got = decrypt_all(setup.repository, setup.keyring)
    assert sorted(got["call.wav"]) == sorted([first, hashlib.sha256(half + rest).hexdigest()])
    assert got["other.wav"] == [other]
    assert spool_files(setup.spool) == []


# -- observation 4: plaintext left under the private name -------------------------------------------------


@pytest.fixture
def tmpfs_repository(setup: Setup) -> Iterator[Path]:
    """The repository on a filesystem of its own: delivered by copy and SHA-256, so VERIFIED is written
    to the manifest before the spool copy goes (a hard link on the spool's disk skips that write)."""
    setup.repository.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(setup.repository)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}): needs root")
    try:
        yield setup.repository
    finally:
        subprocess.run(["umount", "-l", str(setup.repository)], check=False)


def test_kill_after_verified_mid_disposal_leaves_no_plaintext(setup: Setup, tmpfs_repository: Path) -> None:
    """The disposal is held at the unlink of the private `.disposing` name (strace delays that call)
    while the delivery goes on and writes VERIFIED; then SIGKILL. Before the fix recovery finished
    disposals only for SPOOLED manifests, so the whole plaintext stayed as `.mediaseal-<id>.disposing`,
    ignored by every scan, for ever."""
    need_strace()
    sha = complete(setup, "held.wav", os.urandom(700_000))
    grabbed = private_name(setup, "held.wav")
    held = Agent(setup, prefix=strace(grabbed.parent, "delay_enter=60000000", "2"))  # 60 s on that call
    wait_until("the source is under its private name", grabbed.exists)
    manifest = setup.spool / "packages" / f"{grabbed.name[len('.mediaseal-'):-len('.disposing')]}.json"
    wait_until("the manifest says verified",
               lambda: manifest.exists() and json.loads(manifest.read_bytes())["state"] == "verified")
    pid = traced_pid(held)
    os.kill(pid, signal.SIGKILL)
    wait_until("the agent is dead", lambda: not Path(f"/proc/{pid}").exists()
               or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3])
    held.kill()  # and its strace, which may sit out the delay it was asked for
    assert grabbed.exists()  # the state of the observation: verified, plaintext under the private name

    agent = Agent(setup)
    agent.wait_for("disposed", where=lambda d: d["path"].endswith("held.wav"), timeout=30)
    agent.wait_for("delivered", timeout=60)
    assert agent.stop() == 0
    assert list(setup.capture().iterdir()) == []
    assert decrypt_all(setup.repository, setup.keyring) == {"held.wav": [sha]}
    assert spool_files(setup.spool) == []


@pytest.mark.parametrize("record", ["kept by this agent", "lost (left by an older agent)"])
def test_private_name_of_a_released_recording_does_not_survive(setup: Setup, record: str) -> None:
    """The unlink of the private name fails (strace makes it EACCES, every time) while the delivery
    confirms and releases the package: the manifest is gone, the plaintext is still there under the
    private name. The next start must remove it: from the undisposed record this agent keeps, or,
    for a file an older agent left with no record at all, because a private name is made only after
    a commit and a manifest leaves only after the repository confirmed its package."""
    need_strace()
    sha = complete(setup, "stuck.wav", os.urandom(200_000))
    grabbed = private_name(setup, "stuck.wav")
    refused = Agent(setup, prefix=strace(grabbed.parent, "error=EACCES", "2+"))
    refused.wait_for("delivered", timeout=60)
    os.kill(traced_pid(refused), signal.SIGTERM)  # to the agent itself: strace would only detach
    assert refused.exited(timeout=60) == 0, "\n".join(refused.lines[-10:])
    assert grabbed.exists() and not list((setup.spool / "packages").iterdir())
    if record.startswith("lost"):
        shutil.rmtree(setup.spool / "undisposed", ignore_errors=True)

    agent = Agent(setup)
    agent.wait_for(("disposed", "disposed-orphan"), where=lambda d: "stuck" in d["path"] or
                   d["recording_id"] in grabbed.name, timeout=30)
    assert agent.stop() == 0
    assert list(setup.capture().iterdir()) == []
    assert decrypt_all(setup.repository, setup.keyring) == {"stuck.wav": [sha]}
    assert spool_files(setup.spool) == []


def rescans_after(address: str, n: int, timeout: float = 60.0) -> None:
    """Wait until the agent made `n` more full scans of its capture directories (its own counter)."""
    start = Scrape.of(address).value("mediaseal_watcher_rescans_total")
    wait_until(f"{n} rescans", lambda: Scrape.of(address).value("mediaseal_watcher_rescans_total") >= start + n,
               timeout)


# -- observation 5: a capture directory the agent can read but not change ----------------------------------


@contextlib.contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """`chattr +i`: nothing in `directory` may be renamed or deleted, not even by root. Skips where the
    filesystem or the capabilities do not allow it."""
    r = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot make {directory} immutable here: {r.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=False)


def test_undeletable_source_is_sealed_once_reported_and_disposed_once_allowed(setup: Setup) -> None:
    """Before the fix every rescan sealed and delivered the same recording again, with `intake-error`
    and a traceback each time."""
    setup.watches[0]["completion"] = "rename"
    sha = drop(setup.capture(), "readonly.wav", os.urandom(300_000))
    with immutable(setup.capture()):
        agent = Agent(setup, env=METRICS_ENV)
        address = agent.wait_for("metrics-listening")[0]["address"]
        (failed,) = agent.wait_for("dispose-failed", timeout=60)
        assert failed["reason"] == "permission-denied" and failed["path"].endswith("readonly.wav"), failed
        agent.wait_for("delivered", timeout=60)
        # Many rescans later (each one sees the file again), and a restart: sealed once, reported once.
        for run in range(2):
            rescans_after(address, 4)
            m = Scrape.of(address)
            assert m.value("mediaseal_dispose_failures_total", reason="permission-denied") == 1
            assert m.value("mediaseal_dispose_failures_total", reason="read-only-filesystem") == 0
            assert m.value("mediaseal_sources_undisposed") == 1
            assert sum('"event": "sealing"' in ln for ln in agent.lines) == (1 if run == 0 else 0)
            assert sum('"event": "dispose-failed"' in ln for ln in agent.lines) == 1  # once per start
            text = "\n".join(agent.lines)
            assert "intake-error" not in text and "Traceback" not in text, text[-3000:]
            assert agent.stop() == 0
            agent = Agent(setup, env=METRICS_ENV)
            address = agent.wait_for("metrics-listening")[0]["address"]
            agent.wait_for("ready")
    # The permission is fixed: the disposal completes by itself, with no restart.
    agent.wait_for("disposed", where=lambda d: d["path"].endswith("readonly.wav"), timeout=30)
    assert list(setup.capture().iterdir()) == []
    wait_metric(address, "mediaseal_sources_undisposed", 0)  # set just after the `disposed` line
    assert agent.stop() == 0
    assert decrypt_all(setup.repository, setup.keyring) == {"readonly.wav": [sha]}
    assert spool_files(setup.spool) == []


# -- recovery's sweep of private names, in process (real files) --------------------------------------------


def test_recovery_sweeps_only_private_names_no_manifest_knows(tmp_path: Path) -> None:
    """An orphan private name (no manifest, no undisposed record: its package was released) is
    finished; one whose manifest recovery kept as evidence (its package missing before verification)
    is left, because that plaintext may be the only copy; other dotfiles are never touched."""
    capture = tmp_path / "capture"
    (capture / "sub").mkdir(parents=True)
    spool = Spool(tmp_path / "spool", 1 << 30, min_free_bytes=0)
    evidence_id, orphan_id = "20260101T000000Z-" + "a" * 20, "20260101T000000Z-" + "b" * 20
    evidence = capture / f".mediaseal-{evidence_id}.disposing"
    orphan = capture / "sub" / f".mediaseal-{orphan_id}.disposing"
    other = capture / ".mediaseal-not-an-id.disposing"
    for p in (evidence, orphan, other):
        p.write_bytes(b"plaintext")
    kept = Manifest(recording_id=evidence_id, kind="call", repo_key="k", package_size=1, sha256=None, kid="k",
                    source=str(capture / "lost.wav"), identity={}, dispose="delete")
    (tmp_path / "spool" / "packages" / f"{evidence_id}.json").write_bytes(kept.to_json())
    pending = spool.recover()
    assert pending == [] and spool.load(evidence_id) is not None  # kept as evidence
    with ThreadPoolExecutor(1) as pool:
        asyncio.run(Disposal([WatchConfig(path=capture)], spool, pool).recover(pending))
    assert evidence.exists() and other.exists() and not orphan.exists()
