"""The fast request parser: what it accepts, how it names refusals, and that it agrees with
the pydantic model published in the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pydantic
import pytest

from service import schemas
from service.errors import InvalidRequest, PayloadTooLarge
from service.schemas import (
    MAX_TIMEOUT_MS,
    RequestLimits,
    ScoreRequestBody,
    inline_json_schema,
    parse_score_request,
)

LIMITS = RequestLimits(max_candidates=8, max_id_length=16)


def _body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": "u42", "candidates": [{"ad_id": "a1"}, {"ad_id": "a2"}]}
    body.update(fields)
    return body


def _without(field: str) -> dict[str, Any]:
    body = _body()
    del body[field]
    return body


def _raw(body: Any) -> bytes:
    return orjson.dumps(body)


# --- accepted bodies -------------------------------------------------------------------------


def test_full_valid_body() -> None:
    body = {
        "request_id": "r-1",
        "user_id": "u42",
        "tenant": "acme",
        "context": {"device": "ios", "country": "US", "hour": 14, "bid": 0.5},
        "candidates": [{"ad_id": "a9"}, {"ad_id": "a17", "bid": 3}, {"ad_id": "a3"}],
        "timeout_ms": 15,
        "ignored": [1, 2, 3],
    }
    request = parse_score_request(_raw(body), LIMITS)
    assert request.user_id == "u42"
    assert request.ad_ids == ["a9", "a17", "a3"]
    assert dict(request.context) == {"device": "ios", "country": "US", "hour": 14, "bid": 0.5}
    assert request.request_id == "r-1"
    assert request.tenant == "acme"
    assert request.timeout_ms == 15.0
    assert isinstance(request.timeout_ms, float)


def test_minimal_body_takes_defaults() -> None:
    request = parse_score_request(b'{"user_id": "u1", "candidates": [{"ad_id": "a1"}]}', LIMITS)
    assert request.user_id == "u1"
    assert request.ad_ids == ["a1"]
    assert dict(request.context) == {}
    assert request.request_id is None
    assert request.tenant is None
    assert request.timeout_ms is None


def test_explicit_nulls_for_optional_fields() -> None:
    body = _body(request_id=None, tenant=None, timeout_ms=None)
    request = parse_score_request(_raw(body), LIMITS)
    assert (request.request_id, request.tenant, request.timeout_ms) == (None, None, None)


def test_limits_are_inclusive() -> None:
    longest = "x" * LIMITS.max_id_length
    body = _body(
        user_id=longest,
        request_id=longest,
        tenant=longest,
        candidates=[{"ad_id": longest}] * LIMITS.max_candidates,
        timeout_ms=MAX_TIMEOUT_MS,
    )
    request = parse_score_request(_raw(body), LIMITS)
    assert request.ad_ids == [longest] * LIMITS.max_candidates
    assert request.timeout_ms == MAX_TIMEOUT_MS


def test_duplicate_ad_ids_are_kept_in_order() -> None:
    body = _body(candidates=[{"ad_id": "b"}, {"ad_id": "a"}, {"ad_id": "b"}])
    assert parse_score_request(_raw(body), LIMITS).ad_ids == ["b", "a", "b"]


# --- refusals --------------------------------------------------------------------------------

TOO_LONG = "x" * (LIMITS.max_id_length + 1)

REFUSALS: list[tuple[str, bytes, str]] = [
    ("malformed_json", b'{"user_id": "u1", ', "body"),
    ("not_json_at_all", b"user_id=u1", "body"),
    ("empty_body", b"", "body"),
    ("array_body", b'[{"user_id": "u1"}]', "body"),
    ("string_body", b'"u1"', "body"),
    ("null_body", b"null", "body"),
    ("missing_user_id", _raw(_without("user_id")), "user_id"),
    ("null_user_id", _raw(_body(user_id=None)), "user_id"),
    ("empty_user_id", _raw(_body(user_id="")), "user_id"),
    ("numeric_user_id", _raw(_body(user_id=42)), "user_id"),
    ("list_user_id", _raw(_body(user_id=["u1"])), "user_id"),
    ("long_user_id", _raw(_body(user_id=TOO_LONG)), "user_id"),
    ("numeric_request_id", _raw(_body(request_id=7)), "request_id"),
    ("long_request_id", _raw(_body(request_id=TOO_LONG)), "request_id"),
    ("long_tenant", _raw(_body(tenant=TOO_LONG)), "tenant"),
    ("missing_candidates", _raw(_without("candidates")), "candidates"),
    ("candidates_object", _raw(_body(candidates={"ad_id": "a1"})), "candidates"),
    ("candidates_string", _raw(_body(candidates="a1")), "candidates"),
    ("empty_candidates", _raw(_body(candidates=[])), "candidates"),
    (
        "candidate_not_object",
        _raw(_body(candidates=[{"ad_id": "a"}, {"ad_id": "b"}, "c"])),
        "candidates[2]",
    ),
    (
        "candidate_is_list",
        _raw(_body(candidates=[{"ad_id": "a"}, {"ad_id": "b"}, ["c"]])),
        "candidates[2]",
    ),
    (
        "ad_id_missing",
        _raw(_body(candidates=[{"ad_id": "a"}, {"id": "b"}])),
        "candidates[1].ad_id",
    ),
    (
        "ad_id_null",
        _raw(_body(candidates=[{"ad_id": "a"}, {"ad_id": None}])),
        "candidates[1].ad_id",
    ),
    (
        "ad_id_number",
        _raw(_body(candidates=[{"ad_id": "a"}, {"ad_id": 17}])),
        "candidates[1].ad_id",
    ),
    (
        "ad_id_empty",
        _raw(_body(candidates=[{"ad_id": "a"}, {"ad_id": ""}])),
        "candidates[1].ad_id",
    ),
    (
        "ad_id_too_long",
        _raw(_body(candidates=[{"ad_id": "a"}, {"ad_id": TOO_LONG}])),
        "candidates[1].ad_id",
    ),
    ("context_string", _raw(_body(context="ios")), "context"),
    ("context_list", _raw(_body(context=[["device", "ios"]])), "context"),
    ("context_device_list", _raw(_body(context={"device": ["ios"]})), "context.device"),
    ("context_device_true", _raw(_body(context={"device": True})), "context.device"),
    ("context_device_false", _raw(_body(context={"device": False})), "context.device"),
    ("context_device_null", _raw(_body(context={"device": None})), "context.device"),
    ("context_device_object", _raw(_body(context={"device": {"os": "ios"}})), "context.device"),
    ("timeout_zero", _raw(_body(timeout_ms=0)), "timeout_ms"),
    ("timeout_negative", _raw(_body(timeout_ms=-5)), "timeout_ms"),
    ("timeout_too_large", _raw(_body(timeout_ms=MAX_TIMEOUT_MS + 0.5)), "timeout_ms"),
    ("timeout_true", _raw(_body(timeout_ms=True)), "timeout_ms"),
    ("timeout_string", _raw(_body(timeout_ms="100")), "timeout_ms"),
]


@pytest.mark.parametrize(
    ("raw", "path"), [(raw, path) for _, raw, path in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusal_names_the_field(raw: bytes, path: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_score_request(raw, LIMITS)
    error = caught.value
    assert error.status_code == 422
    assert error.code == "invalid_request"
    assert error.message.startswith(f"{path}: "), error.message
    assert str(error) == error.message


def test_refusal_of_a_later_candidate_names_its_index() -> None:
    candidates: list[dict[str, object]] = [{"ad_id": f"a{i}"} for i in range(6)]
    candidates[4] = {"ad_id": 4}
    with pytest.raises(InvalidRequest, match=r"^candidates\[4\]\.ad_id: "):
        parse_score_request(_raw(_body(candidates=candidates)), LIMITS)


def test_too_many_candidates_is_payload_too_large() -> None:
    body = _body(candidates=[{"ad_id": f"a{i}"} for i in range(LIMITS.max_candidates + 1)])
    with pytest.raises(PayloadTooLarge) as caught:
        parse_score_request(_raw(body), LIMITS)
    error = caught.value
    assert error.status_code == 413
    assert error.message.startswith("candidates: ")
    assert f"limit is {LIMITS.max_candidates}" in error.message
    assert str(LIMITS.max_candidates + 1) in error.message


# --- agreement with the pydantic model of the OpenAPI document -------------------------------

MODEL_LIMITS = RequestLimits(max_candidates=1_000_000, max_id_length=128)
# Booleans and numeric strings are left out on purpose: pydantic's lax mode coerces true to 1
# and "100" to 100.0, while the JSON schema it publishes (integer, number) refuses them, as the
# fast parser does. Those refusals are checked in test_refusal_names_the_field instead.
EMOJI = "\U0001f600"  # one character outside the BMP (two UTF-16 code units, four bytes)

AGREEMENT: list[tuple[str, Any]] = [
    # valid
    ("minimal", _body()),
    (
        "full",
        _body(request_id="r", tenant="t", context={"device": "ios", "hour": 14}, timeout_ms=5),
    ),
    ("extra_fields", _body(extra={"x": 1}, candidates=[{"ad_id": "a", "bid": 2.5}])),
    ("float_context", _body(context={"bid": 0.25, "n": -3})),
    ("empty_context", _body(context={})),
    ("empty_context_value", _body(context={"device": ""})),
    ("null_optionals", _body(request_id=None, tenant=None, timeout_ms=None)),
    ("id_at_limit", _body(user_id="u" * 128, candidates=[{"ad_id": "a" * 128}])),
    ("emoji_id_at_limit", _body(user_id=EMOJI * 128)),
    ("tiny_timeout", _body(timeout_ms=1e-6)),
    ("max_timeout", _body(timeout_ms=MAX_TIMEOUT_MS)),
    ("many_candidates", _body(candidates=[{"ad_id": f"a{i}"} for i in range(500)])),
    # what the service documents as optional strings of up to 128 characters
    ("empty_request_id", _body(request_id="")),
    ("empty_tenant", _body(tenant="")),
    # invalid
    ("array_body", [_body()]),
    ("missing_user_id", _without("user_id")),
    ("null_user_id", _body(user_id=None)),
    ("empty_user_id", _body(user_id="")),
    ("numeric_user_id", _body(user_id=5)),
    ("long_user_id", _body(user_id="u" * 129)),
    ("long_emoji_user_id", _body(user_id=EMOJI * 129)),
    ("numeric_request_id", _body(request_id=5)),
    ("long_request_id", _body(request_id="r" * 129)),
    ("long_tenant", _body(tenant="t" * 129)),
    ("missing_candidates", _without("candidates")),
    ("null_candidates", _body(candidates=None)),
    ("candidates_object", _body(candidates={"ad_id": "a"})),
    ("empty_candidates", _body(candidates=[])),
    ("candidate_string", _body(candidates=[{"ad_id": "a"}, "b"])),
    ("ad_id_missing", _body(candidates=[{"ad_id": "a"}, {}])),
    ("ad_id_number", _body(candidates=[{"ad_id": 3}])),
    ("ad_id_empty", _body(candidates=[{"ad_id": ""}])),
    ("ad_id_long", _body(candidates=[{"ad_id": "a" * 129}])),
    ("context_list", _body(context=["ios"])),
    ("context_null", _body(context=None)),
    ("context_value_list", _body(context={"device": ["ios"]})),
    ("context_value_null", _body(context={"device": None})),
    ("context_value_object", _body(context={"device": {}})),
    ("timeout_zero", _body(timeout_ms=0)),
    ("timeout_negative", _body(timeout_ms=-1)),
    ("timeout_too_large", _body(timeout_ms=MAX_TIMEOUT_MS + 1)),
]


def _fast_accepts(raw: bytes) -> bool:
    try:
        parse_score_request(raw, MODEL_LIMITS)
    except (InvalidRequest, PayloadTooLarge):
        return False
    return True


def _model_accepts(raw: bytes) -> bool:
    try:
        ScoreRequestBody.model_validate_json(raw)
    except pydantic.ValidationError:
        return False
    return True


@pytest.mark.parametrize("body", [b for _, b in AGREEMENT], ids=[name for name, _ in AGREEMENT])
def test_fast_parser_agrees_with_the_pydantic_model(body: Any) -> None:
    raw = _raw(body)
    assert _fast_accepts(raw) == _model_accepts(raw)


def test_agreement_set_holds_both_outcomes() -> None:
    outcomes = {_model_accepts(_raw(body)) for _, body in AGREEMENT}
    assert outcomes == {True, False}


def test_fast_parser_and_model_read_the_same_values() -> None:
    raw = _raw(
        _body(request_id="r-9", tenant="acme", context={"device": "web", "hour": 3}, timeout_ms=12)
    )
    fast = parse_score_request(raw, MODEL_LIMITS)
    model = ScoreRequestBody.model_validate_json(raw)
    assert fast.user_id == model.user_id
    assert fast.ad_ids == [c.ad_id for c in model.candidates]
    assert dict(fast.context) == model.context
    assert fast.request_id == model.request_id
    assert fast.tenant == model.tenant
    assert fast.timeout_ms == model.timeout_ms


# --- the typed decoder and the field-by-field reading agree ----------------------------------


# Bodies where the two JSON readers could part ways: integers beyond 64 bits (orjson reads them
# as floats), booleans where numbers go, duplicate keys, escapes, and control characters.
def _one_ad(tail: bytes) -> bytes:
    """A body of user u and ad a, with `tail`'s fields (raw JSON, for what orjson cannot write)."""
    return b'{"user_id": "u", "candidates": [{"ad_id": "a"}], ' + tail + b"}"


def _ads(*ad_ids: bytes) -> bytes:
    return (
        b'{"user_id": "u", "candidates": ['
        + b", ".join(b'{"ad_id": "%s"}' % a for a in ad_ids)
        + b"]}"
    )


HUGE = b"123456789012345678901234567890"
EDGE_CASES: list[tuple[str, bytes]] = [
    ("huge_int_context", _one_ad(b'"context": {"hour": ' + HUGE + b"}")),
    ("huge_int_dense_context", _one_ad(b'"context": {"bid_floor": ' + HUGE + b"}")),
    ("int64_context", _one_ad(b'"context": {"hour": 9223372036854775807}')),
    ("huge_int_timeout", _one_ad(b'"timeout_ms": ' + HUGE)),
    ("huge_int_top_k", _one_ad(b'"explain": true, "explain_top_k": ' + HUGE)),
    ("bool_context", _one_ad(b'"context": {"hour": true}')),
    ("bool_timeout", _one_ad(b'"timeout_ms": true')),
    ("bool_top_k", _one_ad(b'"explain_top_k": true')),
    ("null_explain", _one_ad(b'"explain": null')),
    ("explain_top_k", _one_ad(b'"explain": true, "explain_top_k": 3')),
    ("infinite_number", _one_ad(b'"timeout_ms": 1e400')),
    ("duplicate_user_id", _one_ad(b'"user_id": "v"')),
    ("duplicate_ad_id", b'{"user_id": "u", "candidates": [{"ad_id": "a", "ad_id": "b"}]}'),
    ("escaped_ids", b'{"user_id": "\\u00e9", "candidates": [{"ad_id": "\\u00e9\\u00e8"}]}'),
    ("newline_ad_id", _ads(b"a", b"b\\n")),
    ("c1_ad_id", _ads(b"\\u0085")),
    ("nbsp_ad_id", _ads(b"a\\u00a0b")),
    ("newline_user_id", b'{"user_id": "u\\n", "candidates": [{"ad_id": "a"}]}'),
    ("too_many", _ads(*[b"a"] * 9)),
    ("at_most", _ads(*[b"a"] * 8)),
    ("ad_id_at_limit", _ads(b"a" * 16)),
    ("ad_id_over_limit", _ads(b"a" * 17)),
    ("emoji_ad_id_at_limit", _ads("\U0001f600".encode() * 16)),
    ("trailing_garbage", _one_ad(b'"tenant": "t"') + b" x"),
    ("not_json", b"{"),
]
EDGE_LIMITS = RequestLimits(max_candidates=8, max_id_length=16, max_explain_candidates=4)


def _outcome(raw: bytes, limits: RequestLimits) -> object:
    try:
        return parse_score_request(raw, limits)
    except (InvalidRequest, PayloadTooLarge) as exc:
        return (exc.status_code, exc.message)


@pytest.mark.parametrize(
    "raw",
    [_raw(b) for _, b in AGREEMENT] + [b for _, b in EDGE_CASES],
    ids=[name for name, _ in AGREEMENT] + [name for name, _ in EDGE_CASES],
)
def test_typed_decoder_and_field_by_field_reading_agree(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    for limits in (MODEL_LIMITS, EDGE_LIMITS):
        typed = _outcome(raw, limits)
        with monkeypatch.context() as patch:
            patch.setattr(schemas, "_read_well_typed", lambda body, limits: None)
            field_by_field = _outcome(raw, limits)
        assert typed == field_by_field


def test_valid_bodies_take_the_typed_decoder_and_refused_ones_do_not() -> None:
    valid = _raw(_body(context={"device": "ios", "hour": 14}, timeout_ms=5, explain=True))
    read = schemas._read_well_typed(valid, LIMITS)
    assert read is not None
    ad_ids, fields = read
    assert ad_ids == ["a1", "a2"]
    assert fields["context"] == {"device": "ios", "hour": 14}
    assert fields["timeout_ms"] == 5.0 and fields["explain"] is True
    for name in ("ad_id_number", "ad_id_long", "empty_candidates", "context_value_null"):
        body = dict(AGREEMENT)[name]
        assert schemas._read_well_typed(_raw(body), MODEL_LIMITS) is None, name


# --- OpenAPI schema --------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_inline_json_schema_has_no_refs() -> None:
    plain = ScoreRequestBody.model_json_schema()
    assert _refs(plain), "the model's own schema should use $ref, or this test proves nothing"
    schema = inline_json_schema(ScoreRequestBody)
    assert _refs(schema) == []
    assert "$ref" not in orjson.dumps(schema).decode()
    assert "$defs" not in schema


def test_inline_json_schema_keeps_the_candidate_definition() -> None:
    schema = inline_json_schema(ScoreRequestBody)
    items = schema["properties"]["candidates"]["items"]
    assert items["properties"]["ad_id"]["type"] == "string"
    assert items["properties"]["ad_id"]["maxLength"] == 128
    assert items["required"] == ["ad_id"]
    assert set(schema["required"]) == {"user_id", "candidates"}


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("user_id", {"user_id": "u1\n", "candidates": [{"ad_id": "a1"}]}),
        (
            "candidates[1].ad_id",
            {"user_id": "u1", "candidates": [{"ad_id": "a1"}, {"ad_id": "a\x002"}]},
        ),
        ("tenant", {"user_id": "u1", "tenant": "ac\x1bme", "candidates": [{"ad_id": "a1"}]}),
        ("request_id", {"user_id": "u1", "request_id": "r\x85", "candidates": [{"ad_id": "a1"}]}),
    ],
)
def test_ids_with_control_characters_are_refused_by_both_parsers(
    field: str, body: dict[str, Any]
) -> None:
    raw = orjson.dumps(body)
    with pytest.raises(InvalidRequest, match=rf"^{re.escape(field)}: control characters"):
        parse_score_request(raw, LIMITS)
    assert not _model_accepts(raw)


def test_ids_may_hold_any_printable_text() -> None:
    raw = orjson.dumps({"user_id": "ü:42 x", "candidates": [{"ad_id": "广告-7"}]})
    assert parse_score_request(raw, LIMITS).ad_ids == ["广告-7"]
    assert _model_accepts(raw)
