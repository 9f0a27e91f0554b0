"""The synthetic world: determinism, realistic rates, encodings shared with the spec."""

from __future__ import annotations

import numpy as np
import pytest

from feature_client.spec import CategoricalFeature, FeatureSource
from models.evaluation import roc_auc
from models.synthetic import (
    COUNTRIES,
    DEVICES,
    HOURS,
    PLACEMENTS,
    DatasetMismatch,
    EntityTable,
    SyntheticConfig,
    SyntheticWorld,
    world_for_model,
)

SMALL = SyntheticConfig(users=2000, ads=5000, advertisers=300)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(SMALL)


def _categorical(world: SyntheticWorld, name: str) -> CategoricalFeature:
    feature = world.spec.feature(name)
    assert isinstance(feature, CategoricalFeature)
    return feature


def test_same_config_same_checksum(world: SyntheticWorld) -> None:
    again = SyntheticWorld(SyntheticConfig(users=2000, ads=5000, advertisers=300))
    assert again.checksum() == world.checksum()
    assert again.spec == world.spec
    assert again.spec.fingerprint() == world.spec.fingerprint()
    np.testing.assert_array_equal(again.users.dense, world.users.dense)
    np.testing.assert_array_equal(again.ads.ids, world.ads.ids)


def test_other_seed_other_checksum(world: SyntheticWorld) -> None:
    other = SyntheticWorld(SyntheticConfig(users=2000, ads=5000, advertisers=300, seed=8))
    assert other.checksum() != world.checksum()


def test_other_size_other_checksum(world: SyntheticWorld) -> None:
    other = SyntheticWorld(SyntheticConfig(users=2001, ads=5000, advertisers=300))
    assert other.checksum() != world.checksum()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="users must be at least 1"):
        SyntheticConfig(users=0)
    with pytest.raises(ValueError, match="advertisers"):
        SyntheticConfig(advertisers=-1)


def test_sample_is_deterministic_for_the_same_seed(world: SyntheticWorld) -> None:
    first = world.sample(5000, seed=3)
    second = world.sample(5000, seed=3)
    third = world.sample(5000, seed=4)
    for name in ("user_index", "ad_index", "context_ids", "probability", "label"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert len(first) == 5000
    assert not np.array_equal(first.user_index, third.user_index)
    assert not np.array_equal(first.probability, third.probability)


def test_sample_is_the_same_from_a_rebuilt_world(world: SyntheticWorld) -> None:
    rebuilt = SyntheticWorld(SMALL)
    np.testing.assert_array_equal(
        rebuilt.sample(1000, seed=9).probability, world.sample(1000, seed=9).probability
    )


def test_sample_shapes_and_ranges(world: SyntheticWorld) -> None:
    impressions = world.sample(10_000, seed=1)
    assert impressions.context_ids.shape == (10_000, 4)
    assert impressions.context_ids.dtype == np.int32
    assert impressions.user_index.min() >= 0
    assert impressions.user_index.max() < SMALL.users
    assert impressions.ad_index.min() >= 0
    assert impressions.ad_index.max() < SMALL.ads
    assert ((impressions.probability > 0) & (impressions.probability < 1)).all()
    assert set(np.unique(impressions.label).tolist()) == {0.0, 1.0}


def test_base_rate_is_realistic(world: SyntheticWorld) -> None:
    impressions = world.sample(200_000, seed=11)
    rate = float(impressions.label.mean())
    assert 0.01 < rate < 0.06
    # labels are drawn from the probabilities: the rates agree within sampling noise
    assert rate == pytest.approx(float(impressions.probability.mean()), abs=0.002)


def test_oracle_auc_of_the_default_world() -> None:
    impressions = SyntheticWorld(SyntheticConfig()).sample(200_000, seed=1)
    assert 0.75 < roc_auc(impressions.label, impressions.probability) < 0.90


def test_context_ids_equal_the_spec_encoding(world: SyntheticWorld) -> None:
    impressions = world.sample(20_000, seed=2)
    columns = [("device", DEVICES), ("country", COUNTRIES), ("hour", HOURS)]
    columns.append(("placement", PLACEMENTS))
    for column, (name, vocabulary) in enumerate(columns):
        ids = impressions.context_ids[:, column]
        assert ids.min() >= 1  # no impression has an unknown context value
        assert ids.max() <= len(vocabulary)
        assert len(np.unique(ids)) == len(vocabulary)  # every value occurs
        feature = _categorical(world, name)
        raw = [vocabulary[i - 1] for i in ids.tolist()]
        assert feature.encode(raw).tolist() == ids.tolist()
        assert [feature.encode_one(v) for v in vocabulary] == list(range(1, len(vocabulary) + 1))


def test_context_ids_follow_the_raw_user_attributes(world: SyntheticWorld) -> None:
    # 85 % of impressions use the user's own device and 95 % its country (the rest are drawn at
    # random and may match too), so decoded ids must point back at the raw attributes.
    impressions = world.sample(20_000, seed=5)
    device = impressions.context_ids[:, 0] - 1
    country = impressions.context_ids[:, 1] - 1
    assert (device == world.user_device[impressions.user_index]).mean() > 0.85
    assert (country == world.user_country[impressions.user_index]).mean() > 0.95


def test_user_ids_are_the_spec_encoding_of_the_keys(world: SyntheticWorld) -> None:
    assert world.users.keys[:3] == ["u0", "u1", "u2"]
    assert len(world.users.keys) == SMALL.users
    user_id = _categorical(world, "user_id")
    assert user_id.hash_buckets == SMALL.user_hash_buckets
    np.testing.assert_array_equal(world.users.ids[:, 0], user_id.encode(world.users.keys))
    assert world.users.ids[:, 0].min() >= 1


def test_ad_ids_are_the_spec_encoding_of_the_keys(world: SyntheticWorld) -> None:
    assert world.ads.keys[:2] == ["a0", "a1"]
    ad_id = _categorical(world, "ad_id")
    np.testing.assert_array_equal(world.ads.ids[:, 0], ad_id.encode(world.ads.keys))


def test_entity_tables_match_the_spec_layout(world: SyntheticWorld) -> None:
    spec = world.spec
    assert world.users.dense.shape == (SMALL.users, len(spec.dense("user")))
    assert world.users.ids.shape == (SMALL.users, len(spec.categorical("user")))
    assert world.ads.dense.shape == (SMALL.ads, len(spec.dense("ad")))
    assert world.ads.ids.shape == (SMALL.ads, len(spec.categorical("ad")))
    tables: list[tuple[EntityTable, FeatureSource]] = [(world.users, "user"), (world.ads, "ad")]
    for table, source in tables:
        for column, feature in enumerate(spec.categorical(source)):
            ids = table.ids[:, column]
            assert ids.min() >= 1 and ids.max() < feature.cardinality, feature.name


def _dataset(world: SyntheticWorld) -> dict[str, object]:
    return {"kind": "synthetic", "config": world.config.to_dict(), "checksum": world.checksum()}


def test_world_for_model_rebuilds_the_world(world: SyntheticWorld) -> None:
    rebuilt = world_for_model(_dataset(world), world.spec.fingerprint())
    assert rebuilt.config == SMALL
    assert rebuilt.checksum() == world.checksum()


@pytest.mark.parametrize("dataset", [None, {}, {"kind": "parquet", "path": "features/"}])
def test_world_for_model_refuses_other_datasets(
    world: SyntheticWorld, dataset: dict[str, object] | None
) -> None:
    with pytest.raises(DatasetMismatch, match="not trained on the synthetic"):
        world_for_model(dataset, world.spec.fingerprint())


def test_world_for_model_refuses_a_wrong_checksum(world: SyntheticWorld) -> None:
    dataset = _dataset(world) | {"checksum": "0123456789abcdef"}
    with pytest.raises(DatasetMismatch, match="0123456789abcdef"):
        world_for_model(dataset, world.spec.fingerprint())


def test_world_for_model_refuses_a_wrong_fingerprint(world: SyntheticWorld) -> None:
    with pytest.raises(DatasetMismatch, match="feature spec differs"):
        world_for_model(_dataset(world), "ffffffffffffffff")


def test_world_for_model_refuses_another_config(world: SyntheticWorld) -> None:
    # the checksum of one world with the config of another
    dataset = _dataset(world) | {"config": SMALL.to_dict() | {"seed": 8}}
    with pytest.raises(DatasetMismatch, match="differ"):
        world_for_model(dataset, world.spec.fingerprint())
