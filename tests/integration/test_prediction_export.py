"""`adscore export-predictions`: the prediction stream of a real redis-server, written by the
service's own sink, copied into files the log reader takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from batch_scoring.prediction_export import export_stream
from batch_scoring.prediction_log import read_prediction_log
from feature_client.redis_server import free_port
from service.cli import main
from service.prediction_record import PredictionRecord
from service.prediction_sinks import RedisStreamSink

pytestmark = pytest.mark.integration

KEY = "adscore:predictions"


def records(start: int, count: int) -> list[PredictionRecord]:
    rng = np.random.default_rng(start)
    return [
        PredictionRecord(
            time=1_764_000_000.0 + i, request_id=f"r{i}", tenant=None, model="pcvr",
            model_version=1, role="active", spec="s", user_id="u1", ad_ids=["a1", "a2"],
            context={}, dense=rng.normal(size=(2, 3)).astype(np.float32),
            ids=rng.integers(0, 99, (2, 2)), scores=rng.random(2), degraded=False,
        )
        for i in range(start, start + count)
    ]  # fmt: skip


def log_to_stream(url: str, batch: list[PredictionRecord]) -> None:
    sink = RedisStreamSink(url, KEY, max_length=1_000_000)
    sink.write([r.encode() for r in batch], sum(len(r) for r in batch))
    sink.close()


def test_pages_of_the_stream_become_closed_files_of_the_same_rows(
    redis_url: str, tmp_path: Path
) -> None:
    written = records(0, 2_500)
    log_to_stream(redis_url, written)
    client = redis.Redis.from_url(redis_url)
    client.xadd(KEY, {"other": b"not a record"})  # another writer's entry: skipped, counted
    client.close()

    summary = export_stream(redis_url, KEY, tmp_path, page=300, file_records=1_000, progress=False)

    assert summary.records == 2_500 and summary.skipped == 1
    assert [len(p.read_bytes().splitlines()) for p in summary.files] == [1_000, 1_000, 500]
    assert not list(tmp_path.glob("*.open"))
    rows, _ = read_prediction_log([tmp_path], progress=False)
    assert rows.request_id.tolist() == [r.request_id for r in written for _ in r.ad_ids]
    np.testing.assert_array_equal(rows.dense, np.concatenate([r.dense for r in written]))


def test_the_cli_exports_only_newer_entries_after_a_previous_export(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_to_stream(redis_url, records(0, 30))
    argv = ["export-predictions", "--redis-url", redis_url, "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "first")]) == 0
    out = capsys.readouterr().out
    assert f"wrote 30 records of {KEY} to 1 file(s)" in out
    last = out.split("last entry: ")[1].split()[0]

    log_to_stream(redis_url, records(30, 5))
    assert main([*argv, "--output", str(tmp_path / "second"), "--after", last]) == 0
    assert "wrote 5 records" in capsys.readouterr().out
    rows, _ = read_prediction_log([tmp_path / "second"], progress=False)
    assert sorted(set(rows.request_id.tolist())) == [f"r{i}" for i in range(30, 35)]


def test_an_unreachable_redis_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert (
        main(["export-predictions", "--redis-url", url, "--output", str(tmp_path), "--quiet"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read the stream {KEY} at {url}") and err.count("\n") == 1


def test_the_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export-predictions", "--help"])
    assert exited.value.code == 0 and "XRANGE" in capsys.readouterr().out
