"""Bulk loading of entity features into a feature store, in pipelined batches with progress.

Sources: arrays already encoded (the synthetic data set), or a CSV / Parquet file with one row
per entity, an id column and one column per feature of that entity in the spec. Raw
categorical values are encoded with the spec (vocabulary or hash); empty cells take defaults.
Files are read in chunks, so memory stays bounded whatever their size.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from feature_client.codec import EntityCodec
from feature_client.spec import FeatureSource, FeatureSpec
from feature_client.store import FeatureStore, SchemaStamp

logger = logging.getLogger("adscore.loader")

DEFAULT_BATCH_SIZE = 5_000


class FeatureFileError(ValueError):
    """A feature file cannot be read or lacks a column the spec needs."""


@dataclass(frozen=True)
class EntityBatch:
    """Encoded features of a batch of entities of one kind."""

    keys: list[str]
    dense: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int32]


async def write_batch(store: FeatureStore, codec: EntityCodec, batch: EntityBatch) -> None:
    values = codec.encode(batch.dense, batch.ids)
    layout = store.keys
    await store.write(
        [
            (layout.entity(codec.source, key), value)
            for key, value in zip(batch.keys, values, strict=True)
        ]
    )


async def load_arrays(
    store: FeatureStore,
    spec: FeatureSpec,
    source: FeatureSource,
    batch: EntityBatch,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> int:
    """Write already-encoded entities; returns how many were written."""
    codec = EntityCodec(spec, source)
    total = len(batch.keys)
    with tqdm(total=total, desc=f"loading {source}s", unit="rows", disable=not progress) as bar:
        for start in range(0, total, batch_size):
            stop = start + batch_size
            await write_batch(
                store,
                codec,
                EntityBatch(batch.keys[start:stop], batch.dense[start:stop], batch.ids[start:stop]),
            )
            bar.update(min(stop, total) - start)
    return total


def _count_csv_rows(path: Path) -> int:
    with path.open("rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    return max(0, lines - 1)


def _csv_chunks(path: Path, batch_size: int) -> Iterator[list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        chunk: list[dict[str, str]] = []
        for row in reader:
            chunk.append(row)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _parquet_chunks(path: Path, batch_size: int) -> tuple[int, Iterator[dict[str, list[Any]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise FeatureFileError(
            "reading Parquet needs pyarrow: pip install 'adscore[parquet]'"
        ) from exc
    parquet = pq.ParquetFile(path)
    rows = parquet.metadata.num_rows
    return rows, (b.to_pydict() for b in parquet.iter_batches(batch_size=batch_size))


def _columns_of(chunk: list[dict[str, str]] | dict[str, list[Any]]) -> dict[str, list[Any]]:
    if isinstance(chunk, dict):
        return chunk
    if not chunk:
        return {}
    return {name: [row[name] for row in chunk] for name in chunk[0]}


def encode_columns(
    spec: FeatureSpec, source: FeatureSource, columns: dict[str, list[Any]], id_column: str
) -> EntityBatch:
    """Encode raw columns of one entity kind; missing cells take the spec's defaults."""
    needed = (
        [id_column]
        + [f.name for f in spec.dense(source)]
        + [f.name for f in spec.categorical(source)]
    )
    absent = [name for name in needed if name not in columns]
    if absent:
        raise FeatureFileError(
            f"{source} features: missing column(s) {', '.join(absent)}; "
            f"expected {', '.join(needed)}"
        )
    keys = [str(k) for k in columns[id_column]]
    if any(not k for k in keys):
        raise FeatureFileError(f"{source} features: empty value in id column {id_column!r}")
    rows = len(keys)
    dense = np.empty((rows, len(spec.dense(source))), dtype=np.float32)
    for j, feature in enumerate(spec.dense(source)):
        try:
            dense[:, j] = [
                feature.default if v is None or v == "" else float(v) for v in columns[feature.name]
            ]
        except ValueError as exc:
            raise FeatureFileError(f"column {feature.name}: {exc}") from exc
    ids = np.empty((rows, len(spec.categorical(source))), dtype=np.int32)
    for j, cat in enumerate(spec.categorical(source)):
        ids[:, j] = [
            0 if v is None or v == "" else cat.encode_one(str(v)) for v in columns[cat.name]
        ]
    return EntityBatch(keys, dense, ids)


def iter_entity_file(
    spec: FeatureSpec,
    source: FeatureSource,
    path: Path,
    *,
    id_column: str = "id",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[int, Iterator[EntityBatch]]:
    """The row count of a CSV or Parquet file of one entity kind, and its encoded batches."""
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such file")
    chunks: Iterator[list[dict[str, str]]] | Iterator[dict[str, list[Any]]]
    if path.suffix.lower() in (".parquet", ".pq"):
        total, chunks = _parquet_chunks(path, batch_size)
    elif path.suffix.lower() == ".csv":
        total, chunks = _count_csv_rows(path), _csv_chunks(path, batch_size)
    else:
        raise FeatureFileError(f"{path}: expected a .csv or .parquet file")
    batches = (encode_columns(spec, source, _columns_of(c), id_column) for c in chunks)
    return total, batches


async def load_file(
    store: FeatureStore,
    spec: FeatureSpec,
    source: FeatureSource,
    path: Path,
    *,
    id_column: str = "id",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> int:
    """Load a CSV or Parquet file of one entity kind; returns how many rows were written.

    File reading blocks between writes: this is a bulk command, not code on the serving loop.
    """
    total, batches = iter_entity_file(
        spec, source, path, id_column=id_column, batch_size=batch_size
    )
    codec = EntityCodec(spec, source)
    written = 0
    with tqdm(total=total, desc=f"loading {path.name}", unit="rows", disable=not progress) as bar:
        for batch in batches:
            await write_batch(store, codec, batch)
            written += len(batch.keys)
            bar.update(len(batch.keys))
    return written


async def stamp_schema(store: FeatureStore, spec: FeatureSpec) -> None:
    """Record which spec the stored features follow; warn when it replaces another."""
    stamp = SchemaStamp.of(spec)
    previous = await store.read_schema()
    if previous is not None and previous != stamp:
        logger.warning(
            "feature store schema changes from version %d (%s) to %d (%s)",
            previous.schema_version,
            previous.fingerprint,
            stamp.schema_version,
            stamp.fingerprint,
        )
    await store.write_schema(stamp)
