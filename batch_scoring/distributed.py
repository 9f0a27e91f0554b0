"""The batch scoring function as a Ray Data stage, for inputs beyond one machine.

`score_dataset` adds `map_batches(ChunkScorer)` to a Ray dataset of request rows: an actor
pool, each actor loading the model version once (one onnxruntime session, every load check
included) and opening its own feature source, then calling the same `score_frame` as
`adscore batch-score` on each batch. Ray schedules, retries and spills; nothing here
distributes work by hand. The output rows are the input rows plus the columns batch-score adds.

Submitting to a cluster (the model repository and the input must be readable from every node,
e.g. on shared storage or object storage):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m batch_scoring.distributed --input s3://bucket/requests/ \\
        --output s3://bucket/scores/ --model-repository /mnt/models --model pcvr:3 \\
        --redis-url redis://features:6379/0 --actors 16
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from batch_scoring.errors import BatchError
from batch_scoring.features import FeatureSource, RedisFeatures, SnapshotFeatures
from batch_scoring.reader import csv_convert_options
from batch_scoring.score import score_frame, with_scores

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class ScorerConfig:
    """What each actor needs to build its own model session and feature source."""

    repository: str
    model: str
    redis_url: str | None = None
    namespace: str = "adscore"
    snapshot: str | None = None
    threads: int = 1

    def open_features(self) -> FeatureSource:
        if self.snapshot is not None:
            return SnapshotFeatures(Path(self.snapshot))
        if self.redis_url is None:
            raise BatchError("give a Redis URL or a feature snapshot")
        return RedisFeatures(self.redis_url, self.namespace)


class ChunkScorer:
    """A Ray Data actor: one loaded model version and one feature source for its lifetime."""

    def __init__(self, config: ScorerConfig) -> None:
        from batch_scoring.runner import load_model

        self.features = config.open_features()
        self.model = load_model(
            Path(config.repository), config.model, config.threads, self.features
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return with_scores(self.model, batch, score_frame(self.model, batch, self.features))


def score_dataset(
    dataset: ray.data.Dataset, config: ScorerConfig, *, actors: int, batch_rows: int
) -> ray.data.Dataset:
    """`dataset` with each row scored by an actor pool of `actors` model sessions."""
    import ray.data

    return dataset.map_batches(
        ChunkScorer,
        fn_constructor_args=(config,),
        batch_size=batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=config.threads,
    )


def read_requests(path: str, config: ScorerConfig) -> ray.data.Dataset:
    """Parquet or CSV request rows, CSV typed as `adscore batch-score` types it."""
    import ray.data

    if path.rstrip("/").lower().endswith(".csv"):
        from batch_scoring.runner import load_model

        features = config.open_features()
        try:
            spec = load_model(Path(config.repository), config.model, 1, features).spec
        finally:
            features.close()
        return ray.data.read_csv(path, convert_options=csv_convert_options(spec))
    return ray.data.read_parquet(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batch_scoring.distributed",
        description="Score request rows with Ray Data (an actor pool of model sessions).",
    )
    parser.add_argument("--input", required=True, help="Parquet folder/file, or a CSV file")
    parser.add_argument("--output", required=True, help="folder for the scored Parquet files")
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model", default="pcvr", help="NAME or NAME:VERSION (default pcvr)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--redis-url", help="the online feature store")
    source.add_argument("--features", help="a feature snapshot (adscore export-features)")
    parser.add_argument("--feature-namespace", default="adscore")
    parser.add_argument("--actors", type=int, default=2, help="model sessions (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per actor")
    parser.add_argument("--batch-rows", type=int, default=50_000, help="rows per actor call")
    parser.add_argument("--address", help="Ray cluster address (default: the job's, or local)")
    args = parser.parse_args(argv)

    import ray

    config = ScorerConfig(
        repository=args.model_repository,
        model=args.model,
        redis_url=args.redis_url,
        namespace=args.feature_namespace,
        snapshot=args.features,
        threads=args.threads,
    )
    ray.init(address=args.address)
    try:
        scored = score_dataset(
            read_requests(args.input, config),
            config,
            actors=args.actors,
            batch_rows=args.batch_rows,
        )
        scored.write_parquet(args.output)
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"wrote scored rows to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
