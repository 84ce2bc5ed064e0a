"""The spool: where sealed packages wait for the repository. It never holds a byte of plaintext.

    <root>/staging/<id>.mseal.part   being written: ciphertext from its first byte (the codec's output)
    <root>/packages/<id>.mseal       committed: fsynced, renamed into place, directory fsynced
    <root>/packages/<id>.json        its manifest: the recording's durable state (buffer/manifest.py)
    <root>/kept/<id>                 sources disposed with "keep": already done, don't encrypt again
    <root>/undisposed/<id>.json      a source its disposal could not remove (permissions, a read-only
                                     mount): a copy of its manifest, kept past `release` until the
                                     disposal succeeds, so the source is neither sealed again nor forgotten

>>> spool = Spool(root, max_bytes=10 << 30)
>>> resume = spool.recover()                  # at start: drop staging leftovers, list what to deliver
>>> r = spool.reserve(estimate)              # capacity for one recording, or None when full
>>> with spool.staging(rid) as (f, path): ...  # seal into f
>>> spool.commit(path, manifest, r)           # SPOOLED, durable: the source may be disposed now
>>> spool.record_digest(m, sha256)            # before the first byte goes out
>>> spool.record_upload(m, progress)          # UPLOADING, after each part the repository holds
>>> spool.record_failure(m, "timeout")        # attempts and last error, for `mediaseal status`
>>> spool.record_verified(m)                  # VERIFIED: the repository confirmed it
>>> spool.release(m)                          # the spool copy goes
>>> spool.record_dispose_failed(m, "permission-denied")  # the source stays: remembered, not re-sealed
>>> spool.record_disposed(rid)                # ... until its disposal succeeds (no I/O if none failed)

The spool owns the manifest's state machine: every transition above is a method here, refused with
`TransitionError` (before anything is written) from a state it cannot come from, and written durably
(mediaseal.plumbing.durable: temp, fsync, rename, fsync directory) before the caller acts on it, so a
crash at any instant leaves either the old state or the new one, never a torn file. A failed fsync
raises `DurabilityError` (never retried); the agent stops on it with exit 3.

`on_step` (the agent passes its crash points) is called at the named instants inside a transition
where a crash leaves a half-done change for `recover` to finish or undo: "mid-commit" (the package
renamed into place, its manifest not yet written) and "mid-release" (the first of package and manifest
removed and fsynced, the second not yet).

Undisposed records are the one piece of state that outlives a package's release, because the source
it came from outlives it: the package leaves the spool as always (only after the repository confirmed
it), and the record says "sealed, delivered, but its plaintext is still in the capture directory", so
the next scan does not seal it again (`is_kept`) and the disposal is retried until it is done (at every
start and periodically) instead of being forgotten. Recorded only on a failure: the hot path (commit,
dispose, release) writes nothing more than before.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from mediaseal.buffer.manifest import STATES, Manifest, ManifestState, SourceIdentity, canonical_json
from mediaseal.plumbing.durable import DurabilityError, atomic_open, fsync, fsync_dir

log = logging.getLogger("mediaseal.spool")

SPOOLED, UPLOADING, VERIFIED = ManifestState.SPOOLED, ManifestState.UPLOADING, ManifestState.VERIFIED
_DELIVERING = frozenset({SPOOLED, UPLOADING})  # where every delivery transition may come from

SpoolStep = Literal["mid-commit", "mid-release"]


class SpoolError(Exception):
    """The spool can't do what was asked (not enough room, a broken file)."""


class ManifestRefused(SpoolError):
    """A manifest this agent did not write, or one whose fields it refuses (planted, replayed from
    another spool, or edited): never acted on; recovery moves it to rejected/ and reports it."""

    def __init__(self, recording_id: str, reason: str) -> None:
        super().__init__(f"manifest {recording_id}: {reason}")
        self.recording_id, self.reason = recording_id, reason


class SpoolFullError(SpoolError, OSError):
    """The spool's filesystem has no room (ENOSPC, EDQUOT) for a staging file or a manifest, e.g.
    filled by another process: nothing was committed, the old state stands. Not a fault of the
    recording: the agent pauses intake until space returns (sources stay where they are)."""


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def _full_is_named(what: Path | str) -> Iterator[None]:
    """ENOSPC/EDQUOT inside the block -> SpoolFullError (a failed fsync stays a DurabilityError)."""
    try:
        yield
    except DurabilityError:
        raise
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise SpoolFullError(e.errno, f"spool filesystem full writing {what}: {e.strerror}") from None
        raise


class TransitionError(SpoolError):
    """A state change asked of a manifest in a state it cannot come from: a bug in the caller, refused
    before anything is written."""


@dataclass
class Reservation:
    """Spool capacity set aside for one recording while it is sealed."""

    nbytes: int
    released: bool = False


class StagingFile:
    """A staging file that starts the disk writing behind the sealer, `WRITEBACK_STEP` bytes at a time
    (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`: start writeback, don't wait, pages stay cached).

    The fsync that commits the package then waits only for the tail instead of for every byte: 64 MiB
    sealed and fsynced in 30 ms instead of 42 ms here. It changes no durability guarantee: the
    commit's fsync is still what makes the package durable. Elsewhere (no sync_file_range) a plain file.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._fd = f.fileno()
        self._written = self._started = 0

    def write(self, data: memoryview | bytes, /) -> int:
        n = self._f.write(data) or 0
        self._written += n
        if self._written - self._started >= WRITEBACK_STEP and _sync_file_range is not None:
            _sync_file_range(self._fd, self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = self._written
        return n

    def fileno(self) -> int:
        return self._fd


class Spool:
    """Ciphertext-only staging, atomic commit, the manifests' transitions, recovery and capacity."""

    def __init__(self, root: Path, max_bytes: int, *, min_free_bytes: int = 64 << 20,
                 on_step: Callable[[SpoolStep], None] | None = None, mac_key: bytes | None = None,
                 check: Callable[[Manifest], str | None] | None = None, adopt: bool = False) -> None:
        self.root = root
        self._mac_key = mac_key  # manifests are authenticated under it (None: not, for tools and unit tests)
        self._check = check  # the agent's own checks of a manifest's fields (source under a watch, ...)
        self._adopt = adopt  # the key is new: manifests written before it existed are taken and signed
        self.refused = 0  # manifests refused at recovery (moved to rejected/)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._on_step = on_step or _no_step
        self._staging = root / "staging"
        self._packages = root / "packages"
        self._kept = root / "kept"
        self._undisposed_dir = root / "undisposed"
        self._rejected = root / "rejected"
        for d in (root, self._staging, self._packages, self._kept, self._undisposed_dir, self._rejected):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = threading.Lock()
        self._committed = 0  # bytes of packages in packages/
        self._reserved = 0  # bytes set aside for recordings being sealed
        self._count = 0
        self._verified_unwritten: set[str] = set()  # VERIFIED in memory only (see record_verified)
        # Recording ids with an undisposed record on disk (kept in memory: `record_disposed` is on the
        # hot path and must cost nothing when no disposal ever failed).
        self._undisposed = {e.name[: -len(".json")] for e in os.scandir(self._undisposed_dir)
                            if e.name.endswith(".json") and not e.name.startswith(".")}

    # -- capacity --------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._committed + self._reserved

    @property
    def package_count(self) -> int:
        return self._count

    def fits_ever(self, nbytes: int) -> bool:
        return nbytes <= self.max_bytes

    def reserve(self, nbytes: int) -> Reservation | None:
        """Set aside `nbytes`, or return None when the spool (or its filesystem) has no room now."""
        with self._lock:
            if self._committed + self._reserved + nbytes > self.max_bytes:
                return None
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize - self._reserved < nbytes + self.min_free_bytes:
                return None
            self._reserved += nbytes
            return Reservation(nbytes)

    def cancel(self, reservation: Reservation) -> None:
        with self._lock:
            if not reservation.released:
                reservation.released = True
                self._reserved -= reservation.nbytes

    # -- writing: staging and commit -------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, recording_id: str) -> Iterator[tuple[StagingFile, Path]]:
        """A fresh 0600 staging file for `recording_id`, fsynced at the end; removed if the block fails.

        Not `atomic_open`: the staging file's one rename is commit's, into another directory, under
        the directory fsync it shares with the manifest."""
        path = self._staging / f"{recording_id}.mseal.part"
        # O_TRUNC: a leftover of an attempt that did not finish is simply overwritten.
        with _full_is_named(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with _full_is_named(path), os.fdopen(fd, "wb", buffering=0) as f:
                yield StagingFile(f), path
                fsync(f.fileno(), path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise

    def commit(self, staged: Path, manifest: Manifest, reservation: Reservation) -> Manifest:
        """-> SPOOLED. Move a sealed, fsynced staging file into packages/ and write its manifest.

        The package is renamed into place first and the manifest second, and one directory fsync makes
        both durable; only then may the source be disposed. A crash before that fsync leaves either
        rename or both: a package without a manifest is not committed (removed; the source, still
        present, is sealed again), and a manifest without its package whose source is still there
        unchanged is not committed either (removed the same way; see `recover`).
        """
        rid = manifest.recording_id
        if manifest.state != SPOOLED or os.path.lexists(self._manifest_path(rid)):
            raise TransitionError(f"{rid}: commit is for a new recording (state {manifest.state}, "
                                  f"manifest on disk: {os.path.lexists(self._manifest_path(rid))})")
        os.rename(staged, self.package_path(rid))
        self._on_step("mid-commit")
        self._write_manifest(manifest, sync_dir=False)
        fsync_dir(self._packages)
        with self._lock:
            if not reservation.released:
                reservation.released = True
                self._reserved -= reservation.nbytes
            self._committed += manifest.package_size
            self._count += 1
        return manifest

    # -- writing: delivery transitions -----------------------------------------------------------

    def record_digest(self, manifest: Manifest, sha256: str) -> None:
        """Record the package's SHA-256 before its first byte goes out, so every attempt and every
        replay after a crash is checked against the same digest: recorded once, never changed."""
        self._expect(manifest, _DELIVERING, "record a digest")
        if manifest.sha256 is not None:
            raise TransitionError(f"{manifest.recording_id}: its digest is recorded already")
        manifest.sha256 = sha256
        self._write_manifest(manifest)

    def record_upload(self, manifest: Manifest, progress: dict[str, Any]) -> None:
        """-> UPLOADING, with the repository's resumable progress (an S3 multipart upload's id and the
        parts it holds; {} to start over), saved before the next part is sent."""
        self._expect(manifest, _DELIVERING, "record upload progress")
        manifest.upload = dict(progress)
        manifest.state = UPLOADING
        self._write_manifest(manifest)

    def record_failure(self, manifest: Manifest, error: str) -> None:
        """Count a failed delivery attempt (state unchanged), so `mediaseal status` shows it with the
        agent down."""
        self._expect(manifest, _DELIVERING, "record a failed attempt")
        manifest.attempts += 1
        manifest.last_error = error
        self._write_manifest(manifest)

    def record_verified(self, manifest: Manifest, *, durable: bool = True) -> None:
        """-> VERIFIED: the repository confirmed the package; `release` may follow.

        `durable=False` (no I/O: fine on an event loop) where the delivery costs nothing to repeat (the
        repository holds this very inode): VERIFIED is not written, saving an fsync per recording, and
        `release` then removes the manifest first (see there).
        """
        self._expect(manifest, _DELIVERING, "mark verified")
        manifest.state = VERIFIED
        if durable:
            self._write_manifest(manifest)
        else:
            with self._lock:
                self._verified_unwritten.add(manifest.recording_id)

    def release(self, manifest: Manifest) -> None:
        """VERIFIED -> gone. Drop a package the repository has confirmed: package first, then its manifest.

        VERIFIED in memory only (`record_verified(durable=False)`): the manifest on disk still says
        SPOOLED or UPLOADING, so it goes first, with one fsync: a crash before it replays the no-op
        delivery; after it, recovery removes the package as uncommitted.
        """
        rid = manifest.recording_id
        if manifest.state != VERIFIED:
            raise TransitionError(f"{rid}: only a verified package may leave the spool (state {manifest.state})")
        with self._lock:
            replayable = rid in self._verified_unwritten
            self._verified_unwritten.discard(rid)
        first, second = ((self._manifest_path(rid), self.package_path(rid)) if replayable
                         else (self.package_path(rid), self._manifest_path(rid)))
        with contextlib.suppress(FileNotFoundError):
            first.unlink()
        fsync_dir(self._packages)
        self._on_step("mid-release")
        with contextlib.suppress(FileNotFoundError):
            second.unlink()
        if not replayable:
            fsync_dir(self._packages)
        with self._lock:
            self._committed -= manifest.package_size
            self._count -= 1

    def mark_kept(self, recording_id: str) -> None:
        """Remember that a source disposed with "keep" is done, so later scans don't seal it again."""
        path = self._kept / recording_id
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        fsync_dir(self._kept)

    def record_dispose_failed(self, manifest: Manifest, reason: str) -> bool:
        """Remember, durably, that `manifest`'s source could not be disposed of (`reason`), so it is not
        sealed again and its disposal is retried (`undisposed`) even once the package has been released.
        Returns False (writing nothing) when it was remembered already."""
        rid = manifest.recording_id
        with self._lock:
            if rid in self._undisposed:
                return False
        record = dataclasses.replace(manifest, last_error=f"dispose: {reason}")
        self._write_manifest_to(self._undisposed_dir, record)
        with self._lock:
            self._undisposed.add(rid)
        return True

    def record_disposed(self, recording_id: str) -> None:
        """The source's disposal succeeded: forget a failure recorded for it (no I/O if there was none)."""
        with self._lock:
            if recording_id not in self._undisposed:
                return
        with contextlib.suppress(FileNotFoundError):
            (self._undisposed_dir / f"{recording_id}.json").unlink()
        fsync_dir(self._undisposed_dir)
        with self._lock:
            self._undisposed.discard(recording_id)

    # -- reading ---------------------------------------------------------------------------------

    def package_path(self, recording_id: str) -> Path:
        return self._packages / f"{recording_id}.mseal"

    def load(self, recording_id: str) -> Manifest | None:
        """The manifest of `recording_id`, or None; ManifestRefused if it is not one this agent wrote."""
        try:
            data = self._manifest_path(recording_id).read_bytes()
        except FileNotFoundError:
            return None
        return self._parse(recording_id, data, self._packages)

    def _parse(self, recording_id: str, data: bytes, directory: Path) -> Manifest:
        """Authenticate and check a manifest file's content (DESIGN invariant 9): its MAC under the key
        kept outside the spool, its name, and the agent's checks of its fields."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            mac = doc.pop("mac", None)
            m = Manifest.from_dict(doc)
        except (ValueError, TypeError) as e:
            raise ManifestRefused(recording_id, f"unreadable: {e}") from None
        if self._mac_key is not None:
            if mac is None and self._adopt:
                self._write_manifest_to(directory, m)
                log.warning("manifest-adopted", extra={"fields": {"recording_id": recording_id}})
            elif not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(canonical_json(doc))):
                raise ManifestRefused(recording_id, "its MAC does not verify (not written by this agent)")
        if m.recording_id != recording_id:
            raise ManifestRefused(recording_id, f"names another recording ({m.recording_id!r})")
        if self._check is not None and (problem := self._check(m)) is not None:
            raise ManifestRefused(recording_id, problem)
        return m

    def _mac(self, canonical: bytes) -> str:
        assert self._mac_key is not None
        return hmac.new(self._mac_key, b"mediaseal-manifest-v1\0" + canonical, hashlib.sha256).hexdigest()

    def _sealed(self, m: Manifest) -> bytes:
        """The manifest file's content: its JSON, with its MAC when the spool has a key."""
        doc = dataclasses.asdict(m)
        if self._mac_key is not None:
            doc["mac"] = self._mac(canonical_json(doc))
        return canonical_json(doc)

    def _reject(self, recording_id: str, reason: str) -> None:
        """Move a refused manifest (and a package under its name) to rejected/: kept as evidence and
        for an operator, never acted on (no disposal, no delivery). Reported once, here."""
        self.refused += 1
        log.error("manifest-refused", extra={"fields": {"recording_id": recording_id, "reason": reason,
                                                        "moved_to": str(self._rejected)}})
        for name in (f"{recording_id}.json", f"{recording_id}.mseal"):
            for d in (self._packages, self._undisposed_dir):
                kept = self._rejected / f"{d.name}-{name}"
                try:
                    os.rename(d / name, kept)
                except FileNotFoundError:
                    continue
                try:  # 0600 like everything in the spool; a planted symlink is dropped, never followed
                    fd = os.open(kept, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    kept.unlink()
                    continue
                try:
                    os.fchmod(fd, 0o600)
                finally:
                    os.close(fd)
        fsync_dir(self._rejected)
        fsync_dir(self._packages)
        fsync_dir(self._undisposed_dir)
        with self._lock:
            self._undisposed.discard(recording_id)

    def is_kept(self, recording_id: str) -> bool:
        """Whether `recording_id`'s source is done with and must not be sealed again: disposed with
        "keep", or awaiting a disposal that failed (`record_dispose_failed`)."""
        with self._lock:
            if recording_id in self._undisposed:
                return True
        return (self._kept / recording_id).exists()

    def undisposed(self) -> list[Manifest]:
        """The recordings whose source a disposal could not remove yet (each a copy of its manifest)."""
        with self._lock:
            ids = sorted(self._undisposed)
        out: list[Manifest] = []
        for rid in ids:
            try:
                out.append(self._parse(rid, (self._undisposed_dir / f"{rid}.json").read_bytes(), self._undisposed_dir))
            except FileNotFoundError:
                continue
            except ManifestRefused as e:
                self._reject(rid, e.reason)
        return out

    @property
    def undisposed_count(self) -> int:
        with self._lock:
            return len(self._undisposed)

    def manifests(self) -> Iterator[Manifest]:
        """Every manifest in packages/; a refused one is moved to rejected/ and reported (`_reject`)."""
        for entry in list(os.scandir(self._packages)):
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                rid = entry.name[: -len(".json")]
                try:
                    m = self.load(rid)
                except ManifestRefused as e:
                    self._reject(rid, e.reason)
                    continue
                if m is not None:
                    yield m

    def recover(self) -> list[str]:
        """Bring the spool to a consistent state after any stop; return the ids still to deliver.

        Staging files are unfinished work: removed (their sources are still in place, because a
        source is disposed only after commit). A package without a manifest never committed:
        removed too. A manifest whose package is gone was released half-way: finished here.
        """
        for entry in os.scandir(self._staging):
            log.info("removing unfinished staging file", extra={"fields": {"file": entry.name}})
            os.unlink(entry.path)
        fsync_dir(self._staging)
        for leftover in [*self._packages.glob(".*.tmp"), *self._undisposed_dir.glob(".*.tmp")]:
            leftover.unlink()
        pending: list[str] = []
        committed = count = 0
        for entry in os.scandir(self._packages):
            if not entry.name.endswith(".mseal"):
                continue
            rid = entry.name[: -len(".mseal")]
            if not self._manifest_path(rid).exists():
                log.warning("removing uncommitted package", extra={"fields": {"recording_id": rid}})
                os.unlink(entry.path)
        for m in self.manifests():
            if not self.package_path(m.recording_id).exists():
                identity = m.source_identity
                if (m.state == SPOOLED and not self.is_kept(m.recording_id) and identity is not None
                        and identity.same_file(SourceIdentity.of_path(m.source))):
                    # The manifest's rename reached the disk and the package's did not (commit's one
                    # fsync never ran): not committed, and the source was not disposed. Removing the
                    # manifest lets the source be sealed again, instead of disposed with no package.
                    log.warning("removing uncommitted manifest", extra={"fields": {"recording_id": m.recording_id}})
                    self._manifest_path(m.recording_id).unlink()
                    continue
                if m.state != VERIFIED:
                    # Never expected: packages leave only after verification. Keep the manifest as
                    # evidence and say so loudly rather than guess.
                    log.error("manifest without package", extra={"fields": {"recording_id": m.recording_id}})
                    continue
                self._manifest_path(m.recording_id).unlink()
                continue
            committed += m.package_size
            count += 1
            pending.append(m.recording_id)
        fsync_dir(self._packages)
        with self._lock:
            self._committed, self._count = committed, count
            self._verified_unwritten.clear()
        return sorted(pending)

    # -- internals -------------------------------------------------------------------------------

    def _manifest_path(self, recording_id: str) -> Path:
        return self._packages / f"{recording_id}.json"

    def _expect(self, manifest: Manifest, allowed: frozenset[ManifestState], what: str) -> None:
        if manifest.state not in allowed:
            raise TransitionError(f"{manifest.recording_id}: cannot {what} in state {manifest.state} "
                                  f"(only from {', '.join(sorted(allowed))})")

    def _write_manifest(self, manifest: Manifest, *, sync_dir: bool = True) -> None:
        self._write_manifest_to(self._packages, manifest, sync_dir=sync_dir)

    def _write_manifest_to(self, directory: Path, manifest: Manifest, *, sync_dir: bool = True) -> None:
        path = directory / f"{manifest.recording_id}.json"
        with _full_is_named(path), atomic_open(path, sync_dir=sync_dir) as f:
            f.write(self._sealed(manifest))


def _no_step(step: SpoolStep) -> None:
    pass


WRITEBACK_STEP = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range through ctypes (which releases the GIL for the call), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range = _load_sync_file_range()

__all__ = ["SPOOLED", "STATES", "UPLOADING", "VERIFIED", "DurabilityError", "Manifest", "ManifestRefused",
           "ManifestState", "Reservation", "SourceIdentity", "Spool", "SpoolError", "SpoolFullError", "SpoolStep",
           "StagingFile", "TransitionError", "manifest_key"]


def manifest_key(path: Path) -> tuple[bytes, bool]:
    """The spool's manifest key at `path`, made (32 random bytes, 0600, O_EXCL) if there is none yet.
    Returns (key, made now). A key file of another size, or readable by others, is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        with atomic_open(path, 0o600) as f:
            f.write(key)
        return key, True
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise SpoolError(f"{path}: the manifest key is readable by others (mode {st.st_mode & 0o777:o}; "
                             "chmod 600 it)")
        key = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(key) != 32:
        raise SpoolError(f"{path}: not a manifest key (32 bytes expected, {len(key)} found)")
    return key, False

