"""The filesystem repository (the embedded default): a directory tree of `.mseal` packages.

On the spool's own filesystem the package is hard-linked into place (no byte copied) and confirmed by
identity: the repository holds the very inode that was sealed and fsynced, so no digest is needed
(`needs_digest` is False). Elsewhere, the same confirm contract as S3: the package is copied to a temp
name, SHA-256 computed over exactly the bytes written, fsynced, renamed into place, directory fsynced;
the receipt carries that size and hash, which must equal the digest the agent computed beforehand.
Every fsync goes through plumbing.durable: a failed one is DurabilityError (never retried), which the
agent turns into its documented stop.

Reads (the PackageReader side: playback, export, re-wrap) are `pread` in a worker thread; keys are
plain relative keys (plumbing.locations.check_relative_key). `rewrite_head` replaces a package's header
durably (a temp file beside it, body copied byte for byte, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path

from mediaseal.plumbing.dirfd import opened_dir
from mediaseal.plumbing.durable import atomic_open, fsync, fsync_dir, write_all
from mediaseal.plumbing.locations import SUFFIX, LocationError, check_relative_key
from mediaseal.uploader.base import (
    PackageNotFoundError,
    PermanentRepositoryError,
    Receipt,
    RepositoryError,
    StoredObject,
    TransientRepositoryError,
    Upload,
    check_range,
    read_all,
)

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

    @property
    def url(self) -> str:
        return f"file://{self.root}"

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

    async def probe(self) -> str:
        """The root is a directory that takes a write (a temporary file, gone at once)."""
        return await asyncio.to_thread(self.probe_now)

    def probe_now(self) -> str:
        """`probe`, blocking (cheap enough for every /readyz)."""
        if not self.root.is_dir():
            raise PermanentRepositoryError(f"{self.root} is not there (not mounted?)")
        try:
            with tempfile.TemporaryFile(dir=self.root) as f:
                f.write(b"\0")
                f.flush()
        except OSError as e:
            raise PermanentRepositoryError(f"{self.root} does not take writes: {e.strerror or e}") from None
        return str(self.root)

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
                    write_all(dst.fileno(), buf[:n])
                    size += n
                fsync(dst.fileno(), tmp)
            os.rename(tmp, target)
            fsync_dir(target.parent)
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
                fsync_dir(target.parent)
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
        fsync_dir(target.parent)
        return Receipt(held.st_size, upload.sha256)

    # -- the read side -----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        try:
            return self.root / check_relative_key(key)
        except LocationError as e:
            raise PermanentRepositoryError(str(e)) from None

    def location(self, key: str) -> str:
        return str(self.path(key))

    def _read_error(self, key: str, p: Path, e: OSError) -> RepositoryError:
        if isinstance(e, (FileNotFoundError, NotADirectoryError)):  # no such key, or a key below a file
            return PackageNotFoundError(f"no package {self.url}/{key}")
        cls = PermanentRepositoryError if e.errno in _PERMANENT else TransientRepositoryError
        return cls(f"cannot read {p}: {e.strerror}")

    def _open(self, key: str) -> int:
        """A read-only descriptor of the package under `key`, reached from the root without following a
        symlink in any component (plumbing/dirfd.py): a link planted in the repository never leads a
        reader (the player, an export) to a file outside it. Raises RepositoryError."""
        p = self.path(key)
        try:
            with opened_dir(self.root, p.parent) as d:
                fd = os.open(p.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=d)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PermanentRepositoryError(f"{p}: a symbolic link in the repository, not followed") from None
            raise self._read_error(key, p, e) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PackageNotFoundError(f"no package {self.url}/{key} (not a file)")
        return fd

    async def size(self, key: str) -> int:
        fd = await asyncio.to_thread(self._open, key)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    async def read(self, key: str, offset: int, length: int) -> bytes:
        return await read_all(self, key, offset, length)

    async def iter_read(self, key: str, offset: int, length: int, block: int) -> AsyncGenerator[bytes, None]:
        check_range(offset, length, block)
        p = self.path(key)
        fd = await asyncio.to_thread(self._open, key)
        try:
            pos, end = offset, offset + length
            while pos < end:
                want = min(block, end - pos)
                try:
                    data = await asyncio.to_thread(_pread_full, fd, want, pos)
                except OSError as e:
                    raise self._read_error(key, p, e) from None
                if data:
                    yield data
                if len(data) < want:
                    return  # the file ends here
                pos += want
        finally:
            os.close(fd)

    async def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        size = await self.size(key)
        return await self.read(key, 0, min(length, size)), size

    async def list(self, prefix: str = "") -> AsyncGenerator[StoredObject, None]:
        try:
            found = await asyncio.to_thread(self._walk, prefix)
        except NotADirectoryError:
            raise PermanentRepositoryError(f"repository {self.url}: {self.root} is not a directory") from None
        except OSError as e:
            raise self._read_error(prefix, self.root, e) from None
        for key, st in found:
            yield StoredObject(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, prefix: str) -> builtins.list[tuple[str, os.stat_result]]:
        if not self.root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.root))
        found: list[tuple[str, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                if not name.endswith(SUFFIX) or name.startswith("."):  # ".name.tmp" staging files
                    continue
                key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        st = os.lstat(os.path.join(dirpath, name))
                        if stat.S_ISREG(st.st_mode):  # a symlink is never a package (see `_open`)
                            found.append((key, st))
        found.sort()
        return found

    async def rewrite_head(self, key: str, old_head: int, new_head: bytes, *, part_size: int = 16 << 20) -> None:
        p = self.path(key)
        try:
            await asyncio.to_thread(_rewrite_head, p, old_head, new_head)
        except OSError as e:
            raise self._read_error(key, p, e) from None


def _makedirs(path: Path, root: Path) -> None:
    missing = []
    p = path
    while p != root and not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        fsync_dir(d.parent)


def _rewrite_head(path: Path, old_head: int, new_head: bytes) -> None:
    """The package at `path` with its first `old_head` bytes replaced, atomically (its mode kept)."""
    with open(path, "rb") as src:
        st = os.fstat(src.fileno())
        src.seek(old_head)
        with atomic_open(path, st.st_mode & 0o777) as dst:
            os.fchmod(dst.fileno(), st.st_mode & 0o777)  # exactly the old mode, whatever the umask
            dst.write(new_head)
            shutil.copyfileobj(src, dst, 1 << 20)  # the body, byte for byte


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = os.pread(fd, n - got, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)
