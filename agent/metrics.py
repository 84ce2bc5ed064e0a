"""The agent's Prometheus metrics, in one registry of its own (served by the health listener).

Every failure the daemon meets increments one of these and logs one line (DESIGN invariant 7).

What a Prometheus user expects of an exporter: the standard `process_*` and `python_info` collectors
on this registry; no `*_created` series (they double the series count and no alert uses them); and
labelled failure counters that exist at 0 for every known reason from the start, so that
`increase(...[30m]) > 0` fires on the very first failure (a series that appears at 1 has no increase).
Per-watch and repository gauges say what readiness is made of.
"""

from __future__ import annotations

import importlib.metadata
import platform

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide; the agent's process is the one that serves them

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
PlatformCollector(registry=REGISTRY)  # python_info

DISCOVERED = Counter("mediaseal_recordings_discovered_total", "Complete recordings found", ["kind"], registry=REGISTRY)
ENCRYPTED = Counter("mediaseal_recordings_encrypted_total", "Recordings sealed into the spool", ["kind"],
                    registry=REGISTRY)
DELIVERED = Counter("mediaseal_recordings_delivered_total", "Packages confirmed by the repository", ["kind"],
                    registry=REGISTRY)
FAILED = Counter("mediaseal_recordings_failed_total", "Recording attempts that failed, by stage and reason",
                 ["stage", "reason"], registry=REGISTRY)
REDONE = Counter("mediaseal_recordings_redone_total", "Recordings re-encrypted because the source changed",
                 registry=REGISTRY)
BYTES_IN = Counter("mediaseal_bytes_in_total", "Plaintext bytes read from capture directories", registry=REGISTRY)
BYTES_OUT = Counter("mediaseal_bytes_out_total", "Package bytes delivered to the repository", registry=REGISTRY)
ENCRYPT_SECONDS = Histogram("mediaseal_encrypt_seconds", "Time to seal one recording into the spool",
                            registry=REGISTRY, buckets=(0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300))
UPLOAD_SECONDS = Histogram("mediaseal_upload_seconds", "Time to deliver and confirm one package",
                           registry=REGISTRY, buckets=(0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300))
RETRIES = Counter("mediaseal_upload_retries_total", "Upload attempts that will be retried", registry=REGISTRY)
SPOOL_BYTES = Gauge("mediaseal_spool_bytes", "Bytes held in the spool (packages and reservations)",
                    registry=REGISTRY)
SPOOL_PACKAGES = Gauge("mediaseal_spool_packages", "Packages waiting in the spool", registry=REGISTRY)
INTAKE_PAUSED = Gauge("mediaseal_intake_paused", "1 while intake waits (spool full, no valid key)",
                      registry=REGISTRY)
UNREADABLE = Counter("mediaseal_watcher_unreadable_total", "Capture files that could not be read",
                     registry=REGISTRY)
RESCANS = Counter("mediaseal_watcher_rescans_total", "Full reconciliation scans of capture directories",
                  registry=REGISTRY)
KEY_REFRESH_FAILURES = Counter("mediaseal_key_refresh_failures_total", "Key set loads that failed",
                               ["reason"], registry=REGISTRY)
KEYSET_AGE = Gauge("mediaseal_keyset_age_seconds", "Age of the key material in use", registry=REGISTRY)
CURRENT_KID = Gauge("mediaseal_current_kid_info", "The kid new packages are wrapped to", ["kid"],
                    registry=REGISTRY)
# Refreshed by the health listener (agent/service.py) at every scrape, from the spool's manifests and
# the agent's delivery events.
OLDEST_UNDELIVERED = Gauge("mediaseal_oldest_undelivered_age_seconds",
                           "Age of the oldest package the repository has not confirmed yet (0 when none)",
                           registry=REGISTRY)
SPOOL_STATES = Gauge("mediaseal_spool_manifests", "Packages in the spool by manifest state", ["state"],
                     registry=REGISTRY)
QUARANTINED = Gauge("mediaseal_packages_quarantined",
                    "Packages whose last delivery failed permanently (re-probed slowly)", registry=REGISTRY)
READY = Gauge("mediaseal_ready", "1 when /readyz answers 200 (keys valid, spool writable, repository reachable)",
              registry=REGISTRY)
WATCH_UP = Gauge("mediaseal_watch_up", "1 when the capture directory is there, can be listed and is ours",
                 ["watch"], registry=REGISTRY)
REPOSITORY_UP = Gauge("mediaseal_repository_up",
                      "1 when the last repository probe succeeded (file://: a write test; S3: the bucket answers)",
                      registry=REGISTRY)
# Sources the agent sealed but could not remove from the capture directory (agent/disposal.py): each
# counted once, by reason; the gauge is how many still wait (plaintext left where the producer wrote it).
DISPOSE_FAILURES = Counter("mediaseal_dispose_failures_total",
                           "Sealed sources whose disposal failed (counted once per recording and start), by reason",
                           ["reason"], registry=REGISTRY)
UNDISPOSED = Gauge("mediaseal_sources_undisposed",
                   "Sealed and delivered sources still in the capture directory, their disposal failing",
                   registry=REGISTRY)
SPOOL_CAPACITY = Gauge("mediaseal_spool_capacity_bytes", "The spool's configured capacity ([buffer] max_bytes)",
                       registry=REGISTRY)


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    try:
        return importlib.metadata.version("mediaseal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO = Info("mediaseal_build", "The running mediaseal's version and Python", registry=REGISTRY)
BUILD_INFO.info({"version": _version(), "python": platform.python_version()})


# Every (stage, reason) the agent can count, at 0 from the start (see the module docstring). Reasons
# named after an errno or an exception class appear when first met, on top of these.
FAILURE_REASONS: tuple[tuple[str, str], ...] = (
    ("intake", "unreadable"), ("intake", "too-large-for-spool"), ("intake", "spool-full"),
    ("intake", "ENOSPC"), ("intake", "EIO"), ("upload", "transient"), ("upload", "quarantined"),
)
for _stage, _reason in FAILURE_REASONS:
    FAILED.labels(_stage, _reason)
KEY_REFRESH_REASONS = (  # the error classes a key source fails with (agent/keysource.py counts type(e).__name__)
    "KeySetSourceError", "BadSignatureError", "KeySetFormatError", "KeySetExpiredError", "KeySetRollbackError",
    "KeyringNotFoundError", "KeyringFormatError", "NoValidKeyError", "OSError",
)
for _reason in KEY_REFRESH_REASONS:
    KEY_REFRESH_FAILURES.labels(_reason)
