"""The resumable batch job: chunks of requests scored into Parquet parts, with a manifest.

Output folder:
    part-FFFFF-CCCCCC.parquet   the scored rows of chunk C of input file F
    _manifest.jsonl             line 1: the job (model version, inputs, chunk size); then one line
                                per finished chunk, appended once its part is in place
    _summary.json               written when every chunk is done

A part is written under a temporary name and renamed, then recorded; a run that dies leaves at
most a temporary file and loses at most the chunks in flight. A rerun with the same job skips
the chunks the manifest records (and whose part exists) and scores the others. A background
thread reads the next chunk and fetches its features while this one is scored, so the model
rarely waits on Redis; at most `PREFETCH` chunks wait, whatever the input size.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from batch_scoring.errors import BatchError, ManifestMismatch
from batch_scoring.features import FeatureSource
from batch_scoring.reader import InputFile, RequestChunk, iter_chunks
from batch_scoring.score import (
    INFERENCE_ROWS,
    ScoredRows,
    model_inputs,
    score_inputs,
    with_scores,
)
from feature_client.assembly import ModelInputs
from feature_client.codec import DecodedRows
from service.registry import LoadedModel, ModelLoadError, load_version
from service.repository import ModelRepository, RepositoryError
from service.settings import Settings

MANIFEST = "_manifest.jsonl"
SUMMARY = "_summary.json"
PREFETCH = 2
# Equal-width score bins of the summary's quantiles: 1e-5 resolution in 800 KB, whatever the
# row count (bounded memory).
HISTOGRAM_BINS = 100_000
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def load_model(repository: Path, model: str, threads: int, features: FeatureSource) -> LoadedModel:
    """`NAME` (its active version) or `NAME:VERSION`, with every check of the serving load,
    the feature source's schema stamp included."""
    name, _, version_text = model.partition(":")
    repo = ModelRepository(repository)
    try:
        version = int(version_text) if version_text else repo.active_version(name)
        settings = Settings(
            model_repository=repository, intra_op_threads=threads, warmup_batch_sizes=(1,)
        )
        return load_version(repo, name, version, settings, store_stamp=features.schema())
    except ValueError as exc:
        raise BatchError(f"--model {model}: expected NAME or NAME:VERSION") from exc
    except (ModelLoadError, RepositoryError) as exc:
        raise BatchError(f"model {model}: {exc}") from exc


@dataclass(frozen=True)
class ChunkRecord:
    """What the manifest records of a finished chunk."""

    name: str
    rows: int
    missing_user: int
    missing_ad: int
    rejected: int
    seconds: float

    @property
    def part(self) -> str:
        return f"{self.name}.parquet"


@dataclass(frozen=True)
class Manifest:
    job: dict[str, Any]
    chunks: dict[str, ChunkRecord]


def read_manifest(output: Path) -> Manifest | None:
    """The manifest of a previous run in `output`; a torn last line (a crash) is ignored."""
    path = output / MANIFEST
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    try:
        job = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError) as exc:
        raise ManifestMismatch(f"{path}: unreadable manifest; pass --restart") from exc
    chunks: dict[str, ChunkRecord] = {}
    for line in lines[1:]:
        try:
            record = ChunkRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        chunks[record.name] = record
    return Manifest(job, chunks)


def job_identity(model: LoadedModel, files: list[InputFile], chunk_rows: int) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    return {
        "model": model.name,
        "model_version": model.version,
        "model_sha256": model.metadata.sha256,
        "feature_spec": model.spec.fingerprint(),
        "chunk_rows": chunk_rows,
        "inputs": [f.identity() for f in files],
    }


def clear_output(output: Path) -> None:
    """Remove what a previous run wrote (its parts, manifest and summary), nothing else."""
    for path in output.glob("part-*.parquet"):
        path.unlink()
    for path in output.glob(".part-*.tmp"):
        path.unlink()
    for name in (MANIFEST, SUMMARY):
        (output / name).unlink(missing_ok=True)


@dataclass
class ScoreStats:
    """Streaming score distribution: exact count, mean, min and max; binned quantiles."""

    count: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")
    histogram: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    )

    def add(self, scores: npt.NDArray[np.float64]) -> None:
        if not len(scores):
            return
        self.count += len(scores)
        self.total += float(scores.sum())
        self.low = min(self.low, float(scores.min()))
        self.high = max(self.high, float(scores.max()))
        bins = np.minimum((scores * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        self.histogram += np.bincount(bins, minlength=HISTOGRAM_BINS)

    def describe(self) -> dict[str, float]:
        if not self.count:
            return {}
        cumulative = np.cumsum(self.histogram)
        result = {"mean": self.total / self.count, "min": self.low, "max": self.high}
        for q in QUANTILES:
            index = int(np.searchsorted(cumulative, q * self.count))
            result[f"p{round(q * 100)}"] = (index + 0.5) / HISTOGRAM_BINS
        return result


@dataclass(frozen=True)
class RunSummary:
    """The end-of-job report."""

    model: str
    model_version: int
    rows: int
    rows_scored: int
    chunks: int
    chunks_skipped: int
    seconds: float
    missing_user_rows: int
    missing_ad_rows: int
    rejected_values: int
    scores: dict[str, float]

    @property
    def rows_per_second(self) -> float:
        return self.rows_scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "rows": self.rows,
            "rows_scored": self.rows_scored,
            "chunks": self.chunks,
            "chunks_skipped": self.chunks_skipped,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_per_second, 1),
            "missing_user_rows": self.missing_user_rows,
            "missing_ad_rows": self.missing_ad_rows,
            "rejected_values": self.rejected_values,
            "scores": self.scores,
        }

    def lines(self) -> list[str]:
        share = (lambda n: f"{n} ({n / self.rows:.2%})") if self.rows else str
        distribution = "  ".join(f"{k} {v:.5f}" for k, v in self.scores.items())
        return [
            f"model             {self.model} version {self.model_version}",
            f"rows              {self.rows} in {self.chunks} chunks "
            f"({self.chunks_skipped} done by an earlier run)",
            f"scored now        {self.rows_scored} in {self.seconds:.1f} s "
            f"({self.rows_per_second:,.0f} rows/s)",
            f"missing user      {share(self.missing_user_rows)} rows scored on defaults",
            f"missing ad        {share(self.missing_ad_rows)} rows scored on defaults",
            f"rejected vectors  {self.rejected_values} (another schema or corrupt)",
            f"scores            {distribution}",
        ]


@dataclass(frozen=True)
class _Skipped:
    chunk: RequestChunk
    record: ChunkRecord


@dataclass(frozen=True)
class _Prepared:
    chunk: RequestChunk
    inputs: ModelInputs
    user: DecodedRows
    ad: DecodedRows


T = TypeVar("T")


class _Prefetch(Generic[T]):
    """Runs an iterator in a background thread, at most `depth` items ahead of the consumer."""

    _DONE = object()

    def __init__(self, items: Iterator[T], depth: int) -> None:
        self._items = items
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            self._stop.set()
            self._thread.join()


def _write_part(output: Path, name: str, table: pa.Table) -> None:
    temporary = output / f".{name}.tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, output / f"{name}.parquet")


def _append_line(path: Path, data: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_batch(
    model: LoadedModel,
    features: FeatureSource,
    files: list[InputFile],
    output: Path,
    *,
    chunk_rows: int,
    batch_rows: int = INFERENCE_ROWS,
    restart: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Score every request of `files` into `output`, resuming a run of the same job there."""
    output.mkdir(parents=True, exist_ok=True)
    job = job_identity(model, files, chunk_rows)
    if restart:
        clear_output(output)
    previous = read_manifest(output)
    if previous is not None and previous.job != job:
        changed = sorted(
            k for k in job.keys() | previous.job.keys() if job.get(k) != previous.job.get(k)
        )
        raise ManifestMismatch(
            f"{output} holds a run with another {', '.join(changed)}; pass --restart to "
            "discard it, or choose another --output"
        )
    for stale in output.glob(".part-*.tmp"):
        stale.unlink()  # a part a killed run was writing
    manifest = output / MANIFEST
    done = {
        name: record
        for name, record in (previous.chunks if previous else {}).items()
        if (output / record.part).exists()
    }
    if previous is None:
        _append_line(manifest, job)
    (output / SUMMARY).unlink(missing_ok=True)

    def prepare(chunk: RequestChunk) -> _Skipped | _Prepared:
        record = done.get(chunk.name)
        if record is not None and record.rows == chunk.table.num_rows:
            return _Skipped(chunk, record)
        inputs, user, ad = model_inputs(model, chunk.table, features)
        return _Prepared(chunk, inputs, user, ad)

    stats = ScoreStats()
    totals = {"rows": 0, "scored": 0, "chunks": 0, "skipped": 0, "user": 0, "ad": 0, "rej": 0}
    started = time.perf_counter()
    expected = sum(f.rows for f in files)
    work = (prepare(c) for c in iter_chunks(files, model.spec, chunk_rows))
    with tqdm(
        total=expected, desc="batch-score", unit="rows", unit_scale=True, disable=not progress
    ) as bar:
        for item in _Prefetch(work, PREFETCH):
            if isinstance(item, _Skipped):
                record = item.record
                stats.add(
                    pq.read_table(output / record.part, columns=["score"])["score"].to_numpy()
                )
                totals["skipped"] += 1
                bar.total = max(
                    (bar.total or 0) - record.rows, 0
                )  # rate and ETA count this run's rows
                bar.refresh()
            else:
                chunk_started = time.perf_counter()
                scores = score_inputs(model, item.inputs, batch_rows)
                scored = ScoredRows(
                    scores, ~item.user.found, ~item.ad.found, item.user.rejected + item.ad.rejected
                )
                _write_part(output, item.chunk.name, with_scores(model, item.chunk.table, scored))
                record = ChunkRecord(
                    name=item.chunk.name,
                    rows=len(scores),
                    missing_user=int(scored.missing_user.sum()),
                    missing_ad=int(scored.missing_ad.sum()),
                    rejected=scored.rejected,
                    seconds=round(time.perf_counter() - chunk_started, 4),
                )
                _append_line(manifest, record.__dict__)
                stats.add(scores)
                totals["scored"] += record.rows
                bar.update(record.rows)
            totals["rows"] += record.rows
            totals["chunks"] += 1
            totals["user"] += record.missing_user
            totals["ad"] += record.missing_ad
            totals["rej"] += record.rejected
    summary = RunSummary(
        model=model.name,
        model_version=model.version,
        rows=totals["rows"],
        rows_scored=totals["scored"],
        chunks=totals["chunks"],
        chunks_skipped=totals["skipped"],
        seconds=time.perf_counter() - started,
        missing_user_rows=totals["user"],
        missing_ad_rows=totals["ad"],
        rejected_values=totals["rej"],
        scores=stats.describe(),
    )
    (output / SUMMARY).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary
