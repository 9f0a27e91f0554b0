"""The hand-framed MGET is byte for byte what redis-py would send."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from feature_client.resp import pack_mget


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
