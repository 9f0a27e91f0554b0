"""Reference distributions of a model's inputs and scores, summarised at training time.

Stored in metadata.json so that the service can compare live traffic with what the model was
validated on. Dense features and the score are cut into quantile bins, categorical features
keep their top-k ids plus one "other" share, each entity (user, ad) has a missing rate and each
feature the share of rows that hold its missing-value stand-in (see `defaulted_counts`).
numpy only: training writes these summaries and serving bins live rows with the same functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from feature_client.spec import UNKNOWN_ID, FeatureSource, FeatureSpec

DENSE_BINS = 10
TOP_IDS = 20
ENTITIES: tuple[FeatureSource, ...] = ("user", "ad")


class BinnedSummary(BaseModel):
    """A numeric distribution: bin i holds values in (edges[i-1], edges[i]], outer bins open."""

    model_config = ConfigDict(frozen=True)

    name: str
    edges: list[float]
    shares: list[float]
    """len(edges) + 1 shares summing to 1."""


class TopIdsSummary(BaseModel):
    """A categorical distribution: the most frequent ids, then everything else."""

    model_config = ConfigDict(frozen=True)

    name: str
    ids: list[int]
    shares: list[float]
    """len(ids) + 1 shares summing to 1; the last one is "other"."""


class DriftReference(BaseModel):
    """What a model's inputs and calibrated scores looked like on its validation rows."""

    model_config = ConfigDict(frozen=True)

    rows: int
    dense: list[BinnedSummary]
    """In the spec's dense input order."""
    categorical: list[TopIdsSummary]
    """In the spec's categorical input order."""
    missing_rate: dict[str, float]
    """Share of rows whose user (ad) features were missing and replaced by defaults."""
    feature_missing_rate: dict[str, float] = Field(default_factory=dict)
    """Feature name -> share of rows holding its missing-value stand-in (`defaulted_counts`);
    empty in references written before it existed."""
    score: BinnedSummary
    mean_score: float


def quantile_edges(values: npt.NDArray[np.floating], bins: int) -> npt.NDArray[np.float64]:
    """Inner cut points of `bins` equal-mass bins; ties (a default repeated) merge bins."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return np.zeros(0)
    cuts = np.quantile(finite.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(cuts)


def bin_counts(
    edges: npt.NDArray[np.float64], values: npt.NDArray[np.floating]
) -> npt.NDArray[np.int64]:
    """Rows per bin of `edges`; NaN lands in the top bin."""
    index = np.searchsorted(edges, values, side="left")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.int64)


def id_counts(top: npt.NDArray[np.int64], values: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """Rows per id of `top` (any order), then the rows of every other id."""
    if len(top) == 0:
        return np.asarray([len(values)], dtype=np.int64)
    order = np.argsort(top, kind="stable")
    ordered = top[order]
    position = np.minimum(np.searchsorted(ordered, values), len(top) - 1)
    slot = np.where(ordered[position] == values, order[position], len(top))
    return np.bincount(slot, minlength=len(top) + 1).astype(np.int64)


def _shares(counts: npt.NDArray[np.int64]) -> list[float]:
    total = max(int(counts.sum()), 1)
    return [round(float(c) / total, 6) for c in counts]


def binned(name: str, values: npt.NDArray[np.floating], bins: int = DENSE_BINS) -> BinnedSummary:
    edges = quantile_edges(values, bins)
    return BinnedSummary(name=name, edges=edges.tolist(), shares=_shares(bin_counts(edges, values)))


def top_ids(name: str, values: npt.NDArray[np.integer], k: int = TOP_IDS) -> TopIdsSummary:
    ids, counts = np.unique(values, return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")[:k]].astype(np.int64)
    return TopIdsSummary(name=name, ids=top.tolist(), shares=_shares(id_counts(top, values)))


def entity_columns(spec: FeatureSpec, source: FeatureSource) -> npt.NDArray[np.intp]:
    """Columns of the ids input that belong to one entity."""
    names = spec.categorical_names
    return np.asarray([names.index(f.name) for f in spec.categorical(source)], dtype=np.intp)


def missing_rows(
    spec: FeatureSpec, ids: npt.NDArray[np.integer], source: FeatureSource
) -> npt.NDArray[np.bool_]:
    """Rows whose entity was replaced by defaults, seen from the inputs alone: every id of the
    entity is the unknown id (a stored entity always has at least its own hashed id)."""
    columns = entity_columns(spec, source)
    if len(columns) == 0:
        return np.zeros(len(ids), dtype=np.bool_)
    result: npt.NDArray[np.bool_] = (ids[:, columns] == UNKNOWN_ID).all(axis=1)
    return result


def dense_defaults(spec: FeatureSpec) -> npt.NDArray[np.float32]:
    """The value each dense input is replaced by when missing, in input order, as the model
    reads it (float32)."""
    return np.asarray([f.default for f in spec.dense()], dtype=np.float32)


def defaulted_counts(
    defaults: npt.NDArray[np.float32],
    dense: npt.NDArray[np.floating],
    ids: npt.NDArray[np.integer],
) -> npt.NDArray[np.int64]:
    """Rows per feature (dense inputs, then categorical ones) that count as missing.

    A row's feature counts as missing when it holds the value a missing value is replaced by:
    exactly the spec's default for a dense feature (compared in float32), the unknown id for a
    categorical one. That covers missing entities, unseen categorical values and a pipeline
    that writes defaults for one feature; a real value equal to the default counts too, which
    the reference share measured the same way accounts for.
    """
    dense_defaulted = (np.asarray(dense, dtype=np.float32) == defaults).sum(axis=0)
    ids_unknown = (ids == UNKNOWN_ID).sum(axis=0)
    return np.concatenate([dense_defaulted, ids_unknown]).astype(np.int64)


def build_reference(
    spec: FeatureSpec,
    dense: npt.NDArray[np.float32],
    ids: npt.NDArray[np.integer],
    scores: npt.NDArray[np.float64],
) -> DriftReference:
    """Summarise validation inputs (laid out as the model reads them) and their scores."""
    defaulted = defaulted_counts(dense_defaults(spec), dense, ids)
    rows = max(len(dense), 1)
    return DriftReference(
        rows=len(dense),
        dense=[binned(name, dense[:, j]) for j, name in enumerate(spec.dense_names)],
        categorical=[top_ids(name, ids[:, j]) for j, name in enumerate(spec.categorical_names)],
        missing_rate={
            source: round(float(missing_rows(spec, ids, source).mean()), 6) for source in ENTITIES
        },
        feature_missing_rate={
            name: round(float(count) / rows, 6)
            for name, count in zip(
                [*spec.dense_names, *spec.categorical_names], defaulted, strict=True
            )
        },
        score=binned("score", scores),
        mean_score=float(scores.mean()),
    )


class ReferenceBinner:
    """Bins live rows against one reference with its arrays prepared once.

    Gives the counts `bin_counts` and `id_counts` give per summary (checked by a test), in
    fewer numpy calls: every categorical feature is looked up in one searchsorted over
    (feature, id) keys and counted in one bincount, where per-feature calls would pay numpy's
    fixed cost per call on every sampled request.
    """

    def __init__(self, reference: DriftReference) -> None:
        self.reference = reference
        self._dense_edges = [np.asarray(s.edges, dtype=np.float64) for s in reference.dense]
        self._score_edges = np.asarray(reference.score.edges, dtype=np.float64)
        sizes = [len(s.ids) + 1 for s in reference.categorical]  # the top ids, then "other"
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        keys, slots = [], []
        for j, summary in enumerate(reference.categorical):
            for k, top_id in enumerate(summary.ids):
                keys.append(self._key(j, top_id))
                slots.append(offsets[j] + k)
        order = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
        self._keys = np.asarray(keys, dtype=np.int64)[order]
        self._slots = np.asarray(slots, dtype=np.int64)[order]
        self._other = offsets[1:] - 1
        self._offsets = offsets

    @staticmethod
    def _key(feature: int | npt.NDArray[np.int64], ids: int | npt.NDArray[np.integer]) -> Any:
        # Ids are non-negative; masking keeps a corrupt negative one from matching a top id.
        return (np.int64(feature) << 32) + (np.int64(ids) & 0xFFFFFFFF)

    def dense(self, dense: npt.NDArray[np.floating]) -> list[npt.NDArray[np.int64]]:
        return [bin_counts(edges, dense[:, j]) for j, edges in enumerate(self._dense_edges)]

    def categorical(self, ids: npt.NDArray[np.integer]) -> list[npt.NDArray[np.int64]]:
        features = len(self._other)
        if features == 0:
            return []
        rows = len(ids)
        keys = self._key(np.arange(features, dtype=np.int64)[None, :], ids[:, :features]).ravel()
        if len(self._keys):
            position = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            slot = np.where(self._keys[position] == keys, self._slots[position], -1)
        else:
            slot = np.full(len(keys), -1)
        other = np.tile(self._other, rows)
        slot = np.where(slot < 0, other, slot)
        counts = np.bincount(slot, minlength=int(self._offsets[-1])).astype(np.int64)
        return np.split(counts, self._offsets[1:-1])

    def score(self, scores: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
        return bin_counts(self._score_edges, scores)
