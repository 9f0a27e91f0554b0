"""create_app: wiring only. The lifespan loads the model and connects the feature store."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feature_client.ad_cache import AdFeatureCache, CachingFeatureStore
from feature_client.memory_store import InMemoryFeatureStore
from feature_client.redis_store import RedisFeatureStore
from feature_client.store import FeatureStore, FeatureStoreUnavailable, SchemaStamp
from service.admission import AdmissionControl
from service.auth import AuthConfigError, KeyRing
from service.drift import scored_versions
from service.errors import install_error_handlers
from service.fast_path import AdscoreApp
from service.metrics import Metrics, MultiprocessMirror
from service.model_manager import ModelManager
from service.prediction_log import PredictionLogError
from service.registry import ModelLoadError
from service.repository import ModelRepository, RepositoryError
from service.routes import health, models, oip, scoring
from service.routes import metrics as metrics_route
from service.scoring import ScoringPipeline
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger("adscore")


class StartupError(Exception):
    """The service cannot start: no loadable model, or features of another schema."""


class RequestMetricsMiddleware:
    """Times every HTTP request and counts it by route template and status (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_seconds_of(route).observe(time.perf_counter() - started)
            self.metrics.requests_of(route, str(status)).inc()


def build_store(settings: Settings) -> FeatureStore:
    if settings.feature_backend == "memory":
        return InMemoryFeatureStore(settings.feature_namespace)
    return RedisFeatureStore.from_url(
        settings.redis_url,
        settings.feature_namespace,
        settings.feature_timeout_ms / 1000,
        settings.feature_reads_in_flight,
    )


def with_ad_cache(store: FeatureStore, settings: Settings, metrics: Metrics) -> FeatureStore:
    """`store` behind the hot-ad cache when ad_feature_cache_seconds is set."""
    if settings.ad_feature_cache_seconds <= 0:
        return store
    cache = AdFeatureCache(settings.ad_feature_cache_seconds, settings.ad_feature_cache_entries)
    metrics.ad_cache.source = lambda: cache
    return CachingFeatureStore(store, cache)


def schema_reader(store: FeatureStore) -> Callable[[], Awaitable[SchemaStamp | None]]:
    """Reads the store's schema stamp for load checks; None (check skipped) when unreachable."""

    async def read() -> SchemaStamp | None:
        try:
            stamp = await store.read_schema()
        except FeatureStoreUnavailable as exc:
            logger.warning("feature store unreachable (%s): feature schema not checked", exc)
            return None
        if stamp is None:
            logger.warning("the feature store holds no schema stamp: were features loaded?")
        return stamp

    return read


async def start_models(settings: Settings, store: FeatureStore, metrics: Metrics) -> ModelManager:
    """A ModelManager serving the default model; StartupError when it cannot load."""
    manager = ModelManager(
        ModelRepository(settings.model_repository), settings, metrics, schema_reader(store)
    )
    try:
        await manager.start()
    except (RepositoryError, ModelLoadError) as exc:
        await manager.close()
        raise StartupError(
            f"cannot load model {manager.default_model!r} from {settings.model_repository}: {exc}"
        ) from exc
    return manager


async def poll_repository(manager: ModelManager, keys: KeyRing, interval: float) -> None:
    """Converge on the shared repository: re-sync when a policy or the routing changes."""

    def read(paths: list[Path]) -> dict[Path, bytes | None]:
        return {p: p.read_bytes() if p.exists() else None for p in paths}

    seen = await asyncio.to_thread(read, manager.watched_files())
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(keys.reload_if_changed)
            now = await asyncio.to_thread(read, manager.watched_files())
            if now != seen:
                await manager.refresh()
                seen = await asyncio.to_thread(read, manager.watched_files())
        except Exception:  # the poller must outlive a bad file or a full disk
            logger.exception("polling the model repository failed")


MIRROR_SECONDS = 5.0
"""How often the scrape-time collectors (drift, hot-ad cache) reach the multiprocess files."""
HOT_MIRROR_SECONDS = 1.0
"""How often the scoring path's metrics reach them: a worker killed outright loses at most
this much of its counts (one that stops normally writes them all)."""


async def mirror_metrics(mirror: MultiprocessMirror, every_seconds: float, what: str) -> None:
    """Keep this worker's in-memory metrics in the multiprocess files (several workers)."""
    while True:
        try:
            mirror.sync()
        except Exception:  # a metrics hiccup must not stop the mirroring for good
            logger.exception("mirroring the %s metrics failed", what)
        await asyncio.sleep(every_seconds)


def on_overload(pipeline: ScoringPipeline, settings: Settings, overloaded: bool) -> None:
    """Under sustained overload, overload_inference_threads of the inference threads (all by
    default) take batches."""
    threads = settings.overload_inference_threads if overloaded else settings.inference_threads
    pipeline.batcher.use_threads(threads)
    logger.info(
        "%s: %d of %d inference threads take batches",
        "sustained overload" if overloaded else "overload passed",
        pipeline.batcher.active_threads,
        settings.inference_threads,
    )


def _without_opentelemetry() -> dict[str, Any]:
    """FastAPI >= 0.160 checks OpenTelemetry's global providers on every request (an environment
    lookup each time); adscore exports Prometheus metrics of its own, so that is switched off."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(settings: Settings, *, store: FeatureStore | None = None) -> FastAPI:
    """The ASGI app. `store` replaces the one the settings describe (the demo's in-memory one)."""
    metrics = Metrics(CollectorRegistry(auto_describe=True))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            keys = KeyRing(settings.api_keys_file, enabled=settings.auth_enabled)
        except AuthConfigError as exc:
            raise StartupError(str(exc)) from exc
        if not keys.enabled:
            logger.warning(
                "AUTHENTICATION IS OFF: anyone who reaches this port can score and change "
                "models. Set ADSCORE_AUTH_ENABLED=true and ADSCORE_API_KEYS_FILE in production."
            )
        feature_store = with_ad_cache(
            store if store is not None else build_store(settings), settings, metrics
        )
        async with AsyncExitStack() as cleanup:
            cleanup.push_async_callback(feature_store.close)
            manager = await start_models(settings, feature_store, metrics)
            cleanup.push_async_callback(manager.close)
            try:
                pipeline = ScoringPipeline(manager, feature_store, metrics, settings)
            except PredictionLogError as exc:
                raise StartupError(str(exc)) from exc
            cleanup.callback(pipeline.close)
            ticking = asyncio.create_task(pipeline.loop_lag.run())
            cleanup.callback(ticking.cancel)
            metrics.drift.source = lambda: pipeline.drift.table(scored_versions(manager.plans()))
            admission = AdmissionControl(
                settings.max_in_flight,
                metrics.in_flight,
                metrics.shed,
                metrics.admission_limit,
                overload_limit=settings.overload_in_flight,
                on_overload=lambda overloaded: on_overload(pipeline, settings, overloaded),
            )
            app.state.service = ServiceState(
                settings, metrics, manager, feature_store, pipeline, keys, admission
            )
            poller = asyncio.create_task(
                poll_repository(manager, keys, settings.repository_poll_seconds)
            )
            cleanup.callback(poller.cancel)
            if metrics.mirror is not None:
                mirroring = asyncio.create_task(
                    mirror_metrics(metrics.mirror, MIRROR_SECONDS, "drift and cache")
                )
                cleanup.callback(mirroring.cancel)
            if metrics.hot_mirror is not None:
                # Last in, first out: the final sync runs once the task is cancelled and every
                # request has been answered.
                cleanup.callback(metrics.hot_mirror.sync)
                hot_mirroring = asyncio.create_task(
                    mirror_metrics(metrics.hot_mirror, HOT_MIRROR_SECONDS, "scoring path")
                )
                cleanup.callback(hot_mirroring.cancel)
            plan = manager.plan(manager.default_model)
            assert plan is not None
            # Start-up objects (modules, the app, sessions) live for good: move them out of the
            # collector's generations so full collections under load do not walk them again.
            gc.collect()
            gc.freeze()
            # An inference thread takes the interpreter lock around each onnxruntime call;
            # while the event loop holds it, the thread waits a whole switch interval (Python's
            # default: 5 ms) before asking for it, and that wait lands in the tail.
            cleanup.callback(sys.setswitchinterval, sys.getswitchinterval())
            sys.setswitchinterval(settings.switch_interval_us / 1e6)
            logger.info("ready: model %s version %d", plan.name, plan.active.version)
            metrics.process_starts.inc()
            yield
            app.state.service.shutting_down = True

    app = AdscoreApp(
        **_without_opentelemetry(),
        title="adscore",
        summary="Real-time conversion prediction (pCVR) for ad candidates.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in (scoring.router, models.router, oip.router, health.router, metrics_route.router):
        app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
