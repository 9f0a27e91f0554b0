"""Reading the prediction log back (real files written by the service's sink) and joining it
with label files (real Parquet and CSV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from batch_scoring.errors import BatchInputError
from batch_scoring.log_labels import join_labels
from batch_scoring.prediction_log import LoggedRows, read_prediction_log
from service.prediction_record import PredictionRecord
from service.prediction_sinks import JsonLinesSink


def record(
    index: int, rows: int = 4, *, request_id: str | None = "", time: float = 1_764_129_000.0
) -> PredictionRecord:
    rng = np.random.default_rng(index)
    return PredictionRecord(
        time=time + index,
        request_id=f"r{index}" if request_id == "" else request_id,
        tenant=None,
        model="pcvr",
        model_version=1 + index % 2,
        role="active",
        spec="spec-a",
        user_id=f"u{index}",
        ad_ids=[f"a{index}-{j}" for j in range(rows)],
        context={"device": "ios", "hour": 3},
        dense=rng.normal(size=(rows, 3)).astype(np.float32),
        ids=rng.integers(0, 1 << 40, size=(rows, 2)),
        scores=rng.random(rows),
        degraded=index % 5 == 0,
    )


def write_log(
    directory: Path, records: list[PredictionRecord], *, close: bool = True
) -> JsonLinesSink:
    """The records written by the service's sink; its last file is left open unless `close`."""
    sink = JsonLinesSink(directory, max_file_bytes=2048, rotate_seconds=3600)
    for r in records:
        sink.write([r.encode()], len(r))
    if close:
        sink.close()
    return sink


def read(paths: list[Path], **options: bool) -> LoggedRows:
    rows, _ = read_prediction_log(paths, progress=False, **options)
    return rows


def test_rows_written_by_the_sink_read_back_exactly(tmp_path: Path) -> None:
    records = [record(i, rows=1 + i % 4) for i in range(40)]
    write_log(tmp_path, records)
    assert len(list(tmp_path.glob("*.jsonl"))) > 1  # rotated: several files, read in order

    rows, report = read_prediction_log([tmp_path], progress=False)

    assert report.records == 40 and report.rows == len(rows) == sum(len(r) for r in records)
    np.testing.assert_array_equal(rows.dense, np.concatenate([r.dense for r in records]))
    np.testing.assert_array_equal(rows.ids, np.concatenate([r.ids for r in records]))
    np.testing.assert_array_equal(rows.score, np.concatenate([r.scores for r in records]))
    assert rows.ad_id.tolist() == [a for r in records for a in r.ad_ids]
    per_row = [
        (r.time, r.request_id, r.model_version, r.degraded) for r in records for _ in r.ad_ids
    ]
    columns = (rows.time, rows.request_id, rows.model_version, rows.degraded)
    assert list(zip(*columns, strict=True)) == per_row
    assert set(rows.spec) == {"spec-a"} and set(rows.model) == {"pcvr"}
    # Without inputs: the same rows, no dense or ids kept.
    light = read([tmp_path], inputs=False)
    assert light.dense.shape == (len(rows), 0)
    np.testing.assert_array_equal(light.score, rows.score)


def test_a_malformed_line_of_a_closed_file_is_refused_with_its_file_and_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "predictions-x.jsonl"
    lines = [record(i).encode() for i in range(3)]
    lines[1] = lines[1][:-20]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BatchInputError, match=rf"^{path}:2: not JSON"):
        read([tmp_path])
    # A line that is JSON but not a record says what is missing.
    path.write_bytes(lines[0] + b"\n" + b'{"format": 1, "time": 1}\n')
    with pytest.raises(BatchInputError, match=rf"^{path}:2: missing field"):
        read([path])


def test_records_of_a_newer_format_are_skipped_and_counted(tmp_path: Path) -> None:
    newer = record(1).encode().replace(b'"format":1', b'"format":2')
    (tmp_path / "p.jsonl").write_bytes(record(0).encode() + b"\n" + newer + b"\n")
    rows, report = read_prediction_log([tmp_path], progress=False)
    assert report.records == 1 and report.newer_format == 1 and len(rows) == 4
    assert "format newer than 1" in "\n".join(report.lines())


def test_open_files_are_read_only_when_asked_and_their_partial_last_line_is_skipped(
    tmp_path: Path,
) -> None:
    write_log(tmp_path, [record(i) for i in range(3)])
    writer = write_log(tmp_path, [record(i) for i in range(10, 12)], close=False)
    (open_file,) = tmp_path.glob("*.jsonl.open")
    with open_file.open("ab") as f:
        f.write(record(99).encode()[:50])  # the writer is mid-line

    assert len(read([tmp_path])) == 12
    with pytest.raises(BatchInputError, match="--include-open"):
        read([open_file])

    rows, report = read_prediction_log([tmp_path], include_open=True, progress=False)
    writer.close()
    assert len(rows) == 20 and report.truncated == 1
    assert "a10-0" in rows.ad_id.tolist() and "a99-0" not in rows.ad_id.tolist()


def test_a_folder_without_closed_files_says_so(tmp_path: Path) -> None:
    writer = write_log(tmp_path, [record(0)], close=False)
    with pytest.raises(BatchInputError, match=r"no \.jsonl prediction log files.*1 open one"):
        read([tmp_path])
    writer.close()
    with pytest.raises(BatchInputError, match="no such file"):
        read([tmp_path / "absent"])


@pytest.fixture
def logged(tmp_path: Path) -> LoggedRows:
    # r0..r9 with 4 candidates each, then one request without an id.
    write_log(tmp_path / "log", [record(i) for i in range(10)] + [record(10, request_id=None)])
    return read([tmp_path / "log"])


def labels_table(keys: list[tuple[str, str]], values: list[int]) -> pa.Table:
    return pa.table(
        {
            "request_id": [k[0] for k in keys],
            "ad_id": [k[1] for k in keys],
            "label": values,
            "note": ["x"] * len(keys),
        }
    )


def test_join_counts_labelled_unlabelled_and_rows_without_a_request_id(
    logged: LoggedRows, tmp_path: Path
) -> None:
    # Conversions only for r0..r4, plus one key that was never logged.
    keys = [(f"r{i}", f"a{i}-{j}") for i in range(5) for j in range(4)] + [("r77", "a1")]
    values = [int(j == 0) for i in range(5) for j in range(4)] + [1]
    path = tmp_path / "labels.parquet"
    pq.write_table(labels_table(keys, values), path)

    dropped = join_labels(logged, path)
    assert dropped.report.logged == 44 and dropped.report.without_request_id == 4
    assert (dropped.report.labelled, dropped.report.unlabelled) == (20, 20)
    assert dropped.report.kept == len(dropped) == 20 and dropped.report.unmatched_labels == 1
    assert dropped.rows.ad_id.tolist() == [k for _, k in keys[:20]]
    assert dropped.labels.tolist() == values[:20]

    negative = join_labels(logged, path, unlabelled="negative")
    assert negative.report.kept == len(negative) == 40  # the 4 rows without an id stay out
    assert negative.labels.sum() == 5 and negative.rows.request_id.tolist()[-1] == "r9"
    text = "\n".join(negative.report.lines())
    assert "without a request id (cannot be joined, dropped): 4" in text
    assert "without a label (taken as negatives): 20" in text


def test_join_reads_csv_with_its_own_column_names_and_numeric_ids(tmp_path: Path) -> None:
    write_log(tmp_path / "log", [record(i, request_id=str(100 + i)) for i in range(3)])
    rows = read([tmp_path / "log"])
    path = tmp_path / "conversions.csv"
    table = pa.table({"rid": [100, 102], "ad": ["a0-1", "a2-3"], "converted": [1, 0]})
    pacsv.write_csv(table, path)  # rid reads back as integers

    joined = join_labels(rows, path, on=("rid", "ad"), label_column="converted")
    assert joined.rows.ad_id.tolist() == ["a0-1", "a2-3"] and joined.labels.tolist() == [1, 0]


def test_join_refuses_duplicate_keys_and_labels_that_are_not_0_or_1(
    logged: LoggedRows, tmp_path: Path
) -> None:
    path = tmp_path / "labels.parquet"
    pq.write_table(labels_table([("r1", "a1-0"), ("r1", "a1-0")], [1, 0]), path)
    with pytest.raises(BatchInputError, match="1 duplicate key"):
        join_labels(logged, path)
    pq.write_table(labels_table([("r1", "a1-0")], [2]), path)
    with pytest.raises(BatchInputError, match="expected 0 or 1"):
        join_labels(logged, path)
    with pytest.raises(BatchInputError, match="lack column"):
        join_labels(logged, path, label_column="converted")
    with pytest.raises(BatchInputError, match="two names"):
        join_labels(logged, path, on=("request_id",))
