"""Training data from the prediction log: the rows the service scored, joined with outcomes.

The logged rows are the served model's exact inputs, so a model trained on them sees what it will
be served (no training/serving skew), encoded with the logged versions' own feature spec (found
in the model repository and checked by fingerprint). They are split by time, never at random:
the oldest rows train, the newest test, so the test measures the model on traffic newer than
anything it learned from, as production will (a random split lets tomorrow's users and ads leak
into training and flatters the test AUC).
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from batch_scoring.errors import BatchInputError
from batch_scoring.log_labels import LabelledLog
from batch_scoring.prediction_log import LoggedRows
from feature_client.assembly import ModelInputs
from feature_client.spec import FeatureSpec
from models.pipeline import TrainingData, TrainingPlan
from models.train import LabelledRows
from service.repository import ModelRepository, VersionNotFound

SPLITS = ("train", "validation", "calibration", "test")
FRACTIONS = (0.7, 0.1, 0.1, 0.1)
MIN_LABELLED_ROWS = 1_000
"""Fewer leave the validation, calibration and test splits too small to mean anything."""
MIN_SPLIT_ROWS = 100


def logged_spec(repository: ModelRepository, rows: LoggedRows) -> FeatureSpec:
    """The feature spec the rows were encoded with, from the logged versions' metadata."""
    fingerprints = sorted(set(rows.spec.tolist()))
    if len(fingerprints) != 1:
        raise BatchInputError(
            f"the log holds rows of {len(fingerprints)} feature specs ({', '.join(fingerprints)}):"
            " train on the files of one spec at a time"
        )
    (fingerprint,) = fingerprints
    versions = sorted(
        {(str(m), int(v)) for m, v in zip(rows.model, rows.model_version, strict=True)}
    )
    spec: FeatureSpec | None = None
    for name, version in versions:
        try:
            candidate = repository.read_metadata(name, version).spec()
        except VersionNotFound:
            continue  # removed since: another logged version may still tell the spec
        if candidate.fingerprint() != fingerprint:
            raise BatchInputError(
                f"{name} v{version} in {repository.root} has feature spec "
                f"{candidate.fingerprint()}, its logged rows say {fingerprint}: "
                "is this the repository that served them?"
            )
        spec = candidate
    if spec is None:
        logged = ", ".join(f"{n} v{v}" for n, v in versions)
        raise BatchInputError(
            f"none of the logged versions ({logged}) is in {repository.root}: training needs the "
            "feature spec they logged their rows with"
        )
    return spec


def time_splits(times: npt.NDArray[np.float64]) -> list[npt.NDArray[np.int64]]:
    """Row indices of the train, validation, calibration and test splits, oldest rows first."""
    order = np.argsort(times, kind="stable")
    ordered = times[order]
    cuts = (np.cumsum(FRACTIONS)[:-1] * len(order)).astype(np.int64)
    # Back to the first row of the cut's instant: a request's candidates share one time and so
    # stay in one split.
    cuts = np.searchsorted(ordered, ordered[np.minimum(cuts, len(order) - 1)], side="left")
    return list(np.split(order, cuts))


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _checksum(splits: list[LabelledRows]) -> str:
    digest = hashlib.sha256()
    for split in splits:
        for array in (split.inputs.dense, split.inputs.ids, split.labels):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def training_data_from_log(
    labelled: LabelledLog, spec: FeatureSpec, *, files: int, labels_name: str
) -> TrainingData:
    """The labelled rows split by time into training data, with the `dataset` metadata that
    says where they came from. Rows scored while degraded (on defaults, for a timed-out feature
    fetch) are left out: their inputs say nothing of the entities they were served for."""
    degraded = int(labelled.rows.degraded.sum())
    usable = np.flatnonzero(~labelled.rows.degraded)
    rows, labels = labelled.rows.take(usable), labelled.labels[usable]
    if len(rows) < MIN_LABELLED_ROWS:
        raise BatchInputError(
            f"{len(rows):,} labelled rows to train on ({degraded:,} degraded ones left out); "
            f"training from the log needs at least {MIN_LABELLED_ROWS:,}: log more traffic "
            "(prediction_log_sample_rate) or join more labels"
        )
    if rows.dense.shape[1] != len(spec.dense_names) or rows.ids.shape[1] != len(
        spec.categorical_names
    ):
        raise BatchInputError(
            f"the logged inputs are {rows.dense.shape[1]} dense and {rows.ids.shape[1]} id "
            f"columns, the feature spec has {len(spec.dense_names)} and "
            f"{len(spec.categorical_names)}"
        )
    splits: list[LabelledRows] = []
    described: dict[str, Any] = {}
    for name, index in zip(SPLITS, time_splits(rows.time), strict=True):
        y = labels[index]
        if len(y) < MIN_SPLIT_ROWS:
            raise BatchInputError(
                f"the {name} split has {len(y)} rows: too many rows share a few instants to "
                f"split {len(rows):,} rows by time"
            )
        if not 0 < y.sum() < len(y):
            raise BatchInputError(
                f"the {name} split ({len(y):,} rows by time) holds one outcome only: training "
                "needs conversions and non-conversions in each of train, validation, calibration "
                "and test (log more traffic, or check the labels)"
            )
        times = rows.time[index]
        described[name] = {
            "rows": len(index),
            "time_range": [_iso(float(times.min())), _iso(float(times.max()))],
        }
        splits.append(LabelledRows(ModelInputs(rows.dense[index], rows.ids[index]), y))
    versions = sorted({f"{m}:{v}" for m, v in zip(rows.model, rows.model_version, strict=True)})
    dataset = {
        "kind": "prediction_log",
        "rows": len(rows),
        "time_range": [_iso(float(rows.time.min())), _iso(float(rows.time.max()))],
        "files": files,
        "labels": labels_name,
        "checksum": _checksum(splits),
        "logged_by": versions,
        "degraded_rows_left_out": degraded,
        "splits": described,
    }
    train, validation, calibration, test = splits
    return TrainingData(spec, dataset, train, validation, calibration, test)


def log_plan(plan: TrainingPlan, data: TrainingData) -> TrainingPlan:
    """`plan` with the split sizes the log gave. No rows are blanked to defaults: the log holds
    the missing users and ads that traffic really had."""
    return dataclasses.replace(
        plan,
        rows=len(data.train),
        validation_rows=len(data.validation),
        calibration_rows=len(data.calibration_rows),
        test_rows=len(data.test),
        missing_entity_rate=0.0,
    )
