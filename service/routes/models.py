"""GET /v1/models: what this replica serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.state import StateDep

router = APIRouter(tags=["models"])


@router.get("/v1/models", summary="Models and versions this replica serves")
async def list_models(state: StateDep) -> dict[str, Any]:
    return {
        "serving": state.settings.model_name,
        "models": [
            {
                "name": model.name,
                "active_version": model.version,
                "loaded_versions": [model.version],
                "model": model.describe(),
            }
            for model in state.registry.models()
        ],
    }
