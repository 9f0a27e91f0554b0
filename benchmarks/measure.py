"""One measurement point against a running service: closed loop (max throughput) or open loop
(latency at a fixed arrival rate), with the server's CPU per request and RSS, and for adscore
the answers it scored on default features (see service_counters.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from benchmarks import loadgen, population, servers, service_counters, wrk


def closed_loop_point(
    service: servers.Service,
    calls: list[population.ScoreCall],
    folder: Path,
    connections: int,
    seconds: float,
) -> dict[str, Any]:
    """Maximum throughput: wrk (or the Python generator) with `connections` back to back."""
    sizes = [len(c.ad_ids) for c in calls]
    mean_size = sum(sizes) / len(sizes)
    counters = service_counters.read_counters(service.port)
    cpu = servers.cpu_seconds(service.pid)
    loop_cpu = servers.main_thread_cpu_seconds(service.pid)
    if wrk.available():
        raw = wrk.run_wrk(
            service.port, [c.body for c in calls], folder, connections=connections, seconds=seconds
        )
        row: dict[str, Any] = {
            k: raw[k] for k in ("requests_per_second", "p50_ms", "p95_ms", "p99_ms")
        }
        row |= {"errors": raw["errors"], "generator": "wrk"}
        requests, generator_cpu = raw["requests"], raw["generator_cpu_seconds"]
    else:
        payloads = [loadgen.encode_post("/v1/score", c.body) for c in calls]
        result = asyncio.run(
            loadgen.closed_loop(
                "127.0.0.1", service.port, payloads, sizes, connections=connections, seconds=seconds
            )
        )
        row = {
            "requests_per_second": result.requests_per_second,
            "p50_ms": result.percentile_ms(50),
            "p95_ms": result.percentile_ms(95),
            "p99_ms": result.percentile_ms(99),
            "errors": result.completed - result.ok + result.errors,
            "generator": "python",
        }
        requests, generator_cpu = result.completed, result.generator_cpu_seconds
    server_cpu = servers.cpu_seconds(service.pid) - cpu
    loop_cpu = servers.main_thread_cpu_seconds(service.pid) - loop_cpu
    row["requests"] = requests
    row["candidates_per_second"] = row["requests_per_second"] * mean_size
    row["server_cpu_ms_per_request"] = server_cpu / max(1, requests) * 1000
    row["event_loop_cpu_ms_per_request"] = loop_cpu / max(1, requests) * 1000
    row["generator_cpu_ms_per_request"] = generator_cpu / max(1, requests) * 1000
    row["rss_mb"] = servers.rss_bytes(service.pid) / 2**20
    return row | served(counters, service)


def served(before: service_counters.Counters | None, service: servers.Service) -> dict[str, Any]:
    """What the server counted during the point: the answers scored on default features, as a
    count and a share of the answers it scored, and the p99 of each stage (None for a server
    that does not count them)."""
    after = service_counters.read_counters(service.port)
    stages = {"server_p99_ms": service_counters.stage_quantiles_between(before, after)}
    return stages | degraded(before, after)


def degraded(
    before: service_counters.Counters | None, after: service_counters.Counters | None
) -> dict[str, Any]:
    counted = service_counters.degraded_between(before, after)
    if counted is None or before is None or after is None:
        return {"degraded": None, "degraded_share": None, "degraded_by_reason": None}
    count, answers = counted
    was = service_counters.degraded_by_reason(before)
    reasons = {
        reason: gained
        for reason, value in service_counters.degraded_by_reason(after).items()
        if (gained := value - was.get(reason, 0.0))
    }
    return {
        "degraded": count,
        "degraded_share": count / answers if answers else None,
        "degraded_by_reason": reasons,
    }


def open_loop_point(
    service: servers.Service, calls: list[population.ScoreCall], rate: float, seconds: float
) -> dict[str, Any]:
    """Latency at a fixed Poisson arrival rate, from each request's intended send time."""
    sizes = [len(c.ad_ids) for c in calls]
    payloads = [loadgen.encode_post("/v1/score", c.body) for c in calls]
    counters = service_counters.read_counters(service.port)
    cpu = servers.cpu_seconds(service.pid)
    loop_cpu = servers.main_thread_cpu_seconds(service.pid)
    result = asyncio.run(
        loadgen.open_loop("127.0.0.1", service.port, payloads, sizes, rate=rate, seconds=seconds)
    )
    server_cpu = servers.cpu_seconds(service.pid) - cpu
    loop_cpu = servers.main_thread_cpu_seconds(service.pid) - loop_cpu
    return {
        "offered_per_second": rate,
        "requests": result.completed,
        "requests_per_second": result.requests_per_second,
        "candidates_per_second": result.candidates_per_second,
        "p50_ms": result.percentile_ms(50),
        "p95_ms": result.percentile_ms(95),
        "p99_ms": result.percentile_ms(99),
        "p99_from_send_ms": result.percentile_ms(99, span="sent"),
        "p99_server_ms": result.percentile_ms(99, span="server"),
        "rejected": result.completed - result.ok,
        "rejected_p99_ms": result.percentile_ms(99, accepted=False),
        "rejected_p99_from_send_ms": result.percentile_ms(99, accepted=False, span="sent"),
        "rejected_p99_server_ms": result.percentile_ms(99, accepted=False, span="server"),
        "generator_late_p99_ms": result.late_ms(99),
        "errors": result.errors,
        "server_cpu_ms_per_request": server_cpu / max(1, result.completed) * 1000,
        "event_loop_cpu_ms_per_request": loop_cpu / max(1, result.completed) * 1000,
        "generator_cpu_ms_per_request": result.generator_cpu_seconds
        / max(1, result.completed)
        * 1000,
    } | served(counters, service)
