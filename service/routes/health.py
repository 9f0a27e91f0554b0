"""GET /healthz (the process is alive) and GET /readyz (it can score requests)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.responses import JSONBytesResponse
from service.state import ServiceState
from service.workers import workers_starting

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: a model is loaded and warm, the feature store answers")
async def readyz(request: Request) -> Response:
    state = getattr(request.app.state, "service", None)
    if not isinstance(state, ServiceState):
        return JSONBytesResponse({"ready": False, "reason": "starting"}, status_code=503)
    if state.shutting_down:
        return JSONBytesResponse({"ready": False, "reason": "shutting down"}, status_code=503)
    starting = workers_starting(state.settings.workers)
    if starting:
        reason = f"{starting} of {state.settings.workers} workers still starting"
        return JSONBytesResponse({"ready": False, "reason": reason}, status_code=503)
    store_ok = await state.store.ping()
    # Under the "degrade" policy a replica scores on defaults while the store is down: staying
    # ready keeps traffic flowing instead of taking every replica out of the load balancer.
    ready = store_ok or state.settings.on_feature_store_error == "degrade"
    body = {
        "ready": ready,
        "models": {plan.name: plan.active.version for plan in state.models.plans()},
        "feature_store": "ok" if store_ok else "unreachable",
    }
    return JSONBytesResponse(body, status_code=200 if ready else 503)
