"""Latency during hot swaps: p99 of requests in flight while a version loads, against steady state.

Starts a private redis-server with the demo features and `adscore serve` on a copy of the demo
repository, drives it with concurrent clients (256 candidates per request), and swaps the active
version back and forth several times (each swap loads a version from scratch: checksum,
session, checks, warm-up). Runs once per loader priority so the effect of the low-priority
loader thread is measured side by side:

    python -m benchmarks.swap_latency                  # loader nice 0 and 10, 6 swaps each
    python -m benchmarks.swap_latency --swaps 10 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from feature_client.redis_server import LocalRedisServer, free_port
from feature_client.redis_store import RedisFeatureStore
from models.synthetic import load_world_features, world_for_model
from service.repository import ModelRepository

DEMO = Path(__file__).resolve().parent.parent / "demo" / "model_repository"
NAME = "pcvr"


@dataclass(frozen=True)
class Sample:
    started: float
    seconds: float
    ok: bool


def _publish_twin(repository: ModelRepository) -> int:
    """The active version again, as a new version: each swap then loads a real model."""
    active = repository.active_version(NAME)
    metadata = repository.read_metadata(NAME, active)
    return repository.publish(
        NAME, repository.model_path(NAME, active), metadata, activate=False
    ).version


def _drive(url: str, body: dict[str, object], stop: threading.Event, out: list[Sample]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = client.post("/v1/score", json=body).status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append(Sample(started, time.perf_counter() - started, ok))


def _serve(root: Path, redis_url: str, nice: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = os.environ | {
        "ADSCORE_MODEL_REPOSITORY": str(root),
        "ADSCORE_REDIS_URL": redis_url,
        "ADSCORE_PORT": str(port),
        "ADSCORE_AUTH_ENABLED": "false",
        "ADSCORE_LOADER_NICE": str(nice),
        "ADSCORE_LOG_LEVEL": "warning",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


def run_once(
    folder: Path, redis_url: str, nice: int, swaps: int, clients: int, body: dict[str, object]
) -> dict[str, float]:
    root = folder / f"repository-nice-{nice}"
    shutil.copytree(DEMO, root)
    repository = ModelRepository(root)
    versions = [repository.active_version(NAME), _publish_twin(repository)]
    process, url = _serve(root, redis_url, nice, folder / f"serve-nice-{nice}.log")
    samples: list[Sample] = []
    stop = threading.Event()
    workers = [
        threading.Thread(target=_drive, args=(url, body, stop, samples)) for _ in range(clients)
    ]
    windows: list[tuple[float, float]] = []
    try:
        for worker in workers:
            worker.start()
        time.sleep(2.0)  # warm the clients and the server up
        for i in range(swaps):
            time.sleep(1.5)
            started = time.perf_counter()
            response = httpx.post(
                f"{url}/v1/models/{NAME}/activate",
                json={"version": versions[(i + 1) % 2]},
                timeout=60,
            )
            response.raise_for_status()
            windows.append((started, time.perf_counter()))
        time.sleep(1.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        process.terminate()
        process.wait(timeout=30)

    def in_swap(s: Sample) -> bool:
        return any(start <= s.started <= end + 0.05 for start, end in windows)

    first = windows[0][0] - 1.5
    measured = [s for s in samples if s.started >= first]
    during = [s.seconds for s in measured if in_swap(s)]
    steady = [s.seconds for s in measured if not in_swap(s)]
    return {
        "requests": len(measured),
        "failed": sum(not s.ok for s in measured),
        "swap_seconds": float(np.mean([end - start for start, end in windows])),
        "steady_p50_ms": float(np.percentile(steady, 50) * 1000),
        "steady_p99_ms": float(np.percentile(steady, 99) * 1000),
        "swap_p99_ms": float(np.percentile(during, 99) * 1000),
        "swap_requests": len(during),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=6, help="swaps per run (default 6)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--candidates", type=int, default=256, help="per request (default 256)")
    parser.add_argument(
        "--nice", type=int, nargs="+", default=[0, 10], help="loader nice values to compare"
    )
    args = parser.parse_args()

    repository = ModelRepository(DEMO)
    metadata = repository.read_metadata(NAME, repository.active_version(NAME))
    world = world_for_model(metadata.dataset, metadata.spec().fingerprint())
    body: dict[str, object] = {
        "user_id": "u3",
        "context": {"device": "ios", "hour": 14},
        "candidates": [{"ad_id": f"a{i}"} for i in range(args.candidates)],
    }
    with tempfile.TemporaryDirectory(prefix="adscore-swap-") as tmp, LocalRedisServer() as redis:

        async def load() -> None:
            store = RedisFeatureStore.from_url(redis.url, "adscore", 10.0)
            await load_world_features(store, world)
            await store.close()

        asyncio.run(load())
        print(
            f"{args.swaps} swaps of the demo model, {args.clients} clients, "
            f"{args.candidates} candidates per request"
        )
        print(
            "| loader nice | requests | failed | swap (s) | steady p50 (ms) | steady p99 (ms) "
            "| p99 during swaps (ms) | ratio |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for nice in args.nice:
            r = run_once(Path(tmp), redis.url, nice, args.swaps, args.clients, body)
            print(
                f"| {nice} | {r['requests']:.0f} | {r['failed']:.0f} | {r['swap_seconds']:.2f} "
                f"| {r['steady_p50_ms']:.2f} | {r['steady_p99_ms']:.2f} "
                f"| {r['swap_p99_ms']:.2f} ({r['swap_requests']:.0f} req) "
                f"| {r['swap_p99_ms'] / r['steady_p99_ms']:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
