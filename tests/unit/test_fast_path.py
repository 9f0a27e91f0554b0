"""The scoring route's own reading of request headers."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import Scope

from service.fast_path import SCORING_HEADERS, scoring_headers


def _scope(*headers: tuple[bytes, bytes]) -> Scope:
    return {"type": "http", "headers": list(headers)}


def test_scoring_headers_reads_what_starlette_would_for_each_name_it_needs() -> None:
    scope = _scope(
        (b"host", b"127.0.0.1"),
        (b"content-length", b"42"),
        (b"authorization", b"Bearer first"),
        (b"authorization", b"Bearer second"),  # a repeated name: the first, as Starlette
        (b"x-api-key", b"k\xe9y"),  # latin-1, as Starlette decodes
        (b"content-type", b"application/json"),
    )
    found = scoring_headers(scope)
    assert found == {
        "content-length": "42",
        "authorization": "Bearer first",
        "x-api-key": "k\xe9y",
    }
    starlette = Headers(scope=scope)
    for name in SCORING_HEADERS:
        assert found.get(name.decode()) == starlette.get(name.decode())


def test_scoring_headers_leaves_out_the_absent_ones() -> None:
    assert scoring_headers(_scope((b"host", b"x"))) == {}
    assert scoring_headers(_scope()) == {}
