"""The container image, built and run for real: podman (Debian's packages) as root, offline.

What is proved, in one pass because each step needs the one before it (a build is about a minute):
  - packaging/container/Containerfile builds with `--network=none` from this checkout's wheel and its
    pinned dependencies' wheels (built on the host), on a bookworm base made by debootstrap; its own
    `mediaseal --help` step is part of the build, so a wheel missing a subpackage fails here;
  - built with `--format docker`, the image keeps its HEALTHCHECK, its numeric non-root USER and
    STOPSIGNAL;
  - run with a read-only root, /tmp a tmpfs and user 10001, the agent seals a recording dropped into
    the capture volume and delivers it to a filesystem repository on another volume, using only the
    public side of a keyring made on the host; the host decrypts the package to the same bytes;
  - `podman healthcheck run` (the image's own check, exec'd inside) passes;
  - SIGTERM (`podman stop`) ends it with exit code 0, inside the stop timeout.

The adjustments to this machine (local base, host wheels, runc without rlimits) are in
container_support; the test skips, saying why, without root or when the tools can't be installed.
Build and run times are printed and recorded as properties (build_seconds, run_seconds, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import secrets_audit
from agent_harness import PASSPHRASE, drop, packages, write_config
from container_support import DEBIAN_TOOLS, ROOT, ContainerAgent, base_image, host_wheels, podman, remove
from debian_root import require_root_tools

CONTAINERFILE = ROOT / "packaging" / "container" / "Containerfile"
UID = 10001  # the image's USER (numeric, so a runtime can check runAsNonRoot)
STOP_TIMEOUT = 60  # seconds podman waits after SIGTERM before SIGKILL (the agent drains within 10)
CEILING = 300.0  # generous: 8 sessions share 2 cores


def mediaseal(*args: str) -> subprocess.CompletedProcess[str]:
    """This venv's installed mediaseal (the same wheel as the image's)."""
    r = subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", *args], capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, f"mediaseal {args[0]} exited {r.returncode}: {r.stderr[-2000:]}"
    return r


@pytest.fixture
def made() -> Iterator[dict[str, list[str]]]:
    """What the test created in podman (containers, images), removed afterwards even when it fails."""
    names: dict[str, list[str]] = {"container": [], "image": []}
    yield names
    remove("container", names["container"])
    remove("image", names["image"])


def owned_dir(path: Path, mode: int = 0o700) -> Path:
    """A host directory the container's user owns (podman as root maps UIDs one to one)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    path.chmod(mode)
    return path


def public_keyring(tmp_path: Path, into: Path) -> Path:
    """A keyring made on the host with `mediaseal keys init`; only its public side goes to the container."""
    full = tmp_path / "custody" / "keyring"
    full.parent.mkdir(mode=0o700)
    passphrase = full.parent / "passphrase"
    passphrase.write_bytes(PASSPHRASE)
    mediaseal("keys", "init", "--keyring", str(full), "--passphrase-file", str(passphrase))
    public = into / "keyring"
    shutil.copytree(full, public, ignore=lambda d, names: [n for n in names if n in ("private", "master.key")])
    assert not (public / "private").exists() and (public / "keyring.json").is_file()
    for p in [public, *public.rglob("*")]:
        os.chown(p, UID, UID)
    return full


# A first run also debootstraps the base (about 3 minutes here) and fetches the dependency wheels.
@pytest.mark.timeout(3600)
def test_the_image_builds_offline_and_runs_read_only_as_its_user(
        tmp_path: Path, made: dict[str, list[str]], record_property: Callable[[str, object], None]) -> None:
    require_root_tools(*DEBIAN_TOOLS)
    started = time.monotonic()
    base = base_image()
    wheels = host_wheels(tmp_path / "wheels")
    prepared = time.monotonic()

    run_id = uuid.uuid4().hex[:12]
    image, container = f"localhost/mediaseal-test:{run_id}", f"mediaseal-test-{run_id}"
    made["image"].append(image)
    # --layers=false: no unnamed image per stage is left behind (a fresh wheel defeats the layer cache
    # anyway), --force-rm: nor a build container when a step fails; --pull=never: the base is local.
    podman("build", "--format", "docker", "--layers=false", "--force-rm", "--network=none", "--pull=never",
           "--volume", f"{wheels}:/wheels:ro", "--build-arg", f"PYTHON_IMAGE={base}",
           "--file", str(CONTAINERFILE), "--tag", image, str(ROOT), timeout=1800)
    built = time.monotonic()

    versions = {tool: subprocess.run([tool, "--version"], capture_output=True, text=True, check=True,
                                     timeout=60).stdout.splitlines()[0] for tool in ("podman", "runc")}
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    assert info["Config"]["User"] == f"{UID}:{UID}" and info["Config"]["StopSignal"] == "SIGTERM"
    assert (info.get("Healthcheck") or {}).get("Test"), "HEALTHCHECK lost (an OCI-format build drops it)"

    # The volumes: capture, state (spool + the keyring's public side), repository; the config read-only.
    capture = owned_dir(tmp_path / "recordings", 0o750)
    calls = owned_dir(capture / "calls", 0o750)
    state = owned_dir(tmp_path / "state")
    repository = owned_dir(tmp_path / "repository")
    etc = tmp_path / "etc"
    etc.mkdir()
    keyring = public_keyring(tmp_path, state)
    write_config(etc / "mediaseal.toml", {
        "agent": {"id": "container-test", "log_format": "json", "rescan_seconds": 5.0},
        "watch": [{"path": "/srv/recordings/calls", "kind": "call", "pattern": "*.wav", "completion": "rename"}],
        "buffer": {"path": "/var/lib/mediaseal/buffer"},
        "keys": {"keyring": "/var/lib/mediaseal/keyring"},
        "repository": {"url": "file:///srv/repository"},
    })
    (etc / "mediaseal.toml").chmod(0o644)
    etc.chmod(0o755)

    made["container"].append(container)
    podman("run", "--detach", "--name", container, "--read-only", "--tmpfs", "/tmp", "--user", f"{UID}:{UID}",
           "--network=none", "--log-driver", "k8s-file",
           "--volume", f"{capture}:/srv/recordings", "--volume", f"{state}:/var/lib/mediaseal",
           "--volume", f"{repository}:/srv/repository", "--volume", f"{etc}:/etc/mediaseal:ro", image)
    log = ContainerAgent(container)
    try:
        (ctr,) = json.loads(podman("container", "inspect", container).stdout)
        assert ctr["HostConfig"]["ReadonlyRootfs"] is True and ctr["Config"]["User"] == f"{UID}:{UID}"
        log.wait_for("ready", CEILING)
        data = secrets.token_bytes(300_000)
        digest = drop(calls, "call-0001.wav", data)
        (delivered,) = log.wait_for("delivered", CEILING)
        ran = time.monotonic()
        (package,) = packages(repository)
        assert delivered["path"] == "/srv/recordings/calls/call-0001.wav"
        assert package == repository / delivered["key"]

        out = tmp_path / "decrypted.wav"
        mediaseal("decrypt", "--keyring", str(keyring), "--passphrase-file", str(keyring.parent / "passphrase"),
                  "-o", str(out), str(package))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
        assert not (calls / "call-0001.wav").exists(), "dispose = delete (the default) left the source"

        health = podman("healthcheck", "run", container, check=False, timeout=120)
        assert health.returncode == 0, f"healthcheck: {health.stdout}{health.stderr}\n{log.tail()}"

        stopping = time.monotonic()
        podman("stop", "--time", str(STOP_TIMEOUT), container, timeout=STOP_TIMEOUT + 120)
        stopped = time.monotonic()
        log.wait_for("stopped", CEILING)
    finally:
        log.kill()
        secrets_audit.REGISTRY.text("the container's log", "\n".join(log.lines))
    state_doc = json.loads(podman("inspect", "--format", "{{json .State}}", container).stdout)
    assert state_doc["ExitCode"] == 0, f"exit {state_doc['ExitCode']} after SIGTERM:\n{log.tail()}"
    assert stopped - stopping < STOP_TIMEOUT, "podman had to SIGKILL: the agent did not stop on SIGTERM"

    times = {"prepare_seconds": prepared - started, "build_seconds": built - prepared,
             "run_seconds": ran - built, "stop_seconds": stopped - stopping}
    for name, seconds in times.items():
        record_property(name, round(seconds, 1))
    record_property("versions", versions)
    print("container tier: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f"; {versions}")
