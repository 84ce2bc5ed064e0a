"""Support for the agent-side outage rows of the reliability matrix (tests/test_reliability.py):

    server = RestartableKeySetServer(ca).start()     # the HTTPS key set server of keyset_support ...
    server.stop(); ...; server.start()               # ... really stopped, then back on the same port
    setup = keyset_setup(root, template, server, ca)  # an agent set-up fed by that key set
    agent = Agent(setup, env={**KEYSET_ENV, **METRICS_ENV})
    m = Scrape.of(address)                           # the agent's /metrics, parsed
    m.value("mediaseal_key_refresh_failures_total", reason="KeySetSourceError")
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_harness import PASSPHRASE, Setup
from keyset_support import KeySetServer, TestCA
from prometheus_client.parser import text_string_to_metric_families
from reliability_support import Ledger, new_setup

from mediaseal.keys.keyring import Keyring

# The harness's config names a keyring; an empty variable unsets it, so the key set is used instead.
KEYSET_ENV = {"MEDIASEAL_KEYS__KEYRING": ""}
# The health/metrics listener on a free port (the harness's config disables it).
METRICS_ENV = {"MEDIASEAL_METRICS__ENABLED": "true", "MEDIASEAL_METRICS__LISTEN": "127.0.0.1:0"}


class RestartableKeySetServer(KeySetServer):
    """keyset_support's server, which `stop()` closes for real (connections are refused meanwhile) and
    `start()` brings back on the port it first got, at the same URL."""


def keyset_setup(root: Path, template: Path, server: KeySetServer, ca: TestCA, **keys: Any) -> Setup:
    """A filesystem-repository set-up whose agent takes its key from `server` (signed by the set-up's
    own keyring, whose signer is pinned); the server is given the keyring's current key set."""
    setup = new_setup(root, template)
    ring = Keyring.open(setup.keyring)
    signer = root / "signer.pem"
    signer.write_bytes(ring.signer_pem())
    server.document = ring.publish(PASSPHRASE)
    setup.keys.update(keyset=server.url, signer=str(signer), ca_bundle=str(ca.ca_pem), refresh_seconds=0.2, **keys)
    return setup


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def http_json(url: str) -> tuple[int, dict[str, Any]]:
    status, body = http_get(url)
    doc = json.loads(body)
    assert isinstance(doc, dict), body
    return status, doc


@dataclass
class Scrape:
    """One scrape of the agent's /metrics: (sample name, sorted labels) -> value."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    @classmethod
    def of(cls, address: str) -> Scrape:
        status, text = http_get(f"http://{address}/metrics")
        assert status == 200, text[:200]
        samples = {(s.name, tuple(sorted(s.labels.items()))): float(s.value)
                   for family in text_string_to_metric_families(text) for s in family.samples}
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sample's value (0 for a labelled counter not incremented yet)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def produce(ledger: Ledger, directory: Path, prefix: str, sizes: list[int]) -> list[str]:
    """Ledger.produce, returning the names of the recordings just written."""
    before = set(ledger.sha)
    ledger.produce(directory, prefix, sizes)
    return [n for n in ledger.sha if n not in before]


def hash_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_metric(address: str, name: str, value: float, timeout: float = 30.0, **labels: str) -> Scrape:
    """Scrape until the sample has `value` (state the agent logs no event for, e.g. intake waiting)."""
    deadline = time.monotonic() + timeout
    while (m := Scrape.of(address)).value(name, **labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} is {m.value(name, **labels)}, not {value}"
        time.sleep(0.1)
    return m
