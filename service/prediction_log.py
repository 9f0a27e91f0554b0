"""Sampled prediction logging: the exact inputs and scores of scored requests, for training.

score() offers every scored request; a sample of them (one random draw) is put on a bounded
queue without waiting: O(1) on the request's path. When the queue is full the request is
dropped and its rows counted, so scoring never blocks on the log and no row is lost silently.
A worker thread at a lower CPU priority encodes records (service.prediction_record) and writes
them in batches to the sink. Every row ends in exactly one outcome of
`adscore_prediction_log_rows_total`: written, dropped (queue full or shutdown), failed (the
sink raised) or expired (deleted by the files' retention).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter

from feature_client.assembly import ModelInputs
from feature_client.spec import FeatureSpec
from service.model_manager import lower_thread_priority
from service.prediction_record import PredictionRecord
from service.prediction_sinks import JsonLinesSink, RedisStreamSink, Sink
from service.registry import LoadedModel
from service.settings import Settings
from service.work_queue import wait_drained

logger = logging.getLogger("adscore.prediction_log")

LOG_NICE = 10
# Records encoded and written per sink call at most (one write and flush, or one pipeline).
WRITE_BATCH = 256
# How often an idle worker lets the sink rotate by age.
IDLE_TICK_SECONDS = 1.0
# A failing sink is reported at most this often (each lost row is counted regardless).
FAILURE_LOG_SECONDS = 60.0
CLOSE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class _Pending:
    """A sampled request as score() hands it over (the record is built on the worker)."""

    time: float
    model: LoadedModel
    role: str
    request_id: str | None
    tenant: str | None
    user_id: str
    ad_ids: list[str]
    context: Mapping[str, str | int | float]
    inputs: ModelInputs
    scores: npt.NDArray[np.float64]
    degraded: bool


class PredictionLog:
    """Samples scored requests onto a bounded queue that a worker drains into `sink`."""

    def __init__(
        self,
        sink: Sink,
        *,
        sample_rate: float,
        max_pending: int,
        rows: Counter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sample_rate = sample_rate
        self.sink = sink
        self._rows = rows
        self._clock = clock
        self._queue: queue.Queue[_Pending | None] = queue.Queue(max_pending)
        self._fingerprints: dict[int, tuple[FeatureSpec, str]] = {}
        self._last_failure_log = -FAILURE_LOG_SECONDS
        self._thread = threading.Thread(
            target=self._run, name="adscore-prediction-log", daemon=True
        )
        self._thread.start()

    def submit(
        self,
        model: LoadedModel,
        role: str,
        request_id: str | None,
        tenant: str | None,
        user_id: str,
        ad_ids: list[str],
        context: Mapping[str, str | int | float],
        inputs: ModelInputs,
        scores: npt.NDArray[np.float64],
        degraded: bool,
    ) -> None:
        """On the request's path: a coin flip and a non-blocking enqueue, nothing more."""
        if random.random() >= self.sample_rate:
            return
        pending = _Pending(
            self._clock(), model, role, request_id, tenant, user_id, ad_ids, context, inputs,
            scores, degraded,
        )  # fmt: skip
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            self._rows.labels("dropped").inc(len(ad_ids))

    def _run(self) -> None:
        lower_thread_priority(LOG_NICE)
        while True:
            try:
                first = self._queue.get(timeout=IDLE_TICK_SECONDS)
            except queue.Empty:
                self._guarded(self.sink.tick)
                continue
            batch = [first]
            while len(batch) < WRITE_BATCH and first is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [r for r in batch if r is not None]
            try:
                if records:
                    self._write(records)
                self._guarded(self.sink.tick)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if len(records) < len(batch):  # the stop sentinel
                self._guarded(self.sink.close)
                return

    def _fingerprint(self, spec: FeatureSpec) -> str:
        # Keyed by identity (the spec is held, so its id cannot be reused): hashing a spec
        # with large vocabularies for every record would cost more than encoding the record.
        known = self._fingerprints.get(id(spec))
        if known is None:
            known = self._fingerprints[id(spec)] = (spec, spec.fingerprint())
        return known[1]

    def _record(self, pending: _Pending) -> PredictionRecord:
        model = pending.model
        return PredictionRecord(
            pending.time, pending.request_id, pending.tenant, model.name, model.version,
            pending.role, self._fingerprint(model.spec), pending.user_id, pending.ad_ids,
            pending.context, pending.inputs.dense, pending.inputs.ids, pending.scores,
            pending.degraded,
        )  # fmt: skip

    def _write(self, records: list[_Pending]) -> None:
        rows = sum(len(r.ad_ids) for r in records)
        try:
            self.sink.write([self._record(r).encode() for r in records], rows)
        except Exception as exc:
            self._rows.labels("failed").inc(rows)
            self._report(f"writing {len(records)} records ({rows} rows) failed: {exc}")
        else:
            self._rows.labels("written").inc(rows)

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # rotation or close failed: the rows already count as written
            self._report(f"{action.__name__} failed: {exc}")

    def _report(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_SECONDS:
            self._last_failure_log = now
            logger.error("prediction log: %s (further failures counted, not logged, for %.0f s)",
                         message, FAILURE_LOG_SECONDS)  # fmt: skip

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued record is written or counted (tests); False on timeout."""
        return wait_drained(self._queue, timeout)

    def close(self) -> None:
        """Write what is queued, close the sink; rows still queued after the timeout count as
        dropped."""
        with contextlib.suppress(queue.Full):  # a stuck sink: the join below times out too
            self._queue.put(None, timeout=CLOSE_TIMEOUT_SECONDS)
        self._thread.join(timeout=CLOSE_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            while True:
                try:
                    record = self._queue.get_nowait()
                except queue.Empty:
                    break
                if record is not None:
                    self._rows.labels("dropped").inc(len(record.ad_ids))
            logger.error("prediction log: the sink did not finish in %.0f s", CLOSE_TIMEOUT_SECONDS)


class PredictionLogError(Exception):
    """The prediction log cannot start (its folder cannot be created)."""


def build_prediction_log(settings: Settings, rows: Counter) -> PredictionLog | None:
    """The prediction log the settings ask for, or None when it is off."""
    if settings.prediction_log == "off" or settings.prediction_log_sample_rate == 0:
        return None
    sink: Sink
    if settings.prediction_log == "jsonl":
        directory = Path(settings.prediction_log_dir)
        try:
            sink = JsonLinesSink(
                directory,
                max_file_bytes=settings.prediction_log_max_file_bytes,
                rotate_seconds=settings.prediction_log_rotate_seconds,
                max_files=settings.prediction_log_max_files,
                on_expired=rows.labels("expired").inc,
            )
        except OSError as exc:
            raise PredictionLogError(
                f"prediction_log_dir {directory}: cannot create it ({exc.strerror}); "
                "mount a writable volume there or set ADSCORE_PREDICTION_LOG_DIR"
            ) from exc
    else:
        sink = RedisStreamSink(
            settings.prediction_log_redis_url or settings.redis_url,
            f"{settings.feature_namespace}:predictions",
            settings.prediction_log_stream_max_length,
        )
    return PredictionLog(
        sink,
        sample_rate=settings.prediction_log_sample_rate,
        max_pending=settings.prediction_log_max_pending,
        rows=rows,
    )
