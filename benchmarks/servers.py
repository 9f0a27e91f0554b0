"""Start the services under test as child processes and read their CPU time and memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from feature_client.redis_server import free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """The process and its descendants now alive (a supervisor and its workers)."""
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # it exited meanwhile
            continue
    return pids


def _ticks(stat: Path) -> int:
    """User + system CPU clock ticks from a /proc stat file (0 once it has gone)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live descendants."""
    return sum(_ticks(Path(f"/proc/{member}/stat")) for member in process_tree(pid)) / CLOCK_TICKS


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU time so far of the main threads of a process and its live descendants: in a
    uvicorn server, the event loops, where every request's Python work runs."""
    ticks = sum(_ticks(Path(f"/proc/{m}/task/{m}/stat")) for m in process_tree(pid))
    return ticks / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its live descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(x.split()[1]) * 1024 for x in lines if x.startswith("VmRSS:"))
    return total


class Service:
    """A service process on a free loopback port, ready when `ready_path` answers 200."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        ready_path: str,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cwd = cwd
        self.port = free_port()
        self._argv = [a.replace("{port}", str(self.port)) for a in argv]
        self._env = os.environ | {k: v.replace("{port}", str(self.port)) for k, v in env.items()}
        self._log = log
        self._ready_path = ready_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Service:
        with self._log.open("wb") as out:
            self.process = subprocess.Popen(
                self._argv, env=self._env, stdout=out, stderr=out, cwd=self.cwd
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self._log.read_text()}")
            try:
                url = f"http://127.0.0.1:{self.port}{self._ready_path}"
                if httpx.get(url, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not become ready:\n{self._log.read_text()}")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def adscore(repository: Path, redis_url: str, log: Path, **settings: str) -> Service:
    """`adscore serve` from this checkout, with `settings` (names as in README, without the
    ADSCORE_ prefix)."""
    return adscore_at(None, repository, redis_url, log, **settings)


def adscore_at(
    root: Path | None, repository: Path, redis_url: str, log: Path, **settings: str
) -> Service:
    """`adscore serve` from the checkout at `root` (see checkouts.py), or from this one."""
    env = {
        "ADSCORE_PORT": "{port}",
        "ADSCORE_MODEL_REPOSITORY": str(repository),
        "ADSCORE_REDIS_URL": redis_url,
        "ADSCORE_AUTH_ENABLED": "false",
        "ADSCORE_LOG_LEVEL": "warning",
        "ADSCORE_MAX_CANDIDATES": "1024",
    } | {f"ADSCORE_{k.upper()}": v for k, v in settings.items()}
    if root is not None:  # its packages first, whatever this environment has installed
        env["PYTHONPATH"] = str(root)
    argv = [sys.executable, "-m", "service.cli", "serve"]
    return Service("adscore", argv, env, log, "/readyz", cwd=root)


def naive(repository: Path, redis_url: str, log: Path, model_name: str = "pcvr") -> Service:
    argv = [sys.executable, "-m", "benchmarks.naive_service", "--port", "{port}",
            "--redis-url", redis_url, "--model-repository", str(repository),
            "--model-name", model_name]  # fmt: skip
    return Service("naive", argv, {}, log, "/docs")


def http_floor(log: Path, workers: int = 1) -> Service:
    """HTTP and JSON alone (benchmarks/http_floor.py), in `workers` processes."""
    argv = [sys.executable, "-m", "benchmarks.http_floor", "--port", "{port}",
            "--workers", str(workers)]  # fmt: skip
    return Service("HTTP floor", argv, {}, log, "/")
