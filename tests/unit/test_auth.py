"""API keys: the key file, KeyRing authentication and reload, header parsing, roles and tenants."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from service.auth import (
    ANONYMOUS,
    KEY_PREFIX,
    AuthConfigError,
    KeyRing,
    Principal,
    add_key,
    key_digest,
    presented_key,
)
from service.errors import Forbidden, Unauthorized


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "keys.json"


# -- add_key and the key file ------------------------------------------------------------------


def test_add_key_stores_only_the_digest(key_file: Path) -> None:
    key = add_key(key_file, "ad-server", ["scorer"], ["acme"])
    assert key.startswith(KEY_PREFIX)
    text = key_file.read_text()
    assert key not in text
    assert key[len(KEY_PREFIX) :] not in text
    assert json.loads(text) == {
        "keys": [
            {
                "name": "ad-server",
                "sha256": key_digest(key),
                "roles": ["scorer"],
                "tenants": ["acme"],
            }
        ]
    }


def test_add_key_makes_the_file_private(key_file: Path) -> None:
    add_key(key_file, "ad-server", ["scorer"], None)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    add_key(key_file, "ml-oncall", ["admin"], None)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [k["name"] for k in json.loads(key_file.read_text())["keys"]] == [
        "ad-server",
        "ml-oncall",
    ]


def test_add_key_creates_distinct_keys(key_file: Path) -> None:
    first = add_key(key_file, "a", ["scorer"], None)
    second = add_key(key_file, "b", ["scorer"], None)
    assert first != second
    assert len(first) > len(KEY_PREFIX) + 40  # 32 random bytes, base64


def test_add_key_refuses_a_duplicate_name(key_file: Path) -> None:
    add_key(key_file, "ad-server", ["scorer"], None)
    before = key_file.read_bytes()
    with pytest.raises(AuthConfigError, match="already holds a key named 'ad-server'"):
        add_key(key_file, "ad-server", ["admin"], None)
    assert key_file.read_bytes() == before


# -- KeyRing -----------------------------------------------------------------------------------


def test_enabled_without_a_file_is_a_config_error() -> None:
    with pytest.raises(AuthConfigError, match="no API key file"):
        KeyRing(None, enabled=True)


def test_enabled_with_a_missing_file_is_a_config_error(key_file: Path) -> None:
    with pytest.raises(AuthConfigError) as caught:
        KeyRing(key_file, enabled=True)
    assert str(key_file) in str(caught.value)


def test_enabled_with_a_malformed_file_is_a_config_error(key_file: Path) -> None:
    key_file.parent.mkdir(parents=True)
    key_file.write_text('{"keys": [{"name": "x"}]}')
    with pytest.raises(AuthConfigError, match="not a valid API key file"):
        KeyRing(key_file, enabled=True)


def test_disabled_ring_answers_anonymous_for_anything(key_file: Path) -> None:
    ring = KeyRing(None, enabled=False)
    assert not ring.enabled
    assert ring.authenticate(None) is ANONYMOUS
    assert ring.authenticate("adsk_whatever") is ANONYMOUS
    assert ring.reload_if_changed() is False
    # a missing file does not matter when auth is off
    assert KeyRing(key_file, enabled=False).authenticate("") is ANONYMOUS


def test_anonymous_may_do_everything() -> None:
    ANONYMOUS.require("scorer")
    ANONYMOUS.require("admin")
    ANONYMOUS.require_tenant(None)
    ANONYMOUS.require_tenant("acme")


@pytest.mark.parametrize("presented", [None, ""])
def test_a_missing_key_is_unauthorized(key_file: Path, presented: str | None) -> None:
    add_key(key_file, "ad-server", ["scorer"], None)
    ring = KeyRing(key_file, enabled=True)
    with pytest.raises(Unauthorized, match="API key is required"):
        ring.authenticate(presented)


def test_an_unknown_key_is_unauthorized(key_file: Path) -> None:
    key = add_key(key_file, "ad-server", ["scorer"], None)
    ring = KeyRing(key_file, enabled=True)
    for wrong in ("adsk_not-a-key", key + "x", key[:-1], key_digest(key)):
        with pytest.raises(Unauthorized, match="not valid"):
            ring.authenticate(wrong)


def test_a_known_key_gives_its_principal(key_file: Path) -> None:
    scorer = add_key(key_file, "ad-server", ["scorer"], ["acme", "globex"])
    admin = add_key(key_file, "ml-oncall", ["admin", "scorer"], None)
    ring = KeyRing(key_file, enabled=True)
    assert ring.authenticate(scorer) == Principal(
        "ad-server", frozenset({"scorer"}), frozenset({"acme", "globex"})
    )
    assert ring.authenticate(admin) == Principal("ml-oncall", frozenset({"admin", "scorer"}), None)


def test_reload_picks_up_a_rewritten_file(key_file: Path) -> None:
    first = add_key(key_file, "first", ["scorer"], None)
    ring = KeyRing(key_file, enabled=True)
    assert ring.reload_if_changed() is False  # nothing changed yet
    second = add_key(key_file, "second", ["admin"], None)
    with pytest.raises(Unauthorized):
        ring.authenticate(second)
    assert ring.reload_if_changed() is True
    assert ring.authenticate(second).name == "second"
    assert ring.authenticate(first).name == "first"
    assert ring.reload_if_changed() is False


def test_reload_drops_a_removed_key(key_file: Path) -> None:
    first = add_key(key_file, "first", ["scorer"], None)
    second = add_key(key_file, "second", ["scorer"], None)
    ring = KeyRing(key_file, enabled=True)
    content = json.loads(key_file.read_text())
    content["keys"] = [k for k in content["keys"] if k["name"] != "first"]
    key_file.write_text(json.dumps(content))
    assert ring.reload_if_changed() is True
    with pytest.raises(Unauthorized):
        ring.authenticate(first)
    assert ring.authenticate(second).name == "second"


@pytest.mark.parametrize(
    "content",
    ["{not json", "", '{"keys": [{"name": "x", "sha256": "nothex", "roles": ["scorer"]}]}'],
    ids=["truncated", "empty", "bad-digest"],
)
def test_a_malformed_rewrite_keeps_the_old_keys(key_file: Path, content: str) -> None:
    key = add_key(key_file, "ad-server", ["scorer"], None)
    ring = KeyRing(key_file, enabled=True)
    key_file.write_text(content)
    assert ring.reload_if_changed() is False
    assert ring.authenticate(key).name == "ad-server"


def test_a_deleted_file_keeps_the_old_keys(key_file: Path) -> None:
    key = add_key(key_file, "ad-server", ["scorer"], None)
    ring = KeyRing(key_file, enabled=True)
    key_file.unlink()
    assert ring.reload_if_changed() is False
    assert ring.authenticate(key).name == "ad-server"


def test_a_fixed_file_is_picked_up_after_a_malformed_one(key_file: Path) -> None:
    add_key(key_file, "first", ["scorer"], None)
    good = key_file.read_text()
    ring = KeyRing(key_file, enabled=True)
    key_file.write_text("{")
    assert ring.reload_if_changed() is False
    key_file.write_text(good)
    second = add_key(key_file, "second", ["scorer"], None)
    assert ring.reload_if_changed() is True
    assert ring.authenticate(second).name == "second"


# -- presented_key -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "api_key", "expected"),
    [
        ("Bearer adsk_x", None, "adsk_x"),
        ("bearer adsk_x", None, "adsk_x"),
        ("Bearer   adsk_x  ", None, "adsk_x"),
        (None, "adsk_y", "adsk_y"),
        ("Bearer adsk_x", "adsk_y", "adsk_x"),  # Authorization wins
        (None, None, None),
    ],
)
def test_presented_key(
    authorization: str | None, api_key: str | None, expected: str | None
) -> None:
    assert presented_key(authorization, api_key) == expected


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwdw==", "adsk_x", "Bearer", "Bearer   "])
def test_presented_key_refuses_other_schemes(authorization: str) -> None:
    with pytest.raises(Unauthorized, match="Bearer <key>"):
        presented_key(authorization, "adsk_y")


# -- Principal ---------------------------------------------------------------------------------


def test_require_checks_the_role() -> None:
    scorer = Principal("ad-server", frozenset({"scorer"}))
    scorer.require("scorer")
    with pytest.raises(Forbidden, match="'ad-server' lacks the role 'admin'"):
        scorer.require("admin")
    admin = Principal("ml-oncall", frozenset({"admin"}))
    admin.require("admin")
    with pytest.raises(Forbidden, match="lacks the role 'scorer'"):
        admin.require("scorer")


def test_a_tenant_bound_key_scores_only_its_tenants() -> None:
    bound = Principal("ad-server", frozenset({"scorer"}), frozenset({"acme", "globex"}))
    bound.require_tenant("acme")
    bound.require_tenant("globex")
    with pytest.raises(Forbidden, match="tenant 'initech'"):
        bound.require_tenant("initech")
    with pytest.raises(Forbidden, match="the default model"):
        bound.require_tenant(None)


def test_a_key_bound_to_no_tenant_scores_nothing() -> None:
    nothing = Principal("locked", frozenset({"scorer"}), frozenset())
    for tenant in (None, "acme"):
        with pytest.raises(Forbidden):
            nothing.require_tenant(tenant)


def test_an_unbound_key_scores_any_tenant() -> None:
    unbound = Principal("ad-server", frozenset({"scorer"}), None)
    for tenant in (None, "acme", "anything"):
        unbound.require_tenant(tenant)


def test_tenants_from_the_file_bind_the_principal(key_file: Path) -> None:
    key = add_key(key_file, "ad-server", ["scorer"], ["acme"])
    principal = KeyRing(key_file, enabled=True).authenticate(key)
    principal.require_tenant("acme")
    with pytest.raises(Forbidden):
        principal.require_tenant("globex")
    with pytest.raises(Forbidden):
        principal.require_tenant(None)
