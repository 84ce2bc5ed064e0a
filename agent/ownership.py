"""One agent owns a spool and each capture directory (DESIGN invariant 10): flock, held for the run.

>>> owner = Ownership.claim(config, config_path)   # OwnedError naming the holder if another agent has one
>>> owner.claim_watch(watch)                       # a capture directory that appeared (or was replaced) later
>>> owner.release()                                # at exit; the kernel drops the locks of a dead process anyway

Two locks, both `flock(LOCK_EX | LOCK_NB)`, so a crashed agent never leaves a stale lock behind:

- the spool: `<buffer.path>/agent.lock`, a file the agent owns (0600) in its own directory (the spool's
  scans look only in `staging/`, `packages/`, `kept/`). Its content says who holds it (pid, agent id,
  config path, start time): what a refused second agent prints.
- each capture directory: the lock is on an `O_DIRECTORY` descriptor of the directory itself, not on a
  file in it. Nothing is written into the capture directory (it is hostile, invariant 9: a lock file
  there could be planted, replaced by a symlink, or picked up as a recording by a producer's own
  tooling), and the watcher has nothing to ignore. flock on a directory descriptor works on Linux for
  local filesystems; on NFS flock is emulated with POSIX locks that need a writable descriptor, so it
  may fail with EBADF/ENOLCK there: that is reported as "cannot lock" and the agent starts anyway with
  a warning (`capture-dir-unlocked`), since a lock that cannot be taken protects nothing.
  The holder of a capture directory lock is found through /proc/locks (the inode -> pid) and that
  process's open spool lock (/proc/<pid>/fd), whose content names it; a holder in another PID
  namespace or under another user is named by what can be seen ("pid unknown").

A directory that is replaced (unmounted and mounted again) has a new inode: `claim_watch` takes the
lock again on the new one (the readiness probe calls it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mediaseal.plumbing.durable import write_all

if TYPE_CHECKING:
    from mediaseal.agent.config import Config, WatchConfig

log = logging.getLogger("mediaseal.agent")

LOCK_NAME = "agent.lock"

__all__ = ["LOCK_NAME", "OwnedError", "Ownership"]


class OwnedError(Exception):
    """Another agent holds the spool or a capture directory; str() is the one line to print."""


@dataclass
class _Held:
    fd: int  # -1: the filesystem cannot lock it (capture-dir-unlocked), taken as ours
    dev: int
    ino: int


class Ownership:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = str(config_path.absolute()) if config_path is not None else "(embedded default)"
        self._spool: int | None = None
        self._watches: dict[Path, _Held] = {}

    @classmethod
    def claim(cls, config: Config, config_path: Path | None) -> Ownership:
        """Lock the spool, then every capture directory that exists now. OwnedError if another agent
        holds one (everything taken so far is released again)."""
        owner = cls(config, config_path)
        try:
            owner._claim_spool()
            for w in config.watch:
                owner.claim_watch(w)
        except BaseException:
            owner.release()
            raise
        return owner

    def holds(self, watch: WatchConfig) -> bool:
        return watch.path in self._watches

    def claim_watch(self, watch: WatchConfig) -> bool:
        """Lock `watch.path` if it is there and not locked by us already (on its current inode).
        False if it is missing; OwnedError if another agent holds it."""
        held = self._watches.get(watch.path)
        try:
            st = os.stat(watch.path)
        except OSError:
            return False
        if held is not None:
            if (held.dev, held.ino) == (st.st_dev, st.st_ino):
                return True
            _close(held.fd)  # the directory was replaced: lock the new one
            del self._watches[watch.path]
        try:
            fd = os.open(watch.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(os.fstat(fd))
            os.close(fd)
            raise OwnedError(f"capture directory {watch.path} is owned by {holder}: two agents on one capture "
                             "directory would each seal every recording (see docs/OPERATIONS.md, exit 4)") from None
        except OSError as e:
            os.close(fd)
            log.warning("capture-dir-unlocked", extra={"fields": {"watch": str(watch.path), "error": e.strerror}})
            self._watches[watch.path] = _Held(-1, st.st_dev, st.st_ino)  # ours, as far as can be told
            return True
        fst = os.fstat(fd)
        self._watches[watch.path] = _Held(fd, fst.st_dev, fst.st_ino)
        return True

    def release(self) -> None:
        for held in self._watches.values():
            _close(held.fd)
        self._watches.clear()
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None

    def _claim_spool(self) -> None:
        root = self.config.buffer.path
        path = root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise OwnedError(f"spool {root} is owned by {holder}: one agent per spool "
                             "(see docs/OPERATIONS.md, exit 4)") from None
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for a refused second agent. Not durable on purpose: it means nothing after a crash.
        doc = {"pid": os.getpid(), "agent_id": self.config.agent.id, "config": self.config_path,
               "spool": str(root), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        write_all(fd, json.dumps(doc).encode() + b"\n")
        self._spool = fd


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, object]:
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
        if isinstance(doc, dict):
            return doc
    return {}


def _describe(doc: dict[str, object], pid: int | None = None) -> str:
    shown = pid if pid is not None else doc.get("pid")
    who = f"pid {shown}" if shown is not None else "pid unknown"
    if "agent_id" in doc:
        who += f", agent id {doc['agent_id']}"
    if "config" in doc:
        who += f", config {doc['config']}"
    if "spool" in doc:
        who += f", spool {doc['spool']}"
    return f"another mediaseal agent ({who})"


def _holder_of(st: os.stat_result) -> str:
    """The process holding an flock on the file `st` describes (from /proc/locks), and, if its spool lock
    can be read through /proc/<pid>/fd, who it says it is."""
    pid = _lock_pid(st)
    if pid is None:
        return _describe({})
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.endswith("/" + LOCK_NAME):
                    with open(target, "rb") as f:
                        doc = json.loads(f.read(4096) or b"{}")
                    if isinstance(doc, dict) and doc.get("pid") == pid:
                        return _describe(doc, pid)
    return _describe({}, pid)


def _lock_pid(st: os.stat_result) -> int | None:
    """/proc/locks: `1: FLOCK  ADVISORY  WRITE 1234 08:01:56789 0 EOF` (device as hex major:minor)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter, not the holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
            with contextlib.suppress(ValueError):
                pid = int(fields[4])
                return pid if pid > 0 else None
    return None

