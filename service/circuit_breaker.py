"""A circuit breaker for the feature store: a dead Redis must not cost every request a timeout.

closed     every request fetches; `failure_threshold` failures in a row open the circuit.
open       no request fetches (they are scored on defaults, or refused under the fail policy)
           for `open_seconds`.
half-open  one request probes the store; success closes the circuit, failure opens it again.

All state lives on the event loop thread, so no lock is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

from prometheus_client import Gauge


class CircuitState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        open_seconds: float,
        state_gauge: Gauge | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failure_threshold
        self._open_seconds = open_seconds
        self._gauge = state_gauge
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = CircuitState.CLOSED

    def _set(self, state: CircuitState) -> None:
        self.state = state
        if self._gauge is not None:
            self._gauge.set(int(state))

    def allow(self) -> bool:
        """Whether this request may call the store now."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self._clock() - self._opened_at < self._open_seconds:
                return False
            self._set(CircuitState.HALF_OPEN)
        if self._probing:
            return False  # one probe at a time; the others keep the fast path
        self._probing = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        if self.state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def record_inconclusive(self, probe: bool) -> None:
        """A call ended without telling how the store is (cancelled by its caller, or the
        event loop too busy to tell a late reply from none). If it was the half-open probe
        (`probe`: the circuit was half-open when it was allowed), another may be sent; a call
        allowed earlier, while the circuit was closed, leaves the probe running alone."""
        if probe:
            self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self.state is CircuitState.HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._set(CircuitState.OPEN)
