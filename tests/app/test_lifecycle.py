"""Model lifecycle over HTTP: publish, activate, refusals, rollback, canary, shadow, tenants."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.repository import file_sha256
from service.routing import CANARY_BUCKETS, canary_bucket
from service.settings import Settings
from tests.app.lifecycle_support import Setup, metric_value, shifted
from tests.fixtures import LiveServer, publish_variant

SHIFT = 0.5


@pytest.fixture
def client(setup: Setup) -> Iterator[httpx.Client]:
    server = LiveServer(create_app(Settings(**setup.settings())))  # type: ignore[arg-type]
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield client
    finally:
        server.stop()


def _admin(
    setup: Setup, client: httpx.Client, method: str, path: str, **kwargs: object
) -> httpx.Response:
    return client.request(method, path, headers=setup.auth("ml-admin"), **kwargs)  # type: ignore[arg-type]


def _models(setup: Setup, client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/models", headers=setup.auth("ad-server"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _plan(setup: Setup, client: httpx.Client, name: str) -> dict[str, Any]:
    (plan,) = [m for m in _models(setup, client)["models"] if m["name"] == name]
    assert isinstance(plan, dict)
    return plan


def test_activate_swaps_and_rollback_restores(
    setup: Setup, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    version, before = setup.score(client)
    assert version == 1
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)

    with caplog.at_level(logging.INFO, logger="adscore.audit"):
        response = _admin(
            setup, client, "POST", f"/v1/models/{setup.name}/activate", json={"version": v2}
        )
    assert response.status_code == 200, response.text
    assert response.json()["policy"]["active"] == v2
    version, after = setup.score(client)
    assert version == v2
    np.testing.assert_allclose(after, shifted(before, SHIFT), rtol=1e-5)
    assert _plan(setup, client, setup.name)["active_version"] == v2

    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "adscore.audit"]
    assert line["who"] == "ml-admin" and line["audit"] == "activate"
    assert line["from"]["active"] == 1 and line["to"]["active"] == v2

    response = _admin(setup, client, "POST", f"/v1/models/{setup.name}/rollback")
    assert response.status_code == 200, response.text
    version, rolled_back = setup.score(client)
    assert version == 1
    np.testing.assert_array_equal(rolled_back, before)
    response = _admin(setup, client, "POST", f"/v1/models/{setup.name}/rollback")
    assert response.status_code == 409
    assert "no earlier active version" in response.json()["error"]["message"]


def _corrupt_file(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    _edit_metadata(folder, lambda m: m.update(sha256=file_sha256(folder / "model.onnx")))


def _wrong_checksum(folder: Path) -> None:
    with (folder / "model.onnx").open("ab") as f:
        f.write(b"\0")


def _wrong_signature(folder: Path) -> None:
    extra = {"name": "extra", "kind": "dense", "source": "ad", "default": 0.0}
    _edit_metadata(folder, lambda m: m["feature_spec"]["features"].append(extra))


def _other_schema(folder: Path) -> None:
    _edit_metadata(folder, lambda m: m["feature_spec"].update(schema_version=2))


def _golden_disagrees(folder: Path) -> None:
    def bump(metadata: dict[str, Any]) -> None:
        metadata["golden"]["probabilities"][0] += 0.01

    _edit_metadata(folder, bump)


def _edit_metadata(folder: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = folder / "metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_corrupt_file, "onnxruntime cannot open it"),
        (_wrong_checksum, "sha256"),
        (_wrong_signature, "input 'dense'"),
        (_other_schema, "schema version 1"),
        (_golden_disagrees, "golden rows disagree"),
    ],
    ids=["corrupt-file", "wrong-checksum", "wrong-signature", "other-schema", "golden-rows"],
)
def test_a_bad_version_is_refused_and_the_old_one_serves(
    setup: Setup, client: httpx.Client, damage: Callable[[Path], None], reason: str
) -> None:
    _, before = setup.score(client)
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)
    damage(setup.repository.version_dir(setup.name, v2))

    response = _admin(
        setup, client, "POST", f"/v1/models/{setup.name}/activate", json={"version": v2}
    )
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "model_refused"
    assert reason in response.json()["error"]["message"]

    version, after = setup.score(client)
    assert version == 1
    np.testing.assert_array_equal(after, before)
    assert setup.repository.policy(setup.name).active == 1
    refused = _models(setup, client)["refused"]
    assert [(r["version"], reason in r["reason"]) for r in refused] == [(v2, True)]
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "adscore_model_refused", model=setup.name, version=str(v2)) == 1


def test_canary_follows_the_user_hash_and_is_sticky(setup: Setup, client: httpx.Client) -> None:
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)
    weight = 0.3
    response = _admin(
        setup,
        client,
        "PUT",
        f"/v1/models/{setup.name}/canary",
        json={"version": v2, "weight": weight},
    )
    assert response.status_code == 200, response.text
    plan = _plan(setup, client, setup.name)
    assert plan["canary"] == {"version": v2, "weight": weight}

    users = [f"u{i}" for i in range(120)]
    served = {user: setup.score(client, user)[0] for user in users}
    expected = {
        user: v2 if canary_bucket(setup.name, user) < weight * CANARY_BUCKETS else 1
        for user in users
    }
    assert served == expected
    assert 0 < sum(v == v2 for v in served.values()) < len(users)
    assert all(setup.score(client, user)[0] == served[user] for user in users[:10])

    response = _admin(setup, client, "DELETE", f"/v1/models/{setup.name}/canary")
    assert response.status_code == 200
    assert {setup.score(client, user)[0] for user in users[:20]} == {1}


def test_activating_the_canary_promotes_it(setup: Setup, client: httpx.Client) -> None:
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)
    _admin(
        setup, client, "PUT", f"/v1/models/{setup.name}/canary", json={"version": v2, "weight": 0.5}
    )
    _admin(setup, client, "POST", f"/v1/models/{setup.name}/activate", json={"version": v2})
    plan = _plan(setup, client, setup.name)
    assert plan["active_version"] == v2 and plan["canary"] is None


def test_shadow_scores_only_into_metrics(setup: Setup, client: httpx.Client) -> None:
    _, before = setup.score(client)
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)
    response = _admin(setup, client, "PUT", f"/v1/models/{setup.name}/shadow", json={"version": v2})
    assert response.status_code == 200, response.text
    for _ in range(5):
        version, scores = setup.score(client)
        assert version == 1
        np.testing.assert_array_equal(scores, before)

    labels = {"model": setup.name, "version": str(v2), "role": "shadow"}
    deadline = time.monotonic() + 10
    while True:
        metrics = client.get("/metrics").text
        count = metric_value(metrics, "adscore_shadow_abs_difference_count", model=setup.name)
        if count == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert count == 5
    assert metric_value(metrics, "adscore_scored_candidates_total", **labels) == 5 * len(
        setup.ad_ids
    )
    mean_difference = np.abs(shifted(before, SHIFT) - before).mean()
    total = metric_value(metrics, "adscore_shadow_abs_difference_sum", model=setup.name)
    assert total == pytest.approx(5 * mean_difference, rel=1e-4)
    assert metric_value(metrics, "adscore_model_info", model=setup.name, version=str(v2),
                        provider="CPUExecutionProvider", role="shadow") == 1  # fmt: skip


def test_publish_uploads_a_version_and_checks_its_checksum(
    setup: Setup, client: httpx.Client
) -> None:
    folder = setup.repository.version_dir(setup.name, 1)
    files = {
        "model": ("model.onnx", (folder / "model.onnx").read_bytes()),
        "metadata": ("metadata.json", (folder / "metadata.json").read_bytes()),
    }
    response = _admin(
        setup, client, "POST", f"/v1/models/{setup.name}/versions?activate=true", files=files
    )
    assert response.status_code == 201, response.text
    assert response.json()["version"] == 2 and response.json()["policy"]["active"] == 2
    assert setup.repository.versions(setup.name) == [1, 2]
    assert setup.score(client)[0] == 2

    files["model"] = ("model.onnx", (folder / "model.onnx").read_bytes() + b"\0")
    response = _admin(setup, client, "POST", f"/v1/models/{setup.name}/versions", files=files)
    assert response.status_code == 422
    assert "does not match metadata.sha256" in response.json()["error"]["message"]
    assert setup.repository.versions(setup.name) == [1, 2]


def test_unknown_versions_and_models_are_404(setup: Setup, client: httpx.Client) -> None:
    response = _admin(
        setup, client, "POST", f"/v1/models/{setup.name}/activate", json={"version": 9}
    )
    assert response.status_code == 404
    assert "no version 9" in response.json()["error"]["message"]
    response = _admin(setup, client, "POST", "/v1/models/nope/activate", json={"version": 1})
    assert response.status_code == 404
    response = _admin(setup, client, "POST", f"/v1/models/{setup.name}/unload")
    assert response.status_code == 409  # the default model always stays loaded


def test_tenants_route_to_their_model_with_the_default_meanwhile(
    setup: Setup, client: httpx.Client
) -> None:
    tenant_model = f"{setup.name}-acme"
    publish_variant(setup.repository, tenant_model, (setup.name, 1), 1.0, activate=True)
    response = _admin(
        setup, client, "PUT", "/v1/routing/tenants/acme", json={"model": tenant_model}
    )
    assert response.status_code == 200, response.text

    def answer(tenant: str, holder: str = "acme-ad-server") -> httpx.Response:
        return client.post("/v1/score", json=setup.body(tenant=tenant), headers=setup.auth(holder))

    first = answer("acme")
    assert first.status_code == 200
    assert first.json()["model"] in (setup.name, tenant_model)  # the default answers meanwhile
    deadline = time.monotonic() + 20
    while answer("acme").json()["model"] != tenant_model:
        assert time.monotonic() < deadline, "the tenant model never loaded"
        time.sleep(0.05)
    assert answer("globex", "ad-server").json()["model"] == setup.name

    forbidden = answer("globex")
    assert (
        forbidden.status_code == 403 and "tenant 'globex'" in forbidden.json()["error"]["message"]
    )
    no_tenant = client.post("/v1/score", json=setup.body(), headers=setup.auth("acme-ad-server"))
    assert no_tenant.status_code == 403

    response = _admin(setup, client, "POST", f"/v1/models/{tenant_model}/unload")
    assert response.status_code == 200
    assert tenant_model not in [m["name"] for m in _models(setup, client)["models"]]
    response = _admin(setup, client, "DELETE", "/v1/routing/tenants/acme")
    assert response.status_code == 200
    assert answer("acme").json()["model"] == setup.name


ADMIN_ROUTES = [
    ("POST", "/v1/models/pcvr/versions", None),
    ("POST", "/v1/models/pcvr/activate", {"version": 1}),
    ("POST", "/v1/models/pcvr/rollback", None),
    ("PUT", "/v1/models/pcvr/canary", {"version": 1, "weight": 0.1}),
    ("DELETE", "/v1/models/pcvr/canary", None),
    ("PUT", "/v1/models/pcvr/shadow", {"version": 1}),
    ("DELETE", "/v1/models/pcvr/shadow", None),
    ("POST", "/v1/models/pcvr/unload", None),
    ("PUT", "/v1/routing/tenants/acme", {"model": "pcvr"}),
    ("DELETE", "/v1/routing/tenants/acme", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_need_an_admin_key(
    setup: Setup, client: httpx.Client, method: str, path: str, body: object
) -> None:
    missing = client.request(method, path, json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.request(method, path, json=body, headers={"Authorization": "Bearer adsk_nope"})
    assert wrong.status_code == 401
    scorer = client.request(method, path, json=body, headers=setup.auth("ad-server"))
    assert (
        scorer.status_code == 403 and "lacks the role 'admin'" in scorer.json()["error"]["message"]
    )
    assert setup.repository.policy(setup.name).active == 1


def test_scoring_and_listing_need_a_key(setup: Setup, client: httpx.Client) -> None:
    assert client.post("/v1/score", json=setup.body()).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert (
        client.get("/v1/models", headers={"X-API-Key": setup.keys["ad-server"]}).status_code == 200
    )
    assert client.get("/healthz").status_code == 200  # probes and scrapes stay open
    assert client.get("/metrics").status_code == 200


def test_models_cli_drives_the_admin_api(setup: Setup, client: httpx.Client) -> None:
    v2 = publish_variant(setup.repository, setup.name, (setup.name, 1), SHIFT)
    base = [sys.executable, "-m", "service.cli", "models", "--url", str(client.base_url)]
    env_key = {"ADSCORE_API_KEY": setup.keys["ml-admin"]}
    run = subprocess.run(
        [*base, "activate", str(v2)], capture_output=True, text=True, env=env_key | _path_env()
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["policy"]["active"] == v2
    assert setup.score(client)[0] == v2
    denied = subprocess.run(
        [*base, "--api-key", setup.keys["ad-server"], "rollback"],
        capture_output=True,
        text=True,
        env=_path_env(),
    )
    assert denied.returncode == 1 and "403" in denied.stderr


def _path_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("ADSCORE_")}
