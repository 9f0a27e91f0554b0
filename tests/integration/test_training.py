"""The trained, exported and published model: metadata, parity, and every load-time check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from feature_client.assembly import ModelInputs
from models.export import check_parity
from models.pipeline import TrainedModel
from service.registry import ModelLoadError, load_version
from service.repository import ModelRepository
from service.settings import Settings
from tests.conftest import TrainedFixture


def _copy(trained: TrainedFixture, tmp_path: Path) -> tuple[ModelRepository, Path]:
    root = tmp_path / "repo"
    shutil.copytree(trained.repository, root)
    repository = ModelRepository(root)
    return repository, repository.version_dir(trained.name, trained.version)


def test_metadata_records_quality_parity_and_provenance(trained: TrainedFixture) -> None:
    metadata = ModelRepository(trained.repository).read_metadata(trained.name, trained.version)
    for key in ("auc", "log_loss", "calibration_error", "baseline_auc", "oracle_auc"):
        assert 0 < metadata.metrics[key] < 1, key
    # Even a small model learns something, and nothing beats the truth.
    assert 0.6 < metadata.metrics["auc"] <= metadata.metrics["oracle_auc"]
    assert metadata.parity["max_abs_probability_diff"] < 1e-5
    assert metadata.dataset is not None and metadata.dataset["kind"] == "synthetic"
    assert metadata.training["rows"] == 40_000
    assert [t.name for t in metadata.inputs] == ["dense", "ids"]
    assert len(metadata.golden.probabilities) == len(metadata.golden.dense) > 0


def test_onnx_matches_torch_on_held_out_rows(trained: TrainedFixture) -> None:
    model: TrainedModel = trained.trained  # type: ignore[assignment]
    path = ModelRepository(trained.repository).model_path(trained.name, trained.version)
    rows = model.test.inputs
    parity = check_parity(
        model.model, path, ModelInputs(rows.dense[:2000], rows.ids[:2000]), model.calibration
    )
    assert parity.max_abs_probability_diff < 1e-5
    assert parity.max_abs_logit_diff < 1e-4


def test_published_version_loads_with_every_check(trained: TrainedFixture) -> None:
    repository = ModelRepository(trained.repository)
    loaded = load_version(repository, trained.name, trained.version, Settings())
    assert loaded.version == trained.version
    assert loaded.runtime.provider == "CPUExecutionProvider"
    assert loaded.load_seconds > 0


def test_wrong_checksum_is_refused(trained: TrainedFixture, tmp_path: Path) -> None:
    repository, folder = _copy(trained, tmp_path)
    with (folder / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_version(repository, trained.name, trained.version, Settings())


def test_corrupt_model_file_is_refused(trained: TrainedFixture, tmp_path: Path) -> None:
    repository, folder = _copy(trained, tmp_path)
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    _rewrite_metadata(folder, sha256=_sha(folder / "model.onnx"))
    with pytest.raises(ModelLoadError, match="onnxruntime cannot open it"):
        load_version(repository, trained.name, trained.version, Settings())


def test_spec_that_does_not_match_the_inputs_is_refused(
    trained: TrainedFixture, tmp_path: Path
) -> None:
    repository, folder = _copy(trained, tmp_path)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["feature_spec"]["features"].append(
        {"name": "extra", "kind": "dense", "source": "ad", "default": 0.0}
    )
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="input 'dense'"):
        load_version(repository, trained.name, trained.version, Settings())


def test_golden_rows_that_disagree_are_refused(trained: TrainedFixture, tmp_path: Path) -> None:
    repository, folder = _copy(trained, tmp_path)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["golden"]["probabilities"][0] += 0.01
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="golden rows disagree"):
        load_version(repository, trained.name, trained.version, Settings())


def test_missing_version_is_refused(trained: TrainedFixture) -> None:
    with pytest.raises(ModelLoadError, match="no version 99"):
        load_version(ModelRepository(trained.repository), trained.name, 99, Settings())


def test_calibration_improves_on_the_raw_model(trained: TrainedFixture) -> None:
    model: TrainedModel = trained.trained  # type: ignore[assignment]
    before = model.metrics["calibration_error_uncalibrated"]
    assert model.metrics["calibration_error"] <= before + 1e-3
    assert np.isfinite(model.calibration.slope) and model.calibration.slope > 0


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_metadata(folder: Path, **changes: object) -> None:
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata.update(changes)
    (folder / "metadata.json").write_text(json.dumps(metadata))


def test_exported_models_carry_no_build_paths(trained: TrainedFixture) -> None:
    repository = ModelRepository(trained.repository)
    onnx_bytes = repository.model_path(trained.name, trained.version).read_bytes()
    assert b"site-packages" not in onnx_bytes
    assert str(Path(__file__).parents[2]).encode() not in onnx_bytes
