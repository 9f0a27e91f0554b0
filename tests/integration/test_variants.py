"""Cheaper model variants: int8 and low-rank versions load and score like any other version."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks import variants as bench
from feature_client.assembly import ModelInputs
from models.dcn import DCNConfig
from models.export import first_rows, onnx_logits
from models.pipeline import TrainedModel, export_and_publish
from service.cli import _plan, build_parser
from service.model_metadata import ModelMetadata
from service.registry import load_version
from service.repository import ModelRepository
from service.settings import Settings
from tests.conftest import TrainedFixture


@dataclass(frozen=True)
class Int8Version:
    repository: ModelRepository
    metadata: ModelMetadata
    model: TrainedModel

    @property
    def path(self) -> Path:
        return self.repository.model_path(self.metadata.name, self.metadata.version)


@pytest.fixture(scope="module")
def int8(trained: TrainedFixture, tmp_path_factory: pytest.TempPathFactory) -> Int8Version:
    """The session's small model, published again as its int8 export."""
    model: TrainedModel = trained.trained  # type: ignore[assignment]
    repository = ModelRepository(tmp_path_factory.mktemp("int8_repository"))
    metadata = export_and_publish(model, repository, "pcvr", quantization="int8")
    return Int8Version(repository, metadata, model)


def test_int8_version_loads_and_scores_through_the_service_runtime(
    int8: Int8Version, trained: TrainedFixture
) -> None:
    ops = {node.op_type for node in onnx.load(str(int8.path)).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops
    assert "Gather" in ops  # the embedding table stays float32
    # Every load-time check: checksum, signature, golden rows (its own int8 output), warm-up.
    loaded = load_version(int8.repository, "pcvr", int8.metadata.version, Settings())
    rows = first_rows(int8.model.test.inputs, 256)
    served = loaded.score(ModelInputs(rows.dense, rows.ids))
    assert np.all((served > 0) & (served < 1))
    expected = int8.metadata.calibration.apply(onnx_logits(int8.path, rows))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
    fp32_path = ModelRepository(trained.repository).model_path(trained.name, trained.version)
    fp32 = int8.model.calibration.apply(onnx_logits(fp32_path, rows))
    assert np.abs(served - fp32).mean() < 0.005  # close to the model it came from


def test_int8_metadata_records_the_variant_and_its_quality(
    int8: Int8Version, trained: TrainedFixture
) -> None:
    metadata = int8.metadata
    fp32 = ModelRepository(trained.repository).read_metadata(trained.name, trained.version)
    assert metadata.architecture == "dcn-v2-int8"
    assert metadata.training["variant"] == {
        "cross_rank": None,
        "mlp_layers": [256, 128, 64],
        "quantization": "int8",
        "request_once": False,
    }
    assert (metadata.inputs, metadata.outputs) == (fp32.inputs, fp32.outputs)
    m = metadata.metrics
    for key in ("auc", "log_loss", "calibration_error", "oracle_auc", "fp32_auc"):
        assert 0 < m[key] < 1, key
    assert m["oracle_auc"] == fp32.metrics["oracle_auc"]  # the same test rows
    assert m["fp32_auc"] == fp32.metrics["auc"]
    assert abs(m["auc"] - m["fp32_auc"]) < 0.005
    assert 0 < m["int8_vs_fp32_mean_abs_probability_diff"] < 0.005
    assert m["int8_vs_fp32_max_abs_probability_diff"] < 0.1
    # Parity of an int8 model: its own output alone vs in one batch of all parity rows.
    assert metadata.parity["rows"] == 4096
    assert 0 < metadata.parity["max_abs_probability_diff"] < 0.05
    assert metadata.calibration != fp32.calibration  # fitted again, on the int8 outputs


def test_recalibration_matches_the_observed_conversion_rate(int8: Int8Version) -> None:
    calibration_rows, test = int8.model.calibration_rows, int8.model.test
    int8_p = int8.metadata.calibration.apply(onnx_logits(int8.path, calibration_rows.inputs))
    observed = float(calibration_rows.labels.mean())
    # Platt's maximum-likelihood intercept makes the mean prediction equal the observed rate
    # on the rows it was fitted on: this holds only if it was fitted on these very logits.
    assert abs(int8_p.mean() - observed) < 1e-5
    stale = int8.model.calibration.apply(onnx_logits(int8.path, calibration_rows.inputs))
    assert abs(stale.mean() - observed) > 10 * abs(int8_p.mean() - observed)
    # On held-out rows, within sampling error of the observed rate.
    held_out = int8.metadata.calibration.apply(onnx_logits(int8.path, test.inputs))
    rate = float(test.labels.mean())
    assert abs(held_out.mean() - rate) < 3 * np.sqrt(rate * (1 - rate) / len(test))


def test_train_command_takes_the_variant_flags() -> None:
    flags = ["--cross-rank", "32", "--mlp-layers", "128", "64", "--quantize", "int8"]
    args = build_parser().parse_args(["train", *flags])
    assert args.quantize == "int8"
    assert _plan(args).dcn == DCNConfig(cross_rank=32, mlp_layers=(128, 64))
    defaults = build_parser().parse_args(["train"])
    assert defaults.quantize == "none" and _plan(defaults).dcn == DCNConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--cross-rank", "0"])


def test_quick_benchmark_publishes_variants_and_writes_its_table(tmp_path: Path) -> None:
    out, root = tmp_path / "results", tmp_path / "repository"
    argv = ["--quick", "--rounds", "3", "--calls", "3", "--quiet"]
    assert bench.main([*argv, "--out", str(out), "--repository", str(root)]) == 0
    table = (out / "variants.md").read_text()
    assert table.startswith("# DCN-v2 variants")
    assert "Command: `python -m benchmarks.variants --quick" in table
    result = json.loads((out / "variants.json").read_text())
    labels = [r["variant"] for r in result["variants"]]
    fp32 = ["dcn-v2", "dcn-v2-r64", "dcn-v2-r32", "dcn-v2-r32-mlp128x64", "dcn-v2-r16-mlp32x16"]
    suffixes = ("", "-int8", "-request-once", "-int8-request-once")
    assert labels == [base + suffix for base in fp32 for suffix in suffixes]
    rows = {r["variant"]: r for r in result["variants"]}
    for row in result["variants"]:
        assert f"| {row['variant']} | {row['version']} |" in table
        assert row["candidates_per_second"] > 0 and 0.5 < row["auc"] < 1
    assert result["variants"][0]["speedup"] == 1.0
    for base in fp32:  # the same model: the same quality, less work per candidate
        flat, once = rows[base], rows[f"{base}-request-once"]
        assert once["request_once"] and not flat["request_once"]
        assert once["auc"] == pytest.approx(flat["auc"], abs=1e-5)
        assert once["multiply_adds"] < flat["multiply_adds"]
    # Each variant is an ordinary version: the low-rank int8 request-once one loads with every
    # check.
    repository = ModelRepository(root)
    low_rank = repository.read_metadata(
        "pcvr-variants", rows["dcn-v2-r64-int8-request-once"]["version"]
    )
    assert low_rank.training["variant"] == {
        "cross_rank": 64,
        "mlp_layers": [256, 128, 64],
        "quantization": "int8",
        "request_once": True,
    }
    load_version(repository, "pcvr-variants", low_rank.version, Settings())


def test_speed_only_times_versions_trained_on_different_data(
    trained: TrainedFixture, tmp_path: Path
) -> None:
    """Quality deltas need the same data; --speed-only times any two versions, judging none."""
    root = tmp_path / "repository"
    source = trained.repository / trained.name / str(trained.version)
    other = root / trained.name / str(trained.version + 1)
    shutil.copytree(source, root / trained.name / str(trained.version))
    shutil.copytree(source, other)
    metadata = json.loads((other / "metadata.json").read_text())
    metadata["version"] = trained.version + 1
    metadata["training"]["rows"] += 1
    (other / "metadata.json").write_text(json.dumps(metadata))
    argv = ["--repository", str(root), "--name", trained.name, "--quiet", "--rounds", "2",
            "--calls", "2", "--versions", str(trained.version), str(trained.version + 1),
            "--out", str(tmp_path / "results")]  # fmt: skip
    with pytest.raises(SystemExit, match="was not trained on the baseline's data"):
        bench.main(argv)
    assert bench.main([*argv, "--speed-only"]) == 0
    result = json.loads((tmp_path / "results" / "variants.json").read_text())
    assert [r["version"] for r in result["variants"]] == [trained.version, trained.version + 1]
    assert all(r["candidates_per_second"] > 0 for r in result["variants"])
    assert result["targets"] == bench.SPEED_ONLY
    with pytest.raises(SystemExit):  # nothing to time without --versions
        bench.parse_args(["--speed-only"])
