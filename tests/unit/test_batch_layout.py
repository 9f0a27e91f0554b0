"""Several requests' stored values laid out as one batch: the same rows as one by one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from feature_client.assembly import ContextBlocks, assemble_inputs, context_blocks
from feature_client.batch_layout import PendingLayout, lay_out, lay_out_one
from feature_client.codec import EntityCodec
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec


def _spec(schema_version: int = 1) -> FeatureSpec:
    """Unlike tests/fixtures.py's tiny_spec: two dense ad features and a dense context one, so
    that every block of both matrices is repeated or copied."""
    return FeatureSpec(
        schema_version=schema_version,
        features=(
            CategoricalFeature("user_id", "user", hash_buckets=1024),
            DenseFeature("user_activity", "user", default=0.5),
            CategoricalFeature("ad_id", "ad", hash_buckets=2048),
            DenseFeature("ad_d0", "ad", default=-2.0),
            DenseFeature("ad_d1", "ad", default=-3.0),
            CategoricalFeature("device", "context", vocabulary=("ios", "android")),
            DenseFeature("hour", "context", default=9.0),
        ),
    )


class World:
    """Stored values of one spec: users and ads keyed by a number."""

    def __init__(self, spec: FeatureSpec, seed: int = 0) -> None:
        self.spec = spec
        self.users = EntityCodec(spec, "user")
        self.ads = EntityCodec(spec, "ad")
        rng = np.random.default_rng(seed)
        self.user_values = self._values(self.users, 20, rng)
        self.ad_values = self._values(self.ads, 200, rng)

    @staticmethod
    def _values(codec: EntityCodec, n: int, rng: np.random.Generator) -> list[bytes]:
        dense = rng.standard_normal((n, len(codec.spec.dense(codec.source)))).astype(np.float32)
        ids = rng.integers(0, 1000, (n, len(codec.spec.categorical(codec.source)))).astype(np.int32)
        return codec.encode(dense, ids)

    def request(
        self, user: bytes | None, ads: Sequence[bytes | None], context: ContextBlocks
    ) -> PendingLayout:
        return PendingLayout(self.users, self.ads, user, list(ads), context)


WORLD = World(_spec())
IOS = context_blocks(WORLD.spec, {"device": "ios", "hour": 14})
ANDROID = context_blocks(WORLD.spec, {"device": "android"})
WRONG_SIZE = b"\x00" * 7
WRONG_SCHEMA = World(_spec(schema_version=2)).ad_values[0]


def _requests() -> list[PendingLayout]:
    ads = WORLD.ad_values
    return [
        WORLD.request(WORLD.user_values[0], ads[0:8], IOS),
        WORLD.request(None, ads[8:11], ANDROID),  # an unknown user
        WORLD.request(WORLD.user_values[2], [ads[11], None, WRONG_SIZE, ads[12]], IOS),
        WORLD.request(WRONG_SCHEMA, [WRONG_SCHEMA, ads[13]], ANDROID),  # unreadable values
        WORLD.request(WORLD.user_values[3], ads[14:15], IOS),  # one candidate
    ]


def _alone(request: PendingLayout) -> tuple[np.ndarray, np.ndarray]:
    """The request laid out the way it is on its own: decoded, then its blocks side by side."""
    user = request.user_codec.decode([request.user])
    ads = request.ad_codec.decode(request.ads)
    inputs = assemble_inputs(
        len(request.ads),
        [user.dense, ads.dense, request.context[0]],
        [user.ids, ads.ids, request.context[1]],
    )
    return inputs.dense, inputs.ids


def test_a_batch_holds_each_requests_rows_as_laid_out_alone_in_order() -> None:
    requests = _requests()
    inputs, laid = lay_out(requests)
    alone = [_alone(r) for r in requests]
    np.testing.assert_array_equal(inputs.dense, np.concatenate([d for d, _ in alone]))
    np.testing.assert_array_equal(inputs.ids, np.concatenate([i for _, i in alone]))
    assert inputs.dense.dtype == np.float32 and inputs.ids.dtype == np.int64
    for own, (dense, ids) in zip(laid, alone, strict=True):
        np.testing.assert_array_equal(own.inputs.dense, dense)
        np.testing.assert_array_equal(own.inputs.ids, ids)
        assert np.shares_memory(own.inputs.dense, inputs.dense)  # a view, not a copy


def test_each_request_gets_what_its_own_decode_found() -> None:
    requests = _requests()
    _, laid = lay_out(requests)
    for request, own in zip(requests, laid, strict=True):
        user = request.user_codec.decode([request.user])
        ads = request.ad_codec.decode(request.ads)
        assert own.user_found == bool(user.found[0])
        np.testing.assert_array_equal(own.ads_found, ads.found)
        assert (own.missing_ads, own.rejected_ads) == (ads.missing, ads.rejected)
        assert own.rejected_user == user.rejected
        assert own.seconds > 0
    # What the requests above hold, spelled out.
    assert [own.user_found for own in laid] == [True, False, True, False, True]
    assert [own.missing_ads for own in laid] == [0, 0, 2, 1, 0]
    assert [own.rejected_ads for own in laid] == [0, 0, 1, 1, 0]
    assert [own.rejected_user for own in laid] == [0, 0, 0, 1, 0]


def test_unknown_entities_take_the_specs_defaults() -> None:
    _, (own,) = lay_out([WORLD.request(None, [None, None], ANDROID)])
    # user_activity, then the ad's two dense features, then the context's hour (absent).
    np.testing.assert_array_equal(own.inputs.dense, [[0.5, -2.0, -3.0, 9.0]] * 2)
    assert not own.user_found and own.missing_ads == 2 and own.rejected_ads == 0


@pytest.mark.parametrize("count", [1, 2])
def test_one_request_matches_laying_it_out_alone(count: int) -> None:
    requests = _requests()[:count]
    inputs, laid = lay_out(requests)
    assert len(laid) == count
    expected = np.concatenate([_alone(r)[0] for r in requests])
    np.testing.assert_array_equal(inputs.dense, expected)
    user, ads, own = lay_out_one(requests[0])
    np.testing.assert_array_equal(own.dense, _alone(requests[0])[0])
    np.testing.assert_array_equal(ads.found, laid[0].ads_found)
    assert bool(user.found[0]) == laid[0].user_found


def test_requests_of_another_spec_in_one_batch_are_laid_out_each_with_its_own_codecs() -> None:
    another = World(_spec(), seed=1)  # same widths, other codecs (another version)
    mine = _requests()[0]
    theirs = another.request(another.user_values[0], another.ad_values[:3], IOS)
    inputs, laid = lay_out([mine, theirs, mine])
    np.testing.assert_array_equal(
        inputs.dense, np.concatenate([_alone(mine)[0], _alone(theirs)[0], _alone(mine)[0]])
    )
    np.testing.assert_array_equal(laid[1].inputs.ids, _alone(theirs)[1])
    assert [len(own.inputs) for own in laid] == [8, 3, 8]
