"""Request-once versions: published from training or from a published fp32 version, they load
through the service's checks and score what their source scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from feature_client.assembly import ModelInputs, concatenate_inputs
from models.export import first_rows, onnx_logits
from models.pipeline import TrainedModel, publish_variants
from models.request_once import publish_request_once, request_shaped
from service.cli import main
from service.registry import load_version
from service.repository import ModelRepository
from service.settings import Settings
from tests.conftest import TrainedFixture


def _scoring_rows(model: TrainedModel) -> ModelInputs:
    """Test rows as the service lays out requests (64 candidates each), then unrelated rows."""
    rows = first_rows(model.test.inputs, 512)
    return concatenate_inputs([request_shaped(rows, model.spec, 64), rows])


@pytest.fixture(scope="module")
def repository(trained: TrainedFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("request_once") / "model_repository"
    shutil.copytree(trained.repository, root)
    return root


def test_training_publishes_request_once_versions_that_score_like_the_flat_export(
    trained: TrainedFixture, repository: Path
) -> None:
    model: TrainedModel = trained.trained  # type: ignore[assignment]
    models = ModelRepository(repository)
    fp32, int8 = publish_variants(model, models, "pcvr", ["none", "int8"], request_once=True)
    assert fp32.architecture == "dcn-v2-request-once"
    assert int8.architecture == "dcn-v2-int8-request-once"
    assert fp32.training["variant"]["request_once"] is True
    assert fp32.parity["rows"] == 2 * 4096  # test rows and the same rows request-shaped
    assert fp32.parity["max_abs_probability_diff"] < 1e-5
    assert fp32.metrics == ModelRepository(trained.repository).read_metadata("pcvr", 1).metrics
    graph = onnx.load(str(models.model_path("pcvr", fp32.version))).graph
    assert {"NonZero", "CumSum"} <= {n.op_type for n in graph.node}  # requests found in-graph

    rows = _scoring_rows(model)
    flat = model.calibration.apply(onnx_logits(models.model_path("pcvr", trained.version), rows))
    served = {}
    for metadata in (fp32, int8):
        # The service's own load: checksum, signature, golden rows, warm-up.
        loaded = load_version(models, "pcvr", metadata.version, Settings())
        served[metadata.version] = loaded.score(rows)
    np.testing.assert_allclose(served[fp32.version], flat, rtol=0, atol=1e-6)
    assert np.abs(served[int8.version] - flat).mean() < 0.005  # close, as int8 always is


def test_a_published_fp32_version_gets_a_request_once_copy_with_the_same_scores(
    trained: TrainedFixture, repository: Path
) -> None:
    model: TrainedModel = trained.trained  # type: ignore[assignment]
    models = ModelRepository(repository)
    source = models.read_metadata("pcvr", trained.version)
    copy = publish_request_once(models, "pcvr", trained.version)
    assert copy.architecture == source.architecture + "-request-once"
    assert copy.training["derived_from"] == trained.version
    assert copy.calibration == source.calibration and copy.metrics == source.metrics
    assert copy.drift_reference == source.drift_reference
    assert copy.golden == source.golden  # the service checks the copy against the source's
    assert copy.parity["max_abs_logit_diff"] < 1e-4
    assert copy.parity["torch_vs_source_max_abs_logit_diff"] < 1e-4
    assert models.active_version("pcvr") != copy.version  # not activated unless asked

    rows = _scoring_rows(model)
    loaded = load_version(models, "pcvr", copy.version, Settings())
    np.testing.assert_allclose(
        loaded.score(rows),
        source.calibration.apply(onnx_logits(models.model_path("pcvr", trained.version), rows)),
        rtol=0,
        atol=1e-6,
    )


def test_request_once_refuses_quantized_and_request_once_sources(
    trained: TrainedFixture, repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = ModelRepository(repository)
    model: TrainedModel = trained.trained  # type: ignore[assignment]
    (int8,) = publish_variants(model, models, "pcvr", ["int8"])
    argv = ["request-once", "--model-repository", str(repository), "--version"]
    assert main([*argv, str(int8.version)]) == 2
    assert "is quantized (int8)" in capsys.readouterr().err

    copy = publish_request_once(models, "pcvr", trained.version)
    assert main([*argv, str(copy.version)]) == 2
    assert "already computes its request part once" in capsys.readouterr().err

    assert main([*argv, str(trained.version), "--activate"]) == 0
    out = capsys.readouterr().out
    assert "dcn-v2-request-once" in out and "largest score difference" in out
    assert models.read_metadata("pcvr", models.active_version("pcvr")).training["variant"][
        "request_once"
    ]


def test_a_source_whose_file_does_not_match_its_checksum_is_refused(
    trained: TrainedFixture, tmp_path: Path
) -> None:
    root = tmp_path / "model_repository"
    shutil.copytree(trained.repository, root)
    models = ModelRepository(root)
    path = models.version_dir("pcvr", trained.version) / "metadata.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256 does not match"):
        publish_request_once(models, "pcvr", trained.version)
    assert models.versions("pcvr") == [trained.version]  # nothing published
