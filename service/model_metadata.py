"""metadata.json: everything the service must know about a model version besides its weights.

Written by training (`models/`), read here at load time. The service owns this contract
because it is the one that refuses a version that does not honour it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from feature_client.reference import DriftReference
from feature_client.spec import FeatureSpec
from service.calibration import Calibration


class TensorInfo(BaseModel):
    """Name, element type and shape of one model input or output ("batch" is the dynamic axis)."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: Literal["float32", "int64"]
    shape: list[int | str]


class GoldenRows(BaseModel):
    """A few inputs with the calibrated probabilities they must produce, checked at load."""

    model_config = ConfigDict(frozen=True)

    dense: list[list[float]]
    ids: list[list[int]]
    probabilities: list[float]
    tolerance: float = 1e-4


class ModelMetadata(BaseModel):
    """The content of one version's metadata.json."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    format_version: int = 1
    name: str
    version: int = Field(ge=1)
    created_at: datetime
    sha256: str
    """Of model.onnx, checked before the file is opened."""
    architecture: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    feature_spec: dict[str, Any]
    calibration: Calibration
    metrics: dict[str, float]
    """Held-out quality: auc, log_loss, calibration error, baseline and oracle figures."""
    parity: dict[str, float]
    """torch vs onnxruntime agreement measured at export."""
    golden: GoldenRows
    training: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    """The synthetic data set's config and checksum, when it was trained on one."""
    drift_reference: DriftReference | None = None
    """Input and score distributions on validation rows, for drift monitoring (absent from
    versions published before it existed: those are served without PSI)."""

    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.feature_spec)
