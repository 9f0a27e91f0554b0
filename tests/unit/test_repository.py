"""ModelRepository on a temporary folder: publishing, the active-version policy, reading back."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from service.calibration import PlattCalibration
from service.model_metadata import GoldenRows, ModelMetadata, TensorInfo
from service.repository import (
    METADATA_FILE,
    MODEL_FILE,
    POLICY_FILE,
    ModelRepository,
    RepositoryError,
)

NAME = "pcvr"


def _metadata(name: str = "draft", version: int = 99) -> ModelMetadata:
    spec = FeatureSpec(
        schema_version=1,
        features=(
            CategoricalFeature("user_id", "user", hash_buckets=16),
            DenseFeature("ad_price", "ad", default=1.0),
        ),
    )
    return ModelMetadata(
        name=name,
        version=version,
        created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        sha256="0" * 64,
        architecture="test",
        inputs=[
            TensorInfo(name="dense", dtype="float32", shape=["batch", 1]),
            TensorInfo(name="ids", dtype="int64", shape=["batch", 1]),
        ],
        outputs=[TensorInfo(name="logit", dtype="float32", shape=["batch"])],
        feature_spec=spec.to_dict(),
        calibration=PlattCalibration(),
        metrics={},
        parity={},
        golden=GoldenRows(dense=[[0.0]], ids=[[0]], probabilities=[0.5]),
    )


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "exported.onnx"
    path.write_bytes(b"not really onnx \x00\x01\x02" * 100)
    return path


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The common 022 umask, so that mode bits do not depend on the machine running the tests."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _publish_bytes(repository: ModelRepository, tmp_path: Path, content: bytes, **kw: bool) -> int:
    path = tmp_path / f"upload-{hashlib.sha1(content).hexdigest()}.onnx"
    path.write_bytes(content)
    return repository.publish(NAME, path, _metadata(), **kw).version


def test_publish_assigns_consecutive_versions(repository: ModelRepository, tmp_path: Path) -> None:
    versions = [_publish_bytes(repository, tmp_path, f"model {i}".encode()) for i in range(3)]
    assert versions == [1, 2, 3]
    assert repository.versions(NAME) == [1, 2, 3]
    for i, version in enumerate(versions):
        assert repository.model_path(NAME, version).read_bytes() == f"model {i}".encode()


def test_written_metadata_has_the_real_checksum_name_and_version(
    repository: ModelRepository, model_file: Path
) -> None:
    written = repository.publish(NAME, model_file, _metadata(name="draft", version=99))
    expected_sha = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert written.sha256 == expected_sha
    assert written.name == NAME
    assert written.version == 1
    stored = repository.read_metadata(NAME, 1)
    assert stored == written
    assert stored.sha256 == hashlib.sha256(repository.model_path(NAME, 1).read_bytes()).hexdigest()
    # everything else is kept
    assert stored.feature_spec == _metadata().feature_spec
    assert stored.created_at == _metadata().created_at
    on_disk = json.loads((repository.version_dir(NAME, 1) / METADATA_FILE).read_text())
    assert (on_disk["name"], on_disk["version"], on_disk["sha256"]) == (NAME, 1, expected_sha)


def test_activate_writes_the_policy(repository: ModelRepository, tmp_path: Path) -> None:
    _publish_bytes(repository, tmp_path, b"one")
    policy_path = repository.model_dir(NAME) / POLICY_FILE
    assert json.loads(policy_path.read_text()) == {
        "active": 1,
        "canary": None,
        "shadow": None,
        "history": [],
    }
    _publish_bytes(repository, tmp_path, b"two", activate=True)
    assert json.loads(policy_path.read_text())["active"] == 2
    assert json.loads(policy_path.read_text())["history"] == [1]
    assert repository.active_version(NAME) == 2


def test_publish_without_activate_keeps_the_active_version(
    repository: ModelRepository, tmp_path: Path
) -> None:
    _publish_bytes(repository, tmp_path, b"one", activate=True)
    assert _publish_bytes(repository, tmp_path, b"two", activate=False) == 2
    assert repository.active_version(NAME) == 1
    policy = repository.read_policy(NAME)
    assert policy is not None and policy.active == 1


def test_active_version_without_policy_is_the_newest(
    repository: ModelRepository, tmp_path: Path
) -> None:
    for content in (b"one", b"two", b"three"):
        _publish_bytes(repository, tmp_path, content, activate=False)
    assert not (repository.model_dir(NAME) / POLICY_FILE).exists()
    assert repository.read_policy(NAME) is None
    assert repository.active_version(NAME) == 3


def test_newest_is_numeric_not_lexical(repository: ModelRepository, tmp_path: Path) -> None:
    for i in range(10):
        _publish_bytes(repository, tmp_path, f"m{i}".encode(), activate=False)
    assert repository.versions(NAME) == list(range(1, 11))
    assert repository.active_version(NAME) == 10
    assert _publish_bytes(repository, tmp_path, b"eleven", activate=False) == 11


def test_active_version_with_no_versions_raises(repository: ModelRepository) -> None:
    with pytest.raises(RepositoryError, match="no versions of model 'pcvr'"):
        repository.active_version(NAME)
    repository.model_dir(NAME).mkdir(parents=True)
    with pytest.raises(RepositoryError):
        repository.active_version(NAME)


def test_set_active(repository: ModelRepository, tmp_path: Path) -> None:
    for content in (b"one", b"two"):
        _publish_bytes(repository, tmp_path, content)
    repository.set_active(NAME, 1)
    assert repository.active_version(NAME) == 1


@pytest.mark.parametrize("version", [0, 3, -1])
def test_set_active_to_a_missing_version_raises(
    repository: ModelRepository, tmp_path: Path, version: int
) -> None:
    _publish_bytes(repository, tmp_path, b"one")
    _publish_bytes(repository, tmp_path, b"two")
    with pytest.raises(RepositoryError, match=f"no version {version}"):
        repository.set_active(NAME, version)
    assert repository.active_version(NAME) == 2


def test_set_active_on_an_unknown_model_raises(repository: ModelRepository) -> None:
    with pytest.raises(RepositoryError):
        repository.set_active("ghost", 1)


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "/abs", "..", "."])
def test_invalid_model_names_raise(
    repository: ModelRepository, model_file: Path, name: str
) -> None:
    with pytest.raises(RepositoryError, match="invalid model name"):
        repository.model_dir(name)
    with pytest.raises(RepositoryError, match="invalid model name"):
        repository.publish(name, model_file, _metadata())
    with pytest.raises(RepositoryError, match="invalid model name"):
        repository.versions(name)
    assert not repository.root.exists() or list(repository.root.iterdir()) == []


@pytest.mark.usefixtures("usual_umask")
def test_published_files_and_folders_are_readable_by_others(
    repository: ModelRepository, tmp_path: Path
) -> None:
    private = tmp_path / "private.onnx"
    private.write_bytes(b"weights")
    private.chmod(0o600)
    repository.publish(NAME, private, _metadata())
    version_dir = repository.version_dir(NAME, 1)
    paths = [
        repository.model_dir(NAME),
        version_dir,
        version_dir / MODEL_FILE,
        version_dir / METADATA_FILE,
        repository.model_dir(NAME) / POLICY_FILE,
    ]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path} has mode {oct(mode)}"
    for folder in paths[:2]:
        assert stat.S_IMODE(folder.stat().st_mode) & 0o011 == 0o011  # others may enter


def test_no_staging_folder_is_left_behind(repository: ModelRepository, tmp_path: Path) -> None:
    _publish_bytes(repository, tmp_path, b"one")
    _publish_bytes(repository, tmp_path, b"two", activate=False)
    entries = sorted(p.name for p in repository.model_dir(NAME).iterdir())
    assert entries == ["1", "2", POLICY_FILE]
    assert sorted(p.name for p in repository.version_dir(NAME, 2).iterdir()) == [
        METADATA_FILE,
        MODEL_FILE,
    ]


def test_failed_publish_leaves_nothing_behind(repository: ModelRepository, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        repository.publish(NAME, tmp_path / "missing.onnx", _metadata())
    assert repository.versions(NAME) == []
    assert list(repository.model_dir(NAME).iterdir()) == []


def test_read_metadata_of_a_missing_version_names_the_path(
    repository: ModelRepository, tmp_path: Path
) -> None:
    _publish_bytes(repository, tmp_path, b"one")
    missing = repository.version_dir(NAME, 7) / METADATA_FILE
    with pytest.raises(RepositoryError) as caught:
        repository.read_metadata(NAME, 7)
    assert str(missing) in str(caught.value)
    assert "no version 7" in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[]", b'{"name": "pcvr"}', b"\xff\xfe garbage"],
    ids=["truncated", "empty", "array", "incomplete", "binary"],
)
def test_corrupt_metadata_raises(
    repository: ModelRepository, tmp_path: Path, content: bytes
) -> None:
    _publish_bytes(repository, tmp_path, b"one")
    path = repository.version_dir(NAME, 1) / METADATA_FILE
    path.write_bytes(content)
    with pytest.raises(RepositoryError, match="invalid metadata") as caught:
        repository.read_metadata(NAME, 1)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"{", b'{"active": "one"}', b'{"active": 1, "x": 2}'])
def test_corrupt_policy_raises(repository: ModelRepository, tmp_path: Path, content: bytes) -> None:
    _publish_bytes(repository, tmp_path, b"one")
    (repository.model_dir(NAME) / POLICY_FILE).write_bytes(content)
    with pytest.raises(RepositoryError, match="not a valid policy"):
        repository.active_version(NAME)


def test_models_are_independent(repository: ModelRepository, model_file: Path) -> None:
    repository.publish("pcvr", model_file, _metadata())
    repository.publish("pcvr", model_file, _metadata())
    other = repository.publish("ctr", model_file, _metadata())
    assert other.version == 1
    assert other.name == "ctr"
    assert repository.versions("pcvr") == [1, 2]
    assert repository.versions("ctr") == [1]
    assert repository.active_version("ctr") == 1
    assert repository.versions("nothing") == []
