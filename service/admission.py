"""Admission control: a bound on scoring requests in flight, so overload is shed, not queued.

An auction waits a few tens of milliseconds at most. Past the bound a replica answers 503 with
Retry-After immediately (before reading the body), which costs microseconds, keeps the
latency of the requests it accepted, and lets the ad server or the load balancer go elsewhere.

The bound tightens under sustained overload. A burst may fill all `max_in_flight` slots for a
moment, and that is what they are for. But when demand stays above what the replica can serve,
holding more requests no longer raises its throughput; it only makes every request wait behind
a full house of others' event-loop work, and so does the refusal of the next one, since the
event loop reads it only after that work. So when more than a tenth of the arrivals were refused
in each of two intervals in a row (200 ms), the bound drops to `overload_limit`, until an
interval in which no more than a tenth were. Measured at 256 candidates, the refused share
separates the loads (28-45 % of a run's arrivals at 150 % load, 0-4 % at 70 %, where a burst may
pass a tenth for one interval). The least number of requests in flight per interval does not
(micro-batches finish many requests at once), nor does their least time in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge

from service.errors import Overloaded

INTERVAL_S = 0.1
"""The interval over which arrivals and refusals are counted (longer than a burst, short against
an overload)."""
OVERLOAD_SHARE = 0.1
"""An interval in which more than this share of arrivals was refused is overloaded."""
OVERLOADED_INTERVALS = 2
"""Overloaded intervals in a row that lower the bound."""
MIN_ARRIVALS = 10
"""Fewer arrivals in an interval tell nothing about overload (a trickle keeps the full bound)."""


class AdmissionControl:
    """Counts scoring requests in flight on the event loop (single-threaded, so no lock).

    `overload_limit` is the bound under sustained overload; equal to `limit` (the default), the
    bound is fixed.
    """

    def __init__(
        self,
        limit: int,
        in_flight: Gauge,
        shed: Counter,
        limit_gauge: Gauge,
        *,
        overload_limit: int | None = None,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        overload_limit = limit if overload_limit is None else overload_limit
        if not 1 <= overload_limit <= limit:
            raise ValueError(f"overload_limit must be in 1..{limit}, got {overload_limit}")
        self.limit = limit
        self.overload_limit = overload_limit
        self.current_limit = limit
        self.in_flight = 0
        self._gauge = in_flight
        self._limit_gauge = limit_gauge
        self._limit_gauge.set(limit)
        self._shed_at_limit = shed.labels("max_in_flight")
        self._shed_in_overload = shed.labels("sustained_overload")
        self._interval_s = interval_s
        self._clock = clock
        self._interval_ends = clock() + interval_s
        self._arrivals = 0  # in the current interval
        self._refused = 0
        self._overloaded_intervals = 0  # in a row, up to the last closed one

    @property
    def adaptive(self) -> bool:
        return self.overload_limit < self.limit

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.adaptive:
            self._count_arrival()
        if self.in_flight >= self.current_limit:
            self._refused += 1
            raise self._refusal()
        self.in_flight += 1
        self._gauge.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._gauge.dec()

    def _count_arrival(self) -> None:
        now = self._clock()
        if now >= self._interval_ends:
            self._close_interval(now)
        self._arrivals += 1

    def _close_interval(self, now: float) -> None:
        overloaded = (
            self._arrivals >= MIN_ARRIVALS and self._refused > OVERLOAD_SHARE * self._arrivals
        )
        self._overloaded_intervals = self._overloaded_intervals + 1 if overloaded else 0
        lowered = self._overloaded_intervals >= OVERLOADED_INTERVALS
        new_limit = self.overload_limit if lowered else self.limit
        if new_limit != self.current_limit:
            self.current_limit = new_limit
            self._limit_gauge.set(new_limit)
        self._arrivals = self._refused = 0
        self._interval_ends = now + self._interval_s

    def _refusal(self) -> Overloaded:
        if self.current_limit < self.limit:
            self._shed_in_overload.inc()
            return Overloaded(
                f"{self.in_flight} scoring requests in flight under sustained overload: the limit "
                f"is {self.current_limit} until it passes (max_in_flight {self.limit}): retry"
            )
        self._shed_at_limit.inc()
        return Overloaded(
            f"{self.in_flight} scoring requests in flight, the limit is {self.limit}: retry"
        )
