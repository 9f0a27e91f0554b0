"""The in-process limit: feature fetch from the real Redis + input assembly + onnxruntime.

No HTTP, no JSON: the same requests as the services get, on the same number of threads as
adscore's inference threads (onnxruntime and redis-py's socket reads release the GIL), in as
many processes as adscore has workers. adscore over HTTP is judged against this.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import redis

from benchmarks.collector import collector_paused
from benchmarks.population import ScoreCall
from feature_client.assembly import assemble_inputs, context_blocks
from feature_client.store import KeyLayout
from service.registry import load_version
from service.repository import ModelRepository
from service.settings import Settings


class InProcessScorer:
    """The harness's requests scored without HTTP: MGET, decode, assembly, onnxruntime."""

    def __init__(
        self,
        repository: Path,
        model_name: str,
        calls: Sequence[ScoreCall],
        contexts: Sequence[dict[str, str | int | float]],
    ) -> None:
        repo = ModelRepository(repository)
        self._model = load_version(repo, model_name, repo.active_version(model_name), Settings())
        keys = KeyLayout("adscore")
        self._keys = [[keys.user(c.user_id), *(keys.ad(a) for a in c.ad_ids)] for c in calls]
        self._contexts = [context_blocks(self._model.spec, c) for c in contexts]

    def score(self, client: redis.Redis, index: int) -> int:
        """Score request `index` (modulo the requests) with `client`; its candidates."""
        model = self._model
        values: list[bytes | None] = client.mget(self._keys[index % len(self._keys)])  # type: ignore[assignment]
        n = len(values) - 1
        user = model.user_codec.decode(values[:1])
        ads = model.ad_codec.decode(values[1:])
        context_dense, context_ids = self._contexts[index % len(self._contexts)]
        inputs = assemble_inputs(
            n, [user.dense, ads.dense, context_dense], [user.ids, ads.ids, context_ids]
        )
        model.score(inputs)
        return n


def _measure(
    repository: Path,
    model_name: str,
    redis_url: str,
    calls: Sequence[ScoreCall],
    contexts: Sequence[dict[str, str | int | float]],
    *,
    threads: int,
    seconds: float,
    start_at: float | None = None,
) -> dict[str, float]:
    """One process's rates and CPU over `seconds` (from the wall-clock time `start_at`, when
    given, so that several processes measure together)."""
    scorer = InProcessScorer(repository, model_name, calls, contexts)
    done = [0] * threads
    candidates = [0] * threads
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    deadline = time.perf_counter() + seconds

    def worker(index: int) -> None:
        client = redis.Redis.from_url(redis_url)
        i = index
        while time.perf_counter() < deadline:
            candidates[index] += scorer.score(client, i)
            done[index] += 1
            i += threads
        client.close()

    # As adscore after start-up (gc.freeze), no full collection over the harness's objects
    # stalls the threads mid-measurement.
    with collector_paused():
        cpu = time.process_time()
        started = time.perf_counter()
        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu
    return {
        "requests_per_second": sum(done) / elapsed,
        "candidates_per_second": sum(candidates) / elapsed,
        "cpu_ms_per_request": cpu_seconds / max(1, sum(done)) * 1000,
        "requests": sum(done),
        "cpu_seconds": cpu_seconds,
    }


def in_process_limit(
    repository: Path,
    model_name: str,
    redis_url: str,
    calls: Sequence[ScoreCall],
    contexts: Sequence[dict[str, str | int | float]],
    *,
    threads: int,
    seconds: float,
    processes: int = 1,
) -> dict[str, Any]:
    """Candidates and requests per second, and CPU per request, over `seconds`, in `processes`
    processes at once (as adscore's workers) of `threads` threads each, summed."""
    measure = partial(_measure, repository, model_name, redis_url, threads=threads, seconds=seconds)
    if processes == 1:
        parts = [measure(calls, contexts)]
    else:
        start_at = time.time() + 5.0  # every process has loaded its model by then
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            futures = [
                pool.submit(measure, calls[i::processes], contexts[i::processes], start_at=start_at)
                for i in range(processes)
            ]
            parts = [f.result() for f in futures]
    requests = sum(p["requests"] for p in parts)
    cpu_seconds = sum(p["cpu_seconds"] for p in parts)
    return {
        "requests_per_second": sum(p["requests_per_second"] for p in parts),
        "candidates_per_second": sum(p["candidates_per_second"] for p in parts),
        "cpu_ms_per_request": cpu_seconds / max(1, requests) * 1000,
        "requests": requests,
        "cpu_seconds": cpu_seconds,
        "requests_per_process": [p["requests"] for p in parts],
    }
