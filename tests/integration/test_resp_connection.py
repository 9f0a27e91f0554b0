"""The feature store's own Redis connection against a real redis-server: pipelined reads in
order, callers that stop waiting, a server that stops answering or goes away, credentials and
database selection from the URL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import uvloop

from feature_client.redis_server import LocalRedisServer
from feature_client.redis_store import RedisFeatureStore
from feature_client.resp import pack_mget
from feature_client.resp_connection import RespConnection
from feature_client.store import FeatureStoreUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Each test on both event loops: the service runs on uvloop, whose transports differ."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def _write(url: str, values: dict[str, bytes]) -> None:
    client = redis.Redis.from_url(url)
    client.mset(values)
    client.close()


def test_concurrent_reads_are_answered_in_order_with_missing_keys_as_none(
    redis_url: str, run: Callable[..., Any]
) -> None:
    _write(redis_url, {f"k{i}": b"v%d\r\n" % i for i in range(0, 300, 2)})  # odd keys missing
    reads = [[f"k{j}" for j in range(start, 300, 3)] for start in range(3)]

    async def read_together() -> list[list[bytes | None]]:
        store = RedisFeatureStore.from_url(redis_url, "t", 2.0)
        try:
            return list(await asyncio.gather(*(store.mget(keys) for keys in reads)))
        finally:
            await store.close()

    expected = [[None if int(k[1:]) % 2 else b"v%s\r\n" % k[1:].encode() for k in keys]
                for keys in reads]  # fmt: skip
    assert run(read_together()) == expected


def test_a_caller_that_stops_waiting_leaves_the_connection_in_step(
    redis_url: str, run: Callable[..., Any]
) -> None:
    _write(redis_url, {"a": b"1", "b": b"2"})
    admin = redis.Redis.from_url(redis_url)

    async def scenario() -> list[bytes | None]:
        store = RedisFeatureStore.from_url(redis_url, "t", 5.0)  # no stall within the pause
        try:
            await store.mget(["a"])  # connected
            admin.client_pause(1000)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.mget(["a"]), 0.05)
            # Its reply comes first once the pause ends, and is dropped: this one gets its own.
            return await store.mget(["b"])
        finally:
            await store.close()

    try:
        assert run(scenario()) == [b"2"]
    finally:
        admin.close()


def test_a_frozen_server_is_found_out_and_a_thawed_one_read_again(
    redis_url: str, run: Callable[..., Any]
) -> None:
    _write(redis_url, {"a": b"1"})
    admin = redis.Redis.from_url(redis_url)
    pid = int(admin.info("server")["process_id"])
    admin.close()

    async def scenario() -> tuple[float, list[bytes | None]]:
        store = RedisFeatureStore.from_url(redis_url, "t", 0.3)  # stall after 0.5 s
        try:
            await store.mget(["a"])
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(FeatureStoreUnavailable, match="no reply in"):
                    await asyncio.wait_for(store.mget(["a"]), 10)
                waited = time.monotonic() - started
            finally:
                os.kill(pid, signal.SIGCONT)
            return waited, await store.mget(["a"])  # on a new connection
        finally:
            await store.close()

    waited, values = run(scenario())
    assert 0.5 <= waited < 5 and values == [b"1"]


def test_a_server_that_goes_away_fails_the_read_and_one_that_returns_is_read_again(
    run: Callable[..., Any],
) -> None:
    with LocalRedisServer() as server:
        _write(server.url, {"a": b"1"})

        async def scenario() -> None:
            store = RedisFeatureStore.from_url(server.url, "t", 1.0)
            try:
                assert await store.mget(["a"]) == [b"1"]
                server.stop()
                with pytest.raises(FeatureStoreUnavailable):
                    await store.mget(["a"])
                server.start(same_port=True)
                _write(server.url, {"a": b"2"})
                assert await store.mget(["a"]) == [b"2"]
            finally:
                await store.close()

        run(scenario())


def test_the_database_and_credentials_come_from_the_url(
    redis_server: LocalRedisServer, run: Callable[..., Any]
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.set("a", b"in db 3")
    client.close()

    async def read(url: str) -> list[bytes | None]:
        store = RedisFeatureStore.from_url(url, "t", 1.0)
        try:
            return await store.mget(["a"])
        finally:
            await store.close()

    assert run(read(url)) == [b"in db 3"]
    # This server has no password: AUTH is refused, and the refusal is the error.
    with pytest.raises(FeatureStoreUnavailable, match="AUTH"):
        run(read(f"redis://:secret@127.0.0.1:{redis_server.port}/3"))


def test_a_busy_event_loop_does_not_pass_for_a_stalled_server(
    redis_url: str, run: Callable[..., Any]
) -> None:
    _write(redis_url, {"a": b"1"})

    async def scenario() -> list[bytes | None]:
        store = RedisFeatureStore.from_url(redis_url, "t", 0.3)  # stall after 0.5 s
        try:
            await store.mget(["a"])  # connected
            read = asyncio.ensure_future(store.mget(["a"]))
            # Runs right after the read is written, before the loop can read the reply: the
            # reply waits in the socket while the stall check comes due.
            asyncio.get_running_loop().call_soon(time.sleep, 0.8)
            return await read
        finally:
            await store.close()

    assert run(scenario()) == [b"1"]


def test_an_error_reply_goes_to_its_own_caller(
    redis_server: LocalRedisServer, redis_url: str, run: Callable[..., Any]
) -> None:
    _write(redis_url, {"a": b"1", "text": b"not a number"})

    async def scenario() -> list[Any]:
        connection = await RespConnection.open("127.0.0.1", redis_server.port, stall_seconds=2)
        try:
            return list(
                await asyncio.gather(
                    connection.command("INCR", "text"),
                    connection.mget(pack_mget(["a"])),
                    return_exceptions=True,
                )
            )
        finally:
            connection.close()

    failed, values = run(scenario())
    assert isinstance(failed, FeatureStoreUnavailable) and "not an integer" in str(failed)
    assert values == [b"1"]


def test_a_closed_store_refuses_reads(redis_url: str, run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        store = RedisFeatureStore.from_url(redis_url, "t", 1.0)
        await store.mget(["a"])
        await store.close()
        with pytest.raises(FeatureStoreUnavailable, match="closed"):
            await store.mget(["a"])

    run(scenario())
