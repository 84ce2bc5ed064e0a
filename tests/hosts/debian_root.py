"""Debian bookworm root filesystems for the host tiers (container image base, systemd-nspawn machine).

No container registry is reachable here, so the roots come from debootstrap against the Debian mirror
this host's own apt already uses (read from its sources, never written into the repository). A root is
built once per package set and kept under /var/tmp (a half-built one is never used: it is built under
a temporary name and renamed into place), so a second run starts in seconds.

Everything here needs root and a reachable mirror; `require_root_tools` skips with the reason
otherwise, as the tiers promise.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("MEDIASEAL_HOSTS_CACHE", "/var/tmp/mediaseal-hosts"))
SUITE = "bookworm"


def apt_mirror() -> str:
    """The first Debian archive URI (not the security archive) this host's apt is configured with."""
    uris: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        uris += re.findall(r"^URIs:\s*(\S+)", path.read_text(), flags=re.M)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        uris += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + SUITE, legacy.read_text(), flags=re.M)
    for uri in uris:
        if "security" not in uri:
            return uri
    pytest.skip("no Debian mirror in this host's apt sources: the host tiers need one for debootstrap")


def require_root_tools(*debian_packages: str) -> None:
    """Skip unless root; install the named Debian packages (with apt-get) if their tools are missing."""
    if os.geteuid() != 0:
        pytest.skip("the host tiers need root (debootstrap, podman, systemd-nspawn)")
    if shutil.which("apt-get") is None:
        pytest.skip("the host tiers install their tools with apt-get, which this host lacks")
    missing = [p for p in debian_packages if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p],
               capture_output=True, text=True, check=False).stdout != "install ok installed"]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True, check=False,
                            timeout=600)
    install = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env,
                             capture_output=True, text=True, check=False, timeout=1200)
    if install.returncode != 0:
        pytest.skip(f"could not install {' '.join(missing)} with apt-get "
                    f"({(install.stderr or update.stderr).strip().splitlines()[-1:]})")


def debian_root(name: str, include: Sequence[str] = ()) -> Path:
    """A bookworm minbase root with `include` installed, built once and reused (read it, never write it).

    Callers that change the root (install a package into it) copy it first (`cp -a --reflink=auto`)
    or boot it with an overlay (systemd-nspawn --overlay / --volatile), so the cached root stays clean.
    """
    require_root_tools("debootstrap")
    key = hashlib.sha256("\n".join([SUITE, *sorted(include)]).encode()).hexdigest()[:12]
    root = CACHE / f"{name}-{SUITE}-{key}"
    if (root / ".mediaseal-complete").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(include)}" if include else "",
            SUITE, str(partial), apt_mirror()]
    r = subprocess.run([a for a in argv if a], capture_output=True, text=True, check=False, timeout=1800)
    if r.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        pytest.fail(f"debootstrap of {name} failed (exit {r.returncode}): {' | '.join(tail)}")
    (partial / ".mediaseal-complete").write_text(f"{SUITE} {' '.join(sorted(include))}\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root
