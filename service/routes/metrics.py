"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    # Served from create_app on, so start-up (model load time) is observable too.
    metrics = request.app.state.metrics
    if metrics.hot_mirror is not None:  # several workers: this one's counts are up to date
        metrics.hot_mirror.sync()
    return Response(generate_latest(metrics.exposition), media_type=CONTENT_TYPE_LATEST)
