"""MicroBatcher: merging concurrent model calls, its bounds and its deadlines (fake runtime)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from feature_client.assembly import ModelInputs, context_blocks
from feature_client.batch_layout import PendingLayout
from feature_client.codec import EntityCodec
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from service.app import on_overload
from service.batcher import BatchingPolicy, MicroBatcher
from service.errors import DeadlineExceeded, NotReady, Overloaded
from service.metrics import Metrics
from service.scoring import ScoringPipeline
from service.settings import Settings


class FakeRuntime:
    """Returns each row's first dense value as its logit and records the calls' row counts.

    While `gate` is clear, calls block: the test decides when the inference threads are busy.
    """

    provider = "fake"

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.fail = fail

    def predict(self, inputs: ModelInputs) -> npt.NDArray[np.float32]:
        self.calls.append(len(inputs))
        self.entered.release()
        self.gate.wait(5)
        if self.fail:
            raise RuntimeError("the model broke")
        return inputs.dense[:, 0].copy()


def rows(first: float, count: int) -> ModelInputs:
    dense = np.arange(first, first + count, dtype=np.float32).reshape(count, 1)
    return ModelInputs(dense, np.zeros((count, 1), dtype=np.int64))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def batcher(metrics: Metrics, threads: int = 1, **policy: int) -> MicroBatcher:
    return MicroBatcher(threads, BatchingPolicy(**policy), metrics.batching())


async def occupy(runtime: FakeRuntime, engine: MicroBatcher) -> asyncio.Task[object]:
    """A call that holds the (only) inference thread until runtime.gate is set."""
    runtime.gate.clear()
    task = asyncio.ensure_future(engine.predict(runtime, rows(-1, 1)))
    await asyncio.to_thread(runtime.entered.acquire)
    return task


@pytest.fixture
def runtime() -> Iterator[FakeRuntime]:
    fake = FakeRuntime()
    yield fake
    fake.gate.set()  # never leave a thread blocked


def test_requests_waiting_for_a_busy_thread_share_one_call(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> list[npt.NDArray[np.float32]]:
        engine = batcher(metrics, max_batch_rows=64)
        busy = await occupy(runtime, engine)
        waiting = [
            asyncio.ensure_future(engine.predict(runtime, rows(10 * i, 3))) for i in range(4)
        ]
        await asyncio.sleep(0.01)
        assert engine.queued_rows == 12
        runtime.gate.set()
        await busy
        results = await asyncio.gather(*waiting)
        engine.close()
        return results

    results = asyncio.run(scenario())
    assert runtime.calls == [1, 12]
    for i, logits in enumerate(results):  # each request gets its own rows back, in order
        np.testing.assert_array_equal(logits, [10 * i, 10 * i + 1, 10 * i + 2])
    assert sample(metrics, "adscore_batch_requests_sum") == 5
    assert sample(metrics, "adscore_batch_rows_sum") == 13
    assert sample(metrics, "adscore_queued_rows") == 0


class CountingCalibration:
    """p = logit * scale, counting the calls and the rows each got."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.calls: list[int] = []

    def apply(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        self.calls.append(len(logits))
        return logits.astype(np.float64) * self.scale


def test_a_shared_calibration_runs_once_per_batch_and_each_request_gets_its_rows(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    shared, other = CountingCalibration(2.0), CountingCalibration(-1.0)
    mixed_runtime = FakeRuntime()  # a fresh one: its `entered` count starts at zero

    async def scenario() -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]]:
        engine = batcher(metrics, max_batch_rows=64)
        busy = await occupy(runtime, engine)
        calibrated = [
            asyncio.ensure_future(engine.predict_calibrated(runtime, shared.apply, rows(10 * i, 3)))
            for i in range(3)
        ]
        await asyncio.sleep(0.01)
        runtime.gate.set()
        await busy
        results = await asyncio.gather(*calibrated)
        # Another calibration in the same batch: each request is calibrated with its own.
        busy = await occupy(mixed_runtime, engine)
        first = asyncio.ensure_future(
            engine.predict_calibrated(mixed_runtime, shared.apply, rows(0, 2))
        )
        second = asyncio.ensure_future(
            engine.predict_calibrated(mixed_runtime, other.apply, rows(5, 2))
        )
        uncalibrated = asyncio.ensure_future(engine.predict(mixed_runtime, rows(9, 1)))
        await asyncio.sleep(0.01)
        mixed_runtime.gate.set()
        await busy
        (_, a), (_, b), plain = await first, await second, await uncalibrated
        engine.close()
        np.testing.assert_array_equal(a, [0, 2])
        np.testing.assert_array_equal(b, [-5, -6])
        np.testing.assert_array_equal(plain, [9])
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        mixed_runtime.gate.set()
    assert runtime.calls == [1, 9] and mixed_runtime.calls == [1, 5]
    assert shared.calls == [9, 2] and other.calls == [2]  # the batch of 9 rows: one call
    for i, (logits, probabilities) in enumerate(results):
        np.testing.assert_array_equal(logits, [10 * i, 10 * i + 1, 10 * i + 2])
        np.testing.assert_array_equal(probabilities, 2.0 * logits)


LAYOUT_SPEC = FeatureSpec(
    schema_version=1,
    features=(
        DenseFeature("user_activity", "user", default=0.5),
        DenseFeature("ad_price", "ad", default=-1.0),
        CategoricalFeature("ad_id", "ad", hash_buckets=64),
        DenseFeature("hour", "context", default=9.0),
    ),
)


def pending(user_activity: float, ad_prices: list[float | None]) -> PendingLayout:
    """A request whose logits (the FakeRuntime's first dense column) are its user's activity."""
    users, ads = EntityCodec(LAYOUT_SPEC, "user"), EntityCodec(LAYOUT_SPEC, "ad")
    (user,) = users.encode(np.array([[user_activity]], np.float32), np.zeros((1, 0), np.int32))
    stored = ads.encode(
        np.array([[p or 0.0] for p in ad_prices], np.float32),
        np.ones((len(ad_prices), 1), np.int32),
    )
    values: list[bytes | None] = [
        None if price is None else value for value, price in zip(stored, ad_prices, strict=True)
    ]
    return PendingLayout(users, ads, user, values, context_blocks(LAYOUT_SPEC, {"hour": 3}))


def test_pending_layouts_are_laid_out_together_on_the_thread_beside_ready_inputs(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    calibration = CountingCalibration(2.0)

    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=64)
        busy = await occupy(runtime, engine)
        first = asyncio.ensure_future(
            engine.score_layout(runtime, calibration.apply, pending(0.25, [1.0, 2.0, None]))
        )
        # Inputs already laid out (an OIP request) of the same width, in the same batch.
        laid_out = ModelInputs(
            np.array([[7, 0, 0], [8, 0, 0]], np.float32), np.zeros((2, 1), np.int64)
        )
        ready = asyncio.ensure_future(
            engine.predict_calibrated(runtime, calibration.apply, laid_out)
        )
        second = asyncio.ensure_future(
            engine.score_layout(runtime, calibration.apply, pending(0.75, [3.0]))
        )
        await asyncio.sleep(0.01)
        assert engine.queued_rows == 6  # a pending layout counts its candidates as rows
        runtime.gate.set()
        await busy
        (p1, laid1), (_, p_ready), (p2, laid2) = await asyncio.gather(first, ready, second)
        engine.close()
        np.testing.assert_array_equal(p1, [0.5, 0.5, 0.5])
        np.testing.assert_array_equal(p_ready, [14, 16])
        np.testing.assert_array_equal(p2, [1.5])
        # Each request's own rows: user, ad price (the default where the ad is missing), hour.
        np.testing.assert_array_equal(
            laid1.inputs.dense, [[0.25, 1.0, 3.0], [0.25, 2.0, 3.0], [0.25, -1.0, 3.0]]
        )
        np.testing.assert_array_equal(laid2.inputs.dense, [[0.75, 3.0, 3.0]])
        assert laid1.missing_ads == 1 and laid1.ads_found.tolist() == [True, True, False]
        assert laid2.missing_ads == 0 and laid2.user_found

    asyncio.run(scenario())
    assert runtime.calls == [1, 6]  # one model call for the three requests
    assert calibration.calls == [6]


def test_batches_stop_at_max_batch_rows_and_a_larger_request_runs_alone(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=8)
        busy = await occupy(runtime, engine)
        sizes = [3, 3, 3, 20, 2]
        waiting = [asyncio.ensure_future(engine.predict(runtime, rows(0, n))) for n in sizes]
        await asyncio.sleep(0.01)
        runtime.gate.set()
        await busy
        for size, logits in zip(sizes, await asyncio.gather(*waiting), strict=True):
            assert len(logits) == size
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [1, 6, 3, 20, 2]


def test_max_batch_rows_one_turns_batching_off(runtime: FakeRuntime, metrics: Metrics) -> None:
    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=1)
        busy = await occupy(runtime, engine)
        waiting = [asyncio.ensure_future(engine.predict(runtime, rows(0, 4))) for _ in range(3)]
        await asyncio.sleep(0.01)
        runtime.gate.set()
        await asyncio.gather(busy, *waiting)
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [1, 4, 4, 4]


def test_a_delay_holds_a_small_batch_for_more_requests(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> float:
        engine = batcher(metrics, threads=2, max_batch_rows=64, max_delay_us=50_000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(engine.predict(runtime, rows(0, 2)))
        await asyncio.sleep(0.01)  # both threads are idle, yet the first request waits
        assert runtime.calls == []
        second = asyncio.ensure_future(engine.predict(runtime, rows(5, 2)))
        await asyncio.gather(first, second)
        engine.close()
        return loop.time() - started

    elapsed = asyncio.run(scenario())
    assert runtime.calls == [4]
    assert elapsed >= 0.05


def test_a_full_batch_leaves_before_its_delay(runtime: FakeRuntime, metrics: Metrics) -> None:
    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=4, max_delay_us=10_000_000)
        await asyncio.wait_for(
            asyncio.gather(*(engine.predict(runtime, rows(0, 2)) for _ in range(2))), 2
        )
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [4]


def test_without_delay_a_lone_request_does_not_wait(runtime: FakeRuntime, metrics: Metrics) -> None:
    async def scenario() -> None:
        engine = batcher(metrics)
        await asyncio.wait_for(engine.predict(runtime, rows(0, 2)), 2)
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [2]


def test_requests_for_different_models_are_never_merged(metrics: Metrics) -> None:
    first, second = FakeRuntime(), FakeRuntime()

    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=64)
        busy = await occupy(first, engine)
        waiting = [
            asyncio.ensure_future(engine.predict(runtime, rows(0, 2)))
            for runtime in (second, first, second, first)
        ]
        await asyncio.sleep(0.01)
        first.gate.set()
        await asyncio.gather(busy, *waiting)
        engine.close()

    asyncio.run(scenario())
    assert first.calls == [1, 4] and second.calls == [4]


def test_rows_beyond_the_queue_bound_are_shed_at_once(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=64, max_queued_rows=10)
        busy = await occupy(runtime, engine)
        queued = asyncio.ensure_future(engine.predict(runtime, rows(0, 8)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match=r"8 candidate rows are waiting.*adds 3.*limit is 10"):
            await engine.predict(runtime, rows(0, 3))
        runtime.gate.set()
        await asyncio.gather(busy, queued)
        # Alone in the queue, a request larger than the bound still runs.
        assert len(await engine.predict(runtime, rows(0, 30))) == 30
        engine.close()

    asyncio.run(scenario())
    assert sample(metrics, "adscore_shed_requests_total", reason="queued_rows") == 1


def test_a_request_past_its_deadline_is_refused_not_scored(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> None:
        engine = batcher(metrics)
        busy = await occupy(runtime, engine)
        deadline = asyncio.get_running_loop().time() + 0.02
        late = asyncio.ensure_future(engine.predict(runtime, rows(0, 5), deadline))
        in_time = asyncio.ensure_future(engine.predict(runtime, rows(0, 2), deadline + 10))
        await asyncio.sleep(0.05)
        runtime.gate.set()
        await busy
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await late
        assert len(await in_time) == 2
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [1, 2]
    assert sample(metrics, "adscore_shed_requests_total", reason="deadline") == 1


def test_a_cancelled_request_leaves_the_queue(runtime: FakeRuntime, metrics: Metrics) -> None:
    async def scenario() -> None:
        engine = batcher(metrics)
        busy = await occupy(runtime, engine)
        gone = asyncio.ensure_future(engine.predict(runtime, rows(0, 7)))
        await asyncio.sleep(0)
        assert engine.queued_rows == 7
        gone.cancel()
        await asyncio.sleep(0)
        assert engine.queued_rows == 0
        runtime.gate.set()
        await busy
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [1]


def test_a_failing_call_fails_its_batch_and_the_next_batch_still_runs(metrics: Metrics) -> None:
    broken = FakeRuntime(fail=True)
    healthy = FakeRuntime()

    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=64)
        busy = await occupy(broken, engine)
        failing = [asyncio.ensure_future(engine.predict(broken, rows(0, 2))) for _ in range(2)]
        after = asyncio.ensure_future(engine.predict(healthy, rows(3, 1)))
        await asyncio.sleep(0.01)
        broken.gate.set()
        for task in (busy, *failing):
            with pytest.raises(RuntimeError, match="the model broke"):
                await task
        np.testing.assert_array_equal(await after, [3])
        engine.close()

    asyncio.run(scenario())
    assert broken.calls == [1, 4]


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="invalid batching policy"):
        BatchingPolicy(max_batch_rows=0)


def test_a_delay_never_makes_a_request_miss_its_deadline(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=64, max_delay_us=5_000_000)
        deadline = asyncio.get_running_loop().time() + 0.05
        logits = await asyncio.wait_for(engine.predict(runtime, rows(0, 2), deadline), 2)
        assert len(logits) == 2
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [2]


def test_a_free_thread_starts_the_next_batch_while_the_event_loop_is_busy(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> None:
        engine = batcher(metrics)
        busy = await occupy(runtime, engine)
        queued = asyncio.ensure_future(engine.predict(runtime, rows(0, 3)))
        await asyncio.sleep(0)
        runtime.gate.set()
        # The loop is blocked here, as under load: the thread must take the queued request
        # by itself rather than wait for the loop to hand it over.
        started_without_the_loop = runtime.entered.acquire(timeout=5)
        assert started_without_the_loop
        await asyncio.gather(busy, queued)
        np.testing.assert_array_equal(queued.result(), [0, 1, 2])
        engine.close()

    asyncio.run(scenario())
    assert runtime.calls == [1, 3]


class NamingRuntime(FakeRuntime):
    """Records which inference thread ran each call, each call taking a little while."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def predict(self, inputs: ModelInputs) -> npt.NDArray[np.float32]:
        self.threads.append(threading.current_thread().name)
        threading.Event().wait(0.005)  # long enough for the other thread to be free to take one
        return super().predict(inputs)


def test_fewer_threads_take_batches_until_the_count_rises_again(metrics: Metrics) -> None:
    runtime = NamingRuntime()

    async def calls(engine: MicroBatcher, count: int) -> None:
        # One request at a time with batching off: every call goes to a free thread.
        await asyncio.gather(*(engine.predict(runtime, rows(i, 1)) for i in range(count)))

    async def scenario() -> None:
        engine = batcher(metrics, threads=2, max_batch_rows=1)
        engine.use_threads(1)
        assert engine.active_threads == 1
        await calls(engine, 20)
        assert set(runtime.threads) == {"inference_0"}  # the other waited, idle
        runtime.threads.clear()
        engine.use_threads(5)  # at most every thread
        assert engine.active_threads == 2
        await calls(engine, 20)
        assert set(runtime.threads) == {"inference_0", "inference_1"}
        engine.use_threads(0)  # at least one
        assert engine.active_threads == 1
        await calls(engine, 4)  # and it still serves
        engine.close()

    asyncio.run(scenario())


def test_sustained_overload_leaves_overload_inference_threads_taking_batches(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    engine = batcher(metrics, threads=2)
    pipeline = cast(ScoringPipeline, SimpleNamespace(batcher=engine))
    settings = Settings(inference_threads=2, overload_inference_threads=1)
    with caplog.at_level(logging.INFO, logger="adscore"):
        on_overload(pipeline, settings, True)
        assert engine.active_threads == 1
        on_overload(pipeline, settings, False)
        assert engine.active_threads == 2
    assert "sustained overload: 1 of 2 inference threads take batches" in caplog.text
    on_overload(pipeline, Settings(inference_threads=2), True)
    assert engine.active_threads == 2  # the default keeps them all
    engine.close()


def test_closing_refuses_the_queued_requests_and_stops_the_threads(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> None:
        engine = batcher(metrics, threads=2)
        first = await occupy(runtime, engine)
        second = asyncio.ensure_future(engine.predict(runtime, rows(0, 1)))
        await asyncio.to_thread(runtime.entered.acquire)  # both threads busy now
        queued = asyncio.ensure_future(engine.predict(runtime, rows(0, 4)))
        await asyncio.sleep(0)
        engine.close()
        with pytest.raises(NotReady, match="shutting down"):
            await queued
        with pytest.raises(NotReady, match="shutting down"):
            await engine.predict(runtime, rows(0, 1))
        runtime.gate.set()  # the calls running at close still answer
        await first
        assert len(await second) == 1
        for thread in engine.threads:
            thread.join(timeout=5)
            assert not thread.is_alive()

    asyncio.run(scenario())
    assert runtime.calls == [1, 1]
    assert sample(metrics, "adscore_queued_rows") == 0


def test_a_batch_that_cannot_be_assembled_fails_its_requests_not_the_thread(
    runtime: FakeRuntime, metrics: Metrics
) -> None:
    async def scenario() -> None:
        engine = batcher(metrics, max_batch_rows=64)
        busy = await occupy(runtime, engine)
        narrow = asyncio.ensure_future(engine.predict(runtime, rows(0, 2)))
        wide_rows = ModelInputs(np.zeros((2, 3), np.float32), np.zeros((2, 1), np.int64))
        wide = asyncio.ensure_future(engine.predict(runtime, wide_rows))
        await asyncio.sleep(0.01)
        runtime.gate.set()
        await busy
        for task in (narrow, wide):  # merged into one batch that numpy cannot concatenate
            with pytest.raises(ValueError):
                await task
        np.testing.assert_array_equal(await engine.predict(runtime, rows(5, 1)), [5])
        engine.close()

    asyncio.run(scenario())


def test_a_batcher_dropped_without_close_stops_its_threads(metrics: Metrics) -> None:
    engine = batcher(metrics, threads=2)
    threads = engine.threads
    assert all(thread.is_alive() for thread in threads)
    del engine
    gc.collect()
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_a_batcher_needs_a_thread(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="at least one inference thread"):
        batcher(metrics, threads=0)
