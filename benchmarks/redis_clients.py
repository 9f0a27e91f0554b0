"""Client CPU of one MGET of 257 keys (a 256-candidate request) and of 9 keys (8 candidates):
redis-py's synchronous client, redis.asyncio, the feature store's read on a redis-py pooled
connection (one-join framing; what it did before it had a connection of its own), the feature
store's read on its own connection (feature_client/resp_connection.py), and a bare asyncio
protocol feeding hiredis (`RawMget`: the floor, with nothing a production client needs). No
coalescing. The asyncio variants run on uvloop, like the service.

python -m benchmarks.redis_clients
"""

from __future__ import annotations

import asyncio
import collections
import time

import hiredis
import numpy as np
import redis
import redis.asyncio as aredis
import uvloop

from feature_client.redis_server import LocalRedisServer
from feature_client.redis_store import RedisFeatureStore
from feature_client.resp import pack_mget

ADS = 200_000
CALLS = 2_000


class Timer:
    """Prints the client CPU and wall time per call of the block it wraps (CALLS calls)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> None:
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        cpu = (time.process_time() - self.cpu) / CALLS * 1e6
        wall = (time.perf_counter() - self.wall) / CALLS * 1e6
        print(f"{self.label} {cpu:.0f} µs client CPU, {wall:.0f} µs wall")


class RawMget(asyncio.Protocol):
    """MGETs on one connection: write the framed command, resolve replies in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[asyncio.Future[list[bytes | None]]] = collections.deque()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._waiting.popleft().set_result(reply)

    async def mget(self, names: list[str]) -> list[bytes | None]:
        assert self._transport is not None
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._transport.writelines(pack_mget(names))
        return await future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def main() -> None:
    with LocalRedisServer() as server:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for i in range(ADS):
            pipe.set(f"adscore:a:a{i}", b"x" * 60)
        pipe.execute()
        rng = np.random.default_rng(0)
        for size in (257, 9):
            print(f"{size} keys per MGET")
            key_sets = [[f"adscore:a:a{j}" for j in rng.integers(0, ADS, size)] for _ in range(500)]
            measure(server, key_sets * (CALLS // len(key_sets)))
        client.close()


def measure(server: LocalRedisServer, rounds: list[list[str]]) -> None:
    client = redis.Redis.from_url(server.url)
    with Timer("  sync MGET:                      "):
        for keys in rounds:
            client.mget(keys)
    client.close()

    async def run_async() -> None:
        async_client = aredis.Redis.from_url(server.url)
        with Timer("  async MGET:                     "):
            for keys in rounds:
                await async_client.mget(keys)
        await async_client.aclose()
        pooled = RedisFeatureStore(aredis.Redis.from_url(server.url), "adscore")  # no url
        with Timer("  store MGET, redis-py connection:"):
            for keys in rounds:
                await pooled.mget(keys)
        await pooled.close()
        store = RedisFeatureStore.from_url(server.url, "adscore", 1.0)
        with Timer("  store MGET, own connection:     "):
            for keys in rounds:
                await store.mget(keys)
        await store.close()
        loop = asyncio.get_running_loop()
        _, raw = await loop.create_connection(RawMget, "127.0.0.1", server.port)
        with Timer("  raw MGET:                       "):
            for keys in rounds:
                await raw.mget(keys)
        raw.close()

    uvloop.run(run_async())


if __name__ == "__main__":
    main()
