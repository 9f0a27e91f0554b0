"""Every route and every client error, over real HTTP."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.app.conftest import RunningService, serving
from tests.conftest import TrainedFixture

VALID = b'{"user_id": "u1", "candidates": [{"ad_id": "a1"}]'  # an object left open


@pytest.fixture
def client(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=10) as http:
        yield http


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    message: str = body["error"]["message"]
    return message


def test_healthz_and_readyz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "models": {"pcvr": 1}, "feature_store": "ok"}


def test_models_lists_the_serving_version(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    (model,) = body["models"]
    assert model["name"] == "pcvr" and model["active_version"] == 1
    assert model["canary"] is None and model["shadow_version"] is None
    (version,) = model["versions"]
    assert version["provider"] == "CPUExecutionProvider"
    assert 0.5 < version["metrics"]["auc"] < 1
    assert body["default_model"] == "pcvr" and body["refused"] == []


def test_score_known_user_and_ads(client: httpx.Client) -> None:
    response = client.post(
        "/v1/score",
        json={
            "request_id": "r-1",
            "user_id": "u42",
            "context": {"device": "ios", "country": "US", "hour": 14, "placement": "feed"},
            "candidates": [{"ad_id": "a9"}, {"ad_id": "a17"}, {"ad_id": "a9"}],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "r-1"
    assert (body["model"], body["model_version"]) == ("pcvr", 1)
    scores = body["scores"]
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)
    assert scores[0] == scores[2]  # same ad, same user, same context
    assert body["missing"] == {"user": False, "ads": []}
    assert body["degraded"] is False


def test_unknown_user_and_ads_score_on_defaults(client: httpx.Client) -> None:
    response = client.post(
        "/v1/score",
        json={"user_id": "stranger", "candidates": [{"ad_id": "a1"}, {"ad_id": "new-ad"}]},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["missing"] == {"user": True, "ads": ["new-ad"]}
    assert all(0 < s < 1 for s in body["scores"]) and body["degraded"] is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"candidates": [{"ad_id": "a1"}]}', "user_id"),
        (b'{"user_id": 7, "candidates": [{"ad_id": "a1"}]}', "user_id"),
        (b'{"user_id": "u1"}', "candidates"),
        (b'{"user_id": "u1", "candidates": []}', "candidates"),
        (b'{"user_id": "u1", "candidates": "a1"}', "candidates"),
        (b'{"user_id": "u1", "candidates": [{"ad_id": "a1"}, {"id": 1}]}', "candidates[1].ad_id"),
        (b'{"user_id": "u1", "candidates": [{"ad_id": 5}]}', "candidates[0].ad_id"),
        (VALID + b', "context": {"device": true}}', "context.device"),
        (VALID + b', "context": {"hour": 1.5}}', "context.hour"),
        (VALID + b', "timeout_ms": -1}', "timeout_ms"),
    ],
)
def test_client_mistakes_are_422_naming_the_field(
    client: httpx.Client, body: bytes, field: str
) -> None:
    response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    message = _error(response, 422, "invalid_request")
    assert message.startswith(f"{field}:"), message


def test_too_many_candidates_is_413(client: httpx.Client, service: RunningService) -> None:
    limit = service.settings.max_candidates
    candidates = [{"ad_id": f"a{i}"} for i in range(limit + 1)]
    message = _error(
        client.post("/v1/score", json={"user_id": "u1", "candidates": candidates}),
        413,
        "payload_too_large",
    )
    assert str(limit) in message
    at_limit = client.post("/v1/score", json={"user_id": "u1", "candidates": candidates[:limit]})
    assert at_limit.status_code == 200 and len(at_limit.json()["scores"]) == limit


def test_too_large_a_body_is_413(client: httpx.Client, service: RunningService) -> None:
    padding = "x" * service.settings.max_body_bytes
    response = client.post(
        "/v1/score", json={"user_id": "u1", "candidates": [{"ad_id": "a1", "pad": padding}]}
    )
    assert "limit" in _error(response, 413, "payload_too_large")


def test_unknown_route_and_wrong_method_answer_json(client: httpx.Client) -> None:
    _error(client.get("/v2/nothing"), 404, "not_found")
    _error(client.get("/v1/score"), 405, "method_not_allowed")


def test_openapi_documents_the_score_body(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/score"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"user_id", "candidates"}
    assert {"200", "413", "422", "503"} <= set(operation["responses"])


def test_a_body_that_is_not_json_is_422_on_every_route(client: httpx.Client) -> None:
    for body in (b"{not json", b"\xff\xfe{"):  # bad JSON, and bytes that are not even UTF-8
        response = client.post(
            "/v1/models/pcvr/activate",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422, body
        assert response.json()["error"]["code"] == "invalid_request"
        assert response.json()["error"]["message"].startswith("body")


def test_405_names_every_method_the_path_accepts(client: httpx.Client) -> None:
    response = client.request("OPTIONS", "/v1/models/pcvr/canary")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, PUT"


def test_model_names_outside_the_allowed_characters_are_422(client: httpx.Client) -> None:
    response = client.get("/v1/models/..%2Fetc")
    assert response.status_code in (404, 422)
    response = client.get("/v1/models/bad name!")
    assert response.status_code == 422
    assert "name" in response.json()["error"]["message"]


def test_the_switch_interval_holds_while_serving_and_is_restored_after(
    trained: TrainedFixture,
) -> None:
    before = sys.getswitchinterval()
    with serving(trained, switch_interval_us=300) as running:
        assert sys.getswitchinterval() == pytest.approx(300e-6)
        assert httpx.get(f"{running.url}/healthz", timeout=10).status_code == 200
    assert sys.getswitchinterval() == pytest.approx(before, abs=2e-6)  # kept in whole µs
