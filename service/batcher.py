"""Dynamic micro-batching: the model calls of concurrent requests merged into one.

A model call has a fixed cost (graph dispatch, thread hand-offs: ~80 µs on a CPU core) beside
its cost per row, so small requests scored one by one spend much of their time on overhead.
Requests queue here, counted in rows against a bound. Whenever an inference thread is free,
the oldest request and the requests for the same model behind it, up to `max_batch_rows`,
become one onnxruntime call, and each request gets its slice of the output.

With `max_delay_us` = 0 nothing waits: a batch leaves as soon as a thread is free, so an idle
service adds no latency and batches grow by themselves under load. A positive delay holds a
batch smaller than `max_batch_rows` until its oldest request has waited that long: larger
batches at moderate load, for at most that much latency. `max_batch_rows` = 1 turns batching
off (one call per request) through the same code.

Everything but the model call runs on the event loop, so the queue needs no lock.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge, Histogram

from feature_client.assembly import ModelInputs, concatenate_inputs
from service.errors import DeadlineExceeded, NotReady, Overloaded
from service.runtime import ModelRuntime

Logits = npt.NDArray[np.float32]

# A batch held for more requests leaves at least this long before its earliest deadline.
DEADLINE_MARGIN_SECONDS = 0.001


@dataclass(frozen=True)
class BatchingPolicy:
    """How requests are merged into model calls, and how many rows may wait."""

    max_batch_rows: int = 256
    max_delay_us: int = 0
    max_queued_rows: int = 8192

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.max_delay_us < 0 or self.max_queued_rows < 1:
            raise ValueError(f"invalid batching policy: {self}")


@dataclass(frozen=True)
class BatchMetrics:
    """The batcher's Prometheus series (owned by service.metrics.Metrics)."""

    batch_rows: Histogram
    batch_requests: Histogram
    queue_seconds: Histogram
    queued_rows: Gauge
    shed: Counter


@dataclass(eq=False)
class _Waiting:
    runtime: ModelRuntime
    inputs: ModelInputs
    future: asyncio.Future[Logits]
    enqueued: float
    deadline: float | None
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.inputs)


class MicroBatcher:
    """Runs model calls on `threads` inference threads, batching requests for the same model."""

    def __init__(self, threads: int, policy: BatchingPolicy, metrics: BatchMetrics) -> None:
        self.policy = policy
        self._threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="inference")
        self._metrics = metrics
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._busy = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def predict(
        self, runtime: ModelRuntime, inputs: ModelInputs, deadline: float | None = None
    ) -> Logits:
        """The model's logits for `inputs`, computed in a batch with other waiting requests.

        `deadline` is in the event loop's clock: a request still queued then is refused with
        DeadlineExceeded instead of being scored late. Raises Overloaded, without queueing,
        when its rows would push the queue past `max_queued_rows`.
        """
        rows = len(inputs)
        limit = self.policy.max_queued_rows
        # A request larger than the bound on its own still runs when nothing else waits.
        if self._queued_rows and self._queued_rows + rows > limit:
            self._metrics.shed.labels("queued_rows").inc()
            raise Overloaded(
                f"{self._queued_rows} candidate rows are waiting for the model and this request "
                f"adds {rows}; the limit is {limit}: retry"
            )
        loop = asyncio.get_running_loop()
        waiting = _Waiting(runtime, inputs, loop.create_future(), loop.time(), deadline)
        self._queue.append(waiting)
        self._count_queued(rows)
        self._dispatch()
        try:
            return await waiting.future
        except asyncio.CancelledError:
            if waiting in self._queue:  # the caller went away before its turn
                self._queue.remove(waiting)
                self._count_queued(-rows)
            raise

    def close(self) -> None:
        """Stop the inference threads once the calls running now are done."""
        if self._timer is not None:
            self._timer.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _count_queued(self, rows: int) -> None:
        self._queued_rows += rows
        self._metrics.queued_rows.set(self._queued_rows)

    def _dispatch(self) -> None:
        """Start as many batches as there are free threads and ready requests."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._busy < self._threads and self._queue:
            head = self._queue[0]
            ready_at = self._ready_at(head)
            now = loop.time()
            if ready_at > now:
                self._timer = loop.call_at(ready_at, self._dispatch)
                return
            batch = self._take_batch(head.runtime, now)
            if batch:
                self._start(batch, now)

    def _ready_at(self, head: _Waiting) -> float:
        """When the batch led by `head` should leave: now, unless a delay may still fill it
        (and never so late that one of its requests would miss its deadline by waiting)."""
        delay = self.policy.max_delay_us
        if delay == 0:
            return head.enqueued
        same_model = [w for w in self._queue if w.runtime is head.runtime]
        if sum(w.rows for w in same_model) >= self.policy.max_batch_rows:
            return head.enqueued
        deadlines = [w.deadline for w in same_model if w.deadline is not None]
        latest = min(deadlines, default=math.inf) - DEADLINE_MARGIN_SECONDS
        return min(head.enqueued + delay / 1e6, latest)

    def _take_batch(self, runtime: ModelRuntime, now: float) -> list[_Waiting]:
        """Remove the oldest requests for `runtime`, up to max_batch_rows (at least one)."""
        batch: list[_Waiting] = []
        rows = 0
        kept: deque[_Waiting] = deque()
        while self._queue:
            waiting = self._queue.popleft()
            if waiting.runtime is not runtime:
                kept.append(waiting)
                continue
            if batch and rows + waiting.rows > self.policy.max_batch_rows:
                self._queue.appendleft(waiting)
                break
            self._count_queued(-waiting.rows)
            if waiting.future.done():
                continue
            if waiting.deadline is not None and now > waiting.deadline:
                self._metrics.shed.labels("deadline").inc()
                late_ms = (now - waiting.deadline) * 1000
                waiting.future.set_exception(
                    DeadlineExceeded(
                        f"the request's deadline passed {late_ms:.1f} ms ago while it waited "
                        "for the model"
                    )
                )
                continue
            batch.append(waiting)
            rows += waiting.rows
        self._queue.extendleft(reversed(kept))
        return batch

    def _start(self, batch: list[_Waiting], now: float) -> None:
        self._busy += 1
        for waiting in batch:
            self._metrics.queue_seconds.observe(now - waiting.enqueued)
        inputs = concatenate_inputs([w.inputs for w in batch])
        self._metrics.batch_rows.observe(len(inputs))
        self._metrics.batch_requests.observe(len(batch))
        loop = asyncio.get_running_loop()
        call = self._executor.submit(batch[0].runtime.predict, inputs)
        call.add_done_callback(lambda done: loop.call_soon_threadsafe(self._finish, batch, done))

    def _finish(self, batch: list[_Waiting], call: Future[Logits]) -> None:
        self._busy -= 1
        error = NotReady("the service is shutting down") if call.cancelled() else call.exception()
        if error is not None:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
        else:
            logits = call.result()
            offset = 0
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_result(logits[offset : offset + waiting.rows])
                offset += waiting.rows
        self._dispatch()
