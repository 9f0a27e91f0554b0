"""The model runtime: onnxruntime behind a small synchronous protocol.

`predict` is synchronous on purpose: it is CPU-bound and releases the GIL, so the caller runs
it in a worker thread and the event loop never waits on it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from feature_client.assembly import DENSE_INPUT, IDS_INPUT, LOGIT_OUTPUT, ModelInputs

logger = logging.getLogger("adscore.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ModelRuntime(Protocol):
    """Turns model inputs into log-odds, one per row."""

    provider: str

    def predict(self, inputs: ModelInputs) -> npt.NDArray[np.float32]: ...


def choose_providers(
    requested: Literal["cpu", "cuda"], available: Sequence[str]
) -> tuple[list[str], str | None]:
    """The provider list for a session, and a warning when CUDA was asked for but is absent."""
    if requested == "cpu":
        return [CPU], None
    if CUDA in available:
        return [CUDA, CPU], None
    return [CPU], (
        "execution_provider=cuda was requested but onnxruntime has no CUDA provider here "
        f"(available: {', '.join(available) or 'none'}); falling back to CPU. Install "
        "onnxruntime-gpu on a machine with an NVIDIA GPU to use CUDA."
    )


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's nvidia-* packages (or PyTorch's) when they are not on the
    library path, as onnxruntime-gpu >= 1.21 recommends; a no-op where they are."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:  # the session's own loading reports what is really missing
        logger.debug("onnxruntime.preload_dlls failed", exc_info=True)


class OnnxModelRuntime:
    """One onnxruntime session; safe to call from several threads at once."""

    def __init__(
        self,
        model_path: Path,
        *,
        execution_provider: Literal["cpu", "cuda"] = "cpu",
        intra_op_threads: int = 1,
        cuda_tf32: bool = False,
    ) -> None:
        providers, warning = choose_providers(execution_provider, ort.get_available_providers())
        if warning:
            logger.warning(warning)
        if CUDA in providers:
            _preload_cuda_libraries()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # TF32 matrix products are faster on Ampere and later GPUs but round inputs to 10 bits
        # of mantissa: scores then differ from CPU replicas of the same version by ~1e-4.
        with_options: list[str | tuple[str, dict[str, str]]] = [
            (p, {"use_tf32": "1" if cuda_tf32 else "0"}) if p == CUDA else p for p in providers
        ]
        self._session = ort.InferenceSession(str(model_path), options, providers=with_options)
        active = self._session.get_providers()
        if execution_provider == "cuda" and not warning and CUDA not in active:
            logger.warning(
                "the CUDA provider failed to initialise (see onnxruntime's log); running on CPU"
            )
        self.provider = active[0]
        self._output_names = [LOGIT_OUTPUT]

    def signature(self) -> tuple[dict[str, tuple[str, list[int | str]]], list[str]]:
        """Input name -> (element type, shape), and the output names, as onnxruntime reads them."""
        inputs = {
            i.name: (i.type, [d if isinstance(d, int) else str(d) for d in i.shape])
            for i in self._session.get_inputs()
        }
        return inputs, [o.name for o in self._session.get_outputs()]

    def predict(self, inputs: ModelInputs) -> npt.NDArray[np.float32]:
        if len(inputs) == 0:  # nothing to score; and graphs exported for >= 1 row may fail
            return np.zeros(0, dtype=np.float32)
        (logits,) = self._session.run(
            self._output_names, {DENSE_INPUT: inputs.dense, IDS_INPUT: inputs.ids}
        )
        result: npt.NDArray[np.float32] = logits
        return result
