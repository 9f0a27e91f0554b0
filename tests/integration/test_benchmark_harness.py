"""The benchmark harness's own logic: request mix, load generator, naive service, report."""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from benchmarks import (
    batching,
    checkouts,
    drift_cost,
    explain,
    inprocess,
    inprocess_latency,
    loadgen,
    log_reading,
    population,
    providers,
    servers,
    service_counters,
    settings_ab,
    wrk,
)
from benchmarks.__main__ import median_latency_round
from benchmarks.collector import collector_paused
from benchmarks.http_floor import efficiency_ceiling
from benchmarks.measure import closed_loop_point, open_loop_point
from benchmarks.naive_service import build_app
from benchmarks.report import (
    headline,
    latency_ratio,
    median_index,
    serving_efficiency,
    write_report,
)
from models.synthetic import DatasetMismatch, SyntheticConfig, SyntheticWorld, load_world_features
from service.app import create_app
from service.registry import load_version
from service.repository import ModelRepository
from service.schemas import RequestLimits, parse_score_request
from service.scoring import ScoreResult
from service.settings import Settings
from tests.fixtures import LiveServer

DEMO = ModelRepository(Path(__file__).parents[2] / "demo" / "model_repository")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return population.bench_world(DEMO.read_metadata("pcvr", 1), users=3_000, ads=8_000)


def test_the_bench_world_encodes_like_the_demo_model(world: SyntheticWorld) -> None:
    assert world.spec.fingerprint() != DEMO.read_metadata("pcvr", 1).spec().fingerprint()
    # ... yet only the dense defaults differ, so the model's spec stamps its features.
    from models.synthetic import same_encoding

    assert same_encoding(world.spec, DEMO.read_metadata("pcvr", 1).spec())
    other = SyntheticWorld(SyntheticConfig(users=10, ads=10, user_hash_buckets=64))
    assert not same_encoding(other.spec, world.spec)
    with pytest.raises(DatasetMismatch):
        asyncio.run(load_world_features(None, other, spec=world.spec))  # type: ignore[arg-type]


def test_request_mix_is_zipf_ranged_valid_and_repeatable(world: SyntheticWorld) -> None:
    calls = population.request_mix(world, 2_000, seed=3)
    sizes = np.array([len(c.ad_ids) for c in calls])
    assert sizes.min() >= 16 and sizes.max() <= 512
    assert np.median(sizes) < sizes.mean()  # log-uniform: many small requests, a long tail
    _, count = Counter(c.user_id for c in calls).most_common(1)[0]
    assert count > 5 * len(calls) / len(world.users.keys)  # popular users repeat
    limits = RequestLimits(max_candidates=1024, max_id_length=128)
    parsed = parse_score_request(calls[0].body, limits)
    assert parsed.user_id == calls[0].user_id and parsed.ad_ids == calls[0].ad_ids
    assert all(len(set(c.ad_ids)) == len(c.ad_ids) for c in calls)  # distinct candidates
    assert [c.body for c in population.request_mix(world, 2_000, seed=3)] == [c.body for c in calls]
    fixed = population.request_mix(world, 20, candidates=256)
    assert {len(c.ad_ids) for c in fixed} == {256}


class SlowServer:
    """A one-at-a-time HTTP server that answers after `delay` seconds (a server that queues)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = asyncio.Lock()
        self.collector_enabled: list[bool] = []  # at each request: in the generator's process

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                self.collector_enabled.append(gc.isenabled())
                async with self.lock:
                    await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _against_slow_server(
    kind: str, max_connections: int = 256, server: SlowServer | None = None
) -> loadgen.LoadResult:
    server = server or SlowServer(delay=0.02)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    payloads = [loadgen.encode_post("/v1/score", b'{"a": 1}')]
    async with listener:
        if kind == "open":
            # 100/s offered to a server that does 50/s: the queue grows for the whole second.
            return await loadgen.open_loop(
                "127.0.0.1", port, payloads, [3], rate=100, seconds=1.0, seed=1,
                max_connections=max_connections,
            )  # fmt: skip
        return await loadgen.closed_loop(
            "127.0.0.1", port, payloads, [3], connections=1, seconds=1.0
        )


def test_open_loop_charges_queueing_to_latency_but_closed_loop_does_not() -> None:
    closed = asyncio.run(_against_slow_server("closed"))
    opened = asyncio.run(_against_slow_server("open"))
    assert closed.ok == closed.completed > 10
    assert closed.percentile_ms(99) < 60  # one request at a time: about the service time
    assert closed.candidates == 3 * closed.ok
    # Open loop: ~100 arrivals, served at 50/s, so the last waits about a second.
    assert opened.completed > 60
    assert opened.percentile_ms(99) > 500
    assert opened.percentile_ms(50) > 5 * closed.percentile_ms(50)


@pytest.mark.parametrize("kind", ["open", "closed"])
def test_the_generator_measures_with_the_garbage_collector_paused(kind: str) -> None:
    """A full collection in the harness's process would stall the generator mid-measurement."""
    server = SlowServer(delay=0.001)
    assert gc.isenabled()
    result = asyncio.run(_against_slow_server(kind, server=server))
    assert result.ok > 10
    assert server.collector_enabled and not any(server.collector_enabled)
    assert gc.isenabled()  # back on after the measurement


def test_a_paused_collector_is_restored_as_it_was_even_on_failure() -> None:
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("a failed measurement")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # left off: it was off before
    finally:
        gc.enable()


def test_naive_service_scores_like_adscore(redis_url: str, world: SyntheticWorld) -> None:
    population.load_population(redis_url, world, DEMO.read_metadata("pcvr", 1).spec())
    call = population.request_mix(world, 1, candidates=32, seed=9)[0]
    naive = LiveServer(build_app(DEMO.root, "pcvr", redis_url))
    ours = LiveServer(
        create_app(Settings(model_repository=DEMO.root, redis_url=redis_url, auth_enabled=False))
    )
    naive.start()
    ours.start()
    try:
        headers = {"content-type": "application/json"}
        theirs = httpx.post(f"{naive.url}/v1/score", content=call.body, headers=headers)
        mine = httpx.post(f"{ours.url}/v1/score", content=call.body, headers=headers)
    finally:
        naive.stop()
        ours.stop()
    assert mine.json()["missing"] == {"user": False, "ads": []}
    # The naive session runs on every core and adscore's on one: the last bits may differ.
    np.testing.assert_allclose(theirs.json()["scores"], mine.json()["scores"], rtol=0, atol=1e-6)


def _point(load: float, p99: float, rejected: int = 0) -> dict[str, Any]:
    return {
        "load": load, "offered_per_second": 100 * load, "requests_per_second": 90 * load,
        "candidates_per_second": 9000 * load, "p50_ms": p99 / 3, "p95_ms": p99 / 2,
        "p99_ms": p99, "rejected": rejected, "server_cpu_ms_per_request": 3.0,
        "generator_cpu_ms_per_request": 0.3,
    }  # fmt: skip


def _contender(closed_candidates: float, p99_at_70: float) -> dict[str, Any]:
    closed = {
        "requests_per_second": closed_candidates / 100, "candidates_per_second": closed_candidates,
        "p50_ms": 5.0, "p95_ms": 8.0, "p99_ms": 9.0, "errors": 0, "generator": "wrk",
        "server_cpu_ms_per_request": 3.0, "generator_cpu_ms_per_request": 0.1, "rss_mb": 100.0,
    }  # fmt: skip
    curve = [_point(load, p99_at_70 if load == 0.7 else 10.0, 7 if load == 1.5 else 0)
             for load in (0.3, 0.5, 0.7, 0.9, 1.5)]  # fmt: skip
    return {
        "closed_loop": closed,
        "open_loop": curve,
        "unloaded": _point(0.1, 4.0) | {"p50_ms": 2.0},
    }


def _results(adscore: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A harness run's results around `adscore`, against an in-process limit of 100k/s."""
    return {
        "command": "python -m benchmarks", "started": "now", "machine": "2 cores",
        "population": {"users": 1, "ads": 1, "requests": 1}, "candidates": 256,
        "mean_candidates": 256.0, "seconds_per_point": 1.0,
        "in_process": {"requests_per_second": 400.0, "candidates_per_second": 100_000.0,
                       "cpu_ms_per_request": 4.0},
        "adscore": adscore,
    } | more  # fmt: skip


def test_report_states_the_target_ratios(tmp_path: Path) -> None:
    adscore = _contender(90_000.0, 8.0)
    results = _results(adscore, naive=_contender(10_000.0, 120.0))
    lines = headline(results)
    assert "0.90x the in-process limit" in lines[0]
    assert "p99 8.0 ms = 4.00x the unloaded p50 (2.0 ms)" in lines[1]
    assert "7 requests shed" in lines[2] and "p99 of the accepted 10 ms" in lines[2]
    assert "9.00x candidates/s" in lines[3] and "120.0 ms" in lines[3]
    report = write_report(results, tmp_path).read_text()
    assert "| 70% | 70 | 63 | 6,300 |" in report
    assert "| 7 | n/a |" in report  # a report without degraded counts says so
    assert "HTTP floor" not in report  # not measured in this run
    assert "Where the time goes" not in report  # no stage timings in these results
    assert "Warning" not in report
    adscore["closed_loop"] |= {"degraded": 30.0, "degraded_share": 0.03}
    report = write_report(results, tmp_path).read_text()
    assert "scored on default features (feature store failed or timed out) 3.0%" in report
    assert "**Warning:** closed loop: 3.0% of the answers were scored on default" in report
    assert orjson.loads(orjson.dumps(results)) == results  # results.json can hold them


def test_report_shows_where_each_points_time_goes(tmp_path: Path) -> None:
    adscore = _contender(90_000.0, 8.0)
    results = _results(adscore)
    at70 = next(point for point in adscore["open_loop"] if point["load"] == 0.7)
    at70["server_p99_ms"] = {
        "feature_fetch": 12.5, "input_assembly": 0.25, "inference_thread_wait": None,
        "inference": 7.0, "event_loop_lag": 3.0,
    }  # fmt: skip
    at70 |= {"generator_late_p99_ms": 41.0, "p99_from_send_ms": 20.0, "p99_server_ms": 18.5}
    report = write_report(results, tmp_path).read_text()
    assert "#### Where the time goes" in report
    assert "| 70% | 12.5 | 0.2 | n/a | 7.0 | 3.0 | 20.0 | 18.5 | 41.0 |" in report
    assert "| closed loop | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in report


def test_serving_efficiency_is_the_median_of_the_alternated_rounds() -> None:
    floor = {"requests_per_second": 9_600.0, "server_cpu_ms_per_request": 0.1,
             "generator_cpu_ms_per_request": 0.02}  # fmt: skip
    results = _results(_contender(90_000.0, 8.0), http_floor=floor)
    assert serving_efficiency(results) == pytest.approx(0.9)  # one measurement each
    results["efficiency_rounds"] = [0.8, 0.95, 0.7]
    assert serving_efficiency(results) == pytest.approx(0.8)
    lines = headline(results)
    assert "= 0.80x the in-process limit (100,000/s); the median of 3 alternated" in lines[0]
    assert "rounds (0.80x, 0.95x, 0.70x)" in lines[0]
    assert "adscore reaches 0.83x of that cap" in lines[1]  # 0.80 of the 0.96x cap
    results["efficiency_rounds"] = [0.9, 0.8]  # the lower of the middle two: a round's own
    assert serving_efficiency(results) == pytest.approx(0.8)
    assert median_index([3.0, 1.0, 2.0]) == 2
    assert median_index([3.0, 1.0, 2.0, 4.0]) == 2
    assert median_index([5.0]) == 0


def test_latency_is_shown_from_the_round_of_the_median_ratio(tmp_path: Path) -> None:
    rounds = [_contender(90_000.0, p99) for p99 in (12.0, 6.0, 8.0, 30.0)]
    rounds[1]["unloaded"]["p50_ms"] = 1.0  # 6.0 / 1.0: this round's ratio is the highest
    rounds[0]["open_loop"][-1]["rejected_p99_server_ms"] = 3.5
    rounds[2]["open_loop"][-1]["rejected_p99_server_ms"] = float("nan")  # nothing refused
    assert [latency_ratio(r) for r in rounds] == [6.0, 6.0, 4.0, 15.0]
    shown = median_latency_round(rounds)
    assert shown["open_loop"] is rounds[0]["open_loop"]  # the lower of the middle two (6, 6)
    assert shown["unloaded"] is rounds[0]["unloaded"]
    assert [r["ratio"] for r in shown["latency_rounds"]] == [6.0, 6.0, 4.0, 15.0]
    assert shown["latency_rounds"][3]["p99_ms"]["0.7"] == 30.0
    adscore = _contender(90_000.0, 8.0) | median_latency_round(rounds[2:3] + rounds[:2])
    lines = headline(_results(adscore))
    assert "p99 12.0 ms = 6.00x the unloaded p50 (2.0 ms)" in lines[1]
    assert "the median of 3 rounds' ratios (4.00x, 6.00x, 6.00x)" in lines[1]
    report = write_report(_results(adscore), tmp_path).read_text()
    assert "p99 ms by round: 30%: 10.0 / 10.0 / 10.0; 50%: 10.0 / 10.0 / 10.0; " in report
    assert "70%: 8.0 / 12.0 / 6.0;" in report and "Unloaded p50 ms: 2.00 / 2.00 / 1.00." in report
    assert "at 150 %, to its arrival at the socket, ms: n/a / 3.5 / n/a." in report
    single = _contender(90_000.0, 8.0) | median_latency_round(rounds[:1])
    assert headline(_results(single))[1].endswith("the unloaded p50 (2.0 ms).")
    assert "by round" not in write_report(_results(single), tmp_path).read_text()


def _floor(p99_at_70: float, unloaded_p50: float) -> dict[str, Any]:
    return {
        "unloaded": {"offered_per_second": 20.0, "p50_ms": unloaded_p50, "p99_ms": 9.0},
        "loaded": {"offered_per_second": 280.0, "p50_ms": 3.0, "p99_ms": p99_at_70},
        "ratio": p99_at_70 / unloaded_p50,
    }


def test_the_latency_floor_is_shown_from_the_round_of_its_median_ratio() -> None:
    rounds = [_contender(90_000.0, p99) for p99 in (12.0, 6.0, 8.0)]
    for latency_round, floor in zip(
        rounds, (_floor(20.0, 2.0), _floor(9.0, 3.0), _floor(12.0, 2.0)), strict=True
    ):
        latency_round["in_process_latency"] = floor
    adscore = _contender(90_000.0, 8.0) | median_latency_round(rounds)
    line = next(x for x in headline(_results(adscore)) if x.startswith("- Latency floor"))
    # Floors 10x, 3x, 6x: the median is 6x (12.0 / 2.0); adscore's shown ratio is 4x (8 / 2).
    assert "(280/s): p99 12.0 ms = 6.00x its unloaded p50 (2.0 ms)" in line
    assert "the median of 3 rounds (10.00x, 3.00x, 6.00x)" in line
    assert line.endswith("adscore's ratio is 0.67x this floor's.")
    without = _contender(90_000.0, 8.0) | median_latency_round(
        [_contender(90_000.0, 8.0)]
    )  # several workers: no floor measured
    assert not any(x.startswith("- Latency floor") for x in headline(_results(without)))


def test_the_in_process_latency_floor_counts_queueing_from_each_arrival(
    redis_url: str, world: SyntheticWorld
) -> None:
    population.load_population(redis_url, world, DEMO.read_metadata("pcvr", 1).spec())
    calls = population.request_mix(world, 40, candidates=16)
    contexts = [orjson.loads(c.body)["context"] for c in calls]
    scorer = inprocess.InProcessScorer(DEMO.root, "pcvr", calls, contexts)
    floor = inprocess_latency.in_process_latency(
        scorer, redis_url, threads=1, loaded_rate=20_000.0, seconds=0.5, unloaded_rate=50.0
    )
    unloaded, loaded = floor["unloaded"], floor["loaded"]
    assert 15 <= unloaded["requests"] <= 40  # about 50/s for 0.5 s, each one scored
    # Far more arrivals than one thread scores: the queue grows all along, and the last
    # request waits for nearly everything before it.
    assert loaded["requests"] > 5_000
    assert loaded["requests_per_second"] < 0.5 * loaded["offered_per_second"]
    assert loaded["p99_ms"] > 20 * unloaded["p50_ms"]
    assert floor["ratio"] == pytest.approx(loaded["p99_ms"] / unloaded["p50_ms"])


def test_the_harness_runs_end_to_end_and_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "report"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--skip-naive", "--seconds", "1",
               "--candidates", "16", "--rounds", "2", "--latency-rounds", "2",
               "--out", str(out)]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())  # NaN where nothing was refused
    assert len(results["efficiency_rounds"]) == 2
    # The headline's two figures come from one round and divide to its efficiency.
    shown = (
        results["adscore"]["closed_loop"]["candidates_per_second"]
        / results["in_process"]["candidates_per_second"]
    )
    assert shown == pytest.approx(min(results["efficiency_rounds"]))
    assert results["in_process"]["requests_per_second"] > 0
    assert [p["load"] for p in results["adscore"]["open_loop"]] == [0.3, 0.5, 0.7, 0.9, 1.5]
    assert results["adscore"]["closed_loop"]["degraded_share"] is not None
    ratios = [r["ratio"] for r in results["adscore"]["latency_rounds"]]
    assert len(ratios) == 2 and latency_ratio(results["adscore"]) == min(ratios)
    report = (out / "report.md").read_text()
    for section in ("## Headline", "## In-process limit", "## HTTP floor", "### adscore",
                    "#### Where the time goes", "the median of 2 alternated rounds",
                    "the median of 2 rounds' ratios", "p99 ms by round",
                    "Latency floor without HTTP", "the median of 2 rounds ("):  # fmt: skip
        assert section in report


def test_stage_quantiles_come_from_the_buckets_filled_between_two_readings() -> None:
    def reading(fetch: list[float], lag: list[float]) -> service_counters.Counters:
        bounds = ("0.001", "0.005", "+Inf")
        counters = {
            ("adscore_stage_duration_seconds_bucket", f'stage="feature_fetch",le="{le}"'): c
            for le, c in zip(bounds, fetch, strict=True)
        } | {
            ("adscore_stage_duration_seconds_bucket", f'stage="inference",le="{le}"'): 1000.0
            for le in bounds
        }
        return counters | {
            ("adscore_event_loop_lag_seconds_bucket", f'le="{le}"'): c
            for le, c in zip(bounds, lag, strict=True)
        }

    before = reading([10, 20, 20], [5, 5, 5])
    after = reading([10, 110, 120], [105, 105, 105])
    fetch = service_counters.histogram_between(
        before, after, "adscore_stage_duration_seconds", {"stage": "feature_fetch"}
    )
    assert fetch == [(0.001, 0.0), (0.005, 90.0), (float("inf"), 100.0)]
    assert service_counters.quantile(fetch, 0.5) == pytest.approx(0.001 + 0.004 * 50 / 90)
    assert service_counters.quantile(fetch, 0.99) == 0.005  # in +Inf: the highest finite bound
    stages = service_counters.stage_quantiles_between(before, after)
    assert stages is not None
    assert stages["feature_fetch"] == pytest.approx(5.0)
    assert stages["event_loop_lag"] == pytest.approx(0.99)  # within the first bucket
    assert stages["inference"] is None  # nothing observed between the readings
    assert stages["inference_thread_wait"] is None  # no such histogram
    assert service_counters.stage_quantiles_between(None, after) is None
    # Labels in another order, and series of another stage, change nothing.
    reordered = {
        (name, ",".join(reversed(labels.split(",")))): value
        for (name, labels), value in after.items()
    }
    assert (
        service_counters.histogram_between(
            before, reordered, "adscore_stage_duration_seconds", {"stage": "feature_fetch"}
        )
        == fetch
    )
    # Where Prometheus has no answer, neither does the harness.
    assert service_counters.quantile([(0.001, 5.0), (0.005, 10.0)], 0.5) is None  # no +Inf
    assert service_counters.quantile([(0.001, 5.0), (float("inf"), 3.0)], 0.5) is None  # falls
    assert service_counters.quantile([(0.001, -5.0), (float("inf"), 0.0)], 0.5) is None  # reset


def test_report_holds_adscore_against_the_in_process_limit_plus_the_http_floor(
    tmp_path: Path,
) -> None:
    assert efficiency_ceiling(400.0, 9_600.0) == pytest.approx(0.96)
    in_process = {"requests_per_second": 400.0, "candidates_per_second": 102_400.0,
                  "cpu_ms_per_request": 4.0}  # fmt: skip
    adscore = _contender(92_160.0, 8.0)
    results: dict[str, Any] = {
        "command": "python -m benchmarks", "started": "now", "machine": "2 cores",
        "population": {"users": 1, "ads": 1, "requests": 1}, "candidates": 256,
        "mean_candidates": 256.0, "seconds_per_point": 1.0,
        "in_process": in_process,
        "http_floor": {"requests_per_second": 9_600.0, "server_cpu_ms_per_request": 0.1,
                       "generator_cpu_ms_per_request": 0.02},
        "adscore": adscore,
    }  # fmt: skip
    floor_line = next(line for line in headline(results) if "HTTP floor" in line)
    assert "9,600 requests/s" in floor_line
    assert "caps serving efficiency at 0.96x; adscore reaches 0.94x of that cap" in floor_line
    in_process["candidates_per_second"] = 81_920.0  # batching beat it
    assert "adscore is above it (1.17x): its micro-batching" in headline(results)[1]
    overload = next(point for point in adscore["open_loop"] if point["load"] == 1.5)
    overload |= {"rejected_p99_ms": 9.0, "rejected_p99_from_send_ms": 1.5}
    assert (
        "p99 of a refusal 9.0 ms from the intended send time, 1.5 ms from the moment it was sent)"
        in next(line for line in headline(results) if "150 %" in line)
    )
    overload["rejected_p99_server_ms"] = 1.2
    assert "1.5 ms from the moment it was sent, 1.2 ms to its arrival at the socket)" in next(
        line for line in headline(results) if "150 %" in line
    )
    adscore["closed_loop"]["event_loop_cpu_ms_per_request"] = 1.25
    report = write_report(results, tmp_path).read_text()
    assert "## HTTP floor" in report and "0.100 ms server CPU per request" in report
    assert "(1.25 ms of it on the event loop)" in report


def test_points_count_the_answers_scored_on_default_features(
    redis_url: str, world: SyntheticWorld, tmp_path: Path
) -> None:
    population.load_population(redis_url, world, DEMO.read_metadata("pcvr", 1).spec())
    calls = population.request_mix(world, 50, candidates=8)
    points = {}
    for label, timeout_ms in (("fetched", "1000"), ("timed out", "0.001")):
        with servers.adscore(
            DEMO.root, redis_url, tmp_path / f"{label}.log", feature_timeout_ms=timeout_ms
        ) as service:
            points[label] = open_loop_point(service, calls, rate=40, seconds=1)
    fetched, timed_out = points["fetched"], points["timed out"]
    assert fetched["requests"] > 10 and timed_out["requests"] > 10
    assert fetched["degraded"] == 0 and fetched["degraded_share"] == 0
    # Every fetch timed out: every answer of the point, and only those, is counted.
    assert timed_out["degraded"] == timed_out["requests"]
    assert timed_out["degraded_share"] == 1.0
    assert sum(timed_out["degraded_by_reason"].values()) == timed_out["degraded"]
    # A fetch given 1 µs times out; on a busy machine the loop may still be late when its
    # patience runs out (event_loop_busy), and after five timeouts the circuit opens.
    assert set(timed_out["degraded_by_reason"]) <= {"timeout", "circuit_open", "event_loop_busy"}
    assert fetched["degraded_by_reason"] == {}
    # The stages the server timed during the point, and the generator's own lateness.
    stages = fetched["server_p99_ms"]
    assert stages["feature_fetch"] > 0 and stages["inference"] > 0
    assert stages["input_assembly"] > 0 and stages["event_loop_lag"] is not None
    assert 0 <= fetched["generator_late_p99_ms"] < 1000
    assert 0 < fetched["p99_from_send_ms"] <= fetched["p99_ms"] + 1e-6
    assert 0 < fetched["p99_server_ms"] <= fetched["p99_from_send_ms"] + 1e-6
    with servers.http_floor(tmp_path / "floor.log") as floor:  # no counters to read
        point = open_loop_point(floor, calls, rate=40, seconds=0.5)
        assert point["degraded_share"] is None and point["server_p99_ms"] is None


def test_server_cpu_is_split_into_the_main_threads_and_the_rest() -> None:
    burner = (
        "import threading, time\n"
        "def burn():\n"
        "    end = time.process_time() + 0.6\n"
        "    while time.process_time() < end: pass\n"
        "t = threading.Thread(target=burn); t.start(); t.join()\n"
        "print('done', flush=True); time.sleep(30)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", burner], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"done\n"
        total = servers.cpu_seconds(process.pid)
        main = servers.main_thread_cpu_seconds(process.pid)
    finally:
        process.kill()
        process.communicate()
    assert total >= 0.6  # the burning thread's CPU counts for the process...
    assert main < total - 0.5  # ...not for its main thread, which only waited


def test_http_floor_answers_in_adscores_shape_from_as_many_processes(
    world: SyntheticWorld, tmp_path: Path
) -> None:
    calls = population.request_mix(world, 6, candidates=16)
    expected_keys = set(
        ScoreResult(None, "m", 1, "active", np.zeros(1), False, [], False).to_json()
    )
    with servers.http_floor(tmp_path / "floor.log", workers=2) as floor:
        tree = servers.process_tree(floor.pid)
        assert len(tree) == 3  # the parent and its two serving processes
        for call in calls:
            response = httpx.post(f"http://127.0.0.1:{floor.port}/v1/score", content=call.body)
            assert response.status_code == 200
            # sized, as adscore's answers are: the Python generator reads no chunked body
            assert response.headers["content-length"] == str(len(response.content))
            body = response.json()
            assert set(body) == expected_keys
            assert len(body["scores"]) == len(call.ad_ids)
    assert not [pid for pid in tree if Path(f"/proc/{pid}").exists()]  # all stopped


@pytest.mark.parametrize("generator", ["python", "wrk"])
def test_a_closed_loop_point_reads_every_answer_with_either_generator(
    generator: str, world: SyntheticWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if generator == "wrk" and not wrk.available():
        pytest.skip("wrk is not installed")
    monkeypatch.setattr(wrk, "available", lambda: generator == "wrk")
    calls = population.request_mix(world, 6, candidates=16)
    with servers.http_floor(tmp_path / "floor.log") as floor:
        point = closed_loop_point(floor, calls, tmp_path, connections=4, seconds=0.5)
    assert point["generator"] == generator
    assert point["requests"] > 10 and point["errors"] == 0
    assert point["candidates_per_second"] == pytest.approx(point["requests_per_second"] * 16)


def _locust(server_url: str, folder: Path) -> list[dict[str, str]]:
    """A short headless locust run against `server_url`; its stats rows."""
    env = os.environ | {"ADSCORE_BENCH_USERS": "10000", "ADSCORE_BENCH_ADS": "50000"}
    # Locust counts its run time from start-up, and building the request mix takes seconds on
    # a busy machine: 10 s leaves a few of them for requests.
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "benchmarks/locustfile.py", "--headless",
         "-u", "2", "-r", "2", "-t", "10s", "--host", server_url, "--csv", str(folder / "l"),
         "--only-summary"],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode in (0, 1), run.stderr[-2000:]  # 1: some requests failed
    with (folder / "l_stats.csv").open() as stats:
        return list(csv.DictReader(stats))


def _locust_against_demo(redis_url: str, folder: Path) -> dict[str, str]:
    """The /v1/score stats row of a short locust run against adscore serving the demo."""
    settings = Settings(model_repository=DEMO.root, redis_url=redis_url, auth_enabled=False)
    server = LiveServer(create_app(settings))
    server.start()
    try:
        rows = _locust(server.url, folder)
    finally:
        server.stop()
    (score,) = [r for r in rows if r["Name"] == "/v1/score"]
    return score


def test_locustfile_runs_headless_against_adscore(redis_url: str, tmp_path: Path) -> None:
    demo_world = population.bench_world(DEMO.read_metadata("pcvr", 1), users=10_000, ads=50_000)
    population.load_population(redis_url, demo_world, DEMO.read_metadata("pcvr", 1).spec())
    score = _locust_against_demo(redis_url, tmp_path)
    assert int(score["Request Count"]) > 10
    assert int(score["Failure Count"]) == 0


def test_locustfile_fails_answers_scored_on_default_features(tmp_path: Path) -> None:
    # No Redis listens there: every answer is degraded (the default policy answers on defaults).
    score = _locust_against_demo("redis://127.0.0.1:9/0", tmp_path)
    assert int(score["Request Count"]) > 10
    assert int(score["Failure Count"]) == int(score["Request Count"])
    with (tmp_path / "l_failures.csv").open() as failures:
        (failure,) = list(csv.DictReader(failures))
    assert "degraded: scored on default features" in failure["Error"]


def test_latency_from_the_send_leaves_out_what_waited_in_the_generator() -> None:
    # One connection: arrivals queue in the generator itself, not in the server.
    opened = asyncio.run(_against_slow_server("open", max_connections=1))
    assert opened.completed > 30
    assert opened.percentile_ms(99) > 500  # from the intended send time: the queue counts
    assert 15 < opened.percentile_ms(99, span="sent") < 150  # about one service time
    assert 15 < opened.percentile_ms(99, span="server") <= opened.percentile_ms(99, span="sent")


def _reply_server(reply: bytes, *, close: bool = False) -> tuple[socket.socket, threading.Thread]:
    """A thread that accepts one connection, reads one request (ending in `}`) and answers
    `reply` at once, then closes the connection if `close`, or waits for the client to."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while not request.endswith(b"}"):
                request += conn.recv(4096)
            conn.sendall(reply)
            if not close:
                conn.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_reply_is_timed_by_its_arrival_not_by_when_the_busy_generator_reads_it() -> None:
    listener, thread = _reply_server(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}"
    )

    async def send_while_busy() -> tuple[loadgen.Reply, float]:
        conn = await loadgen.Connection.open("127.0.0.1", listener.getsockname()[1])
        started = time.perf_counter()
        sending = asyncio.create_task(conn.send(loadgen.encode_post("/v1/score", b"{}")))
        await asyncio.sleep(0)  # the request is written
        # The generator's event loop is busy (on purpose): the reply arrives, unread.
        time.sleep(0.3)  # noqa: ASYNC251
        reply = await sending
        elapsed = time.perf_counter() - started
        conn.close()
        return reply, elapsed

    with listener:
        reply, elapsed = asyncio.run(send_while_busy())
        thread.join(5)
    assert reply.status == 503
    assert elapsed >= 0.3  # read after the busy stretch...
    assert reply.server_seconds is not None and reply.server_seconds < 0.2  # ...arrived before


@pytest.mark.skipif(sys.platform != "linux", reason="receive timestamps are Linux's")
def test_once_held_the_kernel_stamps_the_first_bytes_of_every_new_connection() -> None:
    assert loadgen.hold_receive_timestamps()
    assert loadgen.hold_receive_timestamps()  # held already: at once
    for _ in range(20):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            receiver = socket.create_connection(listener.getsockname())
            sender, _ = listener.accept()
        with receiver, sender:
            receiver.setsockopt(socket.SOL_SOCKET, loadgen.SO_TIMESTAMPNS, 1)
            sender.sendall(b"reply")
            _, ancillary, _, _ = receiver.recvmsg(16, socket.CMSG_SPACE(16))
        assert any(kind == loadgen.SO_TIMESTAMPNS for _, kind, _ in ancillary)


def test_a_connection_the_server_closes_fails_the_request_waiting_on_it() -> None:
    listener, thread = _reply_server(b"HTTP/1.1 200 OK\r\nContent-Len", close=True)

    async def send() -> None:
        conn = await loadgen.Connection.open("127.0.0.1", listener.getsockname()[1])
        try:
            with pytest.raises(ConnectionError, match="closed the connection"):
                await conn.send(loadgen.encode_post("/v1/score", b"{}"))
            with pytest.raises(ConnectionError):  # and every later request on it
                await conn.send(loadgen.encode_post("/v1/score", b"{}"))
        finally:
            conn.close()

    with listener:
        asyncio.run(send())
        thread.join(5)


def test_percentiles_separate_answers_from_refusals() -> None:
    result = loadgen.LoadResult(1.0, [0.010, 0.020, 0.001, 0.002], [200, 200, 503, 503])
    assert result.percentile_ms(100) == pytest.approx(20.0)
    assert result.percentile_ms(100, accepted=False) == pytest.approx(2.0)
    assert result.ok == 2 and result.completed == 4


def test_provider_benchmark_measures_calls_and_the_batching_gain(tmp_path: Path) -> None:
    assert providers.main(
        ["--seconds", "0.05", "--repeats", "1", "--batches", "1,8", "--concurrency", "16",
         "--out", str(tmp_path)]
    ) == 0  # fmt: skip
    result = orjson.loads((tmp_path / "providers-cpu.json").read_bytes())
    assert [c["batch"] for c in result["calls"]] == [1, 8]
    assert all(c["rows_per_second"] > 0 for c in result["calls"])
    off, on = result["batching"]
    assert (off["max_batch_rows"], on["max_batch_rows"]) == (1, 256)
    assert off["mean_batch_rows"] == 8  # batching off: one call per 8-row request
    assert on["mean_batch_rows"] > 8  # 16 concurrent callers on 2 threads do queue up
    assert "| cpu | 256 |" in (tmp_path / "providers-cpu.md").read_text()


def test_settings_ab_parses_variants_and_refuses_nonsense() -> None:
    assert settings_ab.parse_variant("drift off:drift_sample_rate=0,max_in_flight=8") == (
        "drift off",
        {"drift_sample_rate": "0", "max_in_flight": "8"},
    )
    assert settings_ab.parse_variant("defaults:") == ("defaults", {})
    assert settings_ab.parse_variant("floor:server=http_floor,workers=2") == (
        "floor",
        {"server": "http_floor", "workers": "2"},
    )
    for wrong in (
        "no-settings:drift_sample_rate",
        ":a=1",
        "other:server=nginx",  # only adscore and the HTTP floor
        "floor:server=http_floor,max_in_flight=8",  # the floor has no adscore settings
        "floor:server=http_floor,workers=two",
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            settings_ab.parse_variant(wrong)


def test_settings_ab_runs_each_variant_on_a_live_server(tmp_path: Path) -> None:
    code = settings_ab.main(
        ["--variant", "off:drift_sample_rate=0", "--variant", "all:drift_sample_rate=1",
         "--variant", "floor:server=http_floor", "--candidates", "8", "--rate", "20",
         "--rounds", "1", "--seconds", "1",
         "--users", "2000", "--ads", "4000", "--requests", "100", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    written = orjson.loads((tmp_path / "settings_ab.json").read_bytes())
    medians = written["medians"]
    assert [m["variant"] for m in medians] == ["off", "all", "floor"]
    assert all(m["p99_ms"] > 0 and m["rejected"] == 0 for m in medians)
    # The floor exports no metrics, so none of its answers can be counted as degraded; both
    # adscore variants can.
    assert [m["degraded_share"] is None for m in medians] == [False, False, True]
    # Each variant's event loop is measured (in 10 ms clock ticks: a round of 20 light
    # requests may show none), and one process's main thread holds at most one core.
    for m in medians:
        assert m["event_loop_cpu_ms_per_request"] >= 0
        assert 0 <= m["event_loop_cores"] <= 1.05
    # Every round's row is kept too, so that other ratios can be derived from the file.
    assert list(written["rounds"]) == ["off", "all", "floor"]
    for median_row, rows in zip(medians, written["rounds"].values(), strict=True):
        assert [r["requests_per_second"] for r in rows] == [median_row["requests_per_second"]]


def test_settings_ab_alternates_which_variant_runs_first() -> None:
    variants = ["a", "b", "c"]
    orders = [settings_ab.round_order(variants, index) for index in range(4)]
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    assert variants == ["a", "b", "c"]  # the caller's list is left alone


def test_settings_ab_rounds_show_how_fast_refusals_arrived() -> None:
    row = {"rejected": 12, "rejected_p99_from_send_ms": 6.25, "rejected_p99_server_ms": 4.5}
    assert settings_ab._refusals(row) == (
        ", 12 refused (p99 6.2 ms from the send to the read, 4.5 ms to the arrival)"
    )
    assert settings_ab._refusals(row | {"rejected": 0}) == ""
    closed_loop_row = {"rejected": 3}  # wrk counts refusals, not their times
    assert settings_ab._refusals(closed_loop_row) == ""


def test_a_checkout_of_another_revision_is_served_and_then_removed(
    redis_url: str, tmp_path: Path
) -> None:
    with checkouts.checked_out("HEAD") as root:
        assert (root / "service" / "batcher.py").is_file()
        with servers.adscore_at(root, DEMO.root, redis_url, tmp_path / "a.log") as service:
            assert Path(f"/proc/{service.pid}/cwd").resolve() == root.resolve()
            environment = Path(f"/proc/{service.pid}/environ").read_bytes().split(b"\0")
            assert f"PYTHONPATH={root}".encode() in environment
            assert httpx.get(f"http://127.0.0.1:{service.port}/readyz").status_code == 200
    assert not root.exists()
    worktrees = subprocess.run(
        ["git", "-C", str(checkouts.PROJECT), "worktree", "list"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(root) not in worktrees


def test_settings_ab_refuses_a_revision_git_does_not_know(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        settings_ab.main(
            ["--variant", "before:code=no-such-revision-anywhere", "--variant", "after:",
             "--candidates", "8", "--rounds", "1", "--seconds", "1", "--users", "2000",
             "--ads", "4000", "--requests", "100", "--out", str(tmp_path)]
        )  # fmt: skip
    assert stopped.value.code == 2
    assert "code=: git rev-parse" in capsys.readouterr().err


def test_explain_benchmark_times_plain_and_explained_requests() -> None:
    lines = asyncio.run(explain.measure(DEMO.root, "pcvr", [4], repeats=3))
    (row,) = [line for line in lines if line.startswith("| 4 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    features = len(DEMO.read_metadata("pcvr", 1).spec().features)
    assert cells[1] == str(4 * (1 + features))  # rows scored when explained
    assert all(cell.endswith(" ms") for cell in cells[2:6])


def test_drift_cost_benchmark_times_the_worker_on_every_sample() -> None:
    settings = Settings(model_repository=DEMO.root, inference_threads=1)
    model = load_version(DEMO, "pcvr", DEMO.active_version("pcvr"), settings)
    inputs = drift_cost.sample_inputs(model, 8, np.random.default_rng(0))
    assert inputs.dense.shape == (8, len(model.spec.dense()))
    assert inputs.ids.shape == (8, len(model.spec.categorical()))
    for linger in (0.0, 0.1):
        cpu_ms, binned = drift_cost.worker_cpu_per_sample(model, 8, 40, 0.25, linger)
        assert binned == 10 and cpu_ms > 0


def test_log_reading_benchmark_reads_back_every_row_it_wrote() -> None:
    results = log_reading.measure(rows=2_000, candidates=20)
    assert [(r["rows"], r["inputs_kept"]) for r in results] == [(2_000, True), (2_000, False)]
    assert all(r["bytes"] > 0 and r["rows_per_second"] > 0 for r in results)


def test_settings_ab_closed_loop_reports_throughput_against_the_first_variant(
    tmp_path: Path,
) -> None:
    # Another model name than the default: the flags must reach the served process.
    repository = tmp_path / "model_repository"
    shutil.copytree(DEMO.root / "pcvr", repository / "pcvr-b")
    code = settings_ab.main(
        ["--variant", "a:drift_sample_rate=0", "--variant", "b:ad_feature_cache_seconds=30",
         "--candidates", "8", "--connections", "4", "--rounds", "1", "--seconds", "1",
         "--users", "2000", "--ads", "4000", "--requests", "100", "--out", str(tmp_path),
         "--model-repository", str(repository), "--model", "pcvr-b"]
    )  # fmt: skip
    assert code == 0
    first, second = orjson.loads((tmp_path / "settings_ab.json").read_bytes())["medians"]
    assert first["throughput_ratio"] == 1.0 and first["requests_per_second"] > 0
    expected = second["requests_per_second"] / first["requests_per_second"]
    assert second["throughput_ratio"] == pytest.approx(expected)
    # Measured from the service's own counters, over the measured requests only.
    assert first["ad_cache_hit_rate"] is None
    assert 0 < second["ad_cache_hit_rate"] <= 1  # 100 requests, replayed: mostly hits
    assert first["redis_cpu_ms_per_request"] > 0


def test_settings_ab_ratio_is_the_median_of_per_round_ratios() -> None:
    def rounds(*rates: float) -> list[dict[str, float]]:
        return [
            {
                "requests_per_second": r,
                "p50_ms": 1.0,
                "p99_ms": 2.0,
                "server_cpu_ms_per_request": 0.5,
                "redis_cpu_ms_per_request": 0.1,
                "event_loop_cpu_ms_per_request": 4.0,
                "rejected": 0.0,
            }
            for r in rates
        ]

    # The machine slows down in round 3: both variants drop, their ratio does not.
    table = settings_ab.summary({"a": rounds(100, 100, 50), "b": rounds(110, 120, 60)})
    assert [row["throughput_ratio"] for row in table] == [1.0, pytest.approx(1.2)]
    assert table[1]["requests_per_second"] == 110
    # 4 ms of event-loop CPU per request at 110, 120 and 60 requests/s: 0.44, 0.48, 0.24 cores.
    assert table[1]["event_loop_cores"] == pytest.approx(0.44)


def test_benchmarks_refuse_a_model_they_cannot_draw_traffic_for(tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    shutil.copytree(DEMO.root / "pcvr", repository / "pcvr")
    assert population.active_model(repository, "pcvr").version == 1
    with pytest.raises(SystemExit, match="no versions of model 'other'"):
        population.active_model(repository, "other")
    metadata = repository / "pcvr" / "1" / "metadata.json"
    logged = orjson.loads(metadata.read_bytes()) | {"dataset": {"kind": "prediction_log"}}
    metadata.write_bytes(orjson.dumps(logged))
    with pytest.raises(SystemExit, match="not trained on the synthetic data set"):
        population.active_model(repository, "pcvr")


def test_the_in_process_limit_runs_in_as_many_processes_as_workers(
    redis_url: str, world: SyntheticWorld, tmp_path: Path
) -> None:
    population.load_population(redis_url, world, DEMO.read_metadata("pcvr", 1).spec())
    calls = population.request_mix(world, 40, candidates=16)
    contexts = [orjson.loads(c.body)["context"] for c in calls]
    limit = inprocess.in_process_limit(
        DEMO.root, "pcvr", redis_url, calls, contexts, threads=1, seconds=1.0, processes=2
    )
    assert len(limit["requests_per_process"]) == 2
    assert all(n > 0 for n in limit["requests_per_process"])
    assert limit["requests"] == sum(limit["requests_per_process"])
    assert limit["candidates_per_second"] == pytest.approx(16 * limit["requests_per_second"])
    results = {
        "command": "python -m benchmarks --workers 2", "started": "now", "machine": "2 cores",
        "population": {"users": 1, "ads": 1, "requests": 1}, "candidates": 16,
        "mean_candidates": 16.0, "seconds_per_point": 1.0, "workers": 2, "in_process": limit,
        "settings": {"inference_threads": "1"}, "adscore": _contender(90_000.0, 8.0),
    }  # fmt: skip
    report = write_report(results, tmp_path).read_text()
    assert "on 2 processes of 2 threads, no HTTP" in report
    assert "adscore served with 2 workers and inference_threads=1." in report


def test_benchmark_settings_parse_like_the_ab_variants() -> None:
    assert population.parse_setting(" inference_threads = 1 ") == ("inference_threads", "1")
    for bad in ("inference_threads", "=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected setting=value"):
            population.parse_setting(bad)


def test_batching_report_shows_the_share_of_answers_on_defaults() -> None:
    def run(rate: float, degraded: float | None) -> dict[str, Any]:
        point = {"candidates_per_second": rate, "p99_ms": 9.0, "server_cpu_ms_per_request": 0.2,
                 "p50_ms": 3.0, "degraded_share": degraded}  # fmt: skip
        return {"closed_loop": point, "open_loop": point}

    rounds = {"off": [run(1000, 0.0), run(1100, 0.02)], "on": [run(2000, 0.5), run(2400, 0.7)]}
    result = {
        "command": "python -m benchmarks.batching", "candidates": 8, "connections": 64,
        "offered_per_second": 700.0, "load": 0.7, "max_in_flight": 256,
        "rounds": rounds,
    }  # fmt: skip
    lines = batching.report(result).splitlines()
    assert "| off | 1,050 | 1.00 |" in lines[-2] and lines[-2].endswith("| 1.0%, 1.0% |")
    assert "| on | 2,200 | 2.10 |" in lines[-1] and lines[-1].endswith("| 60.0%, 60.0% |")
    rounds["on"][0]["closed_loop"] = rounds["on"][0]["closed_loop"] | {"degraded_share": None}
    assert batching.report(result).splitlines()[-1].endswith("| n/a, 60.0% |")
