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


class SlowStore(InMemoryFeatureStore):
    """A store that answers after `delay` seconds (never, for None), counting its calls."""

    def __init__(self, delay: float | None) -> None:
        super().__init__()
        self.delay = delay
        self.calls = 0

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        self.calls += 1
        if self.delay is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(self.delay)
        return await super().fetch(user_id, ad_ids)


def _slow_pipeline(
    delay: float | None, **settings: object
) -> tuple[SlowStore, ScoringPipeline, Metrics]:
    store = SlowStore(delay)
    metrics = Metrics(CollectorRegistry())
    model = LoadedModel.assemble(metadata_for(tiny_spec()), LinearRuntime())
    settings = {"breaker_failure_threshold": 2, "breaker_open_seconds": 60} | settings
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


async def _busy(start: float, seconds: float) -> None:
    """Another request's CPU work, holding the loop from `start` for `seconds`."""
    await asyncio.sleep(start)
    hold_the_loop(seconds)


async def test_timeouts_of_a_hung_store_open_the_circuit() -> None:
    store, pipeline, metrics = _slow_pipeline(None, feature_timeout_ms=20)
    for _ in range(4):
        assert (await pipeline.score(ScoreRequest("u1", ["a1"], {}))).degraded
    assert store.calls == 2
    assert _degraded(metrics, "timeout") == 2 and _degraded(metrics, "circuit_open") == 2


async def test_a_reply_the_busy_loop_could_not_read_in_time_is_still_used() -> None:
    # The store answers after 10 ms, but the loop is held from 5 to 45 ms: the 20 ms timeout
    # comes due while the reply waits unread, and looks again instead of expiring.
    store, pipeline, metrics = _slow_pipeline(0.01, feature_timeout_ms=20)
    for _ in range(3):
        result, _ = await asyncio.gather(
            pipeline.score(ScoreRequest("u1", ["a1"], {})), _busy(0.005, 0.04)
        )
        assert not result.degraded
    assert store.calls == 3 and _degraded(metrics, "timeout") == 0


async def test_a_hung_store_is_blamed_once_the_loop_keeps_up_again() -> None:
    store, pipeline, metrics = _slow_pipeline(None, feature_timeout_ms=20)
    for _ in range(4):
        result, _ = await asyncio.gather(
            pipeline.score(ScoreRequest("u1", ["a1"], {})), _busy(0.005, 0.04)
        )
        assert result.degraded
    # Looked again after the busy spell, saw a responsive loop and still no reply: a timeout.
    assert store.calls == 2
    assert _degraded(metrics, "timeout") == 2 and _degraded(metrics, "circuit_open") == 2


async def test_a_loop_busy_until_the_deadline_does_not_blame_the_store() -> None:
    store, pipeline, metrics = _slow_pipeline(None, feature_timeout_ms=20)
    for _ in range(3):
        # A 100 ms deadline: the fetch may wait 80 ms at most, and the loop is busy past that.
        result, _ = await asyncio.gather(
            pipeline.score(ScoreRequest("u1", ["a1"], {}, timeout_ms=100)), _busy(0.005, 0.08)
        )
        assert result.degraded
    assert store.calls == 3  # every request still tried the store: the circuit stayed closed
    assert _degraded(metrics, "event_loop_busy") == 3 and _degraded(metrics, "timeout") == 0


async def test_the_ticks_show_a_loop_that_was_busy_before_the_timeout_came_due() -> None:
    # Busy from 5 to 18 ms of a 20 ms budget: the timeout comes due on time, and only the
    # ticks saw the busy spell. The store answers at 25 ms, within the look that follows.
    _, pipeline, _ = _slow_pipeline(0.025, feature_timeout_ms=20)
    ticking = asyncio.create_task(pipeline.loop_lag.run(tick_seconds=0.002))
    try:
        await asyncio.sleep(0.01)  # the ticks are running
        result, _ = await asyncio.gather(
            pipeline.score(ScoreRequest("u1", ["a1"], {})), _busy(0.005, 0.013)
        )
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
    assert not result.degraded
    # Without the ticks, the same request times out.
    _, quiet, quiet_metrics = _slow_pipeline(0.025, feature_timeout_ms=20)
    result, _ = await asyncio.gather(
        quiet.score(ScoreRequest("u1", ["a1"], {})), _busy(0.005, 0.013)
    )
    assert result.degraded and _degraded(quiet_metrics, "timeout") == 1
