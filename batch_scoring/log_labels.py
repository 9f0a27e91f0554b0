"""Outcomes for logged rows: the prediction log joined with a label file on request and ad id.

A label file (CSV or Parquet, file or folder) names each outcome by the request id the client
sent and the ad id, with a 0/1 label. Conversion feeds often list conversions only, so a logged
row the file does not name is either dropped (`drop`, the default: its outcome is unknown) or
taken as a non-conversion (`negative`). A row logged without a request id cannot be joined at
all; it is counted, never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from batch_scoring.errors import BatchInputError
from batch_scoring.evaluate import label_array, read_columns, refuse_duplicate_keys
from batch_scoring.prediction_log import LoggedRows

Unlabelled = Literal["drop", "negative"]
UNLABELLED: tuple[Unlabelled, ...] = ("drop", "negative")
DEFAULT_KEYS = ("request_id", "ad_id")


@dataclass(frozen=True)
class JoinReport:
    """How many logged rows found an outcome, and what became of the others."""

    logged: int
    without_request_id: int
    labelled: int
    unlabelled: int
    """Joinable rows the label file does not name."""
    unlabelled_as: Unlabelled
    unmatched_labels: int
    """Label keys that match no logged row (logged elsewhere, or not sampled)."""

    @property
    def kept(self) -> int:
        return self.labelled + (self.unlabelled if self.unlabelled_as == "negative" else 0)

    def lines(self) -> list[str]:
        fate = "taken as negatives" if self.unlabelled_as == "negative" else "dropped"
        return [
            f"logged rows: {self.logged:,}",
            f"  without a request id (cannot be joined, dropped): {self.without_request_id:,}",
            f"  labelled: {self.labelled:,}",
            f"  without a label ({fate}): {self.unlabelled:,}",
            f"  kept: {self.kept:,}",
            f"labels matching no logged row: {self.unmatched_labels:,}",
        ]


@dataclass(frozen=True)
class LabelledLog:
    """Logged rows with their 0/1 outcome, in log order."""

    rows: LoggedRows
    labels: npt.NDArray[np.float32]
    report: JoinReport

    def __len__(self) -> int:
        return len(self.labels)


def _outcomes(path: Path, on: Sequence[str], label_column: str) -> pa.Table:
    """The label file as (request_id, ad_id, label), keys as text, one row per key."""
    if len(on) != 2:
        raise BatchInputError(
            f"--on: name the label file's request id and ad id columns (two names, got {len(on)})"
        )
    if label_column in on:
        raise BatchInputError(f"--on: the label column {label_column!r} cannot be a join key")
    table = read_columns(path, "labels", [*on, label_column])
    keys = []
    for name in on:
        column = table.column(name)
        if column.null_count:
            raise BatchInputError(f"{path}: {column.null_count} label row(s) have no {name}")
        try:  # numeric ids in a CSV read as integers; logged ids are text
            keys.append(pc.cast(column, pa.string()))
        except pa.ArrowException as exc:
            raise BatchInputError(f"{path}: column {name!r} is not an id: {exc}") from exc
    refuse_duplicate_keys(table, on, path)
    values = label_array(table, label_column)
    return pa.table({DEFAULT_KEYS[0]: keys[0], DEFAULT_KEYS[1]: keys[1], "label": values})


def join_labels(
    rows: LoggedRows,
    path: Path,
    *,
    label_column: str = "label",
    on: Sequence[str] = DEFAULT_KEYS,
    unlabelled: Unlabelled = "drop",
) -> LabelledLog:
    """The logged rows that get an outcome from the label file at `path` (see the module)."""
    outcomes = _outcomes(path, on, label_column)
    request_ids = pa.array(rows.request_id, pa.string())
    joinable = np.flatnonzero(request_ids.is_valid().to_numpy(zero_copy_only=False))
    logged = pa.table(
        {
            DEFAULT_KEYS[0]: request_ids.take(pa.array(joinable)),
            DEFAULT_KEYS[1]: pa.array(rows.ad_id[joinable], pa.string()),
            "_row": pa.array(joinable, pa.int64()),
        }
    )
    joined = logged.join(outcomes, keys=list(DEFAULT_KEYS), join_type="left outer")
    order = np.argsort(joined.column("_row").to_numpy(), kind="stable")
    joined = joined.take(pa.array(order))
    index = joined.column("_row").to_numpy()
    labels = joined.column("label").to_numpy(zero_copy_only=False)  # null -> NaN
    found = ~np.isnan(labels)
    matched_keys = joined.filter(pa.array(found)).group_by(list(DEFAULT_KEYS)).aggregate([])
    report = JoinReport(
        logged=len(rows),
        without_request_id=len(rows) - len(joinable),
        labelled=int(found.sum()),
        unlabelled=int((~found).sum()),
        unlabelled_as=unlabelled,
        unmatched_labels=outcomes.num_rows - matched_keys.num_rows,
    )
    if unlabelled == "negative":
        labels = np.where(found, labels, 0.0)
    else:
        index, labels = index[found], labels[found]
    return LabelledLog(rows.take(index), labels.astype(np.float32), report)
