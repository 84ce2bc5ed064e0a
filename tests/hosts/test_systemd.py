"""The Debian package and the systemd unit on a real systemd: a bookworm root booted by systemd-nspawn.

What an operator of a premises host does, done here end to end:
1. `make deb` (packaging/debian/build-deb.sh) builds dist/mediaseal_<v>_amd64.deb;
2. `apt-get install ./mediaseal_<v>_amd64.deb` in a booted bookworm: the venv under /opt/mediaseal,
   the units (byte for byte those of packaging/systemd/), the `mediaseal` system user,
   /etc/mediaseal with the example config, and nothing enabled or started;
3. the config edited, the key set from the custodian installed, a site drop-in
   (packaging/systemd/site-paths.conf, plus a test drop-in: a shorter WatchdogSec, a faster restart);
4. `systemctl start mediaseal`: Type=notify readiness, a recording delivered, a SIGSTOPped agent
   killed by the watchdog and restarted, `systemd-analyze security` of the running unit.
A second, unbooted install (how an image build installs packages: no running systemd) proves the
maintainer scripts need none, and that purge keeps the spool.

This host: a Firecracker VM whose PID 1 is not systemd (`systemd-detect-virt` in the sandbox says
"docker"), with cgroups in hybrid mode (v1 controllers plus a name=systemd v1 hierarchy, cgroup2 at
/sys/fs/cgroup/unified). crun's "hybrid mode not supported" is crun's own limit: systemd-nspawn 252
boots bookworm's systemd 252 either in a copy of the hybrid layout (its default here) or, as these
tests do, on the pure cgroup2 layout a bookworm host runs (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1). With
no systemd and no D-Bus on the host, nspawn runs with --keep-unit (no scope unit asked for) and
--register=no (no systemd-machined); see tests/hosts/nspawn_support.py. Where the machine cannot
boot, the booted tests skip with nspawn's own last words.

Needs root, apt-get and a Debian mirror (tests/hosts/debian_root.py); skips with the reason otherwise.
Times (first run builds the root and the .deb; later runs reuse the root): see record_property.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import PASSPHRASE, decrypt_all, make_keyring, write_config
from debian_root import debian_root, require_root_tools
from nspawn_support import ROOT, Machine, build_deb, exposure, timestamp
from support.waits import wait_until

pytestmark = pytest.mark.timeout(3600)  # the first run builds a root (minutes) and the .deb (minutes)

UNITS = ROOT / "packaging" / "systemd"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
ROOT_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3"]  # the .deb's Depends, and a booting systemd
DEB_DIR = "/mnt/mediaseal-deb"
WATCHDOG_SEC = 10  # the test drop-in's (the unit ships 30 s)
TEST_DROPIN = f"""[Service]
# test only: the repository is a directory here, the watchdog bites sooner, restarts come faster
ReadWritePaths=/srv/repository
WatchdogSec={WATCHDOG_SEC}s
RestartSec=1s
"""
CAPTURE = "/srv/recordings/calls"
REPOSITORY = "/srv/repository"


def documented_bound() -> float:
    """The exposure bound docs/OPERATIONS.md states for the agent's unit ("... fails above 2.0")."""
    m = re.search(r"fails above (\d+(?:\.\d+)?)", OPERATIONS.read_text())
    assert m, "docs/OPERATIONS.md no longer states the systemd-analyze security bound"
    return float(m.group(1))


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    return {}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]) -> Path:
    require_root_tools("systemd-container", "debootstrap", "python3-venv")
    path, seconds = build_deb(tmp_path_factory.mktemp("deb"))
    timings["deb_build_seconds"] = seconds
    return path


@pytest.fixture(scope="module")
def root(timings: dict[str, float]) -> Path:
    require_root_tools("systemd-container", "debootstrap")
    started = time.monotonic()
    path = debian_root("systemd", include=ROOT_PACKAGES)
    timings["root_seconds"] = time.monotonic() - started
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A custodian's keyring (on the host) and the signed key set it publishes (keyset.json + signer.pem)."""
    work = tmp_path_factory.mktemp("keys")
    keyring = make_keyring(work / "keyring")
    (work / "passphrase").write_bytes(PASSPHRASE)
    (work / "publish").mkdir()
    r = subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", "keys", "publish", "--keyring", str(keyring),
                        "--passphrase-file", str(work / "passphrase"), "-o", str(work / "publish" / "keyset.json")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return keyring, work / "publish"


@pytest.fixture(scope="module")
def machine(root: Path, deb: Path, tmp_path_factory: pytest.TempPathFactory,
            timings: dict[str, float]) -> Iterator[Machine]:
    """The booted machine (the package's directory bound read-only at DEB_DIR); powered off at the end."""
    started = time.monotonic()
    log = tmp_path_factory.mktemp("nspawn") / "console.log"
    with Machine(root, f"mediaseal-{os.getpid()}", log, bind_ro={deb.parent: DEB_DIR}) as m:
        timings["boot_seconds"] = time.monotonic() - started
        yield m


@pytest.fixture(scope="module")
def installed(machine: Machine, deb: Path, timings: dict[str, float]) -> str:
    """The package installed as an operator does (`apt-get install ./x.deb`); apt's output."""
    started = time.monotonic()
    r = machine.run("apt-get", "install", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb.name}", timeout=1200)
    timings["install_seconds"] = time.monotonic() - started
    return r.stdout


def test_the_package_installs_the_venv_units_user_and_config_and_starts_nothing(machine: Machine,
                                                                                installed: str) -> None:
    assert "installed, not started" in installed, installed
    for unit in ("mediaseal.service", "mediaseal-lkm.service", "mediaseal-rotate.service", "mediaseal-rotate.timer"):
        assert machine.path(f"/lib/systemd/system/{unit}").read_bytes() == (UNITS / unit).read_bytes(), unit
        # Not enabled (the rotation service has no [Install]: only its timer starts it), not running.
        assert machine.run("systemctl", "is-enabled", unit, check=False).stdout.strip() in ("disabled", "static"), unit
        assert machine.run("systemctl", "is-active", unit, check=False).stdout.strip() == "inactive", unit
    show = machine.show("mediaseal.service", "ActiveState", "LoadState", "NRestarts")
    assert show == {"ActiveState": "inactive", "LoadState": "loaded", "NRestarts": "0"}, show

    user = machine.run("getent", "passwd", "mediaseal").stdout.strip().split(":")
    assert user[0] == "mediaseal" and int(user[2]) < 1000 and user[5:] == ["/var/lib/mediaseal", "/usr/sbin/nologin"]
    assert machine.run("stat", "-c", "%U:%G %a", "/etc/mediaseal", "/etc/mediaseal/mediaseal.toml").stdout.split(
        "\n")[:2] == ["root:mediaseal 750", "root:mediaseal 640"]
    example = ROOT / "packaging" / "mediaseal.example.toml"
    assert machine.path("/etc/mediaseal/mediaseal.toml").read_bytes() == example.read_bytes()
    conffiles = machine.run("dpkg-query", "-W", "-f=${Conffiles}", "mediaseal").stdout
    assert "/etc/mediaseal/mediaseal.toml" in conffiles

    # dpkg owns the whole venv and every file is as built; the command runs as the agent's user.
    assert machine.run("dpkg", "--verify", "mediaseal").stdout == ""
    assert machine.run("dpkg", "-S", "/opt/mediaseal/bin/mediaseal").stdout.startswith("mediaseal:")
    r = machine.run("setpriv", "--reuid=mediaseal", "--regid=mediaseal", "--clear-groups",
                    "/opt/mediaseal/bin/mediaseal", "--help")
    assert "run" in r.stdout
    assert not machine.path("/var/lib/mediaseal").exists(), "the spool appears only when the unit first starts"


def configure(machine: Machine, keys: tuple[Path, Path]) -> None:
    """What the operator does after installing: key set, config, capture and repository paths, drop-ins."""
    _, publish = keys
    for name in ("keyset.json", "signer.pem"):
        machine.path(f"/etc/mediaseal/{name}").write_bytes((publish / name).read_bytes())
    config = machine.path("/etc/mediaseal/mediaseal.toml")  # rewritten in place: owner and mode stay
    write_config(config, {
        "agent": {"id": "nspawn-edge-01", "log_format": "json", "rescan_seconds": 5.0},
        "watch": [{"path": CAPTURE, "kind": "call", "pattern": "*.wav", "completion": "rename",
                   "dispose": "delete"}],
        "buffer": {"path": "/var/lib/mediaseal/buffer"},
        "keys": {"keyset": "/etc/mediaseal/keyset.json", "signer": "/etc/mediaseal/signer.pem"},
        "repository": {"url": f"file://{REPOSITORY}"},
        "metrics": {"listen": "127.0.0.1:9464"},
    })
    machine.run("install", "-d", "-o", "mediaseal", "-g", "mediaseal", "-m", "2770", "/srv/recordings", CAPTURE)
    machine.run("install", "-d", "-o", "mediaseal", "-g", "mediaseal", "-m", "0700", REPOSITORY)
    dropins = machine.path("/etc/systemd/system/mediaseal.service.d")
    dropins.mkdir(parents=True, exist_ok=True)
    (dropins / "site-paths.conf").write_bytes((UNITS / "site-paths.conf").read_bytes())  # as documented
    (dropins / "zz-test.conf").write_text(TEST_DROPIN)
    machine.run("systemctl", "daemon-reload")


def agent_events(machine: Machine, name: str) -> list[dict[str, Any]]:
    """The agent's JSON log events of that name, from the journal."""
    out: list[dict[str, Any]] = []
    for line in machine.journal("mediaseal.service"):
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == name:
                out.append(doc)
    return out


def event_time(doc: dict[str, Any]) -> float:
    """An agent log line's `ts` ("2026-12-04T18:10:00.123Z", truncated to the millisecond)."""
    base, ms = doc["ts"].rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


@pytest.fixture(scope="module")
def started(machine: Machine, installed: str, keys: tuple[Path, Path]) -> dict[str, str]:
    """The unit started once, as the operator would (`systemctl start` returns when the unit is active)."""
    configure(machine, keys)
    r = machine.run("systemctl", "start", "mediaseal.service", check=False, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"systemctl start failed ({r.returncode}): {r.stderr}\n"
                             + "\n".join(machine.journal("mediaseal.service")[-30:]))
    return machine.show("mediaseal.service", "Type", "ActiveState", "SubState", "StatusText", "MainPID",
                        "ExecMainStartTimestamp", "ActiveEnterTimestamp", "NRestarts")


def test_the_unit_is_active_only_after_the_agent_said_ready(machine: Machine, started: dict[str, str],
                                                            record_property: Any) -> None:
    assert started["Type"] == "notify"
    assert (started["ActiveState"], started["SubState"]) == ("active", "running"), started
    # STATUS= as sent with READY=1: the spool's queue, not a start-up phase.
    assert "awaiting delivery" in started["StatusText"], started
    # The agent logs "ready" just before it sends READY=1. Type=notify puts the unit's activation after
    # that line; a unit that did not wait (Type=simple/exec) would be active at exec, before Python and
    # the agent's recovery and key load had even started.
    exec_at, active_at = timestamp(started["ExecMainStartTimestamp"]), timestamp(started["ActiveEnterTimestamp"])
    ready_at = max(event_time(e) for e in agent_events(machine, "ready"))  # this start's (the only one yet)
    assert exec_at <= ready_at + 0.001 and ready_at <= active_at, (exec_at, ready_at, active_at)
    record_property("start_to_ready_seconds", round(active_at - exec_at, 3))
    print(f"exec -> READY=1 -> active: {active_at - exec_at:.3f}s")
    # The agent's own readiness endpoint agrees (loopback inside the private network).
    probe = ("import urllib.request as u; r = u.urlopen('http://127.0.0.1:9464/readyz', timeout=30); "
             "print(r.status, r.read().decode())")
    assert machine.run("python3", "-c", probe).stdout.startswith("200 ")


def drop_recording(machine: Machine, name: str, data: bytes) -> str:
    """A well-behaved producer inside the machine: a temp name, then rename. Returns the SHA-256."""
    capture = machine.path(CAPTURE)
    (capture / f"{name}.part").write_bytes(data)
    os.rename(capture / f"{name}.part", capture / name)
    return hashlib.sha256(data).hexdigest()


def test_a_recording_is_sealed_and_delivered(machine: Machine, started: dict[str, str],
                                             keys: tuple[Path, Path]) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = drop_recording(machine, "call-0001.wav", data)
    repository = machine.path(REPOSITORY)
    wait_until(lambda: list(repository.rglob("*.mseal")), what="a package in the repository", timeout=180)
    wait_until(lambda: not (machine.path(CAPTURE) / "call-0001.wav").exists(), what="the source disposed of",
               timeout=180)
    keyring, _ = keys
    assert decrypt_all(repository, keyring) == {"call-0001.wav": [digest]}
    wait_until(lambda: agent_events(machine, "delivered"), what="the delivery logged", timeout=60)


def test_a_stopped_agent_is_killed_by_the_watchdog_and_restarted(machine: Machine, started: dict[str, str],
                                                                 keys: tuple[Path, Path],
                                                                 record_property: Any) -> None:
    before = machine.show("mediaseal.service", "MainPID", "NRestarts", "ActiveState")
    assert before["ActiveState"] == "active", before
    stopped_at = time.monotonic()
    machine.run("sh", "-c", 'kill -STOP "$1"', "sh", before["MainPID"])  # wedged: no more WATCHDOG=1

    def restarted() -> dict[str, str] | None:
        now = machine.show("mediaseal.service", "MainPID", "NRestarts", "ActiveState", "SubState")
        fresh = now["MainPID"] not in ("0", before["MainPID"])
        return now if int(now["NRestarts"]) > int(before["NRestarts"]) and fresh and now["ActiveState"] == "active" \
            else None

    after = wait_until(restarted, what="the watchdog's restart", timeout=WATCHDOG_SEC + 45 + 240, interval=0.5)
    seconds = time.monotonic() - stopped_at
    record_property("watchdog_restart_seconds", round(seconds, 1))
    print(f"SIGSTOP -> watchdog kill -> active again: {seconds:.1f}s (WatchdogSec={WATCHDOG_SEC}s)")
    # The last ping came at most WatchdogSec/3 before the stop.
    assert seconds >= WATCHDOG_SEC * 2 / 3 - 0.5, "restarted before the watchdog could have expired"
    journal = "\n".join(machine.journal("mediaseal.service"))
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal, journal[-3000:]
    # Killed with SIGABRT, but no core dump: its memory holds DEKs and plaintext (LimitCORE=0; without
    # it the kernel writes /var/lib/mediaseal/core here, core_pattern being "core").
    assert machine.show("mediaseal.service", "LimitCORE")["LimitCORE"] == "0"
    cores = machine.run("find", "/", "-xdev", "-type", "f", "(", "-name", "core", "-o", "-name", "core.[0-9]*", ")",
                        check=False).stdout
    assert cores.strip() == "", cores
    # The restarted agent still delivers.
    data = os.urandom(256 * 1024)
    digest = drop_recording(machine, "call-0002.wav", data)
    repository = machine.path(REPOSITORY)
    wait_until(lambda: len(list(repository.rglob("*.mseal"))) == 2, what="the second package", timeout=180)
    keyring, _ = keys
    assert decrypt_all(repository, keyring)["call-0002.wav"] == [digest]
    assert after["SubState"] == "running"


def test_an_upgrade_stops_and_restarts_the_running_agent_and_keeps_the_config(machine: Machine, deb: Path,
                                                                             started: dict[str, str]) -> None:
    """prerm stops a running agent before its venv is replaced (it imports lazily), postinst starts it
    again; the operator's edited conffile and ownership stay."""
    before = machine.show("mediaseal.service", "MainPID", "NRestarts", "ActiveState")
    assert before["ActiveState"] == "active", before
    config = machine.path("/etc/mediaseal/mediaseal.toml").read_bytes()
    machine.run("apt-get", "install", "-y", "--reinstall", f"{DEB_DIR}/{deb.name}", timeout=1200)
    after = machine.show("mediaseal.service", "MainPID", "NRestarts", "ActiveState")
    assert after["ActiveState"] == "active" and after["MainPID"] != before["MainPID"], (before, after)
    # An explicit start resets systemd's count of automatic restarts: a stop and a start, not a failure's.
    assert after["NRestarts"] == "0", (before, after)
    assert machine.path("/etc/mediaseal/mediaseal.toml").read_bytes() == config
    assert machine.run("stat", "-c", "%U:%G %a", "/etc/mediaseal/mediaseal.toml").stdout.strip() == "root:mediaseal 640"
    assert not machine.path("/run/mediaseal-deb").exists()
    journal = machine.journal("mediaseal.service")
    assert any("Stopped mediaseal.service" in line for line in journal), journal[-20:]


def test_systemd_analyze_security_rates_the_running_unit(machine: Machine, started: dict[str, str],
                                                         record_property: Any) -> None:
    assert machine.show("mediaseal.service", "ActiveState")["ActiveState"] == "active"
    r = machine.run("systemd-analyze", "security", "--no-pager", "mediaseal.service", check=False)
    score, word = exposure(r.stdout, "mediaseal.service")
    record_property("systemd_exposure_running", score)
    print(f"systemd-analyze security mediaseal.service (running, with the drop-ins): {score} {word}")
    assert score <= documented_bound(), r.stdout


def test_timings(timings: dict[str, float], machine: Machine, record_property: Any) -> None:
    """Not a check: the tier's times, for the report (0 means reused: a cached root, a given .deb)."""
    for key, value in sorted(timings.items()):
        record_property(key, round(value, 1))
    print("; ".join(f"{k} {v:.1f}s" for k, v in sorted(timings.items())))


def test_an_unbooted_install_and_purge_need_no_running_systemd(root: Path, deb: Path,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """How an image build installs packages (systemd not running): the user is still made, nothing
    started; purge removes the config but never the spool (it may hold undelivered packages)."""
    script = f"""set -e
apt-get install -y --no-install-recommends {DEB_DIR}/{deb.name}
getent passwd mediaseal
setpriv --reuid=mediaseal --regid=mediaseal --clear-groups /opt/mediaseal/bin/mediaseal --help >/dev/null
install -d -o mediaseal -g mediaseal -m 0700 /var/lib/mediaseal/buffer
touch /var/lib/mediaseal/buffer/undelivered.mseal
apt-get purge -y mediaseal
test ! -e /etc/mediaseal && test ! -e /opt/mediaseal && test ! -e /lib/systemd/system/mediaseal.service
test -e /var/lib/mediaseal/buffer/undelivered.mseal
test -z "$(dpkg-statoverride --list '/etc/mediaseal*')"
echo unbooted-ok
"""
    r = subprocess.run(["systemd-nspawn", "--quiet", "--keep-unit", "--register=no", "--private-network",
                        "--volatile=overlay", f"--bind-ro={deb.parent}:{DEB_DIR}", "-D", str(root),
                        "/bin/sh", "-c", script], capture_output=True, text=True, timeout=1800, check=False)
    assert r.returncode == 0 and "unbooted-ok" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert "installed, not started" in r.stdout
