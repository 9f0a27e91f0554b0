"""Drift math and bookkeeping: PSI, reference bins, missing-value rates, rolling windows, the
bounded sample queue."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from feature_client.assembly import ModelInputs
from feature_client.reference import (
    DriftReference,
    ReferenceBinner,
    bin_counts,
    build_reference,
    defaulted_counts,
    dense_defaults,
    id_counts,
    missing_rows,
    quantile_edges,
)
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from service.drift import DriftMonitor, RollingWindow, Sample, Tally, VersionDrift, merged, psi
from service.metrics import Metrics
from service.registry import LoadedModel
from tests.fixtures import LinearRuntime, metadata_for, tiny_spec


def test_psi_is_zero_for_identical_distributions_and_known_for_a_shift() -> None:
    assert psi([0.1, 0.2, 0.7], [0.1, 0.2, 0.7]) == 0.0
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * np.log(2) + 0.25 * np.log(1.5))
    # An emptied bin counts as 1e-4, not as 0: large but finite.
    assert 1.0 < psi([0.5, 0.5], [0.0, 1.0]) < 10.0


def test_quantile_edges_give_equal_mass_bins_and_merge_ties() -> None:
    values = np.random.default_rng(0).normal(size=100_000)
    edges = quantile_edges(values, 10)
    assert len(edges) == 9
    np.testing.assert_allclose(bin_counts(edges, values) / len(values), 0.1, atol=1e-3)
    # A feature stuck at its default has one edge: every value in the lower bin.
    stuck = np.full(100, 0.5)
    assert quantile_edges(stuck, 10).tolist() == [0.5]
    assert bin_counts(np.asarray([0.5]), stuck).tolist() == [100, 0]


def test_id_counts_keep_the_top_ids_in_their_order_then_other() -> None:
    counts = id_counts(np.asarray([7, 3]), np.asarray([3, 3, 7, 1, 9, 3]))
    assert counts.tolist() == [1, 3, 2]
    assert id_counts(np.zeros(0, dtype=np.int64), np.asarray([1, 2])).tolist() == [2]


def _model(reference_rows: int = 20_000) -> tuple[LoadedModel, ModelInputs]:
    spec = tiny_spec()
    rng = np.random.default_rng(1)
    inputs = _inputs(rng, reference_rows)
    scores = LinearRuntime().predict(inputs).astype(np.float64)
    reference = build_reference(spec, inputs.dense, inputs.ids, 1 / (1 + np.exp(-scores)))
    metadata = metadata_for(spec).model_copy(update={"drift_reference": reference})
    return LoadedModel.assemble(metadata, LinearRuntime()), inputs


def _inputs(rng: np.random.Generator, rows: int, shift: float = 0.0) -> ModelInputs:
    dense = rng.normal([0.5, 2.0], 1.0, (rows, 2)).astype(np.float32) + shift
    ids = np.column_stack(
        [rng.integers(1, 64, rows), rng.integers(1, 128, rows), rng.integers(1, 3, rows),
         rng.integers(1, 25, rows)]
    ).astype(np.int64)  # fmt: skip
    ids[: rows // 100] = 0  # 1 % of rows without user or ad: every id unknown
    return ModelInputs(dense, ids)


def test_the_reference_summarises_every_feature_and_the_missing_rate() -> None:
    model, inputs = _model()
    reference = model.metadata.drift_reference
    assert reference is not None
    assert [s.name for s in reference.dense] == ["user_activity", "ad_price"]
    assert [s.name for s in reference.categorical] == ["user_id", "ad_id", "device", "hour"]
    assert all(sum(s.shares) == pytest.approx(1, abs=1e-5) for s in reference.dense)
    assert len(reference.categorical[0].ids) == 20  # top-k of 64 buckets, then "other"
    assert reference.missing_rate == {"user": 0.01, "ad": 0.01}
    assert missing_rows(model.spec, inputs.ids, "user").sum() == 200


def _defaults_spec() -> FeatureSpec:
    """0.1 is not exact in float32: a comparison made in float64 would never match it."""
    return FeatureSpec(
        schema_version=1,
        features=(
            CategoricalFeature("user_id", "user", hash_buckets=64),
            DenseFeature("user_activity", "user", default=0.1),
            DenseFeature("ad_price", "ad", default=2.0),
            CategoricalFeature("device", "context", vocabulary=("ios", "android")),
        ),
    )


def _ten_rows() -> ModelInputs:
    """user_activity on its default in 3 of 10 rows (two of them missing users), ad_price in 1,
    device unknown in 2: a value next to the default is not the default."""
    activity = np.asarray([0.1, 0.1, 0.1, 0.3, 0.7, 0.1000001, 1, 2, 3, 4], dtype=np.float32)
    price = np.asarray([2.0, 2.0000002, 1, 1, 1, 1, 1, 1, 1, 1], dtype=np.float32)
    user_ids = [0, 0, 5, 6, 7, 8, 9, 10, 11, 12]
    devices = [1, 2, 0, 1, 2, 1, 2, 0, 1, 2]
    return ModelInputs(
        np.column_stack([activity, price]), np.column_stack([user_ids, devices]).astype(np.int64)
    )


def test_the_reference_has_each_features_share_of_rows_on_its_missing_value_stand_in() -> None:
    spec = _defaults_spec()
    inputs = _ten_rows()
    reference = build_reference(spec, inputs.dense, inputs.ids, np.full(10, 0.02))
    assert reference.feature_missing_rate == {
        "user_activity": 0.3,
        "ad_price": 0.1,
        "user_id": 0.2,
        "device": 0.2,
    }
    assert reference.missing_rate == {"user": 0.2, "ad": 0.0}
    # metadata.json written before per-feature rates existed still loads, with none.
    old = reference.model_dump(exclude={"feature_missing_rate"})
    assert DriftReference.model_validate(old).feature_missing_rate == {}


def test_a_tally_counts_defaulted_rows_per_feature_and_merges_them() -> None:
    spec = _defaults_spec()
    inputs = _ten_rows()
    defaults = dense_defaults(spec)
    assert defaults.dtype == np.float32 and defaults.tolist() == [np.float32(0.1), 2.0]
    assert defaulted_counts(defaults, inputs.dense, inputs.ids).tolist() == [3, 1, 2, 2]
    scores = np.full(10, 0.02)
    one = Tally.of(None, inputs, scores, True, np.ones(10, dtype=np.bool_), defaults)
    assert (one.rows, one.defaulted.tolist()) == (10, [3, 1, 2, 2])
    assert one.merge(one).defaulted.tolist() == [6, 2, 4, 4]
    assert Tally().merge(one).defaulted.tolist() == [3, 1, 2, 2]


def _monitor(
    metrics: Metrics,
    max_pending: int = 8,
    min_rows: int = 1,
    linger_seconds: float = 0.25,
    kind: type[DriftMonitor] = DriftMonitor,
) -> DriftMonitor:
    return kind(
        sample_rate=1.0,
        max_pending=max_pending,
        window_seconds=60,
        window_buckets=6,
        min_rows=min_rows,
        dropped=metrics.drift_dropped,
        linger_seconds=linger_seconds,
    )


def _drift_of(model: LoadedModel, inputs: ModelInputs, min_rows: int = 1) -> VersionDrift:
    monitor = _monitor(Metrics(CollectorRegistry()), min_rows=min_rows)
    scores = model.score(inputs)
    monitor.submit(model, inputs, scores, False, np.ones(len(scores), dtype=np.bool_))
    assert monitor.wait_idle(10)
    (drift,) = monitor.table([model])
    monitor.close()
    return drift


def test_psi_stays_near_zero_on_the_reference_distribution_and_rises_on_a_shift() -> None:
    model, _ = _model()
    rng = np.random.default_rng(2)
    same = _drift_of(model, _inputs(rng, 5000))
    features = {"user_activity", "ad_price", "user_id", "ad_id", "device", "hour"}
    assert set(same.feature_psi) == features
    assert max(v for v in same.feature_psi.values() if v is not None) < 0.05
    assert same.score_psi is not None and same.score_psi < 0.05
    assert same.missing_rate == {"user": 1.0, "ad": 0.0}

    shifted = _drift_of(model, _inputs(rng, 5000, shift=1.0))
    assert shifted.feature_psi["ad_price"] is not None and shifted.feature_psi["ad_price"] > 0.5
    assert shifted.feature_psi["device"] is not None and shifted.feature_psi["device"] < 0.05
    assert (
        shifted.score_psi is not None and shifted.score_psi > 0.1
    )  # the score moves with the price

    too_few = _drift_of(model, _inputs(rng, 50), min_rows=100)
    assert too_few.rows == 50 and too_few.score_psi is None
    assert set(too_few.feature_psi.values()) == {None}


def test_live_default_rates_show_one_feature_served_on_its_default() -> None:
    model, _ = _model()
    reference = model.metadata.drift_reference
    assert reference is not None
    # _inputs blanks every id of 1 % of rows; dense values are drawn, never exactly a default.
    assert reference.feature_missing_rate == {
        "user_activity": 0.0,
        "ad_price": 0.0,
        "user_id": 0.01,
        "ad_id": 0.01,
        "device": 0.01,
        "hour": 0.01,
    }
    inputs = _inputs(np.random.default_rng(3), 1000)
    inputs.dense[100:400, 1] = 2.0  # the ad_price pipeline serves its default to 30 % of rows
    drift = _drift_of(model, inputs)
    assert drift.feature_missing_rate == {
        "user_activity": 0.0,
        "ad_price": 0.3,
        "user_id": 0.01,
        "ad_id": 0.01,
        "device": 0.01,
        "hour": 0.01,
    }
    body = drift.to_json()
    assert body["feature_missing_rate"]["ad_price"] == 0.3
    assert body["reference_feature_missing_rate"] == reference.feature_missing_rate

    # Without a reference the rates are still counted, from the spec's defaults.
    bare = LoadedModel.assemble(metadata_for(model.spec), LinearRuntime())
    body = _drift_of(bare, inputs).to_json()
    assert body["feature_missing_rate"]["ad_price"] == 0.3
    assert "reference_feature_missing_rate" not in body
    # An empty window has no rate yet.
    monitor = _monitor(Metrics(CollectorRegistry()))
    (empty,) = monitor.table([model])
    assert set(empty.feature_missing_rate) == set(reference.feature_missing_rate)
    assert set(empty.feature_missing_rate.values()) == {None}


def test_rolling_window_forgets_buckets_older_than_the_window() -> None:
    now = [0.0]
    window = RollingWindow(buckets=3, bucket_seconds=10, clock=lambda: now[0])
    one = Tally(rows=5, missing=np.asarray([1, 0]), score_sum=0.5)
    window.add(one)
    now[0] = 5  # same bucket: merged
    window.add(one)
    now[0] = 25
    window.add(one)
    assert window.total().rows == 15
    now[0] = 31  # the first bucket [0, 10) is now out of the last three
    total = window.total()
    assert (total.rows, total.missing.tolist()) == (5, [1, 0])
    now[0] = 1000
    assert window.total().rows == 0


class HeldMonitor(DriftMonitor):
    """A worker that, once it has taken samples, waits in `record` until released."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recording = threading.Event()
        self.release = threading.Event()

    def record(self, sample: Sample) -> None:
        self.recording.set()
        assert self.release.wait(10)
        super().record(sample)


def test_a_full_queue_drops_samples_and_counts_them() -> None:
    model, inputs = _model(2000)
    metrics = Metrics(CollectorRegistry())
    monitor = _monitor(metrics, max_pending=1, linger_seconds=0, kind=HeldMonitor)
    assert isinstance(monitor, HeldMonitor)
    scores = model.score(inputs)
    found = np.ones(len(scores), dtype=np.bool_)
    monitor.submit(model, inputs, scores, True, found)
    assert monitor.recording.wait(10)  # the worker holds the first sample: the queue is empty
    for _ in range(9):  # one fits in the queue, eight find it full
        monitor.submit(model, inputs, scores, True, found)
    assert metrics.drift_dropped.labels("pcvr")._value.get() == 8
    monitor.release.set()
    assert monitor.wait_idle(10)
    (drift,) = monitor.table([model])
    assert drift.rows == 2 * len(scores)
    monitor.close()


class CountingMonitor(DriftMonitor):
    """Counts how many times the worker bins (one merged sample per version and batch)."""

    binned = 0

    def record(self, sample: Sample) -> None:
        self.binned += 1
        super().record(sample)


@pytest.mark.parametrize(("linger_seconds", "binnings"), [(1.0, 1), (0.0, 3)])
def test_samples_arriving_within_the_linger_are_binned_in_one_go(
    linger_seconds: float, binnings: int
) -> None:
    model, inputs = _model(2000)
    scores = model.score(inputs)
    found = np.ones(len(scores), dtype=np.bool_)
    monitor = _monitor(
        Metrics(CollectorRegistry()), linger_seconds=linger_seconds, kind=CountingMonitor
    )
    assert isinstance(monitor, CountingMonitor)
    for _ in range(3):
        monitor.submit(model, inputs, scores, True, found)
        time.sleep(0.1)  # one at a time, as a 5 % sample of a few thousand requests/s comes
    assert monitor.wait_idle(10)
    assert monitor.binned == binnings
    (drift,) = monitor.table([model])
    assert drift.rows == 3 * len(scores)
    monitor.close()


def test_drift_gauges_are_exported_for_the_versions_given() -> None:
    model, inputs = _model(2000)
    metrics = Metrics(CollectorRegistry())
    monitor = _monitor(metrics)
    scores = model.score(inputs)
    monitor.submit(model, inputs, scores, True, np.ones(len(scores), dtype=np.bool_))
    assert monitor.wait_idle(10)
    metrics.drift.source = lambda: monitor.table([model])
    text = generate_latest(metrics.registry).decode()
    assert 'adscore_feature_psi{feature="ad_price",model="pcvr",version="1"}' in text
    assert 'adscore_score_psi{model="pcvr",version="1"}' in text
    assert 'adscore_feature_missing_rate{entity="user",model="pcvr",version="1"} 0.0' in text
    assert 'adscore_drift_window_rows{model="pcvr",version="1"} 2000.0' in text
    assert 'adscore_feature_default_rate{feature="ad_id",model="pcvr",version="1"} 0.01' in text
    assert 'adscore_feature_default_rate{feature="ad_price",model="pcvr",version="1"} 0.0' in text
    assert (
        'adscore_feature_default_rate_reference{feature="ad_id",model="pcvr",version="1"} 0.01'
        in text
    )
    # A version no longer served: its window and its labels go.
    metrics.drift.source = lambda: monitor.table([])
    text = generate_latest(metrics.registry).decode()
    assert "adscore_feature_psi{" not in text
    assert "adscore_feature_default_rate{" not in text
    assert "adscore_feature_default_rate_reference{" not in text
    # A version without a reference: live rates, no reference gauge.
    bare = LoadedModel.assemble(metadata_for(model.spec, version=2), LinearRuntime())
    monitor.submit(bare, inputs, scores, True, np.ones(len(scores), dtype=np.bool_))
    assert monitor.wait_idle(10)
    metrics.drift.source = lambda: monitor.table([bare])
    text = generate_latest(metrics.registry).decode()
    assert 'adscore_feature_default_rate{feature="ad_id",model="pcvr",version="2"} 0.01' in text
    assert "adscore_feature_default_rate_reference{" not in text
    monitor.close()


def test_samples_binned_together_count_as_the_sum_of_each_alone() -> None:
    model, _ = _model()
    other, _ = _model(reference_rows=5_000)
    rng = np.random.default_rng(3)
    samples = []
    for i, owner in enumerate([model, other, model, model]):
        inputs = _inputs(rng, 5 + i)
        scores = rng.random(len(inputs))
        ads_found = rng.random(len(inputs)) < 0.8
        samples.append(Sample(owner, inputs, scores, i % 2 == 0, ads_found))
    groups = merged(samples)
    assert [g.model for g in groups] == [model, other]
    defaults = dense_defaults(model.spec)
    reference = model.metadata.drift_reference
    assert reference is not None
    binner = ReferenceBinner(reference)

    def tally(s: Sample) -> Tally:
        return Tally.of(binner, s.inputs, s.scores, s.user_found, s.ads_found, defaults)

    alone = Tally()
    for sample in (samples[0], samples[2], samples[3]):
        alone = alone.merge(tally(sample))
    together = tally(groups[0])
    assert together.rows == alone.rows == 5 + 7 + 8
    assert together.missing.tolist() == alone.missing.tolist()
    assert together.defaulted.tolist() == alone.defaulted.tolist()
    assert [c.tolist() for c in together.dense] == [c.tolist() for c in alone.dense]
    assert [c.tolist() for c in together.categorical] == [c.tolist() for c in alone.categorical]
    assert together.score.tolist() == alone.score.tolist()
    assert together.score_sum == pytest.approx(alone.score_sum)
    assert groups[1] is samples[1]  # a version with one sample is binned as it is


def test_the_binner_counts_exactly_as_each_summary_does() -> None:
    model, _ = _model()
    reference = model.metadata.drift_reference
    assert reference is not None
    binner = ReferenceBinner(reference)
    rng = np.random.default_rng(9)
    live = _inputs(rng, 500, shift=0.3)
    live.ids[:7, 1] = 10**6  # ids no summary lists count as "other"
    live.ids[7, 0] = -5  # a corrupt id too
    scores = rng.random(500)
    assert [c.tolist() for c in binner.categorical(live.ids)] == [
        id_counts(np.asarray(s.ids), live.ids[:, j]).tolist()
        for j, s in enumerate(reference.categorical)
    ]
    assert [c.tolist() for c in binner.dense(live.dense)] == [
        bin_counts(np.asarray(s.edges), live.dense[:, j]).tolist()
        for j, s in enumerate(reference.dense)
    ]
    assert (
        binner.score(scores).tolist()
        == bin_counts(np.asarray(reference.score.edges), scores).tolist()
    )
