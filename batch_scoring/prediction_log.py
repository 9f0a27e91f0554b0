"""Reading the prediction log back: JSON Lines files into columns, one row per logged candidate.

The service writes `.jsonl.open` files and renames them `.jsonl` once closed, so by default only
closed files are read, and a line that does not parse there is an error (`file:line: reason`):
a damaged log must not turn silently into a smaller training set. `.jsonl.open` files are read
on request; their last line may still be half-written, and is skipped when it lacks its newline.
Records of a newer format than this reader knows are skipped and counted (the record's contract).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from tqdm import tqdm

from batch_scoring.errors import BatchInputError
from service.prediction_record import FORMAT, PredictionRecord, RecordError
from service.prediction_sinks import CLOSED_SUFFIX, OPEN_SUFFIX

ObjectArray = npt.NDArray[np.object_]


def _is_open(path: Path) -> bool:
    return path.name.endswith(OPEN_SUFFIX)


def _is_log(path: Path, include_open: bool) -> bool:
    return path.name.endswith(CLOSED_SUFFIX) or (include_open and _is_open(path))


def list_log_files(paths: Sequence[Path], include_open: bool = False) -> list[Path]:
    """The log files at `paths` (files, or folders searched recursively), in name order."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_log(p, include_open))
            if not files:
                skipped = sum(1 for p in path.rglob(f"*{OPEN_SUFFIX}") if p.is_file())
                hint = f" ({skipped} open ones: --include-open reads them)" if skipped else ""
                raise BatchInputError(f"{path}: no {CLOSED_SUFFIX} prediction log files{hint}")
        elif path.is_file():
            if _is_open(path) and not include_open:
                raise BatchInputError(
                    f"{path}: a log file still being written: --include-open reads it"
                )
            if not _is_log(path, include_open=True):
                raise BatchInputError(f"{path}: expected a {CLOSED_SUFFIX} file or a folder")
            files = [path]
        else:
            raise BatchInputError(f"{path}: no such file or folder")
        found.update(dict.fromkeys(files))
    return list(found)


@dataclass(frozen=True)
class LoggedRows:
    """Logged candidate rows as columns: row i is candidate i of its record, in file order."""

    time: npt.NDArray[np.float64]
    """Unix seconds when the request was scored."""
    request_id: ObjectArray
    """str, or None when the client sent none."""
    user_id: ObjectArray
    ad_id: ObjectArray
    model: ObjectArray
    model_version: npt.NDArray[np.int64]
    spec: ObjectArray
    """Fingerprint of the feature spec the row was encoded with."""
    score: npt.NDArray[np.float64]
    degraded: npt.NDArray[np.bool_]
    dense: npt.NDArray[np.float32]
    """[rows, D] model input; [rows, 0] when read without inputs."""
    ids: npt.NDArray[np.int64]
    """[rows, S] model input; [rows, 0] when read without inputs."""

    def __len__(self) -> int:
        return len(self.time)

    def take(self, index: npt.NDArray[np.int64]) -> LoggedRows:
        """The rows at `index`, in that order."""
        return LoggedRows(
            self.time[index], self.request_id[index], self.user_id[index], self.ad_id[index],
            self.model[index], self.model_version[index], self.spec[index], self.score[index],
            self.degraded[index], self.dense[index], self.ids[index],
        )  # fmt: skip


@dataclass
class ReadReport:
    """What reading cost and what it left out."""

    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    records: int = 0
    rows: int = 0
    newer_format: int = 0
    """Records of a format newer than this reader's, skipped."""
    truncated: int = 0
    """Half-written last lines of open files, skipped."""
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"read {self.rows:,} logged rows ({self.records:,} requests) from "
            f"{len(self.files)} file(s), {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
            f"({rate:,.0f} rows/s)"
        ]
        if self.newer_format:
            lines.append(f"skipped {self.newer_format} record(s) of a format newer than {FORMAT}")
        if self.truncated:
            lines.append(f"skipped {self.truncated} half-written last line(s) of open files")
        return lines


def _newer_format(line: bytes) -> bool:
    try:
        version = orjson.loads(line).get("format")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    return isinstance(version, int) and version > FORMAT


def _lines(path: Path, bar: tqdm[Any]) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, whether it ended with a newline), blank lines left out."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            bar.update(len(line))
            if line.strip():
                yield number, line, line.endswith(b"\n")


class _Columns:
    """Per-record values gathered while reading, expanded to per-row columns at the end."""

    def __init__(self, inputs: bool) -> None:
        self.inputs = inputs
        self.counts: list[int] = []
        self.per_record: dict[str, list[object]] = {
            k: [] for k in ("time", "request_id", "user_id", "model", "model_version", "spec",
                            "degraded")
        }  # fmt: skip
        self.ad_ids: list[str] = []
        self.scores: list[npt.NDArray[np.float64]] = []
        self.dense: list[npt.NDArray[np.float32]] = []
        self.ids: list[npt.NDArray[np.int64]] = []
        self.widths: dict[str, tuple[int, int]] = {}

    def add(self, record: PredictionRecord) -> None:
        width = (record.dense.shape[1], record.ids.shape[1])
        known = self.widths.setdefault(record.spec, width)
        if width != known:
            raise RecordError(
                f"inputs of width {width} where earlier rows of spec {record.spec} had {known}"
            )
        self.counts.append(len(record))
        for name, values in self.per_record.items():
            values.append(getattr(record, name))
        self.ad_ids += record.ad_ids
        self.scores.append(record.scores)
        if self.inputs:
            self.dense.append(record.dense)
            self.ids.append(record.ids)

    def rows(self) -> LoggedRows:
        counts = np.asarray(self.counts, dtype=np.int64)
        rows = int(counts.sum())

        def column(name: str, dtype: type[np.generic]) -> Any:
            return np.repeat(np.asarray(self.per_record[name], dtype=dtype), counts)

        if self.inputs and len(set(self.widths.values())) > 1:
            raise BatchInputError(
                f"the log holds rows of {len(self.widths)} feature specs "
                f"({', '.join(sorted(self.widths))}) with different input widths: "
                "read the files of one spec at a time"
            )
        dense, ids = (
            (np.concatenate(self.dense), np.concatenate(self.ids))
            if self.inputs and self.dense
            else (np.zeros((rows, 0), np.float32), np.zeros((rows, 0), np.int64))
        )
        return LoggedRows(
            time=column("time", np.float64),
            request_id=column("request_id", np.object_),
            user_id=column("user_id", np.object_),
            ad_id=np.asarray(self.ad_ids, dtype=np.object_),
            model=column("model", np.object_),
            model_version=column("model_version", np.int64),
            spec=column("spec", np.object_),
            score=np.concatenate(self.scores) if self.scores else np.zeros(0),
            degraded=column("degraded", np.bool_),
            dense=dense,
            ids=ids,
        )


def read_prediction_log(
    paths: Sequence[Path],
    *,
    include_open: bool = False,
    inputs: bool = True,
    progress: bool = True,
) -> tuple[LoggedRows, ReadReport]:
    """Every logged row of the files at `paths`; `inputs=False` skips keeping dense and ids
    (evaluation needs scores only)."""
    files = list_log_files(paths, include_open)
    report = ReadReport(files=files, bytes=sum(p.stat().st_size for p in files))
    started = time.perf_counter()
    columns = _Columns(inputs)
    bar = tqdm(
        total=report.bytes, unit="B", unit_scale=True, desc="reading the prediction log",
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    with bar:
        for path in files:
            is_open = _is_open(path)
            try:
                for number, line, complete in _lines(path, bar):
                    if is_open and not complete:
                        # Only the last line can lack its newline: the writer is mid-line.
                        report.truncated += 1
                        continue
                    try:
                        columns.add(PredictionRecord.decode(line))
                    except RecordError as exc:
                        if _newer_format(line):
                            report.newer_format += 1
                            continue
                        raise BatchInputError(f"{path}:{number}: {exc}") from None
                    report.records += 1
            except OSError as exc:
                raise BatchInputError(f"{path}: cannot read it: {exc}") from exc
    rows = columns.rows()
    report.rows = len(rows)
    report.seconds = time.perf_counter() - started
    return rows, report
