"""Training from the prediction log: a real server logs what it scores and `adscore train
--from-log` publishes a version that loads with every check of the service's loader; a model
trained on logged impressions of the synthetic world ranks close to the oracle on the same rows."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_scoring.log_labels import join_labels
from batch_scoring.prediction_log import LoggedRows, read_prediction_log
from feature_client.assembly import ModelInputs
from models.evaluation import roc_auc
from models.log_data import log_plan, logged_spec, time_splits, training_data_from_log
from models.pipeline import TrainingPlan, build_rows, export_and_publish, run_training
from models.synthetic import COUNTRIES, DEVICES, PLACEMENTS, SyntheticWorld
from models.train import FitConfig
from service.cli import main
from service.prediction_record import PredictionRecord
from service.registry import LoadedModel, load_version
from service.repository import ModelRepository
from service.settings import Settings
from tests.app.conftest import serving, world_of
from tests.conftest import TrainedFixture

pytestmark = pytest.mark.integration

REQUESTS = 400
CANDIDATES = 25
Key = tuple[str, str]


@dataclass(frozen=True)
class Logged:
    log: Path
    labels: Path
    conversions: Path
    """The labels of the converted rows only (a conversion feed)."""


def requests_and_outcomes(
    world: SyntheticWorld, seed: int
) -> tuple[list[dict[str, Any]], dict[Key, int]]:
    """Requests drawn like the world's impressions, each candidate's outcome drawn from its true
    probability (users and ads map to the world by index: u{i}, a{i})."""
    rng = np.random.default_rng(seed)
    drawn = world.sample(REQUESTS, seed)
    context = drawn.context_ids - 1  # device, country, hour, placement as indices
    bodies: list[dict[str, Any]] = []
    outcome: dict[Key, int] = {}
    for i in range(REQUESTS):
        ads = rng.choice(world.config.ads, CANDIDATES, replace=False, p=world.ad_weights)
        same = np.ones(CANDIDATES, dtype=np.int64)
        logit = world.true_logit(
            same * drawn.user_index[i], ads, *(same * context[i, j] for j in range(4))
        )
        converted = rng.random(CANDIDATES) < 1.0 / (1.0 + np.exp(-logit))
        device, country, hour, placement = context[i].tolist()
        bodies.append(
            {
                "request_id": f"r{i}",
                "user_id": f"u{drawn.user_index[i]}",
                "context": {"device": DEVICES[device], "country": COUNTRIES[country],
                            "hour": hour, "placement": PLACEMENTS[placement]},
                "candidates": [{"ad_id": f"a{a}"} for a in ads],
            }
        )  # fmt: skip
        outcome |= {(f"r{i}", f"a{a}"): int(c) for a, c in zip(ads, converted, strict=True)}
    return bodies, outcome


def write_labels(path: Path, outcome: dict[Key, int]) -> None:
    keys = list(outcome)
    columns = {"request_id": [k[0] for k in keys], "ad_id": [k[1] for k in keys]}
    pq.write_table(pa.table(columns | {"label": [outcome[k] for k in keys]}), path)


@pytest.fixture(scope="module")
def logged(trained: TrainedFixture, tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """10,000 rows scored by a real server with the prediction log on, and their outcomes."""
    folder = tmp_path_factory.mktemp("prediction_log")
    log = folder / "log"
    # Budgets generous enough that no request is degraded (scored on defaults) on a busy
    # machine: training leaves degraded rows out, and the test counts rows.
    with serving(
        trained, prediction_log="jsonl", prediction_log_sample_rate=1.0, prediction_log_dir=log,
        request_timeout_ms=10_000, feature_timeout_ms=5_000,
    ) as service:  # fmt: skip
        bodies, outcome = requests_and_outcomes(service.world, seed=21)

        def send(share: list[dict[str, Any]]) -> None:
            with httpx.Client(base_url=service.url, timeout=30) as client:
                for body in share:
                    response = client.post("/v1/score", json=body)
                    assert response.status_code == 200, response.text

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, [bodies[i::4] for i in range(4)]))
    # The server has stopped: its log is closed, every file renamed to .jsonl.
    assert not list(log.glob("*.open")) and list(log.glob("*.jsonl"))
    write_labels(folder / "labels.parquet", outcome)
    write_labels(folder / "conversions.parquet", {k: v for k, v in outcome.items() if v})
    return Logged(log, folder / "labels.parquet", folder / "conversions.parquet")


@pytest.fixture
def repository(trained: TrainedFixture, tmp_path: Path) -> ModelRepository:
    """A copy of the repository that served the log (the logged version's spec is in it)."""
    shutil.copytree(trained.repository, tmp_path / "models")
    return ModelRepository(tmp_path / "models")


def train_from_log(repository: ModelRepository, *args: str) -> int:
    return main(["train", "--model-repository", str(repository.root), "--epochs", "1",
                 "--threads", "2", "--quiet", *args])  # fmt: skip


def assert_scores_to_auc(
    loaded: LoadedModel, rows: LoggedRows, labels: npt.NDArray[np.float32], published: float
) -> None:
    """The loaded version scores `rows` to the AUC its training published for them.

    Training measured that AUC on torch's outputs; the service scores with onnxruntime. The two
    disagree on a probability by about the export's parity (kept in the metadata, measured on a
    sample of rows), so a positive and a negative scored within ten times that (at least 1e-6)
    may come out in either order. A barely trained model has a few such pairs, and which flip
    depends on the CPU: the AUCs may differ by those pairs' weight and no more. Rows other than
    the test split would be off by far more.
    """
    scores = loaded.score(ModelInputs(rows.dense, rows.ids))
    disagreement = max(10 * loaded.metadata.parity["max_abs_probability_diff"], 1e-6)
    positives = scores[labels == 1]
    negatives = np.sort(scores[labels == 0])
    near = np.searchsorted(negatives, positives + disagreement, side="right") - np.searchsorted(
        negatives, positives - disagreement, side="left"
    )
    pair_weight = 1.0 / (len(positives) * len(negatives))
    allowed = int(near.sum()) * pair_weight
    assert allowed < 0.005, f"{int(near.sum())} near-tied pairs: the check would say little"
    # Plus the metadata's rounding to 6 decimals.
    assert roc_auc(labels, scores) == pytest.approx(published, abs=allowed + 1e-6)


def test_train_from_a_served_log_publishes_a_version_that_loads_and_serves_its_metrics(
    logged: Logged, repository: ModelRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    # A conversion feed: the rows it does not name did not convert.
    code = train_from_log(repository, "--from-log", str(logged.log), "--labels",
                          str(logged.conversions), "--unlabelled", "negative")  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    rows = REQUESTS * CANDIDATES
    assert f"logged rows: {rows:,}" in out and "without a label (taken as negatives)" in out
    assert f"kept: {rows:,}" in out and "  train: 7,000 rows" in out
    assert "published pcvr version 2" in out and "oracle" not in out
    assert "DCN-v2 AUC" in out and "logistic regression AUC" in out

    metadata = repository.read_metadata("pcvr", 2)
    dataset = metadata.dataset
    assert dataset is not None and dataset["kind"] == "prediction_log"
    assert dataset["rows"] == rows and dataset["labels"] == "conversions.parquet"
    assert dataset["logged_by"] == ["pcvr:1"] and dataset["files"] >= 1
    assert dataset["degraded_rows_left_out"] == 0
    assert len(dataset["checksum"]) == 16 and len(dataset["time_range"]) == 2
    splits = [dataset["splits"][name]["rows"] for name in ("train", "validation", "calibration",
                                                          "test")]  # fmt: skip
    assert sum(splits) == rows and splits[0] == 7_000
    assert [metadata.training[k] for k in ("rows", "validation_rows", "calibration_rows",
                                           "test_rows")] == splits  # fmt: skip
    assert "oracle_auc" not in metadata.metrics and "baseline_auc" in metadata.metrics
    assert metadata.drift_reference is not None and metadata.drift_reference.rows == splits[1]
    fingerprint = repository.read_metadata("pcvr", 1).spec().fingerprint()
    assert metadata.spec().fingerprint() == fingerprint

    # Every load-time check of the service: checksum, signature, golden rows, warm-up.
    loaded = load_version(repository, "pcvr", 2, Settings())
    # The test split is the newest rows: the loaded version scores them to the published AUC.
    logged_rows, _ = read_prediction_log([logged.log], progress=False)
    joined = join_labels(logged_rows, logged.conversions, unlabelled="negative")
    newest = time_splits(joined.rows.time)[3]
    test = joined.rows.take(newest)
    assert_scores_to_auc(loaded, test, joined.labels[newest], metadata.metrics["auc"])

    # Its validation rows cannot be drawn again from seeds: `adscore reference` refuses it.
    assert main(["reference", "--model-repository", str(repository.root), "--version", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pcvr v2 was trained on the prediction log")


def test_evaluate_reads_the_served_log(logged: Logged, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--log", str(logged.log), "--labels", str(logged.labels),
                 "--by", "hour", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"  labelled: {REQUESTS * CANDIDATES:,}" in out
    lines = [x for x in out.splitlines() if x.startswith("| pcvr | 1 |")]
    assert 1 <= len(lines) <= 2  # the run may straddle an hour
    assert sum(int(x.split("|")[4]) for x in lines) == REQUESTS * CANDIDATES


def log_of(records: list[PredictionRecord], folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "predictions.jsonl").write_bytes(b"".join(r.encode() + b"\n" for r in records))
    return folder


def refusal(repository: ModelRepository, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert train_from_log(repository, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_refusals_are_one_line_and_status_2(
    logged: Logged, repository: ModelRepository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with next(iter(logged.log.glob("*.jsonl"))).open("rb") as f:
        first = PredictionRecord.decode(f.readline())
    labels = ["--labels", str(logged.labels)]

    err = refusal(repository, capsys, "--from-log", str(logged.log))
    assert "--labels: name the file" in err

    other_spec = PredictionRecord(**{**first.__dict__, "spec": "0123456789abcdef"})
    mixed = log_of([first, other_spec], tmp_path / "mixed")
    err = refusal(repository, capsys, "--from-log", str(mixed), *labels)
    assert "rows of 2 feature specs" in err

    foreign = log_of([other_spec], tmp_path / "foreign")
    err = refusal(repository, capsys, "--from-log", str(foreign), *labels)
    assert "pcvr v1" in err and "its logged rows say 0123456789abcdef" in err

    unknown = log_of([PredictionRecord(**{**first.__dict__, "model_version": 9})], tmp_path / "u")
    err = refusal(repository, capsys, "--from-log", str(unknown), *labels)
    assert "none of the logged versions (pcvr v9)" in err

    small = log_of([first], tmp_path / "small")
    err = refusal(repository, capsys, "--from-log", str(small), *labels)
    assert f"{len(first)} labelled rows to train on" in err and "at least 1,000" in err
    assert repository.versions("pcvr") == [1]  # nothing was published


@pytest.fixture
def impressions_log(trained: TrainedFixture, tmp_path: Path) -> Iterator[tuple[Path, Path, Any]]:
    """40,000 impressions of the trained model's world as logged records over four days (one
    candidate each, as i.i.d. as the synthetic training set), their labels and true
    probabilities."""
    world = world_of(trained)
    spec = ModelRepository(trained.repository).read_metadata(trained.name, trained.version).spec()
    count, seed = 40_000, 5
    rows = build_rows(world, count, seed, missing_entity_rate=0.0)
    drawn = world.sample(count, seed)  # the same impressions build_rows laid out
    start = 1_764_000_000.0
    records = [
        PredictionRecord(
            time=start + i * (4 * 86_400 / count),
            request_id=f"i{i}",
            tenant=None,
            model=trained.name,
            model_version=trained.version,
            role="active",
            spec=spec.fingerprint(),
            user_id=f"u{drawn.user_index[i]}",
            ad_ids=[f"a{drawn.ad_index[i]}"],
            context={},
            dense=rows.inputs.dense[i : i + 1],
            ids=rows.inputs.ids[i : i + 1],
            scores=drawn.probability[i : i + 1],
            degraded=False,
        )
        for i in range(count)
    ]
    log = log_of(records, tmp_path / "impressions")
    labels = {(f"i{i}", f"a{drawn.ad_index[i]}"): int(drawn.label[i]) for i in range(count)}
    write_labels(tmp_path / "labels.parquet", labels)
    yield log, tmp_path / "labels.parquet", drawn.probability


def test_a_model_trained_on_logged_impressions_ranks_close_to_the_oracle(
    trained: TrainedFixture,
    repository: ModelRepository,
    impressions_log: tuple[Path, Path, Any],
) -> None:
    log, labels, probability = impressions_log
    rows, _ = read_prediction_log([log], progress=False)
    labelled = join_labels(rows, labels)
    data = training_data_from_log(
        labelled, logged_spec(repository, rows), files=1, labels_name=labels.name
    )
    # Three epochs: on 28,000 rows one leaves the DCN-v2 undertrained (so does the synthetic path).
    plan = TrainingPlan(fit=FitConfig(max_epochs=3, evaluations_per_epoch=2), threads=2)
    model = run_training(log_plan(plan, data), progress=False, data=data)
    metadata = export_and_publish(model, repository, "pcvr")
    loaded = load_version(repository, "pcvr", metadata.version, Settings())

    newest = time_splits(labelled.rows.time)[3]
    assert len(newest) == 4_000 and metadata.training["rows"] == 28_000
    y = labelled.labels[newest]
    test = labelled.rows.take(newest)
    assert_scores_to_auc(loaded, test, y, metadata.metrics["auc"])
    served = metadata.metrics["auc"]
    oracle = roc_auc(y, probability[newest])  # request ids i{k} are the impression indices
    print(f"trained on the log: test AUC {served:.4f}, oracle {oracle:.4f}")
    assert served > 0.65 and oracle - served < 0.2, (served, oracle)
    assert metadata.metrics["auc"] > metadata.metrics["baseline_auc"]  # DCN-v2 over LR
