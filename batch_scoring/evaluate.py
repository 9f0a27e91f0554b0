"""Offline evaluation of batch scores against outcomes, per model version.

Scores (the Parquet parts of `batch-score`, one or more folders) are joined with labels on key
columns, or read with a label column they already carry; each model version then gets its AUC,
log loss, expected calibration error and a reliability table (equal-count bins: observed
conversion rate against mean score), with the same metrics code as training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from batch_scoring.errors import BatchInputError
from batch_scoring.plotting import pyplot
from models.evaluation import expected_calibration_error, log_loss, roc_auc


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-count bin of scores: how many rows, what they predicted, what happened."""

    rows: int
    mean_score: float
    observed_rate: float


@dataclass(frozen=True)
class VersionReport:
    """The metrics of one model version on the rows it scored."""

    model: str
    model_version: int
    rows: int
    conversions: int
    auc: float
    log_loss: float
    calibration_error: float
    mean_score: float
    observed_rate: float
    reliability: list[ReliabilityBin]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dataset(path: Path, what: str) -> pads.Dataset:
    if not path.exists():
        raise BatchInputError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    fmt = "csv" if any(p.suffix.lower() == ".csv" for p in files) else "parquet"
    try:
        return pads.dataset(path, format=fmt)
    except (OSError, pa.ArrowException) as exc:
        raise BatchInputError(f"{path}: cannot read the {what}: {exc}") from exc


def read_columns(path: Path, what: str, columns: list[str]) -> pa.Table:
    """`columns` of a Parquet/CSV file or folder; BatchInputError names what is missing."""
    dataset = _dataset(path, what)
    absent = [c for c in columns if c not in dataset.schema.names]
    if absent:
        raise BatchInputError(f"{path}: the {what} lack column(s) {', '.join(absent)}")
    try:
        return dataset.to_table(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise BatchInputError(f"{path}: cannot read the {what}: {exc}") from exc


def read_scored(
    scores: Sequence[Path],
    label_column: str,
    labels: Path | None = None,
    on: Sequence[str] = (),
) -> pa.Table:
    """model, model_version, score and the label of every scored row that has one."""
    score_columns = ["model", "model_version", "score"]
    if labels is None:
        tables = [read_columns(p, "scores", [*score_columns, label_column]) for p in scores]
        return pa.concat_tables(tables, promote_options="permissive")
    if not on:
        raise BatchInputError("--on: name the key column(s) that join scores with labels")
    if label_column in on:
        raise BatchInputError(f"--on: the label column {label_column!r} cannot be a join key")
    tables = [read_columns(p, "scores", [*score_columns, *on]) for p in scores]
    scored = pa.concat_tables(tables, promote_options="permissive")
    outcomes = read_columns(labels, "labels", [*on, label_column])
    refuse_duplicate_keys(outcomes, on, labels)
    try:
        joined = scored.join(outcomes, keys=list(on), join_type="inner")
    except pa.ArrowException as exc:
        raise BatchInputError(f"cannot join scores and labels on {', '.join(on)}: {exc}") from exc
    return joined.select([*score_columns, label_column])


def refuse_duplicate_keys(table: pa.Table, on: Sequence[str], path: Path) -> None:
    """A label file must give each key one outcome: a duplicate would count a row twice."""
    distinct = table.group_by(list(on)).aggregate([]).num_rows
    if distinct != table.num_rows:
        raise BatchInputError(
            f"{path}: {table.num_rows - distinct} duplicate key(s) on {', '.join(on)}"
        )


def label_array(table: pa.Table, label_column: str) -> npt.NDArray[np.float64]:
    """The 0/1 label column as floats; BatchInputError for anything else (or a null)."""
    try:
        values = pc.cast(table.column(label_column), pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException as exc:
        raise BatchInputError(f"label column {label_column!r}: not numbers: {exc}") from exc
    if np.isnan(values).any() or not np.isin(values, (0.0, 1.0)).all():
        raise BatchInputError(f"label column {label_column!r}: expected 0 or 1 in every row")
    result: npt.NDArray[np.float64] = values
    return result


def reliability_table(
    labels: npt.NDArray[np.float64], scores: npt.NDArray[np.float64], bins: int
) -> list[ReliabilityBin]:
    """Equal-count bins of the scores (the bins of `expected_calibration_error`)."""
    order = np.argsort(scores, kind="mergesort")
    return [
        ReliabilityBin(len(chunk), float(scores[chunk].mean()), float(labels[chunk].mean()))
        for chunk in np.array_split(order, bins)
        if len(chunk)
    ]


def evaluate(table: pa.Table, label_column: str, bins: int = 10) -> list[VersionReport]:
    """One report per (model, version) present in `table`, in name and version order."""
    labels = label_array(table, label_column)
    scores = table.column("score").to_numpy(zero_copy_only=False)
    models = np.asarray(table.column("model").to_pylist(), dtype=object)
    versions = table.column("model_version").to_numpy(zero_copy_only=False)
    reports: list[VersionReport] = []
    for name, version in sorted({(str(m), int(v)) for m, v in zip(models, versions, strict=True)}):
        rows = (models == name) & (versions == version)
        y, p = labels[rows], scores[rows]
        if y.min() == y.max():
            raise BatchInputError(
                f"{name} v{version}: AUC needs both outcomes, and all {len(y)} labels are {y[0]:g}"
            )
        reports.append(
            VersionReport(
                model=name,
                model_version=version,
                rows=len(y),
                conversions=int(y.sum()),
                auc=roc_auc(y, p),
                log_loss=log_loss(y, p),
                calibration_error=expected_calibration_error(y, p, bins),
                mean_score=float(p.mean()),
                observed_rate=float(y.mean()),
                reliability=reliability_table(y, p, bins),
            )
        )
    return reports


def report_lines(reports: Sequence[VersionReport]) -> list[str]:
    """A Markdown summary table, then each version's reliability table."""
    lines = [
        "| model | version | rows | conversions | AUC | log loss | ECE | mean score | observed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.model_version} | {r.rows} | {r.conversions} | {r.auc:.4f} | "
        f"{r.log_loss:.4f} | {r.calibration_error:.4f} | {r.mean_score:.4f} | "
        f"{r.observed_rate:.4f} |"
        for r in reports
    ]
    for r in reports:
        lines += [
            "",
            f"reliability of {r.model} v{r.model_version} (equal-count bins):",
            "| bin | rows | mean score | observed rate |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {i + 1} | {b.rows} | {b.mean_score:.5f} | {b.observed_rate:.5f} |"
            for i, b in enumerate(r.reliability)
        ]
    return lines


def plot_reliability(reports: Sequence[VersionReport], path: Path) -> None:
    """A reliability diagram (observed rate against mean score, one line per version)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 6))
    top = max(max(b.mean_score, b.observed_rate) for r in reports for b in r.reliability)
    axes.plot([0, top], [0, top], color="grey", linestyle="--", label="perfect calibration")
    for r in reports:
        axes.plot(
            [b.mean_score for b in r.reliability],
            [b.observed_rate for b in r.reliability],
            marker="o",
            label=f"{r.model} v{r.model_version} (AUC {r.auc:.3f}, ECE {r.calibration_error:.4f})",
        )
    axes.set_xlabel("mean predicted pCVR (bin)")
    axes.set_ylabel("observed conversion rate (bin)")
    axes.set_title("Reliability (equal-count bins)")
    axes.legend(loc="upper left", fontsize="small")
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
