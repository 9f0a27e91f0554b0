"""Canary buckets and ServingPlan.pick; Policy and Routing; the repository's policy and routing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from service.registry import LoadedModel
from service.repository import (
    HISTORY_LENGTH,
    POLICY_FILE,
    ROUTING_FILE,
    Canary,
    ModelRepository,
    Policy,
    RepositoryError,
    Routing,
    VersionNotFound,
)
from service.routing import CANARY_BUCKETS, Route, ServingPlan, SinglePlanRouter, canary_bucket
from tests.fixtures import LinearRuntime, metadata_for, tiny_spec

SPEC = tiny_spec()
USERS = [f"u{i}" for i in range(10_000)]


def _model(version: int, name: str = "pcvr") -> LoadedModel:
    return LoadedModel.assemble(metadata_for(SPEC, name=name, version=version), LinearRuntime())


def _plan(weight: float, name: str = "pcvr") -> ServingPlan:
    return ServingPlan(name, _model(1, name), canary=_model(2, name), canary_weight=weight)


def _on_canary(plan: ServingPlan) -> set[str]:
    return {u for u in USERS if plan.pick(u)[1] == "canary"}


# -- canary_bucket and ServingPlan.pick --------------------------------------------------------


def test_canary_bucket_is_deterministic_and_in_range() -> None:
    buckets = [canary_bucket("pcvr", u) for u in USERS]
    assert buckets == [canary_bucket("pcvr", u) for u in USERS]
    assert all(0 <= b < CANARY_BUCKETS for b in buckets)
    assert len(set(buckets)) > CANARY_BUCKETS // 2  # spread, not a handful of values


def test_canary_bucket_is_salted_with_the_model_name() -> None:
    pcvr = [canary_bucket("pcvr", u) for u in USERS[:1000]]
    other = [canary_bucket("pcvr-acme", u) for u in USERS[:1000]]
    assert sum(a == b for a, b in zip(pcvr, other, strict=True)) < 10


@pytest.mark.parametrize("weight", [0.01, 0.05, 0.1, 0.25, 0.5, 0.9])
def test_canary_share_follows_the_weight(weight: float) -> None:
    share = len(_on_canary(_plan(weight))) / len(USERS)
    assert share == pytest.approx(weight, abs=0.02)


def test_full_weight_sends_everyone_to_the_canary() -> None:
    assert _on_canary(_plan(1.0)) == set(USERS)


def test_pick_returns_the_models_of_the_plan() -> None:
    plan = _plan(0.5)
    for user in USERS[:200]:
        model, role = plan.pick(user)
        assert model is (plan.canary if role == "canary" else plan.active)


def test_pick_is_sticky() -> None:
    plan = _plan(0.3)
    first = [plan.pick(u)[1] for u in USERS]
    assert first == [plan.pick(u)[1] for u in USERS]
    # another plan of the same model (a swap, a restart, another replica) picks the same users
    again = ServingPlan("pcvr", _model(1), canary=_model(3), canary_weight=0.3)
    assert first == [again.pick(u)[1] for u in USERS]


def test_raising_the_weight_only_adds_users() -> None:
    shares = [0.05, 0.1, 0.2, 0.5, 0.8]
    groups = [_on_canary(_plan(w)) for w in shares]
    for smaller, larger in itertools.pairwise(groups):
        assert smaller < larger  # a strict subset: users only join the canary


def test_without_a_canary_everyone_gets_the_active_version() -> None:
    active = _model(1)
    for plan in (ServingPlan("pcvr", active), ServingPlan("pcvr", active, canary_weight=1.0)):
        for user in USERS[:1000]:
            model, role = plan.pick(user)
            assert model is active and role == "active"


def test_versions_lists_what_the_plan_holds() -> None:
    active, canary, shadow = _model(1), _model(2), _model(3)
    assert ServingPlan("pcvr", active).versions() == [active]
    full = ServingPlan("pcvr", active, canary=canary, canary_weight=0.1, shadow=shadow)
    assert full.versions() == [active, canary, shadow]


def test_single_plan_router_routes_with_the_plan() -> None:
    shadow = _model(3)
    plan = ServingPlan("pcvr", _model(1), canary=_model(2), canary_weight=0.5, shadow=shadow)
    router = SinglePlanRouter(plan)
    for user in USERS[:100]:
        model, role = plan.pick(user)
        assert router.route("any-tenant", user) == Route(model, role, shadow)


# -- Policy ------------------------------------------------------------------------------------


def test_activated_appends_the_previous_active_to_history() -> None:
    policy = Policy(active=1).activated(2).activated(3)
    assert policy.active == 3
    assert policy.history == [1, 2]


def test_activated_caps_the_history() -> None:
    policy = Policy(active=1)
    for version in range(2, HISTORY_LENGTH + 10):
        policy = policy.activated(version)
    assert len(policy.history) == HISTORY_LENGTH
    assert policy.history[-1] == HISTORY_LENGTH + 8
    assert policy.history[0] == 9  # the oldest entries went first


def test_activating_the_canary_version_promotes_it() -> None:
    policy = Policy(active=1, canary=Canary(version=2, weight=0.1), shadow=3)
    promoted = policy.activated(2)
    assert promoted.active == 2
    assert promoted.canary is None
    assert promoted.shadow == 3
    assert promoted.history == [1]


def test_activating_another_version_keeps_the_canary() -> None:
    canary = Canary(version=2, weight=0.1)
    policy = Policy(active=1, canary=canary).activated(4)
    assert (policy.active, policy.canary, policy.history) == (4, canary, [1])


def test_activating_the_active_version_changes_nothing() -> None:
    policy = Policy(active=2, canary=Canary(version=3, weight=0.5), history=[1])
    assert policy.activated(2) == policy


def test_activated_leaves_the_original_alone() -> None:
    policy = Policy(active=1)
    policy.activated(2)
    assert policy == Policy(active=1)


def test_rolled_back_pops_the_history() -> None:
    policy = Policy(active=1).activated(2).activated(3)
    back = policy.rolled_back()
    assert (back.active, back.history) == (2, [1])
    back = back.rolled_back()
    assert (back.active, back.history) == (1, [])


def test_rolled_back_without_history_raises() -> None:
    with pytest.raises(RepositoryError, match="no earlier active version"):
        Policy(active=4).rolled_back()
    with pytest.raises(RepositoryError):
        Policy(active=1).activated(2).rolled_back().rolled_back()


@pytest.mark.parametrize(
    "fields",
    [{"active": 0}, {"active": 1, "shadow": 0}, {"active": 1, "canary": {"version": 2}}],
)
def test_invalid_policies_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Policy.model_validate(fields)


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.01])
def test_canary_weight_is_a_share(weight: float) -> None:
    with pytest.raises(ValueError):
        Canary(version=2, weight=weight)


# -- Routing -----------------------------------------------------------------------------------


def test_model_for() -> None:
    routing = Routing(default="pcvr", tenants={"acme": "pcvr-acme", "globex": "pcvr-globex"})
    assert routing.model_for(None) == "pcvr"
    assert routing.model_for("initech") == "pcvr"
    assert routing.model_for("acme") == "pcvr-acme"
    assert routing.model_for("globex") == "pcvr-globex"
    assert Routing(default="other").model_for("acme") == "other"


# -- the repository's policy and routing -------------------------------------------------------


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "models")
    for version in (1, 2, 3):
        repository.version_dir("pcvr", version).mkdir(parents=True)
    return repository


def test_write_policy_round_trips(repository: ModelRepository) -> None:
    policy = Policy(active=2, canary=Canary(version=3, weight=0.25), shadow=1, history=[1])
    repository.write_policy("pcvr", policy)
    assert repository.read_policy("pcvr") == policy
    assert repository.policy("pcvr") == policy


@pytest.mark.parametrize(
    "policy",
    [
        Policy(active=4),
        Policy(active=1, shadow=7),
        Policy(active=1, canary=Canary(version=9, weight=0.1)),
    ],
    ids=["active", "shadow", "canary"],
)
def test_write_policy_refuses_missing_versions(repository: ModelRepository, policy: Policy) -> None:
    repository.write_policy("pcvr", Policy(active=1))
    before = (repository.model_dir("pcvr") / POLICY_FILE).read_bytes()
    with pytest.raises(VersionNotFound, match="has no version"):
        repository.write_policy("pcvr", policy)
    assert (repository.model_dir("pcvr") / POLICY_FILE).read_bytes() == before


def test_write_policy_of_an_unknown_model_raises(repository: ModelRepository) -> None:
    with pytest.raises(VersionNotFound):
        repository.write_policy("ghost", Policy(active=1))
    assert not repository.model_dir("ghost").exists()


def test_read_routing_without_a_file_sends_everyone_to_the_default(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "nothing-here")
    assert repository.read_routing("pcvr") == Routing(default="pcvr")
    assert repository.read_routing("pcvr").tenants == {}


def test_routing_round_trips(repository: ModelRepository) -> None:
    routing = Routing(default="pcvr", tenants={"acme": "pcvr-acme"})
    repository.write_routing(routing)
    assert repository.read_routing("ignored-default") == routing
    on_disk = json.loads((repository.root / ROUTING_FILE).read_text())
    assert on_disk == {"default": "pcvr", "tenants": {"acme": "pcvr-acme"}}


def test_write_routing_creates_the_root(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "new" / "root")
    repository.write_routing(Routing(default="ctr"))
    assert repository.read_routing("pcvr") == Routing(default="ctr")


@pytest.mark.parametrize("content", ["{", '{"tenants": {}}', '{"default": "pcvr", "x": 1}'])
def test_a_corrupt_routing_raises(repository: ModelRepository, content: str) -> None:
    repository.root.mkdir(parents=True, exist_ok=True)
    (repository.root / ROUTING_FILE).write_text(content)
    with pytest.raises(RepositoryError, match="not a valid routing"):
        repository.read_routing("pcvr")
