"""Deployment artefacts, checked offline: manifests, rules, dashboard, Dockerfiles, image steps."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from feature_client.redis_server import free_port
from service.app import create_app
from service.settings import Settings
from tests.fixtures import LiveServer

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ["overlays/cpu", "overlays/gpu", "overlays/dev", "monitoring"]
BIN = Path(sys.executable).parent
# Series that other exporters provide (kube-state-metrics), not adscore.
EXTERNAL_METRICS = {"kube_deployment_status_replicas_available"}


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run requires it)")
    return path


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = _need("kubectl")
    output = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def rule_groups() -> list[dict[str, Any]]:
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_pass_strict_schema_validation(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    assert objects
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(rendered)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout
    # Every object but the prometheus-operator CRDs was checked against a schema.
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout))
    assert unchecked <= {"ServiceMonitor", "PrometheusRule"}


def test_the_deployment_is_hardened_probed_and_drained() -> None:
    objects = render("overlays/cpu")
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 30  # uvicorn drains up to 30 s
    threads = next(e for e in container["env"] if e["name"] == "ADSCORE_INFERENCE_THREADS")
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"]
    keys = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert keys["secret"]["secretName"] == "adscore-api-keys"
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    assert not [o for o in objects if o["kind"] == "Secret"]  # no secrets in the repository
    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_provider() -> None:
    objects = render("overlays/gpu")
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    settings = _one(objects, "ConfigMap", "adscore-settings")["data"]
    assert settings["ADSCORE_EXECUTION_PROVIDER"] == "cuda"
    assert settings["ADSCORE_WORKERS"] == "1"  # one process feeds the GPU's batches
    assert (
        int(settings["ADSCORE_MODEL_MEMORY_BUDGET_BYTES"])
        == Settings.model_fields["model_memory_budget_bytes"].default
    )


def test_cpu_pods_run_two_workers_whose_models_fit_the_memory_limit() -> None:
    objects = render("overlays/cpu")
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    data = _one(objects, "ConfigMap", "adscore-settings")["data"]
    settings = Settings(**{k.removeprefix("ADSCORE_").lower(): v for k, v in data.items()})
    assert settings.workers == int(container["resources"]["limits"]["cpu"]) == 2
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    process_overhead = 256 << 20  # interpreter, onnxruntime, arenas: ~150 MiB measured
    supervisor = 64 << 20  # ~44 MiB measured
    needed = settings.workers * (settings.model_memory_budget_bytes + process_overhead)
    assert needed + supervisor < int(limit.removesuffix("Gi")) << 30


def test_dev_overlay_brings_its_own_redis() -> None:
    objects = render("overlays/dev")
    assert _one(objects, "StatefulSet", "adscore-redis")
    settings = _one(objects, "ConfigMap", "adscore-settings")["data"]
    assert settings["ADSCORE_REDIS_URL"] == "redis://adscore-redis:6379/0"


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    (tmp_path / "adscore-rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(ROOT / "deploy" / "prometheus" / "adscore-rules.test.yaml", tmp_path)
    return tmp_path


def test_prometheus_rules_pass_promtool_check_and_unit_tests(rules_dir: Path) -> None:
    promtool = _need("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "adscore-rules.yaml"],
        cwd=rules_dir,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        [promtool, "test", "rules", "adscore-rules.test.yaml"],
        cwd=rules_dir,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    tested = set(
        re.findall(r"alertname: (\w+)", (rules_dir / "adscore-rules.test.yaml").read_text())
    )
    assert alerts <= tested, f"alerts without a unit test: {alerts - tested}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "style", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names used by each consumer: rules, dashboard, HPA, adapter."""
    pattern = re.compile(r"\b(adscore_[a-z_]+|kube_[a-z_]+)\b")
    rules = " ".join(r["expr"] for g in rule_groups() for r in g["rules"])
    dashboard = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    panels = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    adapter = (K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text()
    return {
        "rules": set(pattern.findall(rules)),
        "dashboard": set(pattern.findall(panels)),
        "hpa": {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"},
        "adapter": set(pattern.findall(adapter)),
    }


def _family(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


@pytest.fixture(scope="module")
def scraped_service(redis_server: Any) -> Iterator[str]:
    settings = Settings(
        model_repository=ROOT / "demo" / "model_repository",
        redis_url=redis_server.url,
        auth_enabled=False,
        ad_feature_cache_seconds=10,  # its metrics exist only while it is on
    )
    server = LiveServer(create_app(settings))
    server.start()
    try:
        body = {"user_id": "u1", "candidates": [{"ad_id": "a1"}, {"ad_id": "a2"}]}
        for _ in range(5):
            assert httpx.post(f"{server.url}/v1/score", json=body).status_code == 200
        yield server.url
    finally:
        server.stop()


def test_every_metric_the_deployment_reads_is_exported(scraped_service: str) -> None:
    exported = httpx.get(f"{scraped_service}/metrics").text
    families = set(re.findall(r"^# TYPE (\w+) ", exported, re.MULTILINE))
    samples = set(re.findall(r"^(\w+)[{ ]", exported, re.MULTILINE))
    for consumer, names in referenced_metrics().items():
        assert names, consumer
        for name in names - EXTERNAL_METRICS:
            known = name in samples or name in families or _family(name) in families
            assert known, f"{consumer} reads {name}, which adscore does not export"


def test_prometheus_scrapes_adscore_and_records_p99(scraped_service: str, tmp_path: Path) -> None:
    prometheus = _need("prometheus")
    groups = rule_groups()
    for group in groups:
        group["interval"] = "1s"  # the test cannot wait for 30 s evaluations
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    target = scraped_service.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [{"job_name": "adscore", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    body = {"user_id": "u2", "candidates": [{"ad_id": f"a{i}"} for i in range(16)]}
    value = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            httpx.post(f"{scraped_service}/v1/score", json=body)
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/query",
                    params={"query": "adscore:score_latency_seconds:p99_5m"},
                )
            except httpx.TransportError:
                response = None  # Prometheus is not listening yet
            # Before its storage is ready Prometheus answers 503 in plain text.
            answer = response.json() if response is not None and response.status_code == 200 else {}
            result = answer.get("data", {}).get("result", [])
            if result and result[0]["value"][1] not in ("NaN", "+Inf"):
                value = float(result[0]["value"][1])
                break
            time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert value is not None, "the p99 recording rule never returned a number"
    assert 0 < value < 2.5


def test_the_image_build_and_run_steps_work_without_docker() -> None:
    _need("redis-server")
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "docker" / "smoke.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke: ok (graceful exit on SIGTERM)" in result.stdout
    assert "/site-packages/service/" in result.stdout  # served from the wheel, not the tree
