"""Input assembly: block layout and broadcasting, and the request context as blocks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from feature_client.assembly import (
    DENSE_INPUT,
    IDS_INPUT,
    ContextEncoder,
    ContextError,
    _fill,
    assemble_inputs,
    context_blocks,
)
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec

HOURS = tuple(str(h) for h in range(24))

SPEC = FeatureSpec(
    schema_version=1,
    features=(
        CategoricalFeature("user_id", "user", hash_buckets=64),
        DenseFeature("bid_floor", "context", default=0.25),
        CategoricalFeature("device", "context", vocabulary=("ios", "android", "web")),
        DenseFeature("ad_price", "ad", default=2.0),
        CategoricalFeature("hour", "context", vocabulary=HOURS),
        DenseFeature("page_depth", "context", default=-1.0),
    ),
)


def _f32(rows: list[list[float]]) -> npt.NDArray[np.float32]:
    return np.array(rows, dtype=np.float32)


def _i32(rows: list[list[int]]) -> npt.NDArray[np.int32]:
    return np.array(rows, dtype=np.int32)


# --- assemble_inputs -------------------------------------------------------------------------


def test_blocks_side_by_side_in_order_with_broadcast() -> None:
    user_dense = _f32([[1.0, 2.0]])  # one row: broadcast
    ad_dense = _f32([[10.0], [20.0], [30.0]])
    context_dense = _f32([[-5.0]])
    user_ids = _i32([[7]])
    ad_ids = _i32([[100, 101], [200, 201], [300, 301]])
    context_ids = _i32([[4, 5, 6]])
    inputs = assemble_inputs(
        3, [user_dense, ad_dense, context_dense], [user_ids, ad_ids, context_ids]
    )
    assert len(inputs) == 3
    assert inputs.dense.tolist() == [
        [1.0, 2.0, 10.0, -5.0],
        [1.0, 2.0, 20.0, -5.0],
        [1.0, 2.0, 30.0, -5.0],
    ]
    assert inputs.ids.tolist() == [
        [7, 100, 101, 4, 5, 6],
        [7, 200, 201, 4, 5, 6],
        [7, 300, 301, 4, 5, 6],
    ]


def test_output_dtypes_are_float32_and_int64() -> None:
    inputs = assemble_inputs(2, [_f32([[0.5], [1.5]])], [_i32([[2**31 - 1], [-7]])])
    assert inputs.dense.dtype == np.float32
    assert inputs.ids.dtype == np.int64
    assert inputs.ids.tolist() == [[2**31 - 1], [-7]]
    feed = inputs.as_feed()
    assert set(feed) == {DENSE_INPUT, IDS_INPUT}
    assert feed[DENSE_INPUT] is inputs.dense
    assert feed[IDS_INPUT] is inputs.ids


def test_one_row_blocks_fill_every_row() -> None:
    inputs = assemble_inputs(5, [_f32([[3.0, 4.0]])], [_i32([[9]])])
    assert inputs.dense.shape == (5, 2)
    assert (inputs.dense == np.array([3.0, 4.0], dtype=np.float32)).all()
    assert (inputs.ids == 9).all()


def test_empty_blocks_take_no_columns() -> None:
    inputs = assemble_inputs(
        2,
        [_f32([[1.0]]), np.zeros((2, 0), dtype=np.float32), _f32([[2.0]])],
        [np.zeros((1, 0), dtype=np.int32), _i32([[3], [4]])],
    )
    assert inputs.dense.tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert inputs.ids.tolist() == [[3], [4]]


def test_block_with_the_wrong_row_count_raises() -> None:
    with pytest.raises(ValueError):
        assemble_inputs(4, [_f32([[1.0], [2.0], [3.0]])], [_i32([[1]])])
    with pytest.raises(ValueError):
        assemble_inputs(2, [_f32([[1.0]])], [_i32([[1], [2], [3]])])


def test_blocks_that_do_not_cover_the_width_raise() -> None:
    too_wide = np.empty((2, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="blocks cover 3 columns, the model expects 5"):
        _fill(too_wide, [_f32([[1.0, 2.0]]), _f32([[3.0], [4.0]])])
    exact = np.empty((2, 3), dtype=np.float32)
    _fill(exact, [_f32([[1.0, 2.0]]), _f32([[3.0], [4.0]])])
    assert exact.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 4.0]]


# --- context_blocks --------------------------------------------------------------------------


def test_context_blocks_shapes_and_dtypes() -> None:
    dense, ids = context_blocks(SPEC, {"device": "web", "hour": 3, "bid_floor": 1.5})
    assert dense.shape == (1, 2)
    assert dense.dtype == np.float32
    assert ids.shape == (1, 2)
    assert ids.dtype == np.int32
    # context order: dense bid_floor, page_depth; categorical device, hour
    assert dense.tolist() == [[1.5, -1.0]]
    assert ids.tolist() == [[3, 4]]


def test_hour_as_int_or_text_gives_the_same_id() -> None:
    _, as_int = context_blocks(SPEC, {"hour": 14})
    _, as_text = context_blocks(SPEC, {"hour": "14"})
    assert as_int.tolist() == as_text.tolist() == [[0, 15]]


def test_unknown_keys_are_ignored() -> None:
    plain = context_blocks(SPEC, {"device": "ios"})
    extra = context_blocks(SPEC, {"device": "ios", "browser": "lynx", "weather": 3.5})
    assert plain[0].tolist() == extra[0].tolist()
    assert plain[1].tolist() == extra[1].tolist() == [[1, 0]]


def test_absent_features_take_unknown_id_and_dense_default() -> None:
    dense, ids = context_blocks(SPEC, {})
    assert dense.tolist() == [[0.25, -1.0]]
    assert ids.tolist() == [[0, 0]]


def test_unknown_values_take_the_unknown_id() -> None:
    _, ids = context_blocks(SPEC, {"device": "blackberry", "hour": 24})
    assert ids.tolist() == [[0, 0]]


def test_integer_dense_values_are_accepted() -> None:
    dense, _ = context_blocks(SPEC, {"bid_floor": 3, "page_depth": 2.5})
    assert dense.tolist() == [[3.0, 2.5]]


@pytest.mark.parametrize(
    ("feature", "value"),
    [
        ("device", True),
        ("device", False),
        ("device", {"os": "ios"}),
        ("device", ["ios"]),
        ("hour", 14.0),
        ("bid_floor", True),
        ("bid_floor", {"v": 1}),
        ("bid_floor", "1.5"),
    ],
)
def test_wrong_value_types_raise_context_error_naming_the_feature(
    feature: str, value: object
) -> None:
    with pytest.raises(ContextError) as caught:
        context_blocks(SPEC, {feature: value})  # type: ignore[dict-item]
    assert caught.value.feature == feature
    assert str(caught.value).startswith(f"{feature}: ")
    assert isinstance(caught.value, ValueError)


# --- ContextEncoder: context_blocks remembered per distinct context ----------------------------


def test_context_encoder_gives_the_blocks_of_context_blocks_and_remembers_them() -> None:
    encoder = ContextEncoder(SPEC)
    context: dict[str, str | int | float] = {"device": "web", "hour": 3, "bid_floor": 1.5}
    first = encoder.blocks(context)
    expected = context_blocks(SPEC, context)
    assert [b.tolist() for b in first] == [b.tolist() for b in expected]
    again = encoder.blocks(dict(context))
    assert again[0] is first[0] and again[1] is first[1]
    other = encoder.blocks({"device": "ios"})
    assert other[1].tolist() == [[1, 0]]


def test_remembered_blocks_are_read_only() -> None:
    dense, ids = ContextEncoder(SPEC).blocks({"device": "web"})
    with pytest.raises(ValueError):
        dense[0, 0] = 9.0
    with pytest.raises(ValueError):
        ids[0, 0] = 9


def test_context_encoder_tells_equal_values_of_other_types_apart() -> None:
    # 14 == 14.0 == True in Python; only 14 is a valid hour, and True is no device.
    encoder = ContextEncoder(SPEC)
    assert encoder.blocks({"hour": 14})[1].tolist() == [[0, 15]]
    with pytest.raises(ContextError):
        encoder.blocks({"hour": 14.0})
    assert encoder.blocks({"device": 1})[1].tolist() == [[0, 0]]
    with pytest.raises(ContextError):
        encoder.blocks({"device": True})


def test_context_encoder_refuses_what_context_blocks_refuses_every_time() -> None:
    encoder = ContextEncoder(SPEC)
    for _ in range(2):
        with pytest.raises(ContextError):
            encoder.blocks({"device": ["ios"]})  # type: ignore[dict-item]


def test_context_encoder_stays_right_past_its_capacity() -> None:
    encoder = ContextEncoder(SPEC, capacity=3)
    for _ in range(2):
        for hour in range(10):
            assert encoder.blocks({"hour": hour})[1].tolist() == [[0, hour + 1]]
