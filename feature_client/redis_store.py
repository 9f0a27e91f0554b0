"""The Redis feature store: one MGET per request for the user and all its candidate ads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from feature_client.store import FeatureStoreUnavailable, KeyLayout, RawFeatures, SchemaStamp

WRITE_CHUNK = 2_000


class RedisFeatureStore:
    """Feature vectors in Redis (single node), read with the asyncio client and hiredis."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = client
        self.keys = KeyLayout(namespace)

    @classmethod
    def from_url(cls, url: str, namespace: str, timeout_seconds: float) -> RedisFeatureStore:
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            # One attempt: a retry would spend the request's budget on a store that just failed.
            retry=Retry(NoBackoff(), 0),
            max_connections=256,
        )
        return cls(client, namespace)

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        keys = self.keys
        names = [keys.user(user_id), *[keys.ad(ad_id) for ad_id in ad_ids]]
        try:
            values = cast(list[bytes | None], await self._client.mget(names))
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return RawFeatures(values[0], values[1:])

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(items), WRITE_CHUNK):
                    pipe.mset(dict(items[start : start + WRITE_CHUNK]))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def read_schema(self) -> SchemaStamp | None:
        try:
            raw = cast(bytes | None, await self._client.get(self.keys.schema))
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return None if raw is None else SchemaStamp.from_bytes(raw)

    async def write_schema(self, stamp: SchemaStamp) -> None:
        await self.write([(self.keys.schema, stamp.to_bytes())])

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._client.aclose()
