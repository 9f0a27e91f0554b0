"""Loading one model version with every check, into an immutable LoadedModel.

verify the sha256 of model.onnx -> open the onnxruntime session -> check its inputs and
outputs against the feature spec -> check the spec against the feature store's schema stamp
-> score the golden rows and compare -> warm up each batch size. A version that fails a step
is refused with the reason (ModelLoadError). The ModelManager decides what to load and when.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_client.assembly import (
    DENSE_INPUT,
    IDS_INPUT,
    LOGIT_OUTPUT,
    ContextEncoder,
    ModelInputs,
)
from feature_client.codec import EntityCodec
from feature_client.spec import FeatureSpec, SpecError
from feature_client.store import SchemaStamp
from service.calibration import Calibration
from service.model_metadata import ModelMetadata
from service.repository import ModelRepository, RepositoryError, file_sha256
from service.runtime import ModelRuntime, OnnxModelRuntime
from service.settings import Settings

logger = logging.getLogger("adscore.registry")


class ModelLoadError(Exception):
    """A model version failed a check at load time and was refused."""


@dataclass(frozen=True)
class LoadedModel:
    """A verified, warmed-up model version and what it needs to read its features."""

    name: str
    version: int
    metadata: ModelMetadata
    spec: FeatureSpec
    runtime: ModelRuntime
    user_codec: EntityCodec
    ad_codec: EntityCodec
    loaded_at: datetime
    load_seconds: float
    size_bytes: int = 0
    context: ContextEncoder = field(init=False, repr=False, compare=False)
    """The request context's input blocks, remembered per distinct context."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "context", ContextEncoder(self.spec))

    @classmethod
    def assemble(
        cls, metadata: ModelMetadata, runtime: ModelRuntime, load_seconds: float = 0.0
    ) -> LoadedModel:
        spec = metadata.spec()
        return cls(
            name=metadata.name,
            version=metadata.version,
            metadata=metadata,
            spec=spec,
            runtime=runtime,
            user_codec=EntityCodec(spec, "user"),
            ad_codec=EntityCodec(spec, "ad"),
            loaded_at=datetime.now(UTC),
            load_seconds=load_seconds,
        )

    @property
    def calibration(self) -> Calibration:
        return self.metadata.calibration

    def score(self, inputs: ModelInputs) -> npt.NDArray[np.float64]:
        """Calibrated probabilities; blocking, so call it from a worker thread."""
        return self.calibration.apply(self.runtime.predict(inputs))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.metadata.architecture,
            "provider": self.runtime.provider,
            "feature_schema_version": self.spec.schema_version,
            "feature_spec_fingerprint": self.spec.fingerprint(),
            "created_at": self.metadata.created_at.isoformat(),
            "loaded_at": self.loaded_at.isoformat(),
            "load_seconds": round(self.load_seconds, 4),
            "size_bytes": self.size_bytes,
            "metrics": self.metadata.metrics,
        }


def _check_signature(runtime: OnnxModelRuntime, spec: FeatureSpec) -> None:
    inputs, outputs = runtime.signature()
    expected = {
        DENSE_INPUT: ("tensor(float)", len(spec.dense_names)),
        IDS_INPUT: ("tensor(int64)", len(spec.categorical_names)),
    }
    if set(inputs) != set(expected):
        raise ModelLoadError(
            f"model inputs are {sorted(inputs)}, the feature spec needs {sorted(expected)}"
        )
    for name, (dtype, width) in expected.items():
        actual_type, shape = inputs[name]
        if actual_type != dtype or len(shape) != 2 or shape[1] != width:
            raise ModelLoadError(
                f"input {name!r} is {actual_type} {shape}, the feature spec needs {dtype} "
                f"[batch, {width}]"
            )
    if LOGIT_OUTPUT not in outputs:
        raise ModelLoadError(f"model outputs are {outputs}, expected one named {LOGIT_OUTPUT!r}")


def _check_feature_schema(spec: FeatureSpec, stamp: SchemaStamp | None) -> None:
    if stamp is None:
        return
    expected = SchemaStamp.of(spec)
    if stamp != expected:
        raise ModelLoadError(
            f"the feature store holds schema version {stamp.schema_version} "
            f"({stamp.fingerprint}); the model needs version {expected.schema_version} "
            f"({expected.fingerprint}). Reload the features with `adscore load-features`."
        )


def _check_golden_rows(model: LoadedModel) -> None:
    golden = model.metadata.golden
    inputs = ModelInputs(
        np.asarray(golden.dense, dtype=np.float32), np.asarray(golden.ids, dtype=np.int64)
    )
    probabilities = model.score(inputs)
    worst = float(np.abs(probabilities - np.asarray(golden.probabilities)).max(initial=0.0))
    if worst > golden.tolerance:
        raise ModelLoadError(
            f"golden rows disagree with metadata by {worst:.3g} (tolerance {golden.tolerance:g})"
        )


def _warm_up(model: LoadedModel, batch_sizes: tuple[int, ...]) -> None:
    golden = model.metadata.golden
    dense = np.asarray(golden.dense, dtype=np.float32)
    ids = np.asarray(golden.ids, dtype=np.int64)
    for size in batch_sizes:
        rows = np.arange(size) % len(dense)
        model.runtime.predict(ModelInputs(dense[rows], ids[rows]))


def load_version(
    repository: ModelRepository,
    name: str,
    version: int,
    settings: Settings,
    store_stamp: SchemaStamp | None = None,
) -> LoadedModel:
    """Load one version with every check; raises ModelLoadError with the reason.

    `store_stamp` is the feature store's schema stamp; None skips that check (the store was
    unreachable or holds no stamp yet).
    """
    started = time.perf_counter()
    try:
        metadata = repository.read_metadata(name, version)
        spec = metadata.spec()
    except (RepositoryError, SpecError) as exc:
        raise ModelLoadError(str(exc)) from exc
    path = repository.model_path(name, version)
    if not path.exists():
        raise ModelLoadError(f"{path} is missing")
    checksum = file_sha256(path)
    if checksum != metadata.sha256:
        raise ModelLoadError(
            f"{path}: sha256 {checksum[:12]}... does not match metadata ({metadata.sha256[:12]}...)"
        )
    try:
        runtime = OnnxModelRuntime(
            path,
            execution_provider=settings.execution_provider,
            intra_op_threads=settings.intra_op_threads,
            cuda_tf32=settings.cuda_tf32,
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise ModelLoadError(f"{path}: onnxruntime cannot open it: {exc}") from exc
    _check_signature(runtime, spec)
    _check_feature_schema(spec, store_stamp)
    model = LoadedModel.assemble(metadata, runtime)
    _check_golden_rows(model)
    _warm_up(model, settings.warmup_batch_sizes)
    seconds = time.perf_counter() - started
    logger.info(
        "loaded model %s version %d in %.2f s on %s", name, version, seconds, runtime.provider
    )
    return dataclasses.replace(
        model, loaded_at=datetime.now(UTC), load_seconds=seconds, size_bytes=path.stat().st_size
    )
