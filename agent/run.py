"""`mediaseal run`: the daemon. With no --config, the embedded default under ./mediaseal-data/.

Start-up order: config (rejected whole, with the key named, if invalid) -> directories -> keys (the
public part only) -> spool recovery -> intake. SIGTERM/SIGINT stop intake, let in-flight work finish
or abandon it safely (it is redone from the source next time), and exit 0 within
`stop_timeout_seconds`. A failed fsync stops the agent with exit 3: the state on disk is unknown.

One agent per spool and per capture directory (agent/ownership.py): the locks are taken right after
the directories are prepared, before anything is read from them; a second agent exits 4 with one line
naming the holder.

SIGHUP does not reload (yet): it is logged (`sighup-ignored`) and the agent goes on. A reload would
have to swap the watcher's state, the repository client, the key source and the locks under running
workers; until that is built and tested, a restart applies a new config (`mediaseal config check`
first). Before the loop runs, SIGHUP is ignored outright, so it can never kill the agent (exit 129).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import uvloop

from mediaseal.agent.config import Config, ConfigError, check_layout, load_config
from mediaseal.agent.crash import crash_point
from mediaseal.agent.keysource import PublicKeys
from mediaseal.agent.log import setup_logging
from mediaseal.agent.ownership import OwnedError, Ownership
from mediaseal.agent.pipeline import Pipeline, manifest_problem
from mediaseal.agent.service import AgentService, ServiceError
from mediaseal.buffer.spool import Spool, SpoolError, manifest_key
from mediaseal.keys.errors import KeysError
from mediaseal.keys.keyring import Keyring, passphrase_from
from mediaseal.plumbing.durable import DurabilityError
from mediaseal.plumbing.notify import stop_requested
from mediaseal.uploader import Repository, RepositoryError, open_repository

log = logging.getLogger("mediaseal.agent")

EXIT_CONFIG = 2
EXIT_DURABILITY = 3
EXIT_OWNED = 4  # another agent holds the spool or a capture directory (not worth restarting)


def run(config_path: Path | None, log_format: str | None) -> None:
    """The `run` command: exits with the agent's status."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's handler logs it (see the docstring)
    try:
        config = load_config(config_path, os.environ)
    except ConfigError as e:
        print(f"mediaseal: error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if problems := check_layout(config):
        print(f"mediaseal: error: config: {problems[0]}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    setup_logging(log_format or config.agent.log_format, _log_level(os.environ))
    embedded = config_path is None
    try:
        prepare(config, embedded=embedded)
    except (KeysError, OSError) as e:
        print(f"mediaseal: error: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        owner = Ownership.claim(config, config_path)
    except OwnedError as e:
        print(f"mediaseal: error: {e}", file=sys.stderr)
        sys.exit(EXIT_OWNED)
    except OSError as e:
        print(f"mediaseal: error: cannot lock the spool {config.buffer.path}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    try:
        code = uvloop.run(serve(config, announce=embedded, owner=owner))
    finally:
        owner.release()
    sys.exit(code)


def _log_level(env: Mapping[str, str]) -> int:
    """MEDIASEAL_LOG_LEVEL=debug shows the debug events too (`rescan-done`, `complete`); default info."""
    name = env.get("MEDIASEAL_LOG_LEVEL", "").strip().upper()
    level = logging.getLevelName(name) if name else logging.INFO
    return level if isinstance(level, int) else logging.INFO


def prepare(config: Config, *, embedded: bool) -> None:
    """Create the spool (0700); for the embedded default also its capture and repository directories
    and, on first start, a keyring. A configured repository or capture directory is never created:
    a missing mount must not turn into a directory on the local disk."""
    if embedded:
        config.buffer.path.parent.mkdir(mode=0o700, exist_ok=True)  # ./mediaseal-data itself
    config.buffer.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if embedded:
        for w in config.watch:
            w.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        Path(config.repository.url.removeprefix("file://")).mkdir(mode=0o700, parents=True, exist_ok=True)
    ring = config.keys.keyring
    if embedded and ring is not None and not (ring / "keyring.json").exists():
        # The keyring is created here, once; the agent itself then reads only its public part.
        passphrase = passphrase_from(os.environ, None)
        kid = Keyring.init(ring, passphrase).current().kid
        print(f"mediaseal: created keyring {ring} (current key {kid})", file=sys.stderr)
        if passphrase is None:
            print(f"mediaseal: warning: private keys are protected by {ring}/master.key, which protects them "
                  "only as well as that file (fine for trying mediaseal out, not for production)", file=sys.stderr)


def open_configured_repository(config: Config) -> Repository:
    """The `[repository]` the config names (RepositoryError if it cannot be set up)."""
    agent_side = {"url", "quarantine_seconds"}  # the rest are the repository's own options
    options = {k: v for k, v in dataclasses.asdict(config.repository).items() if k not in agent_side}
    return open_repository(config.repository.url, **options)


async def serve(config: Config, *, announce: bool = False, owner: Ownership | None = None) -> int:
    # The health/metrics listener and sd_notify (agent/service.py). With the embedded default (announce)
    # a port already in use is a warning, not a reason to refuse a first try-out.
    try:
        service = await AgentService.start(config, listener_required=not announce)
    except ServiceError as e:
        print(f"mediaseal: error: {e}", file=sys.stderr)
        return 1
    try:
        return await _serve(config, service, announce=announce, owner=owner)
    finally:
        await service.close()  # STOPPING=1 (if not sent yet), listener closed


async def _serve(config: Config, service: AgentService, *, announce: bool, owner: Ownership | None) -> int:
    stop = stop_requested()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _sighup)
    service.watch_stop(stop)
    service.set_phase("loading keys")
    keys = PublicKeys(config.keys, cache=config.buffer.path / "keyset.json")
    if not await keys.refresh():
        print("mediaseal: error: no valid public key to encrypt to (see the log line above)", file=sys.stderr)
        return 1
    try:
        repository = open_configured_repository(config)
    except RepositoryError as e:
        print(f"mediaseal: error: {e}", file=sys.stderr)
        return 1
    try:
        key, made = manifest_key(config.buffer.manifest_key_path)
    except (SpoolError, OSError) as e:
        print(f"mediaseal: error: {e}", file=sys.stderr)
        return 1
    spool = Spool(config.buffer.path, config.buffer.max_bytes, min_free_bytes=config.buffer.min_free_bytes,
                  on_step=crash_point, mac_key=key, check=lambda m: manifest_problem(config, m), adopt=made)
    pipeline = Pipeline(config, spool, repository, keys, quarantine_seconds=config.repository.quarantine_seconds)
    service.attach(pipeline, owner)
    service.set_phase("recovering the spool")
    try:
        resumed = await pipeline.recover()
    except DurabilityError as e:
        log.critical("durability-failure", extra={"fields": {"error": str(e)}})
        return EXIT_DURABILITY
    await service.probe()  # the watches and the repository, so /readyz tells the truth from the start
    log.info("ready", extra={"fields": {"resumed": resumed, "watch": ",".join(str(w.path) for w in config.watch)}})
    service.ready()  # READY=1: after recovery and the first key load
    if announce:
        print(f"mediaseal: drop recordings into {config.watch[0].path}/ ; packages appear in "
              f"{config.repository.url.removeprefix('file://')}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        await pipeline.run(stop)
    except DurabilityError as e:
        log.critical("durability-failure", extra={"fields": {"error": str(e)}})
        return EXIT_DURABILITY
    log.info("stopped")
    return 0


def _sighup() -> None:
    log.warning("sighup-ignored", extra={"fields": {
        "reason": "configuration reload is not supported: restart the agent to apply a new config"}})
