"""Scoring requests from Parquet or CSV files, read in fixed-size chunks (bounded memory).

A request row has `user_id`, `ad_id` and the context columns the model's feature spec names
(absent ones score as unknown or default, as an absent key does in /v1/score); other columns are
carried to the output unchanged. A folder is read file by file in name order, each file cut into
chunks of exactly `chunk_rows` rows (its last one may be shorter): a chunk's name then denotes
the same rows on every run, which is what resuming relies on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batch_scoring.errors import BatchInputError
from feature_client.spec import FeatureSpec

USER_COLUMN = "user_id"
AD_COLUMN = "ad_id"
REQUIRED_COLUMNS = (USER_COLUMN, AD_COLUMN)
# 8 MiB CSV blocks: large enough for pyarrow's parallel parser, small against a chunk.
CSV_BLOCK_BYTES = 8 << 20

InputFormat = Literal["parquet", "csv"]


@dataclass(frozen=True)
class InputFile:
    """One input file, and what identifies its content for a resumed run."""

    path: Path
    format: InputFormat
    rows: int
    """Exact for Parquet; counted lines for CSV (used for progress only)."""
    size: int
    mtime_ns: int

    def identity(self) -> dict[str, object]:
        return {"path": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class RequestChunk:
    """`table` holds rows [index * chunk_rows, ...) of input file `file_index`."""

    file_index: int
    index: int
    table: pa.Table

    @property
    def name(self) -> str:
        return chunk_name(self.file_index, self.index)


def chunk_name(file_index: int, index: int) -> str:
    return f"part-{file_index:05d}-{index:06d}"


def _format_of(path: Path) -> InputFormat | None:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    return None


def _columns_of(path: Path, fmt: InputFormat) -> tuple[list[str], int]:
    """Column names and row count (counted lines for CSV), or BatchInputError."""
    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(path)
            return parquet.schema_arrow.names, parquet.metadata.num_rows
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        with path.open("rb") as f:
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        return header, max(0, lines - 1)
    except (OSError, pa.ArrowException, UnicodeDecodeError, csv.Error) as exc:
        raise BatchInputError(f"{path}: cannot read it as {fmt}: {exc}") from exc


def list_inputs(path: Path) -> list[InputFile]:
    """The request files at `path` (a file, or a folder of .parquet or .csv files), checked
    for the required columns before anything is scored."""
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p))
        if not candidates:
            raise BatchInputError(f"{path}: no .parquet or .csv files in this folder")
    elif path.is_file():
        if _format_of(path) is None:
            raise BatchInputError(f"{path}: expected a .parquet or .csv file, or a folder of them")
        candidates = [path]
    else:
        raise BatchInputError(f"{path}: no such file or folder")
    files: list[InputFile] = []
    for candidate in candidates:
        fmt = _format_of(candidate)
        assert fmt is not None
        names, rows = _columns_of(candidate, fmt)
        absent = [c for c in REQUIRED_COLUMNS if c not in names]
        if absent:
            raise BatchInputError(
                f"{candidate}: missing column(s) {', '.join(absent)}; a request row needs "
                f"{', '.join(REQUIRED_COLUMNS)} and the context columns"
            )
        stat = candidate.stat()
        files.append(InputFile(candidate.resolve(), fmt, rows, stat.st_size, stat.st_mtime_ns))
    return files


def csv_convert_options(spec: FeatureSpec) -> pacsv.ConvertOptions:
    """Ids and categorical context read as text (as the API receives them), dense context as
    numbers; an empty cell is null, so it scores like an absent context key."""
    types: dict[str, pa.DataType] = {name: pa.string() for name in REQUIRED_COLUMNS}
    types |= {f.name: pa.string() for f in spec.categorical("context")}
    types |= {f.name: pa.float64() for f in spec.dense("context")}
    return pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)


def _batches(file: InputFile, spec: FeatureSpec, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    if file.format == "parquet":
        yield from pq.ParquetFile(file.path).iter_batches(batch_size=chunk_rows)
        return
    reader = pacsv.open_csv(
        file.path,
        read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        convert_options=csv_convert_options(spec),
    )
    yield from reader


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Exactly `rows` rows per table whatever the batch sizes the reader gives (row groups and
    CSV blocks vary), the last one excepted."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows:
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending)


def iter_chunks(
    files: list[InputFile], spec: FeatureSpec, chunk_rows: int
) -> Iterator[RequestChunk]:
    """Every chunk of every file, in order; a file that fails mid-way raises BatchInputError."""
    for file_index, file in enumerate(files):
        try:
            for index, table in enumerate(_rechunk(_batches(file, spec, chunk_rows), chunk_rows)):
                yield RequestChunk(file_index, index, table)
        except (OSError, pa.ArrowException) as exc:
            raise BatchInputError(f"{file.path}: {exc}") from exc
