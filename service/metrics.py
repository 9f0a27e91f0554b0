"""Prometheus metrics of one service instance, on a registry of its own (no globals).

Label values are bounded: routes come from the route table, stages and entities are fixed
lists, and model labels name versions, never users, ads or tenants.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.batcher import BatchMetrics
from service.lean_metrics import LeanCounter, LeanGauge, LeanHistogram

if TYPE_CHECKING:
    from feature_client.ad_cache import AdFeatureCache
    from service.drift import VersionDrift

# Seconds; dense between 1 and 50 ms, where a scoring request lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05,
    0.1, 0.5,
)  # fmt: skip
CANDIDATE_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
STAGES = ("feature_fetch", "input_assembly", "inference", "response")


Child = TypeVar("Child", covariant=True)


class Labelled(Protocol[Child]):
    """A metric with labels: prometheus_client's, or service/lean_metrics.py's."""

    def labels(self, *values: str) -> Child: ...


class Children(Generic[Child]):
    """A labelled metric's children, each looked up in one dict access after the first.

    prometheus_client's `labels()` validates and joins its arguments on every call, which costs
    more than the increment it precedes, several times per scoring request. Children of counters
    and histograms are never removed, so a kept one stays the one the registry exports.
    """

    def __init__(self, metric: Labelled[Child]) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Child] = {}

    def __call__(self, *labels: str) -> Child:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class AdCacheCollector(Collector):
    """The hot-ad cache's lookups and size, read from the cache at scrape time (absent while
    the cache is off)."""

    def __init__(self) -> None:
        self.source: Callable[[], AdFeatureCache | None] = lambda: None

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> list[Metric]:
        return [
            CounterMetricFamily(
                "adscore_ad_feature_cache_lookups",
                "Ad feature lookups answered from the process's hot-ad cache (hit) or sent to "
                "the feature store (miss).",
                labels=["result"],
            ),
            GaugeMetricFamily(
                "adscore_ad_feature_cache_entries", "Ad vectors held in the hot-ad cache."
            ),
        ]

    def collect(self) -> Iterator[Metric]:
        cache = self.source()
        if cache is None:
            return iter(())
        lookups, entries = self._families()
        assert isinstance(lookups, CounterMetricFamily) and isinstance(entries, GaugeMetricFamily)
        lookups.add_metric(["hit"], cache.counts.hits)
        lookups.add_metric(["miss"], cache.counts.misses)
        entries.add_metric([], len(cache))
        return iter((lookups, entries))


class DriftCollector(Collector):
    """Drift gauges, computed from the rolling windows at scrape time (never stale, and only
    for loaded versions: labels are bounded by the spec's feature names and those versions)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[VersionDrift]] = list

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "adscore_feature_psi",
                "Population stability index of a feature: live window vs training reference.",
                labels=["model", "version", "feature"],
            ),
            GaugeMetricFamily(
                "adscore_score_psi",
                "Population stability index of the calibrated score vs training reference.",
                labels=["model", "version"],
            ),
            GaugeMetricFamily(
                "adscore_feature_missing_rate",
                "Share of sampled rows whose entity features were missing (scored on defaults).",
                labels=["model", "version", "entity"],
            ),
            GaugeMetricFamily(
                "adscore_feature_default_rate",
                "Share of sampled rows where a feature holds its missing-value stand-in "
                "(its default, or the unknown id).",
                labels=["model", "version", "feature"],
            ),
            GaugeMetricFamily(
                "adscore_feature_default_rate_reference",
                "The same share on the training reference's validation rows.",
                labels=["model", "version", "feature"],
            ),
            GaugeMetricFamily(
                "adscore_mean_predicted_pcvr",
                "Mean calibrated pCVR of the sampled rows in the drift window.",
                labels=["model", "version"],
            ),
            GaugeMetricFamily(
                "adscore_drift_window_rows",
                "Sampled rows in the drift window (PSI is reported from drift_min_rows on).",
                labels=["model", "version"],
            ),
        ]

    def collect(self) -> Iterator[Metric]:
        features, score, missing, defaulted, defaulted_reference, mean, rows = families = (
            self._families()
        )
        for drift in self.source():
            labels = [drift.model, str(drift.version)]
            rows.add_metric(labels, drift.rows)
            for name, value in drift.feature_psi.items():
                if value is not None:
                    features.add_metric([*labels, name], value)
            if drift.score_psi is not None:
                score.add_metric(labels, drift.score_psi)
            for entity, rate in drift.missing_rate.items():
                if rate is not None:
                    missing.add_metric([*labels, entity], rate)
            for name, rate in drift.feature_missing_rate.items():
                if rate is not None:
                    defaulted.add_metric([*labels, name], rate)
            if drift.reference is not None:
                for name, rate in drift.reference.feature_missing_rate.items():
                    defaulted_reference.add_metric([*labels, name], rate)
            if drift.mean_pcvr is not None:
                mean.add_metric(labels, drift.mean_pcvr)
        return iter(families)


def exposition_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: `registry` itself or, in Prometheus's multiprocess mode (several
    workers, see service/workers.py), every worker's samples added up, whichever answers. The
    collectors computed at scrape time reach that sum through a MultiprocessMirror."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return registry
    combined = CollectorRegistry()
    MultiProcessCollector(combined, path=directory)  # type: ignore[no-untyped-call]
    return combined


# How a mirrored gauge combines over workers: rows, requests and cache entries are summed;
# rates and PSI take the largest (every worker samples the same traffic, so they agree up to
# sampling noise).
SUMMED_GAUGES = frozenset(
    {
        "adscore_drift_window_rows",
        "adscore_ad_feature_cache_entries",
        "adscore_in_flight_requests",
        "adscore_queued_rows",
    }
)


class MultiprocessMirror:
    """Copies collectors kept in this worker's memory into Prometheus's multiprocess files, so
    that /metrics adds them up over the workers like every other metric instead of showing
    whichever worker answers: counters by what they gained since the last sync, gauges by
    their value, histograms by what each bucket and the sum gained.

    Two mirrors run on each worker: one for the scrape-time collectors (drift, hot-ad cache)
    every few seconds, and one for the scoring path's lean metrics every second (and before
    each scrape), whose writes to the files would otherwise cost the scoring path on every
    request.
    """

    def __init__(self, collectors: tuple[Collector, ...], registry: CollectorRegistry) -> None:
        self._collectors = collectors
        self._registry = registry
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._counted: dict[tuple[str, tuple[str, ...]], float] = {}
        self._shown: dict[str, set[tuple[str, ...]]] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], _MirroredHistogram] = {}

    def sync(self) -> None:
        for collector in self._collectors:
            for family in collector.collect():
                if family.type == "counter":
                    self._sync_counter(family)
                elif family.type == "histogram":
                    self._sync_histogram(family)
                else:
                    self._sync_gauge(family)

    def _sync_histogram(self, family: Metric) -> None:
        buckets: dict[tuple[str, ...], list[tuple[str, float]]] = {}
        sums: dict[tuple[str, ...], float] = {}
        names: dict[tuple[str, ...], tuple[str, ...]] = {}
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            label_values = tuple(labels.values())
            if sample.name == family.name + "_bucket":
                buckets.setdefault(label_values, []).append((sample.labels["le"], sample.value))
                names[label_values] = tuple(labels)
            elif sample.name == family.name + "_sum":
                sums[label_values] = sample.value
        for label_values, cumulative in buckets.items():
            key = (family.name, label_values)
            mirrored = self._histograms.get(key)
            if mirrored is None:  # its buckets enter the files now, at 0 where nothing fell
                mirrored = self._histograms[key] = _MirroredHistogram(
                    family.name, family.documentation, names[label_values], label_values,
                    [le for le, _ in cumulative],
                )  # fmt: skip
            mirrored.add([count for _, count in cumulative], sums.get(label_values, 0.0))

    def _sync_counter(self, family: Metric) -> None:
        counter = self._counters.get(family.name)
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = tuple(sample.labels.values())
            if counter is None:
                counter = self._counters[family.name] = Counter(
                    family.name, family.documentation, list(sample.labels), registry=self._registry
                )
            key = (family.name, labels)
            # Counted so far is this process's own running total: add what it gained.
            gained = sample.value - self._counted.get(key, 0.0)
            self._counted[key] = sample.value
            child = counter.labels(*labels) if labels else counter
            child.inc(max(0.0, gained))

    def _sync_gauge(self, family: Metric) -> None:
        gauge = self._gauges.get(family.name)
        shown: set[tuple[str, ...]] = set()
        for sample in family.samples:
            labels = tuple(sample.labels.values())
            if gauge is None:
                mode: Literal["livesum", "livemax"] = (
                    "livesum" if family.name in SUMMED_GAUGES else "livemax"
                )
                gauge = self._gauges[family.name] = Gauge(
                    family.name, family.documentation, list(sample.labels),
                    registry=self._registry, multiprocess_mode=mode,
                )  # fmt: skip
            (gauge.labels(*labels) if labels else gauge).set(sample.value)
            shown.add(labels)
        for gone in self._shown.get(family.name, set()) - shown:
            assert gauge is not None
            if gone:
                retire(gauge, *gone)
            else:
                gauge.set(0)
        self._shown[family.name] = shown


class _MirroredHistogram:
    """One label set of a histogram in the multiprocess files, laid out as prometheus_client's
    Histogram lays out its own (a count per bucket under `<name>_bucket` with its `le`, and
    `<name>_sum`), so that its MultiProcessCollector adds the two up alike."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        labelvalues: tuple[str, ...],
        les: list[str],
    ) -> None:
        def value(sample: str, names: tuple[str, ...], label_values: tuple[str, ...]) -> Any:
            return values.ValueClass("histogram", name, sample, names, label_values, documentation)

        self._buckets = [
            value(f"{name}_bucket", (*labelnames, "le"), (*labelvalues, le)) for le in les
        ]
        self._sum = value(f"{name}_sum", labelnames, labelvalues)
        self._counts = [0.0] * len(les)  # per bucket (not cumulative), as of the last sync
        self._total = 0.0

    def add(self, cumulative: list[float], total: float) -> None:
        """Write what each bucket and the sum gained since the last call."""
        below = 0.0
        for i, running in enumerate(cumulative):
            count = running - below
            below = running
            gained = count - self._counts[i]
            if gained > 0:
                self._buckets[i].inc(gained)
                self._counts[i] = count
        if total != self._total:
            self._sum.inc(total - self._total)
            self._total = total


def retire(gauge: Gauge, *labels: str) -> None:
    """Drop a labelled gauge sample. In multiprocess mode a worker's samples live on in its file
    (remove() is not supported there), so the sample is set to 0 instead: queries of these
    1-valued gauges filter with `== 1`."""
    gauge.labels(*labels).set(0)
    if not multiprocess_mode():
        gauge.remove(*labels)


def multiprocess_mode() -> bool:
    """Whether metrics go to Prometheus's multiprocess files (several workers)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """All metrics adscore exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # The series the scoring path moves on every request are lean (service/lean_metrics.py):
        # kept in memory, and with several workers mirrored into the shared files (hot_mirror).
        self.request_seconds = LeanHistogram(
            "adscore_request_duration_seconds",
            "Time from request received to response sent, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = LeanCounter(
            "adscore_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.stage_seconds = LeanHistogram(
            "adscore_stage_duration_seconds",
            "Time spent in each stage of a scoring request.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.model_seconds = LeanHistogram(
            "adscore_model_request_duration_seconds",
            "Time to score one request (fetch, assembly, inference), by the model that scored it.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.candidates = LeanHistogram(
            "adscore_candidates_per_request",
            "Ad candidates in one scoring request.",
            buckets=CANDIDATE_BUCKETS,
            registry=registry,
        )
        self.missing_entities = Counter(
            "adscore_missing_features",
            "Entities scored on default features because the store had none, by entity kind.",
            ["entity"],
            registry=registry,
        )
        self.rejected_feature_values = Counter(
            "adscore_rejected_feature_values",
            "Stored feature vectors refused (wrong length or schema version), by entity kind.",
            ["entity"],
            registry=registry,
        )
        self.degraded_responses = Counter(
            "adscore_degraded_responses",
            "Responses scored on default features because the feature store failed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.model_info = Gauge(
            "adscore_model_info",
            "1 for each model version this instance serves, by role (active, canary, shadow).",
            ["model", "version", "provider", "role"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.model_load_seconds = Gauge(
            "adscore_model_load_seconds",
            "Time to verify, open and warm up the version loaded last, by model.",
            ["model"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.model_swaps = Counter(
            "adscore_model_swaps",
            "Changes of the active version served, by model.",
            ["model"],
            registry=registry,
        )
        self.model_refusals = Counter(
            "adscore_model_refusals",
            "Versions refused at load (checksum, signature, schema, golden rows), by model.",
            ["model"],
            registry=registry,
        )
        self.model_refused = Gauge(
            "adscore_model_refused",
            "1 for each version whose last load was refused (the reason is in GET /v1/models).",
            ["model", "version"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.model_unloads = Counter(
            "adscore_model_unloads",
            "Models unloaded from this replica (memory budget or admin), by model.",
            ["model"],
            registry=registry,
        )
        self.loaded_model_bytes = Gauge(
            "adscore_loaded_model_bytes",
            "Bytes of model files loaded, counted against the model memory budget.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.scored_candidates = LeanCounter(
            "adscore_scored_candidates",
            "Candidates scored, by model, version and role (active, canary, shadow).",
            ["model", "version", "role"],
            registry=registry,
        )
        self.predicted_pcvr_sum = LeanCounter(
            "adscore_predicted_pcvr_sum",
            "Sum of the probabilities returned; divided by adscore_scored_candidates_total it is "
            "the mean pCVR to compare with the observed conversion rate, by version and role.",
            ["model", "version", "role"],
            registry=registry,
        )
        self.feature_store_circuit = Gauge(
            "adscore_feature_store_circuit_state",
            "Circuit breaker of the feature store: 0 closed, 1 open (no fetch), 2 half-open.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.in_flight = LeanGauge(
            "adscore_in_flight_requests",
            "Scoring requests being handled now (the autoscaling signal).",
            registry=registry,
        )
        self.admission_limit = Gauge(
            "adscore_admission_limit",
            "Scoring requests the workers hold at once now, summed: max_in_flight each, or "
            "less under sustained overload.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.shed = Counter(
            "adscore_shed_requests",
            "Scoring requests refused with 503 at once, by reason (max_in_flight, "
            "sustained_overload, queued_rows, deadline).",
            ["reason"],
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "adscore_event_loop_lag_seconds",
            "How late the event loop ran a tick due every 5 ms: a saturated process runs late.",
            buckets=(0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.batch_rows = LeanHistogram(
            "adscore_batch_rows",
            "Candidate rows in one model call (micro-batches merge concurrent requests).",
            buckets=CANDIDATE_BUCKETS,
            registry=registry,
        )
        self.batch_requests = LeanHistogram(
            "adscore_batch_requests",
            "Requests merged into one model call.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=registry,
        )
        self.batch_queue_seconds = LeanHistogram(
            "adscore_batch_queue_seconds",
            "Time a request waited for an inference thread (and for its batch to fill).",
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.queued_rows = LeanGauge(
            "adscore_queued_rows",
            "Candidate rows waiting for an inference thread.",
            registry=registry,
        )
        self.shadow_difference = Histogram(
            "adscore_shadow_abs_difference",
            "Mean |shadow - active| probability over the candidates of one request, by model.",
            ["model"],
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=registry,
        )
        self.shadow_dropped = Counter(
            "adscore_shadow_dropped",
            "Requests not shadow-scored because the shadow queue was full, by model.",
            ["model"],
            registry=registry,
        )
        self.drift_dropped = Counter(
            "adscore_drift_dropped",
            "Sampled requests not binned for drift because the drift queue was full, by model.",
            ["model"],
            registry=registry,
        )
        self.process_starts = Counter(
            "adscore_process_starts",
            "Serving processes that started in this replica: with several workers one per worker "
            "and one more per restart of a worker (a rise after start-up is a crash).",
            registry=registry,
        )
        self.prediction_log_rows = Counter(
            "adscore_prediction_log_rows",
            "Candidate rows of sampled requests by what became of them in the prediction log: "
            "written, dropped (queue full), failed (the sink raised), expired (retention).",
            ["outcome"],
            registry=registry,
        )
        self.drift = DriftCollector()
        registry.register(self.drift)
        self.ad_cache = AdCacheCollector()
        registry.register(self.ad_cache)
        self.exposition = exposition_registry(registry)
        # Only with several workers; a single process serves the collectors at scrape time.
        self.mirror = (
            MultiprocessMirror((self.drift, self.ad_cache), CollectorRegistry())
            if multiprocess_mode()
            else None
        )
        hot = (
            self.request_seconds, self.requests, self.stage_seconds, self.model_seconds,
            self.candidates, self.scored_candidates, self.predicted_pcvr_sum, self.in_flight,
            self.batch_rows, self.batch_requests, self.batch_queue_seconds, self.queued_rows,
        )  # fmt: skip
        self.hot_mirror = (
            MultiprocessMirror(hot, CollectorRegistry()) if multiprocess_mode() else None
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for outcome in ("written", "dropped", "failed", "expired"):
            self.prediction_log_rows.labels(outcome)
        for entity in ("user", "ad"):
            self.missing_entities.labels(entity)
            self.rejected_feature_values.labels(entity)
        # What the scoring path labels on every request, kept (see Children).
        self.request_seconds_of = Children(self.request_seconds)
        self.stage_seconds_of = Children(self.stage_seconds)
        self.requests_of = Children(self.requests)
        self.model_seconds_of = Children(self.model_seconds)
        self.scored_candidates_of = Children(self.scored_candidates)
        self.predicted_pcvr_sum_of = Children(self.predicted_pcvr_sum)

    def batching(self) -> BatchMetrics:
        return BatchMetrics(
            self.batch_rows,
            self.batch_requests,
            self.batch_queue_seconds,
            self.queued_rows,
            self.shed,
        )

    def record_scores(
        self, model: str, version: int, role: str, scores: npt.NDArray[np.float64]
    ) -> None:
        """Count the candidates a version scored and the sum of its probabilities."""
        labels = (model, str(version), role)
        self.scored_candidates_of(*labels).inc(len(scores))
        self.predicted_pcvr_sum_of(*labels).inc(float(np.add.reduce(scores)))  # no .sum() wrapper
