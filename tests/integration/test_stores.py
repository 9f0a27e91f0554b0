"""One contract, three stores: the in-process store, and Redis behind the hot-ad cache, must
answer like Redis (the cache may answer an ad overwritten in the last TTL with its earlier
vector: tests/integration/test_ad_cache.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from feature_client.ad_cache import AdFeatureCache, CachingFeatureStore
from feature_client.memory_store import InMemoryFeatureStore
from feature_client.redis_server import free_port
from feature_client.redis_store import RedisFeatureStore
from feature_client.store import FeatureStore, FeatureStoreUnavailable, SchemaStamp
from tests.fixtures import tiny_spec


@pytest.fixture(params=["memory", "redis", "redis+ad-cache"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[FeatureStore]:
    feature_store: FeatureStore = (
        InMemoryFeatureStore("t")
        if request.param == "memory"
        else RedisFeatureStore.from_url(redis_url, "t", timeout_seconds=2.0)
    )
    if request.param.endswith("+ad-cache"):
        feature_store = CachingFeatureStore(feature_store, AdFeatureCache(60.0, 100_000))
    yield feature_store
    await feature_store.close()


async def test_fetch_returns_values_in_candidate_order_with_none_for_missing(
    store: FeatureStore,
) -> None:
    keys = store.keys
    await store.write([(keys.user("u1"), b"user"), (keys.ad("a1"), b"one"), (keys.ad("a3"), b"3")])
    raw = await store.fetch("u1", ["a3", "a2", "a1", "a3"])
    assert raw.user == b"user"
    assert raw.ads == [b"3", None, b"one", b"3"]
    missing = await store.fetch("u2", ["a1"])
    assert missing.user is None and missing.ads == [b"one"]


async def test_keys_follow_the_documented_layout(store: FeatureStore) -> None:
    assert store.keys.user("u1") == "t:u:u1"
    assert store.keys.ad("a:b") == "t:a:a:b"
    assert store.keys.entity("ad", "a1") == store.keys.ad("a1")
    assert store.keys.schema == "t:schema"


async def test_large_writes_are_all_stored(store: FeatureStore) -> None:
    items = [(store.keys.ad(f"a{i}"), str(i).encode()) for i in range(5_000)]
    await store.write(items)
    raw = await store.fetch("nobody", [f"a{i}" for i in range(0, 5_000, 7)])
    assert raw.ads == [str(i).encode() for i in range(0, 5_000, 7)]


async def test_schema_stamp_round_trip(store: FeatureStore) -> None:
    assert await store.read_schema() is None
    stamp = SchemaStamp.of(tiny_spec())
    await store.write_schema(stamp)
    assert await store.read_schema() == stamp
    assert await store.ping()


async def test_unreachable_redis_raises_feature_store_unavailable() -> None:
    dead = RedisFeatureStore.from_url(f"redis://127.0.0.1:{free_port()}/0", "t", 0.5)
    with pytest.raises(FeatureStoreUnavailable, match="redis"):
        await dead.fetch("u1", ["a1"])
    with pytest.raises(FeatureStoreUnavailable):
        await dead.write([("k", b"v")])
    assert not await dead.ping()
    await dead.close()
