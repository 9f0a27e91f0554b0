"""A synthetic conversion data set whose true conversion probability is known.

A "world" of users and ads is drawn once from a seed; impressions (user, ad, request context)
are drawn from it with Zipf-popular users and ads. The true log-odds of a conversion are

    base + user effect + ad effect + advertiser effect        (high-cardinality id effects)
         + affinity[user segment, ad category]                (user x ad interaction)
         + daypart[hour, placement]                           (context x context interaction)
         - price sensitivity(user) x log price(ad)            (dense x dense interaction)
         + latent(user) . latent(ad)                          (id x id interaction)
         + device x creative type, country, placement, quality

Only part of this is observable: ids (hashed), segments, categories, noisy historical rates and
noisy sensitivity estimates. Scoring with the true probability gives the oracle AUC and log loss,
the ceiling any model trained on these features can approach. Only numpy: the feature loader
uses this module on machines without torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from feature_client.loader import EntityBatch, load_arrays, stamp_schema
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from feature_client.store import FeatureStore

SCHEMA_VERSION = 1
DEVICES = ("ios", "android", "web")
COUNTRIES = ("US", "GB", "DE", "FR", "JP", "BR", "IN", "CA", "AU", "MX")
PLACEMENTS = ("feed", "story", "search", "banner")
HOURS = tuple(str(h) for h in range(24))
SEGMENTS = tuple(f"seg{i}" for i in range(12))
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
CATEGORIES = tuple(f"cat{i}" for i in range(24))
CREATIVES = ("image", "video", "carousel", "text")
LATENT_DIM = 4

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and seed of a synthetic world; the same config always gives the same world."""

    users: int = 10_000
    ads: int = 50_000
    advertisers: int = 2_000
    seed: int = 7
    user_hash_buckets: int = 1 << 15
    ad_hash_buckets: int = 1 << 16
    advertiser_hash_buckets: int = 1 << 12

    def __post_init__(self) -> None:
        for name in ("users", "ads", "advertisers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def user_id(index: int) -> str:
    return f"u{index}"


def ad_id(index: int) -> str:
    return f"a{index}"


def build_spec(config: SyntheticConfig, dense_defaults: dict[str, float]) -> FeatureSpec:
    """The feature spec of the synthetic data set."""
    d = dense_defaults
    return FeatureSpec(
        schema_version=SCHEMA_VERSION,
        features=(
            CategoricalFeature("user_id", "user", hash_buckets=config.user_hash_buckets),
            CategoricalFeature("user_segment", "user", vocabulary=SEGMENTS),
            CategoricalFeature("user_age_band", "user", vocabulary=AGE_BANDS),
            DenseFeature("user_log_activity", "user", d["user_log_activity"]),
            DenseFeature("user_price_sensitivity", "user", d["user_price_sensitivity"]),
            DenseFeature("user_hist_cvr_logit", "user", d["user_hist_cvr_logit"]),
            CategoricalFeature("ad_id", "ad", hash_buckets=config.ad_hash_buckets),
            CategoricalFeature("advertiser_id", "ad", hash_buckets=config.advertiser_hash_buckets),
            CategoricalFeature("ad_category", "ad", vocabulary=CATEGORIES),
            CategoricalFeature("creative_type", "ad", vocabulary=CREATIVES),
            DenseFeature("ad_log_price", "ad", d["ad_log_price"]),
            DenseFeature("ad_quality", "ad", d["ad_quality"]),
            DenseFeature("ad_hist_cvr_logit", "ad", d["ad_hist_cvr_logit"]),
            CategoricalFeature("device", "context", vocabulary=DEVICES),
            CategoricalFeature("country", "context", vocabulary=COUNTRIES),
            CategoricalFeature("hour", "context", vocabulary=HOURS),
            CategoricalFeature("placement", "context", vocabulary=PLACEMENTS),
        ),
    )


@dataclass(frozen=True)
class EntityTable:
    """Raw observable features of users or ads, one row per entity, plus encoded arrays."""

    keys: list[str]
    """Entity ids as the API receives them ("u42", "a7")."""
    dense: npt.NDArray[np.float32]
    """[entities, dense features] in spec order."""
    ids: npt.NDArray[np.int32]
    """[entities, categorical features] encoded ids in spec order."""


@dataclass(frozen=True)
class Impressions:
    """Sampled impressions: who saw what, where, the true probability and the outcome."""

    user_index: IntArray
    ad_index: IntArray
    context_ids: npt.NDArray[np.int32]
    """[rows, 4] encoded device, country, hour, placement."""
    probability: FloatArray
    label: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.label)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> FloatArray:
    """Popularity weights 1/rank^exponent, assigned to entities in random order."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    rng.shuffle(weights)
    weights /= weights.sum()
    return weights


class SyntheticWorld:
    """Users, ads and the hidden effects that decide conversions."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        n_users, n_ads, n_adv = config.users, config.ads, config.advertisers

        # Users: popularity, observable attributes, hidden effects.
        self.user_weights = _zipf_weights(n_users, 0.7, rng)
        self.user_segment = rng.choice(len(SEGMENTS), n_users, p=rng.dirichlet(np.full(12, 3.0)))
        self.user_age_band = rng.choice(len(AGE_BANDS), n_users, p=rng.dirichlet(np.full(6, 4.0)))
        self.user_device = rng.choice(len(DEVICES), n_users, p=[0.45, 0.4, 0.15])
        self.user_country = rng.choice(len(COUNTRIES), n_users, p=rng.dirichlet(np.full(10, 1.5)))
        user_log_activity = rng.normal(0.0, 1.0, n_users)
        self.user_effect = 0.25 * user_log_activity + rng.normal(0.0, 0.55, n_users)
        self.user_price_sensitivity = rng.normal(0.0, 1.0, n_users)
        self.user_latent = rng.normal(0.0, 1.0, (n_users, LATENT_DIM))
        # Historical rates are precise for popular users, noisy for rare ones.
        user_history = self.user_weights * n_users * 50
        user_hist = self.user_effect + rng.normal(0.0, 1.0, n_users) / np.sqrt(1 + user_history)
        observed_sensitivity = self.user_price_sensitivity + rng.normal(0.0, 0.5, n_users)

        # Ads: popularity, advertiser, category, price, hidden effects.
        self.ad_weights = _zipf_weights(n_ads, 0.9, rng)
        adv_weights = _zipf_weights(n_adv, 1.1, rng)
        self.ad_advertiser = rng.choice(n_adv, n_ads, p=adv_weights)
        adv_category = rng.integers(0, len(CATEGORIES), n_adv)
        own_category = rng.random(n_ads) < 0.7
        self.ad_category = np.where(
            own_category, adv_category[self.ad_advertiser], rng.integers(0, 24, n_ads)
        )
        self.ad_creative = rng.choice(len(CREATIVES), n_ads, p=[0.5, 0.25, 0.15, 0.1])
        category_price = rng.normal(3.0, 0.8, len(CATEGORIES))
        self.ad_log_price = category_price[self.ad_category] + rng.normal(0.0, 0.6, n_ads)
        self.ad_quality = rng.normal(0.0, 1.0, n_ads)
        self.ad_effect = rng.normal(0.0, 0.5, n_ads)
        self.advertiser_effect = rng.normal(0.0, 0.4, n_adv)
        self.ad_latent = rng.normal(0.0, 1.0, (n_ads, LATENT_DIM))
        ad_history = self.ad_weights * n_ads * 20
        ad_truth = self.ad_effect + self.advertiser_effect[self.ad_advertiser]
        ad_hist = ad_truth + rng.normal(0.0, 1.0, n_ads) / np.sqrt(1 + ad_history)

        # Interactions and context effects.
        self.affinity = rng.normal(0.0, 0.8, (len(SEGMENTS), len(CATEGORIES)))
        peak_hour = rng.uniform(0, 24, len(PLACEMENTS))
        hours = np.arange(24)[:, None]
        self.daypart = 0.6 * np.cos(2 * np.pi * (hours - peak_hour[None, :]) / 24)
        self.device_creative = rng.normal(0.0, 0.3, (len(DEVICES), len(CREATIVES)))
        self.country_effect = rng.normal(0.0, 0.3, len(COUNTRIES))
        self.placement_effect = rng.normal(0.0, 0.3, len(PLACEMENTS))
        self.hour_weights = 1.2 + np.sin(2 * np.pi * (np.arange(24) - 9) / 24)
        self.hour_weights /= self.hour_weights.sum()
        self.mean_log_price = float(self.ad_log_price.mean())
        self.base_logit = -4.6

        user_dense = np.column_stack([user_log_activity, observed_sensitivity, user_hist])
        ad_dense = np.column_stack([self.ad_log_price, self.ad_quality, ad_hist])
        defaults = dict(
            zip(
                ["user_log_activity", "user_price_sensitivity", "user_hist_cvr_logit"],
                user_dense.mean(axis=0).round(6).tolist(),
                strict=True,
            )
        ) | dict(
            zip(
                ["ad_log_price", "ad_quality", "ad_hist_cvr_logit"],
                ad_dense.mean(axis=0).round(6).tolist(),
                strict=True,
            )
        )
        self.spec = build_spec(config, defaults)
        user_keys = [user_id(i) for i in range(n_users)]
        ad_keys = [ad_id(i) for i in range(n_ads)]
        user_id_feature, ad_id_feature, advertiser_feature = (
            self.spec.feature(name) for name in ("user_id", "ad_id", "advertiser_id")
        )
        assert isinstance(user_id_feature, CategoricalFeature)
        assert isinstance(ad_id_feature, CategoricalFeature)
        assert isinstance(advertiser_feature, CategoricalFeature)
        advertiser_ids = advertiser_feature.encode(f"adv{i}" for i in range(n_adv))
        self.users = EntityTable(
            keys=user_keys,
            dense=user_dense.astype(np.float32),
            ids=np.column_stack(
                [user_id_feature.encode(user_keys), self.user_segment + 1, self.user_age_band + 1]
            ).astype(np.int32),
        )
        self.ads = EntityTable(
            keys=ad_keys,
            dense=ad_dense.astype(np.float32),
            ids=np.column_stack(
                [
                    ad_id_feature.encode(ad_keys),
                    advertiser_ids[self.ad_advertiser],
                    self.ad_category + 1,
                    self.ad_creative + 1,
                ]
            ).astype(np.int32),
        )

    def true_logit(
        self,
        user: IntArray,
        ad: IntArray,
        device: IntArray,
        country: IntArray,
        hour: IntArray,
        placement: IntArray,
    ) -> FloatArray:
        """The hidden log-odds of conversion of each impression."""
        latent = (self.user_latent[user] * self.ad_latent[ad]).sum(axis=1) * 0.2
        price = (
            -0.45
            * self.user_price_sensitivity[user]
            * (self.ad_log_price[ad] - self.mean_log_price)
        )
        logit: FloatArray = (
            self.base_logit
            + self.user_effect[user]
            + self.ad_effect[ad]
            + self.advertiser_effect[self.ad_advertiser[ad]]
            + 0.25 * self.ad_quality[ad]
            + self.affinity[self.user_segment[user], self.ad_category[ad]]
            + self.daypart[hour, placement]
            + price
            + latent
            + self.device_creative[device, self.ad_creative[ad]]
            + self.country_effect[country]
            + self.placement_effect[placement]
        )
        return logit

    def sample(self, rows: int, seed: int) -> Impressions:
        """Draw `rows` impressions with their true probabilities and sampled outcomes."""
        rng = np.random.default_rng([self.config.seed, seed])
        user = rng.choice(self.config.users, rows, p=self.user_weights)
        ad = rng.choice(self.config.ads, rows, p=self.ad_weights)
        device = np.where(rng.random(rows) < 0.85, self.user_device[user], rng.integers(0, 3, rows))
        country = np.where(
            rng.random(rows) < 0.95, self.user_country[user], rng.integers(0, 10, rows)
        )
        hour = rng.choice(24, rows, p=self.hour_weights)
        placement = rng.choice(len(PLACEMENTS), rows, p=[0.45, 0.2, 0.2, 0.15])
        probability = 1.0 / (
            1.0 + np.exp(-self.true_logit(user, ad, device, country, hour, placement))
        )
        label = (rng.random(rows) < probability).astype(np.float32)
        # Vocabulary ids are position + 1, exactly as CategoricalFeature.encode_one gives them.
        context_ids = np.column_stack([device, country, hour, placement]).astype(np.int32) + 1
        return Impressions(user, ad, context_ids, probability, label)

    def checksum(self) -> str:
        """Digest of every entity feature vector: equal checksums mean identical online features."""
        digest = hashlib.sha256()
        for table in (self.users, self.ads):
            digest.update(np.ascontiguousarray(table.dense).tobytes())
            digest.update(np.ascontiguousarray(table.ids).tobytes())
        return digest.hexdigest()[:16]


class DatasetMismatch(ValueError):
    """The regenerated synthetic world is not the one a model was trained on."""


def world_for_model(dataset: dict[str, object] | None, spec_fingerprint: str) -> SyntheticWorld:
    """Rebuild the synthetic world a model's metadata describes, and prove it is the same one."""
    if not dataset or dataset.get("kind") != "synthetic":
        raise DatasetMismatch(
            "this model was not trained on the synthetic data set: load its features from files"
        )
    config = SyntheticConfig(**dataset["config"])  # type: ignore[arg-type]
    world = SyntheticWorld(config)
    if world.spec.fingerprint() != spec_fingerprint:
        raise DatasetMismatch("the synthetic feature spec differs from the model's")
    if world.checksum() != dataset.get("checksum"):
        raise DatasetMismatch(
            f"the regenerated features (checksum {world.checksum()}) differ from those the "
            f"model was trained on ({dataset.get('checksum')}); was numpy's generator changed?"
        )
    return world


def same_encoding(a: FeatureSpec, b: FeatureSpec) -> bool:
    """Whether two specs lay out and encode features identically (dense defaults aside)."""

    def layout(spec: FeatureSpec) -> list[dict[str, object]]:
        return [{k: v for k, v in f.items() if k != "default"} for f in spec.to_dict()["features"]]

    return a.schema_version == b.schema_version and layout(a) == layout(b)


async def load_world_features(
    store: FeatureStore,
    world: SyntheticWorld,
    *,
    spec: FeatureSpec | None = None,
    progress: bool = True,
) -> int:
    """Write every user's and ad's features, then the schema stamp; returns entities written.

    `spec` stamps the features with a model's spec instead of the world's own: a larger world
    drawn with the same buckets and vocabularies encodes identically (benchmarks use this).
    """
    spec = spec or world.spec
    if not same_encoding(spec, world.spec):
        raise DatasetMismatch("the spec does not encode features like this world's spec")
    written = 0
    for source, table in (("user", world.users), ("ad", world.ads)):
        written += await load_arrays(
            store,
            spec,
            source,  # type: ignore[arg-type]
            EntityBatch(table.keys, table.dense, table.ids),
            progress=progress,
        )
    await stamp_schema(store, spec)
    return written
