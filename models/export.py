"""ONNX export with a dynamic batch axis, and the torch vs onnxruntime parity check."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from feature_client.assembly import DENSE_INPUT, IDS_INPUT, LOGIT_OUTPUT, ModelInputs
from models.train import predict_logits
from service.calibration import Calibration
from service.model_metadata import TensorInfo

OPSET = 18
SERVING_BATCH = 256
"""Candidates per request in the benchmarks: the batch offline scoring imitates."""


def export_onnx(model: nn.Module, example: ModelInputs, path: Path) -> None:
    """Write `model` as one self-contained ONNX file taking (dense, ids) of any batch size."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dense = torch.from_numpy(example.dense[:8])
    ids = torch.from_numpy(example.ids[:8])
    # The exporter is chatty (progress lines, a rename warning about the shared batch axis).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dense, ids),
            str(path),
            input_names=[DENSE_INPUT, IDS_INPUT],
            output_names=[LOGIT_OUTPUT],
            dynamic_shapes=({0: batch}, {0: batch}),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    strip_build_paths(path)


def strip_build_paths(path: Path) -> None:
    """Drop the exporter's per-node provenance (source stack traces naming the paths of the
    machine that exported it): a published model carries weights and graph, not a build log."""
    import onnx

    model = onnx.load(str(path))
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        graph.doc_string = ""
        del graph.metadata_props[:]
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    for function in model.functions:
        for node in function.node:
            node.doc_string = ""
            del node.metadata_props[:]
    onnx.save(model, str(path))


def signature(dense_width: int, ids_width: int) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The inputs and outputs every exported ranking model has."""
    inputs = [
        TensorInfo(name=DENSE_INPUT, dtype="float32", shape=["batch", dense_width]),
        TensorInfo(name=IDS_INPUT, dtype="int64", shape=["batch", ids_width]),
    ]
    return inputs, [TensorInfo(name=LOGIT_OUTPUT, dtype="float32", shape=["batch"])]


@dataclass(frozen=True)
class Parity:
    """Largest disagreement between torch and onnxruntime on the same rows."""

    rows: int
    max_abs_logit_diff: float
    max_abs_probability_diff: float

    def as_dict(self) -> dict[str, float]:
        return {
            "rows": float(self.rows),
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "max_abs_probability_diff": self.max_abs_probability_diff,
        }


def check_parity(
    model: nn.Module, onnx_path: Path, inputs: ModelInputs, calibration: Calibration
) -> Parity:
    """Score `inputs` with torch and with onnxruntime (batch sizes 1 and all) and compare."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    reference = predict_logits(model, inputs)
    (onnx_logits,) = session.run([LOGIT_OUTPUT], inputs.as_feed())
    (single,) = session.run(
        [LOGIT_OUTPUT], {DENSE_INPUT: inputs.dense[:1], IDS_INPUT: inputs.ids[:1]}
    )
    logit_diff = max(
        float(np.abs(onnx_logits - reference).max()), float(np.abs(single - reference[:1]).max())
    )
    probability_diff = float(
        np.abs(calibration.apply(onnx_logits) - calibration.apply(reference)).max()
    )
    return Parity(len(inputs), logit_diff, probability_diff)


def first_rows(inputs: ModelInputs, rows: int) -> ModelInputs:
    return ModelInputs(inputs.dense[:rows], inputs.ids[:rows])


def open_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session set up like the service's (sequential, `threads` intra-op threads)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(
    path: Path, inputs: ModelInputs, *, batch_size: int = SERVING_BATCH, threads: int = 1
) -> npt.NDArray[np.float32]:
    """Log-odds from onnxruntime, scored in batches of `batch_size` rows.

    Serving-sized batches on purpose: a dynamically quantized model picks one activation scale
    per batch, so its output depends on the batch a row is scored in.
    """
    session = open_session(path, threads)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        rows = slice(start, start + batch_size)
        feed = {DENSE_INPUT: inputs.dense[rows], IDS_INPUT: inputs.ids[rows]}
        outputs.append(session.run([LOGIT_OUTPUT], feed)[0])
    return np.concatenate(outputs) if outputs else np.zeros(0, dtype=np.float32)
