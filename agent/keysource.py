"""The public KEK new packages are wrapped to, kept fresh. The agent holds nothing that can decrypt.

>>> keys = PublicKeys(config.keys)
>>> await keys.refresh()            # at start: fails loudly if there is no valid key
>>> recipient = await keys.wait_current(stop)   # pauses intake while the key material is too old

Sources: a keyring directory (its public part only: `Keyring.open` never reads a private key) or a
signed key set (file, https:// with an optional CA bundle, s3://; keys.sources), verified against the
pinned signer, refreshed with ETags, and never rolled back to a lower serial. The last valid key
stays in use through outages of its source (or a rejected set) until it is older than
`max_staleness_seconds`; then intake stops, with a `key-set-stale` log line.

`cache=PATH` (the agent uses `<buffer.path>/keyset.json`) keeps the accepted set across restarts: an
agent restarted while its key source is down starts with it (its age counted from when the source
last confirmed it), and a restarted agent still refuses a set with a lower serial.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from mediaseal import codec
from mediaseal.agent import metrics
from mediaseal.agent.config import KeysConfig
from mediaseal.keys.errors import KeysError
from mediaseal.keys.keyring import Keyring
from mediaseal.keys.keyset import KeySet, load_signer
from mediaseal.keys.sources import KeySetFollower, open_keyset_source

log = logging.getLogger("mediaseal.keys")


class NoValidKeyError(Exception):
    """There is no public key new recordings may be sealed to."""


class PublicKeys:
    def __init__(self, config: KeysConfig, *, cache: Path | None = None) -> None:
        self.config = config
        self.cache = cache
        self._recipient: codec.Recipient | None = None
        self._loaded_at = 0.0  # monotonic time of the last successful load
        self._changed = asyncio.Event()
        self._follower: KeySetFollower | None = None  # key set sources (made on first use)
        self._stale = False

    def load(self) -> codec.Recipient:
        """Read and check a keyring's public part once (blocking). Key sets are followed by `refresh`."""
        if self.config.keyring is not None:
            return Keyring.open(self.config.keyring).recipient()
        if self.config.keyset is None or self.config.signer is None:
            raise NoValidKeyError("config names no keyring and no key set")
        raise NoValidKeyError("key sets are loaded by refresh()")

    def _make_follower(self) -> KeySetFollower:
        assert self.config.keyset is not None
        assert self.config.signer is not None
        signer = load_signer(Path(self.config.signer).read_bytes())
        try:
            source = open_keyset_source(self.config.keyset, ca_bundle=self.config.ca_bundle)
        except ValueError as e:
            raise NoValidKeyError(str(e)) from None
        follower = KeySetFollower(source, signer, cache=self.cache, min_serial=self.config.min_serial)
        try:
            restored = follower.restore()
        except KeysError as e:  # unreadable, tampered, expired: fetched afresh (and then overwritten)
            log.warning("keyset-restore-failed", extra={"fields": {"path": str(self.cache), "error": str(e)}})
        else:
            if restored is not None:
                _log_keyset(restored, f"saved copy {self.cache}")
        return follower

    async def _load_keyset(self) -> codec.Recipient:
        if self._follower is None:
            self._follower = await asyncio.to_thread(self._make_follower)
        before = self._follower.keyset
        keyset = await self._follower.refresh()
        if keyset is not before:
            _log_keyset(keyset, self._follower.source.location)
        return keyset.recipient()

    async def refresh(self) -> bool:
        """Load the key source; keep the previous key on failure. Returns whether a key was loaded."""
        try:
            if self.config.keyring is None and self.config.keyset is not None and self.config.signer is not None:
                recipient = await self._load_keyset()
            else:
                recipient = await asyncio.to_thread(self.load)
        except (KeysError, NoValidKeyError, OSError, codec.CodecError) as e:
            reason = type(e).__name__
            metrics.KEY_REFRESH_FAILURES.labels(reason).inc()
            log.warning("key-refresh-failed",
                        extra={"fields": {"error": str(e) or reason}})
            saved = self._follower
            if self._recipient is None and saved is not None and saved.keyset is not None:
                # The source is down at start but the set saved by an earlier run passed every check:
                # seal to it, aged from when the source last confirmed it.
                age = max(0.0, time.time() - (saved.confirmed_at or 0.0))
                self._adopt(saved.keyset.recipient(), time.monotonic() - age)
                return True
            return False
        self._adopt(recipient, time.monotonic())
        return True

    def _adopt(self, recipient: codec.Recipient, loaded_at: float) -> None:
        previous = self._recipient
        self._recipient, self._loaded_at = recipient, loaded_at
        if self._stale and time.monotonic() - loaded_at <= self.config.max_staleness_seconds:
            self._stale = False
            log.info("key-set-fresh", extra={"fields": {"kid": recipient.kid}})
        if previous is None or previous.kid != recipient.kid:
            if previous is not None:
                metrics.CURRENT_KID.remove(previous.kid)
            metrics.CURRENT_KID.labels(recipient.kid).set(1)
            log.info("key-current", extra={"fields": {"kid": recipient.kid}})
        self._changed.set()
        self._changed = asyncio.Event()

    def current(self) -> codec.Recipient | None:
        """The key to seal to now, or None if there is none or it is older than allowed."""
        if self._recipient is None:
            return None
        age = time.monotonic() - self._loaded_at
        metrics.KEYSET_AGE.set(age)
        if age > self.config.max_staleness_seconds:
            if not self._stale:
                self._stale = True
                log.error("key-set-stale", extra={"fields": {
                    "error": f"no valid key set for {age:.0f} s (max_staleness_seconds="
                             f"{self.config.max_staleness_seconds:g}): intake stopped until the key source recovers",
                    "kid": self._recipient.kid}})
            return None
        return self._recipient

    async def wait_current(self, stop: asyncio.Event) -> codec.Recipient | None:
        """The current key, waiting (intake paused) while there is none; None once `stop` is set."""
        while (r := self.current()) is None:
            if stop.is_set():
                return None
            metrics.INTAKE_PAUSED.set(1)
            changed = asyncio.ensure_future(self._changed.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({changed, stopped}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stopped.cancel()
        metrics.INTAKE_PAUSED.set(0)
        return r

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every `refresh_seconds` until `stop`, checking staleness on the same tick."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.refresh_seconds)
            except TimeoutError:
                await self.refresh()
                # current() is what notices staleness (and logs `key-set-stale`); without this call an
                # idle agent whose key source stayed down past max_staleness_seconds said nothing about
                # it until a recording arrived or someone scraped /metrics or /readyz.
                self.current()


def _log_keyset(keyset: KeySet, location: str) -> None:
    """One line per newly accepted key set: which key is current, which are pending (agents warm up)."""
    pending = [k.kid for k in keyset.keys if k.state == "pending"]
    log.info("keyset-loaded", extra={"fields": {
        "serial": keyset.serial, "current": keyset.current, "pending": ",".join(pending), "source": location,
        "expires_at": keyset.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")}})
