"""Client CPU of one MGET of 257 keys (a 256-candidate request) and of 9 keys (8 candidates):
redis-py's synchronous client, redis.asyncio, the feature store's read on a redis-py pooled
connection (one-join framing; what it did before it had a connection of its own), and the feature
store's read on its own connection (feature_client/resp_connection.py). No coalescing. The
asyncio variants run on uvloop, like the service.

python -m benchmarks.redis_clients
"""

from __future__ import annotations

import time

import numpy as np
import redis
import redis.asyncio as aredis
import uvloop

from feature_client.redis_server import LocalRedisServer
from feature_client.redis_store import RedisFeatureStore

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

    uvloop.run(run_async())


if __name__ == "__main__":
    main()
