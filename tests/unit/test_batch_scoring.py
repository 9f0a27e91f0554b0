"""Pure logic of batch scoring: chunking, context encoding, manifest, statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from batch_scoring.errors import BatchInputError
from batch_scoring.evaluate import reliability_table
from batch_scoring.reader import csv_convert_options, iter_chunks, list_inputs
from batch_scoring.runner import MANIFEST, ScoreStats, read_manifest
from batch_scoring.score import encode_context
from feature_client.assembly import context_blocks
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from tests.fixtures import tiny_spec


def spec_with_dense_context() -> FeatureSpec:
    base = tiny_spec()
    return FeatureSpec(1, (*base.features, DenseFeature("bid", "context", default=1.5)))


def requests(rows: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "user_id": [f"u{i}" for i in range(start, start + rows)],
            "ad_id": [f"a{i}" for i in range(start, start + rows)],
            "device": ["ios"] * rows,
        }
    )


def test_chunks_have_exactly_chunk_rows_across_row_groups_and_files(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(requests(1000), folder / "a.parquet", row_group_size=333)
    pq.write_table(requests(250, 1000), folder / "b.parquet", row_group_size=100)
    files = list_inputs(folder)
    assert [f.rows for f in files] == [1000, 250]
    chunks = list(iter_chunks(files, tiny_spec(), 300))
    assert [(c.name, c.table.num_rows) for c in chunks] == [
        ("part-00000-000000", 300),
        ("part-00000-000001", 300),
        ("part-00000-000002", 300),
        ("part-00000-000003", 100),
        ("part-00001-000000", 250),
    ]
    ids = [u for c in chunks for u in c.table.column("user_id").to_pylist()]
    assert ids == [f"u{i}" for i in range(1250)]


def test_context_encoding_matches_the_online_encoding_row_by_row() -> None:
    spec = spec_with_dense_context()
    contexts: list[dict[str, str | int | float | None]] = [
        {"device": "ios", "hour": 14, "bid": 2.5},
        {"device": "android", "hour": 3, "bid": None},
        {"device": None, "hour": None, "bid": 7},
        {"device": "tv", "hour": 25, "bid": 0.0},
    ]
    frame = pa.table(
        {
            "device": pa.array([c["device"] for c in contexts], pa.string()),
            "hour": pa.array([c["hour"] for c in contexts], pa.int64()),
            "bid": pa.array([c["bid"] for c in contexts], pa.float64()),
        }
    )
    dense, ids = encode_context(spec, frame)
    for i, context in enumerate(contexts):
        online = {k: v for k, v in context.items() if v is not None}
        online_dense, online_ids = context_blocks(spec, online)
        np.testing.assert_array_equal(dense[i], online_dense[0])
        np.testing.assert_array_equal(ids[i], online_ids[0])


def test_text_and_integer_hours_encode_alike_and_absent_columns_take_defaults() -> None:
    spec = spec_with_dense_context()
    as_text = encode_context(spec, pa.table({"hour": pa.array(["14", "3"])}))
    as_int = encode_context(spec, pa.table({"hour": pa.array([14, 3])}))
    np.testing.assert_array_equal(as_text[1], as_int[1])
    np.testing.assert_array_equal(as_text[0], [[1.5], [1.5]])  # bid absent: its default
    device = spec.feature("device")
    assert isinstance(device, CategoricalFeature)
    assert (as_text[1][:, 0] == 0).all()  # device absent: the unknown id


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("hour", pa.array([14.0]), "column hour: expected text or integers"),
        ("device", pa.array([True]), "column device: expected text or integers"),
        ("bid", pa.array(["high"]), "column bid: expected numbers"),
    ],
)
def test_context_of_a_type_the_api_refuses_is_refused(
    column: str, values: pa.Array, message: str
) -> None:
    with pytest.raises(BatchInputError, match=message):
        encode_context(spec_with_dense_context(), pa.table({column: values}))


def test_input_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="no such file or folder"):
        list_inputs(tmp_path / "absent.parquet")
    pq.write_table(pa.table({"user_id": ["u1"]}), tmp_path / "no_ad.parquet")
    with pytest.raises(BatchInputError, match="missing column\\(s\\) ad_id"):
        list_inputs(tmp_path / "no_ad.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BatchInputError, match="cannot read it as parquet"):
        list_inputs(tmp_path / "junk.parquet")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BatchInputError, match=r"expected a \.parquet or \.csv file"):
        list_inputs(tmp_path / "notes.txt")


def test_csv_reads_ids_and_categorical_context_as_text(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("user_id,ad_id,hour,device\n1,2,14,\n3,4,,ios\n")
    (chunk,) = iter_chunks(list_inputs(path), tiny_spec(), 10)
    assert chunk.table.column("user_id").to_pylist() == ["1", "3"]
    assert chunk.table.column("hour").to_pylist() == ["14", None]
    assert chunk.table.column("device").to_pylist() == [None, "ios"]
    options = csv_convert_options(spec_with_dense_context())
    assert options.column_types["bid"] == pa.float64()
    table = pacsv.read_csv(path, convert_options=options)
    assert table.num_rows == 2


def test_a_torn_last_manifest_line_is_ignored(tmp_path: Path) -> None:
    record = {
        "name": "part-00000-000000",
        "rows": 10,
        "missing_user": 1,
        "missing_ad": 0,
        "rejected": 0,
        "seconds": 0.1,
    }
    (tmp_path / MANIFEST).write_text(
        json.dumps({"chunk_rows": 10}) + "\n" + json.dumps(record) + '\n{"name": "part-0'
    )
    manifest = read_manifest(tmp_path)
    assert manifest is not None
    assert manifest.job == {"chunk_rows": 10}
    assert list(manifest.chunks) == ["part-00000-000000"]


def test_score_stats_are_exact_for_mean_and_bounds_and_close_for_quantiles() -> None:
    rng = np.random.default_rng(0)
    scores = rng.beta(1, 30, 100_000)
    stats = ScoreStats()
    for part in np.array_split(scores, 7):
        stats.add(part)
    described = stats.describe()
    assert described["mean"] == pytest.approx(scores.mean(), rel=1e-12)
    assert described["min"] == scores.min() and described["max"] == scores.max()
    for q in (1, 10, 50, 90, 99):
        assert described[f"p{q}"] == pytest.approx(np.quantile(scores, q / 100), abs=2e-5)


def test_reliability_bins_have_equal_counts_and_the_observed_rate() -> None:
    scores = np.linspace(0.0, 0.9, 100)
    labels = (np.arange(100) >= 50).astype(np.float64)
    bins = reliability_table(labels, scores, 4)
    assert [b.rows for b in bins] == [25, 25, 25, 25]
    assert [b.observed_rate for b in bins] == [0.0, 0.0, 1.0, 1.0]
    assert bins[0].mean_score == pytest.approx(scores[:25].mean())
