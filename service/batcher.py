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

The inference threads take their batches from the shared queue themselves: a thread whose call
has finished starts the next batch at once, instead of waiting for a busy event loop to notice
and hand it one. Under load at 256 candidates the loop-driven hand-off kept requests queued
~10 ms while the inference threads were idle most of the time. The event loop only enqueues
(and sheds) requests and receives each batch's results, one callback per batch.

Under sustained overload the service may let fewer threads take batches (`use_threads`): the
others wait, idle, so that the event loop, which reads and refuses the excess, is not kept off
the cores by inference that cannot raise the throughput any more.

A request may bring its calibration (`predict_calibrated`): the thread then applies it once to
the whole batch, where a few numpy calls cost the same for 8 rows as for 256, instead of the
event loop applying it once per request.

A request may also bring its stored feature values undecoded (`score_layout`): the thread
decodes and lays out the values of every such request of the batch at once
(feature_client/batch_layout.py), where the event loop paid a dozen numpy calls per request, and
each request gets its rows of the batch's inputs back with its probabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter

from feature_client.assembly import ModelInputs, concatenate_inputs
from feature_client.batch_layout import LaidOut, PendingLayout, lay_out
from service.errors import DeadlineExceeded, NotReady, Overloaded
from service.lean_metrics import Level, Observer
from service.runtime import ModelRuntime

Logits = npt.NDArray[np.float32]
Probabilities = npt.NDArray[np.float64]
Calibrate = Callable[[Logits], Probabilities]
Scored = tuple[Logits, Probabilities | None, LaidOut | None]

# A batch held for more requests leaves at least this long before its earliest deadline: the
# interpreter's switch interval, the longest an inference thread woken to take the batch may
# wait for the interpreter lock while the event loop holds it.
DEADLINE_MARGIN_SECONDS = 0.005


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

    batch_rows: Observer
    batch_requests: Observer
    queue_seconds: Observer
    queued_rows: Level
    shed: Counter


@dataclass(eq=False)
class _Waiting:
    """One request in the queue; times are time.monotonic()."""

    runtime: ModelRuntime
    inputs: ModelInputs | PendingLayout
    calibrate: Calibrate | None
    future: asyncio.Future[Scored]
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float | None
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.inputs)


Slice = tuple[_Waiting, int, Probabilities | None, LaidOut | None]


def _settle(slices: list[Slice], logits: Logits | None, error: BaseException | None) -> None:
    """On the event loop: each request gets its rows of the batch's logits (from its offset),
    its calibrated probabilities and its laid-out inputs, or the error."""
    for waiting, offset, probabilities, laid in slices:
        if waiting.future.done():  # its caller went away meanwhile
            continue
        if error is not None:
            waiting.future.set_exception(error)
        else:
            assert logits is not None
            rows = logits[offset : offset + waiting.rows]
            waiting.future.set_result((rows, probabilities, laid))


def _calibrated(batch: list[_Waiting], logits: Logits) -> list[Probabilities | None]:
    """Each request's probabilities: one calibration of the whole batch when its requests share
    one (the usual case: one model version), else request by request."""
    first = batch[0].calibrate
    if first is not None and all(w.calibrate == first for w in batch):
        whole = first(logits)
        slices: list[Probabilities | None] = []
        offset = 0
        for waiting in batch:
            slices.append(whole[offset : offset + waiting.rows])
            offset += waiting.rows
        return slices
    offsets = np.cumsum([0] + [w.rows for w in batch])
    return [
        None if w.calibrate is None else w.calibrate(logits[start : start + w.rows])
        for w, start in zip(batch, offsets, strict=False)
    ]


def _settle_soon(
    batch: list[_Waiting],
    logits: Logits | None,
    error: BaseException | None,
    probabilities: list[Probabilities | None] | None = None,
    laid: list[LaidOut | None] | None = None,
) -> None:
    """From any thread: settle `batch` on its requests' event loop, one callback per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Slice]] = {}
    offset = 0
    for i, waiting in enumerate(batch):
        calibrated = None if probabilities is None else probabilities[i]
        inputs = None if laid is None else laid[i]
        by_loop.setdefault(waiting.loop, []).append((waiting, offset, calibrated, inputs))
        offset += waiting.rows
    for loop, slices in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_settle, slices, logits, error)


def _batch_inputs(batch: list[_Waiting]) -> tuple[ModelInputs, list[LaidOut | None] | None]:
    """The batch's model inputs, its requests' in order, with the pending layouts laid out
    together (and their share of the inputs, in the order of the batch)."""
    pending = [w.inputs for w in batch if isinstance(w.inputs, PendingLayout)]
    if not pending:
        return concatenate_inputs([w.inputs for w in batch]), None  # type: ignore[misc]
    laid_inputs, laid = lay_out(pending)
    if len(pending) == len(batch):  # the usual case: the batch's matrices are laid out already
        return laid_inputs, list(laid)
    per_request: list[LaidOut | None] = []
    parts: list[ModelInputs] = []
    next_laid = iter(laid)
    for waiting in batch:
        if isinstance(waiting.inputs, PendingLayout):
            own = next(next_laid)
            per_request.append(own)
            parts.append(own.inputs)
        else:
            per_request.append(None)
            parts.append(waiting.inputs)
    return concatenate_inputs(parts), per_request


class MicroBatcher:
    """Runs model calls on `threads` inference threads, batching requests for the same model."""

    def __init__(self, threads: int, policy: BatchingPolicy, metrics: BatchMetrics) -> None:
        if threads < 1:
            raise ValueError(f"a micro-batcher needs at least one inference thread, got {threads}")
        self.policy = policy
        self._queue = _BatchQueue(threads, policy, metrics)
        # The threads hold the queue, not this object: one dropped without close() still stops
        # them once it is garbage.
        weakref.finalize(self, self._queue.close)

    @property
    def queued_rows(self) -> int:
        return self._queue.queued_rows

    @property
    def threads(self) -> list[threading.Thread]:
        return self._queue.threads

    @property
    def active_threads(self) -> int:
        return self._queue.active

    def use_threads(self, count: int) -> None:
        """Let only the first `count` inference threads (at least one, at most all) take
        batches; the others wait, idle, until the count rises again."""
        self._queue.set_active(count)

    async def predict(
        self, runtime: ModelRuntime, inputs: ModelInputs, deadline: float | None = None
    ) -> Logits:
        """The model's logits for `inputs`, computed in a batch with other waiting requests.

        `deadline` is in the event loop's clock: a request still queued then is refused with
        DeadlineExceeded instead of being scored late. Raises Overloaded, without queueing,
        when its rows would push the queue past `max_queued_rows`.
        """
        logits, _, _ = await self._queue.predict(runtime, inputs, None, deadline)
        return logits

    async def predict_calibrated(
        self,
        runtime: ModelRuntime,
        calibrate: Calibrate,
        inputs: ModelInputs,
        deadline: float | None = None,
    ) -> tuple[Logits, Probabilities]:
        """`predict`, and `calibrate` applied to the logits on the inference thread, once for
        every request of the batch that brought the same calibration."""
        logits, probabilities, _ = await self._queue.predict(runtime, inputs, calibrate, deadline)
        assert probabilities is not None
        return logits, probabilities

    async def score_layout(
        self,
        runtime: ModelRuntime,
        calibrate: Calibrate,
        pending: PendingLayout,
        deadline: float | None = None,
    ) -> tuple[Probabilities, LaidOut]:
        """`predict_calibrated` of a request whose stored values are still to be decoded: the
        inference thread lays them out with the rest of the batch (feature_client/batch_layout.py)
        and returns its calibrated probabilities and its rows of the batch's inputs."""
        _, probabilities, laid = await self._queue.predict(runtime, pending, calibrate, deadline)
        assert probabilities is not None and laid is not None
        return probabilities, laid

    def close(self) -> None:
        """Refuse the requests still queued and stop the inference threads once the calls
        running now are done (they are daemon threads: nothing waits for them at exit)."""
        self._queue.close()


class _BatchQueue:
    """The queue shared by the event loop and the inference threads, and the threads."""

    def __init__(self, threads: int, policy: BatchingPolicy, metrics: BatchMetrics) -> None:
        self.policy = policy
        self._metrics = metrics
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._closed = False
        self._changed = threading.Condition()  # guards the queue, its row count, _closed, active
        self.active = threads  # threads 0..active-1 take batches
        self.threads = [
            threading.Thread(target=self._serve, args=(i,), name=f"inference_{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def predict(
        self,
        runtime: ModelRuntime,
        inputs: ModelInputs | PendingLayout,
        calibrate: Calibrate | None,
        deadline: float | None,
    ) -> Scored:
        rows = len(inputs)
        limit = self.policy.max_queued_rows
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        # The threads compare deadlines with time.monotonic(): move it onto that clock.
        due = None if deadline is None else now + (deadline - loop.time())
        waiting = _Waiting(runtime, inputs, calibrate, loop.create_future(), loop, now, due)
        with self._changed:
            if self._closed:
                raise NotReady("the service is shutting down")
            # A request larger than the bound on its own still runs when nothing else waits.
            if self._queued_rows and self._queued_rows + rows > limit:
                queued = self._queued_rows
                self._metrics.shed.labels("queued_rows").inc()
                raise Overloaded(
                    f"{queued} candidate rows are waiting for the model and this request "
                    f"adds {rows}; the limit is {limit}: retry"
                )
            self._queue.append(waiting)
            self._count_queued(rows)
            # Enough threads that one allowed to take batches is among them (one, unless some
            # are paused: those go back to waiting).
            self._changed.notify(len(self.threads) - self.active + 1)
        try:
            return await waiting.future
        except asyncio.CancelledError:
            with self._changed:
                if waiting in self._queue:  # the caller went away before its turn
                    self._queue.remove(waiting)
                    self._count_queued(-rows)
            raise

    def set_active(self, count: int) -> None:
        with self._changed:
            self.active = max(1, min(count, len(self.threads)))
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._count_queued(-self._queued_rows)
            self._changed.notify_all()
        if dropped:
            _settle_soon(dropped, None, NotReady("the service is shutting down"))

    def _count_queued(self, rows: int) -> None:
        """Under the lock."""
        self._queued_rows += rows
        self._metrics.queued_rows.set(self._queued_rows)

    def _serve(self, index: int) -> None:
        """An inference thread: take the next batch, run it, hand the results to the loop."""
        while True:
            with self._changed:
                batch = self._next_batch(index)
            if batch is None:
                return
            self._run(batch)
            del batch  # an idle thread holds no request's arrays

    def _run(self, batch: list[_Waiting]) -> None:
        """One model call; whatever goes wrong reaches the batch's callers, never the thread."""
        try:
            inputs, laid = _batch_inputs(batch)
            self._metrics.batch_rows.observe(len(inputs))
            self._metrics.batch_requests.observe(len(batch))
            logits = batch[0].runtime.predict(inputs)
            probabilities = _calibrated(batch, logits)
        except Exception as exc:
            _settle_soon(batch, None, exc)
        except BaseException:
            _settle_soon(batch, None, NotReady("the inference thread stopped"))
            raise
        else:
            _settle_soon(batch, logits, None, probabilities, laid)

    def _next_batch(self, index: int) -> list[_Waiting] | None:
        """Under the lock: wait until a batch is due and this thread may take it; None once
        closed."""
        while not self._closed:
            if not self._queue or index >= self.active:
                self._changed.wait()
                continue
            head = self._queue[0]
            now = time.monotonic()
            ready_at = self._ready_at(head)
            if ready_at > now:
                self._changed.wait(ready_at - now)
                continue
            batch = self._take_batch(head.runtime, now)
            if batch:
                return batch
        return None

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
        """Remove the oldest requests for `runtime`, up to max_batch_rows (at least one);
        requests whose deadline has passed are refused on the way."""
        batch: list[_Waiting] = []
        late: list[_Waiting] = []
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
            if waiting.deadline is not None and now > waiting.deadline:
                late.append(waiting)
                continue
            self._metrics.queue_seconds.observe(now - waiting.enqueued)
            batch.append(waiting)
            rows += waiting.rows
        self._queue.extendleft(reversed(kept))
        for waiting in late:
            self._metrics.shed.labels("deadline").inc()
            late_ms = (now - waiting.deadline) * 1000  # type: ignore[operator]
            _settle_soon(
                [waiting],
                None,
                DeadlineExceeded(
                    f"the request's deadline passed {late_ms:.1f} ms ago while it waited "
                    "for the model"
                ),
            )
        return batch
