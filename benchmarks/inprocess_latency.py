"""The in-process latency floor: the pipeline without HTTP, under Poisson arrivals.

The latency target compares adscore's p99 at 70 % of its maximum with its unloaded p50. Queueing
alone sets a floor under that ratio, whatever the server: requests that arrive at random wait
for each other. Here the same requests, from the same Redis, go through the in-process limit's
pipeline (MGET, decode, assembly, onnxruntime) on as many threads, fed from one queue at Poisson
arrival times, with no HTTP, no JSON and no event loop. Latency runs from each request's intended
arrival, as in the open-loop generator. Its p99 at 70 % of the in-process limit over its own
unloaded p50 is what this machine allows any server built on this pipeline.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np
import redis

from benchmarks.collector import collector_paused
from benchmarks.inprocess import InProcessScorer

Arrival = tuple[int, float] | None
"""A request's index and intended arrival time; None stops a thread."""


def latency_at(
    scorer: InProcessScorer,
    redis_url: str,
    *,
    rate: float,
    seconds: float,
    threads: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Poisson arrivals at `rate` per second for `seconds`, served by `threads` threads from one
    queue; percentiles from each request's intended arrival."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 1.2) + 10))
    arrivals = arrivals[arrivals < seconds]
    pending: queue.SimpleQueue[Arrival] = queue.SimpleQueue()
    latencies: list[float] = []

    def serve() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            while (arrival := pending.get()) is not None:
                index, intended = arrival
                scorer.score(client, index)
                latencies.append(time.perf_counter() - intended)
        finally:
            client.close()

    workers = [threading.Thread(target=serve, name=f"in-process-{i}") for i in range(threads)]
    with collector_paused():
        for worker in workers:
            worker.start()
        start = time.perf_counter()
        for index, offset in enumerate(arrivals):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pending.put((index, start + offset))
        for _ in workers:
            pending.put(None)
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
    return {
        "offered_per_second": rate,
        "requests": len(latencies),
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
    }


def in_process_latency(
    scorer: InProcessScorer,
    redis_url: str,
    *,
    threads: int,
    loaded_rate: float,
    seconds: float,
    unloaded_rate: float = 20.0,
) -> dict[str, Any]:
    """The unloaded point (`unloaded_rate`, at most 5 s) and the point at `loaded_rate`, and the
    ratio of the latter's p99 to the former's p50."""
    unloaded = latency_at(
        scorer, redis_url, rate=unloaded_rate, seconds=min(seconds, 5.0), threads=threads
    )
    loaded = latency_at(scorer, redis_url, rate=loaded_rate, seconds=seconds, threads=threads)
    return {
        "unloaded": unloaded,
        "loaded": loaded,
        "ratio": loaded["p99_ms"] / unloaded["p50_ms"],
    }
