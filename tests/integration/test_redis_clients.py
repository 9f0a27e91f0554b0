"""The bare asyncio MGET client of the Redis client benchmark reads what redis-py reads."""

from __future__ import annotations

import asyncio

import pytest
import redis

from benchmarks.redis_clients import RawMget
from feature_client.redis_server import LocalRedisServer

pytestmark = pytest.mark.integration


def test_raw_mget_answers_concurrent_reads_in_order_with_missing_keys_as_none(
    redis_server: LocalRedisServer, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.mset({f"k{i}": b"v%d\r\n" % i for i in range(0, 300, 2)})  # odd keys missing
    client.close()
    reads = [[f"k{j}" for j in range(start, 300, 3)] for start in range(3)]

    async def read_together() -> list[list[bytes | None]]:
        loop = asyncio.get_running_loop()
        transport, raw = await loop.create_connection(RawMget, "127.0.0.1", redis_server.port)
        try:
            return list(await asyncio.gather(*(raw.mget(keys) for keys in reads)))
        finally:
            transport.close()

    answers = asyncio.run(read_together())
    expected = [[None if int(k[1:]) % 2 else b"v%s\r\n" % k[1:].encode() for k in keys]
                for keys in reads]  # fmt: skip
    assert answers == expected
