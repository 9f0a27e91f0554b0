"""`adscore serve` with ADSCORE_WORKERS=2: real processes sharing one port, metrics added up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from benchmarks.servers import process_tree
from tests.app.lifecycle_support import Setup, metric_value
from tests.fixtures import ServerProcess

REQUESTS = 40
ROOT = Path(__file__).parents[2]
SERVE = [sys.executable, "-m", "service.cli", "serve"]


@pytest.fixture
def supervised(setup: Setup, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "workers.log", **setup.settings(), workers=2)
    server.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def workers_of(server: ServerProcess) -> list[int]:
    assert server.process is not None
    return [pid for pid in process_tree(server.process.pid) if pid != server.process.pid]


def score_on_fresh_connections(setup: Setup, server: ServerProcess, count: int) -> None:
    """Each request on a connection of its own, so the kernel picks a worker for each."""
    for _ in range(count):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            response = client.post("/v1/score", json=setup.body(), headers=setup.auth("ad-server"))
            assert response.status_code == 200, response.text


def scored_by(metrics_dir: Path, pid: int) -> float:
    """adscore_requests_total of /v1/score 200 in one worker's own metrics file."""
    path = str(metrics_dir / f"counter_{pid}.db")
    families = MultiProcessCollector.merge([path])  # type: ignore[no-untyped-call]
    (family,) = [m for m in families if m.name == "adscore_requests"]
    return sum(
        float(s.value)
        for s in family.samples
        if s.name.endswith("_total") and s.labels == {"route": "/v1/score", "status": "200"}
    )


def test_two_workers_share_the_port_and_metrics_add_up(
    setup: Setup, supervised: ServerProcess, tmp_path: Path
) -> None:
    workers = workers_of(supervised)
    assert len(workers) == 2
    score_on_fresh_connections(setup, supervised, REQUESTS)

    per_worker = [scored_by(tmp_path / "metrics", pid) for pid in workers]
    assert all(count > 0 for count in per_worker), f"one worker got every request: {per_worker}"
    text = httpx.get(f"{supervised.url}/metrics", timeout=10).text
    total = metric_value(text, "adscore_requests_total", route="/v1/score", status="200")
    assert total == sum(per_worker) == REQUESTS
    candidates = metric_value(text, "adscore_candidates_per_request_sum")
    assert candidates == REQUESTS * len(setup.ad_ids)
    # One active version, served by both workers, is one sample at 1 (not one per worker).
    info = [line for line in text.splitlines() if line.startswith("adscore_model_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0"), info


def test_a_killed_worker_is_replaced_and_its_counts_are_kept(
    setup: Setup, supervised: ServerProcess
) -> None:
    score_on_fresh_connections(setup, supervised, 10)
    victim, survivor = workers_of(supervised)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        workers = workers_of(supervised)
        if len(workers) == 2 and victim not in workers:
            break
        assert time.monotonic() < deadline, f"no replacement worker:\n{supervised.log()}"
        time.sleep(0.1)
    assert survivor in workers
    score_on_fresh_connections(setup, supervised, 10)
    text = httpx.get(f"{supervised.url}/metrics", timeout=10).text
    total = metric_value(text, "adscore_requests_total", route="/v1/score", status="200")
    assert total == 20
    assert "worker 0 died" in supervised.log() or "worker 1 died" in supervised.log()


def test_sigterm_stops_every_worker_and_exits_cleanly(supervised: ServerProcess) -> None:
    assert supervised.process is not None
    workers = workers_of(supervised)
    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.process.wait(timeout=60) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_worker_that_cannot_start_stops_the_supervisor(setup: Setup, tmp_path: Path) -> None:
    env = os.environ | {
        "ADSCORE_WORKERS": "2",
        "ADSCORE_PORT": str(ServerProcess(tmp_path / "unused.log").port),
        "ADSCORE_MODEL_REPOSITORY": str(tmp_path / "no-such-repository"),
        "ADSCORE_REDIS_URL": setup.redis_url,
        "ADSCORE_AUTH_ENABLED": "false",
    }
    result = subprocess.run(
        SERVE, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "could not start" in result.stderr


def test_workers_need_a_fixed_port() -> None:
    env = os.environ | {
        "ADSCORE_WORKERS": "2",
        "ADSCORE_PORT": "0",
        "ADSCORE_AUTH_ENABLED": "false",
    }
    result = subprocess.run(
        [*SERVE, "--model-repository", "demo/model_repository"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "ADSCORE_WORKERS > 1 needs a fixed port" in result.stderr
