"""`adscore reference`: a version published without a drift reference gets the one it would have
got at publish time, without retraining and without touching model.onnx."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.repository import ModelRepository, RepositoryError, file_sha256
from tests.conftest import TrainedFixture


def _copy_without_reference(trained: TrainedFixture, tmp_path: Path) -> ModelRepository:
    root = tmp_path / "model_repository"
    shutil.copytree(trained.repository, root)
    repository = ModelRepository(root)
    metadata = repository.read_metadata(trained.name, trained.version)
    repository.write_metadata(metadata.model_copy(update={"drift_reference": None}))
    return repository


def test_the_rebuilt_reference_equals_the_one_written_at_publish(
    trained: TrainedFixture, tmp_path: Path
) -> None:
    original = ModelRepository(trained.repository).read_metadata(trained.name, trained.version)
    assert original.drift_reference is not None
    repository = _copy_without_reference(trained, tmp_path)
    onnx_before = file_sha256(repository.model_path(trained.name, trained.version))
    assert repository.read_metadata(trained.name, trained.version).drift_reference is None

    argv = ["reference", "--model-repository", str(repository.root), "--name", trained.name,
            "--version", str(trained.version)]  # fmt: skip
    assert main(argv) == 0

    rebuilt = repository.read_metadata(trained.name, trained.version).drift_reference
    assert rebuilt is not None
    assert rebuilt.rows == original.drift_reference.rows
    assert rebuilt.missing_rate == original.drift_reference.missing_rate
    assert rebuilt.feature_missing_rate == original.drift_reference.feature_missing_rate
    assert rebuilt.feature_missing_rate  # the rates were written at publish time
    expected, got = original.drift_reference.model_dump(), rebuilt.model_dump()
    for want, have in zip(expected["dense"], got["dense"], strict=True):
        assert have["name"] == want["name"]
        np.testing.assert_allclose(have["edges"], want["edges"], rtol=1e-6)
        np.testing.assert_allclose(have["shares"], want["shares"], atol=1e-4)
    assert got["categorical"] == expected["categorical"]
    np.testing.assert_allclose(got["score"]["shares"], expected["score"]["shares"], atol=1e-4)
    assert file_sha256(repository.model_path(trained.name, trained.version)) == onnx_before


def test_metadata_for_another_model_file_is_refused(
    trained: TrainedFixture, tmp_path: Path
) -> None:
    repository = _copy_without_reference(trained, tmp_path)
    metadata = repository.read_metadata(trained.name, trained.version)
    with pytest.raises(RepositoryError, match="another model file"):
        repository.write_metadata(metadata.model_copy(update={"sha256": "0" * 64}))


def test_a_version_not_trained_on_synthetic_data_is_refused(
    trained: TrainedFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = _copy_without_reference(trained, tmp_path)
    metadata = repository.read_metadata(trained.name, trained.version)
    repository.write_metadata(metadata.model_copy(update={"dataset": None}))
    argv = ["reference", "--model-repository", str(repository.root), "--name", trained.name]
    assert main(argv) == 2
    assert "was not trained on the synthetic data set" in capsys.readouterr().err
