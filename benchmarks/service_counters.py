"""What a running adscore says about the requests it served, read from its /metrics.

A closed loop with more connections than the service admits at once, or a slow machine, can
make feature fetches time out in the event loop's queue; the circuit breaker then opens and the
service answers on default features (`degraded`). Such answers are fast and cheap, so a
throughput figure is only honest next to the share of them it contains.
"""

from __future__ import annotations

import re

import httpx

SAMPLE = re.compile(r"^(adscore_\w+)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)

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
