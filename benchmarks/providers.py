"""The model runtime per execution provider, and what micro-batching buys, without HTTP.

    python -m benchmarks.providers --providers cpu,cuda --out benchmarks/results

For each provider (onnxruntime CPU with one intra-op thread, CUDA when present): the latency
of one call of the serving runtime at each batch size and the rows/s it implies; the largest
|probability| difference between the providers on the same rows; and small requests
(`--request-rows`, 8) sent by `--concurrency` concurrent callers through the service's
MicroBatcher with batching off (max_batch_rows=1) and on, side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from feature_client.assembly import ModelInputs
from service.batcher import BatchingPolicy, MicroBatcher
from service.calibration import Calibration
from service.metrics import Metrics
from service.repository import ModelRepository
from service.runtime import OnnxModelRuntime

DEFAULT_BATCHES = (1, 8, 64, 256, 1024, 4096)


def realistic_rows(repository: ModelRepository, name: str, rows: int, seed: int = 0) -> ModelInputs:
    """`rows` rows drawn from the model's golden rows: every column of ids is shuffled on its
    own (ids stay valid for their feature) and dense values are jittered."""
    golden = repository.read_metadata(name, repository.active_version(name)).golden
    dense = np.asarray(golden.dense, np.float32)
    ids = np.asarray(golden.ids, np.int64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(dense), size=(rows, ids.shape[1]))
    mixed_ids = ids[pick, np.arange(ids.shape[1])]
    jitter = rng.normal(1.0, 0.05, size=(rows, dense.shape[1])).astype(np.float32)
    return ModelInputs(dense[rng.integers(0, len(dense), rows)] * jitter, mixed_ids)


def _slice(inputs: ModelInputs, start: int, rows: int) -> ModelInputs:
    return ModelInputs(inputs.dense[start : start + rows], inputs.ids[start : start + rows])


@dataclass(frozen=True)
class CallTiming:
    provider: str
    batch: int
    median_ms: float
    p99_ms: float
    rows_per_second: float


def time_calls(
    label: str, runtime: OnnxModelRuntime, inputs: ModelInputs, batch: int, seconds: float
) -> CallTiming:
    """Median and p99 of back-to-back calls at one batch size, for about `seconds`."""
    rows = _slice(inputs, 0, batch)
    for _ in range(3):
        runtime.predict(rows)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(latencies) < 20:
        started = time.perf_counter()
        runtime.predict(rows)
        latencies.append(time.perf_counter() - started)
    median = float(np.median(latencies))
    return CallTiming(
        label,
        batch,
        median * 1000,
        float(np.percentile(latencies, 99)) * 1000,
        batch / median,
    )


@dataclass(frozen=True)
class BatchingRun:
    provider: str
    max_batch_rows: int
    rows_per_second: float
    p50_ms: float
    p99_ms: float
    mean_batch_rows: float


async def _callers(
    label: str,
    runtime: OnnxModelRuntime,
    inputs: ModelInputs,
    *,
    threads: int,
    max_batch_rows: int,
    concurrency: int,
    request_rows: int,
    seconds: float,
) -> BatchingRun:
    metrics = Metrics(CollectorRegistry())
    batcher = MicroBatcher(
        threads, BatchingPolicy(max_batch_rows=max_batch_rows), metrics.batching()
    )
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    requests = [
        _slice(inputs, (i * request_rows) % (len(inputs) - request_rows), request_rows)
        for i in range(256)
    ]

    async def caller(index: int) -> None:
        i = index
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await batcher.predict(runtime, requests[i % len(requests)])
            latencies.append(time.perf_counter() - started)
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    batcher.close()
    calls = metrics.registry.get_sample_value("adscore_batch_rows_count") or 1.0
    batched_rows = metrics.registry.get_sample_value("adscore_batch_rows_sum") or 0.0
    return BatchingRun(
        label,
        max_batch_rows,
        len(latencies) * request_rows / elapsed,
        float(np.percentile(latencies, 50)) * 1000,
        float(np.percentile(latencies, 99)) * 1000,
        batched_rows / calls,
    )


def parity(first: OnnxModelRuntime, second: OnnxModelRuntime, inputs: ModelInputs) -> float:
    """Largest |probability difference| between two runtimes on the same rows."""
    identity = Calibration()  # slope 1, intercept 0: the plain sigmoid
    a = identity.apply(first.predict(inputs))
    b = identity.apply(second.predict(inputs))
    return float(np.abs(a - b).max())


def _machine() -> str:
    """CPU model and core count, and the GPU's name where nvidia-smi answers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    described = f"{cpu}, {os.cpu_count()} cores"
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return described
    return f"{described}; {gpu}" if gpu else described


def run(args: argparse.Namespace) -> dict[str, Any]:
    repository = ModelRepository(args.model_repository)
    model_path = repository.model_path(args.model, repository.active_version(args.model))
    inputs = realistic_rows(repository, args.model, max(max(args.batches), 4096))
    runtimes: dict[str, OnnxModelRuntime] = {}
    for provider in args.providers:
        runtime = OnnxModelRuntime(model_path, execution_provider=provider)
        if provider == "cuda" and runtime.provider != "CUDAExecutionProvider":
            raise SystemExit("--providers cuda: onnxruntime has no working CUDA provider here")
        runtimes[provider] = runtime
    if "cuda" in runtimes and args.cuda_tf32:
        runtimes["cuda-tf32"] = OnnxModelRuntime(
            model_path, execution_provider="cuda", cuda_tf32=True
        )
    timings: list[CallTiming] = []
    batching: list[BatchingRun] = []
    steps = len(runtimes) * (len(args.batches) + 2 * args.repeats)
    with tqdm(total=steps, desc="measuring", unit="point") as progress:
        for batch in args.batches:
            for label, runtime in runtimes.items():
                timings.append(time_calls(label, runtime, inputs, batch, args.seconds))
                progress.update()
        for _ in range(args.repeats):  # interleaved: machine noise hits both settings alike
            for label, runtime in runtimes.items():
                for max_batch_rows in (1, args.max_batch_rows):
                    batching.append(
                        asyncio.run(
                            _callers(
                                label,
                                runtime,
                                inputs,
                                threads=args.threads,
                                max_batch_rows=max_batch_rows,
                                concurrency=args.concurrency,
                                request_rows=args.request_rows,
                                seconds=args.seconds * 2,
                            )
                        )
                    )
                    progress.update()
    differences = {}
    for name in ("cuda", "cuda-tf32"):
        if "cpu" in runtimes and name in runtimes:
            differences[f"{name}_vs_cpu_max_abs_probability"] = parity(
                runtimes["cpu"], runtimes[name], _slice(inputs, 0, 4096)
            )
    return {
        "command": "python -m benchmarks.providers " + " ".join(args.argv),
        "machine": _machine(),
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "calls": [t.__dict__ for t in timings],
        "batching": [b.__dict__ for b in batching],
        "parity": differences,
        "request_rows": args.request_rows,
        "concurrency": args.concurrency,
        "threads": args.threads,
    }


def _best(runs: list[dict[str, Any]], provider: str, rows: int) -> dict[str, Any]:
    """The median run (by rows/s) of one setting."""
    chosen = sorted(
        (r for r in runs if r["provider"] == provider and r["max_batch_rows"] == rows),
        key=lambda r: r["rows_per_second"],
    )
    return chosen[len(chosen) // 2]


def report(result: dict[str, Any]) -> str:
    lines = [
        "# Model runtime by execution provider, and micro-batching without HTTP",
        "",
        f"`{result['command']}`",
        "",
        f"{result['machine']}; onnxruntime {result['onnxruntime']}; available: "
        f"{', '.join(result['available_providers'])}.",
        "",
        "| provider | batch | median ms | p99 ms | rows/s |",
        "|---|---|---|---|---|",
    ]
    for t in result["calls"]:
        lines.append(
            f"| {t['provider']} | {t['batch']} | {t['median_ms']:.3f} | {t['p99_ms']:.3f} | "
            f"{t['rows_per_second']:,.0f} |"
        )
    lines += [
        "",
        f"{result['request_rows']}-row requests from {result['concurrency']} concurrent callers, "
        f"{result['threads']} inference thread(s), through the MicroBatcher (median of the "
        "repeats):",
        "",
        "| provider | max_batch_rows | rows/s | p50 ms | p99 ms | mean rows per call | x off |",
        "|---|---|---|---|---|---|---|",
    ]
    for provider in dict.fromkeys(r["provider"] for r in result["batching"]):
        off = _best(result["batching"], provider, 1)
        for rows in sorted({r["max_batch_rows"] for r in result["batching"]}):
            run_ = _best(result["batching"], provider, rows)
            lines.append(
                f"| {provider} | {rows} | {run_['rows_per_second']:,.0f} | {run_['p50_ms']:.2f} | "
                f"{run_['p99_ms']:.2f} | {run_['mean_batch_rows']:.1f} | "
                f"{run_['rows_per_second'] / off['rows_per_second']:.2f} |"
            )
    for name, value in result["parity"].items():
        lines += ["", f"{name}: {value:.2e}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.providers", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("demo/model_repository"))
    parser.add_argument("--model", default="pcvr")
    parser.add_argument("--providers", default="cpu", help="comma-separated: cpu,cuda")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement point")
    parser.add_argument("--threads", type=int, default=2, help="inference threads (batcher)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent small requests")
    parser.add_argument("--request-rows", type=int, default=8)
    parser.add_argument("--max-batch-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cuda-tf32", action="store_true", help="also measure CUDA with TF32 matrix products"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    raw = argv if argv is not None else __import__("sys").argv[1:]
    args = parser.parse_args(raw)
    args.argv = raw
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    args.batches = [int(b) for b in args.batches.split(",")]
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "providers-" + "-".join(args.providers)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = report(result)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
