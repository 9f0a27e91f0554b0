"""Online drift: live inputs and scores against the reference each version was published with.

score() hands a sample of its requests to the DriftMonitor (one random draw and a put_nowait on
a bounded queue: O(1) on the request's path, dropped and counted when full). A worker thread at
a lower CPU priority bins the rows, a quarter of a second's samples at a time, into rolling
windows per version (a ring of fixed-duration buckets); PSI, missing rates (per entity and per
feature) and mean pCVR are computed from the window when read (scrape or
GET /v1/models/{name}/drift).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter

from feature_client.assembly import ModelInputs
from feature_client.reference import (
    ENTITIES,
    BinnedSummary,
    DriftReference,
    ReferenceBinner,
    TopIdsSummary,
    defaulted_counts,
    dense_defaults,
)
from feature_client.spec import FeatureSpec
from service.model_manager import lower_thread_priority
from service.registry import LoadedModel
from service.routing import ServingPlan
from service.work_queue import wait_drained

logger = logging.getLogger("adscore.drift")

# Shares below this count as this much, so an empty bin gives a large but finite PSI.
PSI_FLOOR = 1e-4
DRIFT_NICE = 10
# Queued samples binned together at most (see merged()).
BIN_BATCH = 256
# How long the worker waits, after a sample arrives, for more to bin with it. At 5 % of a few
# thousand requests/s samples come one at a time, and binning each alone pays numpy's fixed
# cost per feature on every one (see merged()); a quarter of a second is nothing next to a
# window of minutes.
LINGER_SECONDS = 0.25
LINGER_POLL_SECONDS = 0.05

Key = tuple[str, int]


def psi(expected: Iterable[float], actual: Iterable[float]) -> float:
    """Population stability index: sum (a - e) * ln(a / e) over bins of two distributions."""
    e = np.maximum(np.asarray(list(expected), dtype=np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(list(actual), dtype=np.float64), PSI_FLOOR)
    return float(((a - e) * np.log(a / e)).sum())


def shares(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts))


@dataclass
class Tally:
    """Counts of binned rows of one version over some time span."""

    rows: int = 0
    dense: list[npt.NDArray[np.int64]] = field(default_factory=list)
    categorical: list[npt.NDArray[np.int64]] = field(default_factory=list)
    score: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    missing: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(2, dtype=np.int64))
    """Rows whose user, ad was missing."""
    score_sum: float = 0.0
    defaulted: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Rows per feature (dense, then categorical) holding its missing-value stand-in
    (`feature_client.reference.defaulted_counts`); counted with or without a reference."""

    @classmethod
    def of(
        cls,
        binner: ReferenceBinner | None,
        inputs: ModelInputs,
        scores: npt.NDArray[np.float64],
        user_found: bool | npt.NDArray[np.bool_],
        ads_found: npt.NDArray[np.bool_],
        defaults: npt.NDArray[np.float32],
    ) -> Tally:
        """Bin rows of one version (the worker thread's job, never the request's): one request's
        (`user_found` one bool) or several requests' concatenated (one bool per row); `defaults`
        is the version's dense default row (`feature_client.reference.dense_defaults`)."""
        n = len(scores)
        users_found = int(np.broadcast_to(user_found, n).sum())
        tally = cls(
            rows=n,
            missing=np.asarray([n - users_found, n - int(ads_found.sum())]),
            score_sum=float(scores.sum()),
            defaulted=defaulted_counts(defaults, inputs.dense, inputs.ids),
        )
        if binner is not None:
            tally.dense = binner.dense(inputs.dense)
            tally.categorical = binner.categorical(inputs.ids)
            tally.score = binner.score(scores)
        return tally

    def merge(self, other: Tally) -> Tally:
        if self.rows == 0:
            return other
        if other.rows == 0:
            return self
        return Tally(
            rows=self.rows + other.rows,
            dense=[a + b for a, b in zip(self.dense, other.dense, strict=True)],
            categorical=[a + b for a, b in zip(self.categorical, other.categorical, strict=True)],
            score=self.score + other.score,
            missing=self.missing + other.missing,
            score_sum=self.score_sum + other.score_sum,
            defaulted=self.defaulted + other.defaulted,
        )


class RollingWindow:
    """The last `buckets` x `bucket_seconds` of tallies, as a ring of per-bucket sums."""

    def __init__(
        self, buckets: int, bucket_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._buckets = buckets
        self._bucket_seconds = bucket_seconds
        self._clock = clock
        self._ring: list[tuple[int, Tally]] = []

    def _now(self) -> int:
        return int(self._clock() // self._bucket_seconds)

    def _expire(self, now: int) -> None:
        self._ring = [(b, t) for b, t in self._ring if b > now - self._buckets]

    def add(self, tally: Tally) -> None:
        now = self._now()
        self._expire(now)
        if self._ring and self._ring[-1][0] == now:
            self._ring[-1] = (now, self._ring[-1][1].merge(tally))
        else:
            self._ring.append((now, tally))

    def total(self) -> Tally:
        self._expire(self._now())
        result = Tally()
        for _, tally in self._ring:
            result = result.merge(tally)
        return result


@dataclass(frozen=True)
class VersionDrift:
    """One version's live window against its reference; PSI is None below min_rows, rates are
    None while the window has no rows."""

    model: str
    version: int
    rows: int
    window_seconds: float
    reference: DriftReference | None
    feature_psi: dict[str, float | None]
    score_psi: float | None
    missing_rate: dict[str, float | None]
    mean_pcvr: float | None
    feature_missing_rate: dict[str, float | None]
    """Feature name -> share of rows holding its missing-value stand-in (a dense default, the
    unknown id): one feature's pipeline serving defaults shows here, not in missing_rate."""

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "version": self.version,
            "window_rows": self.rows,
            "window_seconds": self.window_seconds,
            "has_reference": self.reference is not None,
            "feature_psi": self.feature_psi,
            "score_psi": self.score_psi,
            "missing_rate": self.missing_rate,
            "feature_missing_rate": self.feature_missing_rate,
            "mean_pcvr": self.mean_pcvr,
        }
        if self.reference is None:
            body["message"] = (
                f"version {self.version} was published without a drift reference "
                "(metadata.json has no drift_reference): no PSI can be computed; republish it "
                "with `adscore train` to get one"
            )
        else:
            body["reference_missing_rate"] = self.reference.missing_rate
            body["reference_feature_missing_rate"] = self.reference.feature_missing_rate
            body["reference_mean_pcvr"] = self.reference.mean_score
        return body


def _version_drift(
    model: LoadedModel, tally: Tally, window_seconds: float, min_rows: int
) -> VersionDrift:
    reference = model.metadata.drift_reference
    enough = reference is not None and tally.rows >= min_rows and tally.rows > 0
    feature_psi: dict[str, float | None] = {}
    score_psi = None
    if reference is not None:
        summaries: list[BinnedSummary | TopIdsSummary] = [*reference.dense, *reference.categorical]
        counts = [*tally.dense, *tally.categorical]  # empty until the first sample
        for i, summary in enumerate(summaries):
            feature_psi[summary.name] = (
                round(psi(summary.shares, shares(counts[i])), 6) if enough else None
            )
        if enough:
            score_psi = round(psi(reference.score.shares, shares(tally.score)), 6)
    rows = tally.rows
    features = [*model.spec.dense_names, *model.spec.categorical_names]
    return VersionDrift(
        model.name,
        model.version,
        rows,
        window_seconds,
        reference,
        feature_psi,
        score_psi,
        {e: float(tally.missing[i]) / rows if rows else None for i, e in enumerate(ENTITIES)},
        tally.score_sum / rows if rows else None,
        feature_missing_rate={
            f: float(tally.defaulted[i]) / rows if rows else None for i, f in enumerate(features)
        },
    )


def scored_versions(plans: Iterable[ServingPlan]) -> list[LoadedModel]:
    """The versions requests are scored with (active, canary): those drift is sampled for."""
    return [m for plan in plans for m in (plan.active, plan.canary) if m is not None]


@dataclass(frozen=True)
class Prepared:
    """What binning one version's rows needs, built from its spec and reference once."""

    spec: FeatureSpec
    reference: DriftReference | None
    defaults: npt.NDArray[np.float32]
    binner: ReferenceBinner | None


@dataclass(frozen=True)
class Sample:
    model: LoadedModel
    inputs: ModelInputs
    scores: npt.NDArray[np.float64]
    user_found: bool | npt.NDArray[np.bool_]
    ads_found: npt.NDArray[np.bool_]


def merged(samples: list[Sample]) -> list[Sample]:
    """The samples of each version concatenated into one: numpy's fixed cost per call, paid per
    feature, then falls on a batch of requests instead of on each (at 5,000 requests/s and a 5 %
    sample, binning request by request kept the worker a third of a core busy)."""
    by_model: dict[int, list[Sample]] = {}
    for sample in samples:
        by_model.setdefault(id(sample.model), []).append(sample)
    result = []
    for group in by_model.values():
        if len(group) == 1:
            result.append(group[0])
            continue
        result.append(
            Sample(
                group[0].model,
                ModelInputs(
                    np.concatenate([g.inputs.dense for g in group]),
                    np.concatenate([g.inputs.ids for g in group]),
                ),
                np.concatenate([g.scores for g in group]),
                np.concatenate([np.broadcast_to(g.user_found, len(g.scores)) for g in group]),
                np.concatenate([g.ads_found for g in group]),
            )
        )
    return result


class DriftMonitor:
    """Samples scored requests and keeps a rolling window of their bins per version."""

    def __init__(
        self,
        *,
        sample_rate: float,
        max_pending: int,
        window_seconds: float,
        window_buckets: int,
        min_rows: int,
        dropped: Counter,
        clock: Callable[[], float] = time.monotonic,
        linger_seconds: float = LINGER_SECONDS,
    ) -> None:
        self.sample_rate = sample_rate
        self._linger_seconds = linger_seconds
        self.window_seconds = window_seconds
        self._bucket_seconds = window_seconds / window_buckets
        self._window_buckets = window_buckets
        self.min_rows = min_rows
        self._dropped = dropped
        self._clock = clock
        self._queue: queue.Queue[Sample | None] = queue.Queue(max_pending)
        self._windows: dict[Key, RollingWindow] = {}
        # Dense default row per version, with the spec it was built from: built once, not per
        # sample, and rebuilt if the version is reloaded with another spec object.
        self._prepared_versions: dict[Key, Prepared] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def worker(self) -> threading.Thread | None:
        """The thread that bins the samples; None until the first one is submitted."""
        return self._thread

    def submit(
        self,
        model: LoadedModel,
        inputs: ModelInputs,
        scores: npt.NDArray[np.float64],
        user_found: bool,
        ads_found: npt.NDArray[np.bool_],
    ) -> None:
        """On the request's path: a coin flip and a non-blocking enqueue, nothing more."""
        if self.sample_rate <= 0 or random.random() >= self.sample_rate:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="adscore-drift", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(Sample(model, inputs, scores, user_found, ads_found))
        except queue.Full:
            self._dropped.labels(model.name).inc()

    def _run(self) -> None:
        lower_thread_priority(DRIFT_NICE)
        while True:
            batch = self._next_batch()
            samples = [s for s in batch if s is not None]
            try:
                for sample in merged(samples):
                    self.record(sample)
            except Exception:  # drift is advice: a bad sample must not stop the worker
                logger.exception("drift: binning %d samples failed", len(samples))
            finally:
                for _ in batch:
                    self._queue.task_done()
            if len(samples) < len(batch):  # the stop sentinel
                return

    def _next_batch(self) -> list[Sample | None]:
        """The samples to bin together: the next to arrive and those queued within
        `linger_seconds` of it, up to BIN_BATCH or to the stop sentinel."""
        batch = [self._queue.get()]
        deadline = time.monotonic() + self._linger_seconds
        while batch[-1] is not None and len(batch) < BIN_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Polled rather than woken per sample: a few wake-ups a second under any load.
                time.sleep(min(remaining, LINGER_POLL_SECONDS))
        return batch

    def _prepared(self, model: LoadedModel) -> Prepared:
        """The version's dense default row and reference binner, built once per loaded version
        (rebuilt when a reload brings another spec or reference)."""
        key = (model.name, model.version)
        reference = model.metadata.drift_reference
        with self._lock:
            cached = self._prepared_versions.get(key)
        if cached is not None and cached.spec is model.spec and cached.reference is reference:
            return cached
        prepared = Prepared(
            model.spec,
            reference,
            dense_defaults(model.spec),
            None if reference is None else ReferenceBinner(reference),
        )
        with self._lock:
            self._prepared_versions[key] = prepared
        return prepared

    def record(self, sample: Sample) -> None:
        model = sample.model
        prepared = self._prepared(model)
        tally = Tally.of(
            prepared.binner,
            sample.inputs,
            sample.scores,
            sample.user_found,
            sample.ads_found,
            prepared.defaults,
        )
        key = (model.name, model.version)
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = RollingWindow(self._window_buckets, self._bucket_seconds, self._clock)
                self._windows[key] = window
            window.add(tally)

    def table(self, models: Iterable[LoadedModel]) -> list[VersionDrift]:
        """Drift of these versions; windows of any other version are dropped (label bound)."""
        models = list(models)
        keys = {(m.name, m.version) for m in models}
        with self._lock:
            self._windows = {k: w for k, w in self._windows.items() if k in keys}
            self._prepared_versions = {
                k: p for k, p in self._prepared_versions.items() if k in keys
            }
            totals = {k: w.total() for k, w in self._windows.items()}
        return [
            _version_drift(
                m, totals.get((m.name, m.version), Tally()), self.window_seconds, self.min_rows
            )
            for m in models
        ]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued sample is binned (tests); False on timeout."""
        return wait_drained(self._queue, timeout)

    def close(self) -> None:
        if self._thread is not None:
            # When the queue is full the daemon thread simply ends with the process.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(timeout=1)
