"""`adscore train` end to end: data, baseline, DCN-v2, calibration, evaluation, export, publish.

synthetic world (or the prediction log, models/log_data.py) -> train / validation / calibration
/ test splits
-> logistic regression and DCN-v2, early-stopped on validation
-> Platt calibration on the calibration split -> metrics on the test split
-> ONNX export -> parity check -> (int8: quantize, recalibrate, re-evaluate)
-> a new version in the model repository
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from feature_client.assembly import (
    DENSE_INPUT,
    IDS_INPUT,
    LOGIT_OUTPUT,
    assemble_inputs,
    concatenate_inputs,
)
from feature_client.reference import DriftReference, build_reference
from feature_client.spec import FeatureSpec
from models.calibration import fit_platt
from models.dcn import DCNConfig, DCNv2, LogisticRegression
from models.evaluation import expected_calibration_error, log_loss, roc_auc
from models.export import Parity, check_parity, export_onnx, first_rows, onnx_logits, signature
from models.quantize import QUANTIZATIONS, batch_parity, quantize_int8
from models.request_once import SUFFIX as REQUEST_ONCE_SUFFIX
from models.request_once import RequestOnceDCN, request_shaped
from models.synthetic import SyntheticConfig, SyntheticWorld
from models.train import FitConfig, FitReport, LabelledRows, fit, predict_logits
from service.calibration import Calibration
from service.model_metadata import GoldenRows, ModelMetadata
from service.repository import ModelRepository

GOLDEN_ROWS = 8
PARITY_ROWS = 4096
REQUEST_SHAPED_CANDIDATES = 64
"""Rows per request in the request-shaped half of a request-once export's parity rows."""


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
    init_seed: int | None = None
    """Seed of the weight initialisation (default: `seed`). Changing it alone, with the fit's
    shuffling seed, retrains on the same rows: the spread of AUC that is training noise."""

    def __post_init__(self) -> None:
        for name in ("rows", "validation_rows", "calibration_rows", "test_rows"):
            if getattr(self, name) < 100:
                raise ValueError(f"{name} must be at least 100")


@dataclass
class TrainingData:
    """Four splits of one data set; models trained on the same data share one of these."""

    spec: FeatureSpec
    """The feature spec the rows are encoded with: the published version's."""
    dataset: dict[str, Any]
    """Where the rows come from: the `dataset` section of the published metadata."""
    train: LabelledRows
    validation: LabelledRows
    calibration_rows: LabelledRows
    test: LabelledRows
    baseline: tuple[nn.Module, FitReport] | None = None
    """The logistic-regression baseline, trained by the first model on this data only."""


@dataclass
class TrainedModel:
    """A trained, calibrated and evaluated model, not yet exported."""

    plan: TrainingPlan
    spec: FeatureSpec
    dataset: dict[str, Any]
    model: nn.Module
    calibration: Calibration
    test: LabelledRows
    metrics: dict[str, float]
    model_report: FitReport
    baseline_report: FitReport
    calibration_rows: LabelledRows
    """Kept to recalibrate a quantized export on its own outputs."""
    validation: LabelledRows | None = None
    """Summarised into the drift reference each published version carries."""


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


def _probabilities(model: nn.Module, rows: LabelledRows) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-predict_logits(model, rows.inputs).astype(np.float64)))


def build_data(plan: TrainingPlan) -> TrainingData:
    """Draw the world and the train / validation / calibration / test rows of a plan."""
    world = SyntheticWorld(plan.world)
    offset = plan.seed * 10
    rate = plan.missing_entity_rate
    return TrainingData(
        world.spec,
        {"kind": "synthetic", "config": plan.world.to_dict(), "checksum": world.checksum()},
        train=build_rows(world, plan.rows, offset + 1, rate),
        validation=build_rows(world, plan.validation_rows, offset + 2, rate),
        calibration_rows=build_rows(world, plan.calibration_rows, offset + 3, rate),
        test=build_rows(world, plan.test_rows, offset + 4, rate),
    )


def model_metrics(
    test: LabelledRows, logits: npt.NDArray[np.float32], calibration: Calibration
) -> dict[str, float]:
    """A model's quality on the test rows from its log-odds and calibration."""
    raw = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    calibrated = calibration.apply(logits)
    y = test.labels
    return {
        "auc": roc_auc(y, calibrated),
        "log_loss": log_loss(y, calibrated),
        "calibration_error": expected_calibration_error(y, calibrated),
        "calibration_error_uncalibrated": expected_calibration_error(y, raw),
    }


def held_out_metrics(
    test: LabelledRows,
    logits: npt.NDArray[np.float32],
    calibration: Calibration,
    baseline_probabilities: npt.NDArray[np.float64],
) -> dict[str, float]:
    """Quality on the test rows of a model's log-odds, beside the baseline's and, when the true
    probabilities are known (synthetic data, not logged traffic), the oracle's."""
    y = test.labels
    metrics = model_metrics(test, logits, calibration) | {
        "baseline_auc": roc_auc(y, baseline_probabilities),
        "baseline_log_loss": log_loss(y, baseline_probabilities),
    }
    if test.true_probabilities is not None:
        metrics["oracle_auc"] = roc_auc(y, test.true_probabilities)
        metrics["oracle_log_loss"] = log_loss(y, test.true_probabilities)
    metrics |= {"base_rate": float(y.mean()), "test_rows": float(len(test))}
    if "oracle_auc" in metrics:
        metrics["gap_to_oracle_auc"] = metrics["oracle_auc"] - metrics["auc"]
    metrics["lift_over_baseline_auc"] = metrics["auc"] - metrics["baseline_auc"]
    return metrics


def run_training(
    plan: TrainingPlan, *, progress: bool = True, data: TrainingData | None = None
) -> TrainedModel:
    """Train the baseline and DCN-v2, calibrate, and measure both against the oracle.

    `data` (from `build_data` of a plan with the same sizes and seed) is reused instead of
    drawn again, and so is its baseline once trained: variants compare on the same rows.
    """
    torch.set_num_threads(plan.threads or os.cpu_count() or 1)
    torch.manual_seed(plan.seed if plan.init_seed is None else plan.init_seed)
    data = data or build_data(plan)
    train, validation = data.train, data.validation
    dense_mean = train.inputs.dense.mean(axis=0)
    dense_std = train.inputs.dense.std(axis=0)
    cardinalities = data.spec.cardinalities

    # Both are built before either is fitted (fitting draws from its own generator), so the
    # DCN-v2 starts from the same weights whether or not the baseline is reused.
    baseline: nn.Module = LogisticRegression(cardinalities, dense_mean, dense_std)
    model = DCNv2(cardinalities, dense_mean, dense_std, plan.dcn)
    if data.baseline is None:
        baseline_report = fit(
            baseline,
            train,
            validation,
            plan.baseline_fit,
            description="logistic regression",
            progress=progress,
        )
        data.baseline = (baseline, baseline_report)
    baseline, baseline_report = data.baseline
    model_report = fit(model, train, validation, plan.fit, description="DCN-v2", progress=progress)

    calibration = fit_platt(
        predict_logits(model, data.calibration_rows.inputs), data.calibration_rows.labels
    )
    metrics = held_out_metrics(
        data.test,
        predict_logits(model, data.test.inputs),
        calibration,
        _probabilities(baseline, data.test),
    )
    return TrainedModel(
        plan,
        data.spec,
        data.dataset,
        model,
        calibration,
        data.test,
        metrics,
        model_report,
        baseline_report,
        data.calibration_rows,
        data.validation,
    )


def _golden_rows(
    session: ort.InferenceSession, trained: TrainedModel, calibration: Calibration
) -> GoldenRows:
    dense = trained.test.inputs.dense[:GOLDEN_ROWS]
    ids = trained.test.inputs.ids[:GOLDEN_ROWS]
    (logits,) = session.run([LOGIT_OUTPUT], {DENSE_INPUT: dense, IDS_INPUT: ids})
    return GoldenRows(
        dense=dense.tolist(), ids=ids.tolist(), probabilities=calibration.apply(logits).tolist()
    )


def drift_reference(
    trained: TrainedModel, onnx_path: Path, calibration: Calibration
) -> DriftReference:
    """Validation inputs and the exported file's own calibrated scores, summarised."""
    rows = trained.validation or trained.calibration_rows
    threads = trained.plan.threads or os.cpu_count() or 1
    scores = calibration.apply(onnx_logits(onnx_path, rows.inputs, threads=threads))
    return build_reference(trained.spec, rows.inputs.dense, rows.inputs.ids, scores)


@dataclass(frozen=True)
class Published:
    """What one exported file ships with: its calibration, quality and parity."""

    calibration: Calibration
    metrics: dict[str, float]
    parity: Parity


def _quantized(trained: TrainedModel, fp32_path: Path, int8_path: Path) -> Published:
    """Quantize, then calibrate and evaluate the int8 model on its own onnxruntime outputs."""
    quantize_int8(fp32_path, int8_path)
    threads = trained.plan.threads or os.cpu_count() or 1
    rows, test = trained.calibration_rows, trained.test
    # Quantization moves the log-odds, so the fp32 calibration fits them only roughly: fit one
    # on the int8 model's own outputs, scored in serving-sized batches like the service would.
    calibration = fit_platt(onnx_logits(int8_path, rows.inputs, threads=threads), rows.labels)
    int8_logits = onnx_logits(int8_path, test.inputs, threads=threads)
    fp32_logits = onnx_logits(fp32_path, test.inputs, threads=threads)
    int8_p = calibration.apply(int8_logits)
    difference = np.abs(int8_p - trained.calibration.apply(fp32_logits))
    metrics = trained.metrics | model_metrics(test, int8_logits, calibration)
    if "oracle_auc" in trained.metrics:
        metrics["gap_to_oracle_auc"] = trained.metrics["oracle_auc"] - metrics["auc"]
    metrics |= {
        "lift_over_baseline_auc": metrics["auc"] - trained.metrics["baseline_auc"],
        "fp32_auc": trained.metrics["auc"],
        "fp32_log_loss": trained.metrics["log_loss"],
        "fp32_calibration_error": trained.metrics["calibration_error"],
        "calibration_error_before_recalibration": expected_calibration_error(
            test.labels, trained.calibration.apply(int8_logits)
        ),
        "mean_probability": float(int8_p.mean()),
        "mean_probability_before_recalibration": float(
            trained.calibration.apply(int8_logits).mean()
        ),
        "int8_vs_fp32_max_abs_probability_diff": float(difference.max()),
        "int8_vs_fp32_mean_abs_probability_diff": float(difference.mean()),
    }
    parity = batch_parity(int8_path, first_rows(test.inputs, PARITY_ROWS), calibration)
    return Published(calibration, metrics, parity)


def variant_name(dcn: DCNConfig, quantization: str, request_once: bool = False) -> str:
    """A short label: dcn-v2, dcn-v2-r64, dcn-v2-int8, dcn-v2-r32-mlp128x64-int8-request-once."""
    rank = f"-r{dcn.cross_rank}" if dcn.cross_rank else ""
    default_mlp = DCNConfig().mlp_layers
    mlp = "" if dcn.mlp_layers == default_mlp else "-mlp" + "x".join(map(str, dcn.mlp_layers))
    precision = "" if quantization == "none" else f"-{quantization}"
    return f"dcn-v2{rank}{mlp}{precision}{REQUEST_ONCE_SUFFIX if request_once else ''}"


def export_and_publish(
    trained: TrainedModel,
    repository: ModelRepository,
    name: str,
    *,
    activate: bool = True,
    quantization: str = "none",
    request_once: bool = False,
) -> ModelMetadata:
    """Export to ONNX, check parity, and publish a new version with its metadata.

    `quantization="int8"` publishes the dynamically quantized export instead, recalibrated on
    its own outputs; its parity is its own batch-of-one vs batched output (see batch_parity).
    `request_once` exports the model as a RequestOnceDCN (models/request_once.py).
    """
    (metadata,) = publish_variants(
        trained, repository, name, [quantization], activate=activate, request_once=request_once
    )
    return metadata


def publish_variants(
    trained: TrainedModel,
    repository: ModelRepository,
    name: str,
    quantizations: Sequence[str],
    *,
    activate: bool = False,
    request_once: bool = False,
) -> list[ModelMetadata]:
    """Export once (the slow step), then publish one version per quantization, in order.

    With `request_once` the export is the model's RequestOnceDCN re-parameterisation, and
    parity compares it with the trained model on test rows and on request-shaped rows too.
    """
    for quantization in quantizations:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    parity_rows = first_rows(trained.test.inputs, PARITY_ROWS)
    exported = trained.model
    if request_once:
        if not isinstance(trained.model, DCNv2):
            raise ValueError("--request-once needs a DCN-v2 model")
        exported = RequestOnceDCN(trained.model, trained.spec).eval()
        parity_rows = concatenate_inputs(
            [parity_rows, request_shaped(parity_rows, trained.spec, REQUEST_SHAPED_CANDIDATES)]
        )
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        export_onnx(exported, trained.test.inputs, fp32_path)
        parity = check_parity(trained.model, fp32_path, parity_rows, trained.calibration)
        published = []
        for quantization in quantizations:
            if quantization == "int8":
                onnx_path = Path(tmp) / "model-int8.onnx"
                variant = _quantized(trained, fp32_path, onnx_path)
            else:
                onnx_path, variant = (
                    fp32_path,
                    Published(trained.calibration, trained.metrics, parity),
                )
            published.append(
                _publish(
                    trained,
                    repository,
                    name,
                    onnx_path,
                    variant,
                    _Variant(quantization, request_once),
                    activate,
                )
            )
        return published


@dataclass(frozen=True)
class _Variant:
    quantization: str
    request_once: bool


def _publish(
    trained: TrainedModel,
    repository: ModelRepository,
    name: str,
    onnx_path: Path,
    published: Published,
    variant: _Variant,
    activate: bool,
) -> ModelMetadata:
    spec = trained.spec
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs, outputs = signature(len(spec.dense_names), len(spec.categorical_names))
    plan = trained.plan
    metadata = ModelMetadata(
        name=name,
        version=1,  # the repository assigns the real number
        created_at=datetime.now(UTC),
        sha256="",  # the repository computes it from the stored file
        architecture=variant_name(plan.dcn, variant.quantization, variant.request_once),
        inputs=inputs,
        outputs=outputs,
        feature_spec=spec.to_dict(),
        calibration=published.calibration,
        metrics={k: round(v, 6) for k, v in published.metrics.items()},
        parity=published.parity.as_dict(),
        golden=_golden_rows(session, trained, published.calibration),
        training={
            "rows": plan.rows,
            "validation_rows": plan.validation_rows,
            "calibration_rows": plan.calibration_rows,
            "test_rows": plan.test_rows,
            "missing_entity_rate": plan.missing_entity_rate,
            "seed": plan.seed,
            "init_seed": plan.seed if plan.init_seed is None else plan.init_seed,
            "architecture": trained.plan.dcn.to_dict(),
            "variant": {
                "cross_rank": plan.dcn.cross_rank,
                "mlp_layers": list(plan.dcn.mlp_layers),
                "quantization": variant.quantization,
                "request_once": variant.request_once,
            },
            "fit": asdict(plan.fit),
            "best_epoch": trained.model_report.best_epoch_fraction,
            "stopped_early": trained.model_report.stopped_early,
            "evaluations": trained.model_report.evaluations,
            "seconds": round(trained.model_report.seconds, 1),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        dataset=trained.dataset,
        drift_reference=drift_reference(trained, onnx_path, published.calibration),
    )
    return repository.publish(name, onnx_path, metadata, activate=activate)


def rebuild_drift_reference(
    repository: ModelRepository, name: str, version: int, *, threads: int | None = None
) -> DriftReference:
    """The reference a published synthetic-data version would have got at publish time.

    For versions published before drift monitoring existed: the world, the validation rows and
    the missing-entity rate are drawn again from the metadata's dataset and training sections
    (the same seeds give the same rows), and scored by the version's own model.onnx. Nothing is
    retrained and model.onnx is untouched.
    """
    metadata = repository.read_metadata(name, version)
    dataset, training = metadata.dataset or {}, metadata.training or {}
    if dataset.get("kind") == "prediction_log":
        raise ValueError(
            f"{name} v{version} was trained on the prediction log: its validation rows cannot be "
            "drawn again from seeds (its drift reference is written when it is published)"
        )
    if dataset.get("kind") != "synthetic" or "config" not in dataset:
        raise ValueError(f"{name} v{version} was not trained on the synthetic data set")
    world = SyntheticWorld(SyntheticConfig(**dataset["config"]))
    if world.checksum() != dataset.get("checksum"):
        raise ValueError(f"{name} v{version}: the synthetic world no longer matches its checksum")
    rows = build_rows(
        world,
        int(training["validation_rows"]),
        int(training["seed"]) * 10 + 2,  # build_data's validation seed
        float(training["missing_entity_rate"]),
    )
    logits = onnx_logits(
        repository.model_path(name, version), rows.inputs, threads=threads or os.cpu_count() or 1
    )
    scores = metadata.calibration.apply(logits)
    return build_reference(world.spec, rows.inputs.dense, rows.inputs.ids, scores)
