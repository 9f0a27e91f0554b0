"""Bulk loading into a real Redis: from files, and the synthetic data set via the CLI."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_client.codec import EntityCodec
from feature_client.loader import FeatureFileError, load_file, stamp_schema
from feature_client.redis_store import RedisFeatureStore
from feature_client.spec import CategoricalFeature
from feature_client.store import SchemaStamp
from models.synthetic import SyntheticWorld, world_for_model
from service.repository import ModelRepository
from tests.conftest import TrainedFixture
from tests.fixtures import tiny_spec

SPEC = tiny_spec()
ROWS = [
    {"id": "a1", "ad_id": "a1", "ad_price": "3.5"},
    {"id": "a2", "ad_id": "a2", "ad_price": ""},  # empty: the spec default (2.0)
    {"id": "a:3", "ad_id": "", "ad_price": "-1"},  # empty id feature: unknown (0)
]


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


async def _check_loaded(redis_url: str) -> None:
    store = RedisFeatureStore.from_url(redis_url, "adscore", 2.0)
    raw = await store.fetch("nobody", ["a1", "a2", "a:3", "a4"])
    decoded = EntityCodec(SPEC, "ad").decode(raw.ads)
    await store.close()
    assert decoded.found.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(decoded.dense[:, 0], [3.5, 2.0, -1.0, 2.0])
    ad_id = SPEC.feature("ad_id")
    assert isinstance(ad_id, CategoricalFeature)
    assert decoded.ids[:, 0].tolist() == [ad_id.encode_one("a1"), ad_id.encode_one("a2"), 0, 0]


async def test_csv_file_loads_with_defaults_for_empty_cells(redis_url: str, tmp_path: Path) -> None:
    store = RedisFeatureStore.from_url(redis_url, "adscore", 2.0)
    path = _write_csv(tmp_path / "ads.csv", ROWS)
    assert await load_file(store, SPEC, "ad", path, batch_size=2, progress=False) == 3
    await stamp_schema(store, SPEC)
    assert await store.read_schema() == SchemaStamp.of(SPEC)
    await store.close()
    await _check_loaded(redis_url)


async def test_parquet_file_loads_like_csv(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "ads.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["a1", "a2", "a:3"],
                "ad_id": ["a1", "a2", None],
                "ad_price": [3.5, None, -1.0],
            }
        ),
        path,
    )
    store = RedisFeatureStore.from_url(redis_url, "adscore", 2.0)
    assert await load_file(store, SPEC, "ad", path, progress=False) == 3
    await store.close()
    await _check_loaded(redis_url)


async def test_file_errors_are_clear(redis_url: str, tmp_path: Path) -> None:
    store = RedisFeatureStore.from_url(redis_url, "adscore", 2.0)
    missing_column = _write_csv(tmp_path / "a.csv", [{"id": "a1", "ad_id": "a1"}])
    with pytest.raises(FeatureFileError, match=r"missing column.*ad_price"):
        await load_file(store, SPEC, "ad", missing_column, progress=False)
    bad_number = _write_csv(tmp_path / "b.csv", [{"id": "a1", "ad_id": "a1", "ad_price": "x"}])
    with pytest.raises(FeatureFileError, match="ad_price"):
        await load_file(store, SPEC, "ad", bad_number, progress=False)
    with pytest.raises(FeatureFileError, match="no such file"):
        await load_file(store, SPEC, "ad", tmp_path / "nope.csv", progress=False)
    with pytest.raises(FeatureFileError, match=r"\.csv or \.parquet"):
        await load_file(store, SPEC, "ad", _write_csv(tmp_path / "c.txt", ROWS), progress=False)
    await store.close()


def test_cli_loads_the_synthetic_data_set_the_model_was_trained_on(
    trained: TrainedFixture, redis_url: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "load-features",
            "--model-repository",
            str(trained.repository),
            "--redis-url",
            redis_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 7000 feature vectors" in result.stdout
    assert "loading users" in result.stderr  # the progress bar
    metadata = ModelRepository(trained.repository).read_metadata(trained.name, trained.version)
    world: SyntheticWorld = world_for_model(metadata.dataset, metadata.spec().fingerprint())

    async def check() -> None:
        store = RedisFeatureStore.from_url(redis_url, "adscore", 2.0)
        raw = await store.fetch("u17", ["a3", "a4999"])
        assert await store.read_schema() == SchemaStamp.of(world.spec)
        await store.close()
        user = EntityCodec(world.spec, "user").decode([raw.user])
        ads = EntityCodec(world.spec, "ad").decode(raw.ads)
        np.testing.assert_array_equal(user.dense[0], world.users.dense[17])
        np.testing.assert_array_equal(ads.ids, world.ads.ids[[3, 4999]])

    import asyncio

    asyncio.run(check())


def test_cli_reports_an_unreachable_redis(trained: TrainedFixture) -> None:
    from feature_client.redis_server import free_port

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "load-features",
            "--model-repository",
            str(trained.repository),
            "--redis-url",
            f"redis://127.0.0.1:{free_port()}/0",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "cannot reach Redis" in result.stderr
