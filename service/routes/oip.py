"""Open Inference Protocol v2 (KServe / Triton REST) on raw tensors, next to /v1/score.

`tritonclient.http` and other OIP clients work unchanged: server and model metadata, health,
readiness, and inference with JSON or binary tensors. Inference goes through the scoring
pipeline's inference threads, limiter and metrics; auth is the same as /v1/score.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from feature_client.assembly import DENSE_INPUT, IDS_INPUT, LOGIT_OUTPUT, ModelInputs
from service.audit import audit
from service.auth import Principal
from service.errors import ServiceError
from service.oip import OipError, decompress, encode_reply, parse_infer
from service.registry import LoadedModel, ModelLoadError
from service.repository import RepositoryError
from service.responses import JSONBytesResponse
from service.routes.access import authenticate
from service.state import ServiceState, get_state

router = APIRouter(tags=["open inference protocol v2"])


class OipErrorBody(BaseModel):
    error: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": OipErrorBody} for status in statuses}


MODEL_ERRORS = _errors(401, 403, 404)
INFER_ERRORS = _errors(400, 401, 403, 404, 415, 503)

PROBABILITY_OUTPUT = "probability"
SERVER_VERSION = "0.1.0"


def _error(exc: OipError) -> Response:
    return JSONBytesResponse({"error": exc.message}, status_code=exc.status)


def _caller_state(request: Request) -> ServiceState:
    state = get_state(request)
    authenticate(state, request.headers, "scorer")
    return state


def _admin(request: Request) -> tuple[ServiceState, Principal]:
    state = get_state(request)
    return state, authenticate(state, request.headers, "admin")


def _service_error(exc: ServiceError) -> Response:
    return JSONBytesResponse({"error": exc.message}, exc.status_code, headers=exc.headers)


def _model(state: ServiceState, name: str, version: str | None) -> LoadedModel:
    plan = state.models.plan(name)
    if plan is None:
        raise OipError(f"model {name!r} is not loaded on this replica", 404)
    if version is None:
        return plan.active
    for model in plan.versions():
        if str(model.version) == version:
            return model
    raise OipError(f"model {name!r} has no loaded version {version!r}", 404)


def _metadata(model: LoadedModel, plan_versions: list[str]) -> dict[str, Any]:
    spec = model.spec
    return {
        "name": model.name,
        "versions": plan_versions,
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": DENSE_INPUT, "datatype": "FP32", "shape": [-1, len(spec.dense_names)]},
            {"name": IDS_INPUT, "datatype": "INT64", "shape": [-1, len(spec.categorical_names)]},
        ],
        "outputs": [
            {"name": LOGIT_OUTPUT, "datatype": "FP32", "shape": [-1]},
            {"name": PROBABILITY_OUTPUT, "datatype": "FP64", "shape": [-1]},
        ],
    }


@router.get("/v2", summary="Server metadata", responses=_errors(401, 403))
async def server_metadata(request: Request) -> Response:
    _caller_state(request)
    return JSONBytesResponse(
        {"name": "adscore", "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}
    )


@router.get("/v2/health/live", summary="Liveness")
async def live() -> Response:
    return JSONBytesResponse({"live": True})


@router.get(
    "/v2/health/ready", summary="Readiness: a model is loaded and warm", responses=_errors(503)
)
async def ready(request: Request) -> Response:
    state = getattr(request.app.state, "service", None)
    ok = isinstance(state, ServiceState) and not state.shutting_down
    return JSONBytesResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{name}", summary="Model metadata", responses=MODEL_ERRORS)
@router.get(
    "/v2/models/{name}/versions/{version}",
    summary="Model version metadata",
    responses=MODEL_ERRORS,
)
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    try:
        state = _caller_state(request)
        model = _model(state, name, version)
    except OipError as exc:
        return _error(exc)
    plan = state.models.plan(name)
    versions = [str(m.version) for m in plan.versions()] if plan else []
    return JSONBytesResponse(_metadata(model, versions))


@router.get("/v2/models/{name}/ready", summary="Model readiness", responses=MODEL_ERRORS)
@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    summary="Model version readiness",
    responses=MODEL_ERRORS,
)
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    try:
        _model(_caller_state(request), name, version)
    except OipError as exc:
        return _error(exc)
    return JSONBytesResponse({"name": name, "ready": True})


@router.post("/v2/models/{name}/infer", summary="Inference on raw tensors", responses=INFER_ERRORS)
@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    summary="Inference on a version",
    responses=INFER_ERRORS,
)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    try:
        state = _caller_state(request)
        with state.admission.admit():
            model = _model(state, name, version)
            body = decompress(await request.body(), request.headers.get("content-encoding"))
            parsed = parse_infer(body, request.headers.get("inference-header-content-length"))
            inputs = _model_inputs(model, parsed.inputs)
            logits, probabilities = await state.pipeline.infer(model, inputs)
    except OipError as exc:
        return _error(exc)
    except ServiceError as exc:  # auth, overload: the protocol's error shape, the same status
        return _service_error(exc)
    available: dict[str, npt.NDArray[Any]] = {
        LOGIT_OUTPUT: logits,
        PROBABILITY_OUTPUT: probabilities,
    }
    requested = parsed.outputs or []
    if parsed.outputs is None:
        names = [(n, parsed.binary_by_default) for n in available]
    else:
        names = [(o.name, o.binary) for o in requested]
    unknown = [n for n, _ in names if n not in available]
    if unknown:
        return _error(OipError(f"unknown output {unknown[0]!r}; outputs: {sorted(available)}"))
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if parsed.id is not None:
        header["id"] = parsed.id
    content, header_length = encode_reply(
        header, [(n, available[n], binary) for n, binary in names]
    )
    response = Response(content, media_type="application/json")
    if header_length is not None:
        response.headers["Inference-Header-Content-Length"] = str(header_length)
        response.media_type = "application/octet-stream"
    return response


def _model_inputs(model: LoadedModel, tensors: dict[str, Any]) -> ModelInputs:
    expected = {DENSE_INPUT, IDS_INPUT}
    if set(tensors) != expected:
        extra = sorted(set(tensors) - expected)
        missing = sorted(expected - set(tensors))
        raise OipError(f"inputs: expected {sorted(expected)}; missing {missing}, unknown {extra}")
    dense, ids = tensors[DENSE_INPUT], tensors[IDS_INPUT]
    widths = {
        DENSE_INPUT: len(model.spec.dense_names),
        IDS_INPUT: len(model.spec.categorical_names),
    }
    for input_name, array in ((DENSE_INPUT, dense), (IDS_INPUT, ids)):
        if array.ndim != 2 or array.shape[1] != widths[input_name]:
            raise OipError(
                f"input {input_name!r}: shape {list(array.shape)}, expected [batch, "
                f"{widths[input_name]}]"
            )
    if dense.shape[0] != ids.shape[0]:
        raise OipError(f"inputs: batch sizes differ ({dense.shape[0]} vs {ids.shape[0]})")
    if dense.dtype != np.float32:
        raise OipError(f"input {DENSE_INPUT!r}: datatype must be FP32")
    if ids.dtype.kind not in "iu":
        raise OipError(f"input {IDS_INPUT!r}: datatype must be an integer type (INT64)")
    if not np.isfinite(dense).all():
        raise OipError(f"input {DENSE_INPUT!r}: NaN or infinite values")
    # An id past its embedding table would make onnxruntime fail: refuse it here, by column.
    limits = np.asarray(model.spec.cardinalities)
    bad = (ids < 0) | (ids >= limits)
    if bad.any():
        row, column = (int(x) for x in np.argwhere(bad)[0])
        raise OipError(
            f"input {IDS_INPUT!r}: id {int(ids[row, column])} at [{row}, {column}] is outside "
            f"[0, {int(limits[column])}) for {model.spec.categorical_names[column]!r}"
        )
    return ModelInputs(np.ascontiguousarray(dense), np.ascontiguousarray(ids, dtype=np.int64))


@router.get("/v2/models/{name}/config", summary="Model configuration", responses=MODEL_ERRORS)
async def model_config(request: Request, name: str) -> Response:
    try:
        state = _caller_state(request)
        model = _model(state, name, None)
    except OipError as exc:
        return _error(exc)
    spec = model.spec
    return JSONBytesResponse(
        {
            "name": model.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": state.settings.max_candidates,
            "input": [
                {"name": DENSE_INPUT, "data_type": "TYPE_FP32", "dims": [len(spec.dense_names)]},
                {
                    "name": IDS_INPUT,
                    "data_type": "TYPE_INT64",
                    "dims": [len(spec.categorical_names)],
                },
            ],
            "output": [
                {"name": LOGIT_OUTPUT, "data_type": "TYPE_FP32", "dims": []},
                {"name": PROBABILITY_OUTPUT, "data_type": "TYPE_FP64", "dims": []},
            ],
        }
    )


@router.post(
    "/v2/repository/index",
    summary="Models in the repository and their state (role admin)",
    responses=_errors(401, 403),
)
async def repository_index(request: Request) -> Response:
    try:
        state, _ = _admin(request)
    except ServiceError as exc:
        return _service_error(exc)
    repository = state.models.repository

    def listing() -> list[dict[str, Any]]:
        root = repository.root
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        entries = []
        for name in names:
            try:
                versions = repository.versions(name)
            except RepositoryError:
                continue
            if not versions:
                continue
            plan = state.models.plan(name)
            if plan is None:
                entries.append({"name": name, "version": str(versions[-1]), "state": "UNAVAILABLE",
                                "reason": "not loaded on this replica"})  # fmt: skip
            else:
                entries.append(
                    {"name": name, "version": str(plan.active.version), "state": "READY"}
                )
        return entries

    return JSONBytesResponse(await asyncio.to_thread(listing))


@router.post(
    "/v2/repository/models/{name}/load",
    summary="Load a model's policy versions on this replica (role admin)",
    responses=_errors(400, 401, 403),
)
async def repository_load(request: Request, name: str) -> Response:
    try:
        state, principal = _admin(request)
        await state.models.sync(name)
    except ServiceError as exc:
        return _service_error(exc)
    except ModelLoadError as exc:
        return _error(OipError(f"failed to load {name!r}: {exc}"))
    audit(principal, "load", name, None, state.models.plan(name) is not None)
    return JSONBytesResponse({})


@router.post(
    "/v2/repository/models/{name}/unload",
    summary="Unload a tenant model from this replica (role admin)",
    responses=_errors(400, 401, 403),
)
async def repository_unload(request: Request, name: str) -> Response:
    try:
        state, principal = _admin(request)
        await state.models.unload(name)
    except ServiceError as exc:
        return _service_error(exc)
    except KeyError:
        return _error(OipError(f"model {name!r} is not loaded on this replica"))
    except ValueError as exc:
        return _error(OipError(str(exc)))
    audit(principal, "unload", name, True, None)
    return JSONBytesResponse({})


@router.get("/v2/models/{name}/stats", summary="Model statistics", responses=MODEL_ERRORS)
@router.get(
    "/v2/models/{name}/versions/{version}/stats",
    summary="Model version statistics",
    responses=MODEL_ERRORS,
)
async def model_stats(request: Request, name: str, version: str | None = None) -> Response:
    """Triton's statistics extension, read from the Prometheus counters: rows scored per
    version; requests and their time per model (reported on the active version)."""
    try:
        state = _caller_state(request)
        _model(state, name, version)
    except OipError as exc:
        return _error(exc)
    except ServiceError as exc:
        return _service_error(exc)
    plan = state.models.plan(name)
    assert plan is not None
    # Collected once: with several workers, a collection reads every worker's metrics files.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in state.metrics.exposition.collect()
        for s in family.samples
    }

    def sample(metric: str, **labels: str) -> float:
        return float(samples.get((metric, tuple(sorted(labels.items()))), 0.0))

    requests = int(sample("adscore_model_request_duration_seconds_count", model=name))
    nanoseconds = int(sample("adscore_model_request_duration_seconds_sum", model=name) * 1e9)
    entries = []
    for model in plan.versions():
        if version is not None and str(model.version) != version:
            continue
        rows = sum(
            sample("adscore_scored_candidates_total", model=name, version=str(model.version),
                   role=role)
            for role in ("active", "canary", "shadow")
        )  # fmt: skip
        is_active = model is plan.active
        count, ns = (requests, nanoseconds) if is_active else (0, 0)
        entries.append(
            {
                "name": name,
                "version": str(model.version),
                "inference_count": int(rows),
                "execution_count": count,
                "inference_stats": {
                    "success": {"count": count, "ns": ns},
                    "fail": {"count": 0, "ns": 0},
                },
            }
        )
    return JSONBytesResponse({"model_stats": entries})
