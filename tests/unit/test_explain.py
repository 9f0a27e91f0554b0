"""Explanations by occlusion, through the scoring pipeline with a real onnxruntime session of a
hand-built model whose dependence on its inputs is known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from feature_client.assembly import ModelInputs
from feature_client.codec import EntityCodec
from feature_client.memory_store import InMemoryFeatureStore
from service.errors import InvalidRequest, PayloadTooLarge
from service.explain import contributions, occlude, top_contributions
from service.metrics import Metrics
from service.registry import LoadedModel
from service.routing import ServingPlan, SinglePlanRouter
from service.runtime import OnnxModelRuntime
from service.schemas import RequestLimits, parse_score_request
from service.scoring import ScoreRequest, ScoringPipeline
from service.settings import Settings
from tests.fixtures import metadata_for, tiny_spec

SPEC = tiny_spec()  # dense: user_activity, ad_price; ids: user_id, ad_id, device, hour
PRICE_WEIGHT, IOS_WEIGHT, BIAS = 1.5, 2.0, -4.0
DEVICE_COLUMN, IOS = 2, 1


def price_and_device_model(path: Path) -> Path:
    """logit = 1.5 * ad_price + 2 * (device == ios) - 4: nothing else matters."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["dense", "w"], ["linear"]),
            helper.make_node("Gather", ["ids", "device_column"], ["device"], axis=1),
            helper.make_node("Equal", ["device", "ios"], ["is_ios"]),
            helper.make_node("Cast", ["is_ios"], ["ios_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["ios_float", "ios_weight"], ["ios_term"]),
            helper.make_node("Add", ["linear", "ios_term"], ["sum"]),
            helper.make_node("Add", ["sum", "bias"], ["logit"]),
        ],
        "price_and_device",
        [
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch"])],
        [
            numpy_helper.from_array(np.array([0.0, PRICE_WEIGHT], dtype=np.float32), "w"),
            numpy_helper.from_array(np.array(DEVICE_COLUMN, dtype=np.int64), "device_column"),
            numpy_helper.from_array(np.array(IOS, dtype=np.int64), "ios"),
            numpy_helper.from_array(np.array(IOS_WEIGHT, dtype=np.float32), "ios_weight"),
            numpy_helper.from_array(np.array(BIAS, dtype=np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def sigmoid(z: float) -> float:
    return float(1 / (1 + np.exp(-z)))


async def pipeline(tmp_path: Path, **settings: object) -> ScoringPipeline:
    store = InMemoryFeatureStore()
    user = EntityCodec(SPEC, "user").encode(
        np.array([[3.0]], dtype=np.float32), np.array([[7]], dtype=np.int32)
    )
    ads = EntityCodec(SPEC, "ad").encode(
        np.array([[1.0], [4.0]], dtype=np.float32), np.array([[11], [12]], dtype=np.int32)
    )
    await store.write(
        [
            (store.keys.user("u1"), user[0]),
            (store.keys.ad("a1"), ads[0]),
            (store.keys.ad("a2"), ads[1]),
        ]
    )
    runtime = OnnxModelRuntime(price_and_device_model(tmp_path / "model.onnx"))
    model = LoadedModel.assemble(metadata_for(SPEC), runtime)
    return ScoringPipeline(
        SinglePlanRouter(ServingPlan("pcvr", model)),
        store,
        Metrics(CollectorRegistry()),
        Settings(**settings),  # type: ignore[arg-type]
    )


async def test_explanations_name_the_features_the_model_depends_on(tmp_path: Path) -> None:
    scoring = await pipeline(tmp_path)
    request = ScoreRequest(
        "u1", ["a1", "a2", "ghost"], {"device": "ios", "hour": 14}, explain=True, explain_top_k=2
    )
    result = await scoring.score(request)
    plain = await scoring.score(ScoreRequest("u1", ["a1", "a2", "ghost"], request.context))
    scoring.close()
    np.testing.assert_allclose(result.scores, plain.scores, atol=1e-7)
    assert result.explanations is not None
    by_ad = {e["ad_id"]: e["contributions"] for e in result.explanations}
    assert list(by_ad) == ["a1", "a2", "ghost"]
    for ad_id, price in (("a1", 1.0), ("a2", 4.0)):
        full = PRICE_WEIGHT * price + IOS_WEIGHT + BIAS
        expected = {
            "ad_price": sigmoid(full) - sigmoid(full - PRICE_WEIGHT * (price - 2.0)),
            "device": sigmoid(full) - sigmoid(full - IOS_WEIGHT),
        }
        got = {c["feature"]: c["contribution"] for c in by_ad[ad_id]}
        assert got.keys() == expected.keys()
        for feature, value in expected.items():
            assert got[feature] == pytest.approx(value, abs=1e-6)
        magnitudes = [abs(c["contribution"]) for c in by_ad[ad_id]]
        assert magnitudes == sorted(magnitudes, reverse=True)
    # The unknown ad already holds the default price: only the device moved its score.
    ghost = by_ad["ghost"]
    assert ghost[0]["feature"] == "device"
    assert ghost[1]["contribution"] == 0.0


async def test_features_the_model_ignores_contribute_exactly_nothing(tmp_path: Path) -> None:
    scoring = await pipeline(tmp_path)
    request = ScoreRequest("u1", ["a1", "a2"], {"device": "android"}, explain=True, explain_top_k=6)
    result = await scoring.score(request)
    scoring.close()
    assert result.explanations is not None
    for explanation in result.explanations:
        got = {c["feature"]: c["contribution"] for c in explanation["contributions"]}
        assert len(got) == 6
        assert {f for f, v in got.items() if v != 0.0} == {"ad_price"}


async def test_without_explain_the_answer_has_no_explanations(tmp_path: Path) -> None:
    scoring = await pipeline(tmp_path)
    result = await scoring.score(ScoreRequest("u1", ["a1"], {}))
    scoring.close()
    assert result.explanations is None and "explanations" not in result.to_json()


def test_occlusion_layout_and_arithmetic() -> None:
    inputs = ModelInputs(
        np.array([[3.0, 1.0], [3.0, 4.0]], dtype=np.float32),
        np.array([[7, 11, 1, 15], [7, 12, 1, 15]], dtype=np.int64),
    )
    occlusion = occlude(SPEC, inputs)
    assert occlusion.features == ["user_activity", "ad_price", "user_id", "ad_id", "device", "hour"]
    assert len(occlusion.inputs) == 2 * 7
    np.testing.assert_array_equal(occlusion.inputs.dense[:2], inputs.dense)
    np.testing.assert_array_equal(occlusion.inputs.dense[2:4, 0], [0.5, 0.5])  # user default
    np.testing.assert_array_equal(occlusion.inputs.dense[4:6, 1], [2.0, 2.0])  # ad default
    np.testing.assert_array_equal(occlusion.inputs.ids[10:12, 2], [0, 0])  # device unknown
    np.testing.assert_array_equal(occlusion.inputs.ids[10:12, [0, 1, 3]], inputs.ids[:, [0, 1, 3]])
    scores, table = contributions(np.arange(14, dtype=np.float64), 2)
    np.testing.assert_array_equal(scores, [0, 1])
    np.testing.assert_array_equal(table[:, 0], [0 - 2, 1 - 3])
    top = top_contributions(["x", "y"], ["a"], np.array([[0.1, -0.3]]), top_k=5)
    assert top == [
        {
            "ad_id": "a",
            "contributions": [
                {"feature": "y", "contribution": -0.3},
                {"feature": "x", "contribution": 0.1},
            ],
        }
    ]


LIMITS = RequestLimits(max_candidates=100, max_id_length=16, max_explain_candidates=2)


def body(**fields: object) -> bytes:
    import orjson

    return orjson.dumps({"user_id": "u1", "candidates": [{"ad_id": "a1"}], **fields})


def test_explain_is_parsed_and_checked() -> None:
    assert parse_score_request(body(), LIMITS).explain is False
    request = parse_score_request(body(explain=True, explain_top_k=3), LIMITS)
    assert (request.explain, request.explain_top_k) == (True, 3)
    with pytest.raises(InvalidRequest, match="explain: expected true or false"):
        parse_score_request(body(explain="yes"), LIMITS)
    for bad in (0, 65, 2.5, True):
        with pytest.raises(InvalidRequest, match="explain_top_k"):
            parse_score_request(body(explain=True, explain_top_k=bad), LIMITS)
    three = [{"ad_id": f"a{i}"} for i in range(3)]
    with pytest.raises(
        PayloadTooLarge, match="3 candidates to explain, the limit with explain is 2"
    ):
        parse_score_request(body(candidates=three, explain=True), LIMITS)
    assert len(parse_score_request(body(candidates=three), LIMITS).ad_ids) == 3
