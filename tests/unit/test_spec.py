"""FeatureSpec: encodings, validation, input order, serialisation and fingerprints."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from feature_client.spec import (
    UNKNOWN_ID,
    CategoricalFeature,
    DenseFeature,
    FeatureSpec,
    SpecError,
)

DEVICES = ("ios", "android", "web")


def _interleaved_spec() -> FeatureSpec:
    """Features declared with sources and kinds deliberately mixed up."""
    return FeatureSpec(
        schema_version=3,
        features=(
            DenseFeature("ctx_dense_a", "context", default=0.1),
            CategoricalFeature("ad_cat_a", "ad", hash_buckets=32),
            DenseFeature("user_dense_a", "user", default=1.5),
            CategoricalFeature("device", "context", vocabulary=DEVICES),
            DenseFeature("ad_dense_a", "ad", default=-2.0),
            CategoricalFeature("user_cat_a", "user", hash_buckets=16),
            DenseFeature("user_dense_b", "user"),
            CategoricalFeature("ad_cat_b", "ad", vocabulary=("x", "y")),
            DenseFeature("ctx_dense_b", "context", default=7.0),
            CategoricalFeature("user_cat_b", "user", vocabulary=("s1", "s2", "s3", "s4")),
        ),
    )


# --- categorical encodings -------------------------------------------------------------------


def test_vocabulary_index_is_position_plus_one() -> None:
    feature = CategoricalFeature("device", "context", vocabulary=DEVICES)
    for position, value in enumerate(DEVICES):
        assert feature.encode_one(value) == position + 1


def test_vocabulary_unknown_values_map_to_zero() -> None:
    feature = CategoricalFeature("device", "context", vocabulary=DEVICES)
    assert UNKNOWN_ID == 0
    assert feature.encode_one("blackberry") == 0
    assert feature.encode_one("") == 0
    assert feature.encode_one("IOS") == 0  # matching is exact, case included


def test_vocabulary_encode_many_matches_encode_one() -> None:
    feature = CategoricalFeature("device", "context", vocabulary=DEVICES)
    values = ["web", "ios", "nope", "android", "web"]
    ids = feature.encode(values)
    assert ids.dtype == np.int32
    assert ids.tolist() == [3, 1, 0, 2, 3]


def test_hash_encoding_is_stable_across_calls_and_instances() -> None:
    first = CategoricalFeature("user_id", "user", hash_buckets=1000)
    second = CategoricalFeature("user_id", "user", hash_buckets=1000)
    values = [f"u{i}" for i in range(200)]
    once = [first.encode_one(v) for v in values]
    assert once == [first.encode_one(v) for v in values]
    assert once == [second.encode_one(v) for v in values]
    assert first.encode(values).tolist() == once


def test_hash_encoding_is_blake2b_not_the_process_salted_hash() -> None:
    # The documented contract: the same id in every process, so pin it to an independent
    # computation of an 8-byte little-endian blake2b digest.
    buckets = 4096
    feature = CategoricalFeature("user_id", "user", hash_buckets=buckets)
    for value in ("u42", "a7", "", "ünïcode"):
        digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
        expected = 1 + int.from_bytes(digest, "little") % (buckets - 1)
        assert feature.encode_one(value) == expected


@pytest.mark.parametrize("buckets", [2, 3, 5, 64])
def test_hash_ids_are_in_one_to_buckets_minus_one_and_never_zero(buckets: int) -> None:
    feature = CategoricalFeature("ad_id", "ad", hash_buckets=buckets)
    ids = feature.encode(f"a{i}" for i in range(2000))
    assert ids.min() >= 1
    assert ids.max() <= buckets - 1
    assert (ids != UNKNOWN_ID).all()
    # 2000 values spread over every usable bucket.
    assert set(ids.tolist()) == set(range(1, buckets))


def test_cardinality_counts_the_unknown_row() -> None:
    assert CategoricalFeature("device", "context", vocabulary=DEVICES).cardinality == 4
    assert CategoricalFeature("one", "context", vocabulary=("only",)).cardinality == 2
    assert CategoricalFeature("user_id", "user", hash_buckets=64).cardinality == 64


def test_spec_cardinalities_follow_input_order() -> None:
    spec = _interleaved_spec()
    # user_cat_a (16), user_cat_b (4 + 1), ad_cat_a (32), ad_cat_b (2 + 1), device (3 + 1)
    assert spec.cardinalities == [16, 5, 32, 3, 4]


# --- validation ------------------------------------------------------------------------------


def test_categorical_needs_a_vocabulary_or_buckets() -> None:
    with pytest.raises(SpecError, match="exactly one"):
        CategoricalFeature("device", "context")


def test_categorical_rejects_both_vocabulary_and_buckets() -> None:
    with pytest.raises(SpecError, match="exactly one"):
        CategoricalFeature("device", "context", vocabulary=DEVICES, hash_buckets=16)


def test_categorical_rejects_negative_buckets_alongside_a_vocabulary() -> None:
    # A non-zero hash_buckets switches encode_one and cardinality to hashing, so a vocabulary
    # with a negative bucket count is "both" and must be refused like any other pair.
    with pytest.raises(SpecError):
        CategoricalFeature("device", "context", vocabulary=DEVICES, hash_buckets=-3)


def test_categorical_rejects_negative_buckets_alone() -> None:
    with pytest.raises(SpecError):
        CategoricalFeature("user_id", "user", hash_buckets=-8)


def test_categorical_rejects_a_single_bucket() -> None:
    with pytest.raises(SpecError, match="at least 2"):
        CategoricalFeature("user_id", "user", hash_buckets=1)


def test_categorical_rejects_duplicate_vocabulary() -> None:
    with pytest.raises(SpecError, match="device: the vocabulary has duplicate values"):
        CategoricalFeature("device", "context", vocabulary=("ios", "web", "ios"))


def test_spec_rejects_duplicate_feature_names_and_names_them() -> None:
    with pytest.raises(SpecError, match="duplicate feature names: a, b"):
        FeatureSpec(
            schema_version=1,
            features=(
                DenseFeature("b", "user"),
                DenseFeature("a", "user"),
                CategoricalFeature("b", "ad", hash_buckets=8),
                CategoricalFeature("a", "context", vocabulary=("x",)),
                DenseFeature("c", "ad"),
            ),
        )


@pytest.mark.parametrize("version", [0, -1])
def test_spec_rejects_schema_version_below_one(version: int) -> None:
    with pytest.raises(SpecError, match="schema_version"):
        FeatureSpec(schema_version=version, features=(DenseFeature("a", "user"),))


def test_unknown_feature_lookup_raises() -> None:
    with pytest.raises(SpecError, match="'nope'"):
        _interleaved_spec().feature("nope")


# --- input order -----------------------------------------------------------------------------


def test_dense_orders_by_source_then_declaration() -> None:
    spec = _interleaved_spec()
    expected = ["user_dense_a", "user_dense_b", "ad_dense_a", "ctx_dense_a", "ctx_dense_b"]
    assert [f.name for f in spec.dense()] == expected
    assert spec.dense_names == expected


def test_categorical_orders_by_source_then_declaration() -> None:
    spec = _interleaved_spec()
    expected = ["user_cat_a", "user_cat_b", "ad_cat_a", "ad_cat_b", "device"]
    assert [f.name for f in spec.categorical()] == expected
    assert spec.categorical_names == expected


def test_order_does_not_depend_on_interleaving() -> None:
    spec = _interleaved_spec()
    # The same features declared source by source give the same input layout.
    by_source = FeatureSpec(
        schema_version=3,
        features=tuple(
            f for source in ("context", "ad", "user") for f in spec.features if f.source == source
        ),
    )
    assert by_source.dense_names == spec.dense_names
    assert by_source.categorical_names == spec.categorical_names


def test_per_source_selection_and_defaults() -> None:
    spec = _interleaved_spec()
    assert [f.name for f in spec.dense("ad")] == ["ad_dense_a"]
    assert [f.name for f in spec.categorical("context")] == ["device"]
    assert [f.name for f in spec.categorical("user")] == ["user_cat_a", "user_cat_b"]
    defaults = spec.dense_defaults("user")
    assert defaults.dtype == np.float32
    assert defaults.tolist() == [1.5, 0.0]
    assert spec.dense_defaults("context").tolist() == pytest.approx([0.1, 7.0])


# --- serialisation and fingerprints ----------------------------------------------------------


def test_to_dict_from_dict_round_trip() -> None:
    spec = _interleaved_spec()
    restored = FeatureSpec.from_dict(spec.to_dict())
    assert restored == spec
    assert restored.fingerprint() == spec.fingerprint()
    assert restored.dense_names == spec.dense_names
    assert restored.categorical_names == spec.categorical_names
    device = restored.feature("device")
    assert isinstance(device, CategoricalFeature)
    assert device.encode_one("web") == 3


def test_fingerprint_is_short_hex_and_deterministic() -> None:
    fingerprint = _interleaved_spec().fingerprint()
    assert fingerprint == _interleaved_spec().fingerprint()
    assert len(fingerprint) == 16
    int(fingerprint, 16)


def _modified(change: dict[str, Any], name: str) -> FeatureSpec:
    data = _interleaved_spec().to_dict()
    for item in data["features"]:
        if item["name"] == name:
            item.update(change)
    return FeatureSpec.from_dict(data)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("device", {"vocabulary": ["ios", "android", "web", "tv"]}),
        ("device", {"vocabulary": ["android", "ios", "web"]}),  # same values, other ids
        ("ad_dense_a", {"default": -2.5}),
        ("user_cat_a", {"hash_buckets": 17}),
    ],
)
def test_fingerprint_changes_with_an_encoding(name: str, change: dict[str, Any]) -> None:
    assert _modified(change, name).fingerprint() != _interleaved_spec().fingerprint()


def test_fingerprint_changes_with_schema_version() -> None:
    spec = _interleaved_spec()
    other = FeatureSpec(schema_version=spec.schema_version + 1, features=spec.features)
    assert other.fingerprint() != spec.fingerprint()


def test_from_dict_missing_key_names_it() -> None:
    data = _interleaved_spec().to_dict()
    del data["features"][0]["source"]
    with pytest.raises(SpecError, match=r"malformed feature spec.*'source'"):
        FeatureSpec.from_dict(data)


def test_from_dict_missing_features_names_it() -> None:
    with pytest.raises(SpecError, match="'features'"):
        FeatureSpec.from_dict({"schema_version": 1})


def test_from_dict_missing_schema_version_names_it() -> None:
    data = _interleaved_spec().to_dict()
    del data["schema_version"]
    with pytest.raises(SpecError, match="'schema_version'"):
        FeatureSpec.from_dict(data)


def test_from_dict_unknown_kind() -> None:
    data = _interleaved_spec().to_dict()
    data["features"][2]["kind"] = "sparse"
    with pytest.raises(SpecError, match="user_dense_a: unknown kind 'sparse'"):
        FeatureSpec.from_dict(data)


def test_from_dict_unknown_source() -> None:
    data = _interleaved_spec().to_dict()
    data["features"][1]["source"] = "session"
    with pytest.raises(SpecError, match="ad_cat_a: unknown source 'session'"):
        FeatureSpec.from_dict(data)


def test_from_dict_not_a_list_of_objects() -> None:
    with pytest.raises(SpecError, match="malformed feature spec"):
        FeatureSpec.from_dict({"schema_version": 1, "features": ["user_id"]})


def test_from_dict_inconsistent_feature_is_a_spec_error() -> None:
    data = _interleaved_spec().to_dict()
    data["features"][3]["hash_buckets"] = 8  # device now has a vocabulary and buckets
    with pytest.raises(SpecError, match="exactly one"):
        FeatureSpec.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [("default", "high"), ("hash_buckets", "many")],
)
def test_from_dict_wrong_value_type_is_a_spec_error(field: str, value: str) -> None:
    # The registry turns SpecError (and only SpecError) into a clean load failure, so a
    # value of the wrong type in metadata.json must not escape as a bare ValueError.
    name = "ad_dense_a" if field == "default" else "user_cat_a"
    data = _interleaved_spec().to_dict()
    for item in data["features"]:
        if item["name"] == name:
            item[field] = value
    with pytest.raises(SpecError):
        FeatureSpec.from_dict(data)


def test_from_dict_non_numeric_schema_version_is_a_spec_error() -> None:
    data = _interleaved_spec().to_dict()
    data["schema_version"] = "one"
    with pytest.raises(SpecError):
        FeatureSpec.from_dict(data)
