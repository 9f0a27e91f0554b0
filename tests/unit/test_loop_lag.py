"""The event loop's lateness, measured by a periodic tick."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import CollectorRegistry

from service.loop_lag import LoopLag, PatientTimeout
from service.metrics import Metrics
from tests.fixtures import hold_the_loop


def test_worst_since_looks_only_at_ticks_from_then_on() -> None:
    lag = LoopLag()
    for observed_at, late_by in ((1.0, 0.050), (2.0, 0.002), (3.0, 0.010), (4.0, 0.001)):
        lag.record(observed_at, late_by)
    assert lag.worst_since(0.0, now=4.0) == 0.050
    assert lag.worst_since(1.5, now=4.0) == 0.010
    assert lag.worst_since(3.5, now=4.0) == 0.001
    assert lag.worst_since(5.0, now=6.0) == 0.0  # no tick yet: nothing says the loop was busy
    # A tick late by 10 ms, observed 2 ms after `since`: only those 2 ms were busy since then.
    assert lag.worst_since(2.998, now=4.0) == pytest.approx(0.002)


async def test_a_tick_overdue_now_counts_as_busy_while_ticking() -> None:
    lag = LoopLag()
    ticking = asyncio.create_task(lag.run(tick_seconds=0.005))
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(0.02)
        since = loop.time()
        hold_the_loop(0.03)  # the next tick cannot run before this returns
        assert lag.worst_since(since, loop.time()) >= 0.02
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking


async def test_a_blocked_loop_shows_in_the_ticks_and_the_histogram() -> None:
    metrics = Metrics(CollectorRegistry())
    lag = LoopLag(metrics.event_loop_lag)
    ticking = asyncio.create_task(lag.run(tick_seconds=0.005))
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(0.05)
        quiet = lag.worst_since(0.0, loop.time())
        blocked_at = loop.time()
        hold_the_loop(0.06)
        await asyncio.sleep(0.02)
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
    assert quiet < 0.03
    assert lag.worst_since(blocked_at, loop.time()) >= 0.05
    count = metrics.registry.get_sample_value("adscore_event_loop_lag_seconds_count")
    late = metrics.registry.get_sample_value(
        "adscore_event_loop_lag_seconds_bucket", {"le": "0.05"}
    )
    assert count is not None and late is not None and count - late >= 1  # one tick above 50 ms


def _timeout(budget: float = 0.02) -> PatientTimeout:
    return PatientTimeout(LoopLag(), budget, budget, lambda: float("-inf"))


async def test_a_patient_timeout_on_an_idle_loop_expires_with_timeout_error() -> None:
    timeout = _timeout()
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        async with timeout:
            await asyncio.sleep(1)
    assert timeout.expired and not timeout.loop_was_busy
    assert asyncio.get_running_loop().time() - started < 0.5
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # its cancellation taken back


async def test_a_body_done_in_time_is_not_cancelled_later() -> None:
    timeout = _timeout(0.01)
    async with timeout:
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)  # past the budget: the look was cancelled with the exit
    assert not timeout.expired


async def test_the_bodys_own_timeout_error_is_not_an_expiry() -> None:
    timeout = _timeout()
    with pytest.raises(TimeoutError, match="the body's own"):
        async with timeout:
            raise TimeoutError("the body's own")
    assert not timeout.expired


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    entered = asyncio.Event()

    async def fetch() -> None:
        async with _timeout(5.0):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(fetch())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_from_outside_at_expiry_stays_a_cancellation() -> None:
    # Both in the same loop iteration: the caller went away as the timeout expired.
    timeout = _timeout(0.01)
    entered = asyncio.Event()

    async def fetch() -> None:
        async with timeout:
            entered.set()
            hold_the_loop(0.02)  # the look comes due meanwhile
            await asyncio.sleep(10)

    task = asyncio.create_task(fetch())
    await entered.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_patient_timeout_needs_a_task() -> None:
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[str] = loop.create_future()

    def enter() -> None:  # a plain callback on the loop: no task to cancel
        coroutine = _timeout().__aenter__()
        try:
            coroutine.send(None)
        except RuntimeError as exc:
            refused.set_result(str(exc))
        finally:
            coroutine.close()

    loop.call_soon(enter)
    assert "inside a task" in await refused
