"""Drive the real agent as a subprocess: config in a temp dir, JSON log lines as the event stream.

Tests synchronise on the agent's own log events (`spooled`, `delivered`, `ready`, ...), never on
sleeps: `Agent` is a support.process.Child, whose waits fail at a generous ceiling, or at once when the
agent exits; the one reaper (support.process.reap, after every test) kills an agent a test left running.

A ledger of what was dropped (name -> SHA-256) is checked against what the repository holds after
decrypting every package with the keyring's private keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import secrets_audit
from support import process
from support.waits import CEILING

from mediaseal import codec
from mediaseal.keys.keyring import Keyring

PASSPHRASE = b"correct horse battery staple, test only"
ROOT = Path(__file__).resolve().parent.parent


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Setup:
    """A complete agent set-up in one directory: capture dirs, spool, repository, keyring."""

    root: Path
    keyring: Path
    watches: list[dict[str, Any]]
    buffer: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)
    repo: dict[str, Any] = field(default_factory=dict)  # [repository] overrides (e.g. an s3:// url)

    @property
    def spool(self) -> Path:
        return self.root / "buffer"

    @property
    def repository(self) -> Path:
        return self.root / "repository"

    def capture(self, i: int = 0) -> Path:
        return Path(self.watches[i]["path"])

    def config(self) -> Path:
        for w in self.watches:
            Path(w["path"]).mkdir(parents=True, exist_ok=True)
        self.repository.mkdir(exist_ok=True)
        return write_config(self.root / "mediaseal.toml", {
            "agent": {"id": "test-agent", "concurrency": 2, "rescan_seconds": 5, **self.agent},
            "watch": self.watches,
            "buffer": {"path": str(self.spool), **self.buffer},
            "keys": {"keyring": str(self.keyring), "refresh_seconds": 1, **self.keys},
            "repository": {"url": f"file://{self.repository}", "concurrency": 2, **self.repo},
            "metrics": {"enabled": False},
        })


def reap() -> None:
    """Kill every child a test started and did not stop (support.process.reap: the one reaper)."""
    process.reap()


class Agent(process.Child):
    """`mediaseal run --config ... --log-format json` as a child process (support.process.Child: its
    JSON log lines are the events tests wait on)."""

    def __init__(self, setup: Setup, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.setup = setup
        self.env = env or {}
        self.metrics_address: str | None = None  # from its "metrics-listening" event, if it has a listener
        cfg = setup.config()
        self.audit_number = secrets_audit.REGISTRY.agent_started(self)  # set-up, keyring, secrets: audited
        argv = [*(prefix or []), *process.mediaseal_argv("run", "--config", cfg, "--log-format", "json")]
        # Debug level: tests synchronise on `rescan-done`, a debug event since issue 14.
        env_ = process.child_env({"MEDIASEAL_LOG_LEVEL": "debug", **self.env})
        super().__init__(argv, env=env_, cwd=setup.root, name="the agent")

    def on_line(self, line: str, doc: dict[str, Any] | None) -> None:
        if doc is not None and doc.get("event") == "metrics-listening":
            self.metrics_address = str(doc.get("address"))

    def stop(self, timeout: float = CEILING) -> int:
        if self.alive() and self.metrics_address:  # what it serves goes to the secrets audit too
            secrets_audit.REGISTRY.scrape(self.audit_number, self.metrics_address)
        return super().stop(timeout)

    def exited(self, timeout: float = CEILING) -> int:
        """Its exit code, once it has exited by itself."""
        return self.finish(timeout)

    def reaped(self) -> None:
        secrets_audit.REGISTRY.agent_reaped(self, self.audit_number)  # its log, for the secrets audit


def new_setup(root: Path, template: Path, **repo: Any) -> Setup:
    """The usual set-up in `root`: a copy of the `template` keyring, one capture directory of `call`
    recordings completed by rename, and `repo` as [repository] overrides (e.g. an s3:// url)."""
    s = Setup(root=root, keyring=make_keyring(root / "keyring", template),
              watches=[{"path": str(root / "capture"), "kind": "call", "completion": "rename"}])
    s.repo.update(repo)
    return s


def drop(directory: Path, name: str, data: bytes) -> str:
    """Write like a well-behaved producer: a temp name, then rename. Returns the SHA-256."""
    tmp = directory / f"{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, directory / name)
    return hashlib.sha256(data).hexdigest()


def packages(repository: Path) -> list[Path]:
    return sorted(p for p in repository.rglob("*.mseal") if not p.name.startswith("."))


def decrypt_all(repository: Path, keyring: Path) -> dict[str, list[str]]:
    """original name -> SHA-256s of the decrypted packages carrying it (one entry each)."""
    unwrapper = Keyring.open(keyring).unlock(PASSPHRASE)
    out: dict[str, list[str]] = {}
    for p in packages(repository):
        with open(p, "rb") as f:
            reader = codec.open_package(f, unwrapper)
            buf = io.BytesIO()
            reader.decrypt_to(buf)
        meta = reader.header.metadata
        expected = f"{meta.kind}/{meta.captured_at[:4]}/{meta.captured_at[5:7]}/{meta.captured_at[8:10]}/"
        assert str(p.relative_to(repository)).startswith(expected), p
        assert p.name == f"{meta.recording_id}.mseal"
        out.setdefault(meta.original_name, []).append(hashlib.sha256(buf.getvalue()).hexdigest())
    return out


def spool_files(spool: Path) -> list[Path]:
    """The spool's work in progress: staging files, packages, manifests (not `kept/` markers, nor the
    saved key set `keyset.json`, nor the ownership lock `agent.lock`, which stay by design)."""
    return [p for p in spool.rglob("*") if p.is_file() and p.parent.name != "kept"
            and p not in (spool / "keyset.json", spool / "agent.lock")]


def make_keyring(path: Path, template: Path | None = None) -> Path:
    """A passphrase-protected keyring (copied from `template` when given: RSA keygen is slow)."""
    if template is not None:
        shutil.copytree(template, path)
        return path
    Keyring.init(path, PASSPHRASE)
    return path


def iter_tree_bytes(*roots: Path) -> Iterator[tuple[Path, bytes]]:
    for root in roots:
        for p in root.rglob("*"):
            try:
                if p.is_file():
                    yield p, p.read_bytes()
            except (FileNotFoundError, PermissionError):
                continue
