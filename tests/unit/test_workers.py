"""The worker supervisor's own logic, with fake processes (real ones: tests/app/test_workers.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from service.workers import (
    MAX_RESTARTS,
    METRICS_DIR_ENV,
    STARTUP_FAILURE,
    SUPERVISOR_ENV,
    WORKER_ENV,
    Supervisor,
    announce_ready,
    claim_port,
    ensure_port_free,
    has_started,
    workers_starting,
)


class FakeProcess:
    """A worker process: alive until signalled (unless stubborn), or born dead."""

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
        if not self.stubborn or signum == signal.SIGKILL:
            self.returncode = -signum

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("worker", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.returncode = -9


class Spawner:
    """Hands out FakeProcesses: `born(n)` decides the n-th one's fate; those for which
    `announces(n)` holds write their ready marker (they started)."""

    def __init__(
        self,
        folder: Path,
        born: Callable[[int], FakeProcess],
        announces: Callable[[int], bool] = lambda n: True,
    ) -> None:
        self.folder = folder
        self.born = born
        self.announces = announces
        self.spawned: list[tuple[int, FakeProcess]] = []
        self.envs: list[Mapping[str, str]] = []

    def __call__(self, index: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        process = self.born(len(self.spawned))
        if self.announces(len(self.spawned)):
            (self.folder / f"ready-{index}").write_text(str(process.pid))
        self.spawned.append((index, process))
        self.envs.append(env)
        return process  # type: ignore[return-value]


def supervisor(spawner: Spawner, workers: int = 2) -> Supervisor:
    return Supervisor(workers, {"KEPT": "1"}, spawner.folder, 1.0, spawn=spawner)


def started(target: Supervisor, workers: int) -> Supervisor:
    for index in range(workers):
        target._start(index)
    return target


def test_workers_get_their_index_the_shared_folder_and_one_sigterm(tmp_path: Path) -> None:
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n))
    target = started(supervisor(spawner), 2)
    assert [env[WORKER_ENV] for env in spawner.envs] == ["0", "1"]
    assert all(env[METRICS_DIR_ENV] == str(tmp_path) for env in spawner.envs)
    assert all(env["KEPT"] == "1" and SUPERVISOR_ENV in env for env in spawner.envs)
    assert target.check() is None
    target.request_stop(signal.SIGTERM)
    target.request_stop(signal.SIGTERM)  # a second SIGTERM is not forwarded again
    assert [p.signals for _, p in spawner.spawned] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert target.check() is None  # stopping workers are not restarted
    assert len(spawner.spawned) == 2


def test_a_second_ctrl_c_kills_workers_that_are_still_draining(tmp_path: Path) -> None:
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n, stubborn=True))
    target = started(supervisor(spawner), 2)
    target.request_stop(signal.SIGINT)
    target.request_stop(signal.SIGINT)
    assert [p.signals for _, p in spawner.spawned] == [[signal.SIGINT, signal.SIGKILL]] * 2


def test_a_worker_that_dies_after_starting_is_restarted_and_its_live_gauges_dropped(
    tmp_path: Path,
) -> None:
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n))
    target = started(supervisor(spawner), 2)
    live_gauges = tmp_path / "gauge_livesum_100.db"
    live_gauges.write_bytes(b"")
    spawner.spawned[0][1].returncode = -11  # a segfault, an OOM kill
    assert target.check() is None
    assert [index for index, _ in spawner.spawned] == [0, 1, 0]
    assert not live_gauges.exists()
    target.request_stop(signal.SIGTERM)
    assert [p.signals for _, p in spawner.spawned] == [[], [signal.SIGTERM], [signal.SIGTERM]]


def test_a_worker_asked_to_stop_while_it_is_started_gets_the_signal(tmp_path: Path) -> None:
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n))
    target = supervisor(spawner)
    target.request_stop(signal.SIGTERM)
    target._start(0)
    assert spawner.spawned[0][1].signals == [signal.SIGTERM]


@pytest.mark.parametrize("status", [1, 2, 3, -9])
def test_a_worker_that_dies_before_it_started_stops_the_others(tmp_path: Path, status: int) -> None:
    # A replacement that dies while loading is told apart by the pid in the marker: worker 0's
    # first process started, its replacement (the third process) did not.
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n), announces=lambda n: n != 2)
    target = started(supervisor(spawner), 2)
    spawner.spawned[0][1].returncode = -11
    assert target.check() is None
    spawner.spawned[2][1].returncode = status
    assert target.check() == STARTUP_FAILURE
    assert len(spawner.spawned) == 3  # not restarted again


def test_run_stops_the_others_and_exits_3_when_a_worker_cannot_start(tmp_path: Path) -> None:
    spawner = Spawner(
        tmp_path, lambda n: FakeProcess(100 + n, status=1 if n == 0 else None), lambda n: n != 0
    )
    assert supervisor(spawner).run() == STARTUP_FAILURE
    assert spawner.spawned[1][1].signals == [signal.SIGTERM]


def test_a_crash_loop_gives_up(tmp_path: Path) -> None:
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n))
    target = started(supervisor(spawner, workers=1), 1)
    for _ in range(MAX_RESTARTS):
        spawner.spawned[-1][1].returncode = 1
        assert target.check() is None
    spawner.spawned[-1][1].returncode = 1
    assert target.check() == 1
    assert len(spawner.spawned) == 1 + MAX_RESTARTS


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n, stubborn=True))
    target = started(supervisor(spawner, workers=1), 1)
    target.stop()
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
    assert has_started(tmp_path, 0, os.getpid())
    assert not has_started(tmp_path, 0, 1) and not has_started(tmp_path, 1, 1)
    monkeypatch.setenv(WORKER_ENV, "1")
    announce_ready()
    assert workers_starting(2) == 0


def test_a_port_someone_listens_on_is_refused() -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError):
            ensure_port_free("127.0.0.1", port)
    ensure_port_free("127.0.0.1", port)  # free again once it closed


def test_a_workers_socket_is_bound_but_takes_no_connection_before_it_listens() -> None:
    from service.server import reuse_port_socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = reuse_port_socket("127.0.0.1", port)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        with pytest.raises(ConnectionRefusedError):  # the kernel sends it nobody yet
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        sock.listen()  # what uvicorn does once the lifespan has loaded the models
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        sock.close()


def test_sighup_is_forwarded_as_sigterm_which_workers_drain_on(tmp_path: Path) -> None:
    spawner = Spawner(tmp_path, lambda n: FakeProcess(100 + n))
    target = started(supervisor(spawner), 2)
    target.request_stop(signal.SIGHUP)
    assert [p.signals for _, p in spawner.spawned] == [[signal.SIGTERM], [signal.SIGTERM]]


def test_one_supervisor_per_port_even_before_its_workers_listen() -> None:
    lock = claim_port("127.0.0.1", 1)
    try:
        with pytest.raises(OSError):
            claim_port("127.0.0.1", 1)
        claim_port("127.0.0.1", 2).close()  # another port is another lock
    finally:
        lock.close()
    claim_port("127.0.0.1", 1).close()  # free once its holder let go
