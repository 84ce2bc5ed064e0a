"""The spool's invariants, grouped as Vector's disk buffer tests are: recovery, transitions (the state
machine the spool owns), crashes (a real process killed between each write and its side effect, then
recovered from the files it left), size limits, and known errors. Real files throughout; nothing of
ours is patched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mediaseal.buffer import spool as spool_module
from mediaseal.buffer.manifest import Manifest, ManifestState, SourceIdentity
from mediaseal.buffer.spool import SPOOLED, UPLOADING, VERIFIED, Spool, SpoolError, TransitionError
from mediaseal.plumbing import durable

DATA = b"ciphertext" * 100


def new_spool(root: Path, max_bytes: int = 1 << 30) -> Spool:
    return Spool(root, max_bytes, min_free_bytes=0)


def source_file(tmp_path: Path, rid: str) -> Path:
    capture = tmp_path / "capture"
    capture.mkdir(exist_ok=True)
    src = capture / f"{rid}.wav"
    src.write_bytes(b"plain")
    return src


def manifest(rid: str, source: Path | None = None, size: int = len(DATA)) -> Manifest:
    identity = {} if source is None else SourceIdentity.of(source.stat()).to_dict()
    return Manifest(recording_id=rid, kind="call", repo_key=f"call/2026/11/28/{rid}.mseal", package_size=size,
                    sha256=None, kid="k", source=str(source or f"/capture/{rid}.wav"), identity=identity,
                    dispose="delete")


def committed(spool: Spool, rid: str, source: Path | None = None, data: bytes = DATA) -> Manifest:
    m = manifest(rid, source, len(data))
    reservation = spool.reserve(len(data))
    assert reservation is not None
    with spool.staging(rid) as (f, path):
        f.write(data)
    return spool.commit(path, m, reservation)


def on_disk(root: Path, rid: str) -> dict[str, Any]:
    return dict(json.loads((root / "packages" / f"{rid}.json").read_bytes()))


def files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "packages").iterdir())


# -- recovery ------------------------------------------------------------------------------------------


class TestRecovery:
    def test_staging_leftovers_are_removed(self, tmp_path: Path) -> None:
        """A staging file is unfinished work (its source is still in place): recovery removes it."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        (root / "staging" / "r1.mseal.part").write_bytes(b"half")
        assert spool.recover() == []
        assert list((root / "staging").iterdir()) == []

    def test_package_without_manifest_is_uncommitted(self, tmp_path: Path) -> None:
        """The manifest is what commits a package: one without (a crash between the two renames, or a
        replayable release that removed the manifest first) is removed, the others are kept."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        before, after = committed(spool, "before"), committed(spool, "after")
        assert before.state == after.state == SPOOLED
        os.unlink(root / "packages" / "after.json")
        again = new_spool(root)
        assert again.recover() == ["before"]
        assert files(root) == ["before.json", "before.mseal"]
        assert again.package_count == 1

    def test_manifest_without_package_and_source_unchanged_is_uncommitted(self, tmp_path: Path) -> None:
        """commit renames the package, then the manifest, then fsyncs once. Had only the manifest's rename
        reached the disk, its source is still there unchanged (disposal waits for that fsync): recovery
        drops the manifest, so the source is sealed again rather than disposed with no package. With the
        source gone, the manifest stays as evidence (a package lost some other way), loudly."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        for rid in ("interrupted", "lost"):
            committed(spool, rid, source_file(tmp_path, rid))
        # "interrupted": the package's rename never reached the disk; "lost": disposed, then its package removed.
        os.rename(root / "packages" / "interrupted.mseal", root / "staging" / "interrupted.mseal.part")
        (root / "packages" / "lost.mseal").unlink()
        (tmp_path / "capture" / "lost.wav").unlink()
        assert new_spool(root).recover() == []
        assert files(root) == ["lost.json"]
        assert (tmp_path / "capture" / "interrupted.wav").read_bytes() == b"plain"  # sealed again from here

    def test_manifest_without_package_and_source_changed_is_kept(self, tmp_path: Path) -> None:
        """"Unchanged" is SourceIdentity.same_file: a source rewritten since (another size) is not the one
        sealed, so the manifest is not taken as uncommitted."""
        root = tmp_path / "spool"
        src = source_file(tmp_path, "r1")
        committed(new_spool(root), "r1", src)
        (root / "packages" / "r1.mseal").unlink()
        src.write_bytes(b"a longer recording")
        assert new_spool(root).recover() == []
        assert files(root) == ["r1.json"]

    def test_verified_manifest_without_package_is_finished(self, tmp_path: Path) -> None:
        """A release stopped between the package's removal and the manifest's is finished by recovery."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        spool.record_verified(committed(spool, "r1"))
        (root / "packages" / "r1.mseal").unlink()
        assert new_spool(root).recover() == []
        assert files(root) == []

    def test_recovery_counts_what_it_keeps_and_drops_temp_files(self, tmp_path: Path) -> None:
        """Capacity after a restart is the sum of the committed packages; a manifest's temp file (a write
        the crash interrupted) is not a manifest and is removed."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        committed(spool, "a")
        committed(spool, "b", data=b"x" * 5000)
        (root / "packages" / ".c.json.0123abcd.tmp").write_bytes(b"{torn")
        again = new_spool(root)
        assert again.recover() == ["a", "b"]
        assert (again.used_bytes, again.package_count) == (len(DATA) + 5000, 2)
        assert files(root) == ["a.json", "a.mseal", "b.json", "b.mseal"]


# -- transitions: the state machine the spool owns -----------------------------------------------------


class TestTransitions:
    def test_each_transition_is_on_disk_when_it_returns(self, tmp_path: Path) -> None:
        """spooled -> (digest) -> uploading -> (failure) -> verified -> released, each written before the
        method returns (the caller acts on it next), the in-memory manifest agreeing with the file."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        m = committed(spool, "r1")
        assert on_disk(root, "r1")["state"] == "spooled"
        spool.record_digest(m, "ab" * 32)
        assert on_disk(root, "r1")["sha256"] == "ab" * 32
        spool.record_upload(m, {"upload_id": "u1", "parts": [{"n": 1}]})
        assert (on_disk(root, "r1")["state"], on_disk(root, "r1")["upload"]) == ("uploading", m.upload)
        spool.record_failure(m, "timeout")
        assert (on_disk(root, "r1")["attempts"], on_disk(root, "r1")["last_error"]) == (1, "timeout")
        spool.record_verified(m)
        assert on_disk(root, "r1")["state"] == "verified" == m.state
        assert spool.load("r1") == m
        spool.release(m)
        assert files(root) == [] and (spool.used_bytes, spool.package_count) == (0, 0)

    @pytest.mark.parametrize("durable", [True, False])
    def test_release_removes_package_and_manifest(self, tmp_path: Path, durable: bool) -> None:
        """Only a verified package leaves; verified in memory only (a replayable delivery) it leaves too,
        the manifest on disk never having said verified."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        m = committed(spool, "r1")
        with pytest.raises(TransitionError, match="only a verified package"):
            spool.release(m)
        spool.record_verified(m, durable=durable)
        assert on_disk(root, "r1")["state"] == ("verified" if durable else "spooled")
        spool.release(m)
        assert files(root) == []
        assert (spool.used_bytes, spool.package_count) == (0, 0)

    @pytest.mark.parametrize("state", [SPOOLED, UPLOADING])
    def test_release_before_verified_is_refused(self, tmp_path: Path, state: ManifestState) -> None:
        """A package the repository has not confirmed never leaves the spool, whatever the caller asks."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        m = committed(spool, "r1")
        if state == UPLOADING:
            spool.record_upload(m, {})
        before = (root / "packages" / "r1.json").read_bytes()
        with pytest.raises(TransitionError):
            spool.release(m)
        assert files(root) == ["r1.json", "r1.mseal"] and (root / "packages" / "r1.json").read_bytes() == before

    @pytest.mark.parametrize("transition", ["digest", "upload", "failure", "verified"])
    def test_nothing_follows_verified_but_release(self, tmp_path: Path, transition: str) -> None:
        """Once verified, no delivery transition applies: refused before anything is written."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        m = committed(spool, "r1")
        spool.record_verified(m)
        before = (root / "packages" / "r1.json").read_bytes()
        attempt = {"digest": lambda: spool.record_digest(m, "00" * 32), "upload": lambda: spool.record_upload(m, {}),
                   "failure": lambda: spool.record_failure(m, "x"), "verified": lambda: spool.record_verified(m)}
        with pytest.raises(TransitionError, match="in state verified"):
            attempt[transition]()
        assert (root / "packages" / "r1.json").read_bytes() == before and m.state == VERIFIED

    def test_a_recorded_digest_never_changes(self, tmp_path: Path) -> None:
        """Every attempt and every replay is checked against the digest recorded before the first byte."""
        spool = new_spool(tmp_path / "spool")
        m = committed(spool, "r1")
        spool.record_digest(m, "ab" * 32)
        with pytest.raises(TransitionError, match="recorded already"):
            spool.record_digest(m, "cd" * 32)
        assert spool.load("r1").sha256 == "ab" * 32  # type: ignore[union-attr]

    def test_commit_is_for_new_recordings_only(self, tmp_path: Path) -> None:
        """A second commit of a recording (or of a manifest not in SPOOLED) would overwrite its durable
        state: refused, and the staged file is left for the caller's cleanup."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        first = committed(spool, "r1")
        spool.record_upload(first, {"upload_id": "u1"})
        with spool.staging("r1") as (f, path):
            f.write(DATA)
        reservation = spool.reserve(len(DATA))
        assert reservation is not None
        with pytest.raises(TransitionError, match="new recording"):
            spool.commit(path, manifest("r1"), reservation)
        fresh = manifest("r2")
        fresh.state = VERIFIED
        with pytest.raises(TransitionError, match="new recording"):
            spool.commit(path, fresh, reservation)
        assert on_disk(root, "r1")["upload"] == {"upload_id": "u1"} and path.exists()


# -- crashes: a real process killed between a write and its side effect --------------------------------

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from mediaseal.buffer.manifest import Manifest
    from mediaseal.buffer.spool import Spool

    args = json.loads(sys.argv[1])
    kill_at = args["kill_at"]

    def die(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    spool = Spool(Path(args["root"]), 1 << 30, min_free_bytes=0, on_step=die)
    m = Manifest.from_json(args["manifest"].encode())
    for op in args["ops"]:
        if op == "commit":
            r = spool.reserve(m.package_size)
            with spool.staging(m.recording_id) as (f, path):
                f.write(b"c" * m.package_size)
            spool.commit(path, m, r)
        elif op == "digest":
            spool.record_digest(m, "ab" * 32)
        elif op == "upload":
            spool.record_upload(m, {"upload_id": "u1", "parts": [{"n": 1, "etag": "e"}]})
        elif op == "failure":
            spool.record_failure(m, "503 SlowDown")
        elif op == "verified":
            spool.record_verified(m)
        elif op == "verified-replayable":
            spool.record_verified(m, durable=False)
        elif op == "release":
            spool.release(m)
        elif op == "stage-and-die":
            with spool.staging(m.recording_id) as (f, path):
                f.write(b"c" * m.package_size)
                os.kill(os.getpid(), signal.SIGKILL)
        elif op == "kept":
            spool.mark_kept(m.recording_id)
        die("after:" + op)
    sys.exit(0)
""")

DELIVERY = ["commit", "digest", "upload", "failure"]

# (operations the child runs, where it is killed, the pending list recovery returns, what the manifest says)
CRASHES: dict[str, tuple[list[str], str, list[str], dict[str, Any] | None]] = {
    "after-commit": (["commit"], "after:commit", ["r1"], {"state": "spooled", "sha256": None}),
    "mid-commit": (["commit"], "mid-commit", [], None),
    "after-digest": (["commit", "digest"], "after:digest", ["r1"], {"state": "spooled", "sha256": "ab" * 32}),
    "after-upload": (DELIVERY[:3], "after:upload", ["r1"], {"state": "uploading", "upload": {
        "upload_id": "u1", "parts": [{"n": 1, "etag": "e"}]}}),
    "after-failure": (DELIVERY, "after:failure", ["r1"], {"state": "uploading", "attempts": 1,
                                                         "last_error": "503 SlowDown"}),
    "after-verified": ([*DELIVERY, "verified"], "after:verified", ["r1"], {"state": "verified"}),
    "mid-release": ([*DELIVERY, "verified", "release"], "mid-release", [], None),
    "after-verified-replayable": ([*DELIVERY, "verified-replayable"], "after:verified-replayable", ["r1"],
                                  {"state": "uploading"}),
    "mid-release-replayable": ([*DELIVERY, "verified-replayable", "release"], "mid-release", [], None),
    "after-release": ([*DELIVERY, "verified", "release"], "after:release", [], None),
}


def killed_child(root: Path, m: Manifest, ops: list[str], kill_at: str) -> None:
    arg = json.dumps({"root": str(root), "manifest": m.to_json().decode(), "ops": ops, "kill_at": kill_at})
    r = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr


class TestCrashes:
    @pytest.mark.parametrize("case", list(CRASHES))
    def test_a_kill_after_each_write_recovers_to_that_state(self, tmp_path: Path, case: str) -> None:
        """Whatever instant the process dies at, recovery finds the last transition that returned, whole
        (or, inside commit and release, finishes or undoes the half-done one), and the recording can go
        on from there: delivered and released, or sealed again from its source, which is still there."""
        ops, kill_at, pending, expect = CRASHES[case]
        root = tmp_path / "spool"
        src = source_file(tmp_path, "r1")
        killed_child(root, manifest("r1", src), ops, kill_at)
        spool = new_spool(root)
        assert spool.recover() == pending
        assert list((root / "staging").iterdir()) == []
        if expect is None:
            assert files(root) == []
            assert spool.package_count == 0
            return
        assert files(root) == ["r1.json", "r1.mseal"]
        assert {k: on_disk(root, "r1")[k] for k in expect} == expect
        assert (spool.used_bytes, spool.package_count) == (len(DATA), 1)
        m = spool.load("r1")
        assert m is not None
        if m.state != VERIFIED:  # the delivery resumes from here
            spool.record_verified(m)
        spool.release(m)
        assert files(root) == [] and src.exists()

    def test_a_kill_in_the_middle_of_staging_leaves_only_a_leftover(self, tmp_path: Path) -> None:
        """Sealing killed before commit: the staging file is removed at recovery, nothing is committed."""
        root = tmp_path / "spool"
        killed_child(root, manifest("r1"), ["stage-and-die"], "")
        assert (root / "staging" / "r1.mseal.part").exists()  # the kill skipped the block's cleanup
        assert new_spool(root).recover() == [] and list((root / "staging").iterdir()) == []
        assert files(root) == []

    def test_a_kill_after_mark_kept_remembers_it(self, tmp_path: Path) -> None:
        """A source disposed with "keep" is marked before the package may go: after a kill it stays kept."""
        root = tmp_path / "spool"
        killed_child(root, manifest("r1"), ["commit", "kept"], "after:kept")
        spool = new_spool(root)
        assert spool.recover() == ["r1"] and spool.is_kept("r1")


# -- size limits ---------------------------------------------------------------------------------------


class TestSizeLimits:
    def test_reservations_never_exceed_max_bytes(self, tmp_path: Path) -> None:
        """Capacity = committed packages + reservations of recordings being sealed, never past max_bytes;
        a cancelled reservation (a seal that failed) gives its bytes back, once."""
        spool = new_spool(tmp_path / "spool", max_bytes=1000)
        a = spool.reserve(600)
        assert a is not None and spool.reserve(500) is None
        spool.cancel(a)
        spool.cancel(a)
        assert spool.used_bytes == 0 and spool.reserve(1000) is not None

    def test_commit_turns_a_reservation_into_committed_bytes(self, tmp_path: Path) -> None:
        """The estimate reserved is replaced by the package's real size at commit; release frees it."""
        spool = new_spool(tmp_path / "spool", max_bytes=10_000)
        reservation = spool.reserve(5000)
        assert reservation is not None
        with spool.staging("r1") as (f, path):
            f.write(DATA)
        m = spool.commit(path, manifest("r1"), reservation)
        assert (spool.used_bytes, spool.package_count) == (len(DATA), 1)
        spool.cancel(reservation)  # the intake's `finally`: a no-op after commit
        assert spool.used_bytes == len(DATA)
        spool.record_verified(m, durable=False)
        spool.release(m)
        assert (spool.used_bytes, spool.package_count) == (0, 0)

    def test_the_filesystem_keeps_min_free_bytes(self, tmp_path: Path) -> None:
        """Below max_bytes the spool still refuses to fill its filesystem past min_free_bytes."""
        st = os.statvfs(tmp_path)
        spool = Spool(tmp_path / "spool", 1 << 62, min_free_bytes=st.f_bavail * st.f_frsize)
        assert spool.reserve(1 << 20) is None

    def test_fits_ever(self, tmp_path: Path) -> None:
        """A recording larger than the whole spool is told apart from one that must wait for room."""
        spool = new_spool(tmp_path / "spool", max_bytes=1000)
        assert spool.fits_ever(1000) and not spool.fits_ever(1001)


# -- writes ----------------------------------------------------------------------------------------------


class TestWrites:
    def test_staging_file_starts_writeback_and_keeps_every_byte(self, tmp_path: Path) -> None:
        """Writes past WRITEBACK_STEP ask the kernel to start writing (Linux); the bytes are the same."""
        spool = new_spool(tmp_path / "spool")
        data = os.urandom(spool_module.WRITEBACK_STEP * 2 + 12345)
        with spool.staging("big") as (f, path):
            for i in range(0, len(data), 1 << 20):
                assert f.write(memoryview(data)[i:i + (1 << 20)]) == min(1 << 20, len(data) - i)
            assert f._started == spool_module.WRITEBACK_STEP * 2  # two ranges handed to the kernel
        assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o600
        assert (spool_module._sync_file_range is not None) == os.uname().sysname.startswith("Linux")

    def test_a_failed_seal_leaves_no_staging_file(self, tmp_path: Path) -> None:
        """The staging block failing (source changed, agent stopping) removes its file at once."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        def failing_seal() -> None:
            with spool.staging("r1") as (f, _path):
                f.write(b"partial")
                raise RuntimeError("source changed")

        with pytest.raises(RuntimeError):
            failing_seal()
        assert list((root / "staging").iterdir()) == []

    def test_everything_is_private(self, tmp_path: Path) -> None:
        """Directories 0700, packages and manifests 0600: the spool is readable by the agent only."""
        root = tmp_path / "spool"
        spool = new_spool(root)
        spool.record_upload(committed(spool, "r1"), {})
        for d in (root, root / "staging", root / "packages", root / "kept"):
            assert d.stat().st_mode & 0o777 == 0o700
        for p in (root / "packages").iterdir():
            assert p.stat().st_mode & 0o777 == 0o600


# -- known errors ----------------------------------------------------------------------------------------


class TestKnownErrors:
    def test_one_durability_error(self) -> None:
        """A failed fsync anywhere is plumbing's DurabilityError (the one the agent maps to exit 3), not a
        SpoolError a caller might handle and go on from."""
        assert spool_module.DurabilityError is durable.DurabilityError
        assert not issubclass(durable.DurabilityError, SpoolError)

    def test_a_transition_error_is_a_spool_error(self) -> None:
        """Refused transitions are named, and caught with the spool's other refusals."""
        assert issubclass(TransitionError, SpoolError)

    @pytest.mark.parametrize(("field", "value"), [("state", "shipped"), ("dispose", "shred")])
    def test_a_manifest_outside_the_closed_sets_does_not_parse(self, field: str, value: str) -> None:
        """States and dispose modes are closed: a manifest naming another is never acted on."""
        doc = json.loads(manifest("r1").to_json())
        doc[field] = value
        with pytest.raises(ValueError):
            Manifest.from_json(json.dumps(doc).encode())

    def test_a_manifest_round_trips_with_its_state_as_enum(self) -> None:
        """What is written is read back equal, the state as ManifestState; unknown keys are ignored."""
        m = manifest("r1")
        m.state = UPLOADING
        doc = json.loads(m.to_json())
        assert doc["state"] == "uploading"
        back = Manifest.from_json(json.dumps({**doc, "from_a_newer_agent": 1}).encode())
        assert back == m and back.state is UPLOADING


# -- undisposed records: a source its disposal could not remove outlives its package ----------------------


def test_a_failed_disposal_is_remembered_past_release_and_across_reopen(tmp_path: Path) -> None:
    """The package still leaves only after VERIFIED; the record stays until the disposal succeeds, so
    the source is neither sealed again (`is_kept`) nor forgotten (`undisposed`), even after a restart."""
    root = tmp_path / "spool"
    spool = new_spool(root)
    m = committed(spool, "r1", source_file(tmp_path, "r1"))
    assert not spool.is_kept("r1") and spool.undisposed() == []
    assert spool.record_dispose_failed(m, "permission-denied") is True
    assert spool.record_dispose_failed(m, "permission-denied") is False  # remembered: nothing written
    spool.record_verified(m)
    spool.release(m)
    assert spool.load("r1") is None and not spool.package_path("r1").exists()
    again = new_spool(root)
    assert again.recover() == []
    assert again.is_kept("r1") and again.undisposed_count == 1
    (held,) = again.undisposed()
    assert (held.recording_id, held.source, held.identity) == (m.recording_id, m.source, m.identity)
    assert held.last_error == "dispose: permission-denied"
    assert oct((root / "undisposed" / "r1.json").stat().st_mode & 0o777) == "0o600"
    again.record_disposed("r1")
    assert not again.is_kept("r1") and again.undisposed() == [] and not (root / "undisposed" / "r1.json").exists()
    assert new_spool(root).undisposed_count == 0


def test_record_disposed_costs_nothing_when_no_disposal_failed(tmp_path: Path) -> None:
    """The hot path calls it after every disposal: no file, no fsync, unless a failure was recorded."""
    root = tmp_path / "spool"
    spool = new_spool(root)
    committed(spool, "r1")
    before = os.stat(root / "undisposed").st_mtime_ns
    spool.record_disposed("r1")
    assert os.listdir(root / "undisposed") == [] and os.stat(root / "undisposed").st_mtime_ns == before


def test_recover_removes_a_torn_undisposed_record_temp(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    new_spool(root)
    (root / "undisposed" / ".r9.json.1234.tmp").write_bytes(b"{")
    spool = new_spool(root)
    spool.recover()
    assert os.listdir(root / "undisposed") == [] and spool.undisposed_count == 0
