"""Open Inference Protocol v2 against a live adscore, driven by Triton's own client."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from feature_client.assembly import ModelInputs, assemble_inputs, context_blocks
from service.app import create_app
from service.settings import Settings
from tests.app.conftest import RunningService
from tests.app.lifecycle_support import Setup
from tests.fixtures import LiveServer, publish_variant

CONTEXT: dict[str, str | int | float] = {"device": "ios", "hour": 9, "placement": "feed"}


def _case(service: RunningService, n: int = 24) -> tuple[dict[str, Any], ModelInputs]:
    """A /v1/score body and the raw tensors the model sees for it."""
    world = service.world
    user, ads = 3, np.arange(10, 10 + n)
    context_dense, context_ids = context_blocks(world.spec, CONTEXT)
    inputs = assemble_inputs(
        n,
        [world.users.dense[[user]], world.ads.dense[ads], context_dense],
        [world.users.ids[[user]], world.ads.ids[ads], context_ids],
    )
    body = {
        "user_id": world.users.keys[user],
        "context": CONTEXT,
        "candidates": [{"ad_id": world.ads.keys[a]} for a in ads],
    }
    return body, inputs


@pytest.fixture
def client(service: RunningService) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=service.url.removeprefix("http://"))


def test_triton_client_sees_a_live_ready_server_and_model(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("pcvr")
    assert client.is_model_ready("pcvr", "1")
    assert not client.is_model_ready("nope")
    metadata = client.get_model_metadata("pcvr")
    assert [i["name"] for i in metadata["inputs"]] == ["dense", "ids"]
    assert {o["name"] for o in metadata["outputs"]} == {"logit", "probability"}
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_the_scoring_endpoint(
    service: RunningService, client: triton.InferenceServerClient, binary: bool
) -> None:
    body, inputs = _case(service)
    dense = triton.InferInput("dense", list(inputs.dense.shape), "FP32")
    dense.set_data_from_numpy(inputs.dense, binary_data=binary)
    ids = triton.InferInput("ids", list(inputs.ids.shape), "INT64")
    ids.set_data_from_numpy(inputs.ids.astype(np.int64), binary_data=binary)
    outputs = [triton.InferRequestedOutput("probability", binary_data=binary)]
    result = client.infer("pcvr", [dense, ids], outputs=outputs, request_id="req-7")
    probabilities = result.as_numpy("probability")
    assert probabilities is not None and probabilities.shape == (len(inputs.dense),)
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_version"] == "1"
    scored = httpx.post(f"{service.url}/v1/score", json=body).json()["scores"]
    np.testing.assert_allclose(probabilities, scored, rtol=0, atol=1e-6)


def _post(service: RunningService, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{service.url}/v2/models/pcvr/infer", content=content, headers=headers)


def _json_inputs(inputs: ModelInputs) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "dense", "shape": list(inputs.dense.shape), "datatype": "FP32",
             "data": inputs.dense.tolist()},
            {"name": "ids", "shape": list(inputs.ids.shape), "datatype": "INT64",
             "data": inputs.ids.reshape(-1).tolist()},
        ]
    }  # fmt: skip


def test_gzip_bodies_and_all_outputs_by_default(service: RunningService) -> None:
    _, inputs = _case(service, n=4)
    response = _post(
        service, gzip.compress(orjson.dumps(_json_inputs(inputs))), **{"content-encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert set(outputs) == {"logit", "probability"}
    logits = np.asarray(outputs["logit"]["data"])
    probabilities = np.asarray(outputs["probability"]["data"])
    assert np.all((probabilities > 0) & (probabilities < 1)) and len(logits) == 4


def _binary(inputs: ModelInputs) -> tuple[dict[str, Any], bytes]:
    dense, ids = inputs.dense.tobytes(), inputs.ids.astype(np.int64).tobytes()
    header = {
        "inputs": [
            {"name": "dense", "shape": list(inputs.dense.shape), "datatype": "FP32",
             "parameters": {"binary_data_size": len(dense)}},
            {"name": "ids", "shape": list(inputs.ids.shape), "datatype": "INT64",
             "parameters": {"binary_data_size": len(ids)}},
        ]
    }  # fmt: skip
    return header, dense + ids


def _mutate(inputs: ModelInputs, how: str) -> tuple[bytes, dict[str, str]]:
    header, blob = _binary(inputs)
    if how == "shape vs data":
        body = _json_inputs(inputs)
        body["inputs"][0]["shape"] = [inputs.dense.shape[0] + 1, inputs.dense.shape[1]]
        return orjson.dumps(body), {}
    if how == "unknown input":
        body = _json_inputs(inputs)
        body["inputs"][1]["name"] = "sparse"
        return orjson.dumps(body), {}
    if how == "wrong datatype":
        body = _json_inputs(inputs)
        body["inputs"][0]["datatype"] = "BYTES"
        return orjson.dumps(body), {}
    if how == "id out of range":
        body = _json_inputs(inputs)
        body["inputs"][1]["data"][0] = 10**9
        return orjson.dumps(body), {}
    head = orjson.dumps(header)
    if how == "truncated binary":
        return head + blob[:-5], {"Inference-Header-Content-Length": str(len(head))}
    assert how == "lying header length"
    return head + blob, {"Inference-Header-Content-Length": str(len(head) + len(blob) + 10)}


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("shape vs data", "values for shape"),
        ("unknown input", "unknown ['sparse']"),
        ("wrong datatype", "datatype 'BYTES' is not supported"),
        ("id out of range", "is outside [0,"),
        ("truncated binary", "binary data is truncated"),
        ("lying header length", "does not fit a body"),
    ],
)
def test_malformed_requests_are_400_with_the_reason(
    service: RunningService, how: str, message: str
) -> None:
    _, inputs = _case(service, n=3)
    content, headers = _mutate(inputs, how)
    response = _post(service, content, **headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def _probabilities(response: httpx.Response) -> npt.NDArray[np.float64]:
    length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:length])
    (output,) = header["outputs"]
    assert output["parameters"]["binary_data_size"] == len(response.content) - length
    return np.frombuffer(response.content[length:], dtype="<f8")


def test_binary_replies_follow_the_json_header(service: RunningService) -> None:
    _, inputs = _case(service, n=5)
    header, blob = _binary(inputs)
    header["outputs"] = [{"name": "probability", "parameters": {"binary_data": True}}]
    head = orjson.dumps(header)
    response = _post(service, head + blob, **{"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 200, response.text
    probabilities = _probabilities(response)
    assert probabilities.shape == (5,) and np.all((probabilities > 0) & (probabilities < 1))


@pytest.fixture
def secured(setup: Setup) -> Iterator[tuple[triton.InferenceServerClient, Setup]]:
    server = LiveServer(create_app(Settings(**setup.settings())))  # type: ignore[arg-type]
    server.start()
    try:
        yield triton.InferenceServerClient(url=server.url.removeprefix("http://")), setup
    finally:
        server.stop()


def test_repository_extension_loads_and_unloads_with_the_admin_role(
    secured: tuple[triton.InferenceServerClient, Setup],
) -> None:
    client, setup = secured
    admin, scorer = setup.auth("ml-admin"), setup.auth("ad-server")
    tenant_model = f"{setup.name}-acme"
    publish_variant(setup.repository, tenant_model, (setup.name, 1), 1.0, activate=True)

    index = {m["name"]: m for m in client.get_model_repository_index(headers=admin)}
    assert index[setup.name]["state"] == "READY"
    assert index[tenant_model]["state"] == "UNAVAILABLE"

    for headers, status in ((scorer, "403"), ({}, "401")):
        with pytest.raises(InferenceServerException) as refused:
            client.load_model(tenant_model, headers=headers)
        assert status in str(refused.value.status())
    assert not client.is_model_ready(tenant_model, headers=scorer)

    client.load_model(tenant_model, headers=admin)
    assert client.is_model_ready(tenant_model, headers=scorer)
    config = client.get_model_config(tenant_model, headers=scorer)
    assert config["max_batch_size"] > 0 and config["input"][0]["name"] == "dense"
    client.unload_model(tenant_model, headers=admin)
    assert not client.is_model_ready(tenant_model, headers=scorer)
    with pytest.raises(InferenceServerException, match="default model"):
        client.unload_model(setup.name, headers=admin)


def test_statistics_count_what_was_scored(
    service: RunningService, client: triton.InferenceServerClient
) -> None:
    def stats() -> dict[str, Any]:
        (entry,) = client.get_inference_statistics("pcvr")["model_stats"]
        assert isinstance(entry, dict)
        return entry

    before = stats()
    _, inputs = _case(service, n=7)
    dense = triton.InferInput("dense", list(inputs.dense.shape), "FP32")
    dense.set_data_from_numpy(inputs.dense)
    ids = triton.InferInput("ids", list(inputs.ids.shape), "INT64")
    ids.set_data_from_numpy(inputs.ids.astype(np.int64))
    client.infer("pcvr", [dense, ids])
    after = stats()
    assert after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 7
    assert after["execution_count"] - before["execution_count"] == 1
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
