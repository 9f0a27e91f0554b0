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
from service.app import create_app
from service.settings import Settings
from service.workers import METRICS_DIR_ENV, WORKER_ENV
from tests.app.lifecycle_support import Setup, metric_value
from tests.conftest import TrainedFixture
from tests.fixtures import LiveServer, ServerProcess

REQUESTS = 40
ROOT = Path(__file__).parents[2]
SERVE = [sys.executable, "-m", "service.cli", "serve"]


@pytest.fixture
def supervised(setup: Setup, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path / "workers.log", **setup.settings(), workers=2,
        ad_feature_cache_seconds=60, drift_sample_rate=1.0,
    )  # fmt: skip
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


def scrape_once_mirrored(server: ServerProcess, scored: int) -> str:
    """/metrics once every worker has mirrored its `scored` answers into the shared files
    (each does so every second, so a scrape may see another's a moment late)."""
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        total = metric_value(text, "adscore_requests_total", route="/v1/score", status="200")
        if total == scored:
            return text
        assert time.monotonic() < deadline, f"{total} of {scored} answers counted"
        time.sleep(0.2)


def test_two_workers_share_the_port_and_metrics_add_up(
    setup: Setup, supervised: ServerProcess, tmp_path: Path
) -> None:
    workers = workers_of(supervised)
    assert len(workers) == 2
    score_on_fresh_connections(setup, supervised, REQUESTS)

    text = scrape_once_mirrored(supervised, REQUESTS)
    per_worker = [scored_by(tmp_path / "metrics", pid) for pid in workers]
    assert all(count > 0 for count in per_worker), f"one worker got every request: {per_worker}"
    total = metric_value(text, "adscore_requests_total", route="/v1/score", status="200")
    assert total == sum(per_worker) == REQUESTS
    candidates = metric_value(text, "adscore_candidates_per_request_sum")
    assert candidates == REQUESTS * len(setup.ad_ids)
    # One active version, served by both workers, is one sample at 1 (not one per worker).
    info = [line for line in text.splitlines() if line.startswith("adscore_model_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0"), info


def test_scrape_time_metrics_are_added_up_over_workers(
    setup: Setup, supervised: ServerProcess
) -> None:
    """The hot-ad cache's counts and the drift window, kept in each worker, are mirrored into
    the shared files: a scrape counts every worker's lookups and sampled rows."""
    score_on_fresh_connections(setup, supervised, REQUESTS)
    rows = REQUESTS * len(setup.ad_ids)
    model = {"model": setup.name, "version": "1"}
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(f"{supervised.url}/metrics", timeout=10).text
        hits = metric_value(text, "adscore_ad_feature_cache_lookups_total", result="hit") or 0
        misses = metric_value(text, "adscore_ad_feature_cache_lookups_total", result="miss") or 0
        window = metric_value(text, "adscore_drift_window_rows", **model)
        if hits + misses == rows and window == rows:
            break
        assert time.monotonic() < deadline, f"lookups {hits}+{misses}, window {window} of {rows}"
        time.sleep(0.5)
    assert hits > 0 and misses > 0  # both workers read the ads once, then from their cache


def test_a_killed_worker_is_replaced_and_its_counts_are_kept(
    setup: Setup, supervised: ServerProcess
) -> None:
    score_on_fresh_connections(setup, supervised, 10)
    scrape_once_mirrored(supervised, 10)  # counts not yet mirrored die with their worker
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
    text = scrape_once_mirrored(supervised, 20)
    while metric_value(text, "adscore_process_starts_total") != 3:  # two workers, one restart
        assert time.monotonic() < deadline, "the replacement never finished starting"
        time.sleep(0.1)
        text = httpx.get(f"{supervised.url}/metrics", timeout=10).text
    assert "worker 0 died" in supervised.log() or "worker 1 died" in supervised.log()


def test_sigterm_stops_every_worker_and_exits_cleanly(supervised: ServerProcess) -> None:
    assert supervised.process is not None
    workers = workers_of(supervised)
    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.process.wait(timeout=60) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_workers_stopping_normally_write_every_count_first(setup: Setup, tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "workers.log", **setup.settings(), workers=2, shutdown_delay_seconds=0
    )
    server.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    server.start()
    try:
        workers = workers_of(server)
        score_on_fresh_connections(setup, server, REQUESTS)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)  # at once: the last second is not mirrored yet
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
    assert sum(scored_by(tmp_path / "metrics", pid) for pid in workers) == REQUESTS


def test_workers_stop_when_their_supervisor_is_killed(supervised: ServerProcess) -> None:
    assert supervised.process is not None
    workers = workers_of(supervised)
    supervised.process.kill()  # SIGKILL: no handler runs, no worker is told
    supervised.process.wait(timeout=10)
    deadline = time.monotonic() + 60
    while alive := [pid for pid in workers if is_running(pid)]:
        assert time.monotonic() < deadline, f"workers {alive} outlived their supervisor"
        time.sleep(0.1)


def is_running(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()  # a zombie has stopped
    except FileNotFoundError:
        return False


def test_a_port_in_use_is_refused_before_any_worker_starts(setup: Setup, tmp_path: Path) -> None:
    holder = ServerProcess(tmp_path / "holder.log", **setup.settings())
    holder.start()
    try:
        env = os.environ | {
            "ADSCORE_WORKERS": "2",
            "ADSCORE_PORT": str(holder.port),
            "ADSCORE_AUTH_ENABLED": "false",
        }
        result = subprocess.run(SERVE, env=env, capture_output=True, text=True, timeout=60)
    finally:
        holder.stop()
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{holder.port}" in result.stderr


def test_readiness_waits_until_every_worker_has_started(
    trained: TrainedFixture, feature_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process plays worker 0 of 2; worker 1 announces itself later.
    monkeypatch.setenv(WORKER_ENV, "0")
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    settings = Settings(
        model_repository=trained.repository, redis_url=feature_redis, auth_enabled=False, workers=2
    )
    server = LiveServer(create_app(settings))
    server.start()
    try:
        (tmp_path / "ready-0").write_text(str(os.getpid()))  # what DrainingServer announces
        response = httpx.get(f"{server.url}/readyz", timeout=10)
        assert response.status_code == 503
        assert response.json()["reason"] == "1 of 2 workers still starting"
        (tmp_path / "ready-1").write_text("4242")
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    finally:
        server.stop()


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
