"""The hand-framed commands are byte for byte what redis-py would send."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from feature_client.resp import pack_command, pack_mget
from feature_client.store import KeyLayout


@pytest.mark.parametrize(
    "keys",
    [
        ["adscore:u:u1"],
        [f"adscore:a:a{i}" for i in range(257)],
        ["adscore:a:café-ü", "k:名前", "x"],
    ],
)
def test_pack_mget_matches_redis_py(keys: list[str]) -> None:
    assert b"".join(pack_mget(keys)) == b"".join(Connection().pack_command("MGET", *keys))


def test_the_keys_of_many_ads_are_each_ads_key() -> None:
    keys = KeyLayout("adscore")
    ad_ids = ["a1", "café-ü", "a1", "x" * 128]
    assert keys.ads(ad_ids) == [keys.ad(ad_id) for ad_id in ad_ids]
    assert keys.ads([]) == []


@pytest.mark.parametrize("parts", [("SELECT", "3"), ("AUTH", "user", "pässword"), ("PING",)])
def test_pack_command_matches_redis_py(parts: tuple[str, ...]) -> None:
    assert pack_command(*parts) == b"".join(Connection().pack_command(*parts))
