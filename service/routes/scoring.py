"""POST /v1/score in the OpenAPI document (the handling is service/fast_path.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.fast_path import ClientDisconnected, score_response
from service.schemas import (
    ErrorBody,
    ScoreRequestBody,
    ScoreResponseBody,
    inline_json_schema,
)

router = APIRouter(tags=["scoring"])


@router.post(
    "/v1/score",
    summary="Score ad candidates for one user",
    response_model=ScoreResponseBody,
    responses={
        401: {"model": ErrorBody, "description": "No API key, or an unknown one."},
        403: {"model": ErrorBody, "description": "The key may not score, or not for this tenant."},
        413: {"model": ErrorBody, "description": "Too many candidates or too large a body."},
        422: {"model": ErrorBody, "description": "Malformed JSON or an invalid field."},
        503: {
            "model": ErrorBody,
            "description": "Overloaded (with Retry-After), past its deadline, not ready, or the "
            "feature store failed.",
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_json_schema(ScoreRequestBody)}},
        }
    },
)
async def score(request: Request) -> Response:
    # Reached only when the app is mounted under a root path: AdscoreApp answers POST /v1/score
    # itself (service/fast_path.py). This route keeps it in the OpenAPI document.
    try:
        return await score_response(request.app.state, request.scope, request.receive)
    except ClientDisconnected:
        return Response(status_code=499)
