"""A circuit breaker per repository: during an outage one caller probes per interval, the rest wait.

    breaker = CircuitBreaker(base=0.5, cap=60.0)       # one per repository

    async with breaker.attempt():                      # every delivery goes through it
        receipt = await repository.put(upload)

- Closed (the normal state): `attempt()` admits every caller at once.
- A failure of a kind in `trips_on` (default: TransientRepositoryError) opens it; the next probe is
  due after a jittered delay, uniform in [d/2, d] with d = min(cap, base * 2^(failures - 1)).
- Open: callers entering `attempt()` wait. When a probe is due, exactly one of them is admitted (the
  probe); the others keep waiting. The probe's success closes the breaker and releases everyone; its
  failure doubles d (capped) and schedules the next probe. Callers that were already inside when the
  breaker opened finish as they will: their failures do not add to the backoff, a success closes it.
- Any other outcome of a probe (a PermanentRepositoryError, cancellation, a bug) says nothing about
  the outage: the breaker stays open and the probe slot passes to the next waiter.
- Waiting is plain awaiting: cancel the task (or wrap it in `asyncio.timeout`) to stop waiting.

Only the prober sees the failure (its exception propagates out of `async with`); waiters see none,
so an outage costs one request and one log line per interval, not one per recording. The state
(`state`, `failures`, `probes`, `retry_in()`) is there for metrics and the health endpoint.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from mediaseal.uploader.base import TransientRepositoryError

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    def __init__(self, base: float = 0.5, cap: float = 60.0, *,
                 trips_on: tuple[type[BaseException], ...] = (TransientRepositoryError,),
                 clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[float, float], float] = random.uniform) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base, self.cap, self.trips_on = base, cap, trips_on
        self._clock, self._jitter = clock, jitter
        self.failures = 0  # consecutive failed probes (+1 for the failure that opened it)
        self.probes = 0  # probes admitted since creation
        self._open = False
        self._probing = False
        self._next_probe = 0.0
        self._changed = asyncio.Event()

    @property
    def state(self) -> str:
        """"closed", "open" (waiting for the next probe) or "probing"."""
        if not self._open:
            return "closed"
        return "probing" if self._probing else "open"

    def retry_in(self) -> float:
        """Seconds until the next probe is due (0 when closed or due)."""
        return max(0.0, self._next_probe - self._clock()) if self._open else 0.0

    @asynccontextmanager
    async def attempt(self) -> AsyncIterator[None]:
        """Wait until this caller may try the repository, then record how the try went."""
        probe = await self._admit()
        try:
            yield
        except BaseException as e:
            if isinstance(e, self.trips_on):
                self._failed(probe)
            elif probe:
                self._probing = False
                self._notify()
            raise
        self._succeeded()

    async def _admit(self) -> bool:
        while True:
            if not self._open:
                return False
            timeout: float | None = None
            if not self._probing:
                timeout = self._next_probe - self._clock()
                if timeout <= 0:
                    self._probing = True
                    self.probes += 1
                    return True
            changed = self._changed
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)

    def _failed(self, probe: bool) -> None:
        if self._open and not probe:
            return  # in flight when it opened: already counted
        self.failures += 1
        d = min(self.cap, self.base * 2 ** min(self.failures - 1, 62))
        self._open = True
        self._probing = False
        self._next_probe = self._clock() + self._jitter(d / 2, d)
        self._notify()

    def _succeeded(self) -> None:
        self.failures = 0
        if self._open:
            self._open = False
            self._probing = False
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
