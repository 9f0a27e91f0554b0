"""Settings: defaults, ADSCORE_ environment variables, validation and immutability."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from service.settings import Settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ADSCORE_ variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("ADSCORE_"):
            monkeypatch.delenv(name)
    yield


def test_defaults() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.log_level == "info"
    assert settings.access_log is False
    assert settings.model_repository == Path("model_repository")
    assert settings.model_name == "pcvr"
    assert settings.execution_provider == "cpu"
    assert settings.inference_threads == 2
    assert settings.intra_op_threads == 1
    assert settings.warmup_batch_sizes == (1, 16, 64, 256)
    assert settings.feature_backend == "redis"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.feature_namespace == "adscore"
    assert settings.feature_timeout_ms == 20.0
    assert settings.on_feature_store_error == "degrade"
    assert settings.max_candidates == 1024
    assert settings.max_body_bytes == 1 << 20
    assert settings.max_id_length == 128


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADSCORE_PORT", "9123")
    monkeypatch.setenv("ADSCORE_FEATURE_BACKEND", "memory")
    monkeypatch.setenv("ADSCORE_EXECUTION_PROVIDER", "cuda")
    monkeypatch.setenv("ADSCORE_WARMUP_BATCH_SIZES", "[1,8]")
    monkeypatch.setenv("ADSCORE_MODEL_REPOSITORY", "/srv/models")
    monkeypatch.setenv("ADSCORE_ACCESS_LOG", "true")
    monkeypatch.setenv("ADSCORE_FEATURE_TIMEOUT_MS", "7.5")
    settings = Settings()
    assert settings.port == 9123
    assert settings.feature_backend == "memory"
    assert settings.execution_provider == "cuda"
    assert settings.warmup_batch_sizes == (1, 8)
    assert settings.model_repository == Path("/srv/models")
    assert settings.access_log is True
    assert settings.feature_timeout_ms == 7.5
    # untouched fields keep their defaults
    assert settings.host == "127.0.0.1"
    assert settings.max_candidates == 1024


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("MODEL_NAME", "other")
    settings = Settings()
    assert settings.port == 8000
    assert settings.model_name == "pcvr"


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("ADSCORE_PORT", "70000", "port"),
        ("ADSCORE_PORT", "-1", "port"),
        ("ADSCORE_PORT", "http", "port"),
        ("ADSCORE_FEATURE_BACKEND", "mongo", "feature_backend"),
        ("ADSCORE_EXECUTION_PROVIDER", "tpu", "execution_provider"),
        ("ADSCORE_LOG_LEVEL", "verbose", "log_level"),
        ("ADSCORE_WARMUP_BATCH_SIZES", "[1,", "warmup_batch_sizes"),
        ("ADSCORE_INFERENCE_THREADS", "0", "inference_threads"),
        ("ADSCORE_FEATURE_TIMEOUT_MS", "0", "feature_timeout_ms"),
        ("ADSCORE_MAX_BODY_BYTES", "100", "max_body_bytes"),
        ("ADSCORE_SWITCH_INTERVAL_US", "0", "switch_interval_us"),
    ],
)
def test_invalid_environment_value_names_the_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    # pydantic's ValidationError, or pydantic-settings' SettingsError for unparseable JSON:
    # both are ValueErrors.
    with pytest.raises(ValueError) as caught:
        Settings()
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("ADSCORE_PORT", "70000", "port"),
        ("ADSCORE_FEATURE_BACKEND", "mongo", "feature_backend"),
    ],
)
def test_invalid_value_is_a_validation_error_located_at_the_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings()
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


def test_invalid_keyword_argument_is_a_validation_error() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings(port=70000)
    assert [error["loc"] for error in caught.value.errors()] == [("port",)]


def test_unknown_keyword_argument_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="prot"):
        Settings(prot=8080)  # type: ignore[call-arg]


def test_keyword_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADSCORE_PORT", "9123")
    monkeypatch.setenv("ADSCORE_FEATURE_BACKEND", "memory")
    monkeypatch.setenv("ADSCORE_WARMUP_BATCH_SIZES", "[1,8]")
    settings = Settings(port=9000, warmup_batch_sizes=(4,))
    assert settings.port == 9000
    assert settings.warmup_batch_sizes == (4,)
    assert settings.feature_backend == "memory"  # not given as a keyword: the environment's


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(pydantic.ValidationError):
        settings.port = 9000  # type: ignore[misc]
    assert settings.port == 8000
    updated = settings.model_copy(update={"port": 9000})
    assert updated.port == 9000
    assert settings.port == 8000


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    undocumented = [f for f in Settings.model_fields if f"ADSCORE_{f.upper()}" not in readme]
    assert undocumented == [], f"add these to README, Configuration: {undocumented}"


@pytest.mark.parametrize(
    ("max_in_flight", "fraction", "expected"),
    [(16, 0.5, 8), (3, 0.5, 1), (100, 0.29, 29), (90, 0.7, 63), (1, 0.5, 1), (16, 1.0, 16)],
)
def test_the_overload_bound_is_the_fraction_rounded_down(
    max_in_flight: int, fraction: float, expected: int
) -> None:
    settings = Settings(max_in_flight=max_in_flight, overload_in_flight_fraction=fraction)
    assert settings.overload_in_flight == expected


@pytest.mark.parametrize("fraction", [0, 1.5])
def test_the_overload_fraction_lies_in_0_to_1(fraction: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="overload_in_flight_fraction"):
        Settings(overload_in_flight_fraction=fraction)
