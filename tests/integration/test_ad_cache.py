"""The hot-ad cache in front of a real Redis: fewer keys read, bounded staleness, fresh users."""

from __future__ import annotations

import asyncio

import redis

from feature_client.ad_cache import AdFeatureCache, CachingFeatureStore
from feature_client.redis_store import RedisFeatureStore


def _keys_read(client: redis.Redis) -> int:
    stats = client.info("stats")
    return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])


async def test_cached_ads_are_not_read_again_until_the_ttl_passes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    inner = RedisFeatureStore.from_url(redis_url, "t", timeout_seconds=2.0)
    store = CachingFeatureStore(inner, AdFeatureCache(0.6, 10_000))
    keys = store.keys
    ads = [f"a{i}" for i in range(100)]
    await inner.write(
        [(keys.user("u1"), b"user v1")] + [(keys.ad(a), f"{a} v1".encode()) for a in ads]
    )
    try:
        before = _keys_read(client)
        first = await store.fetch("u1", [*ads, "unknown"])
        assert _keys_read(client) - before == 102  # user, 100 ads, the unknown ad
        assert first.ads[:2] == [b"a0 v1", b"a1 v1"] and first.ads[-1] is None

        await inner.write([(keys.user("u1"), b"user v2")] + [(keys.ad(a), b"new") for a in ads])
        before = _keys_read(client)
        second = await store.fetch("u1", [*ads, "unknown"])
        assert _keys_read(client) - before == 2  # the user and the ad Redis does not hold
        assert second.user == b"user v2"  # users are always read
        assert second.ads[:2] == [b"a0 v1", b"a1 v1"]  # ads as read, within the TTL
        assert store.cache.counts.hits == 100

        await asyncio.sleep(0.7)  # past the TTL: read again, and the new values show
        third = await store.fetch("u1", ads[:3])
        assert third.ads == [b"new"] * 3
    finally:
        client.close()
        await store.close()
