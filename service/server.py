"""uvicorn with a drain phase: on SIGTERM, readiness fails at once and serving goes on for
`shutdown_delay_seconds`, so load balancers stop sending before the server stops accepting.

Kubernetes gets the same effect from a preStop sleep (deploy/k8s); this covers every other
load balancer that follows readiness.
"""

from __future__ import annotations

import logging
import socket
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.http_protocol import OneWriteHttpProtocol
from service.settings import Settings
from service.workers import announce_ready

logger = logging.getLogger("adscore")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, delay_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._delay = delay_seconds
        self._draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # listening now: as a worker, tell the supervisor and the siblings
            announce_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self._app.state, "service", None)
        if state is not None:
            state.shutting_down = True  # /readyz answers 503 from now on
        if self._delay <= 0 or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        logger.info("draining: not ready, still serving for %.1f s", self._delay)
        timer = threading.Timer(self._delay, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, not listening yet: uvicorn listens on it
    after the lifespan has loaded the models, so the kernel sends a worker no connection before
    it can score."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def serve(app: FastAPI, settings: Settings, *, sockets: list[socket.socket] | None = None) -> None:
    """Serve until stopped: on host:port, or on `sockets` (a worker's SO_REUSEPORT socket)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
        http=OneWriteHttpProtocol,
    )
    DrainingServer(config, app, settings.shutdown_delay_seconds).run(sockets=sockets)
