"""The HTTP floor: the least any Python service must do per scoring request, and nothing else.

    python -m benchmarks.http_floor --port 8200 --workers 2

The same uvicorn (uvloop, httptools, one write per response) as adscore, in as many
processes on one port, serving a bare ASGI app that reads the body, parses the JSON, takes the
candidates' ad ids, and answers a response of adscore's shape with one constant score per
candidate: no validation, no feature store, no model, no metrics. Its maximum throughput is
what HTTP and JSON alone cost on this machine, so adscore can be held against the in-process
limit plus this floor (see `efficiency_ceiling`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send

from service.http_protocol import OneWriteHttpProtocol
from service.server import reuse_port_socket

HEADERS = [(b"content-type", b"application/json")]


async def floor_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every POST with one score per candidate; every other request with 200."""
    if scope["type"] != "http":  # lifespan: nothing to set up
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    request = orjson.loads(body) if body else {}
    ad_ids = [candidate["ad_id"] for candidate in request.get("candidates", ())]
    answer = orjson.dumps(
        {
            "request_id": None,
            "model": "floor",
            "model_version": 1,
            "scores": [0.5] * len(ad_ids),
            "missing": {"user": False, "ads": []},
            "degraded": False,
        }
    )
    # A Content-Length, as adscore sends: without one uvicorn would chunk the body.
    headers = [*HEADERS, (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def efficiency_ceiling(in_process_per_second: float, floor_per_second: float) -> float:
    """The most serving efficiency (requests/s over HTTP / the in-process limit) reachable when
    both saturate the same cores: each request costs the in-process work plus the floor's."""
    return floor_per_second / (in_process_per_second + floor_per_second)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_floor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes on the port")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    # Listening before the fork: every process accepts from the first connection on.
    sock = reuse_port_socket(args.host, args.port)
    sock.listen(2048)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            _serve(sock)
            os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        os.waitpid(child, 0)
    return 0


def _serve(sock: socket.socket) -> None:
    config = uvicorn.Config(
        floor_app, log_level="warning", access_log=False, lifespan="on", http=OneWriteHttpProtocol
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
