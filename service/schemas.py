"""Wire formats of the scoring API: pydantic models for the OpenAPI document, and a fast parser.

The parser checks the raw body against the same rules as `ScoreRequestBody`, without building
one pydantic object per candidate. A well-typed body is decoded by msgspec, which checks the
types and the ad ids' lengths in C as it reads; anything it refuses is read again with orjson
and checked field by field, so that every refusal names the offending field, e.g.
`candidates[3].ad_id`.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidRequest, PayloadTooLarge
from service.explain import MAX_TOP_K
from service.scoring import ScoreRequest

MAX_TIMEOUT_MS = 60_000


# Ids become Redis keys and log fields: no C0/C1 control characters (newlines, NUL, escapes).
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Candidate(BaseModel):
    """One ad competing in the auction; other fields are ignored."""

    ad_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN, examples=["a17"])


class ScoreRequestBody(BaseModel):
    """POST /v1/score body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "r-1",
                    "user_id": "u42",
                    "context": {"device": "ios", "country": "US", "hour": 14, "placement": "feed"},
                    "candidates": [{"ad_id": "a9"}, {"ad_id": "a17"}],
                }
            ]
        }
    )

    request_id: str | None = Field(
        None, min_length=1, max_length=128, pattern=ID_PATTERN, description="Echoed back."
    )
    user_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    tenant: str | None = Field(
        None, min_length=1, max_length=128, pattern=ID_PATTERN, description="Advertiser account."
    )
    context: dict[str, str | int | float] | None = Field(
        None,
        description="Request context (device, country, hour, placement); unknown keys are ignored.",
    )
    candidates: list[Candidate] = Field(min_length=1, description="Scored in this order.")
    timeout_ms: float | None = Field(
        None,
        gt=0,
        le=MAX_TIMEOUT_MS,
        description="The request's budget in ms (default: the service's request_timeout_ms). "
        "Past it the request is refused with 503 deadline_exceeded rather than answered late.",
    )
    explain: bool = Field(
        False,
        description="Also return, per candidate, the features that moved its score most "
        "(occlusion: the score minus the score with the feature replaced by its default). "
        "At most max_explain_candidates (64) candidates.",
    )
    explain_top_k: int | None = Field(
        None,
        ge=1,
        le=MAX_TOP_K,
        description="Features listed per candidate when explaining (default: the service's "
        "explain_top_k, 5).",
    )


class MissingEntities(BaseModel):
    user: bool = Field(description="The user had no stored features; defaults were used.")
    ads: list[str] = Field(description="Candidate ads with no stored features.")


class Contribution(BaseModel):
    feature: str
    contribution: float = Field(
        description="The candidate's score minus its score with this feature replaced by its "
        "default (dense) or the unknown id (categorical)."
    )


class CandidateExplanation(BaseModel):
    ad_id: str
    contributions: list[Contribution] = Field(description="Largest |contribution| first.")


class ScoreResponseBody(BaseModel):
    """POST /v1/score answer: scores[i] is the calibrated pCVR of candidates[i]."""

    request_id: str | None
    model: str
    model_version: int
    scores: list[float]
    missing: MissingEntities
    degraded: bool = Field(description="The feature store failed; every score used defaults.")
    explanations: list[CandidateExplanation] | None = Field(
        None, description='With "explain": true only; explanations[i] is of candidates[i].'
    )


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


@dataclass(frozen=True)
class RequestLimits:
    max_candidates: int
    max_id_length: int
    max_explain_candidates: int = 64


def _identifier(data: dict[str, Any], field: str, limits: RequestLimits, required: bool) -> Any:
    value = data.get(field)
    if value is None:
        if required:
            raise InvalidRequest(f"{field}: field required")
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field}: expected a non-empty string, got {value!r}")
    if len(value) > limits.max_id_length:
        raise InvalidRequest(f"{field}: longer than {limits.max_id_length} characters")
    if CONTROL_CHARACTER.search(value):
        raise InvalidRequest(f"{field}: control characters are not allowed, got {value!r}")
    return value


def _candidate_ids(candidates: Any, limits: RequestLimits) -> list[str]:
    if candidates is None:
        raise InvalidRequest("candidates: field required")
    if not isinstance(candidates, list):
        raise InvalidRequest('candidates: expected a list of objects like {"ad_id": "a1"}')
    if not candidates:
        raise InvalidRequest("candidates: must hold at least one candidate")
    if len(candidates) > limits.max_candidates:
        raise PayloadTooLarge(
            f"candidates: {len(candidates)} candidates, the limit is {limits.max_candidates}"
        )
    ad_ids: list[str] = []
    max_length = limits.max_id_length
    for i, candidate in enumerate(candidates):
        ad_id = candidate.get("ad_id") if isinstance(candidate, dict) else None
        if type(ad_id) is not str or not ad_id or len(ad_id) > max_length:
            if not isinstance(candidate, dict):
                raise InvalidRequest(f"candidates[{i}]: expected an object with an ad_id")
            if ad_id is None:
                raise InvalidRequest(f"candidates[{i}].ad_id: field required")
            raise InvalidRequest(
                f"candidates[{i}].ad_id: expected a non-empty string of at most {max_length} "
                f"characters, got {ad_id!r}"
            )
        ad_ids.append(ad_id)
    if CONTROL_CHARACTER.search("".join(ad_ids)):  # one scan for all ids; find the culprit after
        i = next(i for i, ad_id in enumerate(ad_ids) if CONTROL_CHARACTER.search(ad_id))
        raise InvalidRequest(
            f"candidates[{i}].ad_id: control characters are not allowed, got {ad_ids[i]!r}"
        )
    return ad_ids


def _context(value: Any) -> dict[str, str | int | float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("context: expected an object")
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise InvalidRequest(f"context.{key}: expected a string or a number, got {item!r}")
    return value


def _timeout_ms(value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= MAX_TIMEOUT_MS
        or math.isnan(value)
    ):
        raise InvalidRequest(f"timeout_ms: expected a number in (0, {MAX_TIMEOUT_MS}]")
    return float(value)


def _explain(
    data: dict[str, Any], candidates: int, limits: RequestLimits
) -> tuple[bool, int | None]:
    explain, top_k = data.get("explain", False), data.get("explain_top_k")
    if not isinstance(explain, bool):
        raise InvalidRequest(f"explain: expected true or false, got {explain!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K
    ):
        raise InvalidRequest(f"explain_top_k: expected an integer in [1, {MAX_TOP_K}]")
    if explain and candidates > limits.max_explain_candidates:
        raise PayloadTooLarge(
            f"candidates: {candidates} candidates to explain, the limit with explain is "
            f"{limits.max_explain_candidates}"
        )
    return explain, top_k


def parse_score_request(body: bytes, limits: RequestLimits) -> ScoreRequest:
    """Validate a raw POST /v1/score body; raises InvalidRequest or PayloadTooLarge."""
    read = _read_well_typed(body, limits)
    if read is None:  # refused by the typed decoder: read again, to say which field is wrong
        data = _read_any(body)
        ad_ids = _candidate_ids(data.get("candidates"), limits)
    else:
        ad_ids, data = read
    explain, explain_top_k = _explain(data, len(ad_ids), limits)
    return ScoreRequest(
        user_id=_identifier(data, "user_id", limits, required=True),
        ad_ids=ad_ids,
        context=_context(data.get("context")),
        request_id=_identifier(data, "request_id", limits, required=False),
        tenant=_identifier(data, "tenant", limits, required=False),
        timeout_ms=_timeout_ms(data.get("timeout_ms")),
        explain=explain,
        explain_top_k=explain_top_k,
    )


def _read_any(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body: expected a JSON object")
    return data


# Integers as orjson reads them: beyond 64 bits it reads a float, so such a body takes its path.
_INT64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# The typed decoder's fields besides the candidates, in the types the field checks accept. A
# value of another type (a boolean where a number goes, say) fails the decoder and takes the
# orjson path, which names it.
_TYPED_FIELDS: list[tuple[str, Any, Any]] = [
    ("user_id", str | None, None),
    ("context", dict[str, str | _INT64 | float] | None, None),
    ("request_id", str | None, None),
    ("tenant", str | None, None),
    ("timeout_ms", float | None, None),
    ("explain", bool, False),
    ("explain_top_k", _INT64 | None, None),
]
_AD_ID = operator.attrgetter("ad_id")


@functools.lru_cache(maxsize=4)
def _typed_decoder(max_id_length: int) -> msgspec.json.Decoder[Any]:
    ad_id = Annotated[str, msgspec.Meta(min_length=1, max_length=max_id_length)]
    # gc=False: a request's hundreds of candidates are not tracked by the cycle collector.
    candidate = msgspec.defstruct("Candidate", [("ad_id", ad_id)], gc=False)
    fields = [("candidates", list[candidate] | None, None), *_TYPED_FIELDS]  # type: ignore[valid-type]
    return msgspec.json.Decoder(msgspec.defstruct("ScoreRequestBody", fields, gc=False))


def _read_well_typed(body: bytes, limits: RequestLimits) -> tuple[list[str], dict[str, Any]] | None:
    """The ad ids and the other fields of a body whose types and ad ids are valid, or None."""
    try:
        decoded = _typed_decoder(limits.max_id_length).decode(body)
    except msgspec.MsgspecError:
        return None
    candidates = decoded.candidates
    if not candidates or len(candidates) > limits.max_candidates:
        return None
    ad_ids: list[str] = list(map(_AD_ID, candidates))
    joined = "".join(ad_ids)
    # Printable ASCII holds no control character: the regular expression only for other text.
    if not (joined.isascii() and joined.isprintable()) and CONTROL_CHARACTER.search(joined):
        return None
    return ad_ids, {name: getattr(decoded, name) for name, _, _ in _TYPED_FIELDS}


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs inlined, for a hand-written OpenAPI requestBody."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
