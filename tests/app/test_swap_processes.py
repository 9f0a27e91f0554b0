"""Real `adscore serve` processes: a hot swap under load, replicas converging, keys unlogged."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.app.lifecycle_support import Setup
from tests.fixtures import ServerProcess, publish_variant

SHIFT = 0.5


@pytest.fixture
def replicas(setup: Setup, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(tmp_path / f"replica-{i}.log", **setup.settings()) for i in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_replicas_converge_on_a_policy_change(setup: Setup, replicas: list[ServerProcess]) -> None:
    first, second = replicas
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{first.url}/v1/models/{setup.name}/activate",
            json={"version": v2},
            headers=setup.auth("ml-admin"),
        )
        assert response.status_code == 200, response.text
        changed = time.monotonic()
        while True:
            models = client.get(f"{second.url}/v1/models", headers=setup.auth("ad-server")).json()
            if models["models"][0]["active_version"] == v2:
                break
            assert time.monotonic() - changed < 15, "the second replica never converged"
            time.sleep(0.05)
        converged = time.monotonic() - changed
        print(f"second replica converged in {converged:.2f} s (poll interval 0.2 s)")
        for server in replicas:
            response = client.post(
                f"{server.url}/v1/score", json=setup.body(), headers=setup.auth("ad-server")
            )
            assert response.json()["model_version"] == v2


@dataclass(frozen=True)
class Sample:
    started: float
    seconds: float
    status: int
    version: int
    scores: tuple[float, ...]
    degraded: bool = False


def _load(url: str, setup: Setup, stop: threading.Event, out: list[Sample]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = client.post(
                    "/v1/score", json=setup.body(), headers=setup.auth("ad-server")
                )
            except httpx.HTTPError:
                out.append(Sample(started, time.perf_counter() - started, 0, 0, ()))
                continue
            seconds = time.perf_counter() - started
            body = response.json() if response.status_code == 200 else {}
            out.append(
                Sample(
                    started,
                    seconds,
                    response.status_code,
                    body.get("model_version", 0),
                    tuple(body.get("scores", ())),
                    body.get("degraded", False),
                )
            )


def _p99(samples: list[Sample]) -> float:
    return float(np.percentile([s.seconds for s in samples], 99))


def test_hot_swap_under_load_drops_nothing_and_keeps_p99(
    setup: Setup, replicas: list[ServerProcess]
) -> None:
    server = replicas[0]
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)
    samples: list[Sample] = []
    stop = threading.Event()
    workers = [
        threading.Thread(target=_load, args=(server.url, setup, stop, samples)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    try:
        time.sleep(3.0)
        swap_started = time.perf_counter()
        response = httpx.post(
            f"{server.url}/v1/models/{setup.name}/activate",
            json={"version": v2},
            headers=setup.auth("ml-admin"),
            timeout=60,
        )
        swap_ended = time.perf_counter()
        assert response.status_code == 200, response.text
        time.sleep(2.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join()

    assert [s for s in samples if s.status != 200] == []
    by_version = {
        # A fetch slower than its budget (a busy machine) answers on defaults: not a swap matter.
        version: np.array([s.scores for s in samples if s.version == version and not s.degraded])
        for version in (1, v2)
    }
    # Every response carries the scores of the version it names. Micro-batches of different
    # sizes may change the last float bits (other GEMM blocking), never more.
    v1_scores, v2_scores = by_version[1][0], by_version[v2][0]
    np.testing.assert_allclose(
        by_version[1], np.broadcast_to(v1_scores, by_version[1].shape), atol=1e-6
    )
    np.testing.assert_allclose(
        by_version[v2], np.broadcast_to(v2_scores, by_version[v2].shape), atol=1e-6
    )
    assert np.abs(v1_scores - v2_scores).min() > 1e-3
    assert all(s.version == v2 for s in samples if s.started > swap_ended)

    warm = swap_started - 2.0  # the first second warms the clients up
    steady = [s for s in samples if warm <= s.started < swap_started]
    during = [s for s in samples if swap_started <= s.started <= swap_ended + 0.5]
    steady_p99, during_p99 = _p99(steady), _p99(during)
    print(
        f"swap took {swap_ended - swap_started:.3f} s; p99 steady {steady_p99 * 1000:.2f} ms "
        f"({len(steady)} requests), during the swap {during_p99 * 1000:.2f} ms "
        f"({len(during)} requests), ratio {during_p99 / steady_p99:.2f}"
    )
    # The goal is 1.5x, measured by benchmarks/swap_latency.py; the test only catches a swap
    # that stalls serving for a long time.
    assert during_p99 < max(4 * steady_p99, steady_p99 + 0.1)


def test_keys_never_reach_the_logs(setup: Setup, replicas: list[ServerProcess]) -> None:
    server = replicas[0]
    bogus = "adsk_this-key-is-not-in-the-file"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for holder in setup.keys:
            client.post("/v1/score", json=setup.body(), headers=setup.auth(holder))
            client.get("/v1/models", headers={"X-API-Key": setup.keys[holder]})
        client.post("/v1/score", json=setup.body(), headers={"Authorization": f"Bearer {bogus}"})
        client.post(
            f"/v1/models/{setup.name}/activate", json={"version": 1}, headers=setup.auth("ml-admin")
        )
    for server_process in replicas:
        server_process.stop()
    log = server.log()
    assert '"who":"ml-admin"' in log  # the audit line names the key holder ...
    for key in [*setup.keys.values(), bogus]:
        assert key not in log  # ... and no key appears anywhere
    assert setup.keys["ml-admin"] not in setup.keys_file.read_text()
