"""Micro-batching over HTTP: small requests at high concurrency, batching off against on.

    python -m benchmarks.batching --candidates 8 --connections 64 --seconds 10 --repeats 3

One private redis-server with the harness's population; adscore is started once per setting
(`ADSCORE_MAX_BATCH_ROWS=1`, i.e. off, then each `--batch-rows`/`--delays-us` setting), with
the same requests, interleaved over `--repeats` rounds so that machine noise hits every setting
alike. Each setting gets a closed-loop point (maximum candidates/s) and an open-loop point at
`--load` of batching-off's maximum (the p99 at the same offered load). `max_in_flight` is raised
for every setting alike, so that admission does not cap the batches (rows are bounded by
`max_queued_rows`). Writes batching-<candidates>.md and .json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from tqdm import tqdm

from benchmarks import population, servers
from benchmarks.measure import closed_loop_point, open_loop_point
from feature_client.redis_server import LocalRedisServer


def _settings(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    common = {"max_in_flight": str(args.max_in_flight)}
    chosen = [("off (max_batch_rows=1)", common | {"max_batch_rows": "1"})]
    for rows in args.batch_rows:
        for delay in args.delays_us:
            label = f"max_batch_rows={rows}, delay {delay} µs"
            chosen.append(
                (label, common | {"max_batch_rows": str(rows), "max_batch_delay_us": str(delay)})
            )
    return chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    metadata = population.active_model(args.model_repository, args.model)
    world = population.bench_world(metadata, args.users, args.ads)
    calls = population.request_mix(world, args.requests, candidates=args.candidates)
    settings = _settings(args)
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in settings}
    with LocalRedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        population.load_population(redis.url, world, metadata.spec())
        off_rate: float | None = None
        points = args.repeats * len(settings)
        with tqdm(total=points, desc="settings", unit="run") as progress:
            for _ in range(args.repeats):
                for label, env in settings:
                    log = Path(tmp) / "adscore.log"
                    with servers.adscore(
                        args.model_repository, redis.url, log, model_name=args.model, **env
                    ) as service:
                        closed = closed_loop_point(
                            service, calls, Path(tmp), args.connections, args.seconds
                        )
                        if off_rate is None:  # the first off run sets the offered load
                            off_rate = args.load * closed["requests_per_second"]
                        opened = open_loop_point(service, calls, off_rate, args.seconds)
                    rounds[label].append({"closed_loop": closed, "open_loop": opened})
                    progress.update()
    return {
        "command": " ".join(["python -m benchmarks.batching", *args.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "candidates": args.candidates,
        "connections": args.connections,
        "max_in_flight": args.max_in_flight,
        "offered_per_second": off_rate,
        "load": args.load,
        "rounds": rounds,
    }


def _median(runs: list[dict[str, Any]], point: str, key: str) -> float:
    return float(median(r[point][key] for r in runs))


def _degraded(runs: list[dict[str, Any]], point: str) -> str:
    """The median share of answers scored on default features (they skip the fetch)."""
    shares = [r[point].get("degraded_share") for r in runs]
    if any(share is None for share in shares):
        return "n/a"
    return f"{median(shares):.1%}"


def report(result: dict[str, Any]) -> str:
    rounds = result["rounds"]
    off_label = next(iter(rounds))
    off = _median(rounds[off_label], "closed_loop", "candidates_per_second")
    lines = [
        f"# Micro-batching over HTTP: {result['candidates']}-candidate requests",
        "",
        f"`{result['command']}`",
        "",
        f"Closed loop: {result['connections']} connections (wrk when installed). Open loop: "
        f"Poisson arrivals at {result['offered_per_second']:.0f} requests/s "
        f"({result['load']:.0%} of batching off's maximum) for every setting. "
        f"max_in_flight={result['max_in_flight']} for all. Medians of "
        f"{len(rounds[off_label])} interleaved rounds.",
        "",
        "| setting | candidates/s | x off | closed-loop p99 ms | server CPU ms/request | "
        "open-loop p50 ms | open-loop p99 ms | degraded (closed, open) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in rounds.items():
        rate = _median(runs, "closed_loop", "candidates_per_second")
        lines.append(
            f"| {label} | {rate:,.0f} | {rate / off:.2f} | "
            f"{_median(runs, 'closed_loop', 'p99_ms'):.1f} | "
            f"{_median(runs, 'closed_loop', 'server_cpu_ms_per_request'):.2f} | "
            f"{_median(runs, 'open_loop', 'p50_ms'):.1f} | "
            f"{_median(runs, 'open_loop', 'p99_ms'):.1f} | "
            f"{_degraded(runs, 'closed_loop')}, {_degraded(runs, 'open_loop')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=__doc__)
    parser.add_argument("--candidates", type=int, default=8, help="per request (default 8)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per point (default 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-rows", default="256", help="comma-separated max_batch_rows")
    parser.add_argument("--delays-us", default="0", help="comma-separated max_batch_delay_us")
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--load", type=float, default=0.7, help="open-loop load (of off's max)")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--ads", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--out", type=Path, default=Path("bench-report"))
    population.add_model_flags(parser)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    args.argv = raw
    args.batch_rows = [int(r) for r in args.batch_rows.split(",")]
    args.delays_us = [int(d) for d in args.delays_us.split(",")]
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"batching-{args.candidates}.json").write_text(json.dumps(result, indent=2))
    text = report(result)
    (args.out / f"batching-{args.candidates}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
