"""Real recorders' write patterns (tests/producers.py, each a child process) against a real agent.

For each: the delivered package decrypts byte for byte to the file as its writer finally closed it,
in the completion modes its docs/OPERATIONS.md recipe names and with the default config. The first two
tests are issue 14's observations 1 and 2 (a paused in-place writer cut short by `quiet`, and by
`rename`); before the open-writer check they delivered the first piece and deleted the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import producers
import pytest
from agent_harness import Agent, Setup, decrypt_all, make_keyring, packages, spool_files
from reliability_support import assert_zero, record_run, stamp

from mediaseal import codec


@pytest.fixture(scope="session")
def keyring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keyring(tmp_path_factory.mktemp("kr") / "keyring")


def _setup(tmp_path: Path, keyring_template: Path, watches: list[dict[str, Any]]) -> Setup:
    return Setup(root=tmp_path, keyring=make_keyring(tmp_path / "keyring", keyring_template), watches=watches)


def _watch(root: Path, name: str, **kw: Any) -> dict[str, Any]:
    return {"path": str(root / name), "kind": "call", **kw}


def _events(agent: Agent, want: dict[str, int], timeout: float = 120) -> list[dict[str, Any]]:
    """Wait until each event name arrived `want[name]` times: one stream, so all are waited for at once
    (waiting for one name after another would drop the other names' events arriving in between)."""
    left, got = dict(want), []
    while any(left.values()):
        (doc,) = agent.wait_for(tuple(n for n, c in left.items() if c > 0), timeout=timeout)
        left[doc["event"]] -= 1
        got.append(doc)
    return got


def _delivered(setup: Setup, agent: Agent, expected: dict[str, str], row: str | None = None) -> None:
    """Every recording delivered once, as closed; sources disposed; nothing left in the spool. With `row`,
    a docs/RELIABILITY.md row: recover = the writers' last close to the first delivery, drain = to the
    last (by the agent's timestamps)."""
    closed = time.time()
    events = _events(agent, {"disposed": len(expected), "delivered": len(expected)})
    if row is not None:
        times = [stamp(d) - closed for d in events if d["event"] == "delivered"]
        check = record_run(row, setup, expected, [max(0.0, min(times))], [max(0.0, max(times))])
        assert_zero(check)
    got = decrypt_all(setup.repository, setup.keyring)
    assert got == {name: [digest] for name, digest in expected.items()}
    for w in setup.watches:
        left = [p for p in Path(w["path"]).rglob("*") if p.is_file()]
        assert left == [], left
    assert spool_files(setup.spool) == []
    assert not [line for line in agent.lines if "source-open-for-writing" in line or "Traceback" in line]


def test_observation_1_quiet_mode_waits_for_a_paused_writer(tmp_path: Path, keyring_template: Path) -> None:
    """1 MiB, 5 s pause with the file open, 1 MiB more: `quiet` (2 s) used to seal the first MiB and delete."""
    setup = _setup(tmp_path, keyring_template, [_watch(tmp_path, "capture", completion="quiet", quiet_seconds=2.0)])
    agent = Agent(setup)
    agent.wait_for("ready")
    p = producers.start("paused", setup.capture() / "held.wav", pieces=2, size=1 << 20, pause=5.0)
    digest = p.wait_done()
    _delivered(setup, agent, {"held.wav": digest})
    assert agent.stop() == 0


def test_observation_2_rename_mode_with_an_in_place_writer(tmp_path: Path, keyring_template: Path) -> None:
    """Three 100 KB pieces written in place: `rename` used to seal the first and delete the file."""
    setup = _setup(tmp_path, keyring_template, [_watch(tmp_path, "capture", completion="rename")])
    agent = Agent(setup)
    agent.wait_for("ready")
    p = producers.start("paused", setup.capture() / "inplace.wav", pieces=3, size=100_000, pause=2.0)
    digest = p.wait_done()
    _delivered(setup, agent, {"inplace.wav": digest})
    assert agent.stop() == 0


def test_temp_patterns_are_configurable_per_watch(tmp_path: Path, keyring_template: Path) -> None:
    """A producer writing `x.wav.inprogress` and renaming: only the final name is sealed."""
    setup = _setup(tmp_path, keyring_template, [_watch(tmp_path, "capture", completion="rename")])
    agent = Agent(setup, env={"MEDIASEAL_WATCH__0__TEMP_PATTERNS": '["*.inprogress", ".*"]'})
    agent.wait_for("ready")
    tmp = setup.capture() / "x.wav.inprogress"
    data = os.urandom(300_000)
    with open(tmp, "wb") as f:
        f.write(data[:100_000])
        f.flush()
        f.write(data[100_000:])
    os.rename(tmp, setup.capture() / "x.wav")
    _delivered(setup, agent, {"x.wav": hashlib.sha256(data).hexdigest()})
    assert agent.stop() == 0


def _recipes(root: Path) -> list[tuple[dict[str, Any], str, Path, dict[str, Any]]]:
    """(watch, recipe, file, producer options) for every recorder in every mode its recipe documents."""
    staging = root / "fs-staging"
    staging.mkdir()
    return [
        (_watch(root, "mm-close"), "mixmonitor", root / "mm-close" / "mm1.wav", {}),
        (_watch(root, "mm-marker", completion="marker"), "mixmonitor", root / "mm-marker" / "mm2.wav",
         {"hook": "marker"}),
        (_watch(root, "mm-rename", completion="rename"), "mixmonitor", root / "mm-rename" / "mm3.wav",
         {"hook": "rename"}),
        (_watch(root, "fs-close"), "freeswitch", root / "fs-close" / "fs1.wav", {}),
        (_watch(root, "fs-rename", completion="rename"), "freeswitch", root / "fs-rename" / "fs2.wav",
         {"hook": "rename", "staging": staging}),
        (_watch(root, "rtp/pcaps", completion="marker", marker="{dir}/../metadata/{stem}.txt"), "rtpengine-pcap",
         root / "rtp" / "pcaps" / "call-a.pcap", {}),
        (_watch(root, "rtp2/pcaps"), "rtpengine-pcap", root / "rtp2" / "pcaps" / "call-b.pcap", {}),
        (_watch(root, "rtpwav"), "rtpengine-wav", root / "rtpwav" / "rw1.wav", {}),
        (_watch(root, "obs", kind="screen"), "obs", root / "obs" / "o1.mp4", {}),
        (_watch(root, "obs-quiet", kind="screen", completion="quiet"), "obs", root / "obs-quiet" / "o2.mp4", {}),
    ]


def test_every_recorder_in_its_documented_modes(tmp_path: Path, keyring_template: Path) -> None:
    recipes = _recipes(tmp_path)
    setup = _setup(tmp_path, keyring_template, [w for w, *_ in recipes])
    agent = Agent(setup)
    agent.wait_for("ready")
    running = [producers.start(recipe, path, pause=3.0, **opts) for _, recipe, path, opts in recipes]
    expected = {p.path.name: p.wait_done() for p in running}
    _delivered(setup, agent, expected, f"in-place recorders with pauses ({len(running)} recorder/mode pairs)")
    assert not (tmp_path / "rtp" / "metadata" / "call-a.txt").exists()  # the marker went with its recording
    assert (tmp_path / "rtp2" / "metadata" / "call-b.txt").exists()  # not a marker in `close` mode: left alone
    assert agent.stop() == 0


def _ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "ffmpeg"], capture_output=True, timeout=600, check=False)
        found = shutil.which("ffmpeg")
    if found is None:
        pytest.skip("ffmpeg is not installed (and could not be installed with apt-get as root)")
    return found


_FEED = """
import sys, time, hashlib
out = sys.stdout.buffer
def audio(n, seed):
    b, block = bytearray(), hashlib.sha256(seed).digest()
    while len(b) < n:
        block = hashlib.sha256(block).digest(); b += block
    return bytes(b[:n])
out.write(audio(64000, b"a")); out.flush()
time.sleep(float(sys.argv[1]))
out.write(audio(96000, b"b")); out.flush()
"""


def _ffmpeg_wav(ffmpeg: str, out: Path, pause: float) -> subprocess.Popen[bytes]:
    feed = subprocess.Popen([sys.executable, "-c", _FEED, str(pause)], stdout=subprocess.PIPE)
    proc = subprocess.Popen(
        [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-fflags", "+bitexact", "-f", "s16le",
         "-ar", "8000", "-ac", "1", "-i", "pipe:0", "-flags:a", "+bitexact", "-f", "wav", str(out)],
        stdin=feed.stdout, stderr=subprocess.PIPE)
    assert feed.stdout is not None
    feed.stdout.close()
    return proc


@pytest.mark.parametrize("completion", [None, "close", "quiet"])
def test_ffmpeg_writing_a_wav_from_a_stalling_input(tmp_path: Path, keyring_template: Path,
                                                    completion: str | None) -> None:
    """ffmpeg rewrites the RIFF header at close: a package sealed during the stall has the wrong sizes."""
    ffmpeg = _ffmpeg()
    ref = tmp_path / "reference.wav"
    assert _ffmpeg_wav(ffmpeg, ref, 0.0).wait(timeout=60) == 0
    header = ref.read_bytes()[:44]
    assert header[:4] == b"RIFF" and int.from_bytes(header[4:8], "little") == len(ref.read_bytes()) - 8
    watch = _watch(tmp_path, "capture") if completion is None else _watch(tmp_path, "capture", completion=completion)
    setup = _setup(tmp_path, keyring_template, [watch])
    agent = Agent(setup)
    agent.wait_for("ready")
    proc = _ffmpeg_wav(ffmpeg, setup.capture() / "ff.wav", 4.0)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else b""
    _delivered(setup, agent, {"ff.wav": hashlib.sha256(ref.read_bytes()).hexdigest()},
               f"ffmpeg writing a WAV in place, input stalled 4 s (completion {completion or 'default'})")
    assert agent.stop() == 0


def test_default_config_with_every_in_place_recorder(tmp_path: Path, keyring_template: Path) -> None:
    """No completion key at all (`close`): every in-place writer, pauses included, delivered whole."""
    names = [("mixmonitor", "d-mm.wav"), ("freeswitch", "d-fs.wav"), ("rtpengine-wav", "d-rw.wav"),
             ("obs", "d-obs.mp4"), ("paused", "d-held.wav")]
    setup = _setup(tmp_path, keyring_template, [_watch(tmp_path, "capture")])
    agent = Agent(setup)
    agent.wait_for("ready")
    running = [producers.start(recipe, setup.capture() / name, pause=3.0, size=300_000) for recipe, name in names]
    expected = {p.path.name: p.wait_done() for p in running}
    _delivered(setup, agent, expected, f"in-place writers, 3 s pauses, default config ({len(running)} recorders)")
    assert agent.stop() == 0


def test_delete_refused_where_writers_cannot_be_checked(keyring_template: Path) -> None:
    """An agent without CAP_LEASE (here: as nobody) cannot see other users' writers: a `quiet` + `delete`
    watch keeps its sources, with one `delete-refused` line, and still delivers them."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and util-linux setpriv to run the agent as another user")
    root = Path(tempfile.mkdtemp(prefix="mediaseal-nobody-"))  # not under pytest's 0700 base directory
    try:
        setup = _setup(root, keyring_template, [_watch(root, "capture", completion="quiet", quiet_seconds=0.5)])
        for d in (setup.capture(), setup.repository):
            d.mkdir(parents=True)
        for p in [root, *root.rglob("*")]:
            os.chown(p, 65534, 65534, follow_symlinks=False)
        agent = Agent(setup, prefix=[setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"])
        agent.wait_for("ready")
        data = os.urandom(200_000)
        (setup.capture() / "kept.wav").write_bytes(data)  # root's file: no lease for nobody
        (refused,) = agent.wait_for("delete-refused")
        assert refused["dispose"] == "keep" and "CAP_LEASE" in refused["reason"]
        (disposed,) = agent.wait_for("disposed")
        assert disposed["dispose"] == "keep"
        agent.wait_for("delivered")  # after the disposal: the release waits for it
        assert decrypt_all(setup.repository, setup.keyring) == {"kept.wav": [hashlib.sha256(data).hexdigest()]}
        assert (setup.capture() / "kept.wav").read_bytes() == data
        assert agent.stop() == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_source_that_grew_after_sealing_is_sealed_again_never_deleted(tmp_path: Path,
                                                                          keyring_template: Path) -> None:
    """Sealed and committed, then (the agent killed before disposal) the recorder appended to it: the
    restarted agent does not delete it (`source-changed-after-seal`, warning) and seals it as it is now."""
    setup = _setup(tmp_path, keyring_template, [_watch(tmp_path, "capture")])
    crashed = Agent(setup, env={"MEDIASEAL_CRASH_AT": "after-commit:1"})
    crashed.wait_for("ready")
    path = setup.capture() / "grows.wav"
    first = os.urandom(100_000)
    path.write_bytes(first)
    assert crashed.exited() == 86  # crash.CRASH_EXIT, right after the commit, before the disposal
    more = os.urandom(50_000)
    with path.open("ab") as f:
        f.write(more)
    agent = Agent(setup)
    (changed,) = agent.wait_for("source-changed-after-seal")
    assert changed["level"] == "warning"
    _events(agent, {"disposed": 1, "delivered": 2})  # the first package, and the grown file sealed again
    digests = sorted(hashlib.sha256(d).hexdigest() for d in (first, first + more))
    assert sorted(decrypt_all(setup.repository, setup.keyring)["grows.wav"]) == digests
    assert not path.exists()
    assert agent.stop() == 0


_HOLD = """
import sys
f = open(sys.argv[1], "ab", buffering=0)
print("open", flush=True)
sys.stdin.readline()
f.write(b"z" * 50000)
f.close()
"""


def test_disposal_leaves_a_source_reopened_for_writing(tmp_path: Path, keyring_template: Path) -> None:
    """Committed, then (agent killed before disposal) a recorder reopened it to append: the restarted agent's
    disposal finds it open for writing and leaves it (`source-open-for-writing`); sealed again once closed."""
    setup = _setup(tmp_path, keyring_template, [_watch(tmp_path, "capture")])
    crashed = Agent(setup, env={"MEDIASEAL_CRASH_AT": "after-commit:1"})
    crashed.wait_for("ready")
    path = setup.capture() / "reopened.wav"
    first = os.urandom(100_000)
    path.write_bytes(first)
    assert crashed.exited() == 86
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        agent = Agent(setup)
        (refused,) = agent.wait_for("source-open-for-writing")
        assert refused["level"] == "warning" and path.exists()
        assert holder.stdin is not None
        holder.stdin.write(b"go\n")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    _events(agent, {"disposed": 1, "delivered": 2})  # the first package, and the file sealed again once closed
    digests = sorted(hashlib.sha256(d).hexdigest() for d in (first, first + b"z" * 50000))
    assert sorted(decrypt_all(setup.repository, setup.keyring)["reopened.wav"]) == digests
    assert not path.exists()
    assert agent.stop() == 0


def test_sidecars_travel_with_their_recording(tmp_path: Path, keyring_template: Path) -> None:
    """MixMonitor with a SIPREC-style metadata file per call (`<stem>.xml`, written in place after the audio,
    before the marker): each sidecar is delivered as its own package linked by id (`<id>.sidecar1`), is
    never sealed on its own while its recording is there, and is disposed of with it. In `close` mode a
    sidecar may come after its recording was sealed: then it is an orphan, sealed on its own, never left."""
    sidecars = ["{dir}/{stem}.xml"]
    setup = _setup(tmp_path, keyring_template, [
        _watch(tmp_path, "marked", completion="marker", sidecars=sidecars),
        _watch(tmp_path, "closed", sidecars=sidecars),
    ])
    for w in setup.watches:
        Path(w["path"]).mkdir()
    agent = Agent(setup)
    agent.wait_for("ready")
    running = [producers.start("mixmonitor", tmp_path / "marked" / f"s{i}.wav", hook="marker", pause=1.0,
                               sidecar=True) for i in range(3)]
    running.append(producers.start("mixmonitor", tmp_path / "closed" / "late.wav", pause=1.0, sidecar=True))
    expected = {p.path.name: p.wait_done() for p in running}
    expected |= {p.path.stem + ".xml": hashlib.sha256(producers.sidecar_text(p.path)).hexdigest() for p in running}
    _delivered(setup, agent, expected, "recorder metadata sidecars, written in place after the audio")
    ids = {}
    for p in packages(setup.repository):
        with open(p, "rb") as f:
            meta = codec.read_header(f).metadata
        ids[meta.original_name] = meta.recording_id
    for i in range(3):
        assert ids[f"s{i}.xml"] == ids[f"s{i}.wav"] + ".sidecar1", ids
    linked = [json.loads(line)["sidecar_id"] for line in agent.lines if '"event": "sidecar-spooled"' in line]
    assert set(linked) >= {ids[f"s{i}.xml"] for i in range(3)}, linked
    assert agent.stop() == 0
