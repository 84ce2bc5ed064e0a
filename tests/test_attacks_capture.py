"""Issue 15, finding 1: whoever writes a capture directory, or plants files in the spool, attacks a real
agent process (DESIGN invariant 9). Each test is the attack as it was reproduced, and fails on the code
before the fix: a `move_to` inside a watch (or reaching one through a symlink) let a producer plant
files where the agent keeps its own; a planted spool manifest made the agent delete a chosen file and
overwrite a package in the repository; a directory swapped for a symlink between two steps of a
disposal made the agent delete `<name>.done` elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from agent_harness import Agent, Setup, decrypt_all, drop, make_keyring, packages
from support.process import run_cli

from mediaseal.agent.run import EXIT_CONFIG


@pytest.fixture(scope="module")
def keyring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keyring(tmp_path_factory.mktemp("kr") / "keyring")


def _setup(tmp_path: Path, keyring_template: Path, **watch: object) -> Setup:
    s = Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring", keyring_template),
              watches=[{"path": str(tmp_path / "capture"), "kind": "call", "completion": "rename", **watch}])
    s.agent["rescan_seconds"] = 0.5
    return s


def _refused_at_start(setup: Setup, *words: str) -> str:
    agent = Agent(setup)
    assert agent.exited() == EXIT_CONFIG, agent.tail()
    lines = [ln for ln in agent.lines if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in "\n".join(lines), lines
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


# -- the agent's own directories, outside every watch ----------------------------------------------------


def test_move_to_inside_the_watch_is_refused_at_start(tmp_path: Path, keyring_template: Path) -> None:
    """Before: allowed ("the watcher skips it"), so the producer could rename it away and plant a link."""
    setup = _setup(tmp_path, keyring_template, dispose="move", move_to=str(tmp_path / "capture" / "done"))
    _refused_at_start(setup, "watch[0].move_to", "must lie outside")


@pytest.mark.parametrize("what", ["move_to", "spool", "keyring"])
def test_a_symlink_from_outside_into_a_watch_is_refused_at_start(tmp_path: Path, keyring_template: Path,
                                                                 what: str) -> None:
    """The paths as written are outside the watch, but one of them is a link into it: judged by where it
    really is (resolved once at start), refused with one line saying both paths."""
    setup = _setup(tmp_path, keyring_template)
    setup.capture().mkdir(parents=True)
    inside = setup.capture() / f"planted-{what}"
    inside.mkdir()
    link = tmp_path / f"link-{what}"
    link.symlink_to(inside)
    if what == "move_to":
        setup.watches[0].update(dispose="move", move_to=str(link))
        where = "watch[0].move_to"
    elif what == "spool":
        setup.buffer["path"] = str(link)
        where = "buffer.path"
    else:
        shutil.copytree(setup.keyring, inside / "keyring")
        setup.keys["keyring"] = str(link / "keyring")
        where = "keys.keyring"
    line = _refused_at_start(setup, where, "overlaps watch[0].path", str(inside))
    r = run_cli("config", "check", "--config", str(setup.config()))
    assert r.returncode != 0 and where in r.stderr.decode(), (r.stderr, line)


# -- the spool: manifests are validated and authenticated ------------------------------------------------


def _first_delivery(setup: Setup) -> tuple[Agent, Path, str]:
    """An agent that delivered one recording (and made its manifest key); returns it, the package, its
    SHA-256 as delivered."""
    agent = Agent(setup)
    agent.wait_for("ready")
    drop(setup.capture(), "genuine.wav", os.urandom(50_000))
    agent.wait_for("delivered")
    (package,) = packages(setup.repository)
    return agent, package, hashlib.sha256(package.read_bytes()).hexdigest()


@pytest.mark.parametrize("forgery", ["unauthenticated", "copied from another agent's spool",
                                     "signed, fields outside the rules"])
def test_a_planted_manifest_is_refused_and_nothing_is_deleted_or_overwritten(
        tmp_path: Path, keyring_template: Path, forgery: str) -> None:
    """A manifest planted in the spool names a victim file outside every watch as its source (to be
    deleted) and an existing package's repository key (to be overwritten with junk). Before: at the next
    start the agent delivered the junk over the package and deleted the victim. Now: refused (its MAC,
    and its fields), moved to rejected/, reported; the victim and the package are untouched."""
    setup = _setup(tmp_path, keyring_template)
    agent, package, delivered_sha = _first_delivery(setup)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone else's file")
    assert agent.stop() == 0
    repo_key = str(package.relative_to(setup.repository))
    rid = package.name.removesuffix(".mseal")
    planted_rid = rid[:-1] + ("0" if rid[-1] != "0" else "1")  # an id of the agent's shape, not its own
    doc = {"recording_id": planted_rid, "kind": "call", "repo_key": repo_key.replace(rid, planted_rid),
           "package_size": 12, "sha256": None, "kid": "x", "source": str(victim),
           "identity": {"dev": os.stat(victim).st_dev, "ino": os.stat(victim).st_ino,
                        "size": victim.stat().st_size, "mtime_ns": os.stat(victim).st_mtime_ns},
           "dispose": "delete", "move_to": None, "marker": None, "state": "spooled", "created_at": 0.0,
           "attempts": 0, "last_error": "", "upload": {}}
    if forgery == "copied from another agent's spool":
        other = _setup(tmp_path / "other", keyring_template)
        other.watches[0]["path"] = str(setup.capture())  # the same capture directory, its own key
        other_agent = Agent(other)
        other_agent.wait_for("ready")
        assert other_agent.stop() == 0
        # Its key signs a manifest that is valid in every field: only the MAC tells it is not ours.
        from mediaseal.buffer.spool import Manifest, Spool, manifest_key

        key, _ = manifest_key(other.spool.with_name("buffer.key"))
        doc.update(source=str(setup.capture() / "genuine.wav"), repo_key=repo_key.replace(rid, planted_rid))
        foreign = Spool(tmp_path / "forge", 1 << 30, mac_key=key)
        data = foreign._sealed(Manifest.from_json(json.dumps(doc).encode()))
    elif forgery == "signed, fields outside the rules":
        # Under this agent's own key (a bug, or whoever took the key): the field checks still refuse a
        # source under no watch and a repository key not derived from the id.
        from mediaseal.buffer.spool import Manifest, Spool, manifest_key

        key, _ = manifest_key(setup.spool.with_name("buffer.key"))
        data = Spool(tmp_path / "forge", 1 << 30, mac_key=key)._sealed(Manifest.from_json(json.dumps(doc).encode()))
    else:
        data = json.dumps(doc).encode()
    (setup.spool / "packages" / f"{planted_rid}.json").write_bytes(data)
    (setup.spool / "packages" / f"{planted_rid}.mseal").write_bytes(b"junk" * 3)

    again = Agent(setup)
    (refused,) = again.wait_for("manifest-refused", where=lambda d: d["recording_id"] == planted_rid)
    again.wait_for("ready")
    assert victim.read_bytes() == b"someone else's file"
    assert hashlib.sha256(package.read_bytes()).hexdigest() == delivered_sha, "the package was overwritten"
    rejected = sorted(p.name for p in (setup.spool / "rejected").iterdir())
    assert rejected == [f"packages-{planted_rid}.json", f"packages-{planted_rid}.mseal"], rejected
    assert again.stop() == 0
    assert "Traceback" not in "\n".join(again.lines)
    assert refused["reason"], refused


# -- disposal: a directory of the path swapped for a symlink between two steps ----------------------------


def test_a_directory_swapped_for_a_symlink_mid_disposal_deletes_nothing_outside(tmp_path: Path,
                                                                             keyring_template: Path) -> None:
    """Marker mode, recording in `capture/sub/`. strace holds the disposal at its first step (taking the
    source's name, a rename in `sub`) while the producer renames `sub` away and puts a symlink to a
    directory outside in its place, which holds a file named like the marker. Before: the marker was
    unlinked by path, through the link: the victim was deleted. Now every step acts in a directory
    descriptor reached without following links: the victim is untouched, the failure is reported."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    setup = _setup(tmp_path, keyring_template, completion="marker")
    sub = setup.capture() / "sub"
    sub.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "a.wav.done"
    victim.write_bytes(b"not the agent's to delete")
    drop(sub, "a.wav", os.urandom(30_000))
    (sub / "a.wav.done").touch()
    trace = ["strace", "-f", "-qq", "-o", os.devnull, "-P", str(sub), "-e", "trace=rename,renameat,renameat2",
             "-e", "inject=rename,renameat,renameat2:delay_enter=4000000:when=1"]
    agent = Agent(setup, prefix=trace)
    agent.wait_for("spooled")  # the disposal starts now, and waits 4 s inside its first rename
    os.rename(sub, setup.capture() / ".sub-away")  # a dot-name: not a recording directory any more
    sub.symlink_to(outside)
    (failed,) = agent.wait_for("dispose-failed", timeout=60)
    assert victim.read_bytes() == b"not the agent's to delete"
    assert sorted(os.listdir(outside)) == ["a.wav.done"]
    assert "Too many levels of symbolic links" in failed["error"] or "Not a directory" in failed["error"], failed
    agent.wait_for("delivered")
    os.kill(int(Path(f"/proc/{agent.proc.pid}/task/{agent.proc.pid}/children").read_text().split()[0]),
            signal.SIGTERM)
    assert agent.exited() == 0
    assert "Traceback" not in "\n".join(agent.lines)
    got = decrypt_all(setup.repository, setup.keyring)
    assert list(got) == ["a.wav"]
