"""MultiprocessMirror's own logic: counters gain what the source gained, gauges follow it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.metrics import MultiprocessMirror


class Source(Collector):
    """A scrape-time collector whose values the test sets."""

    def __init__(self) -> None:
        self.lookups = {"hit": 0.0, "miss": 0.0}
        self.psi: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily("demo_lookups", "Lookups.", labels=["result"])
        for result, value in self.lookups.items():
            lookups.add_metric([result], value)
        psi = GaugeMetricFamily("demo_psi", "PSI.", labels=["model", "feature"])
        for feature, value in self.psi.items():
            psi.add_metric(["pcvr", feature], value)
        return iter((lookups, psi))


def test_counters_gain_what_the_source_gained_and_gauges_follow_it() -> None:
    source, registry = Source(), CollectorRegistry()
    mirror = MultiprocessMirror((source,), registry)
    mirror.sync()  # no gauge sample yet: nothing to create
    source.lookups = {"hit": 5.0, "miss": 2.0}
    source.psi = {"device": 0.1, "hour": 0.3}
    mirror.sync()
    source.lookups = {"hit": 8.0, "miss": 2.0}
    source.psi = {"device": 0.2}  # "hour" is no longer reported
    mirror.sync()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("demo_lookups_total", result="hit") == 8.0
    assert value("demo_lookups_total", result="miss") == 2.0
    assert value("demo_psi", model="pcvr", feature="device") == 0.2
    assert value("demo_psi", model="pcvr", feature="hour") is None  # retired
    source.lookups = {"hit": 3.0, "miss": 2.0}  # the source restarted from zero
    mirror.sync()
    assert value("demo_lookups_total", result="hit") == 8.0  # never goes back
