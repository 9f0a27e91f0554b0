"""What drift monitoring costs: the worker thread's CPU per sampled request, no HTTP.

    python -m benchmarks.drift_cost --candidates 8 256 --rate 100 --seconds 10

The demo model's DriftMonitor is handed `--rate` sampled requests a second, one at a time, as
a 5 % sample of a few thousand requests/s arrives, for `--seconds`; each is `--candidates`
rows of the model's shape. The worker thread's own CPU time (Linux's schedstat) is divided by
the samples it binned, once with every sample binned as it comes (a linger of 0) and once
with the default linger, which bins those that arrive within it together. The worker shares
the interpreter lock with the event loop, so its CPU is taken from the requests' time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from feature_client.assembly import ModelInputs
from service.cli import DEMO_REPOSITORY
from service.drift import LINGER_SECONDS, DriftMonitor
from service.metrics import Metrics
from service.registry import LoadedModel, load_version
from service.repository import ModelRepository
from service.settings import Settings


def thread_cpu_seconds(native_id: int) -> float:
    """CPU time so far of one thread of this process (Linux: schedstat, in ns)."""
    text = Path(f"/proc/self/task/{native_id}/schedstat").read_text()
    return int(text.split()[0]) / 1e9


def sample_inputs(model: LoadedModel, rows: int, rng: np.random.Generator) -> ModelInputs:
    """`rows` rows of the model's input shape (binning costs the same whatever the values)."""
    dense = rng.normal(size=(rows, len(model.spec.dense()))).astype(np.float32)
    ids = rng.integers(0, 1000, size=(rows, len(model.spec.categorical())), dtype=np.int64)
    return ModelInputs(dense, ids)


def worker_cpu_per_sample(
    model: LoadedModel, rows: int, rate: float, seconds: float, linger_seconds: float
) -> tuple[float, int]:
    """The drift worker's CPU ms per sample at `rate` samples/s, and the samples binned."""
    rng = np.random.default_rng(0)
    inputs = sample_inputs(model, rows, rng)
    scores = rng.random(rows)
    found = np.ones(rows, dtype=np.bool_)
    metrics = Metrics(CollectorRegistry())
    monitor = DriftMonitor(
        sample_rate=1.0,
        max_pending=256,
        window_seconds=3600,
        window_buckets=12,
        min_rows=1,
        dropped=metrics.drift_dropped,
        linger_seconds=linger_seconds,
    )
    monitor.submit(model, inputs, scores, True, found)  # starts the worker
    monitor.wait_idle(10)
    worker = monitor.worker
    assert worker is not None and worker.native_id is not None
    cpu = thread_cpu_seconds(worker.native_id)
    total = int(rate * seconds)
    started = time.perf_counter()
    for index in tqdm(range(total), desc=f"{rows} rows, linger {linger_seconds} s", unit="sample"):
        time.sleep(max(0.0, started + index / rate - time.perf_counter()))
        monitor.submit(model, inputs, scores, True, found)
    if not monitor.wait_idle(30):
        raise TimeoutError("the drift worker did not keep up")
    spent = thread_cpu_seconds(worker.native_id) - cpu
    monitor.close()
    dropped = int(metrics.drift_dropped.labels(model.name)._value.get())
    binned = total - dropped
    return spent / max(1, binned) * 1000, binned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=DEMO_REPOSITORY)
    parser.add_argument("--name", default="pcvr")
    parser.add_argument("--candidates", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--rate", type=float, default=100.0, help="sampled requests/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    repo = ModelRepository(args.repository)
    settings = Settings(model_repository=args.repository, inference_threads=1)
    model = load_version(repo, args.name, repo.active_version(args.name), settings)
    lines = [
        f"model {args.name} v{model.version}, {args.rate:g} sampled requests/s for "
        f"{args.seconds:g} s",
        "",
        "| candidates | worker CPU per sample, each alone | with a linger of "
        f"{LINGER_SECONDS} s | ratio | share of a core, alone | with the linger |",
        "|---|---|---|---|---|---|",
    ]
    for rows in args.candidates:
        alone, _ = worker_cpu_per_sample(model, rows, args.rate, args.seconds, 0.0)
        lingering, _ = worker_cpu_per_sample(model, rows, args.rate, args.seconds, LINGER_SECONDS)
        lines.append(
            f"| {rows} | {alone:.3f} ms | {lingering:.3f} ms | {alone / lingering:.1f}x | "
            f"{alone * args.rate / 10:.1f} % | {lingering * args.rate / 10:.1f} % |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
