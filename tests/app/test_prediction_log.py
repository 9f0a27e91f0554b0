"""The prediction log on a real server under concurrent load: no request fails because of it,
every sampled row is written or counted, and the logged rows are exactly what the model scored."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import redis

from feature_client.assembly import DENSE_INPUT, IDS_INPUT, LOGIT_OUTPUT
from service.prediction_record import PredictionRecord
from service.prediction_sinks import STREAM_FIELD
from service.repository import ModelRepository
from tests.app.conftest import RunningService, serving
from tests.conftest import TrainedFixture

REQUESTS = 160
CONCURRENCY = 16


def bodies(service: RunningService, count: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(5)
    users, ads = service.world.users.keys, service.world.ads.keys
    return [
        {
            "request_id": f"r{i}",
            "user_id": users[int(rng.integers(len(users)))],
            "context": {"device": "ios", "country": "US", "hour": int(rng.integers(24))},
            "candidates": [
                {"ad_id": ads[int(a)]}
                for a in rng.integers(len(ads), size=int(rng.integers(1, 40)))
            ],
        }
        for i in range(count)
    ]


async def send_concurrently(url: str, requests: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Scores by request id; every request must be answered 200."""
    scores: dict[str, list[float]] = {}
    queue = list(requests)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            body = queue.pop()
            response = await client.post("/v1/score", json=body)
            assert response.status_code == 200, response.text
            scores[body["request_id"]] = response.json()["scores"]

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return scores


def log_rows(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'adscore_prediction_log_rows_total\{outcome="(\w+)"\} (\S+)', text)
    }


def accounted(url: str, rows: int) -> dict[str, float]:
    """The log's counters once every sampled row is written or counted as lost."""
    deadline = time.monotonic() + 20
    while True:
        counts = log_rows(url)
        if sum(counts.values()) >= rows or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def read_records(directory: Path) -> list[PredictionRecord]:
    # The file still open is flushed after every batch: complete lines only.
    paths = [*directory.glob("*.jsonl"), *directory.glob("*.jsonl.open")]
    return [PredictionRecord.decode(line) for p in paths for line in p.read_bytes().splitlines()]


def rescored(trained: TrainedFixture, record: PredictionRecord) -> np.ndarray:
    repository = ModelRepository(trained.repository)
    session = ort.InferenceSession(
        str(repository.model_path(trained.name, trained.version)),
        providers=["CPUExecutionProvider"],
    )
    (logits,) = session.run([LOGIT_OUTPUT], {DENSE_INPUT: record.dense, IDS_INPUT: record.ids})
    calibration = repository.read_metadata(trained.name, trained.version).calibration
    result: np.ndarray = calibration.apply(logits)
    return result


def test_every_sampled_row_is_logged_exactly_as_scored(
    trained: TrainedFixture, tmp_path: Path
) -> None:
    with serving(
        trained,
        prediction_log="jsonl",
        prediction_log_sample_rate=1.0,
        prediction_log_dir=tmp_path,
        prediction_log_max_file_bytes=64 * 1024,  # several rotations during the test
    ) as service:
        requests = bodies(service, REQUESTS)
        answered = asyncio.run(send_concurrently(service.url, requests))
        rows = sum(len(b["candidates"]) for b in requests)
        counts = accounted(service.url, rows)
        assert counts["written"] + counts["dropped"] == rows
        assert counts["failed"] == 0
        records = read_records(tmp_path)

    assert len(list(tmp_path.glob("*.jsonl"))) >= 2  # rotated by size
    assert sum(len(r) for r in records) == counts["written"]
    by_id = {r.request_id: r for r in records}
    assert len(by_id) == len(records)
    sent = {b["request_id"]: b for b in requests}
    for request_id, record in by_id.items():
        assert request_id is not None
        body = sent[request_id]
        assert record.ad_ids == [c["ad_id"] for c in body["candidates"]]
        assert record.user_id == body["user_id"] and dict(record.context) == body["context"]
        assert (record.model, record.model_version) == (trained.name, trained.version)
        assert record.scores.tolist() == answered[request_id]
    # The logged rows are the model's inputs: scoring them again gives the logged scores.
    for record in list(by_id.values())[:20]:
        np.testing.assert_allclose(rescored(trained, record), record.scores, atol=1e-6)


def test_the_log_can_go_to_a_redis_stream(trained: TrainedFixture) -> None:
    with serving(trained, prediction_log="redis", prediction_log_sample_rate=1.0) as service:
        requests = bodies(service, 20)
        answered = asyncio.run(send_concurrently(service.url, requests))
        rows = sum(len(b["candidates"]) for b in requests)
        assert accounted(service.url, rows)["written"] == rows
        client = redis.Redis.from_url(service.redis.url)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange("adscore:predictions")  # type: ignore[assignment]
        client.close()
    records = [PredictionRecord.decode(fields[STREAM_FIELD.encode()]) for _, fields in entries]
    assert {r.request_id: r.scores.tolist() for r in records} == answered
