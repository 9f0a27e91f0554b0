"""Several serving processes on one port (`ADSCORE_WORKERS` > 1), under one supervisor.

Why: Python runs one thread at a time per process, and at saturation a replica's event loop is
the busy thread while its inference threads wait for work. A second process brings a second
interpreter lock; on 2 cores, two processes served 1.5x the requests/s of one (BENCHMARKS.md).

How:
- Each worker is an ordinary `adscore serve` process. It binds the shared port with
  SO_REUSEPORT at once (so a port it cannot have fails it before any model loads), and listens
  only after its models are loaded: the kernel spreads new connections over the workers that
  listen, so a worker still loading (at start or after a restart) gets none.
- Workers keep their models in line with the repository the way separate replicas do (the
  repository poll), so an admin call answered by one worker reaches the others within
  `repository_poll_seconds`.
- Metrics use Prometheus's multiprocess mode: every worker writes its samples to files in one
  folder, and /metrics, whichever worker answers it, adds them up.
- The supervisor forwards SIGTERM, SIGINT and SIGHUP once to every worker (each drains as a
  single process would; a second Ctrl-C kills them) and restarts a worker that dies after it
  has started. A worker that dies before it started (a bad setting, a taken port, a model that
  does not load or does not fit in memory) would fail again: the supervisor then stops the
  others and exits with status 3, as does a worker dying more than 5 times a minute (status 1),
  so that Kubernetes sees the failure. Workers are sent SIGTERM when the supervisor dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

logger = logging.getLogger("adscore.workers")

# Set in a worker's environment: `adscore serve` then serves on a SO_REUSEPORT socket instead of
# supervising. No ADSCORE_ prefix: they are not settings.
WORKER_ENV = "_ADSCORE_WORKER"  # the worker's index
SUPERVISOR_ENV = "_ADSCORE_SUPERVISOR"  # the supervisor's process id
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# uvicorn's status for a failed start-up; adscore's workers use it for a port they cannot bind.
STARTUP_FAILURE = 3
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
POLL_SECONDS = 0.2
READY_PREFIX = "ready-"
PR_SET_PDEATHSIG = 1

Spawn = Callable[[int, Mapping[str, str]], subprocess.Popen[bytes]]


def worker_index() -> int | None:
    """This process's index when it is a worker of a supervisor, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def _shared_folder() -> Path | None:
    folder = os.environ.get(METRICS_DIR_ENV)
    return Path(folder) if folder and worker_index() is not None else None


def announce_ready() -> None:
    """Tell the supervisor and the sibling workers that this one has started (a no-op outside a
    supervisor). The marker holds the process id, so that a replacement that dies while it
    starts is told apart from the worker it replaced."""
    folder, index = _shared_folder(), worker_index()
    if folder is not None and index is not None:
        marker = folder / f"{READY_PREFIX}{index}"
        partial = folder / f"{READY_PREFIX}{index}.partial"
        partial.write_text(str(os.getpid()))
        partial.replace(marker)  # atomic: nobody reads half a process id


def has_started(folder: Path, index: int, pid: int) -> bool:
    """Whether worker `index`, running as process `pid`, announced that it had started."""
    try:
        return (folder / f"{READY_PREFIX}{index}").read_text() == str(pid)
    except OSError:
        return False


def workers_starting(workers: int) -> int:
    """Workers that have not started yet since the supervisor did (0 outside a supervisor).

    A replica reports ready only once every worker has started: connections opened before a
    worker listens all go to the others and, kept alive, stay there. A worker restarted later
    does not take the replica out of rotation; its siblings serve meanwhile."""
    folder = _shared_folder()
    if folder is None:
        return 0
    announced = [m for m in folder.glob(f"{READY_PREFIX}*") if m.suffix != ".partial"]
    return max(0, workers - len(announced))


def follow_supervisor() -> None:
    """In a worker: be sent SIGTERM (and so drain and stop) when the supervisor dies, however it
    dies, so that no worker goes on serving the port alone (Linux; elsewhere a no-op)."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor is None or not sys.platform.startswith("linux"):
        return
    try:
        failed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0
    except (AttributeError, OSError):  # a libc without prctl
        failed = True
    if failed:
        logger.warning(
            "could not ask to be stopped with the supervisor (errno %d)", ctypes.get_errno()
        )
    if os.getppid() != int(supervisor):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def claim_port(host: str, port: int) -> socket.socket:
    """A lock on host:port for this supervisor's life (OSError when another holds it): an
    abstract Unix socket named after the port, freed by the kernel when the process ends, and
    private to the network namespace, like the port. It covers what ensure_port_free cannot
    see: another supervisor whose workers have bound the port but not listened yet."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0adscore-port-{host}:{port}")
    except OSError:
        lock.close()
        raise
    return lock


def ensure_port_free(host: str, port: int) -> None:
    """OSError when a process already holds host:port. Workers bind with SO_REUSEPORT, which
    would silently share the port with any process of the same user binding it the same way
    (an earlier adscore, say); a plain bind refuses that first."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def spawn_serve(index: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """One `adscore serve` worker, in a session of its own: a terminal's Ctrl-C reaches the
    supervisor alone, which forwards it once."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], env=dict(env), start_new_session=True
    )


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]


@dataclass
class Supervisor:
    """Starts `workers` processes and keeps them running until asked to stop."""

    workers: int
    env: Mapping[str, str]
    metrics_dir: Path
    stop_timeout_seconds: float
    spawn: Spawn = spawn_serve
    clock: Callable[[], float] = time.monotonic
    _running: list[Worker] = field(default_factory=list)
    _restarts: list[float] = field(default_factory=list)
    _stop_signal: int | None = None

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler: forward the first signal once (SIGHUP as SIGTERM, which uvicorn
        drains on; SIGHUP would kill a worker mid-request); a second Ctrl-C kills at once."""
        if self._stop_signal is None:
            self._stop_signal = signal.SIGTERM if signum == signal.SIGHUP else signum
            for worker in self._running:
                _signal(worker.process, self._stop_signal)
        elif signum == signal.SIGINT:
            logger.warning("interrupted again: killing the workers")
            for worker in self._running:
                _signal(worker.process, signal.SIGKILL)

    def run(self) -> int:
        """Supervise until a stop is requested (0) or a worker cannot go on (its status)."""
        for index in range(self.workers):
            self._start(index)
        logger.info("started %d workers", self.workers)
        status = 0
        while self._stop_signal is None:
            time.sleep(POLL_SECONDS)
            failure = self.check()
            if failure is not None:
                status = failure
                self.request_stop(signal.SIGTERM)
        self._wait_all()
        return status

    def stop(self) -> None:
        """Stop the workers still running (none once run() has returned)."""
        self.request_stop(signal.SIGTERM)
        self._wait_all()

    def check(self) -> int | None:
        """Restart workers that died; the status to exit with when one cannot be restarted."""
        for worker in list(self._running):
            if self._stop_signal is not None:  # they stop because they were asked to
                return None
            status = worker.process.poll()
            if status is None:
                continue
            self._running.remove(worker)
            pid = worker.process.pid
            mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            if not has_started(self.metrics_dir, worker.index, pid):
                logger.error(
                    "worker %d could not start (status %d): stopping", worker.index, status
                )
                return STARTUP_FAILURE
            now = self.clock()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_SECONDS]
            if len(self._restarts) >= MAX_RESTARTS:
                logger.error(
                    "worker %d died (status %d): %d restarts within %.0f s, giving up",
                    worker.index, status, MAX_RESTARTS, RESTART_WINDOW_SECONDS,
                )  # fmt: skip
                return 1
            self._restarts.append(now)
            logger.warning("worker %d died (status %d): restarting it", worker.index, status)
            self._start(worker.index)
        return None

    def _start(self, index: int) -> None:
        env = dict(self.env) | {
            WORKER_ENV: str(index),
            SUPERVISOR_ENV: str(os.getpid()),
            METRICS_DIR_ENV: str(self.metrics_dir),
        }
        worker = Worker(index, self.spawn(index, env))
        self._running.append(worker)
        if self._stop_signal is not None:  # asked to stop while it was being started
            _signal(worker.process, self._stop_signal)

    def _wait_all(self) -> None:
        deadline = self.clock() + self.stop_timeout_seconds
        for worker in self._running:
            try:
                worker.process.wait(timeout=max(0.0, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                logger.error("worker %d did not stop in time: killing it", worker.index)
                worker.process.kill()
                worker.process.wait()
            mark_process_dead(worker.process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        self._running.clear()


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        process.send_signal(signum)


def supervise(
    workers: int, overrides: Mapping[str, str], stop_timeout_seconds: float, host: str, port: int
) -> int:
    """Run `workers` serving processes with the settings of this one plus `overrides` (env
    variables) on host:port, until SIGTERM, SIGINT or SIGHUP. Returns the exit status."""
    try:
        lock = claim_port(host, port)
    except OSError:
        print(f"error: another adscore supervisor serves {host}:{port}", file=sys.stderr)
        return 2
    try:
        ensure_port_free(host, port)
    except OSError as exc:
        lock.close()
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    given = os.environ.get(METRICS_DIR_ENV)
    metrics_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="adscore-metrics-"))
    metrics_dir.mkdir(parents=True, exist_ok=True)
    # A previous run's samples must not be added in, nor its workers counted as started.
    for stale in [*metrics_dir.glob("*.db"), *metrics_dir.glob(f"{READY_PREFIX}*")]:
        stale.unlink()
    supervisor = Supervisor(
        workers, os.environ | dict(overrides), metrics_dir, stop_timeout_seconds
    )
    previous = {
        signum: signal.signal(signum, supervisor.request_stop)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        return supervisor.run()
    finally:
        supervisor.stop()  # after an exception too: no worker outlives its supervisor
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        lock.close()
