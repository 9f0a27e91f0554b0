"""A lean HTTP/1.1 load generator: closed loop (fixed connections) and open loop (Poisson).

Requests are pre-encoded bytes written to keep-alive connections; a response is read by its
Content-Length. Open-loop latency runs from each request's *intended* send time, so a server
that stalls is charged for the requests that queued behind the stall (no coordinated
omission). The generator's own CPU per request is recorded: on 2 cores it competes with the
server and must be counted.

Sharing the cores, the generator is also late to *read* a reply: its event loop reaches the
socket only after its other work. So the open loop also times each reply by the kernel's
receive timestamp (SO_TIMESTAMPNS on Linux): from the request's write to its reply's arrival
at the socket is the server's own response time, whatever the generator was doing then.

The generator pauses Python's cyclic garbage collector while it measures (collector.py).
"""

from __future__ import annotations

import asyncio
import atexit
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from benchmarks.collector import collector_paused

Span = Literal["intended", "sent", "server"]
"""What an open-loop latency spans: from the intended send time to the reply read by the
generator (the default: no coordinated omission); from the request's write to the reply read;
or from the write to the reply's arrival at the socket (the server's response time)."""

SO_TIMESTAMPNS = 35
"""Linux's option for receive timestamps in nanoseconds (the socket module does not name it)."""
_TIMESTAMP_SPACE = socket.CMSG_SPACE(16)  # one struct timespec
_RECEIVE_BYTES = 1 << 16


def _arrival_ns(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The receive timestamp among a read's ancillary data, in ns of the real-time clock."""
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
            seconds, nanoseconds = struct.unpack("qq", value[:16])
            return int(seconds) * 1_000_000_000 + int(nanoseconds)
    return None


_stamping_holder: list[socket.socket] = []


def hold_receive_timestamps(timeout_seconds: float = 2.0) -> bool:
    """Make the kernel stamp arriving TCP bytes from now on, for the rest of this process;
    False where it does not (not Linux, or no stamp within the timeout).

    Linux turns receive stamping on for the whole machine in deferred work after a socket first
    asks for it, and off again once no socket holds the option: bytes that arrive in between
    carry no stamp, and their replies no arrival time. So one loopback connection holds the
    option for the process's life, and a byte goes round it until one arrives stamped.
    """
    if _stamping_holder:
        return True
    with socket.create_server(("127.0.0.1", 0)) as listener:
        receiver = socket.create_connection(listener.getsockname())
        sender, _ = listener.accept()
    try:
        receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            sender.sendall(b"?")
            _, ancillary, _, _ = receiver.recvmsg(1, _TIMESTAMP_SPACE)
            if _arrival_ns(ancillary) is not None:
                sender.close()
                _stamping_holder.append(receiver)
                atexit.register(receiver.close)
                return True
            time.sleep(0.001)
    except OSError:
        pass
    sender.close()
    receiver.close()
    return False


@dataclass
class LoadResult:
    """What one load run observed."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    sent_latencies: list[float] = field(default_factory=list)
    """Open loop: from the moment each request was written, without the generator's lateness."""
    server_latencies: list[float | None] = field(default_factory=list)
    """Open loop: from the moment each request was written to its reply's arrival at the socket,
    without the generator's delay in reading it; None where the kernel gave no timestamp."""
    candidates: int = 0
    errors: int = 0
    generator_cpu_seconds: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if s == 200)

    def percentile_ms(self, q: float, *, accepted: bool = True, span: Span = "intended") -> float:
        """Latency percentile of the answered requests (200), or of the refused ones, over `span`
        (open loop; a closed loop records the default span only)."""
        latencies: Sequence[float | None]
        if span == "server":
            latencies = self.server_latencies
        else:
            latencies = self.sent_latencies if span == "sent" else self.latencies
        chosen = [
            latency
            for latency, status in zip(latencies, self.statuses, strict=True)
            if (status == 200) == accepted and latency is not None
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


@dataclass(slots=True)
class Reply:
    """One response: its status, and how long after the request's write its last bytes reached
    the socket (None where the kernel gives no receive timestamps)."""

    status: int
    server_seconds: float | None


class Connection:
    """One keep-alive HTTP/1.1 connection on a non-blocking socket, one request at a time.

    The event loop calls `_on_readable` when bytes arrive; each read also brings the kernel's
    receive timestamp of those bytes, which dates the reply they complete.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._buffer = bytearray()
        self._arrived_ns: int | None = None  # when the buffer's last bytes reached the socket
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hold_receive_timestamps():  # else not Linux: no arrival times, only reads
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock, loop)

    async def send(self, payload: bytes) -> Reply:
        """Send one request and read its whole response."""
        if self._failure is not None:
            raise self._failure
        sent_ns = time.time_ns()  # the kernel's timestamps are on the same (real-time) clock
        await self._loop.sock_sendall(self._sock, payload)
        while True:
            parsed = self._take_response()
            if parsed is not None:
                arrived = self._arrived_ns
                server = None if arrived is None else max(0, arrived - sent_ns) / 1e9
                return Reply(parsed, server)
            if self._failure is not None:
                raise self._failure
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take_response(self) -> int | None:
        """The status of the complete response at the buffer's start, removed from it."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buffer[: end + 4]).lower()
        start = head.find(b"content-length:")
        if start < 0:
            raise ConnectionError("response without Content-Length (chunked bodies are not read)")
        length = int(head[start + 15 : head.index(b"\r\n", start)])
        if len(buffer) < end + 4 + length:
            return None
        del buffer[: end + 4 + length]
        return int(head[9:12])

    def _on_readable(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(_RECEIVE_BYTES, _TIMESTAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(ConnectionError(f"read failed: {exc}"))
            return
        if not data:
            self._fail(ConnectionError("the server closed the connection"))
            return
        self._buffer += data
        self._arrived_ns = _arrival_ns(ancillary)
        self._wake()

    def _fail(self, failure: BaseException) -> None:
        self._failure = failure
        self._loop.remove_reader(self._sock.fileno())
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            if self._failure is None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        if self._failure is None:
            self._failure = ConnectionError("the connection is closed")
        self._wake()


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
    deadline = 0.0  # set when the clients start

    async def client(index: int) -> None:
        conn = await Connection.open(host, port)
        i = index
        try:
            while time.perf_counter() < deadline:
                payload = payloads[i % len(payloads)]
                started = time.perf_counter()
                status = (await conn.send(payload)).status
                result.latencies.append(time.perf_counter() - started)
                result.statuses.append(status)
                if status == 200:
                    result.candidates += sizes[i % len(sizes)]
                i += connections
        finally:
            conn.close()

    with collector_paused():
        cpu = time.process_time()
        started = time.perf_counter()
        deadline = started + seconds
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
            reply = await conn.send(payloads[index % len(payloads)])
        except ConnectionError:
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
        result.server_latencies.append(reply.server_seconds)
        result.statuses.append(reply.status)
        if reply.status == 200:
            result.candidates += sizes[index % len(sizes)]
        await release(conn)

    with collector_paused():
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
