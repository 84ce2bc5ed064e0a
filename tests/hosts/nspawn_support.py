"""A booted systemd-nspawn machine the host tests can drive, and the Debian package they install in it.

`Machine` boots a root with systemd as PID 1:

    systemd-nspawn --boot --keep-unit --register=no --private-network --volatile=overlay -D ROOT

- `--keep-unit --register=no`: this host has no systemd of its own (PID 1 is the VM's init), so
  nspawn must neither ask systemd for a scope unit nor register with systemd-machined; without
  both it stops at "Failed to open system bus: No such file or directory".
- `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`: the container gets the pure cgroup2 layout a bookworm host
  runs (nspawn mounts the host's cgroup2 hierarchy, /sys/fs/cgroup/unified on this hybrid-mode host,
  as the container's /sys/fs/cgroup). Its controllers stay bound to the host's v1 hierarchies, so
  resource limits (MemoryMax=) are not enforced inside; the agent's unit sets none. Left to itself
  (unset or 0) nspawn copies the host's hybrid layout, in which bookworm's systemd boots too (measured).
- `--volatile=overlay`: the root is the cached, shared debootstrap tree (tests/hosts/debian_root.py);
  every write of the run lands in a tmpfs overlay and is gone at power-off, so the cache stays clean.
- `--private-network`: only loopback inside; nothing the test does reaches the network.
- Commands run inside through `nsenter --all` into the namespaces of the container's PID 1 (its
  host PID is the nspawn process's child whose innermost PID is 1). `machinectl shell` and
  `systemd-run --machine` would need the registration this host cannot do.
- Files inside are reached from the host through /proc/<init>/root (the container's mount
  namespace, overlay included).
- `--rlimit=CORE=infinity`: the container's PID 1 gets an unlimited core size, as systemd on a real
  host gives itself and its services (nspawn would hand down the kernel's default soft limit of 0),
  so a service's own LimitCORE= is what decides whether it dumps core.
- Power-off is SIGTERM to nspawn, which hands SIGRTMIN+3 to the container's systemd (an orderly
  shutdown, nspawn exits 0); SIGKILL only past a generous ceiling.

Every wait polls a condition with a ceiling (the machine is shared by other sessions): none sleeps
a fixed time and hopes.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]
INSIDE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
              "SYSTEMD_COLORS": "0", "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}


# -- the package ------------------------------------------------------------------------------------


def build_deb(work: Path) -> tuple[Path, float]:
    """The .deb `make deb` builds, and the seconds it took: $MEDIASEAL_DEB if set (CI builds it once),
    else built here from a copy of this checkout's sources (a build in the tree itself would leave
    build/ and *.egg-info behind while other tests run)."""
    given = os.environ.get("MEDIASEAL_DEB")
    if given:
        return Path(given).resolve(), 0.0
    started = time.monotonic()
    src, dist = work / "src", work / "dist"
    src.mkdir(parents=True)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=False, timeout=60)
    if listed.returncode != 0:
        pytest.skip(f"the .deb is built from the git checkout, and git ls-files failed: {listed.stderr!r}")
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
                           capture_output=True, text=True, check=False, timeout=900)
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    (whl,) = dist.glob("mediaseal-*.whl")
    deb = subprocess.run(["sh", str(src / "packaging" / "debian" / "build-deb.sh"), str(whl), str(dist)],
                         capture_output=True, text=True, check=False, timeout=1800, cwd=src)
    assert deb.returncode == 0, deb.stdout[-4000:] + deb.stderr[-4000:]
    return Path(deb.stdout.strip().splitlines()[-1]).resolve(), time.monotonic() - started


# -- the machine ------------------------------------------------------------------------------------


@dataclass
class Machine:
    """One booted container (see the module docstring). Use as a context manager: power-off at exit."""

    root: Path
    name: str
    log: Path
    bind_ro: Mapping[Path, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    init_pid: int = 0

    def __enter__(self) -> Machine:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    def boot(self, timeout: float = 600.0) -> None:
        argv = ["systemd-nspawn", "--boot", "--keep-unit", "--register=no", "--private-network",
                "--volatile=overlay", "--console=read-only", "--rlimit=CORE=infinity", f"--machine={self.name}",
                "-D", str(self.root)]
        argv += [f"--bind-ro={host}:{inside}" for host, inside in self.bind_ro.items()]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"})
        try:
            self.init_pid = wait_until(self._find_init, what="the container's PID 1", timeout=timeout, interval=0.25)
            # No answer (or "offline") until PID 1 listens on its private socket; then --wait blocks until
            # the boot is done.
            wait_until(lambda: self._state() not in ("", "offline"), what="the container's systemd to answer",
                       timeout=timeout, interval=0.25)
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).stdout.strip()
        except AssertionError as e:
            self.poweroff()
            pytest.skip(f"systemd-nspawn could not boot systemd here ({e}): {self.log_tail()}")
        if state not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            self.poweroff()
            pytest.skip(f"the container's systemd did not come up (is-system-running: {state!r}; failed: {failed!r})")

    def _state(self) -> str:
        return self.run("systemctl", "is-system-running", check=False, timeout=120).stdout.strip()

    def _find_init(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}")
        for children in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except FileNotFoundError:
                    continue
                m = re.search(r"^NSpid:\s*(.*)$", status, flags=re.M)
                if m and m.group(1).split()[-1] == "1" and len(m.group(1).split()) > 1:
                    return int(pid)
        return None

    def log_tail(self, lines: int = 12) -> str:
        text = self.log.read_bytes().decode(errors="replace") if self.log.exists() else ""
        clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return " | ".join(line for line in clean.splitlines()[-lines:] if line.strip())

    def poweroff(self, timeout: float = 300.0) -> int | None:
        """An orderly shutdown (SIGTERM: nspawn sends SIGRTMIN+3 to the container's systemd)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
        # nspawn leaves its (empty) propagation directory where /run is not a tmpfs ("we can't allow that").
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", self.name).rmdir()
        return self.proc.returncode

    # -- inside --------------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 300.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """argv inside the machine, as its root, with a clean environment."""
        assert self.init_pid, "the machine is not booted"
        r = subprocess.run(["nsenter", "--target", str(self.init_pid), "--all", "--",
                            "env", "-i", *(f"{k}={v}" for k, v in INSIDE_ENV.items()), *argv],
                           input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode} inside the machine:\n{r.stdout}{r.stderr}")
        return r

    def path(self, inside: str) -> Path:
        """A path inside the machine, as the host reaches it."""
        return Path(f"/proc/{self.init_pid}/root") / inside.lstrip("/")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` properties; timestamps in microseconds UTC (parse with `timestamp`)."""
        out = self.run("systemctl", "show", "--timestamp=us+utc", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, since_cursor: str | None = None) -> list[str]:
        argv = ["journalctl", "--no-pager", "-o", "cat", "-u", unit]
        return self.run(*argv, *(["--after-cursor", since_cursor] if since_cursor else [])).stdout.splitlines()


def timestamp(value: str) -> float:
    """A `systemctl show --timestamp=us+utc` value ("Fri 2026-12-04 18:10:00.123456 UTC") as a Unix time."""
    m = re.fullmatch(r"\w{3} (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) UTC", value.strip())
    assert m, f"not a us+utc timestamp: {value!r}"
    y, mo, d, h, mi, s, us = (int(g) for g in m.groups())
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) + us / 1e6


def exposure(text: str, unit: str) -> tuple[float, str]:
    """The `systemd-analyze security` overall figure and its word (e.g. 1.4, "OK")."""
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+(?:\.\d+)?) (\w+)", text)
    assert m, text[-2000:]
    return float(m.group(1)), m.group(2)
