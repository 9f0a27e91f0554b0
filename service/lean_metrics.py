"""Histograms, counters and gauges for the scoring path, cheaper than prometheus_client's.

Every scoring request makes about a dozen observations, increments and gauge moves.
prometheus_client's Histogram.observe checks its labels, takes a lock for the sum, scans its
buckets one by one and takes a second lock for the one it finds (about 0.8 µs; a Counter's inc
about 0.4 µs). These take one lock, find the bucket by bisection, and build the samples only
when Prometheus scrapes, under the same names, labels, buckets and help texts.

They keep their counts in this process's memory. In Prometheus's multiprocess mode (several
workers, see service/workers.py), a MultiprocessMirror (service/metrics.py) copies them into the
shared files every second and before each scrape: prometheus_client's own types would write to
the files on every update, at about 2 µs per histogram observation.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


# What prometheus_client's types and these share: the scoring path uses either through these.
class Observer(Protocol):
    """A histogram (or one label set of one)."""

    def observe(self, amount: float) -> None: ...


class Incrementer(Protocol):
    """A counter (or one label set of one)."""

    def inc(self, amount: float = 1) -> None: ...


class Level(Protocol):
    """A gauge without labels."""

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...

    def set(self, value: float) -> None: ...


def created_series_enabled() -> bool:
    """Whether `_created` samples are exported: prometheus_client's own switch."""
    flag = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False")
    return flag.lower() not in ("true", "1", "t")


class LeanHistogramChild:
    """One label set's buckets and sum."""

    __slots__ = ("_bounds", "_counts", "_lock", "_sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf's
        self._sum = 0.0
        self._lock = threading.Lock()
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound >= amount: Prometheus buckets count values less than or equal to `le`.
        index = bisect_left(self._bounds, amount)
        with self._lock:
            self._counts[index] += 1
            self._sum += amount

    def snapshot(self) -> tuple[list[int], float]:
        """The count per bucket (not cumulative, +Inf's last) and the sum."""
        with self._lock:
            return list(self._counts), self._sum


class LeanCounterChild:
    """One label set's running total."""

    __slots__ = ("_lock", "_value", "created")

    def __init__(self) -> None:
        self._value = 0.0
        self._lock = threading.Lock()
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up: cannot add {amount}")
        with self._lock:
            self._value += amount

    def get(self) -> float:
        return self._value


Child = TypeVar("Child", LeanHistogramChild, LeanCounterChild)


class _LeanFamily(Collector, Generic[Child]):
    """Children by label values, registered on `registry` like a prometheus_client metric."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        new_child: Callable[[], Child],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._new_child: Callable[[], Child] = new_child
        self._children: dict[tuple[str, ...], Child] = {}
        if not self.labelnames:  # exported from the start, like prometheus_client's
            self._children[()] = new_child()
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            key = self._key(values)
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return child

    def _unlabelled(self) -> Child:
        self._check_arity(())
        return self._children[()]

    def _check_arity(self, values: tuple[object, ...]) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name} takes {len(self.labelnames)} label values "
                f"({', '.join(self.labelnames) or 'none'}), got {len(values)}"
            )

    def _key(self, values: tuple[object, ...]) -> tuple[str, ...]:
        """A new child's label values, as strings (as prometheus_client keeps them)."""
        self._check_arity(values)
        return tuple(str(v) for v in values)

    def describe(self) -> Iterator[Metric]:
        return iter([self._family()])

    def _family(self) -> Metric:
        raise NotImplementedError


class LeanHistogram(_LeanFamily[LeanHistogramChild]):
    """A histogram with prometheus_client's `labels(...).observe(...)` (or `observe` when it has
    no labels)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: bucket bounds must be increasing, got {bounds}")
        self._bounds = bounds[:-1] if bounds and bounds[-1] == float("inf") else bounds
        super().__init__(
            name, documentation, labelnames, registry, lambda: LeanHistogramChild(self._bounds)
        )

    def observe(self, amount: float) -> None:
        """Observe into the histogram without labels."""
        self._unlabelled().observe(amount)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        # prometheus_client's spelling of each bound, so that series keep their `le` labels.
        les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        created = created_series_enabled()
        for values, child in list(self._children.items()):
            counts, total = child.snapshot()
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(les, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, total)
            if created:
                labels = dict(zip(self.labelnames, values, strict=True))
                family.samples.append(Sample(f"{self.name}_created", labels, child.created))
        return iter([family])


class LeanCounter(_LeanFamily[LeanCounterChild]):
    """A counter with prometheus_client's `labels(...).inc(...)`; exported as `<name>_total`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry, LeanCounterChild)

    def inc(self, amount: float = 1) -> None:
        """Increment the counter without labels."""
        self._unlabelled().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        created = created_series_enabled()
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.get(), child.created if created else None)
        return iter([family])


class LeanGauge(Collector):
    """A gauge without labels, with prometheus_client's `inc`, `dec` and `set`."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._value = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1) -> None:
        with self._lock:
            self._value -= amount

    def set(self, value: float) -> None:
        self._value = float(value)

    def describe(self) -> Iterator[Metric]:
        return iter([GaugeMetricFamily(self.name, self.documentation)])

    def collect(self) -> Iterator[Metric]:
        return iter([GaugeMetricFamily(self.name, self.documentation, value=self._value)])
