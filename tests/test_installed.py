"""What users install is what is tested: the suite imports mediaseal from the installed wheel.

`make test` builds the wheel, installs it (not editable) into .venv and sets
MEDIASEAL_TEST_TARGET=wheel. A run from the editable developer loop (`make dev`) skips the first test
with that reason; the others hold for any install.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def folders() -> list[str]:
    (names,) = [ast.literal_eval(n.value) for n in ast.parse((ROOT / "setup.py").read_text()).body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "FOLDERS"]
    return list(names)


def installed() -> importlib.metadata.Distribution:
    """The distribution in this venv's site-packages (a build's mediaseal.egg-info in the tree would shadow it)."""
    purelib = sysconfig.get_paths()["purelib"]
    (dist,) = [d for d in importlib.metadata.distributions(path=[purelib]) if d.metadata["Name"] == "mediaseal"]
    return dist


def test_mediaseal_is_imported_from_the_installed_wheel() -> None:
    if os.environ.get("MEDIASEAL_TEST_TARGET") != "wheel":
        pytest.skip("not a `make test` run (MEDIASEAL_TEST_TARGET=wheel): the editable loop imports the tree")
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    for name in folders():
        path = Path(importlib.import_module(f"mediaseal.{name}").__file__ or "").resolve()
        assert path.is_relative_to(purelib), f"mediaseal.{name} came from {path}, not the venv's site-packages"
        assert not path.is_relative_to(ROOT / name)
    direct = installed().read_text("direct_url.json")
    assert not (direct and json.loads(direct).get("dir_info", {}).get("editable")), "an editable install"


def test_every_package_of_the_tree_is_in_the_installed_distribution() -> None:
    """A hand-written package list once left keys.lkm out of the wheel: compare with the tree itself."""
    direct = installed().read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install (make dev) lists no package files; make test installs the wheel")
    files = {str(f) for f in installed().files or ()}
    in_tree = [init.relative_to(ROOT) for name in folders() for init in sorted((ROOT / name).rglob("__init__.py"))]
    assert in_tree
    missing = [str(p) for p in in_tree if f"mediaseal/{p}" not in files]
    assert not missing, f"the installed distribution lacks {missing}"
    assert not [n for n in ("codec", "keys", "agent", "buffer", "uploader", "export")
                if any(f.startswith(f"{n}/") for f in files)], "a bare top-level package was installed"


def test_installed_console_script_starts_outside_the_tree(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    r = subprocess.run([str(Path(sys.executable).parent / "mediaseal"), "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "run" in r.stdout and "Traceback" not in r.stderr


def test_build_info_metric_carries_the_version_written_in_pyproject() -> None:
    import tomllib

    from prometheus_client import generate_latest

    from mediaseal.agent import metrics

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    text = generate_latest(metrics.REGISTRY).decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("mediaseal_build_info{")]
    assert f'version="{version}"' in line and line.endswith(" 1.0"), line
