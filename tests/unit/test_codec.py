"""EntityCodec: the binary layout of stored feature vectors and how bad values are handled."""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pytest

from feature_client.codec import MAGIC, EntityCodec
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec


def _spec(schema_version: int = 1) -> FeatureSpec:
    return FeatureSpec(
        schema_version=schema_version,
        features=(
            CategoricalFeature("user_id", "user", hash_buckets=1024),
            DenseFeature("user_activity", "user", default=0.5),
            CategoricalFeature("user_segment", "user", vocabulary=("s1", "s2", "s3")),
            DenseFeature("user_price", "user", default=-1.25),
            CategoricalFeature("user_age", "user", vocabulary=("young", "old")),
            CategoricalFeature("ad_id", "ad", hash_buckets=2048),
            DenseFeature("ad_price", "ad", default=2.0),
            CategoricalFeature("device", "context", vocabulary=("ios", "android")),
            DenseFeature("ctx_score", "context", default=9.0),
        ),
    )


SPEC = _spec()
USER_DENSE, USER_IDS = 2, 3
USER_DEFAULTS = [0.5, -1.25]


def _rows(n: int, seed: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, USER_DENSE)).astype(np.float32) * 100
    ids = rng.integers(-(2**31), 2**31 - 1, (n, USER_IDS)).astype(np.int32)
    return dense, ids


def test_value_layout_is_header_then_dense_then_ids() -> None:
    codec = EntityCodec(SPEC, "user")
    assert codec.value_size == 2 + 2 + 4 * USER_DENSE + 4 * USER_IDS
    dense = np.array([[1.5, -3.0]], dtype=np.float32)
    ids = np.array([[7, 0, 2]], dtype=np.int32)
    (value,) = codec.encode(dense, ids)
    assert len(value) == codec.value_size
    assert struct.unpack("<HHffiii", value) == (MAGIC, 1, 1.5, -3.0, 7, 0, 2)


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_round_trip_of_random_rows(rows: int) -> None:
    codec = EntityCodec(SPEC, "user")
    dense, ids = _rows(rows, seed=rows)
    values = codec.encode(dense, ids)
    assert len(values) == rows
    assert all(len(v) == codec.value_size for v in values)
    decoded = codec.decode(values)
    assert decoded.dense.dtype == np.float32
    assert decoded.ids.dtype == np.int32
    np.testing.assert_array_equal(decoded.dense, dense)
    np.testing.assert_array_equal(decoded.ids, ids)
    assert decoded.found.tolist() == [True] * rows
    assert decoded.rejected == 0
    assert decoded.missing == 0


def test_round_trip_for_the_other_entity_kind() -> None:
    codec = EntityCodec(SPEC, "ad")
    dense = np.array([[3.25], [-0.5]], dtype=np.float32)
    ids = np.array([[11], [2047]], dtype=np.int32)
    decoded = codec.decode(codec.encode(dense, ids))
    np.testing.assert_array_equal(decoded.dense, dense)
    np.testing.assert_array_equal(decoded.ids, ids)


def test_missing_values_decode_to_defaults() -> None:
    codec = EntityCodec(SPEC, "user")
    decoded = codec.decode([None, None])
    assert decoded.dense.tolist() == [USER_DEFAULTS, USER_DEFAULTS]
    assert decoded.ids.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert decoded.found.tolist() == [False, False]
    assert decoded.rejected == 0  # absent is not rejected
    assert decoded.missing == 2


def test_mix_of_present_and_missing_keeps_row_order() -> None:
    codec = EntityCodec(SPEC, "user")
    dense, ids = _rows(3, seed=11)
    encoded = codec.encode(dense, ids)
    decoded = codec.decode([None, encoded[2], encoded[0], None, encoded[1]])
    assert decoded.found.tolist() == [False, True, True, False, True]
    np.testing.assert_array_equal(decoded.dense[[1, 2, 4]], dense[[2, 0, 1]])
    np.testing.assert_array_equal(decoded.ids[[1, 2, 4]], ids[[2, 0, 1]])
    assert decoded.dense[[0, 3]].tolist() == [USER_DEFAULTS, USER_DEFAULTS]
    assert decoded.ids[[0, 3]].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert decoded.rejected == 0
    assert decoded.missing == 2


def _bad_values(good: bytes) -> dict[str, bytes]:
    wrong_magic = bytearray(good)
    struct.pack_into("<H", wrong_magic, 0, 0xBEEF)
    return {
        "truncated": good[:-1],
        "extended": good + b"\x00",
        "empty": b"",
        "doubled": good + good,
        "wrong_magic": bytes(wrong_magic),
        "other_schema": EntityCodec(_spec(schema_version=2), "user").encode(*_rows(1, seed=5))[0],
    }


@pytest.mark.parametrize(
    "kind", ["truncated", "extended", "empty", "doubled", "wrong_magic", "other_schema"]
)
def test_unreadable_value_is_missing_and_rejected(kind: str) -> None:
    codec = EntityCodec(SPEC, "user")
    dense, ids = _rows(2, seed=3)
    good = codec.encode(dense, ids)
    bad = _bad_values(good[0])[kind]
    decoded = codec.decode([good[0], bad, None, good[1]])
    assert decoded.found.tolist() == [True, False, False, True]
    assert decoded.rejected == 1
    assert decoded.missing == 2  # the rejected value and the absent one
    assert decoded.dense[1].tolist() == USER_DEFAULTS
    assert decoded.ids[1].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(decoded.dense[[0, 3]], dense)
    np.testing.assert_array_equal(decoded.ids[[0, 3]], ids)


def test_every_kind_of_bad_value_is_counted() -> None:
    codec = EntityCodec(SPEC, "user")
    bad = list(_bad_values(codec.encode(*_rows(1))[0]).values())
    decoded = codec.decode([*bad, None])
    assert decoded.rejected == len(bad)
    assert decoded.missing == len(bad) + 1
    assert not decoded.found.any()


def test_same_layout_other_schema_version_is_rejected_both_ways() -> None:
    old, new = EntityCodec(_spec(1), "user"), EntityCodec(_spec(2), "user")
    assert old.value_size == new.value_size
    dense, ids = _rows(2)
    assert new.decode(old.encode(dense, ids)).rejected == 2
    assert old.decode(new.encode(dense, ids)).rejected == 2


@pytest.mark.parametrize("kind", ["wrong_magic", "other_schema"])
def test_a_bad_header_among_well_sized_values_is_rejected_alone(kind: str) -> None:
    # Every value present and of the right size: the header check alone tells the bad one.
    codec = EntityCodec(SPEC, "user")
    dense, ids = _rows(3, seed=7)
    good = codec.encode(dense, ids)
    bad = _bad_values(good[1])[kind]
    assert len(bad) == codec.value_size
    decoded = codec.decode([good[0], bad, good[2]])
    assert decoded.found.tolist() == [True, False, True]
    assert (decoded.rejected, decoded.missing) == (1, 1)
    assert decoded.dense[1].tolist() == USER_DEFAULTS
    np.testing.assert_array_equal(decoded.dense[[0, 2]], dense[[0, 2]])
    np.testing.assert_array_equal(decoded.ids[[0, 2]], ids[[0, 2]])


def test_decoding_an_empty_list() -> None:
    decoded = EntityCodec(SPEC, "user").decode([])
    assert decoded.dense.shape == (0, USER_DENSE)
    assert decoded.ids.shape == (0, USER_IDS)
    assert decoded.found.shape == (0,)
    assert decoded.rejected == 0


def test_encoding_no_rows() -> None:
    codec = EntityCodec(SPEC, "user")
    empty_dense = np.zeros((0, USER_DENSE), dtype=np.float32)
    empty_ids = np.zeros((0, USER_IDS), dtype=np.int32)
    assert codec.encode(empty_dense, empty_ids) == []


def test_entity_without_dense_features() -> None:
    spec = FeatureSpec(
        schema_version=4,
        features=(
            CategoricalFeature("ad_id", "ad", hash_buckets=16),
            CategoricalFeature("creative", "ad", vocabulary=("image", "video")),
        ),
    )
    codec = EntityCodec(spec, "ad")
    assert codec.value_size == 4 + 8
    ids = np.array([[3, 2], [15, 1]], dtype=np.int32)
    values = codec.encode(np.zeros((2, 0), dtype=np.float32), ids)
    decoded = codec.decode([values[1], None, values[0]])
    assert decoded.dense.shape == (3, 0)
    assert decoded.ids.tolist() == [[15, 1], [0, 0], [3, 2]]
    assert decoded.found.tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("dense_shape", "ids_shape"),
    [
        ((2, USER_DENSE + 1), (2, USER_IDS)),  # one dense column too many
        ((2, USER_DENSE - 1), (2, USER_IDS)),  # one too few
        ((2, USER_DENSE), (2, USER_IDS + 1)),
        ((2, USER_DENSE), (2, USER_IDS - 1)),
        ((2, USER_DENSE), (3, USER_IDS)),  # row counts differ
        ((3, USER_DENSE), (2, USER_IDS)),
        ((USER_DENSE,), (1, USER_IDS)),  # one row, not a matrix
        ((1, USER_DENSE), (USER_IDS,)),
        ((2, USER_DENSE, 1), (2, USER_IDS)),
    ],
)
def test_encode_rejects_wrong_shapes(
    dense_shape: tuple[int, ...], ids_shape: tuple[int, ...]
) -> None:
    codec = EntityCodec(SPEC, "user")
    with pytest.raises(ValueError, match="user features: expected dense"):
        codec.encode(np.zeros(dense_shape, dtype=np.float32), np.zeros(ids_shape, dtype=np.int32))
