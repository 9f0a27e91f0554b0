"""Drift over real HTTP: traffic like the validation rows keeps PSI near zero, shifted traffic
raises it, a feature served on its default raises its default rate, on /metrics and on
GET /v1/models/{name}/drift."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from feature_client.loader import EntityBatch, load_arrays
from feature_client.redis_store import RedisFeatureStore
from models.synthetic import DEVICES, PLACEMENTS, SyntheticWorld
from service.app import create_app
from service.settings import Settings
from tests.app.conftest import world_of
from tests.conftest import TrainedFixture
from tests.fixtures import LiveServer

CONTEXT = (("device", DEVICES), ("country", None), ("hour", None), ("placement", PLACEMENTS))
CANDIDATES = 4


@pytest.fixture(scope="module")
def drift_server(trained: TrainedFixture, feature_redis: str) -> Iterator[str]:
    settings = Settings(
        model_repository=trained.repository,
        redis_url=feature_redis,
        auth_enabled=False,
        drift_sample_rate=1.0,
        drift_min_rows=500,
    )
    server = LiveServer(create_app(settings))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def requests_like_validation(
    world: SyntheticWorld, count: int, seed: int
) -> Iterator[dict[str, Any]]:
    """Requests drawn as the validation impressions were, 1 % unknown users and ads included."""
    impressions = world.sample(count * CANDIDATES, seed)
    rng = np.random.default_rng(seed)
    vocabularies = [world.spec.feature(name) for name, _ in CONTEXT]
    for r in range(count):
        rows = slice(r * CANDIDATES, (r + 1) * CANDIDATES)
        first = r * CANDIDATES
        user = world.users.keys[impressions.user_index[first]]
        ads = [world.ads.keys[a] for a in impressions.ad_index[rows]]
        yield {
            "user_id": f"unknown-{r}" if rng.random() < 0.01 else user,
            "context": {
                name: feature.vocabulary[impressions.context_ids[first, j] - 1]  # type: ignore[union-attr]
                for j, ((name, _), feature) in enumerate(zip(CONTEXT, vocabularies, strict=True))
            },
            "candidates": [
                {"ad_id": f"unknown-{r}-{i}" if rng.random() < 0.01 else ad}
                for i, ad in enumerate(ads)
            ],
        }


def send(url: str, bodies: Iterator[dict[str, Any]]) -> int:
    rows = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        for body in bodies:
            response = client.post("/v1/score", json=body)
            assert response.status_code == 200, response.text
            rows += len(body["candidates"])
    return rows


def drift_once_binned(url: str, rows: int) -> dict[str, Any]:
    """The drift table once the worker has binned `rows` sampled rows."""
    deadline = time.monotonic() + 20
    while True:
        body = httpx.get(f"{url}/v1/models/pcvr/drift").json()
        (version,) = body["versions"]
        if version["window_rows"] >= rows or time.monotonic() > deadline:
            assert version["window_rows"] == rows
            return dict(version)
        time.sleep(0.05)


def gauge(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(
        f"{name} {labels} not exported:\n"
        + "\n".join(re.findall(r"^adscore_(?:feature|score).*$", text, re.M))
    )


def test_psi_stays_near_zero_then_rises_when_the_traffic_shifts(
    drift_server: str, trained: TrainedFixture
) -> None:
    world = world_of(trained)
    clean_rows = send(drift_server, requests_like_validation(world, 1000, seed=77))
    clean = drift_once_binned(drift_server, clean_rows)
    assert clean["has_reference"]
    worst = max(clean["feature_psi"].items(), key=lambda item: item[1])
    assert worst[1] < 0.1, f"PSI on unshifted traffic: {clean['feature_psi']}"
    assert clean["score_psi"] < 0.1
    assert gauge(drift_server, "adscore_feature_psi", feature="ad_log_price") < 0.1
    assert (
        abs(clean["mean_pcvr"] - clean["reference_mean_pcvr"]) < 0.2 * clean["reference_mean_pcvr"]
    )

    # Shifted: only the cheapest category's ads, one placement, a quarter of users unknown.
    category = int(
        np.argmin([world.ad_log_price[world.ad_category == c].mean() for c in range(24)])
    )
    cheap_ads = [world.ads.keys[a] for a in np.flatnonzero(world.ad_category == category)]
    shifted = []
    for r, body in enumerate(requests_like_validation(world, 1000, seed=78)):
        ads = [cheap_ads[(r * CANDIDATES + i) % len(cheap_ads)] for i in range(2 * CANDIDATES)]
        body["candidates"] = [{"ad_id": ad} for ad in ads]
        body["context"]["placement"] = "banner"
        if r % 4 == 0:
            body["user_id"] = f"new-user-{r}"
        shifted.append(body)
    shifted_rows = send(drift_server, iter(shifted))
    drifted = drift_once_binned(drift_server, clean_rows + shifted_rows)
    for feature in ("ad_log_price", "ad_category", "placement"):
        assert drifted["feature_psi"][feature] > 0.25, drifted["feature_psi"]
        assert gauge(drift_server, "adscore_feature_psi", feature=feature) > 0.25
    assert drifted["feature_psi"]["device"] < 0.1  # untouched
    assert drifted["missing_rate"]["user"] > 0.1 > drifted["reference_missing_rate"]["user"]
    assert gauge(drift_server, "adscore_feature_missing_rate", entity="user") > 0.1


def test_drift_of_an_unknown_model_is_404(drift_server: str) -> None:
    response = httpx.get(f"{drift_server}/v1/models/nope/drift")
    assert response.status_code == 404
    assert "not loaded" in response.json()["error"]["message"]


def write_ad_features(
    redis_url: str, world: SyntheticWorld, dense: npt.NDArray[np.float32]
) -> None:
    """Store every ad of the world again, with these dense features."""

    async def write() -> None:
        store = RedisFeatureStore.from_url(redis_url, "adscore", 5.0)
        batch = EntityBatch(world.ads.keys, dense, world.ads.ids)
        await load_arrays(store, world.spec, "ad", batch, progress=False)
        await store.close()

    asyncio.run(write())


def test_a_feature_served_on_its_default_raises_its_default_rate_alone(
    drift_server: str, feature_redis: str, trained: TrainedFixture
) -> None:
    world = world_of(trained)
    broken_feature = "ad_quality"
    column = [f.name for f in world.spec.dense("ad")].index(broken_feature)
    broken = world.ads.dense.copy()
    broken[:, column] = world.spec.dense_defaults("ad")[column]
    # The window holds the rows of earlier tests too: the rates of this traffic are the change.
    (before,) = httpx.get(f"{drift_server}/v1/models/pcvr/drift").json()["versions"]
    write_ad_features(feature_redis, world, broken)
    try:
        rows = send(drift_server, requests_like_validation(world, 300, seed=79))
        after = drift_once_binned(drift_server, before["window_rows"] + rows)
    finally:
        write_ad_features(feature_redis, world, world.ads.dense)

    def defaulted_rows(version: dict[str, Any], feature: str) -> int:
        rate: float = version["feature_missing_rate"][feature] or 0.0  # None: an empty window
        window_rows: int = version["window_rows"]
        return round(rate * window_rows)

    def rate_of_this_traffic(feature: str) -> float:
        return (defaulted_rows(after, feature) - defaulted_rows(before, feature)) / rows

    reference = after["reference_feature_missing_rate"]
    assert set(reference) == set(world.spec.dense_names + world.spec.categorical_names)
    assert reference[broken_feature] < 0.05
    assert rate_of_this_traffic(broken_feature) == 1.0  # every row, unknown ads included
    for feature, expected in reference.items():
        if feature != broken_feature:
            assert abs(rate_of_this_traffic(feature) - expected) < 0.05, feature
    live = gauge(drift_server, "adscore_feature_default_rate", feature=broken_feature)
    assert live == pytest.approx(after["feature_missing_rate"][broken_feature])
    assert live > reference[broken_feature] + 0.05
    assert gauge(
        drift_server, "adscore_feature_default_rate_reference", feature=broken_feature
    ) == pytest.approx(reference[broken_feature])
