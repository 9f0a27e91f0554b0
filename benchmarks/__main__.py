"""The benchmark harness: adscore against the in-process limit, the HTTP floor and a naive
service, in one run.

    python -m benchmarks --out bench-report            # 16-512 candidates, 10 s per point
    python -m benchmarks --candidates 256 --seconds 20
    python -m benchmarks --quick                       # a smoke run: small world, 2 s per point

One private redis-server holds the features of a synthetic population (100k users, 200k ads by
default) encoded with the demo model's spec; every contender gets the same requests in the same
order. Writes report.md, results.json and latency.png (with the `bench` extra) to --out.

Serving efficiency compares two measurements taken at different moments, and a shared machine's
speed drifts by a quarter within minutes: the in-process limit and adscore's closed loop are
therefore alternated for `--rounds` rounds, and the efficiency is the median of the per-round
ratios (the figures shown for both sides are those of that round). adscore, started first, idles
while the in-process limit runs.

The open-loop curve runs in `--latency-rounds` rounds. With one worker, each starts with the
latency floor without HTTP (inprocess_latency.py): the in-process pipeline under Poisson
arrivals at 70 % of the in-process limit, whose p99 over its unloaded p50 is what queueing on
this machine allows any server built on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from benchmarks import inprocess, population, servers
from benchmarks.inprocess_latency import in_process_latency
from benchmarks.measure import closed_loop_point, open_loop_point
from benchmarks.report import latency_ratio, median_index, point_at, write_report
from feature_client.redis_server import LocalRedisServer
from service.cli import positive_int

LOADS = (0.3, 0.5, 0.7, 0.9, 1.5)


def _contender(
    name: str,
    service: servers.Service,
    calls: list[population.ScoreCall],
    folder: Path,
    args: argparse.Namespace,
    closed: dict[str, Any] | None = None,
    floor: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The closed loop (unless measured already) and the open-loop curve at shares of it, in
    --latency-rounds rounds; the curve shown is the round of the median latency ratio. Each
    round starts with `floor` when given: the in-process latency floor, measured beside it."""
    if closed is None:
        closed = _closed_loop(name, service, calls, folder, args)
    rounds = []
    for index in range(args.latency_rounds):
        print(f"{name}: latency round {index + 1}/{args.latency_rounds}", flush=True)
        measured: dict[str, Any] = {}
        if floor is not None:
            print("in-process latency floor (no HTTP): unloaded and at 70 %", flush=True)
            measured["in_process_latency"] = floor()
            print(f"  {measured['in_process_latency']['ratio']:.2f}x", flush=True)
        # A lone request: the unloaded latency the same round's load points are compared with.
        unloaded = open_loop_point(service, calls, 20.0, min(args.seconds, 5.0))
        curve = []
        for load in LOADS:
            rate = load * closed["requests_per_second"]
            print(f"{name}: open loop at {load:.0%} ({rate:.0f}/s)", flush=True)
            curve.append({"load": load} | open_loop_point(service, calls, rate, args.seconds))
            print(
                f"  p50 {curve[-1]['p50_ms']:.1f} ms, p99 {curve[-1]['p99_ms']:.1f} ms", flush=True
            )
        rounds.append({"open_loop": curve, "unloaded": unloaded, **measured})
    return {"closed_loop": closed, **median_latency_round(rounds)}


def median_latency_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The curve and unloaded point of the round whose latency ratio is the median (the lower
    of the middle two), so that the report's p99 and p50 divide to it; and every round's
    summary."""
    shown = rounds[median_index([latency_ratio(r) for r in rounds])]
    return {**shown, "latency_rounds": [_summary(r) for r in rounds]}


def _summary(latency_round: dict[str, Any]) -> dict[str, Any]:
    """What the report lists of every round: the ratio, each point's p99, and how fast the
    refusals at 150 % arrived (the overload target)."""
    at150 = point_at(latency_round, 1.5)
    return {
        "ratio": latency_ratio(latency_round),
        "unloaded_p50_ms": latency_round["unloaded"]["p50_ms"],
        "p99_ms": {str(p["load"]): p["p99_ms"] for p in latency_round["open_loop"]},
        "refusal_p99_to_arrival_ms_at_150": at150.get("rejected_p99_server_ms"),
        "in_process_latency": latency_round.get("in_process_latency"),
    }


def _closed_loop(
    name: str,
    service: servers.Service,
    calls: list[population.ScoreCall],
    folder: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    print(f"{name}: closed loop, {args.connections} connections", flush=True)
    closed = closed_loop_point(service, calls, folder, args.connections, args.seconds)
    print(f"  {closed['requests_per_second']:.0f} requests/s", flush=True)
    return closed


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("bench-report"), help="report folder")
    parser.add_argument("--seconds", type=float, help="per measurement (default 10)")
    parser.add_argument("--candidates", type=int, help="fixed candidates (default 16-512 mix)")
    parser.add_argument("--users", type=int, help="population (default 100k)")
    parser.add_argument("--ads", type=int, help="population (default 200k)")
    parser.add_argument("--requests", type=int, help="distinct requests (default 5,000)")
    parser.add_argument("--connections", type=int, default=16, help="closed loop (default 16)")
    parser.add_argument(
        "--rounds", type=positive_int,
        help="alternated rounds of the in-process limit and adscore's closed loop (default 3; "
        "1 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--latency-rounds", type=positive_int,
        help="rounds of the open-loop curve and the unloaded latency; the report shows the "
        "round of the median p99-at-70 %% ratio (default 3; 1 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1,
        help="adscore's serving processes (ADSCORE_WORKERS); the in-process limit runs in as "
        "many (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--setting", type=population.parse_setting, action="append", default=[],
        metavar="NAME=VALUE", help="an adscore setting for the served process, as in README "
        "Configuration without ADSCORE_ (repeatable), e.g. --setting inference_threads=1",
    )  # fmt: skip
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive service")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny and short")
    population.add_model_flags(parser)
    args = parser.parse_args()
    # --quick picks small defaults; values given on the command line still win.
    quick = {"seconds": 2.0, "users": 5_000, "ads": 10_000, "requests": 500, "rounds": 1,
             "latency_rounds": 1}  # fmt: skip
    full = {"seconds": 10.0, "users": 100_000, "ads": 200_000, "requests": 5_000, "rounds": 3,
            "latency_rounds": 3}  # fmt: skip
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    metadata = population.active_model(args.model_repository, args.model)
    world = population.bench_world(metadata, args.users, args.ads)
    calls = population.request_mix(world, args.requests, candidates=args.candidates)
    contexts = [orjson.loads(c.body)["context"] for c in calls]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "model": {
            "name": metadata.name,
            "version": metadata.version,
            "architecture": metadata.architecture,
        },
        "population": {"users": args.users, "ads": args.ads, "requests": args.requests},
        "candidates": args.candidates or "16-512 (log-uniform)",
        "mean_candidates": sum(len(c.ad_ids) for c in calls) / len(calls),
        "seconds_per_point": args.seconds,
        "workers": args.workers,
        "settings": dict(args.setting),
    }
    with LocalRedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        population.load_population(redis.url, world, metadata.spec())
        print(f"HTTP floor ({args.workers} process(es), JSON in and out, nothing else)", flush=True)
        with servers.http_floor(args.out / "floor.log", args.workers) as service:
            floor = closed_loop_point(service, calls, folder, args.connections, args.seconds)
        results["http_floor"] = floor
        print(f"  {floor['requests_per_second']:.0f} requests/s", flush=True)
        log = args.out / "adscore.log"
        served = {"model_name": args.model, "workers": str(args.workers)} | dict(args.setting)
        with servers.adscore(args.model_repository, redis.url, log, **served) as service:
            # The first round's closed loop must not be the one that warms the server up.
            closed_loop_point(service, calls, folder, args.connections, min(args.seconds, 2.0))
            limits, closed_loops = [], []
            for index in range(args.rounds):
                print(
                    f"round {index + 1}/{args.rounds}: in-process limit "
                    f"({args.workers} x 2 threads, no HTTP)",
                    flush=True,
                )
                limits.append(
                    inprocess.in_process_limit(
                        args.model_repository,
                        args.model,
                        redis.url,
                        calls,
                        contexts,
                        threads=2,
                        seconds=args.seconds,
                        processes=args.workers,
                    )
                )
                print(f"  {limits[-1]['requests_per_second']:.0f} requests/s", flush=True)
                closed_loops.append(_closed_loop("adscore", service, calls, folder, args))
            ratios = [
                closed["candidates_per_second"] / limit["candidates_per_second"]
                for limit, closed in zip(limits, closed_loops, strict=True)
            ]
            # Both sides' figures come from the round of the median ratio, so that the
            # headline's two numbers divide to its efficiency.
            middle = median_index(ratios)
            results["in_process"] = limits[middle]
            results["efficiency_rounds"] = ratios
            latency_floor = None
            if args.workers == 1:  # the in-process pipeline in one process, as adscore's
                scorer = inprocess.InProcessScorer(
                    args.model_repository, args.model, calls, contexts
                )
                latency_floor = partial(
                    in_process_latency,
                    scorer,
                    redis.url,
                    threads=2,
                    loaded_rate=0.7 * limits[middle]["requests_per_second"],
                    seconds=args.seconds,
                )
            results["adscore"] = _contender(
                "adscore", service, calls, folder, args, closed_loops[middle], latency_floor
            )
        if not args.skip_naive:
            with servers.naive(
                args.model_repository, redis.url, args.out / "naive.log", args.model
            ) as service:
                results["naive"] = _contender("naive", service, calls, folder, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.out)
    print(f"wrote {args.out / 'report.md'}")
    return 0


def _machine() -> str:
    import os
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
