"""Session-wide fixtures: a private redis-server and a small model trained once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from feature_client.redis_server import LocalRedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedisServer]:
    """Our own redis-server on a free port: never the machine's 6379."""
    with LocalRedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedisServer) -> str:
    """The session server, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@dataclass(frozen=True)
class TrainedFixture:
    repository: Path
    name: str
    version: int
    trained: object  # models.pipeline.TrainedModel (torch is imported lazily)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedFixture:
    """A small DCN-v2 trained, calibrated, exported and published once per session."""
    from models.pipeline import TrainingPlan, export_and_publish, run_training
    from models.synthetic import SyntheticConfig
    from models.train import FitConfig
    from service.repository import ModelRepository

    plan = TrainingPlan(
        rows=40_000,
        validation_rows=10_000,
        calibration_rows=10_000,
        test_rows=10_000,
        world=SyntheticConfig(
            users=2_000,
            ads=5_000,
            advertisers=300,
            user_hash_buckets=4_096,
            ad_hash_buckets=8_192,
            advertiser_hash_buckets=512,
        ),
        fit=FitConfig(max_epochs=1, evaluations_per_epoch=2),
        threads=2,
    )
    trained_model = run_training(plan, progress=False)
    root = tmp_path_factory.mktemp("model_repository")
    metadata = export_and_publish(trained_model, ModelRepository(root), "pcvr")
    return TrainedFixture(root, metadata.name, metadata.version, trained_model)
