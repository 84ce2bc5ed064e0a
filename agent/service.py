"""Service glue: the agent's systemd notifications and watchdog, and the health/metrics HTTP listener.

>>> service = await AgentService.start(config)      # listener up, STATUS=starting, watchdog pings
>>> service.watch_stop(stop)                          # STOPPING=1 as soon as a stop is requested
>>> service.attach(pipeline)                          # readiness and metrics can look at it now
>>> service.ready(resumed)                            # READY=1: recovery done, first key set loaded
>>> await service.close()

sd_notify and the watchdog pings are plumbing.notify's (shared with the Local Key Manager): without
$NOTIFY_SOCKET every call is a no-op; WATCHDOG=1 comes from an event-loop task every WATCHDOG_USEC/3,
so a wedged loop stops the pings and systemd restarts the agent.

The listener (aiohttp, with plumbing.http's limits: idle connections closed, malformed requests one
log line) on `[metrics] listen` serves
- `/metrics`: Prometheus text (or OpenMetrics, by Accept) from `agent.metrics.REGISTRY`;
- `/healthz`: 200 whenever the event loop answers (liveness);
- `/readyz`: 200 or 503 with a JSON reason: started (recovery done, keys loaded), a valid current key,
  the spool writable, the repository reachable recently (the last delivery attempt did not fail, and a
  file:// repository's directory is there);
- `/status`: the live view `mediaseal status` adds to the manifests (JSON).
`/status`, and the reason of `/readyz`, are answered to loopback peers only: they name paths and
errors, and the listener may be bound to a container's every address.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from mediaseal.agent import metrics
from mediaseal.agent.ownership import OwnedError, Ownership
from mediaseal.agent.pipeline import DeliveryHealth
from mediaseal.agent.readiness import PROBE_SECONDS, Check, probe_repository, probe_watch
from mediaseal.agent.status import ManifestCache, SpoolReport, read_spool
from mediaseal.plumbing.http import ListenSite, app_runner, json_response
from mediaseal.plumbing.notify import Notifier, watchdog_pings, watchdog_seconds

if TYPE_CHECKING:
    from mediaseal.agent.config import Config
    from mediaseal.agent.pipeline import Pipeline

log = logging.getLogger("mediaseal.service")

STATUS_SECONDS = 10.0  # how often STATUS= is refreshed (sent only when it changed)
REPORT_MAX_AGE = 5.0  # the manifest scan behind the spool figures is reused this long


class ServiceError(Exception):
    """The service glue cannot start (the health listener cannot bind)."""


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- what the agent is going through, learned from its own (stable) log events -----------------------


class EventTracker(logging.Handler):
    """Keeps the agent's last warning or error (any stable log event at WARNING or above) for STATUS=
    and /status. Delivery health itself comes from the pipeline (`Pipeline.health`)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self._state = threading.Lock()
        self.last_error: dict[str, Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = getattr(record, "fields", {}) or {}
        detail = fields.get("error") or fields.get("reason") or fields.get("path") or ""
        with self._state:
            self.last_error = {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
                "time": record.created, "event": record.getMessage(), "message": _one_line(str(detail), 200),
            }


# -- the service -----------------------------------------------------------------------------------


class AgentService:
    def __init__(self, config: Config, env: Mapping[str, str]) -> None:
        self.config = config
        self.notifier = Notifier(env)
        self.watchdog = watchdog_seconds(env)
        self.tracker = EventTracker()
        self.pipeline: Pipeline | None = None
        self.phase = "starting"
        self.started_at = time.time()
        self._ready = False
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cache = ManifestCache()
        self._report: SpoolReport | None = None
        self._report_lock = asyncio.Lock()
        self._last_status = ""
        self.address: str | None = None  # host:port the listener is bound to
        self.owner: Ownership | None = None  # the locks (agent/ownership.py): missing watches are claimed later
        self._watch_checks: dict[int, Check] = {}  # by watch index: the last probe's answer
        self._repo_check: Check | None = None

    @classmethod
    async def start(cls, config: Config, *, env: Mapping[str, str] | None = None,
                    listener_required: bool = True) -> AgentService:
        """Start the listener (if enabled) and the watchdog. A listener that cannot bind is a
        ServiceError when `listener_required`, else a logged warning (the embedded default)."""
        service = cls(config, os.environ if env is None else env)
        logging.getLogger("mediaseal").addHandler(service.tracker)
        metrics.SPOOL_CAPACITY.set(config.buffer.max_bytes)
        if config.metrics.enabled:
            try:
                await service._listen(config.metrics.listen)
            except OSError as e:
                if listener_required:
                    await service.close()
                    raise ServiceError(f"metrics.listen {config.metrics.listen}: cannot listen: "
                                       f"{e.strerror or e}") from None
                log.warning("metrics-listener-failed", extra={"fields": {"listen": config.metrics.listen,
                                                                         "error": e.strerror or str(e)}})
        if service.watchdog is not None:
            service._tasks.append(asyncio.create_task(watchdog_pings(service.notifier, service.watchdog),
                                                      name="sd-watchdog"))
        service.set_phase("starting")
        return service

    # -- life cycle, as serve() goes through it ----------------------------------------------------

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self._send_status(force=True)

    def watch_stop(self, stop: asyncio.Event) -> None:
        async def on_stop() -> None:
            await stop.wait()
            self.stopping()

        self._tasks.append(asyncio.create_task(on_stop(), name="sd-stopping"))

    @property
    def _health(self) -> DeliveryHealth:
        return self.pipeline.health if self.pipeline is not None else DeliveryHealth()

    def attach(self, pipeline: Pipeline, owner: Ownership | None = None) -> None:
        self.pipeline = pipeline
        self.owner = owner

    async def probe(self) -> None:
        """Look at every capture directory and at the repository now; the gauges and /readyz follow.
        A directory that is there but not locked by this agent yet (it appeared, or was replaced by a
        mount) is claimed here; held by another agent, it is not ready."""
        for i, w in enumerate(self.config.watch):
            check = await asyncio.to_thread(probe_watch, w)
            if self.owner is not None:
                if check.ok:
                    try:
                        await asyncio.to_thread(self.owner.claim_watch, w)  # a stat: never on the loop
                    except OwnedError as e:
                        check = Check(False, str(e))
                if self.pipeline is not None:  # a directory we hold no lock on is not scanned
                    self.pipeline.watcher.set_owned(w, self.owner.holds(w))
            self._note_watch(i, check)
        if self.pipeline is not None:
            check = await probe_repository(self.pipeline.repository)
            before, self._repo_check = self._repo_check, check
            metrics.REPOSITORY_UP.set(1 if check.ok else 0)
            if not check.ok and (before is None or before.ok or before.detail != check.detail):
                log.warning("repository-not-ready", extra={"fields": {"error": check.detail}})
            elif check.ok and before is not None and not before.ok:
                log.info("repository-ready", extra={"fields": {"detail": check.detail}})

    def _note_watch(self, i: int, check: Check) -> None:
        path = str(self.config.watch[i].path)
        before, self._watch_checks[i] = self._watch_checks.get(i), check
        metrics.WATCH_UP.labels(path).set(1 if check.ok else 0)
        if not check.ok and (before is None or before.ok or before.detail != check.detail):
            log.warning("watch-not-ready", extra={"fields": {"watch": path, "reason": check.detail}})
        elif check.ok and before is not None and not before.ok:
            log.info("watch-ready", extra={"fields": {"watch": path}})

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                await self.probe()
            except Exception:  # a bug: say so, and keep probing (readiness must not freeze at its last answer)
                log.exception("probe-error")

    def ready(self) -> None:
        """Recovery is done and a key is loaded: tell systemd, start the periodic STATUS."""
        self._ready = True
        self.phase = "running"
        self.notifier.send("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
        self._tasks.append(asyncio.create_task(self._status_loop(), name="sd-status"))
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="readiness-probe"))

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.phase = "stopping"
            self.notifier.send("STOPPING=1", "STATUS=stopping: draining in-flight work")

    async def close(self) -> None:
        self.stopping()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        logging.getLogger("mediaseal").removeHandler(self.tracker)
        self.notifier.close()

    # -- sd_notify tasks ---------------------------------------------------------------------------

    async def _status_loop(self) -> None:
        # Checked at least as often as the watchdog pings, sent only when the line changed.
        period = min(STATUS_SECONDS, self.watchdog / 3) if self.watchdog else STATUS_SECONDS
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(OSError):
                await self.report()
            self._send_status()

    def status_line(self) -> str:
        """One line for `systemctl status`: queue depth, quarantine, intake, the last error."""
        if self.pipeline is None or self.phase != "running":
            return self.phase
        spool = self.pipeline.spool
        parts = [f"{spool.package_count} awaiting delivery"]
        if self._report is not None and self._report.oldest is not None:
            parts[0] += f" (oldest {int(self._report.oldest_age())}s)"
        if self._health.quarantined:
            parts.append(f"{len(self._health.quarantined)} quarantined")
        if _intake_paused():
            parts.append("intake paused")
        last = self.tracker.last_error
        if last is not None:
            ago = int(time.time() - last["time"])
            parts.append(f"last error {ago}s ago: {last['event']}: {last['message']}")
        return _one_line("; ".join(parts))

    def _send_status(self, *, force: bool = False) -> None:
        line = self.status_line()
        if force or line != self._last_status:
            self._last_status = line
            self.notifier.send(f"STATUS={line}")

    # -- figures -----------------------------------------------------------------------------------

    async def report(self) -> SpoolReport | None:
        """The manifest-derived spool figures: rescanned when the number of packages changed, else at
        most every REPORT_MAX_AGE seconds (a rescan reads only the manifests that changed)."""
        if self.pipeline is None:
            return None
        async with self._report_lock:
            r = self._report
            if (r is None or r.packages != self.pipeline.spool.package_count
                    or time.time() - r.taken_at > REPORT_MAX_AGE):
                self._report = await asyncio.to_thread(read_spool, self.pipeline.spool.root, cache=self._cache)
        return self._report

    async def _refresh_gauges(self) -> None:
        with contextlib.suppress(OSError):
            report = await self.report()
            if report is not None:
                metrics.OLDEST_UNDELIVERED.set(report.oldest_age())
                for state, n in report.counts.items():
                    metrics.SPOOL_STATES.labels(state).set(n)
        metrics.QUARANTINED.set(len(self._health.quarantined))
        if self.pipeline is not None:
            self.pipeline.keys.current()  # refreshes mediaseal_keyset_age_seconds
        ready, _ = await self.readiness()
        metrics.READY.set(1 if ready else 0)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.pipeline is None or not self._ready:
            return False, {"ready": False, "reason": self.phase}
        if self._stopping:
            return False, {"ready": False, "reason": "stopping"}
        p = self.pipeline
        checks: dict[str, Check] = {}
        recipient = p.keys.current()
        checks["keys"] = Check(True, recipient.kid) if recipient is not None else Check(
            False, "no valid key: the key set could not be loaded or is older than keys.max_staleness_seconds")
        checks["watches"] = self._watches_check()
        checks["spool"] = await asyncio.to_thread(_spool_writable, p.spool.root)
        if checks["spool"].ok and p.intake.paused_reason is not None:
            checks["spool"] = Check(False, f"intake paused: {p.intake.paused_reason}")
        checks["repository"] = await asyncio.to_thread(self._repository_check)
        failed = [f"{name}: {c.detail}" for name, c in checks.items() if not c.ok]
        body: dict[str, Any] = {"ready": not failed, "checks": {k: {"ok": c.ok, "detail": c.detail}
                                                                for k, c in checks.items()}}
        if failed:
            body["reason"] = "; ".join(failed)
        return not failed, body

    def _watches_check(self) -> Check:
        down = [c.detail for c in self._watch_checks.values() if not c.ok]
        if down:
            return Check(False, "; ".join(down))
        return Check(True, f"{len(self.config.watch)} watched")

    def _repository_check(self) -> Check:
        assert self.pipeline is not None
        if self._repo_check is not None and not self._repo_check.ok:
            return self._repo_check
        health = self._health
        if health.last_error is not None:
            return Check(False, f"last delivery attempt failed: {_one_line(health.last_error, 200)}")
        if health.ok_at is not None:
            return Check(True, f"last delivery confirmed {int(time.time() - health.ok_at)}s ago")
        return Check(True, "no delivery attempted yet")

    # -- HTTP --------------------------------------------------------------------------------------

    async def _listen(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        runner = app_runner(app, "mediaseal.service.http")
        await runner.setup()
        self._runner = runner
        site = ListenSite(runner, host, int(port))
        await site.start()
        self.address = site.address
        log.info("metrics-listening", extra={"fields": {"address": self.address}})

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._refresh_gauges()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return json_response({"alive": True, "phase": self.phase, "pid": os.getpid(),
                                  "uptime_seconds": round(time.time() - self.started_at, 1)})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, body = await self.readiness()
        metrics.READY.set(1 if ready else 0)
        if not _local(request):  # paths and error text are for this host only (issue 15, finding 17)
            body = {"ready": ready, "reason": "ask from this host for the reason"} if not ready else {"ready": True}
        return json_response(body, status=200 if ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        if not _local(request):
            return json_response({"error": "forbidden", "message": "/status is answered to this host only"}, 403)
        ready, body = await self.readiness()
        return json_response({
            "pid": os.getpid(), "phase": self.phase, "ready": ready, "reason": body.get("reason", ""),
            "awaiting_delivery": self.pipeline.spool.package_count if self.pipeline else None,
            "quarantined": len(self._health.quarantined), "intake_paused": bool(_intake_paused()),
            "last_error": self.tracker.last_error, "status": self.status_line(),
        })


def _local(request: web.Request) -> bool:
    """Whether the request comes from this host (loopback): the listener may be bound to every address
    (a container's, for Prometheus and probes), and /status and /readyz's reasons name paths and errors."""
    try:
        return ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        return False


def _spool_writable(root: Path) -> Check:
    """An unnamed (O_TMPFILE) file in staging/: proves the spool takes writes, leaves nothing behind."""
    try:
        with tempfile.TemporaryFile(dir=root / "staging") as f:
            f.write(b"\0")
            f.flush()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # another process filled it (intake pauses meanwhile)
            return Check(False, f"{root}: its filesystem is full ({e.strerror})")
        return Check(False, f"{root} is not writable: {e.strerror or e}")
    return Check(True, str(root))


def _intake_paused() -> bool:
    return bool(metrics.REGISTRY.get_sample_value("mediaseal_intake_paused"))
