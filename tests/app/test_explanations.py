"""Explanations over HTTP with the trained DCN-v2: aligned with the candidates, consistent with
scoring the occluded rows directly, and refused past max_explain_candidates."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from feature_client.assembly import DENSE_INPUT, IDS_INPUT, LOGIT_OUTPUT
from service.repository import ModelRepository
from tests.app.conftest import RunningService

CONTEXT = {"device": "ios", "country": "US", "hour": 20, "placement": "feed"}


def explain(service: RunningService, ad_ids: list[str], **fields: Any) -> httpx.Response:
    return httpx.post(
        f"{service.url}/v1/score",
        json={
            "user_id": service.world.users.keys[3],
            "context": CONTEXT,
            "candidates": [{"ad_id": a} for a in ad_ids],
            **fields,
        },
        timeout=10,
    )


def test_explanations_follow_the_candidates_and_leave_unknown_ads_features_out(
    service: RunningService,
) -> None:
    ads = [*service.world.ads.keys[:5], "no-such-ad"]
    response = explain(service, ads, explain=True, explain_top_k=64)
    assert response.status_code == 200, response.text
    body = response.json()
    plain = explain(service, ads).json()
    assert "explanations" not in plain
    np.testing.assert_allclose(body["scores"], plain["scores"], atol=1e-6)
    explanations = body["explanations"]
    assert [e["ad_id"] for e in explanations] == ads
    ad_features = {f.name for f in service.world.spec.features if f.source == "ad"}
    for explanation in explanations:
        contributions = explanation["contributions"]
        assert len(contributions) == len(service.world.spec.features)
        magnitudes = [abs(c["contribution"]) for c in contributions]
        assert magnitudes == sorted(magnitudes, reverse=True)
    # The unknown ad was scored on the ad defaults: occluding them changes nothing.
    unknown = {c["feature"]: c["contribution"] for c in explanations[-1]["contributions"]}
    assert all(unknown[f] == 0.0 for f in ad_features)
    known = {c["feature"]: c["contribution"] for c in explanations[0]["contributions"]}
    assert any(known[f] != 0.0 for f in ad_features)


def test_a_contribution_is_the_score_minus_the_occluded_score(service: RunningService) -> None:
    ad = service.world.ads.keys[0]
    (explanation,) = explain(service, [ad], explain=True, explain_top_k=1).json()["explanations"]
    (top,) = explanation["contributions"]
    # Rebuild the row the service scored from the world, occlude the top feature, score it.
    trained = service.trained
    repository = ModelRepository(trained.repository)
    metadata = repository.read_metadata(trained.name, trained.version)
    spec = metadata.spec()
    world = service.world
    user, ad_index = 3, 0
    context_ids = [
        feature.encode_one(str(CONTEXT[feature.name])) for feature in spec.categorical("context")
    ]
    dense = np.concatenate([world.users.dense[user], world.ads.dense[ad_index]])[None, :]
    ids = np.concatenate([world.users.ids[user], world.ads.ids[ad_index], context_ids])[None, :]
    dense, ids = dense.astype(np.float32), ids.astype(np.int64)
    occluded_dense, occluded_ids = dense.copy(), ids.copy()
    if top["feature"] in spec.dense_names:
        j = spec.dense_names.index(top["feature"])
        occluded_dense[0, j] = spec.dense()[j].default
    else:
        occluded_ids[0, spec.categorical_names.index(top["feature"])] = 0
    session = ort.InferenceSession(
        str(repository.model_path(trained.name, trained.version)),
        providers=["CPUExecutionProvider"],
    )

    def score(d: np.ndarray, i: np.ndarray) -> float:
        (logits,) = session.run([LOGIT_OUTPUT], {DENSE_INPUT: d, IDS_INPUT: i})
        return float(metadata.calibration.apply(logits)[0])

    expected = score(dense, ids) - score(occluded_dense, occluded_ids)
    assert abs(top["contribution"] - expected) < 1e-5
    assert abs(top["contribution"]) > 0


def test_explaining_too_many_candidates_is_refused(service: RunningService) -> None:
    limit = service.settings.max_explain_candidates
    ads = list(service.world.ads.keys[: limit + 1])
    response = explain(service, ads, explain=True)
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith(
        f"candidates: {limit + 1} candidates to explain, the limit with explain is {limit}"
    )
    assert explain(service, ads).status_code == 200
