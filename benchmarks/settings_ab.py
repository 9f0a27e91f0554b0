"""A/B of adscore settings: the same requests at the same open-loop rate, interleaved rounds.

    python -m benchmarks.settings_ab --candidates 256 --rate 100 --rounds 3 --seconds 10 \\
        --variant "drift off:drift_sample_rate=0" --variant "drift 5%:drift_sample_rate=0.05"

    python -m benchmarks.settings_ab --candidates 256 --connections 16 --rounds 3 \
        --variant "flat:model_repository=REPO_A" --variant "request-once:model_repository=REPO_B"

Each variant is `label:setting=value[,setting=value...]` (settings as in README, Configuration,
without the ADSCORE_ prefix); `code=REF` serves that variant from git revision REF instead of
this checkout, to measure a code change (benchmarks/checkouts.py); `server=http_floor` serves
that variant from the HTTP floor instead (benchmarks/http_floor.py: HTTP and JSON alone, in
`workers=N` processes), the most any Python service on this uvicorn could serve. One private
redis-server with the harness's population; for each round, each variant gets a fresh server, a
2 s warm-up, then `--seconds` of Poisson arrivals at `--rate` or, with `--connections`, of a
closed loop (wrk: maximum throughput). The variants take turns in the opposite order every other
round (A B, B A, A B...): the first of a round tended to do better, whichever it was.
Prints and writes (to --out) the medians over rounds: requests/s, p50, p99, server and
redis-server CPU per request, the event loops' CPU per request and in cores, refusals, the
hot-ad cache's hit rate when it is on, and each variant's requests/s over the first's (median of
per-round ratios, so that the machine's drift cancels out).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from statistics import median
from typing import Any, TypeVar

import numpy as np
import orjson

from benchmarks import population, servers, service_counters
from benchmarks.checkouts import CheckoutError, checked_out
from benchmarks.measure import closed_loop_point, open_loop_point
from feature_client.redis_server import LocalRedisServer

T = TypeVar("T")
SERVERS = ("adscore", "http_floor")  # what a variant's server= may name


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'label:a=1,b=2' -> ('label', {'a': '1', 'b': '2'})."""
    label, _, assignments = text.partition(":")
    settings: dict[str, str] = {}
    for assignment in filter(None, assignments.split(",")):
        try:
            name, value = population.parse_setting(assignment)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected label:setting=value,..."
            ) from None
        settings[name] = value
    if not label:
        raise argparse.ArgumentTypeError(f"{text!r}: the variant needs a label")
    server = settings.get("server", "adscore")
    if server not in SERVERS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: server={server}, expected one of {', '.join(SERVERS)}"
        )
    if server == "http_floor":
        if set(settings) - {"server", "workers"}:
            raise argparse.ArgumentTypeError(f"{text!r}: the HTTP floor takes only workers=N")
        if not settings.get("workers", "1").isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: workers must be a whole number")
    return label, settings


def served(
    root: Path | None, settings: dict[str, str], args: argparse.Namespace, redis_url: str, log: Path
) -> servers.Service:
    """The variant's server: adscore with its settings, or the HTTP floor."""
    if settings.get("server") == "http_floor":
        return servers.http_floor(log, int(settings.get("workers", "1")))
    # A variant may name its own model_name; code= and server= are not adscore settings.
    adscore_settings = {"model_name": args.model} | {
        k: v for k, v in settings.items() if k not in ("code", "server")
    }
    return servers.adscore_at(root, args.model_repository, redis_url, log, **adscore_settings)


def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    metadata = population.active_model(args.model_repository, args.model)
    world = population.bench_world(metadata, args.users, args.ads)
    calls = population.request_mix(world, args.requests, candidates=args.candidates)
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in args.variant}
    starts = [int(x) for x in np.random.default_rng(0).integers(0, len(calls), args.rounds)]
    with (
        ExitStack() as checkouts,
        LocalRedisServer() as redis,
        tempfile.TemporaryDirectory() as tmp,
    ):
        roots = {
            label: checkouts.enter_context(checked_out(settings["code"]))
            for label, settings in args.variant
            if "code" in settings
        }
        population.load_population(redis.url, world, metadata.spec())
        assert redis.process is not None
        redis_pid = redis.process.pid
        for index in range(args.rounds):
            for label, settings in round_order(args.variant, index):
                log = Path(tmp) / "server.log"
                with served(roots.get(label), settings, args, redis.url, log) as s:
                    # Every variant of a round gets the same requests, and the measured ones
                    # are not the warm-up's again (a cache would notice).
                    warm_up, measured = (
                        rotated(calls, starts[index]),
                        rotated(calls, starts[index] + len(calls) // 2),
                    )
                    if args.connections:
                        folder = Path(tmp) / "wrk"
                        folder.mkdir(exist_ok=True)
                        closed_loop_point(s, warm_up, folder, args.connections, 2.0)
                        before = cache_lookups(s.port)
                        redis_cpu = servers.cpu_seconds(redis_pid)
                        row = closed_loop_point(s, measured, folder, args.connections, args.seconds)
                        row["rejected"] = row["errors"]
                    else:
                        open_loop_point(s, warm_up, args.rate, 2.0)
                        before = cache_lookups(s.port)
                        redis_cpu = servers.cpu_seconds(redis_pid)
                        row = open_loop_point(s, measured, args.rate, args.seconds)
                        row["generator"] = "python open loop"
                    row["ad_cache_hit_rate"] = hit_rate(before, cache_lookups(s.port))
                    row["redis_cpu_ms_per_request"] = (
                        (servers.cpu_seconds(redis_pid) - redis_cpu)
                        / max(1, row["requests"])
                        * 1000
                    )
                rounds[label].append(row)
                print(
                    f"round {index + 1} {label}: {row['requests_per_second']:.0f} requests/s, "
                    f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms" + _refusals(row),
                    flush=True,
                )
    return rounds


def _refusals(row: dict[str, Any]) -> str:
    """An open-loop round's refusals: their p99 from the send, read and at the socket."""
    sent, server = row.get("rejected_p99_from_send_ms"), row.get("rejected_p99_server_ms")
    if not row["rejected"] or sent is None or server is None:
        return ""
    return (
        f", {row['rejected']} refused (p99 {sent:.1f} ms from the send to the read, "
        f"{server:.1f} ms to the arrival)"
    )


def round_order(variants: list[T], index: int) -> list[T]:
    """The variants in the order round `index` (from 0) runs them: reversed every other round,
    so that no variant always runs first."""
    return list(variants) if index % 2 == 0 else list(reversed(variants))


def rotated(calls: list[population.ScoreCall], start: int) -> list[population.ScoreCall]:
    """The same requests, in the same cyclic order, from `start`."""
    start %= len(calls)
    return calls[start:] + calls[:start]


def cache_lookups(port: int) -> tuple[float, float] | None:
    counters = service_counters.read_counters(port)
    return None if counters is None else service_counters.ad_cache_lookups(counters)


def hit_rate(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    if before is None or after is None:
        return None
    hits, misses = after[0] - before[0], after[1] - before[1]
    return hits / (hits + misses) if hits + misses else None


def summary(rounds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    def mid(rows: list[dict[str, Any]], key: str) -> float:
        return float(median(r[key] for r in rows))

    first = next(iter(rounds.values()))
    return [
        {
            "variant": label,
            "generator": rows[0].get("generator"),
            "requests_per_second": mid(rows, "requests_per_second"),
            "throughput_ratio": float(
                median(
                    r["requests_per_second"] / max(f["requests_per_second"], 1e-9)
                    for r, f in zip(rows, first, strict=True)
                )
            ),
            "p50_ms": mid(rows, "p50_ms"),
            "p99_ms": mid(rows, "p99_ms"),
            "server_cpu_ms_per_request": mid(rows, "server_cpu_ms_per_request"),
            "redis_cpu_ms_per_request": mid(rows, "redis_cpu_ms_per_request"),
            # The main threads (event loops): one process runs all its Python one thread at a
            # time, so a loop near a whole core bounds that process's requests/s.
            "event_loop_cpu_ms_per_request": mid(rows, "event_loop_cpu_ms_per_request"),
            "event_loop_cores": float(
                median(
                    r["event_loop_cpu_ms_per_request"] * r["requests_per_second"] / 1000
                    for r in rows
                )
            ),
            "rejected": mid(rows, "rejected"),
            # Answers on default features (fetch timed out, circuit open): cheap, so a variant
            # that degrades more looks faster than it is.
            "degraded_share": (
                mid(rows, "degraded_share")
                if all(r.get("degraded_share") is not None for r in rows)
                else None
            ),
            "ad_cache_hit_rate": (
                mid(rows, "ad_cache_hit_rate")
                if all(r.get("ad_cache_hit_rate") is not None for r in rows)
                else None
            ),
        }
        for label, rows in rounds.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.settings_ab", description=__doc__)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--candidates", type=int, default=256)
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (open loop)")
    parser.add_argument(
        "--connections", type=int, help="closed loop with this many connections instead"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--ads", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--out", type=Path, default=Path("bench-report"))
    population.add_model_flags(parser)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    try:
        rounds = run(args)
    except CheckoutError as exc:
        parser.error(f"code=: {exc}")
    table = summary(rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": shlex.join(["python", "-m", "benchmarks.settings_ab", *raw]),
        "medians": table,
        "rounds": rounds,  # every round's row, so that other ratios can be derived later
    }
    # orjson writes NaN (a percentile of no refusals, say) as null: the file stays strict JSON.
    (args.out / "settings_ab.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    for row in table:
        print(
            f"{row['variant']}: {row['requests_per_second']:.0f} requests/s "
            f"({row['throughput_ratio']:.2f}x), p50 {row['p50_ms']:.2f} ms, "
            f"p99 {row['p99_ms']:.2f} ms, "
            f"server CPU {row['server_cpu_ms_per_request']:.3f} ms/request, "
            f"Redis CPU {row['redis_cpu_ms_per_request']:.3f} ms/request, "
            f"event loops {row['event_loop_cpu_ms_per_request']:.3f} ms/request "
            f"on {row['event_loop_cores']:.2f} cores, "
            f"refused {row['rejected']:.0f}"
            + (
                f", degraded {row['degraded_share']:.1%}"
                if row["degraded_share"] is not None
                else ""
            )
            + (
                f", ad cache hit rate {row['ad_cache_hit_rate']:.1%}"
                if row["ad_cache_hit_rate"] is not None
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
