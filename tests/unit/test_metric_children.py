"""Kept metric children: the same children labels() gives, so what they count is exported."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.metrics import Children, Metrics


def test_a_kept_child_is_the_one_labels_gives_and_counts_into_the_registry() -> None:
    registry = CollectorRegistry()
    counter = Counter("things", "Things.", ["kind", "status"], registry=registry)
    children = Children(counter)
    child = children("a", "200")
    assert child is counter.labels("a", "200")
    assert children("a", "200") is child
    assert children("a", "500") is not child
    child.inc(2)
    children("a", "500").inc()
    assert registry.get_sample_value("things_total", {"kind": "a", "status": "200"}) == 2
    assert registry.get_sample_value("things_total", {"kind": "a", "status": "500"}) == 1


def test_kept_histogram_children_observe_into_their_labels() -> None:
    registry = CollectorRegistry()
    histogram = Histogram(
        "waits_seconds", "Waits.", ["stage"], buckets=(0.1, 1.0), registry=registry
    )
    Children(histogram)("fetch").observe(0.5)
    labels = {"stage": "fetch"}
    assert registry.get_sample_value("waits_seconds_count", labels) == 1
    assert registry.get_sample_value("waits_seconds_bucket", labels | {"le": "0.1"}) == 0
    assert registry.get_sample_value("waits_seconds_bucket", labels | {"le": "1.0"}) == 1


def test_record_scores_counts_through_kept_children() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for _ in range(2):
        metrics.record_scores("pcvr", 3, "canary", np.array([0.25, 0.5]))
    labels = {"model": "pcvr", "version": "3", "role": "canary"}
    assert registry.get_sample_value("adscore_scored_candidates_total", labels) == 4
    assert registry.get_sample_value("adscore_predicted_pcvr_sum_total", labels) == 1.5
