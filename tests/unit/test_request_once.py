"""RequestOnceDCN: the same logits as the DCNv2 it comes from, with the request part once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feature_client.assembly import ModelInputs, concatenate_inputs
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from models.dcn import DCNConfig, DCNv2
from models.export import export_onnx
from models.request_once import RequestOnceDCN, random_rows, request_shaped
from service.runtime import OnnxModelRuntime
from tests.fixtures import tiny_spec

CONFIGS = [
    DCNConfig(embedding_dim=4, cross_layers=3, mlp_layers=(16, 8)),
    DCNConfig(embedding_dim=4, cross_layers=2, mlp_layers=(8,), cross_rank=3),
    DCNConfig(embedding_dim=4, cross_layers=1, mlp_layers=(16, 8, 4), cross_rank=5),
]


def _model(spec: FeatureSpec, config: DCNConfig, seed: int = 0) -> DCNv2:
    torch.manual_seed(seed)
    dense = len(spec.dense_names)
    rng = np.random.default_rng(seed)
    model = DCNv2(
        spec.cardinalities,
        rng.normal(size=dense).astype(np.float32),
        rng.uniform(0.5, 2.0, size=dense).astype(np.float32),
        config,
    )
    with torch.no_grad():  # trained-looking weights: every block matters to the logit
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def _logits(model: torch.nn.Module, inputs: ModelInputs) -> np.ndarray:
    with torch.no_grad():
        out: torch.Tensor = model(torch.from_numpy(inputs.dense), torch.from_numpy(inputs.ids))
    return out.numpy()


def _requests(model: DCNv2, spec: FeatureSpec, sizes: list[int], seed: int) -> ModelInputs:
    """Requests of `sizes` candidates, one after another, as the service lays them out."""
    parts = []
    for i, size in enumerate(sizes):
        rows = random_rows(model, spec, size, seed=seed + i)
        parts.append(request_shaped(rows, spec, size))
    return concatenate_inputs(parts)


@pytest.mark.parametrize("config", CONFIGS, ids=["full-rank", "rank-3", "rank-5-one-cross"])
def test_request_once_equals_the_source_model(config: DCNConfig) -> None:
    spec = tiny_spec()
    model = _model(spec, config)
    once = RequestOnceDCN(model, spec).eval()
    requests = _requests(model, spec, [7, 1, 30, 2], seed=3)
    unrelated = random_rows(model, spec, 40, seed=9)  # every row its own request
    for inputs in (requests, unrelated, concatenate_inputs([unrelated, requests])):
        expected = _logits(model, inputs)
        assert np.abs(expected).max() > 0.5  # not a model that outputs ~0 everywhere
        np.testing.assert_allclose(_logits(once, inputs), expected, rtol=0, atol=1e-5)


def test_each_request_part_is_computed_once_per_request() -> None:
    spec = tiny_spec()
    model = _model(spec, CONFIGS[0])
    once = RequestOnceDCN(model, spec).eval()
    inputs = _requests(model, spec, [5, 1, 7], seed=1)
    seen: list[int] = []
    hook = once.first_layers.request.register_forward_hook(
        lambda _module, args, _out: seen.append(args[0].shape[0])
    )
    try:
        _logits(once, inputs)
        _logits(once, random_rows(model, spec, 6, seed=2))
    finally:
        hook.remove()
    assert seen == [3, 6]  # three requests; six rows with six different users


def test_request_shaped_copies_only_user_and_context_columns() -> None:
    spec = tiny_spec()
    model = _model(spec, CONFIGS[0])
    rows = random_rows(model, spec, 8, seed=4)
    shaped = request_shaped(rows, spec, 4)
    ad_dense = [i for i, f in enumerate(spec.dense()) if f.source == "ad"]
    user_ids = [i for i, f in enumerate(spec.categorical()) if f.source == "user"]
    np.testing.assert_array_equal(shaped.dense[:, ad_dense], rows.dense[:, ad_dense])
    assert (shaped.ids[:4, user_ids] == rows.ids[0, user_ids]).all()
    assert (shaped.ids[4:, user_ids] == rows.ids[4, user_ids]).all()


def test_a_spec_without_ad_features_is_refused() -> None:
    spec = tiny_spec()
    users_only = FeatureSpec(1, tuple(f for f in spec.features if f.source != "ad"))
    model = _model(users_only, CONFIGS[0])
    with pytest.raises(ValueError, match="needs both request"):
        RequestOnceDCN(model, users_only)


def test_sources_without_dense_or_without_id_features_work() -> None:
    spec = FeatureSpec(
        1,
        (
            CategoricalFeature("user_id", "user", hash_buckets=64),  # no request dense
            DenseFeature("ad_price", "ad", default=2.0),  # no ad ids
            CategoricalFeature("device", "context", vocabulary=("ios", "android")),
        ),
    )
    model = _model(spec, CONFIGS[0])
    once = RequestOnceDCN(model, spec).eval()
    inputs = _requests(model, spec, [3, 4], seed=5)
    np.testing.assert_allclose(_logits(once, inputs), _logits(model, inputs), rtol=0, atol=1e-5)


def test_zero_rows_give_zero_logits_in_torch_and_the_service_runtime(tmp_path: Path) -> None:
    spec = tiny_spec()
    model = _model(spec, CONFIGS[1])
    once = RequestOnceDCN(model, spec).eval()
    rows = _requests(model, spec, [5, 3], seed=6)
    empty = ModelInputs(rows.dense[:0], rows.ids[:0])
    assert _logits(once, empty).shape == (0,)
    export_onnx(once, rows, tmp_path / "model.onnx")
    runtime = OnnxModelRuntime(tmp_path / "model.onnx")
    assert runtime.predict(empty).shape == (0,)
    np.testing.assert_allclose(runtime.predict(rows), _logits(model, rows), rtol=0, atol=1e-5)
