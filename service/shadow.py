"""Shadow scoring: a second version scores the same inputs off the response's critical path.

Its probabilities are never returned; they only feed metrics (the mean |difference| to the
active version and the mean pCVR of each), so a candidate version can be judged on live
traffic before it takes any. The queue is bounded: under overload shadow work is dropped and
counted, never allowed to slow the responses down.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import numpy as np
import numpy.typing as npt

from feature_client.assembly import ModelInputs
from service.metrics import Metrics
from service.registry import LoadedModel

logger = logging.getLogger("adscore.shadow")


class ShadowScorer:
    """Runs shadow versions on one worker thread of their own, at most `max_pending` queued."""

    def __init__(self, metrics: Metrics, max_pending: int) -> None:
        self._metrics = metrics
        self._max_pending = max_pending
        self._limiter = anyio.CapacityLimiter(1)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def submit(
        self, shadow: LoadedModel, inputs: ModelInputs, active_scores: npt.NDArray[np.float64]
    ) -> None:
        if len(self._tasks) >= self._max_pending:
            self._metrics.shadow_dropped.labels(shadow.name).inc()
            return
        task = asyncio.get_running_loop().create_task(self._score(shadow, inputs, active_scores))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(
        self, shadow: LoadedModel, inputs: ModelInputs, active_scores: npt.NDArray[np.float64]
    ) -> None:
        try:
            scores = await anyio.to_thread.run_sync(shadow.score, inputs, limiter=self._limiter)
        except Exception:  # a failing shadow must never touch serving
            logger.exception("shadow version %s v%d failed", shadow.name, shadow.version)
            return
        difference = float(np.abs(scores - active_scores).mean())
        self._metrics.shadow_difference.labels(shadow.name).observe(difference)
        self._metrics.record_scores(shadow.name, shadow.version, "shadow", scores)

    async def drain(self) -> None:
        """Wait for queued shadow work (shutdown and tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
