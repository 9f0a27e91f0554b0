"""Ranking and calibration metrics against brute force and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from models.evaluation import expected_calibration_error, log_loss, roc_auc


def _pairwise_auc(labels: npt.NDArray[np.float64], scores: npt.NDArray[np.float64]) -> float:
    """Every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = 0.0
    for p in positives:
        for n in negatives:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(12))
def test_auc_equals_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.integers(0, 2, n).astype(np.float64)
    labels[0], labels[1] = 0.0, 1.0  # both classes present
    scores = rng.integers(0, 6, n).astype(np.float64)  # few distinct values: many ties
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_auc_equals_brute_force_on_continuous_scores(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = (rng.random(80) < 0.3).astype(np.float64)
    labels[:2] = [0.0, 1.0]
    scores = rng.normal(size=80) + labels
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def test_auc_accepts_integer_labels_and_float32_scores() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.4, 0.4, 0.3], dtype=np.float32)
    # pairs: (0.9 beats all), (0.4 beats 0.1, ties 0.4), (0.3 beats 0.1, loses to 0.4)
    assert roc_auc(labels, scores) == pytest.approx((2 + 1.5 + 1) / 6)


def test_auc_perfect_and_reversed() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1], dtype=np.float64)
    scores = np.array([0.1, 0.2, 0.8, 0.3, 0.7, 0.9])
    assert roc_auc(labels, scores) == 1.0
    assert roc_auc(labels, -scores) == 0.0


def test_auc_of_constant_scores_is_one_half() -> None:
    labels = np.array([0, 1, 0, 1, 1], dtype=np.float64)
    assert roc_auc(labels, np.full(5, 0.3)) == 0.5


def test_auc_does_not_depend_on_row_order() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random(200) < 0.4).astype(np.float64)
    labels[:2] = [0.0, 1.0]
    scores = rng.integers(0, 10, 200).astype(np.float64)
    order = rng.permutation(200)
    assert roc_auc(labels[order], scores[order]) == pytest.approx(roc_auc(labels, scores))


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], [1]])
def test_auc_needs_both_classes(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc(np.array(labels, dtype=np.float64), np.linspace(0, 1, len(labels)))


def test_log_loss_by_hand() -> None:
    labels = np.array([1, 0, 1, 0], dtype=np.float64)
    probabilities = np.array([0.9, 0.2, 0.6, 0.5])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.5)) / 4
    assert log_loss(labels, probabilities) == pytest.approx(expected, rel=1e-12)


def test_log_loss_clips_certain_mistakes() -> None:
    labels = np.array([1, 0], dtype=np.float64)
    probabilities = np.array([0.0, 1.0])
    value = log_loss(labels, probabilities)
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_log_loss_of_certain_right_answers_is_near_zero() -> None:
    labels = np.array([1, 0], dtype=np.float64)
    assert log_loss(labels, np.array([1.0, 0.0])) == pytest.approx(0.0, abs=1e-6)


def test_ece_by_hand() -> None:
    # Two equal-count bins: predictions [0.1, 0.1] with labels [0, 1] (rate 0.5, error 0.4)
    # and [0.8, 0.8] with labels [1, 1] (rate 1, error 0.2): mean error 0.3.
    labels = np.array([0, 1, 1, 1], dtype=np.float64)
    probabilities = np.array([0.1, 0.1, 0.8, 0.8])
    assert expected_calibration_error(labels, probabilities, bins=2) == pytest.approx(0.3)


def test_ece_near_zero_for_calibrated_predictions() -> None:
    rng = np.random.default_rng(2024)
    probabilities = rng.uniform(0.01, 0.2, 200_000)
    labels = (rng.random(200_000) < probabilities).astype(np.float64)
    assert expected_calibration_error(labels, probabilities) < 0.005


def test_ece_large_for_doubled_predictions() -> None:
    rng = np.random.default_rng(2025)
    probabilities = rng.uniform(0.01, 0.2, 200_000)
    labels = (rng.random(200_000) < probabilities).astype(np.float64)
    doubled = 2 * probabilities
    # Every bin over-predicts by about its mean prediction, so the ECE is about mean(p).
    error = expected_calibration_error(labels, doubled)
    assert error > 0.05
    assert error == pytest.approx(probabilities.mean(), abs=0.005)
