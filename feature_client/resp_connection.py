"""One Redis connection for the hot path's reads: commands pipelined, replies parsed by hiredis
as their bytes arrive.

redis-py's asyncio connection reads a reply through a stream reader and its parser class, and
lends the connection out of a pool for each command. For a 257-key MGET that took 1.5-1.8x the
client CPU of this connection, and 2.7-3.7x for 9 keys (`python -m benchmarks.redis_clients`).
Here a protocol writes each framed command at once and settles the waiting callers in order as
replies complete: Redis answers a connection's commands in the order they came, so several
reads can be in flight on it.

A caller that stops waiting keeps its place in line: its reply is read and dropped, and the
connection stays in step. A server that stops answering is found out by a stall check: when
the oldest command has waited `stall_seconds` and no byte arrived since the previous look,
the connection is closed and every caller gets FeatureStoreUnavailable; bytes waiting unread in
the socket (a busy event loop) count as an answer.
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from typing import Any, cast

import hiredis

from feature_client.resp import pack_command
from feature_client.store import FeatureStoreUnavailable


class RespConnection(asyncio.Protocol):
    """A pipelined Redis connection; open it with `RespConnection.open`."""

    def __init__(self, stall_seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._stall_seconds = stall_seconds
        self._reader = hiredis.Reader()
        # Callers in the order their commands were written, with the loop time each was sent.
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._stall_check: asyncio.TimerHandle | None = None
        self._bytes_received = 0
        self._bytes_at_last_look = -1
        self._lost: str | None = None  # why the connection closed, once it has

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        stall_seconds: float,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
    ) -> RespConnection:
        """Connect, authenticate and select the database; FeatureStoreUnavailable if any fails."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(stall_seconds):
                _, connection = await loop.create_connection(lambda: cls(stall_seconds), host, port)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a malformed host name
            raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        try:
            if password is not None:
                await connection.command("AUTH", *([username] if username else []), password)
            if db:
                await connection.command("SELECT", str(db))
        except BaseException:
            connection.close()
            raise
        return connection

    @property
    def closed(self) -> bool:
        return self._lost is not None

    async def mget(self, framed: list[bytes]) -> list[bytes | None]:
        """The reply to an MGET already framed (feature_client.resp.pack_mget)."""
        reply: list[bytes | None] = await self._send(framed)
        return reply

    async def command(self, *parts: str) -> Any:
        return await self._send([pack_command(*parts)])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _send(self, framed: list[bytes]) -> asyncio.Future[Any]:
        if self._lost is not None:
            raise FeatureStoreUnavailable(self._lost)
        if self._transport is None:
            raise FeatureStoreUnavailable("redis: not connected")
        try:
            self._transport.writelines(framed)
        except Exception as exc:  # nothing was queued for it: the connection is still in step
            raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        future = self._loop.create_future()
        self._waiting.append((future, self._loop.time()))
        if self._stall_check is None:
            self._stall_check = self._loop.call_later(self._stall_seconds, self._look_for_stall)
        return future

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._bytes_received += len(data)
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                future, _ = self._waiting.popleft()
                if future.done():  # its caller stopped waiting
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(FeatureStoreUnavailable(f"redis: {reply}"))
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self._lose(f"redis: unreadable reply: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
        self._lose(f"redis: {reason}")

    def _look_for_stall(self) -> None:
        self._stall_check = None
        if not self._waiting or self._lost is not None:
            return
        waited = self._loop.time() - self._waiting[0][1]
        if waited < self._stall_seconds:
            self._stall_check = self._loop.call_later(
                self._stall_seconds - waited, self._look_for_stall
            )
        elif self._bytes_received != self._bytes_at_last_look or self._unread_bytes_waiting():
            # Bytes came since the last look, or wait unread, or this is the first look: look
            # once more after the loop has had a turn to read (a busy loop reads late).
            self._bytes_at_last_look = self._bytes_received
            self._stall_check = self._loop.call_later(0.01, self._look_for_stall)
        else:
            self._lose(f"redis: no reply in {waited:.2f} s")

    def _unread_bytes_waiting(self) -> bool:
        """Whether the socket holds bytes the loop has not read yet."""
        sock = None if self._transport is None else self._transport.get_extra_info("socket")
        if sock is None:
            return False
        # poll, not select: a busy server's descriptors can be past select's limit of 1024.
        poller = select.poll()
        try:
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # closed meanwhile
            return False

    def _lose(self, reason: str) -> None:
        """Close for good; every caller still waiting, and every later one, is told `reason`."""
        if self._lost is None:
            self._lost = reason
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(FeatureStoreUnavailable(self._lost))
        if self._transport is not None:
            self._transport.abort()
