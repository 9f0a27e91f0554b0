"""Test doubles and builders shared by the test packages (not fixtures themselves)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import uvicorn
from fastapi import FastAPI

from feature_client.assembly import ModelInputs
from feature_client.redis_server import free_port
from feature_client.spec import CategoricalFeature, DenseFeature, FeatureSpec
from service.calibration import PlattCalibration
from service.model_metadata import GoldenRows, ModelMetadata, TensorInfo


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
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
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
