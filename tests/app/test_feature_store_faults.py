"""A dead Redis: scores on defaults (degrade policy) or 503 (fail policy); start-up refusals;
a slow store: requests beyond max_in_flight are shed, and sustained overload lowers the bound
until it passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from feature_client.memory_store import InMemoryFeatureStore
from feature_client.redis_server import LocalRedisServer
from feature_client.store import RawFeatures, SchemaStamp
from service import admission
from service.app import StartupError, create_app, start_models
from service.metrics import Metrics
from service.settings import Settings
from tests.app.conftest import load_features, world_of
from tests.conftest import TrainedFixture
from tests.fixtures import LiveServer, tiny_spec


@pytest.fixture(scope="module")
def dead_redis_servers(trained: TrainedFixture) -> Iterator[dict[str, str]]:
    """Two servers (degrade and fail policies) whose Redis dies after start-up."""
    servers = {}
    with LocalRedisServer() as redis_server:
        load_features(redis_server.url, world_of(trained))
        for policy in ("degrade", "fail"):
            settings = Settings(
                model_repository=trained.repository,
                redis_url=redis_server.url,
                on_feature_store_error=policy,
                auth_enabled=False,
            )
            servers[policy] = LiveServer(create_app(settings))
            servers[policy].start()
    # The with block has stopped redis-server: both replicas now face a dead store.
    try:
        yield {policy: server.url for policy, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


REQUEST = {"user_id": "u1", "candidates": [{"ad_id": "a1"}, {"ad_id": "a2"}]}


def test_degrade_policy_scores_on_defaults(dead_redis_servers: dict[str, str]) -> None:
    with httpx.Client(base_url=dead_redis_servers["degrade"], timeout=10) as client:
        response = client.post("/v1/score", json=REQUEST)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["degraded"] is True
        assert len(body["scores"]) == 2 and all(0 < s < 1 for s in body["scores"])
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["feature_store"] == "unreachable"
        metrics = client.get("/metrics").text
    assert 'adscore_degraded_responses_total{reason="unavailable"} 1.0' in metrics


def test_fail_policy_answers_503(dead_redis_servers: dict[str, str]) -> None:
    with httpx.Client(base_url=dead_redis_servers["fail"], timeout=10) as client:
        response = client.post("/v1/score", json=REQUEST)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "features_unavailable"
        assert client.get("/readyz").status_code == 503


def test_features_of_another_schema_refuse_start_up(trained: TrainedFixture) -> None:
    store = InMemoryFeatureStore()
    asyncio.run(store.write_schema(SchemaStamp.of(tiny_spec())))
    settings = Settings(model_repository=trained.repository)
    with pytest.raises(StartupError, match="load-features"):
        asyncio.run(start_models(settings, store, Metrics(CollectorRegistry())))


def test_missing_model_refuses_start_up(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path)
    with pytest.raises(StartupError, match="no versions of model 'pcvr'"):
        asyncio.run(start_models(settings, InMemoryFeatureStore(), Metrics(CollectorRegistry())))


class SlowStore(InMemoryFeatureStore):
    """A store that answers after a pause, so requests stay in flight."""

    def __init__(self, pause_s: float = 0.5) -> None:
        super().__init__()
        self.pause_s = pause_s

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        await asyncio.sleep(self.pause_s)
        return await super().fetch(user_id, ad_ids)


def test_requests_beyond_max_in_flight_are_shed_at_once(trained: TrainedFixture) -> None:
    settings = Settings(
        model_repository=trained.repository,
        auth_enabled=False,
        max_in_flight=2,
        overload_in_flight_fraction=1,  # a fixed bound, however long they stand
        feature_timeout_ms=5_000,
        request_timeout_ms=10_000,
    )
    # Two seconds: all six requests arrive while the first two wait, even on a slow machine.
    server = LiveServer(create_app(settings, store=SlowStore(pause_s=2.0)))
    server.start()
    try:

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/score", json=REQUEST, timeout=10)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 503, 503, 503, 503]
    for shed in (r for r in responses if r.status_code == 503):
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
    assert 'adscore_shed_requests_total{reason="max_in_flight"} 4.0' in metrics
    assert "adscore_in_flight_requests 0.0" in metrics


def _metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


def test_sustained_overload_lowers_the_bound_until_it_passes(
    trained: TrainedFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Half-second intervals: sequential probes fill one with ten arrivals even on a slow host.
    monkeypatch.setattr(admission, "INTERVAL_S", 0.5)
    settings = Settings(
        model_repository=trained.repository,
        auth_enabled=False,
        max_in_flight=4,
        overload_in_flight_fraction=0.5,
        feature_timeout_ms=10_000,
        request_timeout_ms=20_000,
    )
    server = LiveServer(create_app(settings, store=SlowStore(pause_s=3.0)))
    server.start()
    url = f"{server.url}/v1/score"
    try:
        with ThreadPoolExecutor(4) as pool, httpx.Client(timeout=20) as client:
            held = [pool.submit(httpx.post, url, json=REQUEST, timeout=20) for _ in range(4)]
            while _metric(server.url, "adscore_in_flight_requests") < 4:
                time.sleep(0.01)
            # Every slot stays taken and every probe is refused: after two such intervals the
            # bound is halved.
            refusals = []
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                probe = client.post(url, json=REQUEST)
                assert probe.status_code == 503 and probe.headers["retry-after"] == "1"
                refusals.append(probe.json()["error"]["message"])
                if "sustained overload" in refusals[-1]:
                    break
            assert "the limit is 4: retry" in refusals[0]
            assert "the limit is 2 until it passes (max_in_flight 4)" in refusals[-1], refusals
            assert _metric(server.url, "adscore_admission_limit") == 2
            assert [r.result().status_code for r in held] == [200] * 4
            # Traffic stopped for longer than an interval: the next arrival finds the full bound.
            time.sleep(0.6)
            after = pool.submit(httpx.post, url, json=REQUEST, timeout=20)
            while _metric(server.url, "adscore_in_flight_requests") < 1:
                time.sleep(0.01)
            assert _metric(server.url, "adscore_admission_limit") == 4
            assert after.result().status_code == 200
        assert _metric(server.url, 'adscore_shed_requests_total{reason="sustained_overload"}') == 1
    finally:
        server.stop()
