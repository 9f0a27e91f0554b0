"""Errors reported to callers, each with its HTTP status, mapped to JSON in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.responses import JSONBytesResponse


class ServiceError(Exception):
    """Base for failures reported to callers as {"error": {"code", "message"}}."""

    status_code = 500
    code = "internal_error"
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    """The body is not JSON, or a field is missing, of the wrong type or out of range."""

    status_code = 422
    code = "invalid_request"


class PayloadTooLarge(ServiceError):
    """Too many candidates or too many bytes in one request."""

    status_code = 413
    code = "payload_too_large"


class Unauthorized(ServiceError):
    """No API key, or one that is not known."""

    status_code = 401
    code = "unauthorized"
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    """A known API key without the role or the tenant the request needs."""

    status_code = 403
    code = "forbidden"


class ModelRefused(ServiceError):
    """A version named by an admin change failed a load check; nothing was changed."""

    status_code = 409
    code = "model_refused"


class Conflict(ServiceError):
    """The change cannot apply to the current state (no earlier version, the default model)."""

    status_code = 409
    code = "conflict"


class UnknownModel(ServiceError):
    """No loaded model has the requested name."""

    status_code = 404
    code = "unknown_model"


class FeaturesUnavailable(ServiceError):
    """The feature store failed and the policy is to refuse rather than score on defaults."""

    status_code = 503
    code = "features_unavailable"


class Overloaded(ServiceError):
    """More scoring requests in flight than the replica may hold: shed now, retry elsewhere."""

    status_code = 503
    code = "overloaded"
    headers: ClassVar[Mapping[str, str]] = {"Retry-After": "1"}


class DeadlineExceeded(ServiceError):
    """The request's timeout_ms ran out before it could be scored: an honest, immediate no."""

    status_code = 503
    code = "deadline_exceeded"


class NotReady(ServiceError):
    """No model is loaded yet, or the service is shutting down."""

    status_code = 503
    code = "not_ready"


def error_response(status_code: int, code: str, message: str) -> JSONBytesResponse:
    return JSONBytesResponse({"error": {"code": code, "message": message}}, status_code=status_code)


async def _service_error(_: Request, exc: Exception) -> JSONBytesResponse:
    assert isinstance(exc, ServiceError)
    response = error_response(exc.status_code, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


async def _validation_error(_: Request, exc: Exception) -> JSONBytesResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    ]
    return error_response(422, InvalidRequest.code, "; ".join(problems))


def _allowed_methods(request: Request) -> str:
    """Every method some route accepts on this path (Starlette names only the first route's)."""
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONBytesResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:  # FastAPI's "error parsing the body": malformed JSON, like /v1/score
        return error_response(422, InvalidRequest.code, f"body: {exc.detail}")
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    response = error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
    )
    if exc.headers:
        response.headers.update(exc.headers)
    if exc.status_code == 405:
        response.headers["Allow"] = _allowed_methods(request)
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the same JSON shape; unexpected exceptions stay a plain 500."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
