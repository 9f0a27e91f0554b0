"""Client CPU of one MGET of 257 keys: redis-py's synchronous client, redis.asyncio, and the
feature store's own read (one-join framing on a pooled asyncio connection, no coalescing).

python -m benchmarks.redis_clients
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import redis
import redis.asyncio as aredis

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
        key_sets = [[f"adscore:a:a{j}" for j in rng.integers(0, ADS, 257)] for _ in range(500)]
        rounds = key_sets * (CALLS // len(key_sets))
        with Timer("sync MGET: "):
            for keys in rounds:
                client.mget(keys)
        client.close()

        async def run_async() -> None:
            async_client = aredis.Redis.from_url(server.url)
            with Timer("async MGET:"):
                for keys in rounds:
                    await async_client.mget(keys)
            await async_client.aclose()
            store = RedisFeatureStore.from_url(server.url, "adscore", 1.0)
            with Timer("store MGET:"):
                for keys in rounds:
                    await store.mget(keys)
            await store.close()

        asyncio.run(run_async())


if __name__ == "__main__":
    main()
