"""`adscore train` end to end: data, baseline, DCN-v2, calibration, evaluation, export, publish.

synthetic world -> train / validation / calibration / test splits
-> logistic regression and DCN-v2, early-stopped on validation
-> Platt calibration on the calibration split -> metrics on the test split
-> ONNX export -> parity check -> a new version in the model repository
"""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from feature_client.assembly import DENSE_INPUT, IDS_INPUT, LOGIT_OUTPUT, assemble_inputs
from models.calibration import fit_platt
from models.dcn import DCNConfig, DCNv2, LogisticRegression
from models.evaluation import expected_calibration_error, log_loss, roc_auc
from models.export import check_parity, export_onnx, signature
from models.synthetic import SyntheticConfig, SyntheticWorld
from models.train import FitConfig, FitReport, LabelledRows, fit, predict_logits
from service.calibration import Calibration
from service.model_metadata import GoldenRows, ModelMetadata
from service.repository import ModelRepository

GOLDEN_ROWS = 8
PARITY_ROWS = 4096


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that decides a trained model; the defaults reproduce the demo model."""

    rows: int = 1_000_000
    validation_rows: int = 200_000
    calibration_rows: int = 300_000
    test_rows: int = 500_000
    world: SyntheticConfig = field(default_factory=SyntheticConfig)
    dcn: DCNConfig = field(default_factory=DCNConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    baseline_fit: FitConfig = field(
        default_factory=lambda: FitConfig(
            learning_rate=3e-3, batch_size=2048, max_epochs=6, evaluations_per_epoch=2
        )
    )
    missing_entity_rate: float = 0.01
    """Share of rows whose user (and, independently, ad) is replaced by spec defaults, so the
    model learns what to predict for entities the feature store does not know."""
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rows", "validation_rows", "calibration_rows", "test_rows"):
            if getattr(self, name) < 100:
                raise ValueError(f"{name} must be at least 100")


@dataclass
class TrainedModel:
    """A trained, calibrated and evaluated model, not yet exported."""

    plan: TrainingPlan
    world: SyntheticWorld
    model: nn.Module
    calibration: Calibration
    test: LabelledRows
    metrics: dict[str, float]
    model_report: FitReport
    baseline_report: FitReport


def build_rows(
    world: SyntheticWorld, rows: int, seed: int, missing_entity_rate: float
) -> LabelledRows:
    """Sample impressions and lay out their features exactly as the service will."""
    impressions = world.sample(rows, seed)
    users, ads = world.users, world.ads
    user_dense, user_ids = users.dense[impressions.user_index], users.ids[impressions.user_index]
    ad_dense, ad_ids = ads.dense[impressions.ad_index], ads.ids[impressions.ad_index]
    if missing_entity_rate > 0:
        rng = np.random.default_rng([world.config.seed, seed, 1])
        for dense, ids, source in ((user_dense, user_ids, "user"), (ad_dense, ad_ids, "ad")):
            missing = rng.random(rows) < missing_entity_rate
            dense[missing] = world.spec.dense_defaults(source)  # type: ignore[arg-type]
            ids[missing] = 0
    inputs = assemble_inputs(
        rows, [user_dense, ad_dense], [user_ids, ad_ids, impressions.context_ids]
    )
    return LabelledRows(inputs, impressions.label, impressions.probability)


def _probabilities(model: nn.Module, rows: LabelledRows) -> np.ndarray[Any, np.dtype[np.float64]]:
    return 1.0 / (1.0 + np.exp(-predict_logits(model, rows.inputs).astype(np.float64)))


def run_training(plan: TrainingPlan, *, progress: bool = True) -> TrainedModel:
    """Train the baseline and DCN-v2, calibrate, and measure both against the oracle."""
    torch.set_num_threads(plan.threads or os.cpu_count() or 1)
    torch.manual_seed(plan.seed)
    world = SyntheticWorld(plan.world)
    offset = plan.seed * 10
    train = build_rows(world, plan.rows, offset + 1, plan.missing_entity_rate)
    validation = build_rows(world, plan.validation_rows, offset + 2, plan.missing_entity_rate)
    calibration_rows = build_rows(
        world, plan.calibration_rows, offset + 3, plan.missing_entity_rate
    )
    test = build_rows(world, plan.test_rows, offset + 4, plan.missing_entity_rate)
    assert test.true_probabilities is not None

    dense_mean = train.inputs.dense.mean(axis=0)
    dense_std = train.inputs.dense.std(axis=0)
    cardinalities = world.spec.cardinalities

    baseline = LogisticRegression(cardinalities, dense_mean, dense_std)
    baseline_report = fit(
        baseline,
        train,
        validation,
        plan.baseline_fit,
        description="logistic regression",
        progress=progress,
    )
    model = DCNv2(cardinalities, dense_mean, dense_std, plan.dcn)
    model_report = fit(model, train, validation, plan.fit, description="DCN-v2", progress=progress)

    calibration = fit_platt(predict_logits(model, calibration_rows.inputs), calibration_rows.labels)
    raw = _probabilities(model, test)
    calibrated = calibration.apply(predict_logits(model, test.inputs))
    baseline_p = _probabilities(baseline, test)
    y = test.labels
    metrics = {
        "auc": roc_auc(y, calibrated),
        "log_loss": log_loss(y, calibrated),
        "calibration_error": expected_calibration_error(y, calibrated),
        "calibration_error_uncalibrated": expected_calibration_error(y, raw),
        "baseline_auc": roc_auc(y, baseline_p),
        "baseline_log_loss": log_loss(y, baseline_p),
        "oracle_auc": roc_auc(y, test.true_probabilities),
        "oracle_log_loss": log_loss(y, test.true_probabilities),
        "base_rate": float(y.mean()),
        "test_rows": float(len(test)),
    }
    metrics["gap_to_oracle_auc"] = metrics["oracle_auc"] - metrics["auc"]
    metrics["lift_over_baseline_auc"] = metrics["auc"] - metrics["baseline_auc"]
    return TrainedModel(
        plan, world, model, calibration, test, metrics, model_report, baseline_report
    )


def _golden_rows(session: ort.InferenceSession, trained: TrainedModel) -> GoldenRows:
    dense = trained.test.inputs.dense[:GOLDEN_ROWS]
    ids = trained.test.inputs.ids[:GOLDEN_ROWS]
    (logits,) = session.run([LOGIT_OUTPUT], {DENSE_INPUT: dense, IDS_INPUT: ids})
    return GoldenRows(
        dense=dense.tolist(),
        ids=ids.tolist(),
        probabilities=trained.calibration.apply(logits).tolist(),
    )


def export_and_publish(
    trained: TrainedModel, repository: ModelRepository, name: str, *, activate: bool = True
) -> ModelMetadata:
    """Export to ONNX, check parity, and publish a new version with its metadata."""
    spec = trained.world.spec
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(trained.model, trained.test.inputs, onnx_path)
        parity_rows = trained.test.inputs
        parity = check_parity(
            trained.model,
            onnx_path,
            type(parity_rows)(parity_rows.dense[:PARITY_ROWS], parity_rows.ids[:PARITY_ROWS]),
            trained.calibration,
        )
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        inputs, outputs = signature(len(spec.dense_names), len(spec.categorical_names))
        plan = trained.plan
        metadata = ModelMetadata(
            name=name,
            version=1,  # the repository assigns the real number
            created_at=datetime.now(UTC),
            sha256="",  # the repository computes it from the stored file
            architecture="dcn-v2",
            inputs=inputs,
            outputs=outputs,
            feature_spec=spec.to_dict(),
            calibration=trained.calibration,
            metrics={k: round(v, 6) for k, v in trained.metrics.items()},
            parity=parity.as_dict(),
            golden=_golden_rows(session, trained),
            training={
                "rows": plan.rows,
                "validation_rows": plan.validation_rows,
                "calibration_rows": plan.calibration_rows,
                "test_rows": plan.test_rows,
                "missing_entity_rate": plan.missing_entity_rate,
                "seed": plan.seed,
                "architecture": trained.plan.dcn.to_dict(),
                "fit": asdict(plan.fit),
                "best_epoch": trained.model_report.best_epoch_fraction,
                "stopped_early": trained.model_report.stopped_early,
                "evaluations": trained.model_report.evaluations,
                "seconds": round(trained.model_report.seconds, 1),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "python": platform.python_version(),
            },
            dataset={
                "kind": "synthetic",
                "config": plan.world.to_dict(),
                "checksum": trained.world.checksum(),
            },
        )
        return repository.publish(name, onnx_path, metadata, activate=activate)
