"""The feature store's circuit breaker, on a fake clock, and in the scoring pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from feature_client.memory_store import InMemoryFeatureStore
from feature_client.store import FeatureStoreUnavailable, RawFeatures
from service.circuit_breaker import CircuitBreaker, CircuitState
from service.metrics import Metrics
from service.registry import LoadedModel
from service.routing import ServingPlan, SinglePlanRouter
from service.scoring import ScoreRequest, ScoringPipeline
from service.settings import Settings
from tests.fixtures import LinearRuntime, metadata_for, tiny_spec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> CircuitState:
    """The state, read through a call so that mypy does not pin it after one assert."""
    return breaker.state


def test_opens_after_consecutive_failures_and_probes_once_after_the_pause() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=1.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN
    assert not breaker.allow()
    clock.now += 0.99
    assert not breaker.allow()
    clock.now += 0.02
    assert breaker.allow()  # the probe
    assert state(breaker) is CircuitState.HALF_OPEN
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN and not breaker.allow()
    clock.now += 1.01
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) is CircuitState.CLOSED and breaker.allow()


def test_a_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=1.0, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert state(breaker) is CircuitState.CLOSED


class FlakyStore(InMemoryFeatureStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.down = True

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        self.calls += 1
        if self.down:
            raise FeatureStoreUnavailable("connection refused")
        return await super().fetch(user_id, ad_ids)


async def test_an_open_circuit_scores_on_defaults_without_calling_the_store() -> None:
    store = FlakyStore()
    metrics = Metrics(CollectorRegistry())
    model = LoadedModel.assemble(metadata_for(tiny_spec()), LinearRuntime())
    settings = Settings(breaker_failure_threshold=2, breaker_open_seconds=0.05)
    pipeline = ScoringPipeline(
        SinglePlanRouter(ServingPlan("pcvr", model)), store, metrics, settings
    )

    results = [await pipeline.score(ScoreRequest("u1", ["a1"], {})) for _ in range(5)]
    assert all(r.degraded for r in results)
    assert store.calls == 2  # the circuit opened after two failures
    state = metrics.registry.get_sample_value("adscore_feature_store_circuit_state")
    assert state == CircuitState.OPEN
    opened = metrics.registry.get_sample_value(
        "adscore_degraded_responses_total", {"reason": "circuit_open"}
    )
    assert opened == 3

    store.down = False
    await asyncio.sleep(0.06)
    recovered = await pipeline.score(ScoreRequest("u1", ["a1"], {}))
    assert not recovered.degraded and store.calls == 3
    assert metrics.registry.get_sample_value("adscore_feature_store_circuit_state") == 0
