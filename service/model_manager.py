"""This replica's loaded models, kept in line with the repository's policies and routing.

Every load, swap and eviction runs on one dedicated loader thread at a lower CPU priority, so
loading never runs on the event loop nor competes evenly with inference. A swap replaces one
immutable ServingPlan reference: requests that already hold the old plan finish on it, and
the old version's onnxruntime session is freed when the last of them lets go of it.

The hot path (`route`) only reads references and never waits for the loader: a tenant whose
model is not loaded yet is answered by the default model while it loads in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from feature_client.store import SchemaStamp
from service.errors import NotReady
from service.metrics import Metrics, retire
from service.registry import LoadedModel, ModelLoadError, load_version
from service.repository import (
    ModelRepository,
    Policy,
    RepositoryError,
    Routing,
    VersionNotFound,
)
from service.routing import Route, ServingPlan
from service.settings import Settings

logger = logging.getLogger("adscore.models")

P = ParamSpec("P")
T = TypeVar("T")
Loader = Callable[[ModelRepository, str, int, Settings, SchemaStamp | None], LoadedModel]
StampReader = Callable[[], Awaitable[SchemaStamp | None]]


@dataclass(frozen=True)
class Refusal:
    """Why a version was not loaded, and when."""

    model: str
    version: int
    reason: str
    at: datetime


def lower_thread_priority(nice: int) -> None:
    """Add `nice` to the nice value of the calling thread only (Linux keeps it per thread)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    thread = threading.get_native_id()
    try:
        # Relative to the thread's current value, so the loader always yields to serving even
        # when the whole service already runs niced.
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))
    except OSError as exc:
        logger.warning("could not lower the model loader's priority: %s", exc)


ROLES = ("active", "canary", "shadow")


class ModelManager:
    """Loads, swaps, routes to and unloads model versions on this replica."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: Metrics,
        read_stamp: StampReader,
        loader: Loader = load_version,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self._metrics = metrics
        self._read_stamp = read_stamp
        self._loader = loader
        # onnxruntime's intra-op pool threads inherit the priority of the thread that opens the
        # session and then run inference too: lower it only when there is no such pool.
        nice = settings.loader_nice if settings.intra_op_threads == 1 else 0
        self._executor = ThreadPoolExecutor(
            1, "adscore-loader", initializer=lower_thread_priority, initargs=(nice,)
        )
        # Written by the loader thread as whole new objects, read anywhere.
        self._plans: dict[str, ServingPlan] = {}
        self._routing = Routing(default=settings.model_name)
        # adscore_model_info's label sets set to 1, so the ones that go away are retired.
        self._published_info: set[tuple[str, str, str, str]] = set()
        # Written by the loader thread only, as whole new objects (others iterate them).
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._refused: dict[tuple[str, int], Refusal] = {}
        # Owned by the event loop (the loader only stamps a model it has just loaded).
        self._last_used: dict[str, float] = {}
        self._unavailable: dict[str, str] = {}
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._change_lock = asyncio.Lock()

    # -- the hot path ---------------------------------------------------------------------

    @property
    def default_model(self) -> str:
        return self._routing.default

    def route(self, tenant: str | None, user_id: str) -> Route:
        """The version that scores this request; never blocks on loading."""
        routing = self._routing
        name = routing.model_for(tenant)
        plan = self._plans.get(name)
        if plan is None:
            if name != routing.default:
                self._load_in_background(name)
            plan = self._plans.get(routing.default)
            if plan is None:
                raise NotReady(f"the default model {routing.default!r} is not loaded")
        self._last_used[plan.name] = time.monotonic()
        model, role = plan.pick(user_id)
        return Route(model, role, plan.shadow)

    def plan(self, name: str) -> ServingPlan | None:
        return self._plans.get(name)

    def plans(self) -> list[ServingPlan]:
        return list(self._plans.values())

    # -- loading --------------------------------------------------------------------------

    async def _in_loader(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def start(self) -> ServingPlan:
        """Read the routing and load the default model; raises ModelLoadError or
        RepositoryError when the default model cannot serve."""
        self._routing = await asyncio.to_thread(
            self.repository.read_routing, self.settings.model_name
        )
        return await self.sync(self.default_model, must_load=True)

    async def sync(self, name: str, *, must_load: bool = False) -> ServingPlan:
        """Bring `name` in line with its policy: load what it names, swap, release the rest.

        When the active version cannot load, the current plan keeps serving (and the reason is
        kept); with no current plan, or with `must_load`, the ModelLoadError propagates.
        """
        stamp = await self._read_stamp()
        return await self._in_loader(self._sync, name, stamp, must_load)

    def _sync(self, name: str, stamp: SchemaStamp | None, must_load: bool) -> ServingPlan:
        try:
            policy = self.repository.policy(name)
        except RepositoryError as exc:
            raise ModelLoadError(str(exc)) from exc
        current = self._plans.get(name)
        try:
            active = self._obtain(name, policy.active, stamp)
        except ModelLoadError:
            if current is None or must_load:
                raise
            logger.error("model %s keeps serving version %d", name, current.active.version)
            return current
        canary = self._optional(name, policy.canary.version if policy.canary else None, stamp)
        shadow = self._optional(name, policy.shadow, stamp)
        plan = ServingPlan(
            name,
            active,
            canary=canary,
            canary_weight=policy.canary.weight if policy.canary and canary else 0.0,
            shadow=shadow,
        )
        if plan != current:
            if current is None:  # a fresh load counts as a use: LRU must not evict it first
                self._last_used[name] = time.monotonic()
            self._plans = {**self._plans, name: plan}
            self._release_unused()
            self._publish_plan_metrics()
            if current is None or current.active.version != active.version:
                self._metrics.model_swaps.labels(name).inc()
                logger.info("model %s now serves version %d", name, active.version)
        return plan

    def _optional(
        self, name: str, version: int | None, stamp: SchemaStamp | None
    ) -> LoadedModel | None:
        if version is None:
            return None
        try:
            return self._obtain(name, version, stamp)
        except ModelLoadError:
            return None

    def _obtain(self, name: str, version: int, stamp: SchemaStamp | None) -> LoadedModel:
        key = (name, version)
        if key in self._loaded:
            return self._loaded[key]
        try:
            self._make_room(name, version)
            model = self._loader(self.repository, name, version, self.settings, stamp)
        except (ModelLoadError, RepositoryError) as exc:
            refusal = Refusal(name, version, str(exc), datetime.now(UTC))
            self._refused = {**self._refused, key: refusal}
            self._metrics.model_refusals.labels(name).inc()
            self._metrics.model_refused.labels(name, str(version)).set(1)
            logger.error("refused model %s version %d: %s", name, version, exc)
            raise ModelLoadError(str(exc)) from exc
        if key in self._refused:
            self._refused = {k: r for k, r in self._refused.items() if k != key}
            retire(self._metrics.model_refused, name, str(version))
        self._loaded = {**self._loaded, key: model}
        self._metrics.model_load_seconds.labels(name).set(model.load_seconds)
        self._metrics.loaded_model_bytes.set(self.loaded_bytes())
        return model

    def _make_room(self, name: str, version: int) -> None:
        """Unload the least recently used tenant models until the version fits the budget."""
        path = self.repository.model_path(name, version)
        size = path.stat().st_size if path.exists() else 0
        budget = self.settings.model_memory_budget_bytes
        while self.loaded_bytes() + size > budget:
            idle = sorted(
                (p for p in self._plans if p not in (name, self.default_model)),
                key=lambda p: self._last_used.get(p, 0.0),
            )
            if not idle:
                if name == self.default_model:
                    logger.warning("the default model %s exceeds the memory budget", name)
                    return
                raise ModelLoadError(
                    f"{size} bytes do not fit the model memory budget "
                    f"({self.loaded_bytes()} of {budget} bytes in use by models that stay)"
                )
            self._evict(idle[0], reason="memory budget")

    def _evict(self, name: str, reason: str) -> None:
        self._plans = {n: p for n, p in self._plans.items() if n != name}
        self._release_unused()
        self._publish_plan_metrics()
        self._metrics.model_unloads.labels(name).inc()
        logger.info("unloaded model %s (%s)", name, reason)

    def _release_unused(self) -> None:
        # Dropping the reference here frees a session once in-flight requests let go of it.
        kept = {(m.name, m.version) for plan in self._plans.values() for m in plan.versions()}
        self._loaded = {k: m for k, m in self._loaded.items() if k in kept}
        self._metrics.loaded_model_bytes.set(self.loaded_bytes())

    def _publish_plan_metrics(self) -> None:
        info = self._metrics.model_info
        published = {
            (model.name, str(model.version), model.runtime.provider, role)
            for plan in self._plans.values()
            for model, role in zip((plan.active, plan.canary, plan.shadow), ROLES, strict=True)
            if model is not None
        }
        for labels in self._published_info - published:
            retire(info, *labels)
        for labels in published:
            info.labels(*labels).set(1)
        self._published_info = published

    def loaded_bytes(self) -> int:
        return sum(m.size_bytes for m in self._loaded.values())

    def _load_in_background(self, name: str) -> None:
        if name in self._pending or name in self._unavailable:
            return
        self._pending.add(name)
        task = asyncio.get_running_loop().create_task(self._lazy_load(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lazy_load(self, name: str) -> None:
        try:
            await self.sync(name)
        except ModelLoadError as exc:
            # Not retried on every request: a change to the repository clears it (see poll).
            self._unavailable[name] = str(exc)
            logger.error("tenant model %s is unavailable, the default answers: %s", name, exc)
        finally:
            self._pending.discard(name)

    # -- changes from the admin API and from the repository --------------------------------

    async def change_policy(
        self, name: str, change: Callable[[Policy], Policy]
    ) -> tuple[Policy, Policy]:
        """Apply `change` to the policy of `name` once every version it names has loaded here.

        Raises ModelLoadError (nothing changed) when a version is refused, and RepositoryError
        when the model or a version does not exist.
        """
        async with self._change_lock:
            before = await asyncio.to_thread(self.repository.policy, name)
            after = change(before)
            available = await asyncio.to_thread(self.repository.versions, name)
            for version in (
                after.active,
                after.shadow,
                after.canary.version if after.canary else None,
            ):
                if version is not None and version not in available:
                    raise VersionNotFound(f"model {name!r} has no version {version}")
            stamp = await self._read_stamp()
            named = [after.active, after.shadow, after.canary.version if after.canary else None]
            for version in named:
                if version is not None:
                    await self._in_loader(self._obtain, name, version, stamp)
            await asyncio.to_thread(self.repository.write_policy, name, after)
            self._unavailable.pop(name, None)
            await self.sync(name)
            return before, after

    async def unload(self, name: str) -> None:
        """Unload a tenant model from this replica; it loads again on its next request."""
        if name == self.default_model:
            raise ValueError(f"{name!r} is the default model: it always stays loaded")
        if name not in self._plans:
            raise KeyError(name)
        await self._in_loader(self._evict, name, "unloaded by an admin")

    def watched_files(self) -> list[Path]:
        names = sorted({*self._plans, *self._unavailable, self.default_model})
        return self.repository.watched_files(names)

    async def refresh_routing(self) -> None:
        try:
            self._routing = await asyncio.to_thread(
                self.repository.read_routing, self.settings.model_name
            )
        except RepositoryError as exc:
            logger.error("keeping the current routing: %s", exc)

    async def refresh(self) -> None:
        """Re-read the routing and re-sync every loaded model (the repository changed)."""
        await self.refresh_routing()
        self._unavailable.clear()
        names = {*self._plans, self.default_model}
        for name in sorted(names):
            try:
                await self.sync(name)
            except ModelLoadError as exc:
                logger.error("model %s: %s", name, exc)

    # -- reporting -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        models = []
        for plan in sorted(self._plans.values(), key=lambda p: p.name):
            last_used = self._last_used.get(plan.name)
            models.append(
                {
                    "name": plan.name,
                    "active_version": plan.active.version,
                    "canary": (
                        {"version": plan.canary.version, "weight": plan.canary_weight}
                        if plan.canary
                        else None
                    ),
                    "shadow_version": plan.shadow.version if plan.shadow else None,
                    "loaded_versions": sorted(m.version for m in plan.versions()),
                    "idle_seconds": None if last_used is None else round(now - last_used, 3),
                    "versions": [m.describe() for m in plan.versions()],
                }
            )
        return {
            "default_model": self.default_model,
            "tenants_routed": len(self._routing.tenants),
            "memory": {
                "budget_bytes": self.settings.model_memory_budget_bytes,
                "loaded_bytes": self.loaded_bytes(),
            },
            "models": models,
            "loading": sorted(self._pending),
            "unavailable": dict(sorted(self._unavailable.items())),
            "refused": [
                {"model": r.model, "version": r.version, "reason": r.reason, "at": r.at.isoformat()}
                for r in sorted(self._refused.values(), key=lambda r: (r.model, r.version))
            ],
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
