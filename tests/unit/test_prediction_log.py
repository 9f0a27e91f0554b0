"""The prediction log's own logic: the record format, file rotation and retention, sampling,
and that every sampled row ends written, dropped or failed (a fake sink stands in for I/O)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from feature_client.assembly import ModelInputs
from service.metrics import Metrics
from service.prediction_log import PredictionLog, PredictionLogError, build_prediction_log
from service.prediction_record import FORMAT, PredictionRecord, RecordError
from service.prediction_sinks import JsonLinesSink
from service.registry import LoadedModel
from service.settings import Settings
from tests.fixtures import tiny_spec


def record(rows: int = 3, seed: int = 0) -> PredictionRecord:
    rng = np.random.default_rng(seed)
    return PredictionRecord(
        time=1_764_129_000.125,
        request_id=f"r-{seed}",
        tenant=None,
        model="pcvr",
        model_version=2,
        role="active",
        spec="abc",
        user_id="u1",
        ad_ids=[f"a{i}" for i in range(rows)],
        context={"device": "ios", "hour": 14},
        dense=rng.normal(size=(rows, 4)).astype(np.float32),
        ids=rng.integers(0, 1000, size=(rows, 5)),
        scores=rng.random(rows),
        degraded=False,
    )


def test_a_record_round_trips_bit_for_bit() -> None:
    original = record()
    decoded = PredictionRecord.decode(original.encode())
    assert decoded.dense.dtype == np.float32
    assert decoded.dense.tobytes() == original.dense.tobytes()
    assert np.array_equal(decoded.ids, original.ids)
    assert np.array_equal(decoded.scores, original.scores)
    assert (decoded.request_id, decoded.ad_ids, decoded.context, decoded.model_version) == (
        "r-0",
        ["a0", "a1", "a2"],
        {"device": "ios", "hour": 14},
        2,
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"format": 99}', "record format 99"),
        (b'{"format": %d, "ad_ids": ["a"]}' % FORMAT, "missing field"),
    ],
)
def test_a_bad_line_is_refused_with_its_reason(line: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        PredictionRecord.decode(line)


def test_rows_that_do_not_match_the_candidates_are_refused() -> None:
    line = record(rows=3).encode().replace(b'"ad_ids":["a0","a1","a2"]', b'"ad_ids":["a0","a1"]')
    with pytest.raises(RecordError, match="malformed"):
        PredictionRecord.decode(line)


class Clock:
    def __init__(self) -> None:
        self.now = 1_764_129_000.0

    def __call__(self) -> float:
        return self.now


def test_files_rotate_by_size_and_readers_see_only_closed_files(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path, max_file_bytes=2_000, rotate_seconds=3600)
    lines = [record(seed=i).encode() for i in range(11)]
    for line in lines:
        sink.write([line], 3)
    closed = sorted(tmp_path.glob("*.jsonl"))
    still_open = list(tmp_path.glob("*.jsonl.open"))
    assert len(closed) >= 2 and len(still_open) == 1
    sink.close()
    assert not list(tmp_path.glob("*.jsonl.open"))
    written = [
        line
        for path in sorted(tmp_path.glob("*.jsonl"), key=lambda p: int(p.stem.split("-")[-1]))
        for line in path.read_bytes().splitlines()
    ]
    assert written == lines


def test_an_idle_file_is_closed_once_old_enough(tmp_path: Path) -> None:
    clock = Clock()
    sink = JsonLinesSink(tmp_path, max_file_bytes=1 << 20, rotate_seconds=60, clock=clock)
    sink.write([record().encode()], 3)
    sink.tick()
    assert not list(tmp_path.glob("*.jsonl"))
    clock.now += 61
    sink.tick()
    assert len(list(tmp_path.glob("*.jsonl"))) == 1
    assert not list(tmp_path.glob("*.jsonl.open"))


def test_retention_deletes_the_oldest_files_and_counts_their_rows(tmp_path: Path) -> None:
    expired: list[int] = []
    sink = JsonLinesSink(
        tmp_path, max_file_bytes=1, rotate_seconds=3600, max_files=2, on_expired=expired.append
    )
    for i in range(5):  # one file per write: each is over max_file_bytes at once
        sink.write([record(rows=i + 1, seed=i).encode()], i + 1)
    kept = sorted(tmp_path.glob("*.jsonl"))
    assert len(kept) == 2
    assert expired == [1, 2, 3]
    assert sorted(len(PredictionRecord.decode(p.read_bytes())) for p in kept) == [4, 5]


class FakeSink:
    """Collects lines; can be held (to fill the queue) or made to fail."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.release = threading.Event()
        self.release.set()
        self.failing = False
        self.closed = False

    def write(self, lines: Sequence[bytes], rows: int) -> None:
        self.release.wait(10)
        if self.failing:
            raise OSError("disk full")
        self.lines.extend(lines)

    def tick(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def fake_model() -> LoadedModel:
    return cast(LoadedModel, SimpleNamespace(name="pcvr", version=3, spec=tiny_spec()))


def submit(log: PredictionLog, rows: int, request_id: str = "r") -> None:
    inputs = ModelInputs(np.ones((rows, 2), dtype=np.float32), np.ones((rows, 4), dtype=np.int64))
    log.submit(
        fake_model(), "active", request_id, None, "u1", [f"a{i}" for i in range(rows)],
        {}, inputs, np.full(rows, 0.1), False,
    )  # fmt: skip


def counted(metrics: Metrics) -> dict[str, float]:
    return {
        outcome: metrics.prediction_log_rows.labels(outcome)._value.get()
        for outcome in ("written", "dropped", "failed", "expired")
    }


def make_log(
    sink: Any, max_pending: int, sample_rate: float = 1.0
) -> tuple[PredictionLog, Metrics]:
    metrics = Metrics(CollectorRegistry())
    log = PredictionLog(
        sink, sample_rate=sample_rate, max_pending=max_pending, rows=metrics.prediction_log_rows
    )
    return log, metrics


def test_a_full_queue_drops_and_counts_rows_without_blocking() -> None:
    sink = FakeSink()
    sink.release.clear()
    log, metrics = make_log(sink, max_pending=4)
    for i in range(20):
        submit(log, rows=3, request_id=f"r{i}")  # returns at once although the sink is stuck
    sink.release.set()
    assert log.wait_idle(10)
    counts = counted(metrics)
    assert counts["dropped"] > 0
    assert counts["written"] == 3 * len(sink.lines)
    assert counts["written"] + counts["dropped"] == 60
    log.close()
    assert sink.closed


def test_a_failing_sink_counts_lost_rows_and_the_log_recovers() -> None:
    sink = FakeSink()
    sink.failing = True
    log, metrics = make_log(sink, max_pending=64)
    submit(log, rows=5)
    assert log.wait_idle(10)
    sink.failing = False
    submit(log, rows=2)
    assert log.wait_idle(10)
    assert counted(metrics) == {"written": 2, "dropped": 0, "failed": 5, "expired": 0}
    log.close()


def test_sampling_logs_about_the_configured_share() -> None:
    sink = FakeSink()
    log, _ = make_log(sink, max_pending=4096, sample_rate=0.25)
    for i in range(2000):
        submit(log, rows=1, request_id=f"r{i}")
    assert log.wait_idle(10)
    assert 400 < len(sink.lines) < 600
    log.close()


def test_close_writes_what_is_still_queued() -> None:
    sink = FakeSink()
    log, metrics = make_log(sink, max_pending=64)
    for i in range(10):
        submit(log, rows=1, request_id=f"r{i}")
    log.close()
    assert sorted(PredictionRecord.decode(line).request_id or "" for line in sink.lines) == sorted(
        f"r{i}" for i in range(10)
    )
    assert counted(metrics)["written"] == 10


def test_the_record_carries_the_models_spec_fingerprint() -> None:
    sink = FakeSink()
    log, _ = make_log(sink, max_pending=8)
    submit(log, rows=2)
    log.close()
    (line,) = sink.lines
    assert PredictionRecord.decode(line).spec == tiny_spec().fingerprint()


def test_the_log_is_off_by_default_and_when_the_rate_is_zero(tmp_path: Path) -> None:
    rows = Metrics(CollectorRegistry()).prediction_log_rows
    assert build_prediction_log(Settings(), rows) is None
    off = Settings(
        prediction_log="jsonl", prediction_log_sample_rate=0, prediction_log_dir=tmp_path
    )
    assert build_prediction_log(off, rows) is None
    on = Settings(prediction_log="jsonl", prediction_log_dir=tmp_path / "log")
    log = build_prediction_log(on, rows)
    assert log is not None and isinstance(log.sink, JsonLinesSink)
    log.close()


def test_an_unwritable_log_folder_is_refused_with_its_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    settings = Settings(prediction_log="jsonl", prediction_log_dir=blocker / "log")
    with pytest.raises(PredictionLogError, match=r"prediction_log_dir .*not-a-folder/log: cannot"):
        build_prediction_log(settings, Metrics(CollectorRegistry()).prediction_log_rows)


class FailingHalfway:
    """A file handle that writes half of what it is given, then fails like a full disk."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def write(self, data: Any) -> int:
        self.handle.write(bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def test_a_failed_write_leaves_no_half_line_behind(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path, max_file_bytes=1 << 20, rotate_seconds=3600)
    sink.write([record(seed=1).encode()], 3)
    current = sink._file
    assert current is not None
    real = current.handle
    current.handle = FailingHalfway(real)  # type: ignore[assignment]
    with pytest.raises(OSError, match="No space left"):
        sink.write([record(seed=2).encode()], 3)
    current.handle = real
    sink.write([record(seed=3).encode()], 3)
    sink.close()
    (path,) = tmp_path.glob("*.jsonl")
    ids = [PredictionRecord.decode(line).request_id for line in path.read_bytes().splitlines()]
    assert ids == ["r-1", "r-3"]
