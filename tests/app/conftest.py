"""A real adscore server (uvicorn) on a real redis-server with the session's trained model."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from feature_client.redis_server import LocalRedisServer
from feature_client.redis_store import RedisFeatureStore
from models.synthetic import SyntheticWorld, load_world_features, world_for_model
from service.app import create_app
from service.auth import add_key
from service.repository import ModelRepository
from service.settings import Settings
from tests.app.lifecycle_support import KEY_HOLDERS, Setup
from tests.conftest import TrainedFixture
from tests.fixtures import LiveServer


@dataclass(frozen=True)
class RunningService:
    url: str
    settings: Settings
    world: SyntheticWorld
    trained: TrainedFixture
    redis: LocalRedisServer


def load_features(redis_url: str, world: SyntheticWorld) -> None:
    async def load() -> None:
        store = RedisFeatureStore.from_url(redis_url, "adscore", 5.0)
        await load_world_features(store, world, progress=False)
        await store.close()

    asyncio.run(load())


def world_of(trained: TrainedFixture) -> SyntheticWorld:
    metadata = ModelRepository(trained.repository).read_metadata(trained.name, trained.version)
    return world_for_model(metadata.dataset, metadata.spec().fingerprint())


@contextmanager
def serving(trained: TrainedFixture, **overrides: Any) -> Iterator[RunningService]:
    """The trained model served over HTTP (auth off) on a real Redis holding its world."""
    world = world_of(trained)
    with LocalRedisServer() as redis_server:
        load_features(redis_server.url, world)
        # Budgets that a slow or busy test machine cannot overrun: the tests here check
        # answers, and a fetch past the 20 ms default would score on defaults.
        budgets = {"feature_timeout_ms": 2_000, "request_timeout_ms": 10_000}
        settings = Settings(
            model_repository=trained.repository,
            redis_url=redis_server.url,
            max_candidates=512,
            auth_enabled=False,
            **(budgets | overrides),
        )
        server = LiveServer(create_app(settings))
        server.start()
        try:
            yield RunningService(server.url, settings, world, trained, redis_server)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def service(trained: TrainedFixture) -> Iterator[RunningService]:
    with serving(trained, max_body_bytes=64 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def feature_redis(trained: TrainedFixture) -> Iterator[str]:
    with LocalRedisServer() as server:
        load_features(server.url, world_of(trained))
        yield server.url


@pytest.fixture
def setup(trained: TrainedFixture, feature_redis: str, tmp_path: Path) -> Setup:
    root = tmp_path / "model_repository"
    shutil.copytree(trained.repository, root)
    keys_file = tmp_path / "keys.json"
    keys = {
        holder: add_key(keys_file, holder, roles, tenants)
        for holder, (roles, tenants) in KEY_HOLDERS.items()
    }
    world = world_of(trained)
    return Setup(
        ModelRepository(root),
        trained.name,
        keys_file,
        keys,
        feature_redis,
        world.users.keys[1],
        list(world.ads.keys[:32]),
    )
