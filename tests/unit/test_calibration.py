"""Platt scaling: fitting (models/) and applying (service/)."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest

from models.calibration import fit_platt
from service.calibration import PlattCalibration


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_fit_recovers_a_known_slope_and_intercept() -> None:
    rng = np.random.default_rng(17)
    logits = rng.normal(0.0, 1.5, 200_000)
    probabilities = 1.0 / (1.0 + np.exp(-(1.7 * logits - 0.8)))
    labels = (rng.random(200_000) < probabilities).astype(np.float64)
    fitted = fit_platt(logits, labels)
    assert fitted.method == "platt"
    assert fitted.slope == pytest.approx(1.7, abs=0.05)
    assert fitted.intercept == pytest.approx(-0.8, abs=0.05)


def test_fit_recovers_a_negative_slope_from_float32_logits() -> None:
    rng = np.random.default_rng(18)
    logits = rng.normal(0.0, 1.0, 200_000).astype(np.float32)
    probabilities = 1.0 / (1.0 + np.exp(-(-0.6 * logits.astype(np.float64) + 1.2)))
    labels = (rng.random(200_000) < probabilities).astype(np.float32)
    fitted = fit_platt(logits, labels)
    assert fitted.slope == pytest.approx(-0.6, abs=0.05)
    assert fitted.intercept == pytest.approx(1.2, abs=0.05)


def test_fit_with_extreme_logits_stays_finite() -> None:
    rng = np.random.default_rng(19)
    logits = np.concatenate([rng.normal(0.0, 1.0, 1000), [-1000.0, 1000.0]])
    labels = np.concatenate([(rng.random(1000) < 0.3).astype(np.float64), [0.0, 1.0]])
    fitted = fit_platt(logits, labels)
    assert math.isfinite(fitted.slope)
    assert math.isfinite(fitted.intercept)


def test_apply_matches_the_sigmoid() -> None:
    calibration = PlattCalibration(slope=2.0, intercept=-0.5)
    logits = np.array([-3.0, -0.25, 0.0, 0.25, 1.0, 4.0])
    expected = [_sigmoid(2.0 * z - 0.5) for z in logits]
    result = calibration.apply(logits)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, expected, rtol=1e-12)


def test_default_calibration_is_the_plain_sigmoid() -> None:
    logits = np.array([-2.0, 0.0, 3.0], dtype=np.float32)
    result = PlattCalibration().apply(logits)
    np.testing.assert_allclose(result, [_sigmoid(-2.0), 0.5, _sigmoid(3.0)], rtol=1e-7)


def test_apply_is_finite_and_exact_for_huge_logits() -> None:
    # warnings are errors in this test suite, so an overflow in exp would fail here.
    logits = np.array([-1000.0, -745.0, -40.0, 40.0, 745.0, 1000.0])
    result = PlattCalibration().apply(logits)
    assert np.isfinite(result).all()
    assert result[0] == 0.0
    assert result[-1] == 1.0
    assert result[2] == pytest.approx(math.exp(-40.0), rel=1e-12)  # tiny, not rounded to 0
    assert result[3] == pytest.approx(1.0 - math.exp(-40.0), abs=1e-15)
    assert ((result >= 0.0) & (result <= 1.0)).all()
    assert (np.diff(result) >= 0).all()


def test_apply_with_a_large_slope_does_not_overflow() -> None:
    calibration = PlattCalibration(slope=500.0, intercept=3.0)
    result = calibration.apply(np.array([-1000.0, 1000.0], dtype=np.float32))
    assert result.tolist() == [0.0, 1.0]


def test_calibration_is_frozen_and_strict() -> None:
    calibration = PlattCalibration(slope=1.5)
    with pytest.raises(pydantic.ValidationError):
        calibration.slope = 2.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        PlattCalibration.model_validate({"method": "isotonic"})
    with pytest.raises(pydantic.ValidationError):
        PlattCalibration.model_validate({"slope": 1.0, "offset": 2.0})


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_fit_needs_both_classes(label: float) -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        fit_platt(np.linspace(-1, 1, 10), np.full(10, label))


def test_fit_needs_as_many_labels_as_logits() -> None:
    with pytest.raises(ValueError, match="as many labels as logits"):
        fit_platt(np.linspace(-1, 1, 10), np.array([0.0, 1.0] * 4))
    with pytest.raises(ValueError, match="as many labels as logits"):
        fit_platt(np.linspace(-1, 1, 3), np.array([0.0, 1.0, 0.0, 1.0]))


def test_fit_needs_at_least_one_row() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fit_platt(np.array([]), np.array([]))
