"""Start the playback server or the Local Key Manager as its own process, for tests/test_reliability_hostile.py.

    python tests/hostile_servers.py playback CONFIG.json
    python tests/hostile_servers.py lkm CONFIG.json

Each runs the same entry point as its command (`mediaseal serve` -> export.serve.run_server,
`mediaseal lkm serve` -> keys.lkm.service.serve, with the command's logging set-up), with every
ServeOptions / ServiceConfig field taken from CONFIG.json. The commands have no options for their
connection timeouts (keep-alive, body, TLS handshake), and the bounded test run can't wait out the
production values, so this is where a test sets them. Stops on SIGTERM (exit 0), like the commands.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def playback(cfg: dict[str, Any]) -> None:
    from mediaseal.export.serve import ServeOptions, run_server
    from mediaseal.keys.keyring import Keyring

    paths = {"audit_log", "tokens_file", "tls_cert", "tls_key", "client_ca"}
    keyring, passphrase = Path(cfg.pop("keyring")), cfg.pop("passphrase").encode()
    options = ServeOptions(**{k: Path(v) if k in paths and v is not None else v for k, v in cfg.items()})
    asyncio.run(run_server(options, Keyring.open(keyring).unlock(passphrase)))


def lkm(cfg: dict[str, Any]) -> None:
    from mediaseal.agent.log import setup_logging
    from mediaseal.keys.lkm.config import ServiceConfig
    from mediaseal.keys.lkm.service import serve

    setup_logging("text")
    paths = {"keyring", "clients", "audit_log", "tls_cert", "tls_key", "client_ca", "genesys_keyring"}
    values = {k: Path(v) if k in paths and v is not None else v for k, v in cfg.items()}
    values["passphrase"] = values["passphrase"].encode()
    asyncio.run(serve(ServiceConfig(**values)))


if __name__ == "__main__":
    {"playback": playback, "lkm": lkm}[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
