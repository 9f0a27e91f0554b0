"""Dynamic int8 quantization of an exported ranking model: cheaper arithmetic on CPUs.

onnxruntime's `quantize_dynamic` covers MatMul but not Gemm, and the exporter writes every
nn.Linear as Gemm, so Gemm is first rewritten as MatMul + Add. Only MatMul weights become int8:
the embedding table (Gather) stays float32, since a gather does no arithmetic to save. Inputs,
outputs and their names are unchanged, so the service loads an int8 model like any other.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from feature_client.assembly import ModelInputs
from models.export import Parity, first_rows, onnx_logits, strip_build_paths
from service.calibration import Calibration

QUANTIZATIONS = ("none", "int8")
SINGLE_ROWS = 512
"""Rows scored one at a time by batch_parity (~0.1 ms each)."""


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with each Gemm(A, B, C) on a constant B written as MatMul(A, B') + C."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            attributes.get("transA", 0)
            or attributes.get("alpha", 1.0) != 1.0
            or attributes.get("beta", 1.0) != 1.0
            or node.input[1] not in initializers
        ):
            raise ValueError(f"Gemm node {node.name!r} is not a plain linear layer")
        weight = initializers[node.input[1]]
        if attributes.get("transB", 0):
            transposed = np.ascontiguousarray(numpy_helper.to_array(weight).T)
            weight.CopyFrom(numpy_helper.from_array(transposed, weight.name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], node.input[1]], [product], f"{node.name}_mm")
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], node.name)
            )
    del graph.node[:]
    graph.node.extend(nodes)
    # Shapes recorded for the old Gemm outputs may name the transposed weights: infer afresh.
    del graph.value_info[:]
    return model


def quantize_int8(source: Path, target: Path) -> None:
    """Write `source` with int8 MatMul weights and dynamically quantized activations.

    Weights use 7 bits (`reduce_range`): CPUs without VNNI multiply u8 x s8 pairs with
    vpmaddubsw, whose int16 sums saturate at the full 8-bit range (probabilities moved by up
    to 0.12 on such a CPU, against 0.03 at 7 bits); at 7 bits no sum saturates, so every x86
    CPU computes the same integers and the golden rows hold everywhere. Per-channel weight
    scales win back part of the lost bit. One-column MatMuls (the head) stay float32: they
    save no time, and quantizing the head put its rounding straight onto the logit (a row
    scored alone vs in a batch of 4096 moved by up to 0.04 in probability, 0.01 without).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = gemm_to_matmul(onnx.load(str(source)))
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = Path(tmp) / "matmul.onnx"
        onnx.save(model, str(rewritten))
        with _root_logger_at(logging.ERROR):
            quantize_dynamic(
                rewritten,
                target,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                reduce_range=True,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=single_column_matmuls(model),
            )
    strip_build_paths(target)


@contextmanager
def _root_logger_at(level: int) -> Iterator[None]:
    """The quantizer advises pre-processing on the root logger; this graph needs none."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


def single_column_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose constant weight has one output column."""
    widths = {t.name: t.dims[-1] for t in model.graph.initializer if len(t.dims) == 2}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and widths.get(node.input[1]) == 1
    ]


def batch_parity(path: Path, inputs: ModelInputs, calibration: Calibration) -> Parity:
    """How far a row's score moves between being scored alone and in one batch of all rows.

    An int8 model has no torch twin to match; what the service needs is that its own output
    barely depends on the batch (dynamic quantization scales activations per batch).
    """
    batched = onnx_logits(path, inputs, batch_size=max(1, len(inputs)))
    single_rows = min(len(inputs), SINGLE_ROWS)
    single = onnx_logits(path, first_rows(inputs, single_rows), batch_size=1)
    logit_diff = float(np.abs(single - batched[:single_rows]).max(initial=0.0))
    probability_diff = float(
        np.abs(calibration.apply(single) - calibration.apply(batched[:single_rows])).max(
            initial=0.0
        )
    )
    return Parity(len(inputs), logit_diff, probability_diff)
