"""The demo model shipped in the repository keeps the quality it claims, and can be rebuilt."""

from __future__ import annotations

from pathlib import Path

from models.synthetic import world_for_model
from service.registry import load_version
from service.repository import ModelRepository, file_sha256
from service.settings import Settings

DEMO = ModelRepository(Path(__file__).parents[2] / "demo" / "model_repository")
NAME = "pcvr"


def test_demo_model_meets_its_quality_bar() -> None:
    metrics = DEMO.read_metadata(NAME, DEMO.active_version(NAME)).metrics
    assert 0.75 <= metrics["oracle_auc"] <= 0.90
    assert metrics["baseline_auc"] <= metrics["oracle_auc"] - 0.03
    assert metrics["auc"] >= metrics["baseline_auc"] + 0.008
    assert metrics["calibration_error"] < 0.002
    assert 0.01 <= metrics["base_rate"] <= 0.06


def test_demo_model_is_small_intact_and_matches_onnx() -> None:
    version = DEMO.active_version(NAME)
    metadata = DEMO.read_metadata(NAME, version)
    path = DEMO.model_path(NAME, version)
    assert path.stat().st_size < 20 * 2**20
    assert file_sha256(path) == metadata.sha256
    assert metadata.parity["max_abs_probability_diff"] <= 1e-5
    load_version(DEMO, NAME, version, Settings())  # checksum, signature, golden rows, warm-up


def test_synthetic_world_regenerates_identically() -> None:
    metadata = DEMO.read_metadata(NAME, DEMO.active_version(NAME))
    world = world_for_model(metadata.dataset, metadata.spec().fingerprint())
    assert len(world.users.keys) == 10_000 and world.users.keys[-1] == "u9999"
    assert len(world.ads.keys) == 50_000 and world.ads.keys[-1] == "a49999"


def test_demo_model_carries_no_build_paths() -> None:
    onnx_bytes = DEMO.model_path(NAME, DEMO.active_version(NAME)).read_bytes()
    assert b"site-packages" not in onnx_bytes and b'.py", line' not in onnx_bytes
