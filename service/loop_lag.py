"""How late the event loop runs what is due.

A busy loop delays every await, the reading of a feature-store reply that arrived in time
included: a fetch that timed out while the loop was busy says little about the store. A tick
scheduled every few milliseconds measures the delay (`adscore_event_loop_lag_seconds` shows
SREs how saturated a process is), and a fetch's timeout (`PatientTimeout`) waits on while the
loop is busy instead of scoring on defaults a request whose features may already be here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

from prometheus_client import Histogram

TICK_SECONDS = 0.005

# A timer this late means the loop was busy. uvloop's timers have 1 ms resolution; measured with
# a hung store and a lightly loaded loop, 99 % of fetch timeouts fired within 2.3 ms of their
# due time, and under overload (64 connections, no admission bound) 99 % fired 3 ms late or more.
BUSY_SECONDS = 0.003


class LoopLag:
    """The lateness of a periodic tick on the event loop, the last few hundred of them."""

    def __init__(self, histogram: Histogram | None = None, keep: int = 256) -> None:
        self._histogram = histogram
        self._ticks: deque[tuple[float, float]] = deque(maxlen=keep)  # (observed at, late by)

    def record(self, observed_at: float, late_by: float) -> None:
        self._ticks.append((observed_at, late_by))
        if self._histogram is not None:
            self._histogram.observe(late_by)

    def worst_since(self, since: float) -> float:
        """The largest lateness observed from `since` on (loop clock), 0 when none was."""
        worst = 0.0
        for observed_at, late_by in reversed(self._ticks):
            if observed_at < since:
                break
            worst = max(worst, late_by)
        return worst

    async def run(self, tick_seconds: float = TICK_SECONDS) -> None:
        """Tick until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + tick_seconds
            await asyncio.sleep(tick_seconds)
            now = loop.time()
            self.record(now, max(0.0, now - due))


class PatientTimeout:
    """A timeout of `budget` seconds that waits on while the event loop is busy.

    When due, it looks at the loop: if it ran late since the last look (a reply may be here,
    unread), it looks again one budget later, up to `longest` seconds in all (the request's
    deadline bounds that). It expires only after a budget's stretch in which the loop kept up
    and no reply came (the store is slow: `loop_was_busy` is False), or at `longest` with the
    loop still busy (`loop_was_busy` is True: nothing is known about the store). The body sees
    TimeoutError, like `asyncio.timeout`.
    """

    def __init__(self, lag: LoopLag, budget: float, longest: float) -> None:
        self._lag = lag
        self._budget = budget
        self._longest = longest
        self.loop_was_busy = False

    async def __aenter__(self) -> PatientTimeout:
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._last_look = now
        self._latest = now + max(self._budget, self._longest)
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._due = now + self._budget
        self._look_later = self._loop.call_at(self._due, self._look)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._look_later.cancel()
        await self._timeout.__aexit__(exc_type, exc, traceback)  # raises TimeoutError if expired

    def _look(self) -> None:
        now = self._loop.time()
        busy = max(now - self._due, self._lag.worst_since(self._last_look))
        self.loop_was_busy = busy > BUSY_SECONDS
        if self.loop_was_busy and now < self._latest:
            self._last_look = now
            self._due = min(self._latest, now + self._budget)
            self._look_later = self._loop.call_at(self._due, self._look)
        else:
            self._timeout.reschedule(now)  # expires: the body is cancelled, TimeoutError
