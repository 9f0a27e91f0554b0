"""Rows per second of batch scoring against onnxruntime's in-process limit, on the same rows.

    python -m batch_scoring.throughput --rows 1000000

Draws `--rows` request rows from the demo model's synthetic world, loads its features into a
private redis-server, then times (1) `run_batch` reading features from Redis, (2) `run_batch`
reading them from a Parquet snapshot, and (3) the limit: `score_inputs` alone on the model
inputs of the same rows, assembled beforehand (no reading, fetching, decoding or writing), with
the same onnxruntime threads and rows per call. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from batch_scoring.features import RedisFeatures, SnapshotFeatures, write_snapshot
from batch_scoring.reader import iter_chunks, list_inputs
from batch_scoring.runner import load_model, run_batch
from batch_scoring.score import model_inputs, score_inputs
from batch_scoring.synthetic import world_of_model, write_requests
from feature_client.assembly import ModelInputs
from feature_client.redis_server import LocalRedisServer
from feature_client.redis_store import RedisFeatureStore
from models.synthetic import load_world_features


def _load(url: str, repository: Path, name: str) -> None:
    async def load() -> None:
        store = RedisFeatureStore.from_url(url, "adscore", 30.0)
        try:
            await load_world_features(store, world_of_model(repository, name), progress=False)
        finally:
            await store.close()

    asyncio.run(load())


def measure(
    repository: Path, name: str, rows: int, chunk_rows: int, threads: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="adscore-throughput-") as scratch_dir:
        scratch = Path(scratch_dir)
        write_requests(world_of_model(repository, name), rows, scratch / "requests.parquet")
        files = list_inputs(scratch / "requests.parquet")
        with LocalRedisServer() as server:
            _load(server.url, repository, name)
            redis_features = RedisFeatures(server.url)
            model = load_model(repository, name, threads, redis_features)
            from_redis = run_batch(
                model, redis_features, files, scratch / "redis", chunk_rows=chunk_rows
            )
            redis_features.close()
            write_snapshot(server.url, "adscore", scratch / "features.parquet", progress=False)
        snapshot = SnapshotFeatures(scratch / "features.parquet")
        from_snapshot = run_batch(
            model, snapshot, files, scratch / "snapshot", chunk_rows=chunk_rows
        )
        prepared = [
            model_inputs(model, chunk.table, snapshot)[0]
            for chunk in iter_chunks(files, model.spec, chunk_rows)
        ]
        inputs = ModelInputs(
            np.concatenate([p.dense for p in prepared]), np.concatenate([p.ids for p in prepared])
        )
        del prepared
        started = time.perf_counter()
        score_inputs(model, inputs)
        limit = rows / (time.perf_counter() - started)
    return {
        "rows": rows,
        "chunk_rows": chunk_rows,
        "threads": threads,
        "redis_rows_per_second": from_redis.rows_per_second,
        "snapshot_rows_per_second": from_snapshot.rows_per_second,
        "in_process_limit_rows_per_second": limit,
        "redis_ratio": from_redis.rows_per_second / limit,
        "snapshot_ratio": from_snapshot.rows_per_second / limit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_scoring.throughput")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model-repository", type=Path, default=Path("demo/model_repository"))
    parser.add_argument("--model-name", default="pcvr")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    result = measure(
        args.model_repository, args.model_name, args.rows, args.chunk_rows, args.threads
    )
    limit = result["in_process_limit_rows_per_second"]
    print(
        f"\n{args.rows:,} rows, chunks of {args.chunk_rows:,}, {args.threads} onnxruntime threads"
    )
    print("| path | rows/s | vs in-process limit |")
    print("|---|---|---|")
    print(f"| batch-score, features from Redis | {result['redis_rows_per_second']:,.0f} | "
          f"{result['redis_ratio']:.2f} |")  # fmt: skip
    snapshot, ratio = result["snapshot_rows_per_second"], result["snapshot_ratio"]
    print(f"| batch-score, features from a Parquet snapshot | {snapshot:,.0f} | {ratio:.2f} |")
    print(f"| onnxruntime in-process limit (inputs assembled beforehand) | {limit:,.0f} | 1.00 |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
