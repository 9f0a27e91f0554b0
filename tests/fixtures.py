"""Test doubles and builders shared by the test packages (not fixtures themselves)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import uvicorn
from fastapi import FastAPI

from feature_client.assembly import ModelInputs
from feature_client.redis_server import free_port
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from service.calibration import PlattCalibration
from service.http_protocol import OneWriteHttpProtocol
from service.model_metadata import GoldenRows, ModelMetadata, TensorInfo
from service.repository import ModelRepository


def tiny_spec(schema_version: int = 1) -> FeatureSpec:
    """Two features per source: enough to see every block of the layout."""
    return FeatureSpec(
        schema_version=schema_version,
        features=(
            CategoricalFeature("user_id", "user", hash_buckets=64),
            DenseFeature("user_activity", "user", default=0.5),
            CategoricalFeature("ad_id", "ad", hash_buckets=128),
            DenseFeature("ad_price", "ad", default=2.0),
            CategoricalFeature("device", "context", vocabulary=("ios", "android")),
            CategoricalFeature("hour", "context", vocabulary=tuple(str(h) for h in range(24))),
        ),
    )


def metadata_for(spec: FeatureSpec, name: str = "pcvr", version: int = 1) -> ModelMetadata:
    dense_width, ids_width = len(spec.dense_names), len(spec.categorical_names)
    return ModelMetadata(
        name=name,
        version=version,
        created_at=datetime.now(UTC),
        sha256="0" * 64,
        architecture="linear-test-double",
        inputs=[
            TensorInfo(name="dense", dtype="float32", shape=["batch", dense_width]),
            TensorInfo(name="ids", dtype="int64", shape=["batch", ids_width]),
        ],
        outputs=[TensorInfo(name="logit", dtype="float32", shape=["batch"])],
        feature_spec=spec.to_dict(),
        calibration=PlattCalibration(),
        metrics={},
        parity={},
        golden=GoldenRows(dense=[[0.0] * dense_width], ids=[[0] * ids_width], probabilities=[0.5]),
    )


class LinearRuntime:
    """A model double: logit = 0.1 * sum(dense) + 0.01 * sum(ids), so inputs show in outputs."""

    provider = "test-double"

    def __init__(self) -> None:
        self.calls: list[ModelInputs] = []

    def predict(self, inputs: ModelInputs) -> npt.NDArray[np.float32]:
        self.calls.append(inputs)
        logits = 0.1 * inputs.dense.sum(axis=1) + 0.01 * inputs.ids.sum(axis=1)
        result: npt.NDArray[np.float32] = logits.astype(np.float32)
        return result


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        # The production protocol (service/server.py), so HTTP tests see the bytes clients see.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", http=OneWriteHttpProtocol
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_seconds: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_seconds
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def publish_variant(
    repository: ModelRepository,
    name: str,
    source: tuple[str, int],
    intercept_shift: float,
    *,
    activate: bool = False,
) -> int:
    """Publish the ONNX file of `source` (name, version) as a new version of `name` whose
    calibration adds `intercept_shift` to the log-odds: the same inputs, other scores.
    Returns the new version."""
    base = repository.read_metadata(*source)
    calibration = base.calibration.model_copy(
        update={"intercept": base.calibration.intercept + intercept_shift}
    )
    probabilities = np.asarray(base.golden.probabilities, dtype=np.float64)
    shifted = 1 / (1 + np.exp(-(np.log(probabilities / (1 - probabilities)) + intercept_shift)))
    metadata = base.model_copy(
        update={
            "calibration": calibration,
            "golden": base.golden.model_copy(update={"probabilities": shifted.tolist()}),
        }
    )
    written = repository.publish(name, repository.model_path(*source), metadata, activate=activate)
    return written.version


class ServerProcess:
    """`adscore serve` in a child process, configured by ADSCORE_* variables, logging to a file."""

    def __init__(self, log_path: Path, **settings: object) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = os.environ | {f"ADSCORE_{k.upper()}": str(v) for k, v in settings.items()}
        self.env |= {"ADSCORE_PORT": str(self.port), "ADSCORE_LOG_LEVEL": "info"}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def start(self, timeout_seconds: float = 60.0) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve"],
                cwd=Path(__file__).resolve().parent.parent,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited during start-up:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not become ready:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def hold_the_loop(seconds: float) -> None:
    """CPU work that keeps the calling thread (an event loop's, say) busy for `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
