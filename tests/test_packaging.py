"""Packaging and docs: the systemd unit (systemd-analyze verify and security), the Containerfile's
structure (tests/hosts/test_container.py builds and runs the image, as root), the example config,
and the docs that must not drift from the code (config reference, log events, metrics).

systemd-analyze: the unit names /opt/mediaseal/bin/mediaseal, which does not exist on a build
machine, and `verify` rightly complains about a missing executable. So a copy of each unit is
verified with that path pointed at this checkout's installed console script (same name, same
arguments); everything else is checked as shipped. Without systemd-analyze those tests skip, saying so
(`make test` installs it when it can: see the Makefile's `tools` target).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from agent_harness import ROOT, Agent, Setup, make_keyring

from mediaseal.agent import metrics
from mediaseal.agent.cli import build_parser
from mediaseal.agent.config import (
    AgentConfig,
    BufferConfig,
    KeysConfig,
    MetricsConfig,
    RepositoryConfig,
    WatchConfig,
    load_config,
)

SYSTEMD = ROOT / "packaging" / "systemd"
UNIT = SYSTEMD / "mediaseal.service"
CONTAINERFILE = ROOT / "packaging" / "container" / "Containerfile"
EXAMPLE = ROOT / "packaging" / "mediaseal.example.toml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
INSTALLED_PREFIX = "/opt/mediaseal/bin/"
MAX_EXPOSURE = 2.0

SECTIONS: dict[str, type[Any]] = {
    "agent": AgentConfig, "watch": WatchConfig, "buffer": BufferConfig, "keys": KeysConfig,
    "repository": RepositoryConfig, "metrics": MetricsConfig,
}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (make test installs it when run as root "
                                    "with apt-get; else install the 'systemd' package)")


# -- systemd -----------------------------------------------------------------------------------------


def source_folders() -> list[str]:
    """The top-level folders setup.py installs under the mediaseal root."""
    (folders,) = [ast.literal_eval(n.value) for n in ast.parse((ROOT / "setup.py").read_text()).body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "FOLDERS"]
    return list(folders)


def unit_directives(path: Path) -> dict[str, list[str]]:
    """`Key` -> every value it is given (in order), across sections; comments dropped."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def installed_script(name: str) -> Path:
    """This checkout's installed console script of that name (the venv's bin/)."""
    for d in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return d / name
    raise AssertionError(f"console script {name!r} is not installed beside {sys.executable}")


def unit_copies(tmp_path: Path) -> Path:
    """Every unit of packaging/systemd/, with /opt/mediaseal/bin/<x> pointed at the installed <x>."""
    out = tmp_path / "units"
    out.mkdir()
    for unit in SYSTEMD.iterdir():
        if unit.suffix not in (".service", ".timer", ".socket", ".path"):
            continue
        text = re.sub(re.escape(INSTALLED_PREFIX) + r"([\w.-]+)", lambda m: str(installed_script(m.group(1))),
                      unit.read_text())
        (out / unit.name).write_text(text)
    return out


def all_units() -> list[str]:
    return sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".timer", ".socket", ".path"))


def test_unit_is_a_hardened_notify_service() -> None:
    d = unit_directives(UNIT)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure" and "WatchdogSec" in one
    assert one.get("DynamicUser") == "yes" or one.get("User") not in (None, "", "root", "0")
    assert "StateDirectory" in one
    for key, want in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                      "NoNewPrivileges": "yes", "CapabilityBoundingSet": "CAP_LEASE",
                      "AmbientCapabilities": "CAP_LEASE"}.items():  # the open-writer check's lease, nothing else
        assert one.get(key) == want, key
    assert set(one["RestrictAddressFamilies"].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in d["SystemCallFilter"]
    argv = shlex.split(one["ExecStart"])
    assert argv[0] == INSTALLED_PREFIX + "mediaseal"
    args = build_parser().parse_args(argv[1:])  # a real command line of the installed script
    assert args.command == "run" and args.config is not None
    # Stopping must outlast the agent's own drain (stop_timeout_seconds) with room to spare.
    assert _seconds(one["TimeoutStopSec"]) > AgentConfig().stop_timeout_seconds + 10


def _seconds(text: str) -> float:
    units = {"min": 60, "s": 1, "ms": 0.001}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(min|ms|s)?", text)
    assert m, text
    return float(m.group(1)) * units[m.group(2) or "s"]


@needs_systemd_analyze
@pytest.mark.parametrize("unit", all_units())
def test_systemd_analyze_verify_prints_nothing(unit: str, tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    copies = unit_copies(tmp_path)
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copies / unit)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stdout + r.stderr


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_agent_unit(tmp_path: Path, record_property: Any) -> None:
    assert SYSTEMD_ANALYZE is not None
    copy = unit_copies(tmp_path) / UNIT.name
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(copy)],
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    record_property("systemd_exposure", exposure)
    print(f"systemd-analyze security: {exposure} {m.group(2)}")
    assert exposure <= MAX_EXPOSURE, r.stdout


# -- the container file -------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSPHRASE|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|AWS_", re.IGNORECASE)
SECRET_PATH = re.compile(r"keyring|\.pem\b|\.key\b|master\.key|\.aws|\.env\b|id_rsa|mediaseal-data", re.IGNORECASE)


def test_containerfile_is_multistage_slim_and_non_root() -> None:
    st = stages(CONTAINERFILE)
    assert len(st) >= 2, "multi-stage: build and runtime"
    final = st[-1]
    args = dict(a.partition("=")[::2] for k, a in instructions(CONTAINERFILE) if k == "ARG")
    base = final[0][1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert "slim" in base and "python" in base, base
    users = [a for k, a in final if k == "USER"]
    assert users, "the runtime stage sets USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    # Nothing runs as root after the switch, and the switch is numeric (runAsNonRoot can check it).
    after = final[[k for k, _ in final].index("USER"):]
    assert all(k != "RUN" for k, _ in after[1:])
    assert user.isdigit()


def test_containerfile_bakes_in_no_secrets() -> None:
    for k, a in instructions(CONTAINERFILE):
        if k in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][\w.-]*)=", a) or [a.split()[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], (k, a)
        if k in ("COPY", "ADD"):
            assert k == "COPY", "ADD can fetch URLs and unpack archives: COPY only"
            sources = [s for s in a.split() if not s.startswith("--")][:-1]
            assert not [s for s in sources if SECRET_PATH.search(s) or s in (".", "./")], a
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in ("**/keyring/", "**/*.pem", "**/*.key", "**/.env", "**/.aws/", "mediaseal-data/", "**/.venv",
                    "**/.git"):
        assert pattern in ignored, pattern


def test_containerfile_installs_every_package_and_its_entrypoint_exists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [*source_folders(), "setup.py"]
    build = stages(CONTAINERFILE)[0]
    copied = {s.rstrip("/") for k, a in build if k == "COPY" for s in a.split()[:-1] if not s.startswith("--")}
    assert set(packages) | {"pyproject.toml", "constraints.txt", project["project"]["readme"]} <= copied
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not copied & ignored, "a COPY source is excluded from the build context"

    final = stages(CONTAINERFILE)[-1]
    (entry,) = [exec_form(a) for k, a in final if k == "ENTRYPOINT"]
    (cmd,) = [exec_form(a) for k, a in final if k == "CMD"]
    assert entry[0].startswith(INSTALLED_PREFIX)
    script = entry[0].removeprefix(INSTALLED_PREFIX)
    target = project["project"]["scripts"][script]  # the console script the install creates
    module, _, func = target.partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    args = build_parser().parse_args([*entry[1:], *cmd])
    assert args.command == "run"
    r = subprocess.run([str(installed_script(script)), *entry[1:], *cmd[:1], "--help"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr


def test_containerfile_installs_from_wheels_without_an_index() -> None:
    """The install reads no index (an offline build mounts the host's wheels); only the fallback builds them."""
    (run,) = [a for k, a in stages(CONTAINERFILE)[0] if k == "RUN"]
    installs = [c for c in run.split("&&") if " install " in c]
    assert installs and all("--no-index" in c and "--find-links" in c and "-c constraints.txt" in c
                            for c in installs), run
    assert "/wheels" in run and run.rstrip().endswith("mediaseal --help > /dev/null")
    # podman/buildah drop HEALTHCHECK from an OCI-format image: the file says how to build it.
    assert "--format docker" in CONTAINERFILE.read_text()


def test_container_layout_is_read_only_root_friendly() -> None:
    final = stages(CONTAINERFILE)[-1]
    volumes = [v for k, a in final if k == "VOLUME" for v in exec_form(a)]
    env = {}
    for k, a in final:
        if k == "ENV":
            env.update(dict(shlex.split(p)[0].split("=", 1) for p in re.findall(r"\S+=\S+", a)))
    config_env = {k: v for k, v in env.items() if k.startswith("MEDIASEAL_")}
    # The example config, as the image's environment overrides it, is valid, and everything it writes
    # (spool, capture directories) is on a volume.
    cfg = load_config(EXAMPLE, config_env)
    writable = [cfg.buffer.path, *(w.path for w in cfg.watch)]
    for p in writable:
        assert any(p.is_relative_to(v) for v in volumes), (p, volumes)
    assert cfg.metrics.listen.startswith("0.0.0.0:")


def test_container_healthcheck_probes_the_real_health_endpoint(tmp_path: Path) -> None:
    final = stages(CONTAINERFILE)[-1]
    (hc,) = [a for k, a in final if k == "HEALTHCHECK"]
    cmd = exec_form(hc[hc.index("CMD") + 3:].strip())
    env = dict(shlex.split(p)[0].split("=", 1) for k, a in final if k == "ENV" for p in re.findall(r"\S+=\S+", a))
    port = env["MEDIASEAL_METRICS__LISTEN"].rpartition(":")[2]
    assert cmd[0].startswith(INSTALLED_PREFIX) and f"127.0.0.1:{port}/healthz" in cmd[-1]
    # Run the very command against a real agent (its listener on a free port instead of 9464).
    kr = make_keyring(tmp_path / "keyring")
    setup = Setup(root=tmp_path, keyring=kr, watches=[{"path": str(tmp_path / "capture"), "completion": "rename"}])
    agent = Agent(setup, env={"MEDIASEAL_METRICS__ENABLED": "true", "MEDIASEAL_METRICS__LISTEN": "127.0.0.1:0"})
    try:
        (ev,) = agent.wait_for("metrics-listening")
        probe = [str(installed_script(cmd[0].removeprefix(INSTALLED_PREFIX))), *cmd[1:-1],
                 cmd[-1].replace(f"127.0.0.1:{port}", ev["address"])]
        assert subprocess.run(probe, timeout=30, check=False).returncode == 0
    finally:
        assert agent.stop() == 0
    assert subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode != 0  # nobody home


# -- the example config and the docs ----------------------------------------------------------------------


def test_example_config_is_valid_and_mentions_every_key() -> None:
    cfg = load_config(EXAMPLE, {})
    assert cfg.keys.keyset is not None and cfg.repository.url.startswith("s3://")
    seen: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"\[\[?(\w+)\]\]?", line.strip()):
            section = m.group(1)
        elif m := re.match(r"#?\s?(\w+) = ", line):
            seen.setdefault(section, set()).add(m.group(1))
    for name, cls in SECTIONS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - seen.get(name, set())
        assert not missing, f"packaging/mediaseal.example.toml [{name}] does not mention {sorted(missing)}"


def env_name(section: str, key: str) -> str:
    if section == "watch":
        return f"MEDIASEAL_WATCH__<N>__{key.upper()}"
    return f"MEDIASEAL_{section.upper()}__{key.upper()}"


def default_text(f: dataclasses.Field[Any]) -> str:
    """How the config reference shows a key's default."""
    if f.default_factory is not dataclasses.MISSING:
        return "the host name"
    if f.default is dataclasses.MISSING:
        return "required"
    v = f.default
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if f.metadata.get("size"):
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if v % scale == 0:
                return f'`"{v // scale}{unit}"`'
    return f"`{json.dumps(v)}`"


def config_reference_rows() -> list[tuple[str, str, str]]:
    return [(f"{name}.{f.name}", env_name(name, f.name), default_text(f))
            for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def test_operations_config_reference_lists_every_key_with_default_and_variable() -> None:
    rows = {}
    for line in OPERATIONS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[0].startswith("`") and "." in cells[0]:
            rows[cells[0].strip("`")] = cells
    problems = []
    for key, env, default in config_reference_rows():
        cells = rows.get(key)
        if cells is None:
            problems.append(f"{key}: no row")
        elif cells[1] != f"`{env}`" or cells[2] != default:
            problems.append(f"{key}: row says {cells[1:3]}, the code says {[f'`{env}`', default]}")
    assert not problems, "docs/OPERATIONS.md config reference is out of date:\n" + "\n".join(problems)
    known = {k for k, _, _ in config_reference_rows()}
    assert not [k for k in rows if k.split(".")[0] in SECTIONS and k not in known], "rows for keys that don't exist"


def emitted_log_events() -> set[str]:
    """Event names the agent process can log: the string constants in log.<level>(...)'s first argument
    in agent/, buffer/, uploader/ and keys/sources.py (the key-set follower the agent runs). The LKM
    service and the custodian commands have logs of their own."""
    events: set[str] = set()
    files = [p for d in ("agent", "buffer", "uploader") for p in (ROOT / d).rglob("*.py")]
    files += [p for p in [ROOT / "keys" / "sources.py"] if p.exists()]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                    and node.func.attr in ("debug", "info", "warning", "error", "critical", "exception")
                    and isinstance(node.func.value, ast.Name) and re.fullmatch(r"_?log(ger)?", node.func.value.id)):
                events |= {n.value for n in ast.walk(node.args[0])
                           if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return events


def test_operations_documents_every_log_event() -> None:
    text = OPERATIONS.read_text()
    events = emitted_log_events()
    assert {"ready", "spooled", "delivered", "delivery-quarantined", "metrics-listening"} <= events
    missing = sorted(e for e in events if f"`{e}`" not in text)
    assert not missing, f"docs/OPERATIONS.md does not document the log events {missing}"
    for name in ("ts", "level", "logger", "event"):
        assert f"`{name}`" in text


def test_operations_documents_every_metric() -> None:
    text = OPERATIONS.read_text()
    # prometheus-client names a counter family without its "_total" (an info without its "_info");
    # operators see the samples' names.
    suffix = {"counter": "_total", "info": "_info"}
    names = {m.name + suffix.get(m.type, "") for m in metrics.REGISTRY.collect()}
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/OPERATIONS.md does not document the metrics {missing}"
    for metric in metrics.REGISTRY.collect():  # ours, or the standard process and platform collectors'
        assert metric.name.startswith(("mediaseal_", "process_", "python_")), metric.name


def test_architecture_is_one_page_with_a_diagram_of_every_package() -> None:
    text = ARCHITECTURE.read_text()
    assert "```mermaid" in text or "```text" in text
    for package in source_folders():
        assert f"{package}/" in text, package
    assert len(text.splitlines()) < 160  # one page, give or take

