"""Micro-batching on a live server: concurrent /v1/score and OIP requests share model calls
and each gets exactly the scores it would get alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]

from service.app import create_app
from service.settings import Settings
from tests.app.conftest import RunningService, world_of
from tests.app.test_oip import _case
from tests.conftest import TrainedFixture
from tests.fixtures import LiveServer

DELAY_US = 100_000  # the longest allowed: requests sent together meet in one batch


@pytest.fixture(scope="module")
def batching_service(trained: TrainedFixture, service: RunningService) -> Iterator[RunningService]:
    settings = Settings(
        model_repository=trained.repository,
        redis_url=service.redis.url,
        auth_enabled=False,
        inference_threads=1,
        max_batch_rows=1024,
        max_batch_delay_us=DELAY_US,
        request_timeout_ms=5_000,
        # Client threads share this process's GIL with the server: a fetch may read late.
        feature_timeout_ms=2_000,
    )
    server = LiveServer(create_app(settings))
    server.start()
    try:
        yield RunningService(server.url, settings, world_of(trained), trained, service.redis)
    finally:
        server.stop()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _bodies(service: RunningService) -> list[dict[str, Any]]:
    keys_users, keys_ads = service.world.users.keys, service.world.ads.keys
    return [
        {
            "user_id": keys_users[i],
            "context": {"device": "android", "hour": i},
            "candidates": [{"ad_id": keys_ads[a]} for a in range(i * 7, i * 7 + 3 + i)],
        }
        for i in range(6)
    ]


def _oip(
    service: RunningService, ready: threading.Barrier | None = None
) -> tuple[np.ndarray[Any, Any], Any]:
    """An OIP inference of five rows; sent once every party of `ready` is set up."""
    _, inputs = _case(service, n=5)
    client = triton.InferenceServerClient(url=service.url.removeprefix("http://"))
    dense = triton.InferInput("dense", list(inputs.dense.shape), "FP32")
    dense.set_data_from_numpy(inputs.dense)
    ids = triton.InferInput("ids", list(inputs.ids.shape), "INT64")
    ids.set_data_from_numpy(inputs.ids.astype(np.int64))
    if ready is not None:
        ready.wait(timeout=10)
    result = client.infer("pcvr", [dense, ids])
    return result.as_numpy("probability"), inputs


def test_concurrent_requests_share_model_calls_and_keep_their_own_scores(
    batching_service: RunningService, service: RunningService
) -> None:
    bodies = _bodies(batching_service)
    # The reference: the same requests, one at a time, on the unbatched fixture server.
    alone = [httpx.post(f"{service.url}/v1/score", json=b).json()["scores"] for b in bodies]
    oip_alone, _ = _oip(service)

    calls_before = _metric(batching_service.url, "adscore_batch_requests_count")
    requests_before = _metric(batching_service.url, "adscore_batch_requests_sum")

    # Every client is built before any request leaves: on a slow machine building them one
    # after another could spread the requests over more than the batch's delay.
    ready = threading.Barrier(len(bodies) + 1)

    def score(body: dict[str, Any]) -> list[float]:
        with httpx.Client(timeout=10) as client:
            ready.wait(timeout=10)
            response = client.post(f"{batching_service.url}/v1/score", json=body)
        assert response.status_code == 200, response.text
        assert not response.json()["degraded"], response.text
        scores: list[float] = response.json()["scores"]
        return scores

    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        oip = pool.submit(_oip, batching_service, ready)
        together = list(pool.map(score, bodies))
        oip_together, _ = oip.result()

    for expected, got in zip(alone, together, strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(oip_together, oip_alone, rtol=0, atol=1e-6)
    calls = _metric(batching_service.url, "adscore_batch_requests_count") - calls_before
    requests = _metric(batching_service.url, "adscore_batch_requests_sum") - requests_before
    assert requests == len(bodies) + 1  # OIP inference goes through the same batcher
    assert calls < requests / 2, f"{requests} requests took {calls} model calls"


def test_a_tight_timeout_releases_a_held_batch_early(
    batching_service: RunningService,
) -> None:
    body = _bodies(batching_service)[0]
    # Its own deadline releases the batch early instead of waiting out the 100 ms delay.
    response = httpx.post(f"{batching_service.url}/v1/score", json={**body, "timeout_ms": 20})
    assert response.status_code == 200, response.text
    assert response.elapsed.total_seconds() < 0.09
