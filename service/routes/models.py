"""The models API: what this replica serves, and the admin changes to it.

Policy changes (activate, canary, shadow, rollback) and routing changes are written to the
shared repository, after the replica taking the call has loaded and checked every version
they name; the other replicas pick them up by polling. Unload acts on this replica alone.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, UploadFile
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.audit import audit
from service.auth import Principal
from service.drift import scored_versions
from service.errors import Conflict, InvalidRequest, ModelRefused, UnknownModel
from service.model_metadata import ModelMetadata
from service.registry import ModelLoadError
from service.repository import (
    MODEL_NAME_PATTERN,
    Canary,
    Policy,
    RepositoryError,
    VersionNotFound,
    file_sha256,
)
from service.routes.access import AdminDep, CallerDep
from service.schemas import ErrorBody
from service.state import ServiceState, StateDep

router = APIRouter(tags=["models"])

ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one."},
    403: {"model": ErrorBody, "description": "The key lacks the admin role."},
    404: {"model": ErrorBody, "description": "No such model or version."},
    409: {"model": ErrorBody, "description": "A version failed its load checks; nothing changed."},
}


NAME_PATTERN = MODEL_NAME_PATTERN
ModelName = Annotated[
    str, PathParam(pattern=NAME_PATTERN, description="Model name: letters, digits, . _ -")
]
TenantName = Annotated[str, PathParam(min_length=1, max_length=128)]

READ_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one."},
    404: {"model": ErrorBody, "description": "No such model in the repository."},
}


class VersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)


class CanaryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    weight: float = Field(gt=0.0, le=1.0, description="Share of users, by a hash of user_id.")


class TenantRouteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=NAME_PATTERN)


def _policy_json(policy: Policy) -> dict[str, Any]:
    return policy.model_dump(exclude={"history"})


async def _change(
    state: ServiceState,
    who: Principal,
    action: str,
    name: ModelName,
    change: Callable[[Policy], Policy],
) -> dict[str, Any]:
    try:
        before, after = await state.models.change_policy(name, change)
    except VersionNotFound as exc:
        raise UnknownModel(str(exc)) from exc
    except ModelLoadError as exc:
        raise ModelRefused(f"model {name!r}: {exc}; nothing was changed") from exc
    except RepositoryError as exc:
        raise Conflict(str(exc)) from exc
    audit(who, action, name, _policy_json(before), _policy_json(after))
    return {"name": name, "policy": after.model_dump()}


@router.get(
    "/v1/models",
    summary="Models and versions this replica serves",
    responses={401: READ_ERRORS[401]},
)
async def list_models(state: StateDep, _: CallerDep) -> dict[str, Any]:
    return state.models.describe()


@router.get(
    "/v1/models/{name}",
    summary="A model's policy and published versions",
    responses=READ_ERRORS,
)
async def show_model(name: ModelName, state: StateDep, _: CallerDep) -> dict[str, Any]:
    repository = state.models.repository

    def read() -> dict[str, Any]:
        versions = repository.versions(name)
        if not versions:
            raise UnknownModel(f"no versions of model {name!r} in the repository")
        published = []
        for version in versions:
            try:
                metadata = repository.read_metadata(name, version)
            except RepositoryError as exc:
                published.append({"version": version, "error": str(exc)})
                continue
            published.append(
                {
                    "version": version,
                    "created_at": metadata.created_at.isoformat(),
                    "architecture": metadata.architecture,
                    "sha256": metadata.sha256,
                    "metrics": metadata.metrics,
                }
            )
        return {"name": name, "policy": repository.policy(name).model_dump(), "versions": published}

    return await asyncio.to_thread(read)


@router.get(
    "/v1/models/{name}/drift",
    summary="Live input and score drift of the versions serving a model, vs their references",
    responses={**READ_ERRORS, 404: {"model": ErrorBody, "description": "Not loaded here."}},
)
async def show_drift(name: ModelName, state: StateDep, _: CallerDep) -> dict[str, Any]:
    plan = state.models.plan(name)
    if plan is None:
        raise UnknownModel(f"model {name!r} is not loaded on this replica")
    drift = state.pipeline.drift
    return {
        "name": name,
        "sample_rate": drift.sample_rate,
        "min_rows": drift.min_rows,
        "versions": [v.to_json() for v in drift.table(scored_versions([plan]))],
    }


@router.post(
    "/v1/models/{name}/versions",
    status_code=201,
    summary="Publish a new version (model.onnx and metadata.json as multipart files)",
    responses={**ADMIN_ERRORS, 422: {"model": ErrorBody, "description": "Invalid upload."}},
)
async def publish_version(
    name: ModelName,
    state: StateDep,
    who: AdminDep,
    model: Annotated[UploadFile, File(description="model.onnx")],
    metadata: Annotated[UploadFile, File(description="metadata.json")],
    activate: Annotated[bool, Query(description="Activate once it has loaded here.")] = False,
) -> dict[str, Any]:
    try:
        parsed = ModelMetadata.model_validate_json(await metadata.read())
    except ValidationError as exc:
        raise InvalidRequest(f"metadata: {exc}") from None
    repository = state.models.repository
    with tempfile.TemporaryDirectory(prefix="adscore-upload-") as folder:
        upload = Path(folder) / "model.onnx"
        with upload.open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, model.file, out)
        checksum = await asyncio.to_thread(file_sha256, upload)
        if checksum != parsed.sha256:
            raise InvalidRequest(
                f"model: sha256 {checksum} does not match metadata.sha256 {parsed.sha256}: "
                "the upload is corrupt or the files do not belong together"
            )
        try:
            written = await asyncio.to_thread(
                repository.publish, name, upload, parsed, activate=False
            )
        except RepositoryError as exc:
            raise InvalidRequest(str(exc)) from exc
    audit(who, "publish", name, None, {"version": written.version, "sha256": checksum})
    body: dict[str, Any] = {"name": name, "version": written.version, "sha256": checksum}
    if activate:
        body |= await _change(state, who, "activate", name, lambda p: p.activated(written.version))
    return body


@router.post(
    "/v1/models/{name}/activate", summary="Make a version the active one", responses=ADMIN_ERRORS
)
async def activate(
    name: ModelName, body: VersionBody, state: StateDep, who: AdminDep
) -> dict[str, Any]:
    return await _change(state, who, "activate", name, lambda p: p.activated(body.version))


@router.post(
    "/v1/models/{name}/rollback",
    summary="Return to the previous active version",
    responses=ADMIN_ERRORS,
)
async def rollback(name: ModelName, state: StateDep, who: AdminDep) -> dict[str, Any]:
    return await _change(state, who, "rollback", name, lambda p: p.rolled_back())


@router.put(
    "/v1/models/{name}/canary",
    summary="Score a share of users with another version",
    responses=ADMIN_ERRORS,
)
async def set_canary(
    name: ModelName, body: CanaryBody, state: StateDep, who: AdminDep
) -> dict[str, Any]:
    canary = Canary(version=body.version, weight=body.weight)

    def change(policy: Policy) -> Policy:
        if body.version == policy.active:
            raise Conflict(f"version {body.version} is already the active version")
        return policy.model_copy(update={"canary": canary})

    return await _change(state, who, "canary", name, change)


@router.delete("/v1/models/{name}/canary", summary="Stop the canary", responses=ADMIN_ERRORS)
async def clear_canary(name: ModelName, state: StateDep, who: AdminDep) -> dict[str, Any]:
    return await _change(
        state, who, "canary", name, lambda p: p.model_copy(update={"canary": None})
    )


@router.put(
    "/v1/models/{name}/shadow",
    summary="Score every request with another version too, off the response path",
    responses=ADMIN_ERRORS,
)
async def set_shadow(
    name: ModelName, body: VersionBody, state: StateDep, who: AdminDep
) -> dict[str, Any]:
    return await _change(
        state, who, "shadow", name, lambda p: p.model_copy(update={"shadow": body.version})
    )


@router.delete("/v1/models/{name}/shadow", summary="Stop shadow scoring", responses=ADMIN_ERRORS)
async def clear_shadow(name: ModelName, state: StateDep, who: AdminDep) -> dict[str, Any]:
    return await _change(
        state, who, "shadow", name, lambda p: p.model_copy(update={"shadow": None})
    )


@router.post(
    "/v1/models/{name}/unload",
    summary="Unload a tenant model from this replica (it loads again on its next request)",
    responses=ADMIN_ERRORS,
)
async def unload(name: ModelName, state: StateDep, who: AdminDep) -> dict[str, Any]:
    plan = state.models.plan(name)
    try:
        await state.models.unload(name)
    except KeyError:
        raise UnknownModel(f"model {name!r} is not loaded on this replica") from None
    except ValueError as exc:
        raise Conflict(str(exc)) from exc
    audit(who, "unload", name, plan.active.version if plan else None, None)
    return {"name": name, "unloaded": True}


@router.put(
    "/v1/routing/tenants/{tenant}",
    summary="Route a tenant to its own model",
    responses=ADMIN_ERRORS,
)
async def route_tenant(
    tenant: TenantName, body: TenantRouteBody, state: StateDep, who: AdminDep
) -> dict[str, Any]:
    repository = state.models.repository
    if not await asyncio.to_thread(repository.versions, body.model):
        raise UnknownModel(f"no versions of model {body.model!r} in the repository")
    return await _set_route(state, who, tenant, body.model)


@router.delete(
    "/v1/routing/tenants/{tenant}",
    summary="Send a tenant back to the default model",
    responses=ADMIN_ERRORS,
)
async def unroute_tenant(tenant: TenantName, state: StateDep, who: AdminDep) -> dict[str, Any]:
    return await _set_route(state, who, tenant, None)


async def _set_route(
    state: ServiceState, who: Principal, tenant: str, model: str | None
) -> dict[str, Any]:
    repository = state.models.repository
    default = state.settings.model_name
    routing = await asyncio.to_thread(repository.read_routing, default)
    before = routing.tenants.get(tenant)
    tenants = {t: m for t, m in routing.tenants.items() if t != tenant}
    if model is not None:
        tenants[tenant] = model
    await asyncio.to_thread(
        repository.write_routing, routing.model_copy(update={"tenants": tenants})
    )
    await state.models.refresh_routing()
    audit(who, "route", f"tenant:{tenant}", before, model)
    return {"tenant": tenant, "model": model or routing.default}
