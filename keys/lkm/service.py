"""`mediaseal lkm serve`: the reference Local Key Manager, an HTTPS service whose private keys never leave it.

>>> service = LKMService(ServiceConfig(keyring=..., clients=..., audit_log=..., tls_cert=..., tls_key=...))
>>> await service.start(); print(service.url); ...; await service.stop()

This module wires the parts and runs them; each part is its own module:

    keys.lkm.config    ServiceConfig, checked before anything opens
    keys.lkm.gate      what every request passes first: authentication, replay, rate limits, role, audit
    keys.lkm.api       the /v1 handlers                       keys.lkm.genesys  the Genesys-compatible shim
    keys.lkm.audit     the hash-chained audit log             keys.lkm.keystore the private keys
    plumbing.http      TLS context, listening site, protocol log, JSON answers (shared with the other servers)

Here: the key stores (opened on worker threads, never on the event loop), the bounded RSA work queue,
the key set (signed at start, re-signed at half its life and after every key change, written to
`keyset_out` durably), the rotation schedule, the deep health check, and the life cycle: start opens
everything and, on any failure, closes what it opened before the error goes up; stop audits
`service.stop` and closes the audit log last. `serve` adds signals (SIGTERM/SIGINT stop, SIGHUP
re-reads the clients file) and systemd's notifications (plumbing.notify).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from mediaseal.keys import rotation
from mediaseal.keys.lkm.api import V1API, PublishedKeySet
from mediaseal.keys.lkm.audit import ChainedAuditLog
from mediaseal.keys.lkm.auth import Authenticator, ClientRegistry, NonceCache
from mediaseal.keys.lkm.config import ServiceConfig, config_from_args
from mediaseal.keys.lkm.errors import LKMConfigError, LKMError, OverloadedError, UnavailableError
from mediaseal.keys.lkm.gate import Gate
from mediaseal.keys.lkm.genesys import GENESYS_PREFIX, GenesysShim
from mediaseal.keys.lkm.keystore import KeyLoader, KeyStore, open_keyring
from mediaseal.plumbing.durable import atomic_open
from mediaseal.plumbing.http import ListenSite, TLSContextError, app_runner, server_ssl_context, strong_etag
from mediaseal.plumbing.notify import Notifier, stop_requested, watchdog_pings, watchdog_seconds

__all__ = ["LKMService", "serve", "serve_command"]

_log = logging.getLogger("mediaseal.lkm")
T = TypeVar("T")

HEALTH_CACHE_SECONDS = 5.0
REFRESH_EVERY_SECONDS = 1.0


class LKMService:
    """The service: key stores, the gate and handlers, the audit log, and the HTTPS listener (KeyWork)."""

    def __init__(self, config: ServiceConfig, *, clock: Callable[[], float] = time.time,
                 loader: KeyLoader | None = None) -> None:
        config.check()
        self.config = config
        self.clock = clock
        self.stats: Counter[str] = Counter()  # handler:<operation> each time a handler runs; outcome:<code>
        self.admin_lock = asyncio.Lock()
        self.keyset = PublishedKeySet()
        self._loader = loader or functools.partial(open_keyring, kms_cache_seconds=config.kms_cache_seconds)
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="lkm-crypto")
        self._queued = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._health: tuple[float, int, dict[str, Any]] | None = None
        self._last_refresh = 0.0
        self._keyset_issued = 0.0
        self._runner: web.AppRunner | None = None
        self._site: ListenSite | None = None
        self.audit: ChainedAuditLog | None = None
        self.store: KeyStore | None = None
        self.genesys: KeyStore | None = None
        self.registry = ClientRegistry.load(config.clients)
        self.authenticator = Authenticator(
            self.registry, NonceCache(config.nonce_cache_size, config.replay_window), mode=config.mode,
            window=config.replay_window, require_hawk_payload_hash=config.hawk_require_payload_hash, clock=clock)

    # -- life cycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._site is None:
            raise RuntimeError("the service is not started")
        return self._site.name

    async def start(self) -> None:
        """Open everything, then listen. On any failure what was opened is closed again before the error goes up."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        try:
            ssl_context = server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.client_ca,
                                             require_client_cert=cfg.require_client_cert)
        except TLSContextError as e:
            raise LKMConfigError(str(e)) from None
        self.store = await self.run(KeyStore, cfg.keyring, cfg.passphrase, loader=self._loader)
        if cfg.genesys_keyring is not None:
            self.genesys = await self.run(KeyStore, cfg.genesys_keyring, cfg.passphrase, loader=self._loader)
        self.audit = ChainedAuditLog(cfg.audit_log, clock=self.clock)
        await self.publish()
        await self.audit.start()
        await self.audit.append({
            "operation": "service.start", "outcome": "ok", "kid": self.store.ring.current().kid,
            "auth_mode": cfg.mode, "genesys": self.genesys is not None, "pid": os.getpid(),
        })
        gate = Gate(cfg, self.authenticator, self.audit, before=self.refresh, stats=self.stats,
                    hawk_prefixes=(GENESYS_PREFIX,))
        app = web.Application(client_max_size=cfg.max_body, middlewares=[gate.middleware()])
        app.on_response_prepare.append(gate.headers)
        routes = V1API(self).routes()
        if self.genesys is not None:
            routes += GenesysShim(self, self.genesys).routes()
        for route, handler in routes:
            gate.add(app, route, handler)
        self._runner = app_runner(app, "mediaseal.lkm.http", keepalive_timeout=cfg.keepalive_timeout)
        await self._runner.setup()
        self._site = ListenSite(self._runner, cfg.host, cfg.port, ssl_context, handshake_timeout=cfg.handshake_timeout)
        try:
            await self._site.start()
        except OSError as e:
            raise LKMConfigError(f"can't listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="lkm-housekeeping"))
        _log.info("listening", extra={"fields": {
            "url": self.url, "auth": cfg.mode, "genesys": self.genesys is not None,
            "current_kid": self.store.ring.current().kid}})

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.audit is not None:
            if self.audit.started:
                with contextlib.suppress(LKMError):
                    await self.audit.append({"operation": "service.stop", "outcome": "ok", "pid": os.getpid()})
            await self.audit.close()
            self.audit = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    def reload_clients(self) -> None:
        """SIGHUP: read the clients file again (a credential added or removed); a bad file keeps the old one."""
        try:
            registry = ClientRegistry.load(self.config.clients)
        except LKMConfigError as e:
            _log.error("clients file not reloaded; keeping the previous one", extra={"fields": {"error": str(e)}})
            return
        self.registry = self.authenticator.registry = registry
        _log.info("clients file reloaded", extra={"fields": {"clients": len(registry.clients)}})

    async def _housekeeping(self) -> None:
        """Re-sign the key set at half its life; run the rotation schedule."""
        cfg = self.config
        next_rotation = time.monotonic()
        while True:
            if cfg.rotation_check > 0 and time.monotonic() >= next_rotation:
                next_rotation = time.monotonic() + cfg.rotation_check
                try:
                    await self._rotate_if_due()
                except Exception as e:  # the schedule must never take the service down
                    _log.error("scheduled rotation check failed", extra={"fields": {"error": str(e)}})
            if self.clock() - self._keyset_issued > cfg.keyset_ttl / 2:
                try:
                    await self.publish()
                except Exception as e:
                    _log.error("key set refresh failed", extra={"fields": {"error": str(e)}})
            await asyncio.sleep(min(60.0, cfg.keyset_ttl / 4))

    async def _rotate_if_due(self) -> None:
        """The schedule `mediaseal keys rotate --if-due` runs (keys.rotation), every `rotation_check` seconds,
        under the store's lock; a change republishes the key set."""
        store = self.keystore()
        async with self.admin_lock:
            before = [(r.kid, r.state) for r in store.ring.records()]
            what = await self.run(store.apply, rotation.rotate_if_due)
            if [(r.kid, r.state) for r in store.ring.records()] != before:
                _log.info("scheduled rotation", extra={"fields": {"step": str(what)}})
                await self.publish()

    # -- KeyWork: what the handlers use ----------------------------------------------------------------

    async def publish(self, ttl: int | None = None) -> PublishedKeySet:
        """Sign a fresh key set and serve it (and write it to `keyset_out`, durably, world-readable)."""
        store = self.keystore()
        document = await self.run(store.publish, ttl if ttl is not None else self.config.keyset_ttl)
        self.keyset = PublishedKeySet(document, strong_etag(document))
        self._keyset_issued = self.clock()
        if self.config.keyset_out is not None:
            await self.run(_write_keyset, self.config.keyset_out, document)
        _log.info("key set published", extra={"fields": {"serial": store.ring.serial,
                                                          "current_kid": store.ring.current().kid}})
        return self.keyset

    async def refresh(self) -> None:
        """Pick up keyring changes made by others (at most once a second); republish if there were any."""
        now = time.monotonic()
        if now - self._last_refresh < REFRESH_EVERY_SECONDS:
            return
        self._last_refresh = now
        store = self.keystore()
        try:
            changed = await self.run(store.refresh)
        except Exception as e:
            raise UnavailableError(f"the keyring can't be opened: {e}") from None
        if self.genesys is not None:
            await self.run(self.genesys.refresh)
        if changed:
            async with self.admin_lock:
                await self.publish()

    async def health(self) -> tuple[int, dict[str, Any]]:
        """Deep check, cached HEALTH_CACHE_SECONDS: each keyring does a test wrap/unwrap, the audit log is writable."""
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_CACHE_SECONDS:
            checks: dict[str, str] = {}
            ok = True
            for name, store in (("keyring", self.store), ("genesys_keyring", self.genesys)):
                if store is None:
                    continue
                try:
                    await self.crypto(store.self_test)
                    checks[name] = "ok"
                except Exception as e:
                    ok, checks[name] = False, f"failing: {type(e).__name__}"
            audit_ok = self.audit is not None and self.audit.broken is None
            checks["audit_log"] = "ok" if audit_ok else "failing"
            ok = ok and audit_ok
            self._health = (now, 200 if ok else 503, {"status": "ok" if ok else "failing", "checks": checks})
        return self._health[1], self._health[2]

    def keystore(self) -> KeyStore:
        if self.store is None:
            raise UnavailableError("the service is not started")
        return self.store

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def check_room(self, n: int) -> None:
        if self._queued + n > self.config.max_queue:
            raise OverloadedError("too many key operations queued; try again shortly", retry_after=1)

    async def crypto(self, fn: Callable[..., T], *args: Any) -> T:
        """RSA work on the worker threads, with a bound on how much may wait: past it, `overloaded`."""
        self.check_room(1)
        self._queued += 1
        try:
            return await self.run(fn, *args)
        finally:
            self._queued -= 1


def _write_keyset(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        os.fchmod(f.fileno(), 0o644)  # a key set is public (and the unit's UMask is 0077)
        f.write(data)


# -- the command -------------------------------------------------------------------------------------------


async def serve(config: ServiceConfig, *, ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT. SIGHUP re-reads the clients file. READY=1 once listening (Type=notify)."""
    service = LKMService(config)
    await service.start()
    stop = stop_requested()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload_clients)
    notifier = Notifier(os.environ)
    notifier.send("READY=1", "STATUS=serving " + service.url)
    watchdog = watchdog_seconds(os.environ)
    pings = asyncio.create_task(watchdog_pings(notifier, watchdog), name="lkm-watchdog") if watchdog else None
    if ready is not None:
        ready(service.url)
    try:
        await stop.wait()
    finally:
        if pings is not None:
            pings.cancel()
        notifier.send("STOPPING=1")
        _log.info("stopping")
        await service.stop()
        notifier.close()


def serve_command(args: Any) -> None:
    """`mediaseal lkm serve`: build the config, serve until told to stop. Errors are LKMError (one line)."""
    asyncio.run(serve(config_from_args(args)))
