"""Drive the real agent as a subprocess: config in a temp dir, JSON log lines as the event stream.

Tests synchronise on the agent's own log events (`spooled`, `delivered`, `ready`, ...), never on
sleeps. A ledger of what was dropped (name -> SHA-256) is checked against what the repository holds
after decrypting every package with the keyring's private keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import secrets_audit

from mediaseal import codec
from mediaseal.keys.keyring import Keyring

PASSPHRASE = b"correct horse battery staple, test only"
ROOT = Path(__file__).resolve().parent.parent


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
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


_RUNNING: list[Agent] = []


def reap() -> None:
    """Kill every agent a test started and did not stop (a failed assertion skips its stop())."""
    while _RUNNING:
        agent = _RUNNING.pop()
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(timeout=30)
        agent._reader.join(timeout=5)
        secrets_audit.REGISTRY.agent_reaped(agent, agent.audit_number)  # its log, for the secrets audit


class Agent:
    """`mediaseal run --config ... --log-format json` as a child process."""

    def __init__(self, setup: Setup, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.setup = setup
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        self.env = env or {}
        self.metrics_address: str | None = None  # from its "metrics-listening" event, if it has a listener
        cfg = setup.config()
        self.audit_number = secrets_audit.REGISTRY.agent_started(self)  # set-up, keyring, secrets: audited
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
        # Debug level: tests synchronise on `rescan-done`, a debug event since issue 14.
        full_env = {**inherited, "PYTHONUNBUFFERED": "1", "MEDIASEAL_LOG_LEVEL": "debug", **(env or {})}
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "mediaseal.agent.cli", "run", "--config", str(cfg),
             "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=full_env, cwd=setup.root,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        _RUNNING.append(self)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                doc = json.loads(line)
            except ValueError:
                doc = {"event": "_text", "text": line}
            if isinstance(doc, dict) and doc.get("event") == "metrics-listening":
                self.metrics_address = str(doc.get("address"))
            self.events.put(doc if isinstance(doc, dict) else {"event": "_text", "text": line})
        self.events.put({"event": "_exit"})

    def wait_for(self, event: str | tuple[str, ...], timeout: float = 60.0,
                 where: Callable[[dict[str, Any]], bool] | None = None, count: int = 1) -> list[dict[str, Any]]:
        """Block until `count` log events named `event` (or any of several names; matching `where`) arrived."""
        names = (event,) if isinstance(event, str) else event
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {count} x {event!r} (got {len(got)});"
                                     f" last log lines:\n" + "\n".join(self.lines[-15:]))
            try:
                doc = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if doc.get("event") == "_exit" and "_exit" not in names:
                raise AssertionError(f"agent exited ({self.proc.wait()}) while waiting for {event!r}:\n"
                                     + "\n".join(self.lines[-15:]))
            if doc.get("event") in names and (where is None or where(doc)):
                got.append(doc)
        return got

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            if self.metrics_address:  # what it serves goes to the secrets audit too
                secrets_audit.REGISTRY.scrape(self.audit_number, self.metrics_address)
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        return code

    def exited(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code


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
