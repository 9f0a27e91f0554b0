"""Admission control: a bound on scoring requests in flight, so overload is shed, not queued.

An auction waits a few tens of milliseconds at most. Past the bound a replica answers 503 with
Retry-After immediately (before reading the body), which costs microseconds, keeps the
latency of the requests it accepted, and lets the ad server or the load balancer go elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge

from service.errors import Overloaded


class AdmissionControl:
    """Counts scoring requests in flight on the event loop (single-threaded, so no lock)."""

    def __init__(self, limit: int, in_flight: Gauge, shed: Counter) -> None:
        self.limit = limit
        self.in_flight = 0
        self._gauge = in_flight
        self._shed = shed.labels("max_in_flight")

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            self._shed.inc()
            raise Overloaded(
                f"{self.in_flight} scoring requests in flight, the limit is {self.limit}: retry"
            )
        self.in_flight += 1
        self._gauge.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._gauge.dec()
