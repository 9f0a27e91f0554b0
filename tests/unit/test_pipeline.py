"""ScoringPipeline with the in-process store and a linear model double."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from feature_client.assembly import ModelInputs
from feature_client.codec import EntityCodec
from feature_client.memory_store import InMemoryFeatureStore
from feature_client.store import FeatureStoreUnavailable, RawFeatures
from service.errors import FeaturesUnavailable, InvalidRequest
from service.metrics import Metrics
from service.registry import LoadedModel
from service.routing import ServingPlan, SinglePlanRouter
from service.scoring import ScoreRequest, ScoringPipeline
from service.settings import Settings
from tests.fixtures import LinearRuntime, metadata_for, tiny_spec

SPEC = tiny_spec()


class FailingStore(InMemoryFeatureStore):
    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        raise FeatureStoreUnavailable("connection refused")


async def _stored(store: InMemoryFeatureStore) -> None:
    users = EntityCodec(SPEC, "user").encode(
        np.array([[3.0]], dtype=np.float32), np.array([[7]], dtype=np.int32)
    )
    ads = EntityCodec(SPEC, "ad").encode(
        np.array([[1.0], [4.0]], dtype=np.float32), np.array([[11], [12]], dtype=np.int32)
    )
    await store.write(
        [
            (store.keys.user("u1"), users[0]),
            (store.keys.ad("a1"), ads[0]),
            (store.keys.ad("a2"), ads[1]),
        ]
    )


def _pipeline(
    store: InMemoryFeatureStore, runtime: LinearRuntime, **settings: object
) -> tuple[ScoringPipeline, Metrics]:
    router = SinglePlanRouter(
        ServingPlan("pcvr", LoadedModel.assemble(metadata_for(SPEC), runtime))
    )
    metrics = Metrics(CollectorRegistry())
    return ScoringPipeline(router, store, metrics, Settings(**settings)), metrics  # type: ignore[arg-type]


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.parametrize("max_batch_rows", [256, 1], ids=["batch layout", "loop layout"])
async def test_scores_follow_candidate_order_and_use_stored_features(max_batch_rows: int) -> None:
    store = InMemoryFeatureStore()
    await _stored(store)
    runtime = LinearRuntime()
    pipeline, _ = _pipeline(store, runtime, max_batch_rows=max_batch_rows)
    result = await pipeline.score(
        ScoreRequest("u1", ["a2", "a1"], {"device": "android", "hour": 14}, request_id="r-9")
    )
    (inputs,) = runtime.calls
    # dense = [user_activity, ad_price]; ids = [user_id, ad_id, device, hour]
    np.testing.assert_array_equal(inputs.dense, [[3.0, 4.0], [3.0, 1.0]])
    np.testing.assert_array_equal(inputs.ids, [[7, 12, 2, 15], [7, 11, 2, 15]])
    expected = 1 / (1 + np.exp(-(0.1 * inputs.dense.sum(1) + 0.01 * inputs.ids.sum(1))))
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6)
    assert result.request_id == "r-9"
    assert (result.model, result.model_version) == ("pcvr", 1)
    assert not result.missing_user and result.missing_ads == [] and not result.degraded


@pytest.mark.parametrize("max_batch_rows", [256, 1], ids=["batch layout", "loop layout"])
async def test_unknown_entities_take_defaults_and_are_reported(max_batch_rows: int) -> None:
    store = InMemoryFeatureStore()
    await _stored(store)
    runtime = LinearRuntime()
    pipeline, metrics = _pipeline(store, runtime, max_batch_rows=max_batch_rows)
    result = await pipeline.score(ScoreRequest("nobody", ["a1", "ghost", "a2", "ghost2"], {}))
    assert result.missing_user
    assert result.missing_ads == ["ghost", "ghost2"]
    (inputs,) = runtime.calls
    np.testing.assert_array_equal(inputs.dense[:, 0], [0.5] * 4)  # user default
    np.testing.assert_array_equal(inputs.dense[[1, 3], 1], [2.0, 2.0])  # ad default
    np.testing.assert_array_equal(inputs.ids[[1, 3], 1], [0, 0])
    assert _sample(metrics, "adscore_missing_features_total", entity="user") == 1
    assert _sample(metrics, "adscore_missing_features_total", entity="ad") == 2
    assert _sample(metrics, "adscore_candidates_per_request_count") == 1


@pytest.mark.parametrize("max_batch_rows", [256, 1], ids=["batch layout", "loop layout"])
async def test_values_of_another_schema_are_refused_and_counted(max_batch_rows: int) -> None:
    store = InMemoryFeatureStore()
    other = EntityCodec(tiny_spec(schema_version=2), "ad").encode(
        np.array([[9.0]], dtype=np.float32), np.array([[5]], dtype=np.int32)
    )
    await store.write([(store.keys.ad("a1"), other[0])])
    pipeline, metrics = _pipeline(store, LinearRuntime(), max_batch_rows=max_batch_rows)
    result = await pipeline.score(ScoreRequest("u1", ["a1"], {}))
    assert result.missing_ads == ["a1"]
    assert _sample(metrics, "adscore_rejected_feature_values_total", entity="ad") == 1


@pytest.mark.parametrize("max_batch_rows", [256, 1], ids=["batch layout", "loop layout"])
async def test_store_failure_degrades_to_defaults(max_batch_rows: int) -> None:
    pipeline, metrics = _pipeline(FailingStore(), LinearRuntime(), max_batch_rows=max_batch_rows)
    result = await pipeline.score(ScoreRequest("u1", ["a1", "a2"], {}))
    assert result.degraded
    assert len(result.scores) == 2 and np.all((result.scores > 0) & (result.scores < 1))
    assert _sample(metrics, "adscore_degraded_responses_total", reason="unavailable") == 1


async def test_store_failure_fails_under_the_fail_policy() -> None:
    pipeline, _ = _pipeline(FailingStore(), LinearRuntime(), on_feature_store_error="fail")
    with pytest.raises(FeaturesUnavailable, match="connection refused"):
        await pipeline.score(ScoreRequest("u1", ["a1"], {}))


async def test_invalid_context_names_the_field_before_any_fetch() -> None:
    runtime = LinearRuntime()
    pipeline, _ = _pipeline(FailingStore(), runtime)
    with pytest.raises(InvalidRequest, match=r"^context\.device: "):
        await pipeline.score(ScoreRequest("u1", ["a1"], {"device": 1.5}))
    assert runtime.calls == []


async def test_every_stage_is_timed() -> None:
    store = InMemoryFeatureStore()
    pipeline, metrics = _pipeline(store, LinearRuntime())
    await pipeline.score(ScoreRequest("u1", ["a1"], {}))
    for stage in ("feature_fetch", "input_assembly", "inference"):
        assert _sample(metrics, "adscore_stage_duration_seconds_count", stage=stage) == 1


class ShiftedRuntime(LinearRuntime):
    """Another version: the same logits plus one."""

    def predict(self, inputs: ModelInputs) -> npt.NDArray[np.float32]:
        return super().predict(inputs) + np.float32(1.0)


async def test_shadow_scores_off_the_response_and_only_into_metrics() -> None:
    store = InMemoryFeatureStore()
    await _stored(store)
    active_runtime, shadow_runtime = LinearRuntime(), ShiftedRuntime()
    active = LoadedModel.assemble(metadata_for(SPEC, version=1), active_runtime)
    shadow = LoadedModel.assemble(metadata_for(SPEC, version=2), shadow_runtime)
    metrics = Metrics(CollectorRegistry())
    router = SinglePlanRouter(ServingPlan("pcvr", active, shadow=shadow))
    pipeline = ScoringPipeline(router, store, metrics, Settings())

    result = await pipeline.score(ScoreRequest("u1", ["a1", "a2"], {}))
    await pipeline.shadow.drain()

    assert result.model_version == 1 and result.role == "active"
    np.testing.assert_array_equal(shadow_runtime.calls[0].dense, active_runtime.calls[0].dense)
    shadow_scores = 1 / (1 + np.exp(-(active_runtime.predict(active_runtime.calls[0]) + 1.0)))
    labels = {"model": "pcvr", "version": "2", "role": "shadow"}
    assert _sample(metrics, "adscore_scored_candidates_total", **labels) == 2
    assert _sample(metrics, "adscore_predicted_pcvr_sum_total", **labels) == pytest.approx(
        float(shadow_scores.sum()), rel=1e-5
    )
    difference = float(np.abs(shadow_scores - result.scores).mean())
    assert _sample(metrics, "adscore_shadow_abs_difference_sum", model="pcvr") == pytest.approx(
        difference, rel=1e-5
    )


async def test_a_full_shadow_queue_drops_shadow_work_not_requests() -> None:
    store = InMemoryFeatureStore()
    active = LoadedModel.assemble(metadata_for(SPEC, version=1), LinearRuntime())
    shadow_runtime = ShiftedRuntime()
    shadow = LoadedModel.assemble(metadata_for(SPEC, version=2), shadow_runtime)
    metrics = Metrics(CollectorRegistry())
    router = SinglePlanRouter(ServingPlan("pcvr", active, shadow=shadow))
    pipeline = ScoringPipeline(router, store, metrics, Settings(shadow_max_pending=1))

    results = [await pipeline.score(ScoreRequest(f"u{i}", ["a1"], {})) for i in range(3)]
    await pipeline.shadow.drain()

    assert all(r.model_version == 1 for r in results)
    assert _sample(metrics, "adscore_shadow_dropped_total", model="pcvr") >= 1
    assert (
        len(shadow_runtime.calls) + _sample(metrics, "adscore_shadow_dropped_total", model="pcvr")
        == 3
    )
