"""The spool's release paths and what recovery makes of a crash in the middle of each (real files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mediaseal.buffer.spool import SPOOLED, VERIFIED, Manifest, Spool, SpoolError


def committed(spool: Spool, rid: str, data: bytes = b"ciphertext" * 100) -> Manifest:
    m = Manifest(recording_id=rid, kind="call", repo_key=f"call/2026/11/28/{rid}.mseal", package_size=len(data),
                 sha256=None, kid="k", source=f"/capture/{rid}.wav", identity={}, dispose="delete")
    reservation = spool.reserve(len(data))
    assert reservation is not None
    with spool.staging(rid) as (f, path):
        f.write(data)
    return spool.commit(path, m, reservation)


@pytest.mark.parametrize("replayable", [False, True])
def test_release_removes_package_and_manifest(tmp_path: Path, replayable: bool) -> None:
    spool = Spool(tmp_path / "spool", 1 << 30, min_free_bytes=0)
    m = committed(spool, "r1")
    with pytest.raises(SpoolError, match="only a verified package"):
        spool.release(m, replayable=replayable)
    m.state = VERIFIED
    if not replayable:
        spool.update(m)
    spool.release(m, replayable=replayable)
    assert list((tmp_path / "spool" / "packages").iterdir()) == []
    assert (spool.used_bytes, spool.package_count) == (0, 0)


def test_replayable_release_interrupted_either_side_of_its_fsync(tmp_path: Path) -> None:
    """Manifest first: before the fsync the manifest (still SPOOLED) comes back and the recording is
    delivered again (a no-op for a hard link); after it, a package without manifest is uncommitted."""
    root = tmp_path / "spool"
    spool = Spool(root, 1 << 30, min_free_bytes=0)
    before, after = committed(spool, "before"), committed(spool, "after")
    assert before.state == after.state == SPOOLED
    os.unlink(root / "packages" / "after.json")  # the crash came between the manifest and the package
    again = Spool(root, 1 << 30, min_free_bytes=0)
    assert again.recover() == ["before"]
    assert sorted(p.name for p in (root / "packages").iterdir()) == ["before.json", "before.mseal"]
    assert again.package_count == 1


def test_commit_interrupted_before_its_fsync_with_only_the_manifest_on_disk(tmp_path: Path) -> None:
    """commit renames the package, then the manifest, then fsyncs once. Had only the manifest's rename
    reached the disk, its source is still there unchanged (disposal waits for that fsync): recovery
    drops the manifest, so the source is sealed again rather than disposed with no package. With the
    source gone, the manifest stays as evidence (a package lost some other way), loudly."""
    root = tmp_path / "spool"
    spool = Spool(root, 1 << 30, min_free_bytes=0)
    (tmp_path / "capture").mkdir()
    for rid in ("interrupted", "lost"):
        source = tmp_path / "capture" / f"{rid}.wav"
        source.write_bytes(b"plain")
        st = source.stat()
        m = committed(spool, rid)
        m.source = str(source)
        m.identity = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "ctime_ns": st.st_ctime_ns}
        spool.update(m)
    # "interrupted": the package's rename never reached the disk; "lost": disposed, then its package removed.
    os.rename(root / "packages" / "interrupted.mseal", root / "staging" / "interrupted.mseal.part")
    (root / "packages" / "lost.mseal").unlink()
    (tmp_path / "capture" / "lost.wav").unlink()
    assert Spool(root, 1 << 30, min_free_bytes=0).recover() == []
    assert sorted(p.name for p in (root / "packages").iterdir()) == ["lost.json"]
    assert (tmp_path / "capture" / "interrupted.wav").read_bytes() == b"plain"  # sealed again from here


def test_staging_file_starts_writeback_and_keeps_every_byte(tmp_path: Path) -> None:
    """Writes past WRITEBACK_STEP ask the kernel to start writing (Linux); the bytes are the same."""
    from mediaseal.buffer import spool as spool_module

    spool = Spool(tmp_path / "spool", 1 << 30, min_free_bytes=0)
    data = os.urandom(spool_module.WRITEBACK_STEP * 2 + 12345)
    with spool.staging("big") as (f, path):
        for i in range(0, len(data), 1 << 20):
            assert f.write(memoryview(data)[i:i + (1 << 20)]) == min(1 << 20, len(data) - i)
        assert f._started == spool_module.WRITEBACK_STEP * 2  # two ranges handed to the kernel
    assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o600
    assert (spool_module._sync_file_range is not None) == os.uname().sysname.startswith("Linux")
