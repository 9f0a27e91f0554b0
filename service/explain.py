"""Per-candidate explanations by occlusion: what each feature added to a candidate's score.

A feature's contribution to candidate i is score_i minus the score of the same row with that
feature replaced by what a missing value becomes (the spec's default for a dense feature, the
unknown id 0 for a categorical one). Positive: the candidate's value raised its pCVR above
what the model predicts without knowing it. Exact for the model served (no surrogate), in
calibrated probability units, and model-agnostic.

Cost: every feature of every candidate is one more model row, N x F rows in one call (F = 17
for the demo model), which is why explained requests are capped at `max_explain_candidates`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import numpy.typing as npt

from feature_client.assembly import ModelInputs
from feature_client.spec import UNKNOWN_ID, FeatureSpec

MAX_TOP_K = 64


class FeatureContribution(TypedDict):
    feature: str
    contribution: float


class CandidateExplanation(TypedDict):
    ad_id: str
    contributions: list[FeatureContribution]


@dataclass(frozen=True)
class Occlusion:
    """A request's rows, then one occluded copy of them per feature, as one model input."""

    features: list[str]
    """Feature names in input order: dense ones, then categorical ones."""
    inputs: ModelInputs
    """[(1 + F) x N rows]: rows 0 .. N are the request's own; rows (f+1)*N .. (f+2)*N have
    feature f set to its stand-in. One model call scores them all, so a feature that changes
    nothing gets exactly 0, not the noise of two differently batched calls."""


def occlude(spec: FeatureSpec, inputs: ModelInputs) -> Occlusion:
    """The rows as they are, then every feature replaced one at a time, in one input block."""
    rows = len(inputs)
    dense_width, ids_width = inputs.dense.shape[1], inputs.ids.shape[1]
    blocks = 1 + dense_width + ids_width
    dense = np.tile(inputs.dense, (blocks, 1))
    ids = np.tile(inputs.ids, (blocks, 1))
    for j, feature in enumerate(spec.dense()):
        dense[(1 + j) * rows : (2 + j) * rows, j] = feature.default
    for j in range(ids_width):
        block = 1 + dense_width + j
        ids[block * rows : (block + 1) * rows, j] = UNKNOWN_ID
    return Occlusion([*spec.dense_names, *spec.categorical_names], ModelInputs(dense, ids))


def contributions(
    all_scores: npt.NDArray[np.float64], rows: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The rows' own scores [N] and the contributions [N, F] from the scores of an Occlusion."""
    blocks = all_scores.reshape(-1, rows)  # [1 + F, N]
    scores = blocks[0]
    table: npt.NDArray[np.float64] = scores[:, None] - blocks[1:].T
    return scores, table


def top_contributions(
    features: list[str],
    ad_ids: list[str],
    table: npt.NDArray[np.float64],
    top_k: int,
) -> list[CandidateExplanation]:
    """Per candidate, its `top_k` features by |contribution|, largest first (ties: input order)."""
    k = min(top_k, len(features))
    order = np.argsort(-np.abs(table), axis=1, kind="stable")[:, :k]
    return [
        {
            "ad_id": ad_id,
            "contributions": [
                {"feature": features[j], "contribution": float(table[i, j])} for j in order[i]
            ],
        }
        for i, ad_id in enumerate(ad_ids)
    ]
