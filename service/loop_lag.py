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
from collections.abc import Callable
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
        self._tick_seconds: float | None = None  # while run() ticks

    def record(self, observed_at: float, late_by: float) -> None:
        self._ticks.append((observed_at, late_by))
        if self._histogram is not None:
            self._histogram.observe(late_by)

    def worst_since(self, since: float, now: float) -> float:
        """The longest the loop was seen busy between `since` and `now` (loop clock), 0 when it
        was not. A tick's lateness counts only for its part after `since`; while ticking, a
        tick overdue now (the loop is busy this very moment, or was until now) counts too."""
        worst = 0.0
        if self._tick_seconds is not None and self._ticks:
            overdue = now - (self._ticks[-1][0] + self._tick_seconds)
            worst = max(0.0, min(overdue, now - since))
        for observed_at, late_by in reversed(self._ticks):
            if observed_at < since:
                break
            worst = max(worst, min(late_by, observed_at - since))
        return worst

    async def run(self, tick_seconds: float = TICK_SECONDS) -> None:
        """Tick until cancelled."""
        loop = asyncio.get_running_loop()
        self._tick_seconds = tick_seconds
        try:
            while True:
                due = loop.time() + tick_seconds
                await asyncio.sleep(tick_seconds)
                now = loop.time()
                self.record(now, max(0.0, now - due))
        finally:
            self._tick_seconds = None


class PatientTimeout:
    """A timeout of `budget` seconds that waits on while the event loop is busy.

    When due, it looks at the loop. If the loop ran late since the last look, a reply may be
    here unread, and it looks again one budget later, up to `longest` seconds in all: once in
    any case, so that the loop gets to read what came, and after that only while the store
    answers other fetches (`answered_at`, the loop time of the last reply): a hung store under
    load answers none, and must still be found out. It expires
    - when the loop kept up since the last look, or the store answered nothing: the store is
      slow or gone, `loop_was_busy` is False;
    - at `longest`, with the loop still busy and the store answering others: nothing is known
      about this fetch's store, `loop_was_busy` is True.
    The body sees TimeoutError, like `asyncio.timeout`; `expired` tells it apart from a
    TimeoutError the body raised itself.

    It cancels the task itself, as `asyncio.timeout` does, rather than wrapping one: entered on
    every fetch, the nested context manager's own entry, exit and rescheduling took about 3 % of
    the event loop's time under load with 8-candidate requests.
    """

    def __init__(
        self,
        lag: LoopLag,
        budget: float,
        longest: float,
        answered_at: Callable[[], float],
        alone: bool = False,
    ) -> None:
        self._lag = lag
        self._budget = budget
        self._longest = longest
        self._answered_at = answered_at
        # A fetch that no other runs beside (the circuit breaker's probe) has no other replies
        # to go by: it waits on while the loop is busy, like the first look.
        self._alone = alone
        self.loop_was_busy = False

    @property
    def expired(self) -> bool:
        return self._expired

    async def __aenter__(self) -> PatientTimeout:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("PatientTimeout should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()  # cancellations requested before this one
        self._expired = False
        self._loop = loop = task.get_loop()
        now = loop.time()
        self._last_look = now
        self._looks = 0
        self._latest = now + max(self._budget, self._longest)
        self._due = now + self._budget
        self._look_later: asyncio.Handle = loop.call_at(self._due, self._look)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._look_later.cancel()
        # Our cancellation becomes TimeoutError; one requested by anyone else stays what it is.
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def _look(self) -> None:
        now = self._loop.time()
        # A whole budget back, even when the last look (before `longest`) came sooner.
        since = min(self._last_look, now - self._budget)
        busy = max(now - self._due, self._lag.worst_since(since, now)) > BUSY_SECONDS
        store_alive = self._looks == 0 or self._alone or self._answered_at() > self._last_look
        self.loop_was_busy = busy and store_alive
        if self.loop_was_busy and now < self._latest:
            self._looks += 1
            self._last_look = now
            self._due = min(self._latest, now + self._budget)
            self._look_later = self._loop.call_at(self._due, self._look)
        else:
            # Expires, one callback later (as asyncio.timeout does): a reply read in this very
            # iteration wakes the body first, and the body then exits in time.
            self._look_later = self._loop.call_soon(self._expire)

    def _expire(self) -> None:
        """The body is cancelled, and sees TimeoutError."""
        self._expired = True
        self._task.cancel()
