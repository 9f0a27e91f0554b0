"""Model decay: the quality of logged scores against outcomes, per model version and UTC bucket.

A model is trained on the past and scores the present; as traffic moves away from what it saw,
its ranking (AUC) and its calibration (mean score against the observed rate) drift. Each
(model, version, hour / day / week) gets the metrics of the offline evaluation, computed by the
same code as training's. A bucket whose rows all share one outcome has no AUC (n/a); it is still
reported, since its rows, rate and log loss mean something.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from batch_scoring.errors import BatchInputError
from batch_scoring.log_labels import LabelledLog
from batch_scoring.plotting import pyplot
from models.evaluation import expected_calibration_error, log_loss, roc_auc

Granularity = Literal["hour", "day", "week"]
GRANULARITIES: tuple[Granularity, ...] = ("hour", "day", "week")
_SECONDS = {"hour": 3600, "day": 86_400, "week": 7 * 86_400}
# 1970-01-01 was a Thursday: weeks start on the Monday four days later (ISO weeks).
_WEEK_ORIGIN = 4 * 86_400


@dataclass(frozen=True)
class BucketReport:
    """The metrics of one model version's rows scored within one UTC bucket."""

    model: str
    model_version: int
    bucket: str
    start: str
    """The bucket's first instant, ISO 8601 UTC."""
    rows: int
    conversions: int
    auc: float | None
    """None when the bucket holds one outcome only."""
    log_loss: float
    calibration_error: float
    mean_score: float
    observed_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bucket_starts(times: npt.NDArray[np.float64], by: Granularity) -> npt.NDArray[np.int64]:
    """The Unix second each time's UTC bucket starts at."""
    width = _SECONDS[by]
    origin = _WEEK_ORIGIN if by == "week" else 0
    seconds = np.floor(times).astype(np.int64) - origin
    starts: npt.NDArray[np.int64] = seconds // width * width + origin
    return starts


def bucket_name(start: int, by: Granularity) -> str:
    moment = datetime.fromtimestamp(start, UTC)
    if by == "hour":
        return moment.strftime("%Y-%m-%d %H:00")
    if by == "day":
        return moment.strftime("%Y-%m-%d")
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def evaluate_decay(
    labelled: LabelledLog, by: Granularity = "day", bins: int = 10
) -> list[BucketReport]:
    """One report per (model, version, bucket) present, in name, version and time order."""
    if by not in _SECONDS:
        raise BatchInputError(f"--by: one of {', '.join(GRANULARITIES)}, not {by!r}")
    rows = labelled.rows
    labels = labelled.labels.astype(np.float64)
    starts = bucket_starts(rows.time, by)
    names, name_codes = np.unique(rows.model.astype(str), return_inverse=True)
    # Sorting by (name, version, start) groups each bucket's rows together, in report order.
    groups, inverse = np.unique(
        np.stack([name_codes, rows.model_version, starts]), axis=1, return_inverse=True
    )
    order = np.argsort(inverse.reshape(-1), kind="stable")
    ends = np.cumsum(np.bincount(inverse.reshape(-1), minlength=groups.shape[1]))
    reports = []
    for (code, version, start), end, size in zip(
        groups.T.tolist(), ends.tolist(), np.diff(ends, prepend=0).tolist(), strict=True
    ):
        members = order[end - size : end]
        y, p = labels[members], rows.score[members]
        reports.append(
            BucketReport(
                model=str(names[code]),
                model_version=version,
                bucket=bucket_name(start, by),
                start=datetime.fromtimestamp(start, UTC).isoformat(),
                rows=len(y),
                conversions=int(y.sum()),
                auc=roc_auc(y, p) if 0 < y.sum() < len(y) else None,
                log_loss=log_loss(y, p),
                calibration_error=expected_calibration_error(y, p, bins),
                mean_score=float(p.mean()),
                observed_rate=float(y.mean()),
            )
        )
    return reports


def decay_lines(reports: Sequence[BucketReport], by: Granularity) -> list[str]:
    """A Markdown table, one line per version and bucket."""
    lines = [
        f"| model | version | {by} (UTC) | rows | conversions | AUC | log loss | ECE | "
        "mean score | observed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        auc = "n/a" if r.auc is None else f"{r.auc:.4f}"
        lines.append(
            f"| {r.model} | {r.model_version} | {r.bucket} | {r.rows} | {r.conversions} | {auc} | "
            f"{r.log_loss:.4f} | {r.calibration_error:.4f} | {r.mean_score:.4f} | "
            f"{r.observed_rate:.4f} |"
        )
    return lines


def plot_decay(reports: Sequence[BucketReport], path: Path) -> None:
    """AUC (top) and mean score against the observed rate (bottom) over time, per version."""
    plt = pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    versions = sorted({(r.model, r.model_version) for r in reports})
    for index, (name, version) in enumerate(versions):
        own = [r for r in reports if (r.model, r.model_version) == (name, version)]
        when = [datetime.fromisoformat(r.start) for r in own]
        color = f"C{index % 10}"
        label = f"{name} v{version}"
        auc = [np.nan if r.auc is None else r.auc for r in own]  # a gap where there is none
        top.plot(when, auc, marker="o", color=color, label=label)
        bottom.plot(when, [r.mean_score for r in own], marker="o", color=color,
                    label=f"{label} mean score")  # fmt: skip
        bottom.plot(when, [r.observed_rate for r in own], marker="x", linestyle="--",
                    color=color, label=f"{label} observed rate")  # fmt: skip
    top.axhline(0.5, color="grey", linestyle=":", label="chance")
    top.set_ylabel("AUC")
    top.set_title("Model decay by time bucket (UTC)")
    bottom.set_ylabel("conversion rate")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize="small")
    figure.autofmt_xdate()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
