"""create_app: wiring only. The lifespan loads the model and connects the feature store."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feature_client.memory_store import InMemoryFeatureStore
from feature_client.redis_store import RedisFeatureStore
from feature_client.spec import FeatureSpec
from feature_client.store import FeatureStore, FeatureStoreUnavailable, SchemaStamp
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.registry import LoadedModel, ModelLoadError, ModelRegistry, load_version
from service.repository import ModelRepository, RepositoryError
from service.routes import health, models, scoring
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
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(route, str(status)).inc()


def build_store(settings: Settings) -> FeatureStore:
    if settings.feature_backend == "memory":
        return InMemoryFeatureStore(settings.feature_namespace)
    return RedisFeatureStore.from_url(
        settings.redis_url, settings.feature_namespace, settings.feature_timeout_ms / 1000
    )


def load_serving_model(settings: Settings) -> LoadedModel:
    repository = ModelRepository(settings.model_repository)
    try:
        version = repository.active_version(settings.model_name)
        return load_version(repository, settings.model_name, version, settings)
    except (RepositoryError, ModelLoadError) as exc:
        raise StartupError(
            f"cannot load model {settings.model_name!r} from {settings.model_repository}: {exc}"
        ) from exc


async def check_feature_schema(store: FeatureStore, spec: FeatureSpec) -> None:
    """Refuse to serve a model on features encoded with another spec."""
    try:
        stamp = await store.read_schema()
    except FeatureStoreUnavailable as exc:
        logger.warning("feature store unreachable at start-up (%s); scoring on defaults", exc)
        return
    if stamp is None:
        logger.warning("the feature store holds no schema stamp: were features loaded?")
        return
    expected = SchemaStamp.of(spec)
    if stamp != expected:
        raise StartupError(
            f"the feature store holds schema version {stamp.schema_version} "
            f"({stamp.fingerprint}); the model needs version {expected.schema_version} "
            f"({expected.fingerprint}). Reload the features with `adscore load-features`."
        )


def create_app(settings: Settings, *, store: FeatureStore | None = None) -> FastAPI:
    """The ASGI app. `store` replaces the one the settings describe (the demo's in-memory one)."""
    metrics = Metrics(CollectorRegistry(auto_describe=True))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = await anyio.to_thread.run_sync(load_serving_model, settings)
        registry = ModelRegistry()
        registry.put(model)
        metrics.model_info.labels(model.name, str(model.version), model.runtime.provider).set(1)
        metrics.model_load_seconds.labels(model.name).set(model.load_seconds)
        feature_store = store or build_store(settings)
        try:
            await check_feature_schema(feature_store, model.spec)
            pipeline = ScoringPipeline(registry, feature_store, metrics, settings)
            app.state.service = ServiceState(settings, metrics, registry, feature_store, pipeline)
            logger.info("ready: model %s version %d", model.name, model.version)
            yield
            app.state.service.shutting_down = True
        finally:
            await feature_store.close()

    app = FastAPI(
        title="adscore",
        summary="Real-time conversion prediction (pCVR) for ad candidates.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in (scoring.router, models.router, health.router, metrics_route.router):
        app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
