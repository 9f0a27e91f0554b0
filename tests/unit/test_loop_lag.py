"""The event loop's lateness, measured by a periodic tick."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import CollectorRegistry

from service.loop_lag import LoopLag
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
