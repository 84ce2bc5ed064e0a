"""File races as rows of the reliability matrix (issue 9): what producers, operators and other processes
do to capture files while the agent looks at them.

Every row runs the agent as a real subprocess (`mediaseal run`) against the filesystem repository, with a
ledger of what the producer wrote, the race itself done for real on the files (truncate, rewrite, delete,
rename over, chmod, symlink), then a final clean run and the checker (decrypt everything the repository
holds): lost, duplicated, plaintext outside the capture directory and orphans must all be 0, as in
tests/test_reliability.py.

- A race *during encryption* is triggered by the agent's own `sealing` event on a recording big enough
  to take a while to read; whether it landed is read from the agent's next event about that file
  (`redo`: it did; `spooled`: the agent had already read it all). A race that missed still has a right
  answer (the agent sealed a complete recording, then the producer changed it: both versions are
  delivered), so the row stays exact, and the next attempt uses a recording twice as big; each row
  needs its races to have landed.
- Where a file is deliberately not delivered (deleted before the agent finished reading it, a symlink
  and whatever it points to) it is kept out of the ledger, and asserted separately to be absent from
  the repository.
- A name reused (generations of one name, or one name in two directories): every generation must be
  delivered, once each; the checker's by-name duplicate count is replaced for those names by "a
  generation delivered twice, or a package of no generation".
- recover: seconds from the race (or the start of the burst) to the first delivery that follows it,
  by the agent's own log timestamp; drain: to every recording delivered, the capture directory holding
  only what is meant to stay there, and the spool empty. The agent runs with a `rescan_seconds` longer
  than any wait (RESCAN): a race is settled by inotify hints and the watcher's own re-looks at a file
  changed while it was being sealed, never by a periodic scan. So every wait has a generous ceiling
  (PROMPT, support.waits.CEILING: load slows a row, it cannot fail it), and a race that only a periodic
  scan would settle still fails the row, at that ceiling.

Bounded here (`make test`); MEDIASEAL_SOAK=1 (`make soak`) runs more iterations and the 10,000-file burst.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import subprocess
import tempfile
import time
import unicodedata
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent, Setup, decrypt_all, make_keyring, spool_files
from reliability_support import (
    BLOCK,
    Check,
    Ledger,
    assert_zero,
    check_filesystem,
    new_setup,
    record,
    recording,
    scan_setup,
    sized,
    skipped,
    stamp,
)
from support.waits import CEILING

MiB = 1 << 20
FS = "filesystem"
RESCAN = 10 * CEILING  # no periodic scan within any wait: only inotify hints and re-looks settle a race
PROMPT = CEILING  # a race is dealt with by hints and re-looks: the periodic scan (RESCAN) never comes in time
BIG = 64 * MiB  # a recording that takes long enough to seal for a race to land while it is read
NAME_MAX = 255


@pytest.fixture(scope="module")
def race_keyring() -> Iterator[Path]:
    """One keyring per module (RSA keygen is slow), copied into every set-up."""
    with tempfile.TemporaryDirectory(prefix="mediaseal-race-kr-") as d:
        yield make_keyring(Path(d) / "keyring")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def at(path: Path) -> Callable[[dict[str, Any]], bool]:
    """A wait_for filter: the event is about `path`."""
    return lambda e: e.get("path") == str(path)


def first_of(agent: Agent, names: tuple[str, ...], path: Path, timeout: float = CEILING) -> str:
    """The first of the agent's log events `names` about `path` (others are passed over, as in wait_for)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            doc = agent.events.get(timeout=left)
        except queue.Empty:
            continue
        if doc.get("event") == "_exit":
            raise AssertionError(f"agent exited ({agent.proc.wait()}) waiting for {names} about {path!s}:\n"
                                 + "\n".join(agent.lines[-15:]))
        if doc.get("event") in names and doc.get("path") == str(path):
            return str(doc["event"])
    raise AssertionError(f"timed out waiting for {names} about {path!s}:\n" + "\n".join(agent.lines[-15:]))


def skip_queued(agent: Agent) -> None:
    """Pass over the events already received (as wait_for passes over those it is not waiting for)."""
    while True:
        try:
            doc = agent.events.get_nowait()
        except queue.Empty:
            return
        if doc.get("event") == "_exit":
            raise AssertionError(f"agent exited ({agent.proc.wait()}):\n" + "\n".join(agent.lines[-15:]))


def logged(agent: Agent, event: str) -> list[dict[str, Any]]:
    """Every `event` the agent has logged so far (from its stderr, whatever wait_for consumed)."""
    import json

    out = []
    for line in list(agent.lines):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == event:
            out.append(doc)
    return out


@dataclass
class Race:
    """One row's scenario: a set-up, its ledger, and what is deliberately not (or more than once) there."""

    setup: Setup
    ledger: Ledger
    outside: Path  # outside the agent's directory: symlink targets live here
    generations: dict[str, list[str]] = field(default_factory=dict)  # reused name -> SHA-256 of each
    absent: dict[str, str] = field(default_factory=dict)  # name -> SHA-256: must never be delivered
    keep: set[Path] = field(default_factory=set)  # files meant to stay in the capture directory
    recover: list[float] = field(default_factory=list)
    drain: list[float] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, tmp_path: Path, keyring: Path, seed: str) -> Race:
        setup = new_setup(tmp_path / "agent", keyring)
        setup.agent["rescan_seconds"] = RESCAN
        setup.capture().mkdir(parents=True)
        (tmp_path / "outside").mkdir()
        return cls(setup, Ledger(f"race-{seed}"), tmp_path / "outside")

    @property
    def capture(self) -> Path:
        return self.setup.capture()

    def start(self, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Agent:
        agent = Agent(self.setup, env=env, prefix=prefix)
        agent.wait_for("ready")
        return agent

    def put(self, rel: str | Path, data: bytes, *, ledger: bool = True) -> Path:
        """Write like a well-behaved producer (a dot-name, then rename), also for 255-byte names."""
        path = self.capture / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".producing-{os.getpid()}"
        tmp.write_bytes(data)
        os.rename(tmp, path)
        if ledger:
            assert path.name not in self.ledger.sha, f"ledger names must be unique: {path.name!r}"
            self.ledger.sha[path.name] = sha(data)
        return path

    def data(self, size: int) -> bytes:
        return recording(self.ledger.rng, size)

    def leftovers(self) -> list[Path]:
        """Files not yet dealt with: in the capture directory (not meant to stay) and in the spool."""
        files = [p for p in self.capture.rglob("*") if not p.is_dir() or p.is_symlink()]
        return [p for p in files if p not in self.keep] + spool_files(self.setup.spool)

    def settle(self, agent: Agent, t0: float, first: Path | None = None, timeout: float = 120.0) -> None:
        """recover: t0 (wall clock) -> the first delivery (of `first`, if given), by the agent's own
        timestamp; drain: t0 -> nothing left to do, as seen here."""
        (delivered,) = agent.wait_for("delivered", where=None if first is None else at(first), timeout=timeout)
        self.recover.append(max(0.0, stamp(delivered) - t0))
        self.wait_drained(agent, timeout)
        self.drain.append(time.time() - t0)
        self.leaked += scan_setup(self.setup)

    def wait_drained(self, agent: Agent, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.leftovers():
            if time.monotonic() > deadline:
                raise AssertionError(f"not drained: {self.leftovers()[:5]}")
            # Any end of a recording's attempt: a sealing that is redone (its source was swapped or changed
            # under it) leaves a staging file until it ends, and ends with no delivery.
            agent.wait_for(SETTLED, timeout=max(1.0, deadline - time.monotonic()))
            skip_queued(agent)  # deliveries come in bursts: look at the files once per burst, not per event

    def finish(self, fault: str, iterations: int, agent: Agent) -> Check:
        """Stop, a final clean run (nothing may be left for it), the checker, the row, the assertions."""
        assert agent.stop() == 0, "\n".join(agent.lines[-10:])
        final = self.start()
        self.wait_drained(final)
        assert final.stop() == 0, "\n".join(final.lines[-10:])
        check = check_filesystem(self.setup, self.ledger)
        check.plaintext += self.leaked
        got = decrypt_all(self.setup.repository, self.setup.keyring) if self.generations or self.absent else {}
        for name, shas in self.generations.items():
            have = got.get(name, [])
            check.duplicated = [n for n in check.duplicated if n != name]
            check.lost += [f"{name!r} {h[:12]}" for h in (Counter(shas) - Counter(have)).elements()]
            extra = Counter(have) - Counter(shas)  # a generation twice, or a package of no generation
            check.duplicated += [f"{name!r} {h[:12]}" for h in extra.elements()]
            check.recordings += len(shas)
        record(FS, f"race: {fault}", check, iterations, self.recover, self.drain)
        assert_zero(check)
        everything = {h for hs in got.values() for h in hs}
        wrong = [n for n, h in self.absent.items() if n in got or h in everything]
        assert not wrong, f"delivered though deliberately not: {wrong[:5]}"
        return check


SETTLED = ("delivered", "disposed", "redo", "vanished", "skipped", "still-open", "seal-failed")


def sealing_race(race: Race, agent: Agent, name: str, act: Callable[[Path, bytes], bytes | None],
                 want: int) -> Iterator[tuple[Path, bytes, bytes | None, bool, float]]:
    """Races that must land during encryption: drop a big recording, wait for the agent's `sealing` of it,
    `act(path, data)` on it (returns the final content, or None when there is none left). Yields (path,
    original, final, landed, t0) per attempt until `want` landed; a miss doubles the next size."""
    size, landed, attempts = BIG, 0, 0
    while landed < want:
        attempts += 1
        assert attempts <= want + 3, f"{attempts - 1} attempts, {landed} landed during encryption"
        data = race.data(size)
        path = race.put(f"{name}-{attempts}.bin", data, ledger=False)
        agent.wait_for("sealing", where=at(path))
        t0 = time.time()
        try:
            final = act(path, data)
        except FileNotFoundError:  # sealed and disposed already: the race missed by a mile
            final = None
        # Landed before the agent's open: `vanished` (deleted), `skipped` (ELOOP: replaced by a symlink,
        # which the no-follow open refused), `redo` (changed: its identity no longer matches), `still-open`
        # (the act held the file open for writing when the seal checked: issue 14's open-writer check
        # refuses to seal it then, so only what the file holds afterwards is delivered).
        outcomes = ("redo", "spooled", "seal-failed", "skipped", "vanished", "still-open")
        hit = first_of(agent, outcomes, path) != "spooled"
        landed += hit
        if not hit:
            size = min(2 * size, 4 * BIG)
        yield path, data, final, hit, t0


# -- during encryption -----------------------------------------------------------------------------------


def test_truncate_during_encryption(tmp_path: Path, race_keyring: Path) -> None:
    race = Race.new(tmp_path, race_keyring, "truncate")
    agent = race.start()
    cuts = iter([0.0, 1 / 3, 0.999, 0.5, 0.1] * 4)  # to nothing, to a third, by a few bytes...

    def truncate(path: Path, data: bytes) -> bytes:
        keep = int(len(data) * next(cuts))
        with open(path, "r+b") as f:
            f.truncate(keep)
        return data[:keep]

    n = 0
    for path, data, final, landed, t0 in sealing_race(race, agent, "trunc", truncate, sized(2, 8)):
        n += 1
        if landed:  # the agent must deliver what the file holds now, never a package of neither
            race.ledger.sha[path.name] = sha(final or b"")
        else:  # it had read a complete recording: that one, and the truncated one after it
            race.generations[path.name] = [sha(data)] + ([sha(final)] if final is not None else [])
        race.settle(agent, t0, path, timeout=PROMPT)
    race.finish("truncate during encryption", n, agent)


def test_rewrite_during_encryption(tmp_path: Path, race_keyring: Path) -> None:
    """Rewritten in place, same size, same inode: only the mtime tells the versions apart."""
    race = Race.new(tmp_path, race_keyring, "rewrite")
    agent = race.start()

    def rewrite(path: Path, data: bytes) -> bytes:
        # New content at once (nothing to generate mid-race): the same blocks, rotated by one. Markers
        # stay at every 4 KiB boundary, for the plaintext scan.
        view = memoryview(data)
        with open(path, "r+b") as f:
            f.write(view[BLOCK:])
            f.write(view[:BLOCK])
        return data[BLOCK:] + data[:BLOCK]

    n = 0
    for path, data, final, landed, t0 in sealing_race(race, agent, "rewrite", rewrite, sized(2, 8)):
        n += 1
        assert final is not None or not landed
        if landed:
            race.ledger.sha[path.name] = sha(final or b"")
        else:
            race.generations[path.name] = [sha(data)] + ([sha(final)] if final is not None else [])
        race.settle(agent, t0, path, timeout=PROMPT)
    race.finish("rewrite during encryption", n, agent)


# -- deletion, reuse, bursts, directories ------------------------------------------------------------------


def test_delete_before_processing(tmp_path: Path, race_keyring: Path) -> None:
    """Deleted right after appearing (before the agent looks), and deleted while being sealed: never
    delivered, nothing left behind; recordings around them are delivered."""
    race = Race.new(tmp_path, race_keyring, "delete")
    agent = race.start()
    quick = sized(30, 300)
    t0 = time.time()
    doomed: dict[Path, str] = {}
    for i in range(quick):
        race.put(f"kept-{i:04d}.bin", race.data(race.ledger.rng.choice([0, 5000, 70_000])))
        data = race.data(race.ledger.rng.choice([5000, 300_000]))
        path = race.put(f"gone-{i:04d}.bin", data, ledger=False)
        try:
            path.unlink()
            doomed[path] = sha(data)
        except FileNotFoundError:  # the agent sealed and disposed it first: then it is delivered
            race.ledger.sha[path.name] = sha(data)
    race.settle(agent, t0)
    # A deleted file the agent had finished sealing before the unlink (its `spooled` is in the log) is
    # a complete recording, rightly delivered; every other one must not be.
    spooled = {e["path"] for e in logged(agent, "spooled")}
    for path, h in doomed.items():
        if str(path) in spooled:
            race.ledger.sha[path.name] = h
        else:
            race.absent[path.name] = h

    def delete(path: Path, data: bytes) -> None:
        path.unlink()

    mid = 0
    for path, data, _, landed, t1 in sealing_race(race, agent, "gone-mid", delete, sized(1, 4)):
        mid += 1
        (race.absent if landed else race.ledger.sha)[path.name] = sha(data)
        race.put(f"after-{mid}.bin", race.data(5000))  # the agent goes on with the next one
        race.settle(agent, t1, timeout=PROMPT)
    race.finish("delete before processing", quick + mid, agent)
    assert sum(1 for n in race.absent if n.startswith("gone-mid")) >= sized(1, 4)


def test_same_name_reused(tmp_path: Path, race_keyring: Path) -> None:
    """Generations of one name, each renamed over the place the moment the previous one is spooled (so
    it races that one's disposal), and one name in two directories: all delivered, none overwritten."""
    race = Race.new(tmp_path, race_keyring, "reuse")
    agent = race.start()
    rounds = sized(2, 10)
    for r in range(rounds):
        t0 = time.time()
        name = f"reused-{r}.bin"
        path, shas = race.capture / name, []
        for _ in range(sized(4, 10)):
            data = race.data(race.ledger.rng.choice([0, 5000, 300_000, 2 * MiB]))
            race.put(name, data, ledger=False)
            shas.append(sha(data))
            agent.wait_for("spooled", where=at(path))  # renamed over before its disposal
        race.generations[name] = shas
        twin = f"same-{r}.bin"
        a, b = race.data(70_000), race.data(70_000)
        race.put(Path("day1") / twin, a, ledger=False)
        race.put(Path("day2") / twin, b, ledger=False)
        race.generations[twin] = [sha(a), sha(b)]
        race.settle(agent, t0)
    race.finish("same name reused", rounds, agent)


def test_burst_of_small_files(tmp_path: Path, race_keyring: Path) -> None:
    race = Race.new(tmp_path, race_keyring, "burst")
    agent = race.start()
    count = sized(2000, 10_000)
    rng = race.ledger.rng
    t0 = time.time()
    race.ledger.produce(race.capture, "burst", [rng.choice([0, 1, 100, 4096, rng.randrange(8192)])
                                                 for _ in range(count)])
    race.settle(agent, t0, timeout=600)
    race.finish(f"burst of {count:,} small files", 1, agent)


def test_new_subdirectories_under_recursive_watch(tmp_path: Path, race_keyring: Path) -> None:
    """Directories created under the running agent and written into at once (racing the new inotify
    watches), and whole trees built under a dot-name and renamed into place."""
    race = Race.new(tmp_path, race_keyring, "subdirs")
    agent = race.start()
    rounds = sized(2, 10)
    for r in range(rounds):
        t0 = time.time()
        deep = race.capture / f"r{r}" / "2026" / "11" / "28"
        deep.mkdir(parents=True)
        for level, d in enumerate([deep, deep.parent, deep.parent.parent]):
            race.put(d.relative_to(race.capture) / f"mkdir-{r}-{level}.bin", race.data(5000))
        staging = race.capture / f".tree-{r}"
        for j in range(5):
            sub = staging / f"cam{j}" / "a" / "b"
            sub.mkdir(parents=True)
            data = race.data(race.ledger.rng.choice([0, 5000, 300_000]))
            (sub / f"tree-{r}-{j}.bin").write_bytes(data)  # inside a dot-directory: never entered
            race.ledger.sha[f"tree-{r}-{j}.bin"] = sha(data)
        os.rename(staging, race.capture / f"tree-{r}")  # one inotify event for the whole tree
        race.settle(agent, t0)
    race.finish("new subdirectories under a recursive watch", rounds, agent)


def test_zero_byte_files(tmp_path: Path, race_keyring: Path) -> None:
    race = Race.new(tmp_path, race_keyring, "zero")
    agent = race.start()
    rounds = sized(1, 5)
    for r in range(rounds):
        t0 = time.time()
        for i in range(10):
            race.put(f"empty-{r}-{i}.bin", b"")
            touched = race.capture / "sub" / f"touched-{r}-{i}.bin"  # created in place, no rename
            touched.parent.mkdir(exist_ok=True)
            touched.touch()
            race.ledger.sha[touched.name] = sha(b"")
        race.put(f"between-{r}.bin", race.data(70_000))
        race.settle(agent, t0)
    race.finish("zero-byte files", rounds, agent)


# -- permissions and symlinks --------------------------------------------------------------------------------


def _no_dac_override(fault: str) -> list[str]:
    """As root, chmod 000 stops nobody: run the agent without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    reason = "running as root and util-linux setpriv (to drop CAP_DAC_OVERRIDE) is not installed"
    if setpriv is not None:
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
        r = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
        if r.returncode == 0:
            return prefix
        reason = f"cannot drop capabilities here: {r.stderr.strip()}"
    skipped(FS, fault, reason)
    pytest.skip(reason)


def _metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_permission_denied(tmp_path: Path, race_keyring: Path) -> None:
    """Unreadable: reported once (log event and metric) over many scans, kept in place, and delivered
    once made readable, by the same running agent."""
    fault = "permission denied, then fixed"
    prefix = _no_dac_override(fault)
    race = Race.new(tmp_path, race_keyring, "perm")
    race.setup.agent["rescan_seconds"] = 0.2  # many full scans meet the unreadable file
    env = {"MEDIASEAL_METRICS__ENABLED": "true", "MEDIASEAL_METRICS__LISTEN": "127.0.0.1:0"}
    agent = Agent(race.setup, env=env, prefix=prefix)
    (listening,) = agent.wait_for("metrics-listening")
    agent.wait_for("ready")
    rounds = sized(1, 4)
    for r in range(rounds):
        data = race.data(300_000)
        locked = race.capture / f"locked-{r}.bin"
        tmp = race.capture / ".locked"
        tmp.write_bytes(data)
        tmp.chmod(0)
        os.rename(tmp, locked)  # unreadable from the moment it has its name
        race.ledger.sha[locked.name] = sha(data)
        race.put(f"readable-{r}.bin", race.data(5000))
        race.keep = {locked}
        agent.wait_for("unreadable", where=at(locked))
        scans = agent.wait_for("rescan-done", count=5)  # more looks while it is still locked
        assert len(scans) == 5
        race.wait_drained(agent)
        assert locked.read_bytes() == data  # kept in place, untouched
        assert len([e for e in logged(agent, "unreadable") if e["path"] == str(locked)]) == 1  # said once
        assert _metric(listening["address"], "mediaseal_watcher_unreadable_total") == r + 1  # counted once
        race.keep = set()
        t0 = time.time()
        locked.chmod(0o644)  # the operator's fix; no restart
        race.settle(agent, t0, locked)
    race.finish(fault, rounds, agent)


def test_symlinks_out_of_capture_are_never_followed(tmp_path: Path, race_keyring: Path) -> None:
    """Links to a file and a directory outside, a dangling one, one to a file inside, and a recording
    replaced by a symlink while it is sealed: no target's bytes reach the spool or the repository,
    targets are untouched, links stay where they are."""
    race = Race.new(tmp_path, race_keyring, "symlink")
    secret = race.outside / "secret.bin"
    secret_data = race.data(300_000)
    secret.write_bytes(secret_data)
    (race.outside / "dir").mkdir()
    inner = race.outside / "dir" / "inner.bin"
    inner.write_bytes(race.data(70_000))
    targets = {p: (sha(p.read_bytes()), os.stat(p)) for p in (secret, inner)}
    agent = race.start()
    rounds = sized(1, 4)
    t0 = time.time()
    linked: list[Path] = []
    for r in range(rounds):
        real = race.put(f"real-{r}.bin", race.data(5000))
        links = {f"to-secret-{r}.bin": secret, f"to-dir-{r}": race.outside / "dir",
                 f"dangling-{r}.bin": race.outside / "nothing-here.bin", f"alias-{r}.bin": real}
        for name, target in links.items():
            tmp = race.capture / f".link-{r}"
            tmp.symlink_to(target)
            os.rename(tmp, race.capture / name)
            linked.append(race.capture / name)
            race.absent[name] = ""  # no package may carry a link's name
    race.keep |= set(linked)
    race.absent |= {"secret.bin": targets[secret][0], "inner.bin": targets[inner][0]}
    race.settle(agent, t0)

    def swap(path: Path, data: bytes) -> None:
        tmp = race.capture / ".swap"
        tmp.symlink_to(secret)
        os.rename(tmp, path)  # the recording is replaced by a link to someone else's file
        race.keep.add(path)

    n = 0
    for path, data, _, landed, t1 in sealing_race(race, agent, "swapped", swap, sized(1, 3)):
        n += 1
        if landed:  # the producer replaced its recording before the agent had it: nothing to deliver
            race.absent[path.name] = sha(data)
        else:  # the agent had sealed it all: it is delivered, the link is left alone
            race.ledger.sha[path.name] = sha(data)
        race.put(f"after-swap-{n}.bin", race.data(5000))
        race.settle(agent, t1, timeout=PROMPT)
    skips = {e["path"] for e in logged(agent, "skipped") if e.get("reason") == "symbolic link, not followed"}
    race.finish("symlinks out of the capture directory", rounds + n, agent)
    for target, (h, st) in targets.items():
        now = os.stat(target)
        assert sha(target.read_bytes()) == h and (now.st_ino, now.st_size, now.st_mtime_ns, now.st_mode) == (
            st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode), f"{target} was touched"
    for link in race.keep:
        assert link.is_symlink(), f"{link} was not left in place"
    assert {str(p) for p in linked} <= skips, f"not reported as skipped: {sorted({str(p) for p in linked} - skips)}"


# -- awkward names ---------------------------------------------------------------------------------------------


def names_row(tmp_path: Path, keyring: Path, fault: str, names: Callable[[int], list[str]]) -> None:
    """Recordings under awkward names, written while the agent runs; every one delivered once under
    its exact original name (the checker matches names byte for byte)."""
    race = Race.new(tmp_path, keyring, fault)
    agent = race.start()
    rounds = sized(1, 5)
    for r in range(rounds):
        t0 = time.time()
        for name in names(r):
            race.put(name, race.data(race.ledger.rng.choice([0, 5000, 300_000])))
        race.settle(agent, t0)
    race.finish(fault, rounds, agent)


def test_names_with_newlines(tmp_path: Path, race_keyring: Path) -> None:
    names_row(tmp_path, race_keyring, "names with newlines", lambda r: [
        f"line\nbreak-{r}.bin", f"\nleading-{r}.bin", f"trailing-{r}.bin\n", f"cr\rlf\r\n-{r}.bin",
        f"many\n\n\n\nnewlines-{r}.bin", f"tab\tand space {r}.bin", f"{{\"event\": \"delivered\"}}\n{r}.bin",
        f"-rf {r}.bin", f"back\\slash '{r}' \"q\" *?[x].bin",
    ])


def test_unicode_names(tmp_path: Path, race_keyring: Path) -> None:
    """Including one visible name in its two normal forms (NFC and NFD): two files, two recordings."""
    cafe = "caf\u00e9"
    names_row(tmp_path, race_keyring, "unicode names", lambda r: [
        f"{cafe}-{r}.bin", unicodedata.normalize("NFD", f"{cafe}-{r}.bin"),
        f"\u00e7a\u011fr\u0131-\u901a\u8a71-\U0001f4de-{r}.wav",
        f"\u05e9\u05d9\u05d7\u05d4-\u0645\u0643\u0627\u0644\u0645\u0629-{r}.bin",
        f"\U0001f468\u200d\U0001f469\u200d\U0001f467-{r}.bin", f"\u202eevil-{r}.bin", f"\ufeffbom-{r}.bin",
        f"\u0928\u092e\u0938\u094d\u0924\u0947-{r}.bin", f"\u00a0nbsp\u2028ls-{r}.bin",
    ])


def _exactly(stem: str, tail: str, size: int = NAME_MAX) -> str:
    """`stem` repeated and cut so that stem... + tail is exactly `size` bytes of UTF-8."""
    name = ""
    while len((name + stem + tail).encode()) <= size:
        name += stem
    name += "x" * (size - len((name + tail).encode()))
    assert len((name + tail).encode()) == size
    return name + tail


def test_very_long_names(tmp_path: Path, race_keyring: Path) -> None:
    """255-byte names (ASCII, 2-, 3- and 4-byte UTF-8) and deep paths, near PATH_MAX (4096)."""
    race = Race.new(tmp_path, race_keyring, "long")
    agent = race.start()
    rounds = sized(1, 3)
    for r in range(rounds):
        t0 = time.time()
        for stem in ("a", "\u00fc", "\u901a", "\U0001f4de"):
            race.put(_exactly(stem, f"-{r}.bin"), race.data(race.ledger.rng.choice([0, 5000, 300_000])))
        component = _exactly("d", f"{r}", 250)
        deep = race.capture / f"deep-{r}"
        while len(os.fsencode(deep / component / _exactly("n", ".bin"))) < 4000:
            deep /= component
        leaf = race.put(deep.relative_to(race.capture) / _exactly("f", f"-{r}.bin"), race.data(70_000))
        assert len(os.fsencode(leaf)) > 3700
        many = race.capture / f"many-{r}" / Path(*["l"] * 200)
        race.put(many.relative_to(race.capture) / f"levels-{r}.bin", race.data(5000))
        race.settle(agent, t0)
    race.finish("very long names (255 bytes) and deep paths", rounds, agent)


def test_undecodable_name_does_not_blind_the_watcher(tmp_path: Path, race_keyring: Path) -> None:
    """A name that is not UTF-8 (any bytes but "/" and NUL make a Linux name) makes watchfiles drop the
    whole batch of inotify events it is in. Found here: a recording written beside such a file waited
    for the next periodic scan (30 s by default); the watcher now scans at once when that happens."""
    race = Race.new(tmp_path, race_keyring, "undecodable")
    race.setup.agent["rescan_seconds"] = RESCAN  # only an inotify hint or the watcher's own re-scan comes
    agent = race.start()
    agent.wait_for("rescan-done")  # the scan at start is over: from here on, only hints (or a re-scan)
    bad = os.fsencode(race.capture) + b"/undecodable-\xff\xfe.bin"
    with open(bad, "wb") as f:
        f.write(race.data(5000))
    good = race.put("beside-it.bin", race.data(5000))
    (ev,) = agent.wait_for("watch-events-unavailable")
    assert "decode" in ev["error"], ev  # the real error, not "unhandled errors in a TaskGroup"
    delivered = agent.wait_for("delivered", count=2)  # in either order, with no periodic rescan to come
    assert {Path(e["path"]).name.startswith("undecodable-") for e in delivered} == {True, False}
    assert any(Path(e["path"]) == good for e in delivered)
    assert agent.stop() == 0
    assert not os.path.exists(bad)  # delivered (its name's bytes kept as \\xNN text), then disposed
    assert {n: len(hs) for n, hs in decrypt_all(race.setup.repository, race.setup.keyring).items()} == {
        good.name: 1, "undecodable-\\xff\\xfe.bin": 1}
