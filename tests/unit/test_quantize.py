"""The graph rewrite before int8 quantization, variant names and their arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.variants import target_lines
from models.dcn import DCNConfig
from models.pipeline import variant_name
from models.quantize import gemm_to_matmul, quantize_int8, single_column_matmuls


def _two_layer_model(alpha: float = 1.0) -> onnx.ModelProto:
    """x [batch, 6] -> Gemm(transB) -> Relu -> Gemm(no transB, no bias) -> [batch, 1]."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 6)).astype(np.float32)  # [out, in]: transB=1, as torch writes it
    b1 = rng.normal(size=4).astype(np.float32)
    w2 = rng.normal(size=(4, 1)).astype(np.float32)  # [in, out]: transB=0
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "hidden", transB=1, alpha=alpha),
            helper.make_node("Relu", ["h"], ["r"], "relu"),
            helper.make_node("Gemm", ["r", "w2"], ["y"], "head"),
        ],
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    return np.asarray(y)


def test_gemm_becomes_matmul_plus_add_with_the_same_outputs() -> None:
    model = _two_layer_model()
    rewritten = gemm_to_matmul(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]
    assert model.graph.node[0].op_type == "Gemm"  # the input is left alone
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-6, atol=1e-6)
    # The output keeps its name, so the service finds it.
    assert rewritten.graph.output[0].name == "y"


def test_a_gemm_that_is_not_a_linear_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="not a plain linear layer"):
        gemm_to_matmul(_two_layer_model(alpha=2.0))


def test_only_one_column_matmuls_are_kept_in_float(tmp_path: Path) -> None:
    rewritten = gemm_to_matmul(_two_layer_model())
    assert single_column_matmuls(rewritten) == ["head_mm"]
    source = tmp_path / "model.onnx"
    onnx.save(_two_layer_model(), str(source))
    quantize_int8(source, tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert "MatMulInteger" in ops and "MatMul" in ops  # hidden layer int8, head float


def test_multiply_adds_match_the_reference_model_and_shrink_with_rank() -> None:
    assert DCNConfig().multiply_adds(26, 13) == 703_400  # PERF.md: 0.70 M per candidate
    full, low = DCNConfig().multiply_adds(11, 6), DCNConfig(cross_rank=32).multiply_adds(11, 6)
    assert full - low == 3 * (182 * 182 - 2 * 182 * 32)
    narrow = DCNConfig(mlp_layers=(128, 64)).multiply_adds(11, 6)
    assert full - narrow == (182 * 256 + 256 * 128 + 128 * 64 + 64) - (182 * 128 + 128 * 64 + 64)


def test_variant_names() -> None:
    assert variant_name(DCNConfig(), "none") == "dcn-v2"
    assert variant_name(DCNConfig(cross_rank=64), "int8") == "dcn-v2-r64-int8"
    narrow = DCNConfig(cross_rank=32, mlp_layers=(128, 64))
    assert variant_name(narrow, "none") == "dcn-v2-r32-mlp128x64"


def test_targets_need_speed_auc_and_calibration_together() -> None:
    def row(name: str, speedup: float, auc: float, ece: float) -> dict[str, object]:
        return {
            "variant": name,
            "init_seed": 0,
            "speedup": speedup,
            "auc_delta": auc,
            "calibration_error_delta": ece,
            "batch_parity_max_abs_probability_diff": None,
        }

    rows = [
        row("base", 1.0, 0.0, 0.0),
        row("fast-but-worse", 2.5, -0.002, 0.0),
        row("fast-but-miscalibrated", 2.5, 0.0, 0.003),
        row("good", 2.1, -0.0005, 0.001),
        row("fastest", 3.6, -0.0025, 0.01),
    ]
    first, second = target_lines(rows, None)
    assert first.endswith("met by good")
    assert second.endswith("met by fastest")
