"""The Redis feature store: a request's user and candidate ads in one MGET, shared with the
concurrent requests (coalescing.py).

The MGET bypasses redis-py: its command layer wraps every call in retry, observability and
special-command hooks and frames arguments one by one, and its connections read replies through
a stream reader. Here the command is framed in one join (resp.py) and pipelined on a connection
of our own that feeds hiredis as bytes arrive (resp_connection.py). Everything else (writes, the
schema stamp, pings) goes through redis-py, and so do the MGETs of a URL that connection does
not speak: TLS (rediss://) or a Unix socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import RedisError

from feature_client.coalescing import CoalescingReader
from feature_client.resp import pack_mget
from feature_client.resp_connection import RespConnection
from feature_client.store import FeatureStoreUnavailable, KeyLayout, RawFeatures, SchemaStamp

WRITE_CHUNK = 2_000
# A read slower than this means a stalled server or connection (see from_url).
STALL_SECONDS = 0.5


class RedisFeatureStore:
    """Feature vectors in Redis (single node): MGETs on a connection of its own (see above),
    everything else with redis.asyncio; replies parsed by hiredis."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        reads_in_flight: int = 2,
        *,
        url: str | None = None,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self._client = client
        self.keys = KeyLayout(namespace)
        # Where the hot path's own connection goes (None: a URL it does not speak, or none).
        self._address = _plain_tcp(url) if url is not None else None
        self._stall_seconds = stall_seconds
        self._connection: RespConnection | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        self._reader = CoalescingReader(self.mget, max_in_flight=reads_in_flight)

    @classmethod
    def from_url(
        cls, url: str, namespace: str, timeout_seconds: float, reads_in_flight: int = 2
    ) -> RedisFeatureStore:
        # Requests stop waiting at their own deadline (the caller's timeout); the socket timeout
        # only detects a stalled server, and must not fire because a busy event loop read a
        # prompt reply late: that would drop the connection and cost a reconnect under load.
        stall = max(STALL_SECONDS, timeout_seconds)
        client = redis.Redis.from_url(
            url,
            socket_timeout=stall,
            socket_connect_timeout=stall,
            # One attempt: a retry would spend the request's budget on a store that just failed.
            retry=Retry(NoBackoff(), 0),
            max_connections=256,
        )
        return cls(client, namespace, reads_in_flight, url=url, stall_seconds=stall)

    async def mget(self, names: list[str]) -> list[bytes | None]:
        """One MGET of `names` now, on its own (fetch() merges concurrent reads into these)."""
        if self._closed:
            raise FeatureStoreUnavailable("redis: the feature store is closed")
        if self._address is None:
            return await self._pooled_mget(names)
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return await connection.mget(pack_mget(names))

    async def _connect(self) -> RespConnection:
        """The hot path's connection, opened again if it closed (one opening at a time)."""
        assert self._address is not None
        async with self._connecting:
            connection = self._connection
            if connection is None or connection.closed:
                connection = await RespConnection.open(
                    **self._address, stall_seconds=self._stall_seconds
                )
                self._connection = connection
            return connection

    async def _pooled_mget(self, names: list[str]) -> list[bytes | None]:
        pool = self._client.connection_pool
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        try:
            await connection.send_packed_command(pack_mget(names))
            return cast(list[bytes | None], await connection.read_response())
        except BaseException as exc:
            # Whatever broke the exchange (a reset, a timeout, a cancellation mid-reply), the
            # connection may hold half a reply: it must not go back to the pool as it is.
            await connection.disconnect()
            if isinstance(exc, (RedisError, OSError)):
                raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
            raise
        finally:
            await pool.release(connection)

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        """One request's vectors, read in an MGET shared with the concurrent requests."""
        keys = self.keys.ads(ad_ids)
        keys.insert(0, self.keys.user(user_id))
        values = await self._reader.get(keys)
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
        self._closed = True
        await self._reader.close()
        if self._connection is not None:
            self._connection.close()
        await self._client.aclose()


def _plain_tcp(url: str) -> dict[str, Any] | None:
    """Host, port, credentials and database of a redis:// URL; None for any other kind."""
    if not url.startswith("redis://"):
        return None
    parsed = parse_url(url)  # type: ignore[no-untyped-call]
    return {
        "host": parsed.get("host") or "localhost",
        "port": int(parsed.get("port") or 6379),
        "username": parsed.get("username"),
        "password": parsed.get("password"),
        "db": int(parsed.get("db") or 0),
    }
