"""adscore batch-score / evaluate / export-features on a real redis-server and the real model,
the parity of batch and online scores over HTTP, and the Ray Data stage in local mode."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from batch_scoring.errors import FeatureSourceError, ManifestMismatch
from batch_scoring.features import Entity, RedisFeatures
from batch_scoring.reader import list_inputs
from batch_scoring.runner import load_model, read_manifest, run_batch
from batch_scoring.synthetic import request_table
from models.synthetic import SyntheticWorld
from service.cli import main
from service.repository import ModelRepository
from tests.app.conftest import serving
from tests.conftest import TrainedFixture
from tests.fixtures import publish_variant

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Online:
    url: str
    redis_url: str
    repository: Path
    world: SyntheticWorld


@pytest.fixture(scope="module")
def online(trained: TrainedFixture) -> Iterator[Online]:
    """The trained model served over HTTP on a real Redis with the world's features."""
    with serving(trained) as running:
        yield Online(running.url, running.redis.url, trained.repository, running.world)


@pytest.fixture(scope="module")
def requests_file(online: Online, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,500 labelled impressions, 40 of them for a user or an ad the store does not know."""
    table = request_table(online.world, 2_500, seed=11)
    users = table.column("user_id").to_pylist()
    ads = table.column("ad_id").to_pylist()
    for i in range(0, 1_000, 50):
        users[i] = f"nobody-{i}"
        ads[i + 25] = f"no-ad-{i}"
    table = table.set_column(1, "user_id", pa.array(users)).set_column(2, "ad_id", pa.array(ads))
    path = tmp_path_factory.mktemp("requests") / "requests.parquet"
    pq.write_table(table, path, row_group_size=700)
    return path


def batch_score(online: Online, *args: str) -> int:
    return main(
        [
            "batch-score",
            "--model-repository",
            str(online.repository),
            "--redis-url",
            online.redis_url,
            "--quiet",
            "--threads",
            "1",
            *args,
        ]
    )


def test_batch_scores_equal_v1_score_over_http(online: Online, tmp_path: Path) -> None:
    world = online.world
    rng = np.random.default_rng(5)
    requests: list[dict[str, object]] = []
    rows: list[dict[str, object]] = []
    for r in range(12):
        user = world.users.keys[int(rng.integers(len(world.users.keys)))] if r else "nobody"
        context: dict[str, str | int] = {"device": ["ios", "android", "web"][r % 3], "hour": r}
        if r % 4 == 1:
            context["country"] = "DE"
            context["placement"] = "story"
        ads = [world.ads.keys[int(a)] for a in rng.choice(len(world.ads.keys), 30, replace=False)]
        ads[3] = "unknown-ad"
        requests.append({"user_id": user, "context": context, "ads": ads})
        absent = {"country": None, "placement": None}  # null: the key is absent online
        rows += [{"user_id": user, "ad_id": a, "request": r, **absent, **context} for a in ads]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "requests.parquet")
    assert batch_score(online, "--input", str(tmp_path / "requests.parquet"),
                       "--output", str(tmp_path / "out"), "--chunk-rows", "100") == 0  # fmt: skip
    scored = pq.read_table(tmp_path / "out")
    assert scored.num_rows == len(rows)
    with httpx.Client(base_url=online.url, timeout=10) as client:
        for r, request in enumerate(requests):
            response = client.post(
                "/v1/score",
                json={
                    "user_id": request["user_id"],
                    "context": request["context"],
                    "candidates": [{"ad_id": a} for a in request["ads"]],  # type: ignore[attr-defined]
                },
            )
            assert response.status_code == 200, response.text
            body = response.json()
            mine = scored.filter(pc.equal(scored["request"], r))
            assert mine.column("ad_id").to_pylist() == request["ads"]
            np.testing.assert_allclose(mine["score"].to_numpy(), body["scores"], rtol=0, atol=1e-6)
            assert mine["model_version"].to_pylist() == [body["model_version"]] * 30
            assert mine["missing_user"].to_pylist() == [body["missing"]["user"]] * 30
            missing_ads = [a for a, m in zip(request["ads"], mine["missing_ad"].to_pylist(),  # type: ignore[call-overload]
                                             strict=True) if m]  # fmt: skip
            assert missing_ads == body["missing"]["ads"] == ["unknown-ad"]


class CrashingFeatures:
    """The real Redis source that fails on its n-th read: a batch job dying half-way."""

    def __init__(self, inner: RedisFeatures, fail_on_call: int) -> None:
        self.inner = inner
        self.calls = 0
        self.fail_on_call = fail_on_call

    def fetch(self, entity: Entity, ids: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise FeatureSourceError("redis: ConnectionError: the job's host went away")
        return self.inner.fetch(entity, ids)

    def schema(self) -> object:
        return self.inner.schema()

    def describe(self) -> dict[str, str]:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


def test_a_rerun_after_a_crash_skips_finished_chunks_and_gives_identical_output(
    online: Online, requests_file: Path, tmp_path: Path
) -> None:
    features = RedisFeatures(online.redis_url)
    model = load_model(online.repository, "pcvr", 1, features)
    files = list_inputs(requests_file)
    reference = run_batch(
        model, features, files, tmp_path / "reference", chunk_rows=500, progress=False
    )
    assert (reference.chunks, reference.rows_scored) == (5, 2_500)

    output = tmp_path / "resumed"
    crashing = CrashingFeatures(features, fail_on_call=5)  # two reads per chunk: chunk 2 fails
    with pytest.raises(FeatureSourceError, match="went away"):
        run_batch(model, crashing, files, output, chunk_rows=500, progress=False)  # type: ignore[arg-type]
    manifest = read_manifest(output)
    assert manifest is not None
    assert sorted(manifest.chunks) == ["part-00000-000000", "part-00000-000001"]
    assert manifest.job["model_version"] == model.version and manifest.job["chunk_rows"] == 500
    first_part = (output / "part-00000-000000.parquet").stat().st_mtime_ns
    (output / ".part-00000-000002.tmp").write_bytes(b"half a part")  # what a kill leaves

    resumed = run_batch(model, features, files, output, chunk_rows=500, progress=False)
    assert (resumed.chunks_skipped, resumed.rows_scored, resumed.rows) == (2, 1_500, 2_500)
    assert (output / "part-00000-000000.parquet").stat().st_mtime_ns == first_part
    assert not list(output.glob(".part-*"))
    manifest = read_manifest(output)
    assert manifest is not None and len(manifest.chunks) == 5
    assert pq.read_table(output).equals(pq.read_table(tmp_path / "reference"))
    assert resumed.scores == reference.scores

    with pytest.raises(ManifestMismatch, match="another chunk_rows"):
        run_batch(model, features, files, output, chunk_rows=400, progress=False)
    again = run_batch(model, features, files, output, chunk_rows=400, restart=True, progress=False)
    assert (again.chunks, again.chunks_skipped) == (7, 0)
    features.close()


def test_missing_features_are_counted_flagged_and_scored_on_defaults(
    online: Online, requests_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert batch_score(online, "--input", str(requests_file), "--output", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "missing user      20 (0.80%) rows scored on defaults" in out
    assert "missing ad        20 (0.80%) rows scored on defaults" in out
    scored = pq.read_table(tmp_path)
    users = scored.column("user_id").to_pylist()
    flagged = scored.column("missing_user").to_pylist()
    assert [u for u, m in zip(users, flagged, strict=True) if m] == [
        f"nobody-{i}" for i in range(0, 1_000, 50)
    ]
    assert sum(scored.column("missing_ad").to_pylist()) == 20


def test_csv_with_a_snapshot_scores_like_parquet_with_redis(
    online: Online, requests_file: Path, tmp_path: Path
) -> None:
    csv_folder = tmp_path / "csv"
    csv_folder.mkdir()
    table = pq.read_table(requests_file)
    pacsv.write_csv(table.slice(0, 1_200), csv_folder / "a.csv")
    pacsv.write_csv(table.slice(1_200), csv_folder / "b.csv")
    snapshot = tmp_path / "features.parquet"
    assert main(["export-features", "--redis-url", online.redis_url, "--output", str(snapshot),
                 "--quiet"]) == 0  # fmt: skip
    assert batch_score(online, "--input", str(requests_file), "--output", str(tmp_path / "p")) == 0
    assert batch_score(online, "--input", str(csv_folder), "--output", str(tmp_path / "c"),
                       "--features", str(snapshot), "--chunk-rows", "1000") == 0  # fmt: skip
    from_parquet = pq.read_table(tmp_path / "p")
    from_csv = pq.read_table(tmp_path / "c")
    assert len(list((tmp_path / "c").glob("part-*.parquet"))) == 4  # 1000+200, 1000+300
    assert from_csv.column("impression_id").to_pylist() == list(range(2_500))
    # Chunks of other sizes make model calls of other sizes, whose last bits may differ on some
    # CPUs; the same features give the same scores well within 1e-6, other features do not.
    np.testing.assert_allclose(
        from_csv["score"].to_numpy(), from_parquet["score"].to_numpy(), rtol=0, atol=1e-6
    )
    assert from_csv["missing_ad"].equals(from_parquet["missing_ad"])


@pytest.mark.parametrize(
    ("make_input", "extra", "message"),
    [
        (lambda d: d / "absent.parquet", [], "absent.parquet: no such file or folder"),
        (lambda d: _write(d / "r.csv", "user_id,hour\nu1,3\n"), [], "missing column(s) ad_id"),
        (lambda d: _write(d / "r.parquet", "garbage"), [], "cannot read it as parquet"),
        (
            lambda d: _write(d / "r.csv", "user_id,ad_id\nu1,a1\n"),
            ["--model", "pcvr:9"],
            "model pcvr:9: model 'pcvr' has no version 9",
        ),
        (
            lambda d: _write(d / "r.csv", "user_id,ad_id\nu1,a1\n"),
            ["--features", "nope.parquet"],
            "nope.parquet: cannot read it as a feature snapshot",
        ),
        (
            lambda d: _parquet(
                d / "r.parquet", {"user_id": ["u1"], "ad_id": ["a1"], "hour": [1.5]}
            ),
            [],
            "column hour: expected text or integers",
        ),
    ],
)
def test_bad_input_is_refused_with_one_line_and_status_2(
    online: Online,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_input: object,
    extra: list[str],
    message: str,
) -> None:
    path = make_input(tmp_path)  # type: ignore[operator]
    code = batch_score(online, "--input", str(path), "--output", str(tmp_path / "out"), *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_an_unreachable_redis_is_one_line_and_status_2(
    requests_file: Path, online: Online, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["batch-score", "--input", str(requests_file), "--output", str(tmp_path),
                 "--model-repository", str(online.repository), "--redis-url",
                 "redis://127.0.0.1:1/0", "--quiet"])  # fmt: skip
    assert code == 2
    assert "error: cannot reach Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def reference_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The definition: P(score of a positive > score of a negative), ties counting one half."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def test_evaluate_reports_auc_log_loss_and_calibration_per_version(
    online: Online, requests_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(online.repository, repository)
    shifted = publish_variant(ModelRepository(repository), "pcvr", ("pcvr", 1), 0.7)
    requests = pq.read_table(requests_file)
    pq.write_table(requests.drop_columns(["label"]), tmp_path / "unlabelled.parquet")
    pq.write_table(requests.select(["impression_id", "label"]), tmp_path / "labels.parquet")
    for version in (1, shifted):
        assert main(["batch-score", "--input", str(tmp_path / "unlabelled.parquet"),
                     "--output", str(tmp_path / f"v{version}"), "--model", f"pcvr:{version}",
                     "--model-repository", str(repository), "--redis-url", online.redis_url,
                     "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["evaluate", "--scores", str(tmp_path / "v1"), str(tmp_path / f"v{shifted}"),
                 "--labels", str(tmp_path / "labels.parquet"), "--on", "impression_id",
                 "--json", str(tmp_path / "report.json"), "--plot", str(tmp_path / "rel.png"),
                 "--bins", "5"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    import json

    reports = json.loads((tmp_path / "report.json").read_text())
    assert [(r["model"], r["model_version"]) for r in reports] == [("pcvr", 1), ("pcvr", shifted)]
    labels = requests["label"].to_numpy().astype(np.float64)
    for report in reports:
        scores = pq.read_table(tmp_path / f"v{report['model_version']}").sort_by("impression_id")
        p = scores["score"].to_numpy()
        assert report["rows"] == 2_500 and report["conversions"] == int(labels.sum())
        assert report["auc"] == pytest.approx(reference_auc(labels, p), abs=1e-12)
        expected_loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        assert report["log_loss"] == pytest.approx(expected_loss, rel=1e-9)
        assert [b["rows"] for b in report["reliability"]] == [500] * 5
        assert f"| pcvr | {report['model_version']} | 2500 |" in out
    # The same ranking shifted up: equal AUC, worse log loss and calibration.
    assert reports[0]["auc"] == pytest.approx(reports[1]["auc"], abs=1e-12)
    assert reports[1]["log_loss"] > reports[0]["log_loss"]
    assert reports[1]["mean_score"] > reports[0]["mean_score"]
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_the_ray_data_stage_gives_the_same_scores_in_local_mode(
    online: Online, requests_file: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    from batch_scoring.distributed import ScorerConfig, read_requests, score_dataset

    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(requests_file).slice(0, 1_000), small)
    assert batch_score(online, "--input", str(small), "--output", str(tmp_path / "local")) == 0
    local = pq.read_table(tmp_path / "local")
    config = ScorerConfig(
        repository=str(online.repository), model="pcvr", redis_url=online.redis_url
    )
    # 4 logical CPUs on 2 cores: the 2 actors must leave room for the read tasks.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        requests = read_requests(str(small), config).repartition(4)  # work for both actors
        scored = score_dataset(requests, config, actors=2, batch_rows=300)
        scored.write_parquet(str(tmp_path / "ray"))
    finally:
        ray.shutdown()
    distributed = pq.read_table(tmp_path / "ray").sort_by("impression_id")
    assert distributed.num_rows == 1_000
    assert distributed["impression_id"].equals(local["impression_id"])
    np.testing.assert_allclose(distributed["score"].to_numpy(), local["score"].to_numpy(),
                               rtol=0, atol=1e-6)  # fmt: skip
    assert distributed["missing_user"].equals(local["missing_user"])
