"""Lean histograms, counters and gauges: the same exposition as prometheus_client's for the same
observations, exact counts under concurrent threads, and clear errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.lean_metrics import LeanCounter, LeanGauge, LeanHistogram
from service.metrics import LATENCY_BUCKETS, Metrics

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


def test_the_scoring_paths_metrics_reach_the_multiprocess_files_with_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics(CollectorRegistry())
    assert isinstance(metrics.request_seconds, Histogram)
    assert isinstance(metrics.requests, Counter)
    assert isinstance(metrics.in_flight, Gauge)


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
