"""Markdown report and latency-vs-throughput plot of one harness run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.http_floor import efficiency_ceiling


def serving_efficiency(results: dict[str, Any]) -> float:
    """adscore's candidates/s over the in-process limit's: the median of the alternated
    rounds' ratios (the lower of the middle two) when the run has them, else the ratio of the
    two measurements."""
    rounds = results.get("efficiency_rounds")
    if rounds:  # the round of the median ratio (the lower of the middle two), whose figures
        return float(sorted(rounds)[(len(rounds) - 1) // 2])  # the report shows
    limit = results["in_process"]["candidates_per_second"]
    closed = results["adscore"]["closed_loop"]["candidates_per_second"]
    return closed / limit if limit else 0.0


def median_index(values: list[float]) -> int:
    """The index of the median value (the lower of the middle two)."""
    return sorted(range(len(values)), key=values.__getitem__)[(len(values) - 1) // 2]


def point_at(contender: dict[str, Any], load: float) -> dict[str, Any]:
    """The open-loop point at `load` (a share of the closed-loop maximum)."""
    point: dict[str, Any] = next(p for p in contender["open_loop"] if p["load"] == load)
    return point


def latency_ratio(contender: dict[str, Any]) -> float:
    """The p99 at 70 % load over the unloaded p50 (the issue's latency target)."""
    unloaded = float(contender["unloaded"]["p50_ms"])
    return float(point_at(contender, 0.7)["p99_ms"]) / unloaded if unloaded else float("inf")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def headline(results: dict[str, Any]) -> list[str]:
    """The ratios the issue's targets are stated in, as Markdown bullet lines."""
    lines = []
    limit = results["in_process"]["candidates_per_second"]
    ours = results["adscore"]
    closed = ours["closed_loop"]
    rounds = results.get("efficiency_rounds")  # absent from reports of a single measurement
    efficiency = serving_efficiency(results)
    lines.append(
        f"- Serving efficiency: adscore {closed['candidates_per_second']:,.0f} candidates/s over "
        f"HTTP = {efficiency:.2f}x the in-process limit ({limit:,.0f}/s)"
        + (
            f"; the median of {len(rounds)} alternated rounds "
            f"({', '.join(f'{r:.2f}x' for r in rounds)})."
            if rounds and len(rounds) > 1
            else "."
        )
    )
    floor = results.get("http_floor")  # absent from reports written before it was measured
    if floor:
        ceiling = efficiency_ceiling(
            results["in_process"]["requests_per_second"], floor["requests_per_second"]
        )
        lines.append(
            f"- HTTP floor (the same uvicorn, JSON in and out, nothing else): "
            f"{floor['requests_per_second']:,.0f} requests/s, "
            f"{floor['server_cpu_ms_per_request']:.3f} ms of server CPU per request. "
            f"In-process work plus the floor's caps serving efficiency at {ceiling:.2f}x; "
            + (
                f"adscore reaches {_ratio(efficiency, ceiling)} of that cap."
                if efficiency <= ceiling
                else f"adscore is above it ({_ratio(efficiency, ceiling)}): its micro-batching "
                "makes fewer, larger model calls than the in-process limit, which scores one "
                "request per call."
            )
        )
    at70 = point_at(ours, 0.7)
    unloaded = ours["unloaded"]["p50_ms"]
    latency_rounds = ours.get("latency_rounds") or []  # absent from single-curve reports
    lines.append(
        f"- Latency at 70 % load: p99 {at70['p99_ms']:.1f} ms = "
        f"{_ratio(at70['p99_ms'], unloaded)} the unloaded p50 ({unloaded:.1f} ms)"
        + (
            f"; the median of {len(latency_rounds)} rounds' ratios "
            f"({', '.join(format(r['ratio'], '.2f') + 'x' for r in latency_rounds)})."
            if len(latency_rounds) > 1
            else "."
        )
    )
    lines += _latency_floor(latency_rounds, latency_ratio(ours))
    at150 = point_at(ours, 1.5)
    shed = at150["rejected"]
    lines.append(
        f"- At 150 % load: {shed} requests shed"
        + (
            f" (p99 of a refusal {at150.get('rejected_p99_ms', float('nan')):.1f} ms from the "
            f"intended send time{_from_send(at150)})"
            if shed
            else ""
        )
        + f", p99 of the accepted {at150['p99_ms']:.0f} ms."
    )
    naive = results.get("naive")
    if naive:
        speedup = _ratio(
            closed["candidates_per_second"], naive["closed_loop"]["candidates_per_second"]
        )
        lines.append(
            f"- Versus the naive service: {speedup} "
            f"candidates/s at saturation; at 70 % of each one's own maximum, p99 "
            f"{at70['p99_ms']:.1f} ms vs "
            f"{point_at(naive, 0.7)['p99_ms']:.1f} ms."
        )
    return lines


def _latency_floor(latency_rounds: list[dict[str, Any]], ours: float) -> list[str]:
    """The in-process latency floor's line: the round of its median ratio, and every round's
    (absent from runs without it, as with several workers)."""
    floors = [r["in_process_latency"] for r in latency_rounds if r.get("in_process_latency")]
    if not floors:
        return []
    ratios = [f["ratio"] for f in floors]
    shown = floors[median_index(ratios)]
    loaded, unloaded = shown["loaded"], shown["unloaded"]
    return [
        f"- Latency floor without HTTP: the in-process pipeline on its threads, fed Poisson "
        f"arrivals at 70 % of the in-process limit ({loaded['offered_per_second']:.0f}/s): p99 "
        f"{loaded['p99_ms']:.1f} ms = {shown['ratio']:.2f}x its unloaded p50 "
        f"({unloaded['p50_ms']:.1f} ms)"
        + (
            f"; the median of {len(floors)} rounds ({', '.join(f'{r:.2f}x' for r in ratios)}), "
            "each measured just before adscore's round"
            if len(floors) > 1
            else ""
        )
        + f". adscore's ratio is {ours / shown['ratio']:.2f}x this floor's."
    ]


def _table(name: str, contender: dict[str, Any]) -> list[str]:
    closed = contender["closed_loop"]
    rows = [
        f"### {name}",
        "",
        f"Closed loop ({closed.get('generator', 'python')}): "
        f"{closed['requests_per_second']:,.0f} requests/s, "
        f"{closed['candidates_per_second']:,.0f} candidates/s, p50 {closed['p50_ms']:.1f} ms, "
        f"p99 {closed['p99_ms']:.1f} ms, server CPU {closed['server_cpu_ms_per_request']:.2f} ms "
        f"per request{_event_loop_share(closed)}, generator CPU "
        f"{closed['generator_cpu_ms_per_request']:.2f} ms per request, "
        f"RSS {closed['rss_mb']:.0f} MB, errors {closed['errors']:.0f}"
        f"{_degraded_clause(closed)}.",
        "",
        f"Unloaded (20 requests/s): p50 {contender['unloaded']['p50_ms']:.2f} ms, "
        f"p99 {contender['unloaded']['p99_ms']:.2f} ms.",
        "",
        *_latency_rounds(contender.get("latency_rounds") or []),
        "| load | offered/s | done/s | candidates/s | p50 ms | p95 ms | p99 ms | rejected | "
        "degraded | server CPU ms/req | generator CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in contender["open_loop"]:
        rows.append(
            f"| {p['load']:.0%} | {p['offered_per_second']:.0f} | {p['requests_per_second']:.0f} "
            f"| {p['candidates_per_second']:,.0f} | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} "
            f"| {p['p99_ms']:.1f} | {p['rejected']} | {_share(p.get('degraded_share'))} "
            f"| {p['server_cpu_ms_per_request']:.2f} "
            f"| {p.get('generator_cpu_ms_per_request', float('nan')):.2f} |"
        )
    return [*rows, ""]


def _latency_rounds(rounds: list[dict[str, Any]]) -> list[str]:
    """Every round's p99s, when the curve was measured more than once."""
    if len(rounds) < 2:
        return []
    loads = list(rounds[0]["p99_ms"])
    by_load = "; ".join(
        f"{float(load):.0%}: " + " / ".join(f"{r['p99_ms'][load]:.1f}" for r in rounds)
        for load in loads
    )
    unloaded = " / ".join(f"{r['unloaded_p50_ms']:.2f}" for r in rounds)
    refusals = " / ".join(_ms(r.get("refusal_p99_to_arrival_ms_at_150")) for r in rounds)
    return [
        f"The open-loop curve ran in {len(rounds)} rounds, each after its own unloaded point; "
        "the table and the stages below are the round of the median p99-at-70 % ratio. "
        f"p99 ms by round: {by_load}. Unloaded p50 ms: {unloaded}. A refusal's p99 at 150 %, "
        f"to its arrival at the socket, ms: {refusals}.",
        "",
    ]


STAGE_COLUMNS = (
    ("feature_fetch", "feature fetch"),
    ("input_assembly", "input assembly"),
    ("inference_thread_wait", "wait for an inference thread"),
    ("inference", "inference, wait included"),
    ("event_loop_lag", "event-loop lag"),
)


def _stages_table(contender: dict[str, Any]) -> list[str]:
    """The p99 of each stage at each point, from adscore's own histograms (absent from
    reports written before they were read, and for servers without them)."""
    points = [("closed loop", contender["closed_loop"])] + [
        (f"{p['load']:.0%}", p) for p in contender["open_loop"]
    ]
    if not any(point.get("server_p99_ms") for _, point in points):
        return []
    rows = [
        "#### Where the time goes",
        "",
        "The p99 of each stage as adscore's histograms timed it, each on its own (so not "
        "necessarily the same requests), interpolated within histogram buckets as Prometheus's "
        "histogram_quantile does (above 5 ms the stages' bucket bounds are 7.5, 10, 20, 50 and "
        "100 ms). The fetch is the whole await of the coalesced MGET: the queue behind the "
        "reads in flight, Redis, and the event loop reading the reply. Beside them, the "
        "answers' p99 from the moment each request was written, to the generator's read and to "
        "the reply's arrival at its socket (the kernel's receive timestamp: the server's "
        "response time, without the generator's delay in reading), and how late requests were "
        "written after their intended send times (the generator shares the cores; a wait for "
        "a free connection counts too).",
        "",
        "| load | "
        + " | ".join(f"{title} ms" for _, title in STAGE_COLUMNS)
        + " | answered, p99 from the send ms | to the arrival ms | written late ms |",
        "|---|" + "---|" * (len(STAGE_COLUMNS) + 3),
    ]
    for label, point in points:
        stages = point.get("server_p99_ms") or {}
        cells = [_ms(stages.get(key)) for key, _ in STAGE_COLUMNS]
        cells.append(_ms(point.get("p99_from_send_ms")))
        cells.append(_ms(point.get("p99_server_ms")))
        cells.append(_ms(point.get("generator_late_p99_ms")))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*rows, ""]


def _ms(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f}"  # NaN: nothing measured


def _share(share: float | None) -> str:
    """A share of answers, or n/a for a server (or a report) that does not count them."""
    return "n/a" if share is None else f"{share:.1%}"


def _degraded_clause(point: dict[str, Any]) -> str:
    share = point.get("degraded_share")  # absent from reports written before it was counted
    if share is None:
        return ""
    return f", scored on default features (feature store failed or timed out) {share:.1%}"


def degraded_warning(results: dict[str, Any]) -> list[str]:
    """A warning line for each adscore point where more than 1 % of the answers were scored
    on default features: those answers skip the fetch, so the point overstates throughput."""
    ours = results["adscore"]
    points = [("closed loop", ours["closed_loop"])] + [
        (f"open loop at {p['load']:.0%}", p) for p in ours["open_loop"]
    ]
    return [
        f"- **Warning:** {name}: {share:.1%} of the answers were scored on default features; "
        "this point overstates what adscore serves with its features."
        for name, point in points
        if (share := point.get("degraded_share")) is not None and share > 0.01
    ]


def plot(results: dict[str, Any], path: Path) -> bool:
    """latency.png: p50 and p99 against achieved candidates/s; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(8, 5))
    for name, style, color in (("adscore", "-o", "tab:blue"), ("naive", "--s", "tab:red")):
        if name not in results:
            continue
        points = results[name]["open_loop"]
        x = [p["candidates_per_second"] for p in points]
        axis.plot(x, [p["p99_ms"] for p in points], style, color=color, label=f"{name} p99")
        axis.plot(
            x, [p["p50_ms"] for p in points], style, color=color, alpha=0.4, label=f"{name} p50"
        )
    limit = results["in_process"]["candidates_per_second"]
    axis.axvline(limit, color="grey", linestyle=":", label="in-process limit")
    axis.set_xlabel("candidates scored per second (open loop, Poisson arrivals)")
    axis.set_ylabel("latency from intended send time (ms)")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    axis.set_title(f"adscore, {results['candidates']} candidates per request")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _model_line(results: dict[str, Any]) -> str:
    model = results.get("model")  # absent from reports written before it was recorded
    if not model:
        return "Model: the demo model."
    return f"Model: {model['name']} v{model['version']} ({model['architecture']})."


def _serving_line(results: dict[str, Any]) -> str:
    workers = int(results.get("workers", 1))
    settings = results.get("settings") or {}
    served = f"adscore served with {workers} worker{'s' if workers > 1 else ''}"
    if settings:
        served += " and " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    return served + "."


def write_report(results: dict[str, Any], folder: Path) -> Path:
    has_plot = plot(results, folder / "latency.png")
    lines = [
        "# adscore benchmark",
        "",
        f"`{results['command']}` on {results['started']}; {results['machine']}.",
        _model_line(results),
        _serving_line(results),
        f"Population {results['population']['users']:,} users and "
        f"{results['population']['ads']:,} ads (Zipf popularity), "
        f"{results['population']['requests']:,} distinct requests of {results['candidates']} "
        f"candidates (mean {results['mean_candidates']:.0f}); {results['seconds_per_point']:.0f} s "
        "per point; the load generator, Redis and the server share the machine.",
        "",
        "## Headline",
        "",
        *headline(results),
        *degraded_warning(results),
        "",
        "## In-process limit",
        "",
        f"Feature fetch (MGET) + assembly + onnxruntime on {_layout(results)}, no HTTP: "
        f"{results['in_process']['requests_per_second']:,.0f} requests/s, "
        f"{results['in_process']['candidates_per_second']:,.0f} candidates/s, "
        f"{results['in_process']['cpu_ms_per_request']:.2f} ms CPU per request"
        f"{_median_of(results)}.",
        "",
        *_floor_section(results),
        *_table("adscore", results["adscore"]),
        *_stages_table(results["adscore"]),
    ]
    if "naive" in results:
        lines += _table("naive service (pydantic per candidate, GET per key, run on the loop)",
                        results["naive"])  # fmt: skip
    if has_plot:
        lines += ["![latency vs throughput](latency.png)", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _median_of(results: dict[str, Any]) -> str:
    rounds = results.get("efficiency_rounds") or []
    if len(rounds) < 2:
        return ""
    return (
        f" (the round of the median ratio of {len(rounds)}, alternated with adscore's closed "
        "loop, whose figures below are the same round's)"
    )


def _from_send(point: dict[str, Any]) -> str:
    sent = point.get("rejected_p99_from_send_ms")  # absent from earlier reports
    if sent is None:
        return ""
    server = point.get("rejected_p99_server_ms")  # absent from earlier reports
    at_socket = (
        ""
        if server is None or server != server
        else f", {server:.1f} ms to its arrival at the socket"
    )
    return f", {sent:.1f} ms from the moment it was sent{at_socket}"


def _event_loop_share(closed: dict[str, Any]) -> str:
    loop = closed.get("event_loop_cpu_ms_per_request")  # absent from earlier reports
    return "" if loop is None else f" ({loop:.2f} ms of it on the event loop)"


def _floor_section(results: dict[str, Any]) -> list[str]:
    floor = results.get("http_floor")
    if not floor:
        return []
    workers = int(results.get("workers", 1))
    return [
        "## HTTP floor",
        "",
        f"The same uvicorn in {workers} process{'es' if workers > 1 else ''}, answering each "
        "request with constant scores after parsing its JSON: "
        f"{floor['requests_per_second']:,.0f} requests/s, "
        f"{floor['server_cpu_ms_per_request']:.3f} ms server CPU per request, "
        f"generator CPU {floor['generator_cpu_ms_per_request']:.3f} ms per request.",
        "",
    ]


def _layout(results: dict[str, Any]) -> str:
    """Processes and threads of the in-process limit (adscore's workers and inference threads)."""
    workers = int(results.get("workers", 1))
    return "2 threads" if workers == 1 else f"{workers} processes of 2 threads"
