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
        cpu, wall = time.process_time(), time.perf_counter()
        for keys in rounds:
            client.mget(keys)
        print(f"sync MGET:  {(time.process_time() - cpu) / CALLS * 1e6:.0f} µs client CPU, "
              f"{(time.perf_counter() - wall) / CALLS * 1e6:.0f} µs wall")  # fmt: skip
        client.close()

        async def run_async() -> None:
            async_client = aredis.Redis.from_url(server.url)
            cpu, wall = time.process_time(), time.perf_counter()
            for keys in rounds:
                await async_client.mget(keys)
            print(f"async MGET: {(time.process_time() - cpu) / CALLS * 1e6:.0f} µs client CPU, "
                  f"{(time.perf_counter() - wall) / CALLS * 1e6:.0f} µs wall")  # fmt: skip
            await async_client.aclose()
            store = RedisFeatureStore.from_url(server.url, "adscore", 1.0)
            cpu, wall = time.process_time(), time.perf_counter()
            for keys in rounds:
                await store.mget(keys)
            print(f"store MGET: {(time.process_time() - cpu) / CALLS * 1e6:.0f} µs client CPU, "
                  f"{(time.perf_counter() - wall) / CALLS * 1e6:.0f} µs wall")  # fmt: skip
            await store.close()

        asyncio.run(run_async())


if __name__ == "__main__":
    main()
