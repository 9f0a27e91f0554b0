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


async def test_no_answer_is_older_than_the_ttl_while_ads_are_rewritten(redis_url: str) -> None:
    """A writer stamps each ad's value with the time it wrote it; readers through the cache
    check every answer: none may have been overwritten in Redis more than one TTL earlier."""
    ttl = 0.3
    inner = RedisFeatureStore.from_url(redis_url, "t", timeout_seconds=2.0)
    store = CachingFeatureStore(inner, AdFeatureCache(ttl, 10_000))
    loop = asyncio.get_running_loop()
    ads = [f"a{i}" for i in range(50)]
    replaced_at: dict[bytes, float] = {}  # value -> when the next value replaced it
    current: dict[str, bytes] = {}

    async def write(generation: int) -> None:
        values = {a: f"{a}@{generation}".encode() for a in ads}
        await inner.write([(store.keys.ad(a), v) for a, v in values.items()])
        now = loop.time()
        for a, v in values.items():
            if a in current:
                replaced_at[current[a]] = now
            current[a] = v

    async def writer() -> None:
        for generation in range(40):
            await write(generation)
            await asyncio.sleep(0.05)

    worst = 0.0

    async def reader(seed: int) -> None:
        nonlocal worst
        for i in range(150):
            asked = loop.time()
            raw = await store.fetch("u", ads[(seed + i) % 25 :][:20])
            for value in raw.ads:
                assert value is not None
                if value in replaced_at:  # stale since then, at the latest since `asked`
                    worst = max(worst, asked - replaced_at[value])
            await asyncio.sleep(0.01)

    try:
        await write(-1)
        await asyncio.gather(writer(), *(reader(seed) for seed in range(4)))
    finally:
        await store.close()
    assert store.cache.counts.hits > 0  # the cache did answer, and
    assert worst <= ttl + 0.1  # never with a value replaced more than one TTL before (+ slack)
