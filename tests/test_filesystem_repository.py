"""The filesystem repository's confirm contract, on real files: hard link on the spool's filesystem,
a hashed copy otherwise, and the receipt says what the repository really holds."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mediaseal.uploader import FilesystemRepository, PermanentRepositoryError, TransientRepositoryError, Upload


def package(tmp_path: Path, data: bytes) -> Upload:
    p = tmp_path / "spool.mseal"
    p.write_bytes(data)
    p.chmod(0o600)  # as the spool makes them
    return Upload(key="call/2026/11/28/rec-1.mseal", path=p, size=len(data),
                  sha256=hashlib.sha256(data).hexdigest(), metadata={})


@pytest.mark.parametrize("link", [True, False])
def test_put_confirms_size_and_hash(tmp_path: Path, link: bool) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    data = os.urandom(3 << 20)
    up = package(tmp_path, data)
    receipt = asyncio.run(FilesystemRepository(root, link=link).put(up))
    stored = root / up.key
    assert (receipt.size, receipt.sha256) == (len(data), up.sha256)
    assert stored.read_bytes() == data
    assert stored.stat().st_mode & 0o777 == 0o600
    assert (stored.stat().st_ino == up.path.stat().st_ino) is link
    assert [p.name for p in stored.parent.iterdir()] == ["rec-1.mseal"]  # no temp file left
    again = asyncio.run(FilesystemRepository(root, link=link).put(up))  # a replay overwrites in place
    assert again == receipt and len(list(root.rglob("*.mseal"))) == 1


def test_copy_reports_what_it_read_not_what_the_manifest_says(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    up = package(tmp_path, b"sealed bytes" * 1000)
    with open(up.path, "r+b") as f:  # the spool file rotted after sealing
        f.write(b"X")
    receipt = asyncio.run(FilesystemRepository(root, link=False).put(up))
    assert receipt.sha256 != up.sha256  # so the pipeline refuses to count it as delivered


def test_missing_root_is_transient_and_escaping_key_is_permanent(tmp_path: Path) -> None:
    up = package(tmp_path, b"x")
    with pytest.raises(TransientRepositoryError, match="not mounted"):
        asyncio.run(FilesystemRepository(tmp_path / "absent").put(up))
    (tmp_path / "repo").mkdir()
    up.key = "../../etc/passwd"
    with pytest.raises(PermanentRepositoryError, match="escapes"):
        asyncio.run(FilesystemRepository(tmp_path / "repo").put(up))


def test_replay_after_a_crash_leaves_no_temp_file(tmp_path: Path) -> None:
    """Found by the reliability matrix: a crash after the rename but before the manifest said
    'verified' replays the put; renaming a second link of the same inode onto the first is a no-op
    in POSIX, which used to leave the temp name in the repository."""
    root = tmp_path / "repo"
    root.mkdir()
    up = package(tmp_path, os.urandom(10_000))
    first = asyncio.run(FilesystemRepository(root).put(up))
    stale = (root / up.key).with_name(".rec-1.mseal.tmp")
    os.link(up.path, stale)  # and an attempt that died between its link and its rename
    again = asyncio.run(FilesystemRepository(root).put(up))
    assert again == first
    assert sorted(p.name for p in (root / up.key).parent.iterdir()) == ["rec-1.mseal"]


def test_same_filesystem_needs_no_digest_and_another_one_does(tmp_path: Path) -> None:
    """The agent hashes a package only for a delivery that is confirmed by checksum (a copy)."""
    root = tmp_path / "repo"
    root.mkdir()
    up = package(tmp_path, os.urandom(1 << 20))
    repo = FilesystemRepository(root)
    assert repo.needs_digest(up.path) is False
    assert FilesystemRepository(root, link=False).needs_digest(up.path) is True
    up.sha256 = None  # what the agent hands over when needs_digest said no
    receipt = asyncio.run(repo.put(up))
    assert (receipt.size, receipt.sha256) == (up.size, None)
    assert (root / up.key).stat().st_ino == up.path.stat().st_ino
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to copy across")
    other = FilesystemRepository(shm)
    assert other.needs_digest(up.path) is True


def test_a_link_that_fails_asks_for_the_digest_then_copies(tmp_path: Path) -> None:
    """A put without a digest whose link fails (EXDEV here, as a put racing a remount would see) is
    retried, not copied unchecked: the repository then asks for the digest and copies against it."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to link across")
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        data = os.urandom(1 << 20)
        up = package(tmp_path, data)
        digest, up.sha256 = up.sha256, None
        repo = FilesystemRepository(root)
        with pytest.raises(TransientRepositoryError, match="cannot hard-link"):
            asyncio.run(repo.put(up))  # EXDEV: the link is impossible and there is no digest to copy by
        assert repo.needs_digest(up.path) is True  # so the agent hashes before the retry
        up.sha256 = digest
        receipt = asyncio.run(repo.put(up))
        assert (receipt.size, receipt.sha256) == (len(data), digest)
        assert (root / up.key).read_bytes() == data
        assert not [p for p in root.rglob("*") if p.name.startswith(".")]
    finally:
        shutil.rmtree(root)
