"""The feature store's circuit breaker, on a fake clock, and in the scoring pipeline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest
from prometheus_client import CollectorRegistry

from feature_client.memory_store import InMemoryFeatureStore
from feature_client.store import FeatureStoreUnavailable, RawFeatures
from service import loop_lag
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
    breaker.record_inconclusive(probe=False)  # a call allowed before the circuit opened
    assert not breaker.allow()  # ...still runs alone
    breaker.record_inconclusive(probe=True)  # the probe was cancelled, or its loop too busy
    assert state(breaker) is CircuitState.HALF_OPEN
    assert breaker.allow()  # another request probes instead of the circuit staying stuck
    breaker.record_success()
    assert state(breaker) is CircuitState.CLOSED


class SlowStore(InMemoryFeatureStore):
    """A store that answers after `delay` seconds, never for users in `hung`, and counts its
    calls."""

    def __init__(self, delay: float, hung: frozenset[str] = frozenset({"hung"})) -> None:
        super().__init__()
        self.delay = delay
        self.hung = hung
        self.calls = 0

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        self.calls += 1
        if user_id in self.hung:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        return await super().fetch(user_id, ad_ids)


def _slow_pipeline(delay: float, **settings: object) -> tuple[SlowStore, ScoringPipeline, Metrics]:
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


@contextlib.asynccontextmanager
async def _ticking(pipeline: ScoringPipeline) -> AsyncIterator[None]:
    ticks = asyncio.create_task(pipeline.loop_lag.run(tick_seconds=0.002))
    await asyncio.sleep(0.01)  # a few ticks in
    try:
        yield
    finally:
        ticks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticks


async def test_timeouts_of_a_hung_store_open_the_circuit() -> None:
    store, pipeline, metrics = _slow_pipeline(0.0, feature_timeout_ms=20)
    for _ in range(4):
        assert (await pipeline.score(ScoreRequest("hung", ["a1"], {}))).degraded
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


async def test_a_hung_store_is_blamed_even_while_the_loop_is_busy() -> None:
    store, pipeline, metrics = _slow_pipeline(0.0, feature_timeout_ms=20)
    for _ in range(4):
        result, _ = await asyncio.gather(
            pipeline.score(ScoreRequest("hung", ["a1"], {})), _busy(0.005, 0.04)
        )
        assert result.degraded
    # One more look after the busy spell, and the store had answered nothing: a timeout.
    assert store.calls == 2
    assert _degraded(metrics, "timeout") == 2 and _degraded(metrics, "circuit_open") == 2


async def test_a_loop_busy_to_the_end_while_the_store_answers_others_blames_nobody() -> None:
    store, pipeline, metrics = _slow_pipeline(0.0, feature_timeout_ms=30)
    async with _ticking(pipeline):
        stop = asyncio.Event()

        async def other_requests() -> None:
            # Requests the store answers, each followed by 10 ms of the loop held.
            while not stop.is_set():
                assert not (await pipeline.score(ScoreRequest("u1", ["a1"], {}))).degraded
                hold_the_loop(0.01)

        others = [asyncio.create_task(other_requests()) for _ in range(3)]
        try:
            for _ in range(3):
                # A 300 ms deadline leaves time to score after the 90 ms of patience.
                result = await pipeline.score(ScoreRequest("hung", ["a1"], {}, timeout_ms=300))
                assert result.degraded
        finally:
            stop.set()
            await asyncio.gather(*others)
    # Three budgets' patience each, then given up on without blaming the store.
    assert _degraded(metrics, "event_loop_busy") == 3 and _degraded(metrics, "timeout") == 0
    assert _degraded(metrics, "circuit_open") == 0 and store.calls > 6


async def test_the_ticks_show_a_loop_that_was_busy_before_the_timeout_came_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Busy from 5 to 20 ms of a 25 ms budget: the timeout comes due on time, and only the
    # ticks saw the busy spell. The store answers at 30 ms, within the look that follows.
    monkeypatch.setattr(loop_lag, "BUSY_SECONDS", 0.008)  # far above a slow machine's jitter
    _, pipeline, _ = _slow_pipeline(0.03, feature_timeout_ms=25)
    async with _ticking(pipeline):
        result, _ = await asyncio.gather(
            pipeline.score(ScoreRequest("u1", ["a1"], {})), _busy(0.005, 0.015)
        )
    assert not result.degraded
    # Without the ticks, the same request times out.
    _, quiet, quiet_metrics = _slow_pipeline(0.03, feature_timeout_ms=25)
    result, _ = await asyncio.gather(
        quiet.score(ScoreRequest("u1", ["a1"], {})), _busy(0.005, 0.015)
    )
    assert result.degraded and _degraded(quiet_metrics, "timeout") == 1


class TimingOutStore(InMemoryFeatureStore):
    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        hold_the_loop(0.03)  # however busy the loop was...
        raise TimeoutError("the client's own socket timeout")


async def test_a_timeout_raised_by_the_store_itself_is_a_store_failure() -> None:
    metrics = Metrics(CollectorRegistry())
    model = LoadedModel.assemble(metadata_for(tiny_spec()), LinearRuntime())
    settings = Settings(breaker_failure_threshold=1, feature_timeout_ms=20)
    pipeline = ScoringPipeline(
        SinglePlanRouter(ServingPlan("pcvr", model)), TimingOutStore(), metrics, settings
    )
    assert (await pipeline.score(ScoreRequest("u1", ["a1"], {}))).degraded
    assert _degraded(metrics, "timeout") == 1
    assert metrics.registry.get_sample_value("adscore_feature_store_circuit_state") == 1


async def test_a_cancelled_probe_lets_the_next_request_probe() -> None:
    store, pipeline, metrics = _slow_pipeline(
        0.0, breaker_failure_threshold=1, breaker_open_seconds=0.01, feature_timeout_ms=20
    )
    assert (await pipeline.score(ScoreRequest("hung", ["a1"], {}))).degraded  # opens it
    await asyncio.sleep(0.02)
    probe = asyncio.create_task(pipeline.score(ScoreRequest("hung", ["a1"], {})))
    await asyncio.sleep(0.005)
    probe.cancel()  # its client went away mid-fetch
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    result = await pipeline.score(ScoreRequest("u1", ["a1"], {}))
    assert not result.degraded  # it was allowed to probe, and closed the circuit
    assert store.calls == 3
    assert metrics.registry.get_sample_value("adscore_feature_store_circuit_state") == 0


async def test_a_probe_waits_out_a_busy_loop_though_no_other_fetch_runs_beside_it() -> None:
    # The store answers after 50 ms, past two 20 ms budgets, while the loop stays busy. The
    # probe has no other replies to go by, and must not reopen the circuit for that.
    store, pipeline, metrics = _slow_pipeline(
        0.05, breaker_failure_threshold=1, breaker_open_seconds=0.01, feature_timeout_ms=20
    )
    assert (await pipeline.score(ScoreRequest("hung", ["a1"], {}))).degraded  # opens it
    await asyncio.sleep(0.02)
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            hold_the_loop(0.01)
            await asyncio.sleep(0)

    async with _ticking(pipeline):
        holding = asyncio.create_task(busy())
        probe = await pipeline.score(ScoreRequest("u1", ["a1"], {}, timeout_ms=300))
        stop.set()
        await holding
    assert not probe.degraded
    assert metrics.registry.get_sample_value("adscore_feature_store_circuit_state") == 0
    assert store.calls == 2
