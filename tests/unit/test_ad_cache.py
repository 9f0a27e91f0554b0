"""The hot-ad cache's own logic: expiry, bounds, counts (a fake clock and a fake store)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from feature_client.ad_cache import AdFeatureCache, CachingFeatureStore
from feature_client.store import KeyLayout, RawFeatures, SchemaStamp


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingStore:
    """Answers from a dict and records which ads each fetch asked for."""

    keys = KeyLayout("test")

    def __init__(self, ads: dict[str, bytes]) -> None:
        self.ads = ads
        self.asked: list[list[str]] = []

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        self.asked.append(list(ad_ids))
        return RawFeatures(f"user {user_id}".encode(), [self.ads.get(a) for a in ad_ids])

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    async def read_schema(self) -> SchemaStamp | None:
        return None

    async def write_schema(self, stamp: SchemaStamp) -> None: ...

    async def ping(self) -> bool:
        return True

    async def close(self) -> None: ...


def test_an_entry_is_served_for_at_most_one_ttl_after_it_was_read() -> None:
    step = 0.25
    for stored_at in (0.0, 4.9, 5.0, 9.99, 23.0):  # early and late in a generation
        clock = Clock()
        created = clock.now
        cache = AdFeatureCache(10.0, 1000, clock)
        clock.now = created + stored_at
        cache.store(["a"], [b"v"])
        ages = []
        for _ in range(int(30 / step)):  # looked up now and then, as traffic does
            clock.now += step
            if cache.lookup(["a"]) == [b"v"]:
                ages.append(clock.now - (created + stored_at))
        assert ages and max(ages) <= 10.0, (stored_at, ages)
        assert max(ages) >= 5.0 - step  # and kept at least half a TTL


def test_an_entry_read_long_ago_is_not_served_after_a_quiet_spell() -> None:
    clock = Clock()
    cache = AdFeatureCache(10.0, 1000, clock)
    cache.store(["a"], [b"v"])
    clock.now += 4.0
    assert cache.lookup(["a"]) == [b"v"]
    clock.now += 9.0  # one lookup after 13 s: the schedule must not restart from here
    assert cache.lookup(["a"]) == [None]


def test_absent_ads_are_not_cached_and_lookups_are_counted() -> None:
    cache = AdFeatureCache(10.0, 1000, Clock())
    cache.store(["a", "b"], [b"va", None])
    assert cache.lookup(["a", "b", "a"]) == [b"va", None, b"va"]
    assert (cache.counts.hits, cache.counts.misses) == (2, 1)


def test_the_cache_never_holds_more_than_its_bound() -> None:
    cache = AdFeatureCache(3600.0, 100, Clock())
    for start in range(0, 1000, 7):
        ids = [str(i) for i in range(start, start + 7)]
        cache.store(ids, [b"x"] * 7)
        assert len(cache) <= 100
    assert cache.lookup(["993"]) == [b"x"]  # the newest are kept


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ttl_seconds > 0"):
        AdFeatureCache(0.0, 100)
    with pytest.raises(ValueError, match="max_entries >= 2"):
        AdFeatureCache(1.0, 1)


def test_the_caching_store_asks_the_store_only_for_ads_it_does_not_hold() -> None:
    store = RecordingStore({"a": b"va", "b": b"vb"})
    caching = CachingFeatureStore(store, AdFeatureCache(10.0, 1000, Clock()))

    async def run() -> list[RawFeatures]:
        return [
            await caching.fetch("u1", ["a", "x"]),
            await caching.fetch("u2", ["b", "a", "x"]),
            await caching.fetch("u3", ["a", "b"]),
        ]

    first, second, third = asyncio.run(run())
    assert store.asked == [["a", "x"], ["b", "x"], []]  # the user is always read
    assert first == RawFeatures(b"user u1", [b"va", None])
    assert second == RawFeatures(b"user u2", [b"vb", b"va", None])
    assert third == RawFeatures(b"user u3", [b"va", b"vb"])
    assert caching.keys == store.keys


def test_the_ttl_counts_from_the_read_not_from_when_the_slow_read_returned() -> None:
    clock = Clock()
    cache = AdFeatureCache(10.0, 1000, clock)
    read_at = clock.now + 4.0

    class SlowStore(RecordingStore):
        async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
            clock.now += 3.0  # the read happened at the start; the answer comes 3 s later
            return await super().fetch(user_id, ad_ids)

    caching = CachingFeatureStore(SlowStore({"a": b"va"}), cache)
    clock.now = read_at
    asyncio.run(caching.fetch("u", ["a"]))  # read at +4 (young), stored at +7 (after a rotation)
    found_until = 0.0
    while clock.now < read_at + 30:
        clock.now += 0.25
        if cache.lookup(["a"]) == [b"va"]:
            found_until = clock.now - read_at
    assert 0 < found_until <= 10.0

    clock.now += 100
    stale = CachingFeatureStore(SlowStore({"a": b"va"}), AdFeatureCache(2.0, 1000, clock))
    asyncio.run(stale.fetch("u", ["a"]))  # 3 s to answer, TTL 2 s: too old to keep at all
    assert stale.cache.lookup(["a"]) == [None]
