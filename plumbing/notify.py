"""systemd's service notifications (sd_notify(3)): READY, STATUS, WATCHDOG, STOPPING; and the stop signals.

>>> notifier = Notifier(os.environ)                    # a no-op without $NOTIFY_SOCKET
>>> notifier.send("READY=1", "STATUS=serving https://127.0.0.1:8443")
>>> task = asyncio.create_task(watchdog_pings(notifier, watchdog_seconds(os.environ)))
>>> await stop_requested().wait(); notifier.send("STOPPING=1"); notifier.close()

The protocol in a few lines: one AF_UNIX datagram per message, newline-separated assignments, to
$NOTIFY_SOCKET (a path, or an abstract socket spelled with a leading '@'). Used by the agent
(agent/service.py) and the Local Key Manager (keys/lkm/service.py), both Type=notify units.

- Sending never raises: a lost datagram must not take a service down. The first failure is logged
  (`sd-notify-failed`, once: a watchdog ping every few seconds must not flood the log).
- WATCHDOG=1 is sent from an event-loop task every WatchdogSec/3 (well inside the WatchdogSec/2 that
  sd_watchdog_enabled(3) asks), so a wedged loop stops the pings and systemd restarts the service.
  A WATCHDOG_PID naming another process means the pings are not ours to send.
- A service stops on SIGTERM (systemctl stop) and SIGINT (Ctrl-C) alike, by an event its main task
  waits on, so the stop runs the same orderly path (STOPPING=1, drain, close) as any other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "notify_address", "stop_requested", "watchdog_pings", "watchdog_seconds"]

log = logging.getLogger("mediaseal.notify")


def notify_address(value: str | None) -> str | None:
    """The socket address for a $NOTIFY_SOCKET value: a path, or '@name' -> the abstract '\\0name'."""
    if not value:
        return None
    if value[0] == "@":
        return "\0" + value[1:]
    if value[0] == "/":
        return value
    return None  # vsock: and other transports are not used by systemd for services


def watchdog_seconds(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """WatchdogSec in seconds when systemd asks this process for pings, else None."""
    usec, for_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if for_pid and for_pid != str(pid if pid is not None else os.getpid()):
        return None  # meant for another process (we were started by the main process, say)
    return int(usec) / 1e6


class Notifier:
    """Sends sd_notify messages; never raises."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.address = notify_address(env.get("NOTIFY_SOCKET"))
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of `KEY=value` assignments; False if there is no socket or it was not sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("sd-notify-failed", extra={"fields": {"error": e.strerror or str(e)}})
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_pings(notifier: Notifier, watchdog: float) -> None:
    """WATCHDOG=1 every `watchdog`/3 seconds until cancelled (`watchdog`: watchdog_seconds(), WatchdogSec)."""
    interval = watchdog / 3
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


def stop_requested() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (handlers on the running loop, which must be in the main thread)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
