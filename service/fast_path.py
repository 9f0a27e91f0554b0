"""POST /v1/score answered by the app itself, before Starlette's middleware stack.

Profiled under load with 8-candidate requests, Starlette's and FastAPI's layers (five
middlewares, the router, the request handler, the response passing back through every
middleware's `send`) took about twice the event-loop time of the scoring itself. The hot route
skips them: the same authentication, admission control, body limit, parser, pipeline, metrics
and JSON errors, called directly. Every other route, and the OpenAPI document (which still
describes /v1/score from the FastAPI route in routes/scoring.py), goes through FastAPI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.errors import InvalidRequest, NotReady, PayloadTooLarge, ServiceError, error_response
from service.responses import json_bytes
from service.routes.access import authenticate
from service.schemas import RequestLimits, parse_score_request
from service.state import ServiceState

logger = logging.getLogger("adscore.http")

SCORE_PATH = "/v1/score"
JSON = (b"content-type", b"application/json")
# The request headers the scoring path reads: the caller's key, and the body's declared size.
SCORING_HEADERS = frozenset((b"authorization", b"x-api-key", b"content-length"))


def scoring_headers(scope: Scope) -> dict[str, str]:
    """The headers of SCORING_HEADERS that the request carries, the first of each name.

    One pass over the raw list (ASGI servers give names in lower case). Starlette's Headers
    scans the list again for each name it is asked, and raises and catches a KeyError for
    each absent one: 2.7-4.9 µs for the three look-ups against 0.6-1.1 µs here (timeit, the
    headers of a benchmark request), under 1 % of an 8-candidate request's event-loop time.
    """
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in SCORING_HEADERS:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


class ClientDisconnected(Exception):
    """The client went away before its body arrived: nobody is left to answer."""


async def read_body(receive: Receive, headers: Mapping[str, str], max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `max_bytes`."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("content-length: not a number")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"body: {declared} bytes, the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body: more than {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class AdscoreApp(FastAPI):
    """The FastAPI app, with POST /v1/score answered before Starlette's middleware stack."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == SCORE_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            await self._score(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _score(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        metrics = self.state.metrics
        try:
            outcome = await score_outcome(self.state, scope, receive)
        except ClientDisconnected:
            metrics.requests_of(SCORE_PATH, "499").inc()
            return
        if isinstance(outcome, bytes):  # the two ASGI messages a Starlette Response would send
            length = (b"content-length", b"%d" % len(outcome))
            await send({"type": "http.response.start", "status": 200, "headers": [length, JSON]})
            await send({"type": "http.response.body", "body": outcome})
            status = "200"
        else:
            await outcome(scope, receive, send)
            status = str(outcome.status_code)
        metrics.request_seconds_of(SCORE_PATH).observe(time.perf_counter() - started)
        metrics.requests_of(SCORE_PATH, status).inc()


def service_state(app_state: State) -> ServiceState:
    state = getattr(app_state, "service", None)
    if not isinstance(state, ServiceState):
        raise NotReady("the service is starting: no model is loaded yet")
    return state


async def score_response(app_state: State, scope: Scope, receive: Receive) -> Response:
    """The answer to one scoring request: scores, or a JSON error with its status."""
    outcome = await score_outcome(app_state, scope, receive)
    if isinstance(outcome, bytes):
        return Response(outcome, media_type="application/json")
    return outcome


async def score_outcome(app_state: State, scope: Scope, receive: Receive) -> bytes | Response:
    """The JSON body of one scoring request's scores, or a JSON error response with its status.

    The hot path sends the body itself, without building a Response around it.
    """
    try:
        state = service_state(app_state)
        headers = scoring_headers(scope)
        caller = authenticate(state, headers, "scorer")
        settings = state.settings
        with state.admission.admit():  # sheds with 503 before the body is even read
            body = await read_body(receive, headers, settings.max_body_bytes)
            limits = RequestLimits(
                settings.max_candidates, settings.max_id_length, settings.max_explain_candidates
            )
            request = parse_score_request(body, limits)
            caller.require_tenant(request.tenant)
            result = await state.pipeline.score(request)
        encoding_started = time.perf_counter()
        body = json_bytes(result.to_json())
        state.metrics.stage_seconds_of("response").observe(time.perf_counter() - encoding_started)
        return body
    except ServiceError as exc:
        failure = error_response(exc.status_code, exc.code, exc.message)
        failure.headers.update(exc.headers)
        return failure
    except ClientDisconnected:
        raise
    except Exception:  # a bug: logged with its trace, answered without it
        logger.exception("scoring request failed")
        return error_response(500, "internal_error", "internal error")
