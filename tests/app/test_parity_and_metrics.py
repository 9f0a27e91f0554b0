"""/v1/score over HTTP equals the torch model on the same features; /metrics shows the stages."""

from __future__ import annotations

import re

import httpx
import numpy as np

from feature_client.assembly import assemble_inputs, context_blocks
from models.pipeline import TrainedModel
from models.train import predict_logits
from tests.app.conftest import RunningService


def test_http_scores_equal_torch_after_calibration(service: RunningService) -> None:
    world = service.world
    trained: TrainedModel = service.trained.trained  # type: ignore[assignment]
    rng = np.random.default_rng(5)
    context: dict[str, str | int | float] = {
        "device": "android",
        "country": "DE",
        "hour": 21,
        "placement": "story",
    }
    with httpx.Client(base_url=service.url, timeout=10) as client:
        for user in rng.choice(len(world.users.keys), 5, replace=False):
            ads = rng.choice(len(world.ads.keys), 64, replace=False)
            response = client.post(
                "/v1/score",
                json={
                    "user_id": world.users.keys[user],
                    "context": context,
                    "candidates": [{"ad_id": world.ads.keys[a]} for a in ads],
                },
            )
            assert response.status_code == 200, response.text
            served = np.asarray(response.json()["scores"])

            context_dense, context_ids = context_blocks(world.spec, context)
            inputs = assemble_inputs(
                len(ads),
                [world.users.dense[[user]], world.ads.dense[ads], context_dense],
                [world.users.ids[[user]], world.ads.ids[ads], context_ids],
            )
            expected = trained.calibration.apply(predict_logits(trained.model, inputs))
            np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)


def _sample(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = (
        rf"^{re.escape(name)}\{{{re.escape(label_text)}\}} (\S+)$"
        if labels
        else rf"^{re.escape(name)} (\S+)$"
    )
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{label_text}}} not in /metrics"
    return float(match.group(1))


def test_metrics_show_stage_histograms_after_a_request(service: RunningService) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        before = client.get("/metrics").text
        count_before = _sample(before, "adscore_stage_duration_seconds_count", stage="inference")
        response = client.post(
            "/v1/score", json={"user_id": "u1", "candidates": [{"ad_id": "a1"}, {"ad_id": "zz"}]}
        )
        assert response.status_code == 200
        text = client.get("/metrics").text
    assert text.startswith("# HELP") or "# HELP" in text
    for stage in ("feature_fetch", "input_assembly", "inference", "response"):
        assert _sample(text, "adscore_stage_duration_seconds_count", stage=stage) >= 1
        assert _sample(text, "adscore_stage_duration_seconds_bucket", stage=stage, le="+Inf") >= 1
    assert (
        _sample(text, "adscore_stage_duration_seconds_count", stage="inference") == count_before + 1
    )
    assert _sample(text, "adscore_requests_total", route="/v1/score", status="200") >= 1
    assert _sample(text, "adscore_request_duration_seconds_count", route="/v1/score") >= 1
    assert _sample(text, "adscore_candidates_per_request_count") >= 1
    assert _sample(text, "adscore_process_starts_total") == 1  # one process, started once
    assert _sample(text, "adscore_missing_features_total", entity="ad") >= 1
    assert (
        _sample(
            text,
            "adscore_model_info",
            model="pcvr",
            provider="CPUExecutionProvider",
            role="active",
            version="1",
        )
        == 1
    )
