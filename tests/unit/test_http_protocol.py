"""One socket write per response (service/http_protocol.py): the held write's own logic on a
recording transport, then uvicorn with the protocol on a real socket."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from feature_client.redis_server import free_port
from service.http_protocol import HeldWriteTransport, OneWriteHttpProtocol


class RecordingTransport(asyncio.Transport):
    """What reached the socket, one entry per write system call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", b"".join(list_of_data)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closed = True

    def abort(self) -> None:
        self.calls.append(("abort", b""))

    def get_write_buffer_size(self) -> int:
        return 0


async def held(body: Any) -> list[tuple[str, bytes]]:
    inner = RecordingTransport()
    await body(HeldWriteTransport(inner, asyncio.get_running_loop()))
    await asyncio.sleep(0)  # the end of the iteration: anything held leaves
    return inner.calls


def test_a_head_and_its_body_leave_in_one_write() -> None:
    async def body(transport: HeldWriteTransport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"{}")

    assert asyncio.run(held(body)) == [("write", b"HTTP/1.1 200 OK\r\n\r\n{}")]


def test_a_lone_write_leaves_at_the_end_of_the_loop_iteration() -> None:
    async def body(transport: HeldWriteTransport) -> None:
        transport.write(b"head")
        assert transport.get_write_buffer_size() == 4  # held, and counted as buffered
        await asyncio.sleep(0)
        transport.write(b"chunk")

    assert asyncio.run(held(body)) == [("write", b"head"), ("write", b"chunk")]


def test_bytes_keep_their_order_across_several_writes() -> None:
    async def body(transport: HeldWriteTransport) -> None:
        for part in (b"a", b"b", b"c"):
            transport.write(part)
        transport.writelines([b"d", b"e"])
        transport.write(memoryview(b"f"))

    calls = asyncio.run(held(body))
    assert b"".join(data for _, data in calls) == b"abcdef"
    assert calls[0] == ("write", b"ab")  # the first two joined


def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    async def closing(transport: HeldWriteTransport) -> None:
        transport.write(b"last")
        transport.close()

    async def aborting(transport: HeldWriteTransport) -> None:
        transport.write(b"dropped")
        transport.abort()

    assert asyncio.run(held(closing)) == [("write", b"last"), ("close", b"")]
    assert asyncio.run(held(aborting)) == [("abort", b"")]


# --- uvicorn with the protocol, on a real socket ---------------------------------------------

BODY = b'{"scores":[0.1,0.2]}'


class App:
    """/plain answers at once; /streamed sends its head, then waits for `proceed` before each of
    its two body chunks."""

    def __init__(self) -> None:
        self.proceed: asyncio.Queue[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"application/json")]
        if scope["path"] == "/plain":
            headers.append((b"content-length", str(len(BODY)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": BODY})
            return
        self.loop = asyncio.get_running_loop()
        self.proceed = asyncio.Queue()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk, more in ((b"[1,", True), (b"2]", False)):
            await self.proceed.get()
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    def go_on(self) -> None:
        assert self.loop is not None and self.proceed is not None
        self.loop.call_soon_threadsafe(self.proceed.put_nowait, None)


@pytest.fixture()
def server() -> Iterator[tuple[int, App]]:
    app = App()
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", http=OneWriteHttpProtocol
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        assert thread.is_alive(), "the server exited during start-up"
        threading.Event().wait(0.02)
    yield port, app
    running.should_exit = True
    thread.join(timeout=10)


def read_until(sock: socket.socket, marker: bytes, have: bytes = b"") -> bytes:
    data = have
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; received {data!r}"
        data += chunk
    return data


def test_pipelined_requests_get_whole_responses_in_order(server: tuple[int, App]) -> None:
    port, _ = server
    request = b"POST /plain HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request * 3)
        data = b""
        while data.count(BODY) < 3:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection; received {data!r}"
            data += chunk
    responses = data.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 3
    for response in responses:
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"200 OK")
        assert f"content-length: {len(BODY)}".encode() in head
        assert body == BODY


def test_a_head_is_not_held_back_while_the_body_is_pending(server: tuple[int, App]) -> None:
    port, app = server
    request = b"POST /streamed HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        # The app sends no chunk until told: the head must arrive on its own.
        data = read_until(sock, b"\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in data
        app.go_on()
        data = read_until(sock, b"[1,", data)
        app.go_on()
        data = read_until(sock, b"0\r\n\r\n", data)
    assert data.endswith(b"3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n")


def test_a_closing_response_arrives_whole_before_the_close(server: tuple[int, App]) -> None:
    port, _ = server
    request = b"POST /plain HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):  # until the server closes
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(BODY)
