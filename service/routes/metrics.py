"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    # Served from create_app on, so start-up (model load time) is observable too.
    registry = request.app.state.metrics.exposition
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
