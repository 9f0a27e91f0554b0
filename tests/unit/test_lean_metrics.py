"""Lean histograms, counters and gauges: the same exposition as prometheus_client's for the same
observations, exact counts under concurrent threads, and clear errors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from service.lean_metrics import (
    Incrementer,
    LeanCounter,
    LeanGauge,
    LeanHistogram,
    Level,
    Observer,
)
from service.metrics import LATENCY_BUCKETS, Labelled, Metrics, MultiprocessMirror

# Below, on and between the bounds, past the last one, zero, and a negative amount.
AMOUNTS = (0.0, 0.0005, 0.0004, 0.001, 0.0011, 0.0075, 0.02, 0.5, 2.5, 2.6, 60.0, -1.0)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text exposition's lines, without `_created` samples (their timestamps differ)."""
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if "_created" not in line.split("{")[0].split(" ")[0]
    ]


def test_a_histogram_exports_what_prometheus_clients_exports() -> None:
    reference, lean = CollectorRegistry(), CollectorRegistry()
    doc = "Time per stage."
    theirs = Histogram("t_seconds", doc, ["stage"], buckets=LATENCY_BUCKETS, registry=reference)
    ours = LeanHistogram("t_seconds", doc, ["stage"], buckets=LATENCY_BUCKETS, registry=lean)
    for stage in ("fetch", "inference"):
        for amount in AMOUNTS:
            theirs.labels(stage).observe(amount)
            ours.labels(stage).observe(amount)
    theirs.labels("idle")
    ours.labels("idle")
    assert exposition(lean) == exposition(reference)
    assert lean.get_sample_value("t_seconds_count", {"stage": "fetch"}) == len(AMOUNTS)


def test_an_unlabelled_histogram_is_exported_before_its_first_observation() -> None:
    reference, lean = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram("n", "Rows.", buckets=(1, 8, 64), registry=reference)
    ours = LeanHistogram("n", "Rows.", buckets=(1, 8, 64), registry=lean)
    assert exposition(lean) == exposition(reference)
    for amount in (1, 2, 8, 9, 64, 65):
        theirs.observe(amount)
        ours.observe(amount)
    assert exposition(lean) == exposition(reference)
    assert lean.get_sample_value("n_bucket", {"le": "8.0"}) == 3


def test_a_counter_exports_what_prometheus_clients_exports() -> None:
    reference, lean = CollectorRegistry(), CollectorRegistry()
    theirs = Counter("requests", "Requests.", ["route", "status"], registry=reference)
    ours = LeanCounter("requests", "Requests.", ["route", "status"], registry=lean)
    for labels, amount in ((("/v1/score", "200"), 1), (("/v1/score", "429"), 3.5)):
        theirs.labels(*labels).inc(amount)
        ours.labels(*labels).inc(amount)
    assert exposition(lean) == exposition(reference)
    assert lean.get_sample_value("requests_total", {"route": "/v1/score", "status": "429"}) == 3.5


def test_created_samples_are_exported_unless_prometheus_client_is_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    LeanCounter("c", "C.", registry=registry).inc()
    LeanHistogram("h", "H.", buckets=(1.0,), registry=registry).observe(0.5)
    assert registry.get_sample_value("c_created") is not None
    assert registry.get_sample_value("h_created") is not None
    monkeypatch.setenv("PROMETHEUS_DISABLE_CREATED_SERIES", "true")
    assert registry.get_sample_value("c_created") is None
    assert registry.get_sample_value("h_created") is None


def test_no_observation_is_lost_to_concurrent_threads() -> None:
    registry = CollectorRegistry()
    histogram = LeanHistogram("h", "H.", ["k"], buckets=(1.0,), registry=registry)
    counter = LeanCounter("c", "C.", ["k"], registry=registry)
    threads, each = 8, 20_000

    def work() -> None:
        observe, inc = histogram.labels("a").observe, counter.labels("a").inc
        for _ in range(each):
            observe(0.5)
            inc()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert registry.get_sample_value("h_count", {"k": "a"}) == threads * each
    assert registry.get_sample_value("h_sum", {"k": "a"}) == threads * each * 0.5
    assert registry.get_sample_value("c_total", {"k": "a"}) == threads * each


def test_label_values_become_strings_once() -> None:
    registry = CollectorRegistry()
    counter = LeanCounter("c", "C.", ["version"], registry=registry)
    counter.labels(3).inc()  # type: ignore[arg-type]
    counter.labels("3").inc()
    assert registry.get_sample_value("c_total", {"version": "3"}) == 2


def test_wrong_label_counts_and_negative_increments_are_refused() -> None:
    registry = CollectorRegistry()
    histogram = LeanHistogram("h", "H.", ["stage"], buckets=(1.0,), registry=registry)
    counter = LeanCounter("c", "C.", registry=registry)
    with pytest.raises(ValueError, match=r"h takes 1 label values \(stage\), got 2"):
        histogram.labels("a", "b")
    with pytest.raises(ValueError, match="h takes 1 label values"):
        histogram.observe(1.0)
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1)
    with pytest.raises(ValueError, match="increasing"):
        LeanHistogram("u", "U.", buckets=(2.0, 1.0), registry=registry)


def test_a_name_registered_twice_is_refused() -> None:
    registry = CollectorRegistry()
    LeanCounter("c", "C.", registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("c", "C.", registry=registry)


def test_the_scoring_paths_metrics_are_lean_in_one_process() -> None:
    metrics = Metrics(CollectorRegistry())
    assert isinstance(metrics.request_seconds, LeanHistogram)
    assert isinstance(metrics.requests, LeanCounter)
    assert isinstance(metrics.candidates, LeanHistogram)
    assert isinstance(metrics.batch_queue_seconds, LeanHistogram)
    assert isinstance(metrics.in_flight, LeanGauge)
    assert metrics.hot_mirror is None  # nothing to mirror into


@pytest.fixture
def multiprocess_files(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Point prometheus_client at a multiprocess directory, as a worker started with
    PROMETHEUS_MULTIPROC_DIR would be (it reads that variable once, at import)."""

    def use(directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())  # type: ignore[no-untyped-call]

    return use


def merged(directory: Path) -> list[str]:
    """What /metrics serves from a multiprocess directory: every file's samples added up."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return sorted(generate_latest(registry).decode().splitlines())


def _families(histogram: Any, counter: Any, gauge: Any) -> tuple[Any, Any, Any, Any]:
    """The metrics `_update` moves, built by prometheus_client's types or the lean ones."""
    registry = CollectorRegistry()
    return (
        histogram("t_seconds", "Time.", ["stage"], buckets=LATENCY_BUCKETS, registry=registry),
        histogram("rows", "Rows.", buckets=(1, 8, 64), registry=registry),
        counter("requests", "Requests.", ["status"], registry=registry),
        gauge("adscore_in_flight_requests", "Now.", registry=registry),
    )


def _update(
    round_: int,
    seconds: Labelled[Observer],
    rows: Observer,
    requests: Labelled[Incrementer],
    now: Level,
) -> None:
    """One round's updates: new label sets appear, buckets gain, and the gauge moves."""
    for stage in ("fetch", "inference")[: round_ + 1]:
        for amount in AMOUNTS[round_::2]:
            seconds.labels(stage).observe(amount)
    for count in (1, 9, 100)[round_:]:
        rows.observe(count)
    for status in ("200", "503")[: round_ + 1]:
        requests.labels(status).inc(round_ + 1)
    now.set(4 - round_)


def test_mirrored_lean_metrics_add_up_like_prometheus_clients_own(
    multiprocess_files: Callable[[Path], None], tmp_path: Path
) -> None:
    # The same updates, by lean metrics mirrored into one directory and by prometheus_client's
    # types into another, over three rounds: the merged files must read the same each time.
    multiprocess_files(tmp_path / "ours")
    ours = _families(LeanHistogram, LeanCounter, LeanGauge)
    mirror = MultiprocessMirror(ours, CollectorRegistry())
    expected = []
    for round_ in range(3):
        _update(round_, *ours)
        mirror.sync()
        mirror.sync()  # nothing new: nothing written twice
        expected.append(merged(tmp_path / "ours"))
    assert 't_seconds_count{stage="fetch"} 17.0' in expected[-1]  # 6 + 6 + 5 amounts

    multiprocess_files(tmp_path / "theirs")
    theirs = _families(Histogram, Counter, partial(Gauge, multiprocess_mode="livesum"))
    for round_ in range(3):
        _update(round_, *theirs)
        assert merged(tmp_path / "theirs") == expected[round_]


def test_the_scoring_paths_metrics_are_mirrored_with_workers(
    multiprocess_files: Callable[[Path], None], tmp_path: Path
) -> None:
    multiprocess_files(tmp_path)
    metrics = Metrics(CollectorRegistry())
    assert isinstance(metrics.request_seconds, LeanHistogram)  # no file write per request
    assert metrics.hot_mirror is not None
    metrics.request_seconds_of("/v1/score").observe(0.004)
    metrics.requests_of("/v1/score", "200").inc()
    metrics.in_flight.inc()
    assert not any("adscore_requests_total" in line for line in merged(tmp_path))
    metrics.hot_mirror.sync()
    lines = merged(tmp_path)
    assert 'adscore_requests_total{route="/v1/score",status="200"} 1.0' in lines
    assert 'adscore_request_duration_seconds_count{route="/v1/score"} 1.0' in lines
    assert "adscore_in_flight_requests 1.0" in lines
    # Series created ahead of their first observation are there too, at 0, as before.
    assert 'adscore_stage_duration_seconds_count{stage="response"} 0.0' in lines


def test_a_gauge_exports_what_prometheus_clients_exports() -> None:
    reference, lean = CollectorRegistry(), CollectorRegistry()
    theirs = Gauge("in_flight", "Requests now.", registry=reference)
    ours = LeanGauge("in_flight", "Requests now.", registry=lean)
    assert exposition(lean) == exposition(reference)
    for gauge in (theirs, ours):
        gauge.inc()
        gauge.inc(3)
        gauge.dec()
    assert exposition(lean) == exposition(reference)
    assert lean.get_sample_value("in_flight") == 3
    theirs.set(7)
    ours.set(7)
    assert exposition(lean) == exposition(reference)
