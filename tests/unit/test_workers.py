"""The worker supervisor's own logic, with fake processes (real ones: tests/app/test_workers.py)."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from service.workers import (
    MAX_RESTARTS,
    METRICS_DIR_ENV,
    WORKER_ENV,
    Supervisor,
    announce_ready,
    workers_starting,
)


class FakeProcess:
    """A worker process: alive until signalled (unless stubborn) or born dead."""

    def __init__(self, pid: int, status: int | None = None, stubborn: bool = False) -> None:
        self.pid = pid
        self.returncode = status
        self.stubborn = stubborn
        self.signals: list[int] = []
        self.killed = False

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if not self.stubborn:
            self.returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("worker", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.returncode = -9


class Spawner:
    """Hands out FakeProcesses; `born` decides each one's fate from its spawn order."""

    def __init__(self, born: Callable[[int], FakeProcess]) -> None:
        self.born = born
        self.spawned: list[tuple[int, FakeProcess]] = []
        self.envs: list[Mapping[str, str]] = []

    def __call__(self, index: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        process = self.born(len(self.spawned))
        self.spawned.append((index, process))
        self.envs.append(env)
        return process  # type: ignore[return-value]


def supervisor(spawner: Spawner, tmp_path: Path, workers: int = 2) -> Supervisor:
    return Supervisor(workers, {"KEPT": "1"}, tmp_path, stop_timeout_seconds=1.0, spawn=spawner)


def stop_after(target: Supervisor, seconds: float) -> None:
    threading.Timer(seconds, target.request_stop, args=(signal.SIGTERM,)).start()


def test_workers_get_their_index_the_shared_folder_and_one_sigterm(tmp_path: Path) -> None:
    spawner = Spawner(lambda n: FakeProcess(100 + n))
    target = supervisor(spawner, tmp_path)
    stop_after(target, 0.3)
    assert target.run() == 0
    assert [env[WORKER_ENV] for env in spawner.envs] == ["0", "1"]
    assert all(env[METRICS_DIR_ENV] == str(tmp_path) and env["KEPT"] == "1" for env in spawner.envs)
    assert [p.signals for _, p in spawner.spawned] == [[signal.SIGTERM], [signal.SIGTERM]]
    target.request_stop(signal.SIGINT)  # a second signal is not forwarded again
    assert [len(p.signals) for _, p in spawner.spawned] == [1, 1]


def test_a_worker_that_dies_is_restarted_and_its_live_gauges_dropped(tmp_path: Path) -> None:
    # The first worker dies at once (a segfault, an OOM kill); its replacement lives.
    spawner = Spawner(lambda n: FakeProcess(100 + n, status=-11 if n == 0 else None))
    live_gauges = tmp_path / "gauge_livesum_100.db"
    live_gauges.write_bytes(b"")
    target = supervisor(spawner, tmp_path)
    stop_after(target, 0.6)
    assert target.run() == 0
    assert [index for index, _ in spawner.spawned] == [0, 1, 0]
    assert not live_gauges.exists()
    assert [p.signals for _, p in spawner.spawned[1:]] == [[signal.SIGTERM], [signal.SIGTERM]]


@pytest.mark.parametrize("status", [2, 3])
def test_a_worker_that_cannot_start_stops_the_others(tmp_path: Path, status: int) -> None:
    spawner = Spawner(lambda n: FakeProcess(100 + n, status=status if n == 0 else None))
    target = supervisor(spawner, tmp_path)
    assert target.run() == status
    assert len(spawner.spawned) == 2  # not restarted
    assert spawner.spawned[1][1].signals == [signal.SIGTERM]


def test_a_crash_loop_gives_up(tmp_path: Path) -> None:
    spawner = Spawner(lambda n: FakeProcess(100 + n, status=1))
    target = supervisor(spawner, tmp_path, workers=1)
    assert target.run() == 1
    assert len(spawner.spawned) == 1 + MAX_RESTARTS


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    spawner = Spawner(lambda n: FakeProcess(100 + n, stubborn=True))
    target = supervisor(spawner, tmp_path, workers=1)
    stop_after(target, 0.3)
    assert target.run() == 0
    assert spawner.spawned[0][1].killed


def test_readiness_waits_for_every_worker_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert workers_starting(2) == 0  # not a worker: nothing to wait for
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(WORKER_ENV, "0")
    assert workers_starting(2) == 2
    announce_ready()
    announce_ready()  # a restarted worker announces itself again: still one
    assert workers_starting(2) == 1
    monkeypatch.setenv(WORKER_ENV, "1")
    announce_ready()
    assert workers_starting(2) == 0
