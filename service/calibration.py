"""Calibration: the map from a model's log-odds to a calibrated conversion probability.

Fitted at training time on held-out data (see `models/calibration.py`), stored in the model's
metadata and applied here, in the service, after inference.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict


class PlattCalibration(BaseModel):
    """p = sigmoid(slope * logit + intercept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["platt"] = "platt"
    slope: float = 1.0
    intercept: float = 0.0

    def apply(self, logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        z = self.slope * logits.astype(np.float64) + self.intercept
        # exp of a non-positive argument never overflows, whatever the sign of z.
        e = np.exp(-np.abs(z))
        probabilities: npt.NDArray[np.float64] = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return probabilities


Calibration = PlattCalibration
