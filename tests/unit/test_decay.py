"""`adscore evaluate --log`: a model's quality per version and UTC time bucket, on real log and
label files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_scoring.decay import bucket_name, bucket_starts
from service.cli import main
from service.prediction_record import PredictionRecord

DAY_1 = datetime(2025, 11, 25, tzinfo=UTC).timestamp()
DAY = 86_400.0
REQUESTS_PER_DAY = 200
CANDIDATES = 20


def day_of_records(
    day: int, rng: np.random.Generator, *, informative: bool, positive_rate: float | None = None
) -> tuple[list[PredictionRecord], dict[tuple[str, str], int]]:
    """A day's records and their labels: drawn from the scores (informative), or independently
    of them (noise), or all one outcome (`positive_rate` 0 or 1)."""
    records: list[PredictionRecord] = []
    labels: dict[tuple[str, str], int] = {}
    for i in range(REQUESTS_PER_DAY):
        request_id = f"d{day}-r{i}"
        ads = [f"a{j}" for j in range(CANDIDATES)]
        scores = rng.uniform(0.01, 0.6, CANDIDATES)
        if positive_rate is not None:
            outcome = np.full(CANDIDATES, positive_rate)
        else:
            outcome = scores if informative else np.full(CANDIDATES, scores.mean())
        converted = rng.random(CANDIDATES) < outcome
        labels |= {(request_id, a): int(c) for a, c in zip(ads, converted, strict=True)}
        records.append(
            PredictionRecord(
                time=DAY_1 + day * DAY + i * (DAY / REQUESTS_PER_DAY),
                request_id=request_id,
                tenant=None,
                model="pcvr",
                model_version=3,
                role="active",
                spec="s",
                user_id="u1",
                ad_ids=ads,
                context={},
                dense=np.zeros((CANDIDATES, 2), np.float32),
                ids=np.zeros((CANDIDATES, 1), np.int64),
                scores=scores,
                degraded=False,
            )
        )
    return records, labels


@pytest.fixture
def log_and_labels(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    records: list[PredictionRecord] = []
    labels: dict[tuple[str, str], int] = {}
    for day, options in enumerate(
        [{"informative": True}, {"informative": False}, {"informative": False, "positive_rate": 0}]
    ):
        day_records, day_labels = day_of_records(day, rng, **options)  # type: ignore[arg-type]
        records += day_records
        labels |= day_labels
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "predictions-1.jsonl").write_bytes(
        b"".join(r.encode() + b"\n" for r in records)
    )
    table = pa.table(
        {
            "request_id": [k[0] for k in labels],
            "ad_id": [k[1] for k in labels],
            "label": list(labels.values()),
        }
    )
    pq.write_table(table, tmp_path / "labels.parquet")
    return tmp_path / "log", tmp_path / "labels.parquet"


def test_decay_shows_auc_fall_from_informative_to_noise_and_na_for_one_class(
    log_and_labels: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, labels = log_and_labels
    argv = ["evaluate", "--log", str(log), "--labels", str(labels), "--by", "day", "--quiet",
            "--json", str(tmp_path / "decay.json"),
            "--plot", str(tmp_path / "decay.png")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out

    report = json.loads((tmp_path / "decay.json").read_text())
    assert report["by"] == "day" and report["rows"]["labelled"] == 3 * 4000
    informative, noise, single = report["buckets"]
    assert [b["bucket"] for b in report["buckets"]] == ["2025-11-25", "2025-11-26", "2025-11-27"]
    assert all((b["model"], b["model_version"], b["rows"]) == ("pcvr", 3, 4000)
               for b in report["buckets"])  # fmt: skip
    assert informative["auc"] > 0.7
    assert abs(noise["auc"] - 0.5) < 0.05
    assert single["auc"] is None and single["conversions"] == 0
    assert single["observed_rate"] == 0.0 and single["log_loss"] > 0
    # The informative day is calibrated (labels drawn from the scores), the others are not.
    assert informative["calibration_error"] < 0.03 and noise["calibration_error"] > 0.1
    assert "| pcvr | 3 | 2025-11-27 | 4000 | 0 | n/a |" in out
    assert f"| pcvr | 3 | 2025-11-25 | 4000 | {informative['conversions']} | " in out
    assert "labelled: 12,000" in out
    assert (tmp_path / "decay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hourly_and_weekly_buckets(log_and_labels: tuple[Path, Path], tmp_path: Path) -> None:
    log, labels = log_and_labels
    for by, buckets in (("hour", 72), ("week", 1)):
        argv = ["evaluate", "--log", str(log), "--labels", str(labels), "--by", by, "--quiet",
                "--json", str(tmp_path / f"{by}.json")]  # fmt: skip
        assert main(argv) == 0
        report = json.loads((tmp_path / f"{by}.json").read_text())
        assert len(report["buckets"]) == buckets
        assert sum(b["rows"] for b in report["buckets"]) == 12_000
    # 2025-11-26 is a Wednesday: its week starts on Monday the 24th, ISO week 48.
    wednesday = np.array([datetime(2025, 11, 26, 13, 5, tzinfo=UTC).timestamp()])
    (start,) = bucket_starts(wednesday, "week")
    assert datetime.fromtimestamp(int(start), UTC) == datetime(2025, 11, 24, tzinfo=UTC)
    assert bucket_name(int(start), "week") == "2025-W48"
    (start,) = bucket_starts(wednesday, "hour")
    assert bucket_name(int(start), "hour") == "2025-11-26 13:00"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "{labels}", "--by", "fortnight"], None),  # argparse's own usage error
        ([], "--labels: name the file or folder of outcomes"),
        (["--labels", "{labels}", "--on", "request_id"], "two names"),
        (["--labels", "{tmp}/absent.parquet"], "absent.parquet: no such file or folder"),
        (["--labels", "{labels}", "--label-column", "converted"], "lack column(s) converted"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    log_and_labels: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str | None,
) -> None:
    log, labels = log_and_labels
    argv = ["evaluate", "--log", str(log), "--quiet"]
    argv += [e.format(labels=labels, tmp=tmp_path) for e in extra]
    if message is None:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_a_malformed_log_line_is_refused_with_file_and_line(
    log_and_labels: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log, labels = log_and_labels
    path = log / "predictions-1.jsonl"
    lines = path.read_bytes().splitlines()
    lines[6] = lines[6].replace(b'"model_version":3', b'"model_version":"three"')
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["evaluate", "--log", str(log), "--labels", str(labels), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: {path}:7: malformed field: invalid literal for int() with base 10: "
        "'three'\n"
    )


def test_scores_and_log_are_exclusive_and_by_needs_the_log(
    log_and_labels: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log, labels = log_and_labels
    with pytest.raises(SystemExit):
        main(["evaluate", "--log", str(log), "--scores", str(log), "--labels", str(labels)])
    assert main(["evaluate", "--scores", str(log), "--by", "day"]) == 2
    assert capsys.readouterr().err.endswith(
        "error: --by goes with --log (batch scores carry no time)\n"
    )
