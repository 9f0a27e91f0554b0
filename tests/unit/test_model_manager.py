"""ModelManager with a fake loader: lazy tenant loads, LRU eviction, policy changes, the loader.

The fake loader builds LoadedModels from tests.fixtures without onnxruntime; the version folders
are real (the manager sizes model.onnx on disk to keep within the memory budget).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from feature_client.assembly import ModelInputs
from feature_client.store import SchemaStamp
from service.errors import NotReady
from service.metrics import Metrics
from service.model_manager import ModelManager
from service.registry import LoadedModel, ModelLoadError
from service.repository import (
    METADATA_FILE,
    MODEL_FILE,
    POLICY_FILE,
    Canary,
    ModelRepository,
    Policy,
    Routing,
    VersionNotFound,
)
from service.settings import Settings
from tests.fixtures import LinearRuntime, metadata_for, tiny_spec

SPEC = tiny_spec()
DEFAULT = "pcvr"
SIZE = 1_000  # bytes of each model.onnx unless a test says otherwise
BIG_BUDGET = 1 << 30
TENANTS = {
    "acme": "pcvr-acme",
    "globex": "pcvr-globex",
    "initech": "pcvr-initech",
    "hooli": "pcvr-hooli",
}


class FakeLoader:
    """Stands in for registry.load_version: no onnxruntime, the calls are counted.

    It keeps no reference to the models it returns, so a test can watch one being freed.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.broken: dict[tuple[str, int], str] = {}

    def __call__(
        self,
        repository: ModelRepository,
        name: str,
        version: int,
        settings: Settings,
        stamp: SchemaStamp | None,
    ) -> LoadedModel:
        self.calls.append((name, version))
        if (name, version) in self.broken:
            raise ModelLoadError(self.broken[name, version])
        path = repository.model_path(name, version)
        if not path.exists():
            raise ModelLoadError(f"{path} is missing")
        model = LoadedModel.assemble(
            metadata_for(SPEC, name=name, version=version), LinearRuntime()
        )
        return dataclasses.replace(model, size_bytes=path.stat().st_size)


class MakeManager(Protocol):
    def __call__(
        self,
        *,
        budget: int = BIG_BUDGET,
        loader_nice: int = 10,
        intra_op_threads: int = 1,
    ) -> ModelManager: ...


async def no_stamp() -> SchemaStamp | None:
    return None


def publish(
    repository: ModelRepository, name: str, versions: tuple[int, ...] = (1,), size: int = SIZE
) -> None:
    """Version folders of `name` and a policy serving the first of them."""
    for version in versions:
        folder = repository.version_dir(name, version)
        folder.mkdir(parents=True)
        (folder / MODEL_FILE).write_bytes(bytes(size))
        metadata = metadata_for(SPEC, name=name, version=version)
        (folder / METADATA_FILE).write_text(metadata.model_dump_json())
    repository.write_policy(name, Policy(active=versions[0]))


def publish_more(repository: ModelRepository, name: str, *versions: int) -> None:
    """More version folders of a published model, its policy left alone."""
    policy = repository.policy(name)
    publish(repository, name, versions)
    repository.write_policy(name, policy)


def route_tenants(repository: ModelRepository, *tenants: str) -> None:
    repository.write_routing(Routing(default=DEFAULT, tenants={t: TENANTS[t] for t in tenants}))


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def eventually(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def loaded(manager: ModelManager, name: str) -> None:
    await eventually(lambda: manager.plan(name) is not None, f"{name} to load")
    await eventually(lambda: name not in manager.describe()["loading"], f"{name} to settle")


async def settled(manager: ModelManager) -> None:
    await eventually(lambda: manager.describe()["loading"] == [], "background loads to finish")


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def renice_refused() -> bool:
    """Whether this platform refuses to raise a thread's nice value (probed on a thread of ours)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return True
    refused: list[bool] = []

    def probe() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(thread_nice() + 1, 19))
            refused.append(False)
        except OSError:
            refused.append(True)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return refused != [False]


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "models")
    publish(repository, DEFAULT)
    return repository


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def make_manager(
    repository: ModelRepository, loader: FakeLoader, metrics: Metrics
) -> AsyncIterator[MakeManager]:
    managers: list[ModelManager] = []

    def make(
        *, budget: int = BIG_BUDGET, loader_nice: int = 10, intra_op_threads: int = 1
    ) -> ModelManager:
        settings = Settings(
            model_repository=repository.root,
            model_name=DEFAULT,
            model_memory_budget_bytes=budget,
            loader_nice=loader_nice,
            intra_op_threads=intra_op_threads,
        )
        manager = ModelManager(repository, settings, metrics, no_stamp, loader=loader)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        try:
            await settled(manager)
        finally:
            await manager.close()


@pytest.fixture
async def manager(make_manager: MakeManager) -> ModelManager:
    manager = make_manager()
    await manager.start()
    return manager


# -- start and the default model ---------------------------------------------------------------


async def test_start_loads_the_default_model(
    make_manager: MakeManager, loader: FakeLoader, metrics: Metrics
) -> None:
    manager = make_manager()
    plan = await manager.start()
    assert (plan.name, plan.active.version) == (DEFAULT, 1)
    assert manager.plans() == [plan]
    route = manager.route(None, "u1")
    assert route.model is plan.active
    assert route.role == "active"
    assert route.shadow is None
    assert loader.calls == [(DEFAULT, 1)]
    assert manager.loaded_bytes() == SIZE
    labels = {"model": DEFAULT, "version": "1", "provider": "test-double", "role": "active"}
    assert sample(metrics, "adscore_model_info", **labels) == 1
    assert sample(metrics, "adscore_model_swaps_total", model=DEFAULT) == 1
    assert sample(metrics, "adscore_loaded_model_bytes") == SIZE


async def test_route_before_start_is_not_ready(make_manager: MakeManager) -> None:
    manager = make_manager()
    with pytest.raises(NotReady, match="'pcvr' is not loaded"):
        manager.route(None, "u1")


async def test_start_fails_when_the_default_cannot_load(
    make_manager: MakeManager, loader: FakeLoader
) -> None:
    loader.broken[DEFAULT, 1] = "golden rows disagree"
    manager = make_manager()
    with pytest.raises(ModelLoadError, match="golden rows disagree"):
        await manager.start()
    assert manager.plans() == []


async def test_start_fails_without_the_default_model(
    make_manager: MakeManager, repository: ModelRepository, loader: FakeLoader
) -> None:
    repository.write_routing(Routing(default="ghost"))
    manager = make_manager()
    with pytest.raises(ModelLoadError, match="ghost"):
        await manager.start()
    assert loader.calls == []


async def test_start_takes_the_default_from_routing(
    make_manager: MakeManager, repository: ModelRepository
) -> None:
    publish(repository, "ctr")
    repository.write_routing(Routing(default="ctr"))
    manager = make_manager()
    await manager.start()
    assert manager.default_model == "ctr"
    assert manager.route(None, "u1").model.name == "ctr"
    assert manager.plan(DEFAULT) is None


# -- tenants: lazy loading ---------------------------------------------------------------------


async def test_a_tenant_model_loads_in_the_background(
    make_manager: MakeManager, repository: ModelRepository, loader: FakeLoader
) -> None:
    publish(repository, "pcvr-acme")
    route_tenants(repository, "acme")
    manager = make_manager()
    await manager.start()

    first = manager.route("acme", "u1")
    assert (first.model.name, first.role) == (DEFAULT, "active")
    assert manager.describe()["loading"] == ["pcvr-acme"]
    for _ in range(50):  # more requests while it loads do not start more loads
        assert manager.route("acme", "u1").model.name == DEFAULT

    await loaded(manager, "pcvr-acme")
    route = manager.route("acme", "u1")
    assert (route.model.name, route.model.version, route.role) == ("pcvr-acme", 1, "active")
    assert manager.route("initech", "u1").model.name == DEFAULT
    assert manager.route(None, "u1").model.name == DEFAULT
    assert loader.calls == [(DEFAULT, 1), ("pcvr-acme", 1)]
    assert manager.describe()["tenants_routed"] == 1


async def test_a_tenant_model_that_fails_leaves_the_default_answering(
    make_manager: MakeManager, repository: ModelRepository, loader: FakeLoader
) -> None:
    publish(repository, "pcvr-acme")
    route_tenants(repository, "acme")
    loader.broken["pcvr-acme", 1] = "sha256 does not match"
    manager = make_manager()
    await manager.start()

    assert manager.route("acme", "u1").model.name == DEFAULT
    await eventually(lambda: "pcvr-acme" in manager.describe()["unavailable"], "unavailable")
    assert "sha256 does not match" in manager.describe()["unavailable"]["pcvr-acme"]
    for i in range(100):
        route = manager.route("acme", f"u{i}")
        assert (route.model.name, route.role) == (DEFAULT, "active")
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert loader.calls.count(("pcvr-acme", 1)) == 1  # not retried on every request
    assert manager.describe()["loading"] == []
    assert manager.plan("pcvr-acme") is None
    assert [(r["model"], r["version"]) for r in manager.describe()["refused"]] == [("pcvr-acme", 1)]


async def test_a_tenant_routed_to_a_missing_model_gets_the_default(
    make_manager: MakeManager, repository: ModelRepository, loader: FakeLoader
) -> None:
    route_tenants(repository, "acme")  # pcvr-acme has no folder at all
    manager = make_manager()
    await manager.start()
    assert manager.route("acme", "u1").model.name == DEFAULT
    await eventually(lambda: "pcvr-acme" in manager.describe()["unavailable"], "unavailable")
    assert manager.route("acme", "u1").model.name == DEFAULT
    assert loader.calls == [(DEFAULT, 1)]


async def test_a_policy_change_makes_an_unavailable_tenant_model_load(
    make_manager: MakeManager, repository: ModelRepository, loader: FakeLoader
) -> None:
    publish(repository, "pcvr-acme", versions=(1, 2))
    route_tenants(repository, "acme")
    loader.broken["pcvr-acme", 1] = "broken"
    manager = make_manager()
    await manager.start()
    manager.route("acme", "u1")
    await eventually(lambda: "pcvr-acme" in manager.describe()["unavailable"], "unavailable")

    await manager.change_policy("pcvr-acme", lambda p: p.activated(2))
    assert manager.describe()["unavailable"] == {}
    route = manager.route("acme", "u1")
    assert (route.model.name, route.model.version) == ("pcvr-acme", 2)


# -- the memory budget -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("touched", "evicted"),
    [(("acme", "globex"), "pcvr-acme"), (("globex", "acme"), "pcvr-globex")],
    ids=["acme-idle-longest", "globex-idle-longest"],
)
async def test_the_least_recently_used_tenant_model_makes_room(
    make_manager: MakeManager,
    repository: ModelRepository,
    metrics: Metrics,
    touched: tuple[str, str],
    evicted: str,
) -> None:
    for tenant in ("acme", "globex", "initech"):
        publish(repository, TENANTS[tenant])
    route_tenants(repository, "acme", "globex", "initech")
    budget = 3 * SIZE  # the default and two tenant models
    manager = make_manager(budget=budget)
    await manager.start()
    for tenant in ("acme", "globex"):
        manager.route(tenant, "u1")
        await loaded(manager, TENANTS[tenant])
    assert manager.loaded_bytes() == budget
    for tenant in touched:  # the first one touched is the least recently used
        assert manager.route(tenant, "u1").model.name == TENANTS[tenant]
        await asyncio.sleep(0.01)

    manager.route("initech", "u1")
    await loaded(manager, "pcvr-initech")

    kept = ({"pcvr-acme", "pcvr-globex"} - {evicted}).pop()
    assert manager.plan(evicted) is None
    assert manager.plan(kept) is not None
    assert manager.plan(DEFAULT) is not None
    assert manager.route("initech", "u1").model.name == "pcvr-initech"
    assert manager.route(None, "u1").model.name == DEFAULT
    assert sample(metrics, "adscore_model_unloads_total", model=evicted) == 1
    assert sample(metrics, "adscore_model_unloads_total", model=kept) is None
    assert manager.loaded_bytes() == budget
    assert sample(metrics, "adscore_loaded_model_bytes") == budget
    assert {m["name"] for m in manager.describe()["models"]} == {DEFAULT, kept, "pcvr-initech"}


async def test_the_default_model_is_never_evicted(
    make_manager: MakeManager, repository: ModelRepository, metrics: Metrics
) -> None:
    for tenant in ("acme", "globex"):
        publish(repository, TENANTS[tenant])
    route_tenants(repository, "acme", "globex")
    manager = make_manager(budget=2 * SIZE)  # the default and one tenant model
    await manager.start()
    manager.route("acme", "u1")
    await loaded(manager, "pcvr-acme")
    await asyncio.sleep(0.01)
    manager.route("acme", "u1")  # the default is now the least recently used model

    manager.route("globex", "u1")
    await loaded(manager, "pcvr-globex")
    assert manager.plan(DEFAULT) is not None
    assert manager.plan("pcvr-acme") is None
    assert sample(metrics, "adscore_model_unloads_total", model=DEFAULT) is None
    assert manager.loaded_bytes() <= 2 * SIZE


async def test_a_tenant_model_larger_than_the_room_left_is_unavailable(
    make_manager: MakeManager, repository: ModelRepository
) -> None:
    publish(repository, "pcvr-acme", size=2 * SIZE)
    route_tenants(repository, "acme")
    manager = make_manager(budget=2 * SIZE)
    await manager.start()
    assert manager.route("acme", "u1").model.name == DEFAULT
    await eventually(lambda: "pcvr-acme" in manager.describe()["unavailable"], "unavailable")
    assert "memory budget" in manager.describe()["unavailable"]["pcvr-acme"]
    assert manager.loaded_bytes() == SIZE
    assert manager.route(None, "u1").model.name == DEFAULT


async def test_a_model_loaded_on_request_is_not_evicted_before_older_idle_ones(
    make_manager: MakeManager, repository: ModelRepository
) -> None:
    """Two tenants asked for at once, with room for two tenant models: both should end up loaded,
    in place of the two models idle since before."""
    for tenant in TENANTS:
        publish(repository, TENANTS[tenant])
    route_tenants(repository, *TENANTS)
    manager = make_manager(budget=3 * SIZE)
    await manager.start()
    for tenant in ("acme", "globex"):
        manager.route(tenant, "u1")
        await loaded(manager, TENANTS[tenant])
        manager.route(tenant, "u1")
        await asyncio.sleep(0.01)

    manager.route("initech", "u1")
    manager.route("hooli", "u1")
    await settled(manager)

    loaded_now = {plan.name for plan in manager.plans()}
    assert loaded_now == {DEFAULT, "pcvr-initech", "pcvr-hooli"}


# -- policy changes ----------------------------------------------------------------------------


async def test_a_refused_version_changes_nothing(
    manager: ModelManager,
    repository: ModelRepository,
    loader: FakeLoader,
    metrics: Metrics,
) -> None:
    publish_more(repository, DEFAULT, 2)
    loader.broken[DEFAULT, 2] = "golden rows disagree by 0.3"
    policy_file = repository.model_dir(DEFAULT) / POLICY_FILE
    before = policy_file.read_bytes()
    plan = manager.plan(DEFAULT)

    with pytest.raises(ModelLoadError, match=r"golden rows disagree by 0\.3"):
        await manager.change_policy(DEFAULT, lambda p: p.activated(2))

    assert policy_file.read_bytes() == before
    assert manager.plan(DEFAULT) is plan
    route = manager.route(None, "u1")
    assert (route.model.version, route.role) == (1, "active")
    refused = manager.describe()["refused"]
    assert [(r["model"], r["version"], r["reason"]) for r in refused] == [
        (DEFAULT, 2, "golden rows disagree by 0.3")
    ]
    assert sample(metrics, "adscore_model_refused", model=DEFAULT, version="2") == 1
    assert sample(metrics, "adscore_model_refusals_total", model=DEFAULT) == 1
    assert sample(metrics, "adscore_model_swaps_total", model=DEFAULT) == 1  # start only


async def test_a_refused_canary_changes_nothing(
    manager: ModelManager, repository: ModelRepository, loader: FakeLoader
) -> None:
    publish_more(repository, DEFAULT, 2)
    loader.broken[DEFAULT, 2] = "schema mismatch"
    before = repository.policy(DEFAULT)
    with pytest.raises(ModelLoadError, match="schema mismatch"):
        await manager.change_policy(
            DEFAULT, lambda p: p.model_copy(update={"canary": Canary(version=2, weight=0.5)})
        )
    assert repository.policy(DEFAULT) == before
    plan = manager.plan(DEFAULT)
    assert plan is not None and plan.canary is None
    assert {manager.route(None, f"u{i}").role for i in range(200)} == {"active"}


async def test_a_version_that_loads_later_is_no_longer_listed_as_refused(
    manager: ModelManager, repository: ModelRepository, loader: FakeLoader, metrics: Metrics
) -> None:
    publish_more(repository, DEFAULT, 2)
    loader.broken[DEFAULT, 2] = "broken"
    with pytest.raises(ModelLoadError):
        await manager.change_policy(DEFAULT, lambda p: p.activated(2))
    del loader.broken[DEFAULT, 2]
    await manager.change_policy(DEFAULT, lambda p: p.activated(2))
    assert manager.describe()["refused"] == []
    assert sample(metrics, "adscore_model_refused", model=DEFAULT, version="2") is None
    assert manager.route(None, "u1").model.version == 2


async def test_a_missing_version_is_refused_before_loading(
    manager: ModelManager, repository: ModelRepository, loader: FakeLoader
) -> None:
    before = repository.policy(DEFAULT)
    with pytest.raises(VersionNotFound, match="no version 5"):
        await manager.change_policy(DEFAULT, lambda p: p.activated(5))
    assert repository.policy(DEFAULT) == before
    assert loader.calls == [(DEFAULT, 1)]
    assert manager.route(None, "u1").model.version == 1


async def test_activation_swaps_and_in_flight_requests_keep_the_old_version(
    manager: ModelManager, repository: ModelRepository, loader: FakeLoader, metrics: Metrics
) -> None:
    publish_more(repository, DEFAULT, 2)
    in_flight = manager.route(None, "u1").model  # a request that started before the swap
    old = weakref.ref(in_flight)

    before, after = await manager.change_policy(DEFAULT, lambda p: p.activated(2))

    assert (before.active, after.active, after.history) == (1, 2, [1])
    assert repository.policy(DEFAULT) == after
    plan = manager.plan(DEFAULT)
    assert plan is not None and plan.active.version == 2
    assert [m.version for m in plan.versions()] == [2]
    assert manager.route(None, "u1").model.version == 2
    assert manager.loaded_bytes() == SIZE  # version 1 no longer counts
    assert sample(metrics, "adscore_model_swaps_total", model=DEFAULT) == 2
    assert loader.calls == [(DEFAULT, 1), (DEFAULT, 2)]

    # the in-flight request still scores on version 1...
    inputs = ModelInputs(np.zeros((1, 2), dtype=np.float32), np.zeros((1, 4), dtype=np.int64))
    np.testing.assert_allclose(in_flight.score(inputs), [0.5])
    assert in_flight.version == 1
    # ...and version 1 is freed once it lets go
    del in_flight
    gc.collect()
    assert old() is None


async def test_canary_and_shadow_are_served_and_described(
    manager: ModelManager, repository: ModelRepository, metrics: Metrics
) -> None:
    publish_more(repository, DEFAULT, 2, 3)
    await manager.change_policy(
        DEFAULT,
        lambda p: p.model_copy(update={"canary": Canary(version=2, weight=0.25), "shadow": 3}),
    )

    plan = manager.plan(DEFAULT)
    assert plan is not None
    assert plan.active.version == 1
    assert plan.canary is not None and plan.canary.version == 2
    assert plan.canary_weight == 0.25
    assert plan.shadow is not None and plan.shadow.version == 3
    (described,) = manager.describe()["models"]
    assert described["active_version"] == 1
    assert described["canary"] == {"version": 2, "weight": 0.25}
    assert described["shadow_version"] == 3
    assert described["loaded_versions"] == [1, 2, 3]
    assert [v["version"] for v in described["versions"]] == [1, 2, 3]
    assert manager.loaded_bytes() == 3 * SIZE
    for version, role in (("1", "active"), ("2", "canary"), ("3", "shadow")):
        labels = {"model": DEFAULT, "version": version, "provider": "test-double", "role": role}
        assert sample(metrics, "adscore_model_info", **labels) == 1

    routes = [manager.route(None, f"u{i}") for i in range(4000)]
    on_canary = [r for r in routes if r.role == "canary"]
    assert len(on_canary) / len(routes) == pytest.approx(0.25, abs=0.03)
    assert all(r.model.version == (2 if r.role == "canary" else 1) for r in routes)
    assert all(r.shadow is plan.shadow for r in routes)


async def test_promoting_the_canary_clears_it(
    manager: ModelManager, repository: ModelRepository
) -> None:
    publish_more(repository, DEFAULT, 2)
    await manager.change_policy(
        DEFAULT, lambda p: p.model_copy(update={"canary": Canary(version=2, weight=0.1)})
    )
    _, after = await manager.change_policy(DEFAULT, lambda p: p.activated(2))
    assert after.canary is None
    plan = manager.plan(DEFAULT)
    assert plan is not None and plan.active.version == 2 and plan.canary is None
    assert manager.describe()["models"][0]["canary"] is None
    assert {manager.route(None, f"u{i}").role for i in range(500)} == {"active"}


# -- unload ------------------------------------------------------------------------------------


async def test_unload(
    manager: ModelManager, repository: ModelRepository, loader: FakeLoader, metrics: Metrics
) -> None:
    with pytest.raises(ValueError, match="default model"):
        await manager.unload(DEFAULT)
    with pytest.raises(KeyError):
        await manager.unload("pcvr-acme")
    assert manager.plan(DEFAULT) is not None

    publish(repository, "pcvr-acme")
    route_tenants(repository, "acme")
    await manager.refresh_routing()
    manager.route("acme", "u1")
    await loaded(manager, "pcvr-acme")

    await manager.unload("pcvr-acme")
    assert manager.plan("pcvr-acme") is None
    assert manager.loaded_bytes() == SIZE
    assert sample(metrics, "adscore_model_unloads_total", model="pcvr-acme") == 1
    # it loads again on its next request
    assert manager.route("acme", "u1").model.name == DEFAULT
    await loaded(manager, "pcvr-acme")
    assert manager.route("acme", "u1").model.name == "pcvr-acme"
    assert loader.calls.count(("pcvr-acme", 1)) == 2


# -- the loader thread -------------------------------------------------------------------------


@pytest.mark.skipif(renice_refused(), reason="this platform cannot raise a thread's nice value")
async def test_the_loader_thread_runs_at_the_configured_nice(make_manager: MakeManager) -> None:
    manager = make_manager(loader_nice=7)
    main = thread_nice()
    assert await manager._in_loader(thread_nice) == min(main + 7, 19)
    assert thread_nice() == main  # only the loader thread


@pytest.mark.skipif(renice_refused(), reason="this platform cannot raise a thread's nice value")
async def test_the_loader_is_not_niced_with_intra_op_threads(make_manager: MakeManager) -> None:
    manager = make_manager(loader_nice=7, intra_op_threads=2)
    assert await manager._in_loader(thread_nice) == thread_nice()


@pytest.mark.skipif(renice_refused(), reason="this platform cannot raise a thread's nice value")
def test_the_loader_yields_to_an_already_niced_service(
    repository: ModelRepository, loader: FakeLoader
) -> None:
    """A service started at nice 12 with loader_nice=5: its loader must not run above it."""
    seen: dict[str, int] = {}

    def serve() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(thread_nice(), 12))

        async def main() -> None:
            settings = Settings(model_repository=repository.root, loader_nice=5)
            manager = ModelManager(
                repository, settings, Metrics(CollectorRegistry()), no_stamp, loader=loader
            )
            try:
                seen["service"] = thread_nice()
                seen["loader"] = await manager._in_loader(thread_nice)
            finally:
                await manager.close()

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(timeout=30)
    assert seen.keys() == {"service", "loader"}
    assert seen["loader"] == min(seen["service"] + 5, 19), seen
