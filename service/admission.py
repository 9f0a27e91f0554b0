"""Admission control: a bound on scoring requests in flight, so overload is shed, not queued.

An auction waits a few tens of milliseconds at most. Past the bound a replica answers 503 with
Retry-After immediately (before reading the body), which costs microseconds, keeps the
latency of the requests it accepted, and lets the ad server or the load balancer go elsewhere.

The bound tightens under sustained overload. A burst may fill all `max_in_flight` slots for a
moment, and that is what they are for. But when demand stays above what a CPU-bound replica
can serve, holding more requests no longer raises its throughput; it only makes every request
wait behind a full house of others' event-loop work, and so does the refusal of the next one,
since the event loop reads it only after that work.

So arrivals, refusals and completions are counted per interval (at least 100 ms: an interval
ends at the first arrival after that). When more than a tenth of the arrivals were refused in
two intervals in a row, the bound drops to `overload_limit`. It comes back when
- an interval refuses no more than a tenth of its arrivals;
- the lowered bound costs throughput: fewer than 80 % of the completions per second seen when
  the overload began. That happens when requests wait on I/O rather than CPU (a slow feature
  store), where slots are throughput, or when demand fell and the lowered bound alone keeps
  refusing more than a tenth. After this kind of return the bound stays full for 5 s, or it
  would fall again at once.
- an interval's length passes with no arrival at all.

The refused share was chosen after measuring the candidates (BENCHMARKS.md). The fewest
requests in flight per interval does not separate the loads, since micro-batches finish many
requests at once; nor does their least time in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge

from service.errors import Overloaded
from service.lean_metrics import Level

INTERVAL_S = 0.1
"""The shortest interval over which arrivals, refusals and completions are counted (longer than
a burst, short against an overload)."""
OVERLOAD_SHARE = 0.1
"""An interval in which more than this share of arrivals was refused is overloaded."""
OVERLOADED_INTERVALS = 2
"""Overloaded intervals in a row that lower the bound."""
MIN_ARRIVALS = 10
"""Fewer arrivals in an interval tell nothing about overload (a trickle keeps the full bound)."""
KEPT_THROUGHPUT = 0.8
"""The lowered bound must keep this share of the completions per second seen at the full bound."""
HOLD_FULL_S = 5.0
"""How long the bound stays full after the lowered one cost throughput."""


class AdmissionControl:
    """Counts scoring requests in flight on the event loop (single-threaded, so no lock).

    `overload_limit` is the bound under sustained overload; equal to `limit` (the default), the
    bound is fixed. `interval_s` defaults to INTERVAL_S. `on_overload` hears True when the bound
    drops to `overload_limit` and False when it comes back.
    """

    def __init__(
        self,
        limit: int,
        in_flight: Level,
        shed: Counter,
        limit_gauge: Gauge,
        *,
        overload_limit: int | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_overload: Callable[[bool], None] | None = None,
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
        self._interval_s = INTERVAL_S if interval_s is None else interval_s
        self._clock = clock
        self._on_overload = on_overload
        self._interval_started = self._last_arrival = clock()
        self._arrivals = 0  # in the current interval
        self._refused = 0
        self._completed = 0
        self._overloaded_intervals = 0  # in a row, up to the last closed one
        # Completions and seconds over those overloaded intervals at the full bound, and since
        # the bound was lowered: their rates are compared over several intervals, so that one
        # interval with a pause (a GC, a noisy neighbour) decides nothing.
        self._full = _Throughput()
        self._lowered = _Throughput()
        self._reference_rate = 0.0  # completions per second at the full bound, when lowered
        self._hold_full_until = float("-inf")

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
            self._completed += 1
            self._gauge.dec()

    def _count_arrival(self) -> None:
        now = self._clock()
        if now - self._last_arrival >= self._interval_s:
            # An interval's length without an arrival: no overload, and what was open is stale.
            self._overloaded_intervals = 0
            self._full = _Throughput()
            self._set_limit(self.limit)
            self._start_interval(now)
        elif now - self._interval_started >= self._interval_s:
            self._close_interval(now, now - self._interval_started)
        self._last_arrival = now
        self._arrivals += 1

    def _close_interval(self, now: float, elapsed: float) -> None:
        overloaded = (
            self._arrivals >= MIN_ARRIVALS and self._refused > OVERLOAD_SHARE * self._arrivals
        )
        self._overloaded_intervals = self._overloaded_intervals + 1 if overloaded else 0
        if self.current_limit < self.limit:
            self._lowered.add(self._completed, elapsed)
            if not overloaded:
                self._set_limit(self.limit)
            elif (
                self._lowered.seconds >= OVERLOADED_INTERVALS * self._interval_s
                and self._lowered.rate < KEPT_THROUGHPUT * self._reference_rate
            ):
                # The lower bound costs throughput (requests waiting on I/O, or demand that
                # fell and is refused only by the lower bound): full again, and for a while.
                self._overloaded_intervals = 0
                self._hold_full_until = now + HOLD_FULL_S
                self._set_limit(self.limit)
        elif not overloaded:
            self._full = _Throughput()
        else:
            self._full.add(self._completed, elapsed)
            if self._overloaded_intervals >= OVERLOADED_INTERVALS and now >= self._hold_full_until:
                self._reference_rate = self._full.rate
                self._set_limit(self.overload_limit)
        self._start_interval(now)

    def _start_interval(self, now: float) -> None:
        self._arrivals = self._refused = self._completed = 0
        self._interval_started = now

    def _set_limit(self, limit: int) -> None:
        if limit != self.current_limit:
            self.current_limit = limit
            self._limit_gauge.set(limit)
            self._full = _Throughput()
            self._lowered = _Throughput()
            if self._on_overload is not None:
                self._on_overload(limit < self.limit)

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


class _Throughput:
    """Completions over a stretch of intervals."""

    def __init__(self) -> None:
        self.completed = 0
        self.seconds = 0.0

    def add(self, completed: int, seconds: float) -> None:
        self.completed += completed
        self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0
