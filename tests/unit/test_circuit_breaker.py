"""The feature store's circuit breaker, on a fake clock, and in the scoring pipeline."""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.fixtures import LinearRuntime, hold_the_loop, metadata_for, tiny_spec


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


def test_an_inconclusive_probe_lets_the_next_request_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.01
    assert breaker.allow()  # the probe...
    breaker.record_inconclusive()  # ...was cancelled, or its loop too busy to tell
    assert state(breaker) is CircuitState.HALF_OPEN
    assert breaker.allow()  # another request probes instead of the circuit staying stuck
    breaker.record_success()
    assert state(breaker) is CircuitState.CLOSED


class HungStore(InMemoryFeatureStore):
    """A store that never answers in time, whose calls can be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        self.calls += 1
        await asyncio.sleep(10)
        raise AssertionError("unreachable: the fetch times out first")


def _hung_pipeline(**settings: object) -> tuple[HungStore, ScoringPipeline, Metrics]:
    store = HungStore()
    metrics = Metrics(CollectorRegistry())
    model = LoadedModel.assemble(metadata_for(tiny_spec()), LinearRuntime())
    pipeline = ScoringPipeline(
        SinglePlanRouter(ServingPlan("pcvr", model)),
        store,
        metrics,
        Settings(**settings),  # type: ignore[arg-type]
    )
    return store, pipeline, metrics


def _degraded(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "adscore_degraded_responses_total", {"reason": reason}
    )
    return 0.0 if value is None else value


async def test_timeouts_of_a_hung_store_open_the_circuit() -> None:
    store, pipeline, metrics = _hung_pipeline(
        breaker_failure_threshold=2, feature_timeout_ms=20, breaker_open_seconds=60
    )
    for _ in range(4):
        assert (await pipeline.score(ScoreRequest("u1", ["a1"], {}))).degraded
    assert store.calls == 2
    assert _degraded(metrics, "timeout") == 2 and _degraded(metrics, "circuit_open") == 2


async def test_timeouts_while_the_event_loop_was_busy_do_not_open_the_circuit() -> None:
    store, pipeline, metrics = _hung_pipeline(
        breaker_failure_threshold=2, feature_timeout_ms=20, breaker_open_seconds=60
    )

    async def busy_loop() -> None:
        # Another request's work holds the loop past the fetch's due time.
        await asyncio.sleep(0.005)
        hold_the_loop(0.04)

    for _ in range(4):
        result, _ = await asyncio.gather(
            pipeline.score(ScoreRequest("u1", ["a1"], {})), busy_loop()
        )
        assert result.degraded
    assert store.calls == 4  # every request still tried the store: the circuit stayed closed
    assert _degraded(metrics, "event_loop_busy") == 4 and _degraded(metrics, "timeout") == 0


async def test_a_loop_busy_earlier_in_the_fetch_does_not_blame_the_store_either() -> None:
    store, pipeline, metrics = _hung_pipeline(
        breaker_failure_threshold=2, feature_timeout_ms=40, breaker_open_seconds=60
    )
    ticking = asyncio.create_task(pipeline.loop_lag.run(tick_seconds=0.005))

    async def busy_then_idle() -> None:
        # Busy from 5 to 25 ms into a 40 ms fetch: its timeout then fires on time, and only
        # the ticks saw that a reply could have waited unread.
        await asyncio.sleep(0.005)
        hold_the_loop(0.02)

    try:
        for _ in range(3):
            result, _ = await asyncio.gather(
                pipeline.score(ScoreRequest("u1", ["a1"], {})), busy_then_idle()
            )
            assert result.degraded
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
    assert store.calls == 3
    assert _degraded(metrics, "event_loop_busy") == 3 and _degraded(metrics, "timeout") == 0
