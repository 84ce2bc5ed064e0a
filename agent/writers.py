"""Is a file still open for writing by some process? (DESIGN section 3, invariant 8.)

>>> open_writers(path)             # Writers.NONE | Writers.OPEN | Writers.UNKNOWN
>>> open_writers_fd(fd)            # the same for a file the caller opened (no race with a rename)
>>> probe(directory)               # None if the check works for files there, else why not

Asked by the watcher before a file becomes a candidate, by the intake before sealing and by the
disposal before a source is deleted or moved. NONE is a statement about this kernel only.

How (chosen by measurement, docs/OPERATIONS.md "Open-writer check"):
- **A read lease** (`fcntl(F_SETLEASE, F_RDLCK)` on a read-only descriptor, released at once). The
  kernel refuses it with EAGAIN while any descriptor anywhere on this host has the file open for
  writing (or mapped shared-writable), in any process, PID namespace or container that shares the
  mount. One open + two fcntl: ~10 us, independent of how many processes run. A read lease rather
  than the write lease (F_WRLCK): a write lease also fails while anyone merely *reads* the file (a
  backup, an indexer), which says nothing about completeness. Needs the file's owner or CAP_LEASE.
- **A /proc/*/fd scan**, only where the lease is refused for lack of ownership (EACCES/EPERM): every
  descriptor of every visible process is stat'ed and matched by (device, inode), then its fdinfo flags
  read. Costs a walk of all descriptors (milliseconds per hundred processes), sees only this PID
  namespace, and only processes we may inspect (our uid, or root/CAP_SYS_PTRACE): if any process's
  descriptors could not be read, the answer is UNKNOWN, never NONE.

Limits: a writer on another host (NFS, SMB, CephFS clients) is invisible to both; filesystems
without lease support (NFSv3, most FUSE) answer EINVAL, which is UNKNOWN. Where the check cannot be
made, deleting sources after a `quiet` or `close` judgement is refused (agent/intake.py keeps that
watch's sources instead, with one `delete-refused` line when the watch seals its first recording).

A lease break (a writer opening the file during the microseconds a lease is held) sends the holder
SIGIO, whose default action kills the process: `ignore_lease_breaks()` sets it to SIG_IGN, and every
entry point here calls it; the writer's open is delayed only until the lease is released.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import signal
import threading
from pathlib import Path

__all__ = ["Writers", "ignore_lease_breaks", "open_writers", "open_writers_fd", "probe", "refuse_if_open"]

log = logging.getLogger("mediaseal.pipeline")

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_RDLCK = getattr(fcntl, "F_RDLCK", 0)
_F_UNLCK = getattr(fcntl, "F_UNLCK", 2)


class Writers(enum.Enum):
    """The answer: nobody writes it, somebody does, or it cannot be told here."""

    NONE = "none"
    OPEN = "open"
    UNKNOWN = "unknown"


_ignored = False
_ignored_lock = threading.Lock()


def ignore_lease_breaks() -> None:
    """Set SIGIO to SIG_IGN once (a lease break must never kill the agent). Needs the main thread the first
    time; called from there by the Watcher and Intake constructors, a no-op afterwards."""
    global _ignored
    with _ignored_lock:
        if _ignored or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        _ignored = True


def open_writers(path: Path, dir_fd: int | None = None) -> Writers:
    """Whether `path` (never through a symlink; with `dir_fd`, its name in that directory) is open for
    writing; NONE if it is gone."""
    try:
        fd = os.open(path.name if dir_fd is not None else path,
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return Writers.NONE
    except OSError:
        return Writers.UNKNOWN
    try:
        return open_writers_fd(fd)
    finally:
        os.close(fd)


def open_writers_fd(fd: int) -> Writers:
    """Whether the file behind `fd` (opened read-only by the caller) is open for writing anywhere."""
    ignore_lease_breaks()
    if not _ignored:
        return _proc_scan(os.fstat(fd))  # SIGIO could not be ignored (not yet called from the main thread)
    try:
        fcntl.fcntl(fd, _F_SETLEASE, _F_RDLCK)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            return Writers.OPEN
        if e.errno in (errno.EACCES, errno.EPERM):  # not the owner and no CAP_LEASE
            return _proc_scan(os.fstat(fd))
        return Writers.UNKNOWN  # EINVAL, ENOLCK...: no leases on this filesystem (NFSv3, FUSE)
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETLEASE, _F_UNLCK)
    return Writers.NONE


def proc_scan(path: Path) -> Writers:
    """The /proc fallback on its own (measured against the lease in benchmarks and tests)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return Writers.NONE
    return _proc_scan(st)


def _proc_scan(target: os.stat_result) -> Writers:
    key = (target.st_dev, target.st_ino)
    blind = False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return Writers.UNKNOWN
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # exited
        except OSError:
            blind = True  # someone else's process: its descriptors are hidden from us
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != key:
                continue
            try:
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            except OSError:
                blind = True
                continue
            flags = next((int(line.split()[1], 8) for line in info.splitlines() if line.startswith("flags:")), 0)
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                return Writers.OPEN
    return Writers.UNKNOWN if blind else Writers.NONE


def probe(directory: Path) -> str | None:
    """None if open writers can be told apart for files in `directory`, else one line saying why not.

    Writes and removes one dotfile there (the watcher ignores dotfiles): the only way to learn whether the
    filesystem grants leases. Without CAP_LEASE, files of other owners fall back to the /proc scan, which
    is blind to other users' processes unless we are root: that too is reported."""
    ignore_lease_breaks()
    name = directory / f".mediaseal-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return f"cannot create a probe file in {directory}: {e.strerror}"
    try:
        ro = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # Refused while our own writer holds it open, granted once it is closed: a filesystem that
            # refuses every lease (EAGAIN from NFSv4 without a delegation, EINVAL from FUSE) fails one.
            try:
                fcntl.fcntl(ro, _F_SETLEASE, _F_RDLCK)
                return f"the filesystem of {directory} grants leases on files open for writing"
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    return f"the filesystem of {directory} grants no leases ({e.strerror})"
            os.close(fd)
            fd = -1
            try:
                fcntl.fcntl(ro, _F_SETLEASE, _F_RDLCK)
            except OSError as e:
                return f"the filesystem of {directory} grants no leases ({e.strerror})"
            fcntl.fcntl(ro, _F_SETLEASE, _F_UNLCK)
        finally:
            os.close(ro)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
    if not _has_cap_lease() and os.geteuid() != 0:
        return ("no CAP_LEASE: files of other owners are checked by a /proc scan that cannot see other users' "
                "processes (give the agent CAP_LEASE, e.g. AmbientCapabilities=CAP_LEASE)")
    return None


def _has_cap_lease() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 28 & 1)  # CAP_LEASE = 28
    except (OSError, ValueError):
        pass
    return False


def refuse_if_open(path: Path, recording_id: str, *, dir_fd: int | None = None) -> bool:
    """True (and one warning line) if `path` is still open for writing: the disposal leaves it alone, and
    the watcher brings it back once its writer closed it (a grown file is re-sealed as a new recording)."""
    if open_writers(path, dir_fd) is not Writers.OPEN:
        return False
    log.warning("source-open-for-writing", extra={"fields": {"recording_id": recording_id, "path": str(path),
                                                              "action": "not disposed"}})
    return True
