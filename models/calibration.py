"""Fitting Platt scaling on held-out log-odds; the service applies the result."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.calibration import PlattCalibration


def fit_platt(
    logits: npt.NDArray[np.floating], labels: npt.NDArray[np.floating], iterations: int = 50
) -> PlattCalibration:
    """Maximum-likelihood slope and intercept by Newton's method (two parameters, convex)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(z) != len(y) or len(z) == 0:
        raise ValueError("calibration needs as many labels as logits, and at least one")
    if y.min() == y.max():
        raise ValueError("calibration needs both positive and negative labels")
    slope, intercept = 1.0, 0.0
    features = np.column_stack([z, np.ones_like(z)])
    for _ in range(iterations):
        p = PlattCalibration(slope=slope, intercept=intercept).apply(z)
        gradient = features.T @ (p - y)
        weights = np.maximum(p * (1 - p), 1e-12)
        hessian = (features * weights[:, None]).T @ features + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        slope, intercept = slope - float(step[0]), intercept - float(step[1])
        if np.abs(step).max() < 1e-10:
            break
    return PlattCalibration(slope=slope, intercept=intercept)
