"""agent.watcher on real directories with real inotify: completion modes, temp names, symlinks,
unreadable files, is_busy and backpressure.

Hint-driven tests use rescan_seconds=NEVER, longer than any wait, so an arrival at all proves the
inotify path works (the scan at start runs once, on an empty directory): waits for what must happen end
when it does, at a generous ceiling otherwise (support.waits), so a loaded machine slows these tests
but cannot fail them. "Not picked up early" checks wait a short, fixed window and assert nothing
arrived (load can only make such a check weaker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from support.waits import CEILING, until

from mediaseal.agent.config import WatchConfig
from mediaseal.agent.metrics import REGISTRY
from mediaseal.agent.watcher import Candidate, Watcher, is_temp_name
from mediaseal.buffer.manifest import SourceIdentity

ROOT = Path(__file__).resolve().parents[1]
NEVER = 10 * CEILING  # a rescan interval no wait reaches: only inotify hints (and re-looks) find new files
RESCANS = "mediaseal_watcher_rescans_total"


@asynccontextmanager
async def watching(*watches: WatchConfig, maxsize: int = 0, rescan: float = NEVER,
                   **kw: Any) -> AsyncIterator[tuple[asyncio.Queue[Candidate], Watcher]]:
    queue: asyncio.Queue[Candidate] = asyncio.Queue(maxsize)
    stop = asyncio.Event()
    watcher = Watcher(watches, rescan_seconds=rescan, **kw)
    task = asyncio.create_task(watcher.run(queue, stop))
    try:
        yield queue, watcher
    finally:
        stop.set()
        await asyncio.wait_for(task, CEILING)  # run() returns once stop is set (a hang fails here)


async def next_candidate(queue: asyncio.Queue[Candidate], timeout: float = CEILING) -> Candidate:
    return await asyncio.wait_for(queue.get(), timeout)


async def nothing_within(queue: asyncio.Queue[Candidate], seconds: float) -> None:
    try:
        got = await asyncio.wait_for(queue.get(), seconds)
    except TimeoutError:
        return
    pytest.fail(f"unexpected candidate {got.path}")


def drop(path: Path, data: bytes = b"recording") -> Path:
    """Write as a well-behaved producer does: a .part name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.rename(path)
    return path


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_temp_names() -> None:
    assert all(map(is_temp_name, [".x", "a.part", "a.tmp", "a~", ".a.wav"]))
    assert not any(map(is_temp_name, ["a.wav", "part", "a.partial", "tmp"]))


def test_identity_of_stat(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    st = os.lstat(f)
    assert SourceIdentity.of(st) == SourceIdentity(st.st_dev, st.st_ino, 5, st.st_mtime_ns, st.st_ctime_ns)


async def test_rename_mode_picks_renamed_file_and_ignores_temp_names(tmp_path: Path) -> None:
    w = WatchConfig(tmp_path, completion="rename", pattern="*.wav")
    async with watching(w) as (queue, _):
        (tmp_path / "a.wav.part").write_bytes(b"in progress")
        (tmp_path / ".hidden.wav").write_bytes(b"x")
        (tmp_path / "b.wav.tmp").write_bytes(b"x")
        (tmp_path / "c.wav~").write_bytes(b"x")
        (tmp_path / "notes.txt").write_bytes(b"not matching the pattern")
        (tmp_path / ".cache").mkdir()
        (tmp_path / ".cache" / "d.wav").write_bytes(b"in a dot-directory")
        drop(tmp_path / "e.wav", b"done")
        got = await next_candidate(queue)
        assert got.path == tmp_path / "e.wav"
        assert (got.watch, got.identity.size, got.marker) == (w, 4, None)
        (tmp_path / "a.wav.part").write_bytes(b"still in progress")
        await nothing_within(queue, 0.5)


async def test_marker_mode_waits_for_marker(tmp_path: Path) -> None:
    async with watching(WatchConfig(tmp_path, completion="marker")) as (queue, _):
        (tmp_path / "rec.wav").write_bytes(b"complete but not marked")
        await nothing_within(queue, 0.7)
        (tmp_path / "rec.wav.done").touch()
        got = await next_candidate(queue)
        assert (got.path, got.marker) == (tmp_path / "rec.wav", tmp_path / "rec.wav.done")
        await nothing_within(queue, 0.3)  # the marker itself is never a candidate


async def test_quiet_mode_waits_for_a_slow_writer(tmp_path: Path) -> None:
    # Appends every 0.5 s against a quiet period of 2 s: a writer delayed by load still writes well within
    # it. Rescans never come (NEVER), so the candidate can only come from the quiet-period re-look.
    path = tmp_path / "slow.wav"
    async with watching(WatchConfig(tmp_path, completion="quiet", quiet_seconds=2.0)) as (queue, _):
        started = time.monotonic()
        with path.open("ab") as f:
            for _ in range(7):  # appends every 0.5 s for 3 s
                f.write(b"x" * 1000)
                f.flush()
                assert queue.empty(), "picked up while still being written"
                await asyncio.sleep(0.5)  # the writer's pace, not synchronisation
        stopped = time.monotonic()
        got = await next_candidate(queue)
        assert got.path == path
        assert got.identity.size == 7000
        assert stopped - started >= 3.0


async def test_quiet_mode_backlog_and_rename_backlog_at_start(tmp_path: Path) -> None:
    quiet_dir, rename_dir = tmp_path / "quiet", tmp_path / "rename"
    old = time.time() - 60
    for i in range(40):
        for d in (quiet_dir, rename_dir):
            f = drop(d / f"r{i:03}.wav", bytes(i))
            os.utime(f, (old, old))
    scans = metric("mediaseal_watcher_rescans_total")
    watches = (WatchConfig(quiet_dir, completion="quiet"), WatchConfig(rename_dir, completion="rename", kind="screen"))
    async with watching(*watches) as (queue, _):
        got = [await next_candidate(queue) for _ in range(80)]
        await nothing_within(queue, 0.3)  # the start-up scan emits each once
    assert sorted(c.path for c in got) == sorted([*quiet_dir.iterdir(), *rename_dir.iterdir()])
    assert {c.watch.kind for c in got if c.path.parent == rename_dir} == {"screen"}
    assert metric("mediaseal_watcher_rescans_total") == scans + 1


async def test_new_subdirectories_are_watched(tmp_path: Path) -> None:
    async with watching(WatchConfig(tmp_path, completion="rename")) as (queue, _):
        deep = tmp_path / "2024" / "06" / "01"
        deep.mkdir(parents=True)
        (deep / "early.wav").write_bytes(b"written right after mkdir")  # may race the new inotify watch
        assert (await next_candidate(queue)).path == deep / "early.wav"
        drop(deep / "later.wav")
        assert (await next_candidate(queue)).path == deep / "later.wav"


async def test_non_recursive_watch_ignores_subdirectories(tmp_path: Path) -> None:
    drop(tmp_path / "sub" / "old.wav")
    async with watching(WatchConfig(tmp_path, completion="rename", recursive=False)) as (queue, _):
        drop(tmp_path / "sub" / "new.wav")
        drop(tmp_path / "top.wav")
        assert (await next_candidate(queue)).path == tmp_path / "top.wav"
        await nothing_within(queue, 0.5)


async def test_symlinks_are_never_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    capture, outside = tmp_path / "capture", tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.wav").write_bytes(b"not ours")
    (outside / "dir" / "inner.wav").write_bytes(b"not ours either")
    capture.mkdir()
    (capture / "link.wav").symlink_to(outside / "secret.wav")
    (capture / "linkdir").symlink_to(outside / "dir")
    caplog.set_level(logging.WARNING, "mediaseal.watcher")
    scans = metric(RESCANS)
    async with watching(WatchConfig(capture, completion="rename"), rescan=0.2) as (queue, _):
        drop(capture / "real.wav")
        seen: set[Path] = set()

        async def collect() -> None:
            while True:
                seen.add((await queue.get()).path)

        collector = asyncio.create_task(collect())
        try:  # several full scans, each meeting both links, after the real file was found
            await until(lambda: capture / "real.wav" in seen and metric(RESCANS) >= scans + 5,
                        what="real.wav and five full scans", detail=lambda: (seen, metric(RESCANS) - scans))
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
    assert seen == {capture / "real.wav"}  # (re-emitted by each scan: the pipeline dedups)
    skips = [r.fields for r in caplog.records if r.getMessage() == "skipped"]  # type: ignore[attr-defined]
    assert sorted(skips, key=str) == [{"path": str(capture / name), "reason": "symbolic link, not followed"}
                                      for name in ("link.wav", "linkdir")]  # each logged once


async def test_move_to_inside_capture_dir_is_skipped(tmp_path: Path) -> None:
    w = WatchConfig(tmp_path, completion="rename", dispose="move", move_to=tmp_path / "done")
    drop(tmp_path / "done" / "moved.wav")
    async with watching(w) as (queue, _):
        drop(tmp_path / "done" / "moved-later.wav")
        drop(tmp_path / "new.wav")
        assert (await next_candidate(queue)).path == tmp_path / "new.wav"
        await nothing_within(queue, 0.5)


async def test_is_busy_is_respected(tmp_path: Path) -> None:
    busy = {tmp_path / "a.wav"}
    async with watching(WatchConfig(tmp_path, completion="rename"), is_busy=busy.__contains__) as (queue, watcher):
        drop(tmp_path / "a.wav")
        drop(tmp_path / "b.wav")
        assert (await next_candidate(queue)).path == tmp_path / "b.wav"
        await nothing_within(queue, 0.3)
        busy.clear()
        watcher.rescan_now()  # both are still there and not busy: both come again
        assert {(await next_candidate(queue)).path for _ in range(2)} == {tmp_path / "a.wav", tmp_path / "b.wav"}


async def test_backpressure_with_a_full_queue(tmp_path: Path) -> None:
    for i in range(5):
        drop(tmp_path / f"r{i}.wav")
    async with watching(WatchConfig(tmp_path, completion="rename"), maxsize=1) as (queue, _):
        got = []
        for _ in range(5):
            got.append((await next_candidate(queue)).path)
            assert queue.qsize() <= 1
            await asyncio.sleep(0.05)  # a slow consumer
        await nothing_within(queue, 0.3)
    assert sorted(got) == sorted(tmp_path.iterdir())


async def test_backlog_of_10000_files_with_flat_memory(tmp_path: Path) -> None:
    for i in range(100):
        sub = tmp_path / f"d{i:02}"
        sub.mkdir()
        for j in range(100):
            (sub / f"r{j:02}.wav").touch()
    tracemalloc.start()
    try:
        async with watching(WatchConfig(tmp_path, completion="quiet", quiet_seconds=0), maxsize=8) as (queue, _):
            count, baseline = 0, 0
            while count < 10_000:
                await next_candidate(queue)
                count += 1
                if count == 500:  # after start-up allocations (thread, inotify, first batches)
                    tracemalloc.reset_peak()
                    baseline = tracemalloc.get_traced_memory()[0]
            peak = tracemalloc.get_traced_memory()[1]
            await nothing_within(queue, 0.2)
    finally:
        tracemalloc.stop()
    print(f"peak growth {(peak - baseline) >> 10} KiB")
    assert peak - baseline < 1 << 20, f"scan grew by {(peak - baseline) >> 10} KiB for 10,000 files"


async def test_missing_capture_directory_is_reported_and_retried(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    capture = tmp_path / "capture"
    caplog.set_level(logging.WARNING, "mediaseal.watcher")
    async with watching(WatchConfig(capture, completion="rename"), rescan=0.2) as (queue, _):
        await nothing_within(queue, 0.5)
        drop(capture / "first.wav")
        assert (await next_candidate(queue)).path == capture / "first.wav"
    missing = [r for r in caplog.records if r.getMessage() == "capture-dir-missing"]
    assert len(missing) == 1


UNREADABLE_SCRIPT = textwrap.dedent("""
    import asyncio, json, logging, os, tempfile, time
    from pathlib import Path
    from mediaseal.agent.config import WatchConfig
    from mediaseal.agent.metrics import REGISTRY
    from mediaseal.agent.watcher import Watcher

    def count(name):
        return REGISTRY.get_sample_value(name) or 0.0

    async def main():
        records = []
        handler = logging.Handler()
        handler.emit = lambda r: records.append(r.getMessage() + " " + json.dumps(getattr(r, "fields", {})))
        logging.getLogger("mediaseal.watcher").addHandler(handler)
        d = Path(tempfile.mkdtemp())
        locked = d / "locked.wav"
        locked.write_bytes(b"x")
        locked.chmod(0)
        now = [time.time()]
        queue, stop = asyncio.Queue(), asyncio.Event()
        watcher = Watcher([WatchConfig(d, completion="rename")], rescan_seconds=0.05, clock=lambda: now[0])
        task = asyncio.create_task(watcher.run(queue, stop))
        while count("mediaseal_watcher_rescans_total") < 10:  # many scans meet the unreadable file
            await asyncio.sleep(0.05)
        for step in (30, 31):  # unchanged: looked at again after a minute, still locked, not re-reported
            now[0] += step
            scans = count("mediaseal_watcher_rescans_total")
            while count("mediaseal_watcher_rescans_total") < scans + 5:
                await asyncio.sleep(0.05)
        early = queue.qsize()
        locked.chmod(0o644)  # the fix moves the ctime: the next look (hint or scan) takes it, within the minute
        got = await asyncio.wait_for(queue.get(), 120)  # a ceiling (support.waits.CEILING), not a bound
        stop.set()
        await task
        locked.unlink()
        d.rmdir()
        unreadable = count("mediaseal_watcher_unreadable_total")
        print(json.dumps({"early": early, "got": got.path.name, "unreadable": unreadable,
                          "logged": [m for m in records if m.startswith("unreadable")]}))

    asyncio.run(main())
""")


def test_unreadable_file_is_reported_once_and_retried_slowly() -> None:
    # Real EACCES: chmod 000 does not stop root, so as root the child runs without the two
    # capabilities that let root ignore permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
    argv = [sys.executable, "-c", UNREADABLE_SCRIPT]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux setpriv (to drop CAP_DAC_OVERRIDE) is not installed")
        argv = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CEILING, check=False)
    if "setpriv" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["early"] == 0  # never emitted while unreadable
    assert result["got"] == "locked.wav"  # picked up at the next look once made readable (chmod: ctime moved)
    assert result["unreadable"] == 1  # counted once over 15 scans
    assert len(result["logged"]) == 1
    assert "Permission denied" in result["logged"][0]


async def test_stop_returns_promptly_while_blocked_on_a_full_queue(tmp_path: Path) -> None:
    for i in range(3):
        drop(tmp_path / f"r{i}.wav")
    queue: asyncio.Queue[Candidate] = asyncio.Queue(1)
    stop = asyncio.Event()
    watcher = Watcher([WatchConfig(tmp_path, completion="rename")], rescan_seconds=NEVER)
    task = asyncio.create_task(watcher.run(queue, stop))
    await until(queue.full, what="the watcher blocked on a full queue")
    stop.set()
    await asyncio.wait_for(task, CEILING)  # blocked on put() with nobody taking: only stop can end it


# -- issue 14: open writers, completion = "close", temp_patterns, marker templates -------------------------


async def test_close_mode_waits_for_the_last_writer_to_close(tmp_path: Path) -> None:
    """Written in place with a pause while open: a candidate only once closed, at its final size, soon after
    the close (rescan 30 s: the close event did it)."""
    path = tmp_path / "inplace.wav"
    async with watching(WatchConfig(tmp_path, completion="close", quiet_seconds=0.5)) as (queue, _):
        with path.open("wb") as f:
            f.write(b"a" * 100_000)
            f.flush()
            await nothing_within(queue, 1.5)  # open and silent: not complete
            f.write(b"b" * 100_000)
        closed = time.monotonic()
        got = await next_candidate(queue)
        assert (got.path, got.identity.size) == (path, 200_000)
        assert time.monotonic() - closed < 3.0


@pytest.mark.parametrize("completion", ["quiet", "rename"])
async def test_a_file_open_for_writing_is_never_a_candidate(tmp_path: Path, completion: str) -> None:
    """Issue 14, observations 1 and 2 at the watcher: quiet time passed, or a final name, but still open."""
    path = tmp_path / "held.wav"
    async with watching(WatchConfig(tmp_path, completion=completion, quiet_seconds=0.3)) as (queue, _):
        f = path.open("wb")
        try:
            f.write(b"x" * 1000)
            f.flush()
            await nothing_within(queue, 1.5)
            f.write(b"y" * 1000)
        finally:
            f.close()
        got = await next_candidate(queue)
        assert (got.path, got.identity.size) == (path, 2000)


async def test_temp_patterns_are_per_watch(tmp_path: Path) -> None:
    w = WatchConfig(tmp_path, completion="rename", temp_patterns=("*.inprogress",))
    async with watching(w) as (queue, _):
        (tmp_path / "a.wav.inprogress").write_bytes(b"x")
        await nothing_within(queue, 0.5)
        (tmp_path / "a.wav.inprogress").rename(tmp_path / "a.wav")
        assert (await next_candidate(queue)).path == tmp_path / "a.wav"
        (tmp_path / "b.part").write_bytes(b"no longer a temp name here")
        assert (await next_candidate(queue)).path == tmp_path / "b.part"


async def test_marker_template_in_another_directory(tmp_path: Path) -> None:
    """rtpengine's pcap mode: pcaps/<call>.pcap is complete once metadata/<call>.txt exists."""
    pcaps, meta = tmp_path / "pcaps", tmp_path / "metadata"
    pcaps.mkdir()
    meta.mkdir()
    w = WatchConfig(pcaps, completion="marker", marker="{dir}/../metadata/{stem}.txt")
    async with watching(w) as (queue, _):
        (pcaps / "call.pcap").write_bytes(b"pcap")
        await nothing_within(queue, 1.0)
        (meta / ".call.txt.tmp").write_text("call-id: call\n")
        (meta / ".call.txt.tmp").rename(meta / "call.txt")
        got = await next_candidate(queue)
        assert (got.path, got.marker) == (pcaps / "call.pcap", meta / "call.txt")


HOLDER = "import sys, time; f = open(sys.argv[1], sys.argv[2]); print('open', flush=True); time.sleep(60)"


@pytest.mark.parametrize("mode", ["ab", "r+b", "rb"])
def test_open_writers_sees_another_process(tmp_path: Path, mode: str) -> None:
    from mediaseal.agent.writers import Writers, open_writers, proc_scan

    path = tmp_path / "f.wav"
    path.write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        want = Writers.NONE if mode == "rb" else Writers.OPEN
        assert (open_writers(path), proc_scan(path)) == (want, want)
    finally:
        holder.kill()
        holder.wait()
    assert (open_writers(path), proc_scan(path)) == (Writers.NONE, Writers.NONE)


def test_probe_says_the_check_works_here(tmp_path: Path) -> None:
    from mediaseal.agent.writers import probe

    reason = probe(tmp_path)  # a local filesystem: leases work; without root, CAP_LEASE is missing
    assert reason is None if os.geteuid() == 0 else "CAP_LEASE" in (reason or "")
    assert os.listdir(tmp_path) == []
    assert probe(tmp_path / "missing") is not None


def test_the_new_watch_keys_parse_and_are_checked(tmp_path: Path) -> None:
    from mediaseal.agent.config import ConfigError, load_config

    def load(extra: str, env: dict[str, str] | None = None) -> WatchConfig:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"[[watch]]\npath = '/w'\n{extra}\n[buffer]\npath = '/b'\n[keys]\nkeyring = '/k'\n"
                       "[repository]\nurl = 'file:///r'\n")
        return load_config(cfg, env or {}).watch[0]

    w = load("")
    assert (w.completion, w.temp_patterns, w.marker) == ("close", (".*", "*.part", "*.tmp", "*~"), None)
    assert load("temp_patterns = ['*.inprogress']").temp_patterns == ("*.inprogress",)
    assert load("", {"MEDIASEAL_WATCH__0__TEMP_PATTERNS": '["a*"]'}).temp_patterns == ("a*",)
    assert load("completion = 'marker'\nmarker = '{dir}/../metadata/{stem}.txt'").marker is not None
    assert load("sidecars = ['{dir}/{stem}.xml', '{path}.meta']").sidecars == ("{dir}/{stem}.xml", "{path}.meta")
    for bad, message in [
        ("temp_patterns = '*.part'", "watch[0].temp_patterns: expected an array of non-empty strings"),
        ("completion = 'marker'\nmarker = '{dir}/x'", "watch[0].marker: must be a path template naming"),
        ("completion = 'marker'\nmarker = '{path}'", "watch[0].marker: must be a path template naming"),
        ("completion = 'marker'\nmarker = '{nope}.txt'", "watch[0].marker: must be a path template naming"),
        ("marker = '{path}.done'", 'watch[0].marker: only used with completion = "marker"'),
        ("sidecars = ['{dir}/x.xml']", "watch[0].sidecars[0]: must name a file beside the recording"),
        ("sidecars = ['{path}']", "watch[0].sidecars[0]: must name a file beside the recording"),
        ("sidecars = ['{dir}/../meta/{stem}.xml']", "watch[0].sidecars[0]: must name a file beside the recording"),
        ("sidecars = ['{dir}/{stem}.xml', '{dir}/{stem}.xml']", "watch[0].sidecars: at most 8, each once"),
        ("completion = 'marker'\nsidecars = ['{path}.done']", "watch[0].sidecars[0]: must name a file beside"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(bad)


async def test_the_agents_own_names_are_never_candidates_whatever_temp_patterns_say(tmp_path: Path) -> None:
    w = WatchConfig(tmp_path, completion="rename", temp_patterns=("*.part",))
    async with watching(w) as (queue, _):
        (tmp_path / ".mediaseal-20261204T000000Z-abc.disposing").write_bytes(b"being disposed of")
        await nothing_within(queue, 0.5)
        drop(tmp_path / ".visible-here.wav")  # a dotfile is a recording under these patterns
        assert (await next_candidate(queue)).path == tmp_path / ".visible-here.wav"


async def test_sidecars_wait_for_their_recording_and_orphans_are_candidates(tmp_path: Path) -> None:
    """A sidecar beside its recording is never a candidate of its own (it is sealed with the recording);
    a recording whose sidecar is still open for writing waits for it; a sidecar whose recording is gone
    is an orphan, a candidate like any recording (never left behind in plaintext)."""
    from mediaseal.agent.watcher import has_recording, is_sidecar_name

    w = WatchConfig(tmp_path, completion="rename", sidecars=("{dir}/{stem}.xml", "{path}.meta"))
    assert [is_sidecar_name(w, n) for n in ("a.xml", "a.wav.meta", "a.wav", "xml")] == [True, True, False, False]
    (tmp_path / "b.wav").write_bytes(b"audio")
    (tmp_path / "b.xml").write_bytes(b"<x/>")
    (tmp_path / "b.wav.meta").write_bytes(b"m")
    assert has_recording(w, tmp_path / "b.xml") and has_recording(w, tmp_path / "b.wav.meta")
    assert not has_recording(w, tmp_path / "c.xml")
    for p in tmp_path.iterdir():
        p.unlink()
    async with watching(w) as (queue, _):
        with open(tmp_path / "r.xml", "wb") as meta:  # the recorder still writes the metadata
            meta.write(b"<recording>")
            meta.flush()
            drop(tmp_path / "r.wav")
            await nothing_within(queue, 1.5)  # neither the recording (its sidecar is open) nor the sidecar
        got = await next_candidate(queue)
        assert got.path == tmp_path / "r.wav"
        await nothing_within(queue, 1.5)  # r.xml goes with r.wav
        (tmp_path / "r.wav").unlink()
        drop(tmp_path / "orphan.xml")
        got = await next_candidate(queue)
        assert got.path == tmp_path / "orphan.xml"
