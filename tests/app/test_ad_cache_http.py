"""The hot-ad cache switched on in a real service: the same scores, hits counted in /metrics."""

from __future__ import annotations

import re

import httpx

from tests.app.conftest import serving
from tests.conftest import TrainedFixture


def _lookups(metrics: str, result: str) -> float:
    match = re.search(
        rf'^adscore_ad_feature_cache_lookups_total\{{result="{result}"\}} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert match, f"no {result} lookups in /metrics"
    return float(match.group(1))


def test_cached_ads_score_the_same_and_are_counted(trained: TrainedFixture) -> None:
    with serving(trained, ad_feature_cache_seconds=60) as service:
        world = service.world
        body = {
            "user_id": world.users.keys[3],
            "context": {"device": "ios", "country": "US", "hour": 9, "placement": "feed"},
            "candidates": [{"ad_id": a} for a in [*world.ads.keys[:40], "no-such-ad"]],
        }
        with httpx.Client(base_url=service.url, timeout=10) as client:
            first = client.post("/v1/score", json=body)
            second = client.post("/v1/score", json=body)
            metrics = client.get("/metrics").text
        assert first.status_code == second.status_code == 200, first.text
        assert second.json()["scores"] == first.json()["scores"]
        assert _lookups(metrics, "miss") == 41 + 1  # all of the first, the unknown ad again
        assert _lookups(metrics, "hit") == 40
        assert "adscore_ad_feature_cache_entries 40.0" in metrics


def test_the_cache_is_off_by_default(trained: TrainedFixture) -> None:
    with serving(trained) as service, httpx.Client(base_url=service.url, timeout=10) as client:
        assert "adscore_ad_feature_cache_lookups" not in client.get("/metrics").text
