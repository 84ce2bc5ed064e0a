"""podman for the container tier, adjusted to the test hosts: a local base image, host-built wheels, runc.

Three things stand between podman from Debian's packages and this machine, and each is handled here
rather than in the Containerfile (which stays what a user with a registry builds):
  - no registry is reachable, so the base image is a debootstrap bookworm root (python3, python3-venv)
    imported with `podman import`, tagged by the root's own name (a different package set is a
    different tag; the base stays cached between runs, the images a test builds do not);
  - no PyPI inside the build (`--network=none`): the wheels are built on the host, for its Python,
    which is the image's too (bookworm's python3 is 3.11), and mounted at /wheels;
  - crun fails here ("cgroups in hybrid mode not supported") and runc fails on setrlimit, so every
    podman call names the `runc-no-rlimits` wrapper beside this file as its runtime (by absolute
    path: podman reads a relative one as the name of a configured runtime).

Every podman call has a ceiling (the machine is shared and slow at times); a failed one fails the
test with podman's own words.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from debian_root import CACHE, debian_root
from support import process

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = Path(__file__).resolve().with_name("runc-no-rlimits")
BASE_PACKAGES = ("python3", "python3-venv")  # the venv module (and its bundled pip) for the build stage
DEBIAN_TOOLS = ("podman", "runc", "debootstrap")


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`podman --runtime <wrapper> ARGS`; with `check` a non-zero exit fails the test, quoting podman."""
    r = subprocess.run(["podman", "--runtime", str(RUNTIME), *args], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if check and r.returncode != 0:
        pytest.fail(f"podman {' '.join(args[:2])} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
    return r


def base_image() -> str:
    """The bookworm base (debootstrap root imported into podman), built and imported once."""
    root = debian_root("container-base", BASE_PACKAGES)
    tag = f"localhost/mediaseal-base:{root.name}"
    if podman("image", "exists", tag, check=False, timeout=120).returncode == 0:
        return tag
    # The apt caches are of no use in an image; the marker file is the cache's, not the root's.
    tar = subprocess.run(["tar", "-C", str(root), "--exclude=./var/cache/apt/archives/*.deb",
                          "--exclude=./var/lib/apt/lists/*_Packages", "--exclude=./.mediaseal-complete", "-c", "."],
                         capture_output=True, check=True, timeout=600)
    r = subprocess.run(["podman", "import", "-", tag], input=tar.stdout, capture_output=True, check=False,
                       timeout=600)
    if r.returncode != 0:
        pytest.fail(f"podman import of {root} failed: {r.stderr.decode(errors='replace')[-2000:]}")
    return tag


def _pip(*args: str, timeout: float = 1200) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                       text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        pytest.fail(f"pip {args[0]} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def host_wheels(into: Path) -> Path:
    """`into` holding this checkout's wheel and every pinned dependency's wheel (for `pip --no-index`).

    The checkout's wheel is built fresh (what the test tests); the dependencies' are kept under the
    host cache, keyed by what decides them (constraints.txt and pyproject.toml). setuptools leaves
    build/lib and an egg-info in the tree: both are removed before and after, as `make wheel` does,
    so a module deleted since the last build can't ride along in the wheel.
    """
    def clean() -> None:
        for leftover in [ROOT / "build" / "lib", *ROOT.glob("build/bdist.*"), *ROOT.glob("*.egg-info")]:
            shutil.rmtree(leftover, ignore_errors=True)

    into.mkdir(parents=True, exist_ok=True)
    clean()
    try:
        _pip("wheel", "-q", "--no-deps", "-w", str(into), str(ROOT))
    finally:
        clean()
    (wheel,) = into.glob("mediaseal-*.whl")
    key = hashlib.sha256((ROOT / "constraints.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes())
    deps = CACHE / f"wheels-py{sys.version_info.major}{sys.version_info.minor}-{key.hexdigest()[:12]}"
    if not (deps / ".complete").exists():
        partial = deps.with_name(deps.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _pip("wheel", "-q", "-c", str(ROOT / "constraints.txt"), "-w", str(partial), str(wheel))
        for own in partial.glob("mediaseal-*.whl"):
            own.unlink()
        (partial / ".complete").touch()
        shutil.rmtree(deps, ignore_errors=True)
        partial.rename(deps)
    for dep in deps.glob("*.whl"):
        shutil.copy2(dep, into / dep.name)
    return into


class ContainerAgent(process.Child):
    """The agent inside a container, followed through `podman logs -f` (whose stderr is the agent's).

    support.process.Child's event reading and `wait_for` apply unchanged; only the process differs: it
    is podman's log stream, which ends when the container stops (so `wait_for` reports an exit as for
    any child), and stopping or killing it leaves the container alone (podman stop does that).
    """

    def __init__(self, container: str) -> None:
        super().__init__(["podman", "logs", "--follow", container], name="the container's log")

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.lines[-n:])


def remove(kind: str, names: Sequence[str]) -> None:
    """Best-effort clean-up of containers (kind "container") or images ("image") a test made."""
    if names:
        podman(kind, "rm", "-f", *names, check=False, timeout=300)
