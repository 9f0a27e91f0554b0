"""The adscore command, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from feature_client.redis_server import free_port
from service.auth import KeyRing
from service.repository import ModelRepository

ADSCORE = [sys.executable, "-m", "service.cli"]
ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["demo"],
        ["train"],
        ["learning-curve"],
        ["load-features"],
        ["batch-score"],
        ["evaluate"],
        ["export-features"],
        ["export-predictions"],
        ["reference"],
        ["models"],
        ["models", "canary"],
        ["keys", "create"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run([*ADSCORE, *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: adscore")


def test_keys_create_prints_a_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    command = [*ADSCORE, "keys", "create", "--file", str(keys_file), "--name", "bidder"]
    result = subprocess.run(
        [*command, "--role", "scorer", "--tenant", "acme"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("adsk_") and key not in keys_file.read_text()
    principal = KeyRing(keys_file, enabled=True).authenticate(key)
    assert principal.name == "bidder" and principal.roles == {"scorer"}
    assert principal.tenants == frozenset({"acme"})
    again = subprocess.run([*command, "--role", "admin"], capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a key named 'bidder'" in again.stderr


def test_serve_without_keys_refuses_to_start_and_says_how(tmp_path: Path) -> None:
    result = subprocess.run(
        [*ADSCORE, "serve", "--model-repository", str(ROOT / "demo" / "model_repository"),
         "--port", str(free_port())],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("ADSCORE_")},
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: authentication is on but no API key file is set")


def test_unknown_model_repository_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*ADSCORE, "load-features", "--model-repository", str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: no versions of model 'pcvr'")


@pytest.fixture(params=["redis", "in-memory"])
def demo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    flags = ["--in-memory"] if request.param == "in-memory" else []
    log = tmp_path / "demo.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*ADSCORE, "demo", "--port", str(port), "--log-level", "warning", *flags],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
    output = log.read_text()
    if request.param == "in-memory":
        assert "using the in-process feature store" in output
    else:  # the demo's private redis-server stops with it
        match = re.search(r"started redis-server on (redis://\S+)", output)
        assert match, output
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis.from_url(match.group(1), socket_connect_timeout=1).ping()


def test_demo_serves_the_documented_request(demo: str) -> None:
    response = httpx.post(
        f"{demo}/v1/score",
        json={"user_id": "u1", "candidates": [{"ad_id": "a1"}, {"ad_id": "a2"}]},
        timeout=10,
    )
    assert response.status_code == 200
    body = response.json()
    assert len(body["scores"]) == 2 and all(0 < s < 1 for s in body["scores"])
    assert body["missing"] == {"user": False, "ads": []}  # u0..u9999 and a0..a49999 are loaded
    last = httpx.post(
        f"{demo}/v1/score",
        json={"user_id": "u9999", "candidates": [{"ad_id": "a49999"}, {"ad_id": "a50000"}]},
        timeout=10,
    ).json()
    assert last["missing"] == {"user": False, "ads": ["a50000"]}


def test_train_publishes_a_version_and_prints_its_metrics(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *ADSCORE,
            "train",
            "--rows",
            "6000",
            "--validation-rows",
            "2000",
            "--calibration-rows",
            "2000",
            "--test-rows",
            "3000",
            "--users",
            "500",
            "--ads",
            "1000",
            "--epochs",
            "1",
            "--threads",
            "2",
            "--quiet",
            "--model-repository",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "published pcvr version 1" in result.stdout
    for line in ("oracle AUC", "DCN-v2 AUC", "logistic regression AUC", "after calibration",
                 "torch vs ONNX"):  # fmt: skip
        assert line in result.stdout
    repository = ModelRepository(tmp_path)
    assert repository.active_version("pcvr") == 1
    assert repository.read_metadata("pcvr", 1).training["rows"] == 6000


def test_invalid_settings_are_named_in_one_line_each_not_a_traceback() -> None:
    env = os.environ | {"ADSCORE_MAX_IN_FLIGHT": "-1", "ADSCORE_AUTH_ENABLED": "false"}
    result = subprocess.run(
        [*ADSCORE, "serve", "--workers", "0"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: invalid settings:",
        "  ADSCORE_WORKERS (or --workers): Input should be greater than or equal to 1, got 0",
        "  ADSCORE_MAX_IN_FLIGHT: Input should be greater than or equal to 1, got '-1'",
    ]


def test_serve_takes_workers_as_a_flag() -> None:
    env = os.environ | {"ADSCORE_AUTH_ENABLED": "false"}
    result = subprocess.run(
        [*ADSCORE, "serve", "--workers", "2", "--port", "0"], env=env, capture_output=True,
        text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "ADSCORE_WORKERS > 1 needs a fixed port" in result.stderr


def test_a_setting_that_does_not_parse_is_named_not_a_traceback() -> None:
    env = os.environ | {"ADSCORE_WARMUP_BATCH_SIZES": "not json"}
    result = subprocess.run([*ADSCORE, "serve"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid settings:")
    assert "warmup_batch_sizes" in result.stderr and "Traceback" not in result.stderr
