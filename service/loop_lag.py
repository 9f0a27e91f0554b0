"""How late the event loop runs what is due.

A busy loop delays every await, the reading of a feature-store reply that arrived in time
included: a fetch that timed out while the loop was busy says little about the store. A tick
scheduled every few milliseconds measures the delay; the pipeline asks it, when a fetch times
out, whether the loop was busy meanwhile (then the circuit breaker is not told), and
`adscore_event_loop_lag_seconds` shows SREs how saturated a process is.
"""

from __future__ import annotations

import asyncio
from collections import deque

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
