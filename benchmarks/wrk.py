"""Closed-loop maximum throughput with wrk (a Lua script cycles through the request mix)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

LUA = r"""
local requests = {}
local index = 0
function init(args)
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("POST", "/v1/score",
      {["Content-Type"] = "application/json"}, line)
  end
end
function request()
  index = index % #requests + 1
  return requests[index]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    port: int, bodies: Sequence[bytes], folder: Path, *, connections: int, seconds: float
) -> dict[str, float]:
    """Requests/s, error counts, latency percentiles (ms) and wrk's own CPU seconds."""
    script = folder / "score.lua"
    script.write_text(LUA)
    lines = folder / "bodies.jsonl"
    lines.write_bytes(b"\n".join(bodies) + b"\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "-s", str(script), f"http://127.0.0.1:{port}", "--", str(lines)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(x for x in output.splitlines() if x.startswith("RESULT "))
    raw = json.loads(line.removeprefix("RESULT "))
    seconds_run = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "seconds": seconds_run,
        "requests_per_second": (raw["requests"] - raw["non2xx"]) / seconds_run,
        "errors": raw["errors"] + raw["non2xx"],
        "p50_ms": raw["p50_us"] / 1000,
        "p95_ms": raw["p95_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "generator_cpu_seconds": (after.ru_utime + after.ru_stime)
        - (before.ru_utime + before.ru_stime),
    }
