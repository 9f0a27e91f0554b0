"""Locust scenario with the harness's request mix, for SREs load-testing a deployed adscore.

    pip install -e '.[bench]'
    ADSCORE_BENCH_USERS=100000 ADSCORE_BENCH_ADS=200000 locust -f benchmarks/locustfile.py \\
        --host http://127.0.0.1:8000 --headless -u 64 -r 16 -t 2m \\
        --csv bench-locust --html bench-locust.html

The population must be the one loaded into the service's Redis (`python -m benchmarks` loads
it; the demo's own 10k users and 50k ads work with ADSCORE_BENCH_USERS=10000 and
ADSCORE_BENCH_ADS=50000, which draws ids from that range). Set ADSCORE_API_KEY when the
service requires keys. Each simulated user sends requests back to back (closed loop): use it
for soak and capacity checks; `python -m benchmarks` measures latency at a fixed arrival rate.

An answer scored on default features (`"degraded": true`: the feature store failed, or was late
for a busy service) counts as a failure, "degraded: ...", in the failures CSV: such answers are
cheap and would make an overloaded deployment look faster than it is.
"""

from __future__ import annotations

import os
from itertools import cycle

from locust import FastHttpUser, task

from benchmarks.population import bench_world, request_mix
from service.repository import ModelRepository

_REPOSITORY = ModelRepository(
    __import__("pathlib").Path(__file__).resolve().parent.parent / "demo" / "model_repository"
)
_WORLD = bench_world(
    _REPOSITORY.read_metadata("pcvr", _REPOSITORY.active_version("pcvr")),
    users=int(os.environ.get("ADSCORE_BENCH_USERS", "100000")),
    ads=int(os.environ.get("ADSCORE_BENCH_ADS", "200000")),
)
_CANDIDATES = os.environ.get("ADSCORE_BENCH_CANDIDATES")
_CALLS = request_mix(_WORLD, 5_000, candidates=int(_CANDIDATES) if _CANDIDATES else None, seed=0)
_HEADERS = {"Content-Type": "application/json"}
if os.environ.get("ADSCORE_API_KEY"):
    _HEADERS["Authorization"] = f"Bearer {os.environ['ADSCORE_API_KEY']}"


class AdServer(FastHttpUser):
    """One ad-serving backend connection scoring auctions back to back."""

    def on_start(self) -> None:
        self.calls = cycle(_CALLS)

    @task
    def score(self) -> None:
        call = next(self.calls)
        with self.client.post(
            "/v1/score",
            data=call.body.decode(),
            headers=_HEADERS,
            name="/v1/score",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            body = response.json()
            if len(body["scores"]) != len(call.ad_ids):
                response.failure("wrong number of scores")
            elif body["degraded"]:
                response.failure(
                    "degraded: scored on default features, the store failed or was late"
                )
