"""The filesystem repository (the embedded default): a directory tree of `.mseal` packages.

On the spool's own filesystem the package is hard-linked into place (no byte copied) and confirmed by
identity: the repository holds the very inode that was sealed and fsynced, so no digest is needed
(`needs_digest` is False). Elsewhere, the same confirm contract as S3: the package is copied to a temp
name, SHA-256 computed over exactly the bytes written, fsynced, renamed into place, directory fsynced;
the receipt carries that size and hash, which must equal the digest the agent computed beforehand.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
from pathlib import Path

from mediaseal.uploader.base import PermanentRepositoryError, Receipt, TransientRepositoryError, Upload

_BLOCK = 1 << 20
# Errors an operator must fix (they won't pass by waiting); everything else is retried.
_PERMANENT = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class FilesystemRepository:
    """>>> repo = FilesystemRepository(Path("/srv/recordings"))

    `link=False` always copies (and hashes what it wrote), even on the spool's filesystem.
    """

    def __init__(self, root: Path, *, link: bool = True) -> None:
        self.root = root
        self.link = link
        self._cannot_link = False  # a link failed (EXDEV, EPERM...): copies from now on

    def needs_digest(self, path: Path) -> bool:
        """False when `path` can be hard-linked here (same filesystem): identity confirms it."""
        if not self.link or self._cannot_link:
            return True
        try:
            return os.stat(path).st_dev != os.stat(self.root).st_dev
        except OSError:
            return True

    async def put(self, upload: Upload) -> Receipt:
        return await asyncio.to_thread(self._put, upload)

    async def close(self) -> None:
        return None

    def object_path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise PermanentRepositoryError(f"key {key!r} escapes the repository")
        return path

    def _put(self, upload: Upload) -> Receipt:
        target = self.object_path(upload.key)
        # One temp name per key, not a random one: if the agent dies between writing and renaming, the
        # replay of the same recording (it is never verified, so it is always delivered again)
        # reuses and so removes it, instead of leaving a stray file in the repository forever.
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            if not self.root.is_dir():
                # Transient: an unmounted network filesystem comes back; it is never created here,
                # which would fill the local disk instead of the repository.
                raise TransientRepositoryError(f"repository {self.root} is not there (not mounted?)")
            _makedirs(target.parent, self.root)
            if self.link and not self._cannot_link:
                if (receipt := self._link(upload, tmp, target)) is not None:
                    return receipt
                self._cannot_link = True
            if upload.sha256 is None:
                # needs_digest said the link would do; it did not, and a copy is only confirmed
                # against the package's digest, which the retry computes first.
                raise TransientRepositoryError(f"cannot hard-link into {self.root}: delivering by copy")
            sha, size = hashlib.sha256(), 0
            buf = memoryview(bytearray(_BLOCK))
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(upload.path, "rb", buffering=0) as src, \
                    open(os.open(tmp, flags, 0o600), "wb", buffering=0) as dst:
                while n := src.readinto(buf):
                    sha.update(buf[:n])
                    dst.write(buf[:n])
                    size += n
                os.fsync(dst.fileno())
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            return Receipt(size, sha.hexdigest())
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            cls = PermanentRepositoryError if e.errno in _PERMANENT else TransientRepositoryError
            raise cls(f"filesystem repository: {e.strerror} ({e.filename or target})") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


    @staticmethod
    def _link(upload: Upload, tmp: Path, target: Path) -> Receipt | None:
        """On the spool's own filesystem, deliver by hard link: no byte is copied.

        The repository then holds the very inode that was sealed and fsynced when the package was made,
        so it is confirmed by identity (same device and inode, same size) rather than by reading and
        hashing it. Across filesystems this returns None and the bytes are copied.
        """
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by an attempt that died before its rename
        src = os.stat(upload.path)
        with contextlib.suppress(FileNotFoundError):
            there = os.stat(target)
            if (there.st_dev, there.st_ino) == (src.st_dev, src.st_ino):
                # A replay after a crash between the rename and the manifest update: the repository
                # holds this very inode already. (Renaming another link of the same inode onto it
                # would do nothing at all, and leave the temp name behind.)
                _fsync_dir(target.parent)
                return Receipt(there.st_size, upload.sha256) if there.st_size == upload.size else None
        try:
            os.link(upload.path, tmp)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                return None
            raise
        held = os.stat(tmp)
        if (src.st_dev, src.st_ino) != (held.st_dev, held.st_ino) or held.st_size != upload.size:
            tmp.unlink()
            raise TransientRepositoryError(f"linked package {tmp} is not the spool's ({held.st_size} B)")
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return Receipt(held.st_size, upload.sha256)


def _makedirs(path: Path, root: Path) -> None:
    missing = []
    p = path
    while p != root and not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        _fsync_dir(d.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
