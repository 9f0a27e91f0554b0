"""OnnxModelRuntime on the committed demo model, and the CUDA -> CPU fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from feature_client.assembly import ModelInputs
from service.repository import ModelRepository
from service.runtime import CPU, CUDA, OnnxModelRuntime, choose_providers

DEMO = ModelRepository(Path(__file__).parents[2] / "demo" / "model_repository")


def _demo_model_path() -> Path:
    return DEMO.model_path("pcvr", DEMO.active_version("pcvr"))


def test_choose_providers() -> None:
    assert choose_providers("cpu", [CUDA, CPU]) == ([CPU], None)
    assert choose_providers("cuda", [CUDA, CPU]) == ([CUDA, CPU], None)
    providers, warning = choose_providers("cuda", [CPU])
    assert providers == [CPU]
    assert warning is not None and "falling back to CPU" in warning


def test_cuda_request_falls_back_to_cpu_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adscore.runtime"):
        runtime = OnnxModelRuntime(_demo_model_path(), execution_provider="cuda")
    warnings = [r for r in caplog.records if r.name == "adscore.runtime"]
    if CUDA in ort.get_available_providers():  # on a GPU machine the provider must be used
        assert runtime.provider == CUDA
    else:
        assert runtime.provider == CPU
        assert len(warnings) == 1 and "falling back to CPU" in warnings[0].getMessage()
    metadata = DEMO.read_metadata("pcvr", DEMO.active_version("pcvr"))
    golden = metadata.golden
    logits = runtime.predict(
        ModelInputs(np.asarray(golden.dense, np.float32), np.asarray(golden.ids, np.int64))
    )
    np.testing.assert_allclose(
        metadata.calibration.apply(logits), golden.probabilities, atol=golden.tolerance
    )


def test_any_batch_size_is_accepted() -> None:
    runtime = OnnxModelRuntime(_demo_model_path())
    inputs, outputs = runtime.signature()
    assert inputs["dense"][1][0] == inputs["ids"][1][0]  # one symbolic batch axis
    width_dense, width_ids = inputs["dense"][1][1], inputs["ids"][1][1]
    for rows in (1, 3, 300):
        dense = np.zeros((rows, int(width_dense)), np.float32)
        ids = np.zeros((rows, int(width_ids)), np.int64)
        assert runtime.predict(ModelInputs(dense, ids)).shape == (rows,)
    assert outputs == ["logit"]
