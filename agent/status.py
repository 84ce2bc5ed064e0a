"""`mediaseal status`: the spool's state, read from its manifests. Needs no keys, changes nothing.

>>> report = read_spool(Path("/var/lib/mediaseal/buffer"))
>>> report.counts, report.oldest, report.errors     # {"spooled": 3, ...}, the oldest item, last errors

Works whether the agent runs or not: manifests are replaced by atomic rename, so a reader sees the
old state or the new one; one released between the listing and the read is skipped. When the agent's
health listener answers on `[metrics] listen`, its live view (ready, quarantined, last error) is
added. The agent's health listener uses `ManifestCache` to compute the same figures incrementally.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mediaseal.agent.config import Config, ConfigError, load_config
from mediaseal.buffer.manifest import STATES, Manifest

MAX_ERRORS = 10  # manifests with errors listed (most attempts first)


@dataclass
class SpoolReport:
    root: str
    counts: dict[str, int]  # manifest state -> packages
    packages: int
    bytes: int
    staging: int  # recordings being sealed right now (or leftovers of a crash, removed at start)
    oldest: dict[str, Any] | None  # the oldest undelivered package: recording_id, state, created_at, age_seconds
    errors: list[dict[str, Any]]  # recording_id, state, attempts, last_error (most attempts first)
    unreadable: int = 0  # manifests that could not be parsed (never expected: say so)
    taken_at: float = field(default_factory=time.time)

    def oldest_age(self, now: float | None = None) -> float:
        if self.oldest is None:
            return 0.0
        return max(0.0, (now or time.time()) - float(self.oldest["created_at"]))


class ManifestCache:
    """Parsed manifests keyed by file identity, so a rescan reads only manifests that changed."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[int, int, int], Manifest | None]] = {}

    def scan(self, packages: Path) -> Iterator[Manifest | None]:
        """Every manifest under `packages` (None for one that does not parse)."""
        fresh: dict[str, tuple[tuple[int, int, int], Manifest | None]] = {}
        with os.scandir(packages) as entries:
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    key = (st.st_ino, st.st_mtime_ns, st.st_size)
                    cached = self._seen.get(entry.name)
                    fresh_read = cached is None or cached[0] != key
                    m = _parse(Path(entry.path).read_bytes()) if fresh_read else cached[1]  # type: ignore[index]
                except FileNotFoundError:
                    continue  # released between the listing and the read
                fresh[entry.name] = (key, m)
                yield m
        self._seen = fresh


def _parse(data: bytes) -> Manifest | None:
    try:
        return Manifest.from_json(data)
    except (ValueError, TypeError):
        return None


def read_spool(root: Path, *, cache: ManifestCache | None = None, now: float | None = None) -> SpoolReport:
    """The spool's state from its manifests. FileNotFoundError if `root` has no packages/ directory."""
    now = time.time() if now is None else now
    packages = root / "packages"
    if not packages.is_dir():
        raise FileNotFoundError(f"spool {root} does not exist (wrong --config, or the agent never ran there)")
    counts: dict[str, int] = {state.value: 0 for state in STATES}
    total = nbytes = unreadable = 0
    oldest: Manifest | None = None
    with_errors: list[Manifest] = []
    for m in (cache or ManifestCache()).scan(packages):
        if m is None:
            unreadable += 1
            continue
        total += 1
        nbytes += m.package_size
        counts[m.state] = counts.get(m.state, 0) + 1
        if oldest is None or m.created_at < oldest.created_at:
            oldest = m
        if m.last_error or m.attempts:
            with_errors.append(m)
    try:
        staging = sum(1 for _ in os.scandir(root / "staging"))
    except FileNotFoundError:
        staging = 0
    with_errors.sort(key=lambda m: (-m.attempts, m.created_at))
    return SpoolReport(
        root=str(root), counts=counts, packages=total, bytes=nbytes, staging=staging,
        oldest=None if oldest is None else {
            "recording_id": oldest.recording_id, "state": oldest.state, "kind": oldest.kind,
            "created_at": oldest.created_at, "age_seconds": round(max(0.0, now - oldest.created_at), 1),
        },
        errors=[{"recording_id": m.recording_id, "state": m.state, "attempts": m.attempts,
                 "last_error": m.last_error} for m in with_errors[:MAX_ERRORS]],
        unreadable=unreadable, taken_at=now,
    )


def query_agent(config: Config, timeout: float = 2.0) -> dict[str, Any]:
    """The running agent's live view from its health listener, or why there is none."""
    if not config.metrics.enabled:
        return {"running": None, "note": "metrics listener disabled: cannot tell whether the agent runs"}
    host, _, port = config.metrics.listen.rpartition(":")
    if port == "0":
        return {"running": None, "note": "metrics listen port 0 (ephemeral): cannot reach the agent"}
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1" if host != "::" else "::1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # http to our own listener
            doc = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return {"running": False, "url": url, "note": f"no answer ({reason})"}
    if not isinstance(doc, dict):
        return {"running": False, "url": url, "note": "unexpected answer"}
    return {"running": True, "url": url, **doc}


# -- the command -----------------------------------------------------------------------------------


def status_command(config_path: Path | None, *, as_json: bool = False, ask_agent: bool = True,
                   command: Sequence[str] = ("mediaseal", "status")) -> None:
    """`mediaseal status` (agent/cli/status_cmd.py): prints the report; StatusError if it cannot.
    `command`: how the user ran it, for a hint that runs as pasted."""
    try:
        config = load_config(config_path, os.environ)
    except ConfigError as e:
        raise StatusError(str(e)) from None
    try:
        report = read_spool(config.buffer.path)
    except FileNotFoundError as e:
        raise StatusError(str(e)) from None
    except PermissionError as e:
        raise StatusError(f"cannot read the spool {config.buffer.path}: {e.strerror} (run as the agent's user, "
                          f"e.g. sudo -u mediaseal {shlex.join(command)})") from None
    agent = query_agent(config) if ask_agent else {"running": None, "note": "not asked (--no-agent)"}
    doc = {**asdict(report), "agent": agent}
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=False))
        return
    print(render(report, agent))


class StatusError(Exception):
    """`mediaseal status` cannot report (bad config, no spool, no permission)."""


def render(report: SpoolReport, agent: dict[str, Any]) -> str:
    lines = [f"spool {report.root}"]
    lines.append(f"  packages   {report.packages} ({_size(report.bytes)})   being sealed {report.staging}")
    for known in STATES:
        lines.append(f"  {known:<10} {report.counts.get(known, 0)}")
    for state, n in report.counts.items():
        if state not in STATES:
            lines.append(f"  {state:<10} {n}   (unknown state)")
    if report.oldest is not None:
        o = report.oldest
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(o["created_at"]))
        lines.append(f"  oldest     {o['recording_id']}  {o['state']}  since {when} ({_age(o['age_seconds'])} ago)")
    else:
        lines.append("  oldest     -  (nothing awaits delivery)")
    if report.unreadable:
        lines.append(f"  unreadable {report.unreadable} manifest(s): see the agent's log")
    if report.errors:
        lines.append("last errors:")
        for e in report.errors:
            lines.append(f"  {e['recording_id']}  {e['state']}  attempts={e['attempts']}  {e['last_error'] or '-'}")
    if agent.get("running"):
        ready = "ready" if agent.get("ready") else f"NOT ready: {agent.get('reason', '?')}"
        lines.append(f"agent: running, {ready}  (pid {agent.get('pid', '?')}, {agent['url']})")
        if agent.get("quarantined"):
            lines.append(f"  quarantined {agent['quarantined']} package(s)")
        last = agent.get("last_error")
        if isinstance(last, dict):
            lines.append(f"  last error  {last.get('at', '')} {last.get('event', '')}: {last.get('message', '')}")
    else:
        state = "not running" if agent.get("running") is False else "unknown"
        lines.append(f"agent: {state}  ({agent.get('note', '')})")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
