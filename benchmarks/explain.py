"""What "explain": true costs: a scoring request with and without explanations, no HTTP.

    python -m benchmarks.explain --candidates 8 64 --repeats 200

The demo model (or --repository/--name) scores requests for real users and ads of its synthetic
world through the service's ScoringPipeline (in-process feature store, micro-batcher, one
onnxruntime thread), one request at a time, explained and plain interleaved. Reports the median
and p99 latency of each and their ratio: explaining N candidates scores N x (1 + features) rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from feature_client.memory_store import InMemoryFeatureStore
from models.synthetic import load_world_features, world_for_model
from service.cli import DEMO_REPOSITORY
from service.metrics import Metrics
from service.registry import load_version
from service.repository import ModelRepository
from service.routing import ServingPlan, SinglePlanRouter
from service.scoring import ScoreRequest, ScoringPipeline
from service.settings import Settings

CONTEXT: dict[str, str | int | float] = {
    "device": "ios",
    "country": "US",
    "hour": 20,
    "placement": "feed",
}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def measure(repository: Path, name: str, candidates: list[int], repeats: int) -> list[str]:
    repo = ModelRepository(repository)
    settings = Settings(model_repository=repository, drift_sample_rate=0, inference_threads=1)
    model = load_version(repo, name, repo.active_version(name), settings)
    world = world_for_model(model.metadata.dataset, model.spec.fingerprint())
    store = InMemoryFeatureStore()
    await load_world_features(store, world, spec=model.spec, progress=False)
    pipeline = ScoringPipeline(
        SinglePlanRouter(ServingPlan(name, model)), store, Metrics(CollectorRegistry()), settings
    )
    rng = np.random.default_rng(0)
    features = len(model.spec.features)
    lines = [
        f"model {name} v{model.version}, {features} features, {repeats} requests of each kind",
        "",
        "| candidates | rows scored (explain) | plain p50 | explain p50 | plain p99 | "
        "explain p99 | explain / plain (p50) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in candidates:
        timings: dict[bool, list[float]] = {False: [], True: []}
        for _ in tqdm(range(repeats), desc=f"{n} candidates", unit="pair"):
            user = world.users.keys[int(rng.integers(len(world.users.keys)))]
            ads = [world.ads.keys[int(a)] for a in rng.integers(len(world.ads.keys), size=n)]
            for explain in (False, True):
                started = time.perf_counter()
                await pipeline.score(
                    ScoreRequest(user, ads, CONTEXT, explain=explain, timeout_ms=10_000)
                )
                timings[explain].append((time.perf_counter() - started) * 1000)
        plain, explained = timings[False], timings[True]
        lines.append(
            f"| {n} | {n * (1 + features)} | {statistics.median(plain):.2f} ms | "
            f"{statistics.median(explained):.2f} ms | {percentile(plain, 99):.2f} ms | "
            f"{percentile(explained, 99):.2f} ms | "
            f"{statistics.median(explained) / statistics.median(plain):.1f}x |"
        )
    pipeline.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=DEMO_REPOSITORY)
    parser.add_argument("--name", default="pcvr")
    parser.add_argument("--candidates", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    lines = asyncio.run(measure(args.repository, args.name, args.candidates, args.repeats))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
