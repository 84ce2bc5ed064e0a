"""The filesystem repository (the embedded default): a directory tree of `.mseal` packages.

Same confirm contract as S3: the package is copied to a temp name, SHA-256 computed over exactly the
bytes written, fsynced, renamed into place, directory fsynced; the receipt carries that size and hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
from pathlib import Path

from uploader.base import PermanentRepositoryError, Receipt, TransientRepositoryError, Upload

_BLOCK = 1 << 20
# Errors an operator must fix (they won't pass by waiting); everything else is retried.
_PERMANENT = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class FilesystemRepository:
    """>>> repo = FilesystemRepository(Path("/srv/recordings"))"""

    def __init__(self, root: Path) -> None:
        self.root = root

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
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            if not self.root.is_dir():
                # Transient: an unmounted network filesystem comes back; it is never created here,
                # which would fill the local disk instead of the repository.
                raise TransientRepositoryError(f"repository {self.root} is not there (not mounted?)")
            _makedirs(target.parent, self.root)
            sha, size = hashlib.sha256(), 0
            buf = memoryview(bytearray(_BLOCK))
            with open(upload.path, "rb", buffering=0) as src, open(
                os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb", buffering=0
            ) as dst:
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
