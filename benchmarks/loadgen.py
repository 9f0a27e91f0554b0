"""A lean HTTP/1.1 load generator: closed loop (fixed connections) and open loop (Poisson).

Requests are pre-encoded bytes written to keep-alive connections; a response is read by its
Content-Length. Open-loop latency runs from each request's *intended* send time, so a server
that stalls is charged for the requests that queued behind the stall (no coordinated
omission). The generator's own CPU per request is recorded: on 2 cores it competes with the
server and must be counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LoadResult:
    """What one load run observed."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    sent_latencies: list[float] = field(default_factory=list)
    """Open loop: from the moment each request was written, without the generator's lateness."""
    candidates: int = 0
    errors: int = 0
    generator_cpu_seconds: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if s == 200)

    def percentile_ms(self, q: float, *, accepted: bool = True, from_send: bool = False) -> float:
        """Latency percentile of the answered requests (200), or of the refused ones; from the
        intended send time, or (`from_send`, open loop) from the moment the request was written."""
        latencies = self.sent_latencies if from_send else self.latencies
        chosen = [
            latency
            for latency, status in zip(latencies, self.statuses, strict=True)
            if (status == 200) == accepted
        ]
        if not chosen:
            return float("nan")
        return float(np.percentile(chosen, q) * 1000)

    def late_ms(self, q: float) -> float:
        """Open loop: percentile of how late the requests were written after their intended
        send times: the generator's own lateness (it shares the machine's cores with the
        server), and any wait for a free connection or for a new one to open."""
        if not self.sent_latencies:
            return float("nan")
        late = np.subtract(self.latencies, self.sent_latencies)
        return float(np.percentile(late, q) * 1000)

    @property
    def requests_per_second(self) -> float:
        return self.ok / self.seconds

    @property
    def candidates_per_second(self) -> float:
        return self.candidates / self.seconds


def encode_post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, payload: bytes) -> int:
        """Send one request and read its whole response; returns the status code."""
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        start = lower.find(b"content-length:")
        if start < 0:
            raise ConnectionError("response without Content-Length")
        end = lower.index(b"\r\n", start)
        await self.reader.readexactly(int(lower[start + 15 : end]))
        return status

    def close(self) -> None:
        self.writer.close()


async def closed_loop(
    host: str,
    port: int,
    payloads: Sequence[bytes],
    sizes: Sequence[int],
    *,
    connections: int,
    seconds: float,
) -> LoadResult:
    """`connections` clients, each sending its next request as soon as the last one answers."""
    result = LoadResult(seconds)
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        conn = await Connection.open(host, port)
        i = index
        try:
            while time.perf_counter() < deadline:
                payload = payloads[i % len(payloads)]
                started = time.perf_counter()
                status = await conn.send(payload)
                result.latencies.append(time.perf_counter() - started)
                result.statuses.append(status)
                if status == 200:
                    result.candidates += sizes[i % len(sizes)]
                i += connections
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(connections)))
    result.seconds = time.perf_counter() - started
    result.generator_cpu_seconds = time.process_time() - cpu
    return result


async def open_loop(
    host: str,
    port: int,
    payloads: Sequence[bytes],
    sizes: Sequence[int],
    *,
    rate: float,
    seconds: float,
    max_connections: int = 256,
    seed: int = 0,
) -> LoadResult:
    """Poisson arrivals at `rate` per second; latency measured from each intended send time."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 1.2) + 10))
    arrivals = arrivals[arrivals < seconds]
    result = LoadResult(seconds)
    idle: list[Connection] = []
    opened = 0
    available = asyncio.Condition()

    async def acquire() -> Connection:
        nonlocal opened
        async with available:
            while not idle and opened >= max_connections:
                await available.wait()
            if idle:
                return idle.pop()
            opened += 1
        return await Connection.open(host, port)

    async def release(conn: Connection) -> None:
        async with available:
            idle.append(conn)
            available.notify()

    async def one(index: int, intended: float) -> None:
        conn = await acquire()
        sent = time.perf_counter()
        try:
            status = await conn.send(payloads[index % len(payloads)])
        except (ConnectionError, asyncio.IncompleteReadError):
            nonlocal opened
            result.errors += 1
            conn.close()
            async with available:
                opened -= 1
                available.notify()
            return
        answered = time.perf_counter()
        result.latencies.append(answered - intended)
        result.sent_latencies.append(answered - sent)
        result.statuses.append(status)
        if status == 200:
            result.candidates += sizes[index % len(sizes)]
        await release(conn)

    cpu = time.process_time()
    start = time.perf_counter()
    tasks = []
    for index, offset in enumerate(arrivals):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, start + offset)))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - start
    result.generator_cpu_seconds = time.process_time() - cpu
    for conn in idle:
        conn.close()
    return result
