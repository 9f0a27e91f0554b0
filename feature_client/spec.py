"""The feature spec: which features a model reads, where each comes from, how raw values become ids.

Training and serving share one spec, stored in every model's metadata. Its input layout is fixed:
dense features then categorical ids, each ordered by source (user, ad, context) and then by
declaration order. Index 0 of every categorical feature means "unknown or missing", so a missing
entity and an unseen value both land on a row the model was trained with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FeatureSource = Literal["user", "ad", "context"]
SOURCES: tuple[FeatureSource, ...] = ("user", "ad", "context")
UNKNOWN_ID = 0


class SpecError(ValueError):
    """A feature spec is inconsistent or cannot be read."""


def stable_hash(value: str) -> int:
    """A 64-bit hash that is the same in every process and on every machine (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class DenseFeature:
    """A float feature; `default` replaces it when its entity is missing."""

    name: str
    source: FeatureSource
    default: float = 0.0


@dataclass(frozen=True)
class CategoricalFeature:
    """A categorical feature encoded either by a fixed vocabulary or by hashing into buckets."""

    name: str
    source: FeatureSource
    vocabulary: tuple[str, ...] = ()
    hash_buckets: int = 0
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.hash_buckets < 0:
            raise SpecError(f"{self.name}: hash_buckets must not be negative")
        if bool(self.vocabulary) == (self.hash_buckets > 0):
            raise SpecError(f"{self.name}: give exactly one of a vocabulary or hash_buckets")
        if self.hash_buckets == 1:
            raise SpecError(f"{self.name}: hash_buckets must be at least 2 (bucket 0 is unknown)")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise SpecError(f"{self.name}: the vocabulary has duplicate values")
        self._index.update({value: i + 1 for i, value in enumerate(self.vocabulary)})

    @property
    def cardinality(self) -> int:
        """Rows of this feature's embedding table, the unknown id 0 included."""
        return self.hash_buckets if self.hash_buckets else len(self.vocabulary) + 1

    def encode_one(self, value: str) -> int:
        """The id of one raw value; unknown values map to 0."""
        if self.hash_buckets:
            return 1 + stable_hash(value) % (self.hash_buckets - 1)
        return self._index.get(value, UNKNOWN_ID)

    def encode(self, values: Iterable[str]) -> npt.NDArray[np.int32]:
        """Ids of many raw values (one dict lookup or one hash each)."""
        return np.fromiter((self.encode_one(v) for v in values), dtype=np.int32)


Feature = DenseFeature | CategoricalFeature


@dataclass(frozen=True)
class FeatureSpec:
    """The ordered features of one schema version."""

    schema_version: int
    features: tuple[Feature, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SpecError(f"duplicate feature names: {', '.join(duplicates)}")
        if self.schema_version < 1:
            raise SpecError("schema_version must be a positive integer")

    def dense(self, source: FeatureSource | None = None) -> tuple[DenseFeature, ...]:
        """Dense features of one source, or all of them in input order."""
        sources = SOURCES if source is None else (source,)
        return tuple(
            f
            for s in sources
            for f in self.features
            if isinstance(f, DenseFeature) and f.source == s
        )

    def categorical(self, source: FeatureSource | None = None) -> tuple[CategoricalFeature, ...]:
        """Categorical features of one source, or all of them in input order."""
        sources = SOURCES if source is None else (source,)
        return tuple(
            f
            for s in sources
            for f in self.features
            if isinstance(f, CategoricalFeature) and f.source == s
        )

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense()]

    @property
    def categorical_names(self) -> list[str]:
        return [f.name for f in self.categorical()]

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.categorical()]

    def dense_defaults(self, source: FeatureSource) -> npt.NDArray[np.float32]:
        return np.array([f.default for f in self.dense(source)], dtype=np.float32)

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise SpecError(f"unknown feature {name!r}")

    def to_dict(self) -> dict[str, Any]:
        features: list[dict[str, Any]] = []
        for f in self.features:
            if isinstance(f, DenseFeature):
                features.append(
                    {"name": f.name, "kind": "dense", "source": f.source, "default": f.default}
                )
            elif f.vocabulary:
                features.append(
                    {
                        "name": f.name,
                        "kind": "categorical",
                        "source": f.source,
                        "vocabulary": list(f.vocabulary),
                    }
                )
            else:
                features.append(
                    {
                        "name": f.name,
                        "kind": "categorical",
                        "source": f.source,
                        "hash_buckets": f.hash_buckets,
                    }
                )
        return {"schema_version": self.schema_version, "features": features}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        try:
            features: list[Feature] = []
            for item in data["features"]:
                source = item["source"]
                if source not in SOURCES:
                    raise SpecError(f"{item['name']}: unknown source {source!r}")
                if item["kind"] == "dense":
                    features.append(DenseFeature(item["name"], source, float(item["default"])))
                elif item["kind"] == "categorical":
                    features.append(
                        CategoricalFeature(
                            item["name"],
                            source,
                            vocabulary=tuple(item.get("vocabulary", ())),
                            hash_buckets=int(item.get("hash_buckets", 0)),
                        )
                    )
                else:
                    raise SpecError(f"{item['name']}: unknown kind {item['kind']!r}")
            return cls(int(data["schema_version"]), tuple(features))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"malformed feature spec: missing or wrong field {exc}") from exc

    def fingerprint(self) -> str:
        """A short digest of the whole spec: equal fingerprints mean identical encodings."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_dense_columns(
    features: Sequence[DenseFeature], columns: dict[str, Sequence[float] | npt.NDArray[Any]]
) -> npt.NDArray[np.float32]:
    """Stack raw dense columns into a [rows, features] float32 matrix in spec order."""
    if not features:
        rows = len(next(iter(columns.values()))) if columns else 0
        return np.zeros((rows, 0), dtype=np.float32)
    return np.column_stack([np.asarray(columns[f.name], dtype=np.float32) for f in features])


def encode_categorical_columns(
    features: Sequence[CategoricalFeature], columns: dict[str, Sequence[str] | npt.NDArray[Any]]
) -> npt.NDArray[np.int32]:
    """Encode raw categorical columns into a [rows, features] int32 id matrix in spec order."""
    if not features:
        rows = len(next(iter(columns.values()))) if columns else 0
        return np.zeros((rows, 0), dtype=np.int32)
    return np.column_stack([f.encode(map(str, columns[f.name])) for f in features])
