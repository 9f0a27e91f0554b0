"""Request rows with known outcomes, drawn from a model's synthetic world (demos, tests, the
throughput measurement).

Each row is an impression of `SyntheticWorld.sample`: its ids and context as a client sends them,
the sampled conversion (`label`) and the true probability. `python -m batch_scoring.synthetic
--rows N --output requests.parquet` writes them for the active version of a model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.synthetic import (
    COUNTRIES,
    DEVICES,
    PLACEMENTS,
    SyntheticWorld,
    world_for_model,
)
from service.repository import ModelRepository

# Rows drawn and written at a time: memory stays bounded for any --rows.
WRITE_ROWS = 250_000


def request_table(world: SyntheticWorld, rows: int, seed: int, first_id: int = 0) -> pa.Table:
    """`rows` impressions: impression_id, user_id, ad_id, context columns, label, probability."""
    sample = world.sample(rows, seed)
    context = sample.context_ids - 1  # back from vocabulary ids to positions
    return pa.table(
        {
            "impression_id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
            "user_id": pa.array([world.users.keys[i] for i in sample.user_index], pa.string()),
            "ad_id": pa.array([world.ads.keys[i] for i in sample.ad_index], pa.string()),
            "device": pa.array(np.asarray(DEVICES)[context[:, 0]]),
            "country": pa.array(np.asarray(COUNTRIES)[context[:, 1]]),
            "hour": pa.array(context[:, 2].astype(np.int64)),
            "placement": pa.array(np.asarray(PLACEMENTS)[context[:, 3]]),
            "label": pa.array(sample.label.astype(np.int8)),
            "probability": pa.array(sample.probability),
        }
    )


def write_requests(world: SyntheticWorld, rows: int, path: Path, seed: int = 0) -> int:
    """Write `rows` impressions to a Parquet file, in pieces; returns the rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    try:
        for piece, start in enumerate(range(0, rows, WRITE_ROWS)):
            table = request_table(
                world, min(WRITE_ROWS, rows - start), seed * 10_000 + piece, start
            )
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return rows


def world_of_model(repository: Path, name: str) -> SyntheticWorld:
    """The synthetic world the active version of `name` was trained on."""
    repo = ModelRepository(repository)
    metadata = repo.read_metadata(name, repo.active_version(name))
    return world_for_model(metadata.dataset, metadata.spec().fingerprint())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batch_scoring.synthetic",
        description="Write synthetic request rows (with labels) for a model's synthetic world.",
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--output", type=Path, required=True, help="a .parquet file")
    parser.add_argument("--model-repository", type=Path, default=Path("demo/model_repository"))
    parser.add_argument("--model-name", default="pcvr")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    world = world_of_model(args.model_repository, args.model_name)
    write_requests(world, args.rows, args.output, args.seed)
    print(f"wrote {args.rows} request rows to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
