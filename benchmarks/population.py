"""The benchmark's users, ads and request mix.

A synthetic world larger than the demo's (100k users, 200k ads by default), drawn with the served
model's hash buckets and vocabularies so its features encode exactly as the model expects, and
a fixed list of requests: Zipf-popular users and ads, 16-512 candidates (log-uniform) or a fixed
count. Every service and the in-process limit get the same requests in the same order.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson

from feature_client.redis_store import RedisFeatureStore
from feature_client.spec import FeatureSpec
from models.synthetic import SyntheticConfig, SyntheticWorld, load_world_features
from service.cli import DEMO_REPOSITORY
from service.model_metadata import ModelMetadata
from service.repository import ModelRepository, RepositoryError

CONTEXT_DEVICES = ("ios", "android", "web")
CONTEXT_PLACEMENTS = ("feed", "story", "search", "banner")


@dataclass(frozen=True)
class ScoreCall:
    """One request of the mix: its ids and its JSON body."""

    user_id: str
    ad_ids: list[str]
    body: bytes


def bench_world(metadata: ModelMetadata, users: int, ads: int) -> SyntheticWorld:
    """A world of the given size with the model's buckets (so its spec encodes identically)."""
    base = synthetic_config(metadata)
    return SyntheticWorld(replace(base, users=users, ads=ads, seed=base.seed + 1000))


def synthetic_config(metadata: ModelMetadata) -> SyntheticConfig:
    """The synthetic world the model was trained on; ValueError when it was not."""
    config = (metadata.dataset or {}).get("config")
    if not isinstance(config, dict):
        raise ValueError(
            f"{metadata.name} v{metadata.version} was not trained on the synthetic data set: the "
            "benchmarks draw their users and ads from it (train one with `adscore train`)"
        )
    return SyntheticConfig(**{str(k): int(v) for k, v in config.items()})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model-repository and --model: which model the benchmark serves and draws traffic for."""
    parser.add_argument(
        "--model-repository", type=Path, default=DEMO_REPOSITORY,
        help="repository of the model to serve (default: the demo model's)",
    )  # fmt: skip
    parser.add_argument("--model", default="pcvr", help="model name, its active version serves")


def parse_setting(text: str) -> tuple[str, str]:
    """'max_in_flight=32' -> ('max_in_flight', '32'): an adscore setting as in README,
    Configuration, without the ADSCORE_ prefix."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected setting=value")
    return name.strip(), value.strip()


def active_model(repository: Path, name: str) -> ModelMetadata:
    """The active version's metadata; a clear exit when it cannot be benchmarked."""
    try:
        models = ModelRepository(repository)
        metadata = models.read_metadata(name, models.active_version(name))
        synthetic_config(metadata)
    except (RepositoryError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    return metadata


def load_population(redis_url: str, world: SyntheticWorld, spec: FeatureSpec) -> int:
    async def load() -> int:
        store = RedisFeatureStore.from_url(redis_url, "adscore", 30.0)
        try:
            return await load_world_features(store, world, spec=spec, progress=True)
        finally:
            await store.close()

    return asyncio.run(load())


def request_mix(
    world: SyntheticWorld,
    count: int,
    *,
    candidates: int | None = None,
    smallest: int = 16,
    largest: int = 512,
    seed: int = 0,
) -> list[ScoreCall]:
    """`count` requests of `candidates` ads each, or of a log-uniform count in [smallest,
    largest]."""
    rng = np.random.default_rng(seed)
    if candidates is None:
        sizes = np.exp(rng.uniform(np.log(smallest), np.log(largest + 1), count)).astype(int)
        sizes = np.clip(sizes, smallest, largest)
    else:
        sizes = np.full(count, candidates)
    users = rng.choice(len(world.users.keys), count, p=world.user_weights)
    pool = iter(rng.choice(len(world.ads.keys), int(sizes.sum()) * 3, p=world.ad_weights))
    calls: list[ScoreCall] = []
    for i, size in enumerate(sizes):
        user_id = world.users.keys[users[i]]
        chosen: dict[int, None] = {}  # an auction's candidates are distinct ads
        while len(chosen) < size:
            chosen.setdefault(int(next(pool)))
        ad_ids = [world.ads.keys[a] for a in chosen]
        body = {
            "user_id": user_id,
            "context": {
                "device": CONTEXT_DEVICES[i % 3],
                "hour": int(rng.integers(0, 24)),
                "placement": CONTEXT_PLACEMENTS[i % 4],
            },
            "candidates": [{"ad_id": a} for a in ad_ids],
        }
        calls.append(ScoreCall(user_id, ad_ids, orjson.dumps(body)))
    return calls
