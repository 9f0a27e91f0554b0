"""What a running adscore says about the requests it served, read from its /metrics.

A closed loop with more connections than the service admits at once, or a slow machine, can
make feature fetches time out in the event loop's queue; the circuit breaker then opens and the
service answers on default features (`degraded`). Such answers are fast and cheap, so a
throughput figure is only honest next to the share of them it contains.

Its histograms also tell where a point's tail comes from: the p99 of each stage between two
readings (`stage_quantiles_between`), as Prometheus's histogram_quantile would compute it.
"""

from __future__ import annotations

import itertools
import re

import httpx

SAMPLE = re.compile(r"^(adscore_\w+)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)
LABEL = re.compile(r'(\w+)="([^"]*)"')

STAGES: dict[str, tuple[str, dict[str, str]]] = {
    "feature_fetch": ("adscore_stage_duration_seconds", {"stage": "feature_fetch"}),
    "input_assembly": ("adscore_stage_duration_seconds", {"stage": "input_assembly"}),
    "inference_thread_wait": ("adscore_batch_queue_seconds", {}),
    "inference": ("adscore_stage_duration_seconds", {"stage": "inference"}),
    "event_loop_lag": ("adscore_event_loop_lag_seconds", {}),
}
"""Each stage of a scoring request the harness reports, by the histogram that times it.
`inference` includes the wait for an inference thread; `event_loop_lag` is how late the loop's
5 ms tick ran (service/loop_lag.py)."""

Counters = dict[tuple[str, str], float]


def read_counters(port: int) -> Counters | None:
    """adscore's samples by (name, labels text); None when the server exports none of them
    (the naive service, the HTTP floor)."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    samples = {
        (name, labels or ""): float(value) for name, labels, value in SAMPLE.findall(response.text)
    }
    return samples or None


def _total(counters: Counters, name: str) -> float:
    return sum(value for (sample, _), value in counters.items() if sample == name)


def degraded_by_reason(counters: Counters) -> dict[str, float]:
    """Degraded responses so far by reason: timeout, unavailable, circuit_open,
    event_loop_busy."""
    name = "adscore_degraded_responses_total"
    return {
        labels.removeprefix('reason="').removesuffix('"'): value
        for (sample, labels), value in counters.items()
        if sample == name
    }


def degraded_responses(counters: Counters) -> float:
    """Responses scored on default features because the feature store failed, any reason."""
    return _total(counters, "adscore_degraded_responses_total")


def ad_cache_lookups(counters: Counters) -> tuple[float, float] | None:
    """(hits, misses) of the hot-ad cache so far; None when the cache is off."""
    name = "adscore_ad_feature_cache_lookups_total"
    found = {labels: value for (sample, labels), value in counters.items() if sample == name}
    if not found:
        return None
    return found.get('result="hit"', 0.0), found.get('result="miss"', 0.0)


def scored_answers(counters: Counters) -> float:
    """200 answers to POST /v1/score so far, the degraded ones included."""
    return counters.get(("adscore_requests_total", 'route="/v1/score",status="200"'), 0.0)


def degraded_between(before: Counters | None, after: Counters | None) -> tuple[float, float] | None:
    """(degraded answers, all scored answers) served between two readings, counted by the
    server (a closed loop's generator leaves out the answers still in flight when it stops);
    None for a server without counters."""
    if before is None or after is None:
        return None
    return (
        degraded_responses(after) - degraded_responses(before),
        scored_answers(after) - scored_answers(before),
    )


Buckets = list[tuple[float, float]]


def histogram_between(
    before: Counters, after: Counters, name: str, labels: dict[str, str]
) -> Buckets:
    """The cumulative buckets (upper bound, count) of the observations made between two
    readings, summed over the series of `name` whose labels include `labels`."""
    counts: dict[float, float] = {}
    for reading, sign in ((after, 1.0), (before, -1.0)):
        for (sample, text), value in reading.items():
            if sample != f"{name}_bucket":
                continue
            series = dict(LABEL.findall(text))
            if any(series.get(k) != v for k, v in labels.items()):
                continue
            bound = float(series["le"])  # "+Inf" parses as inf
            counts[bound] = counts.get(bound, 0.0) + sign * value
    return sorted(counts.items())


def quantile(buckets: Buckets, q: float) -> float | None:
    """The q-quantile of cumulative buckets, interpolated linearly within its bucket as
    Prometheus's histogram_quantile does; the highest finite bound when it falls in +Inf.
    None without observations, and where Prometheus has no answer either: no +Inf bucket, or
    counts that fall from one bucket to the next or below zero (a counter reset between the
    readings, a worker's metrics file gone)."""
    if len(buckets) < 2 or buckets[-1][0] != float("inf") or not buckets[-1][1] > 0:
        return None
    counts = [count for _, count in buckets]
    if counts[0] < 0 or any(b < a for a, b in itertools.pairwise(counts)):
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def stage_quantiles_between(
    before: Counters | None, after: Counters | None, q: float = 0.99
) -> dict[str, float | None] | None:
    """Each of STAGES' q-quantile in ms over the observations between two readings (None for a
    stage without any); None for a server without counters."""
    if before is None or after is None:
        return None
    found: dict[str, float | None] = {}
    for stage, (name, labels) in STAGES.items():
        seconds = quantile(histogram_between(before, after, name, labels), q)
        found[stage] = None if seconds is None else seconds * 1000
    return found
