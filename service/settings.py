"""Service settings, read once from the environment (prefix ADSCORE_) and passed down."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of a running adscore; each field is also the env variable ADSCORE_<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix="ADSCORE_", frozen=True, extra="forbid", protected_namespaces=()
    )

    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 in a container)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of adscore and uvicorn."""
    shutdown_delay_seconds: float = Field(0.0, ge=0, le=300)
    """On SIGTERM, fail /readyz but keep serving this long before draining and stopping, so a
    load balancer that follows readiness stops sending first (Kubernetes: use preStop)."""
    access_log: bool = False
    """One log line per request; off by default because it costs CPU on the hot path."""

    model_repository: Path = Path("model_repository")
    """Folder of models: <name>/<version>/{model.onnx,metadata.json} and <name>/policy.json."""
    model_name: str = "pcvr"
    """The default model: it scores requests of tenants without a model of their own (routing.json
    may name another default)."""
    repository_poll_seconds: float = Field(2.0, gt=0)
    """How often policy.json, routing.json and the API key file are checked for changes."""
    model_memory_budget_bytes: int = Field(2 << 30, ge=0)
    """Bytes of model files loaded at once; idle tenant models are unloaded (LRU) to stay under.
    The default model always stays loaded."""
    loader_nice: int = Field(10, ge=0, le=19)
    """CPU nice value of the model loader thread, so loading yields to scoring."""
    shadow_max_pending: int = Field(32, ge=1)
    """Shadow scorings queued at most; past it shadow work is dropped (and counted)."""
    drift_sample_rate: float = Field(0.05, ge=0.0, le=1.0)
    """Share of scoring requests whose rows feed drift monitoring (0 turns it off)."""
    drift_max_pending: int = Field(256, ge=1)
    """Sampled requests waiting to be binned; past it samples are dropped (and counted)."""
    drift_window_seconds: float = Field(3600.0, gt=0)
    """Span of the rolling window drift is computed over."""
    drift_window_buckets: int = Field(12, ge=1, le=1440)
    """Buckets of the rolling window: it moves on by window_seconds / buckets at a time."""
    drift_min_rows: int = Field(1000, ge=1)
    """Rows a window needs before PSI is reported (fewer give noise, not signal)."""
    prediction_log: Literal["off", "jsonl", "redis"] = "off"
    """Log a sample of scored requests (ids, the model's exact input rows, scores) for training
    and decay evaluation: to rotating JSON Lines files in prediction_log_dir, or to the Redis
    stream {feature_namespace}:predictions."""
    prediction_log_sample_rate: float = Field(0.01, ge=0.0, le=1.0)
    """Share of scoring requests logged when the prediction log is on."""
    prediction_log_max_pending: int = Field(1024, ge=1)
    """Sampled requests waiting to be written; past it they are dropped (and counted)."""
    prediction_log_dir: Path = Path("prediction_log")
    """Folder of the JSON Lines files (one writer per process; names carry host and pid)."""
    prediction_log_max_file_bytes: int = Field(64 << 20, ge=1024)
    """A log file is closed (renamed from .jsonl.open to .jsonl) once this large..."""
    prediction_log_rotate_seconds: float = Field(3600.0, gt=0)
    """...or once this old, so that closed files reach readers at least this often."""
    prediction_log_max_files: int = Field(0, ge=0)
    """Closed files this process keeps; older ones are deleted (and their rows counted as
    expired). 0 keeps every file: ship them elsewhere, or mount a volume large enough."""
    prediction_log_redis_url: str | None = None
    """Redis of the prediction stream (default: redis_url, the feature store's)."""
    prediction_log_stream_max_length: int = Field(1_000_000, ge=1)
    """Entries the prediction stream keeps, about (approximate MAXLEN trimming)."""
    execution_provider: Literal["cpu", "cuda"] = "cpu"
    """onnxruntime execution provider; cuda falls back to cpu with a warning when unavailable."""
    cuda_tf32: bool = False
    """Let CUDA use TF32 matrix products: faster on Ampere and later, but scores then differ
    from CPU replicas of the same version by up to ~1e-4 (see BENCHMARKS.md)."""
    inference_threads: int = Field(2, ge=1, le=64)
    """onnxruntime calls that may run at once (one per core is the sweet spot on CPU)."""
    workers: int = Field(1, ge=1, le=64)
    """Serving processes sharing the port (SO_REUSEPORT), each with its own models and
    inference_threads. One process's Python work runs one thread at a time, so on a replica with
    2 or more cores, 2 workers serve more; metrics are summed over workers (see README)."""
    intra_op_threads: int = Field(1, ge=1, le=64)
    """Threads inside one onnxruntime call; inference_threads x intra_op_threads <= cores."""
    max_batch_rows: int = Field(256, ge=1, le=65536)
    """Rows of one model call when concurrent requests are merged (micro-batching); a larger
    request runs alone. 1 turns batching off."""
    max_batch_delay_us: int = Field(0, ge=0, le=100_000)
    """How long a batch smaller than max_batch_rows may wait for more requests. 0: it leaves as
    soon as an inference thread is free (no added latency; batches still form under load)."""
    switch_interval_us: int = Field(200, ge=10, le=100_000)
    """The interpreter's switch interval (sys.setswitchinterval): how long an inference thread
    waits for the event loop to let go of the interpreter lock before asking for it. Python's
    default, 5000, added to the latency tail at 70 % load (see BENCHMARKS.md)."""
    max_queued_rows: int = Field(8192, ge=1)
    """Candidate rows that may wait for an inference thread; a request that would exceed it is
    answered 503 with Retry-After at once."""
    request_timeout_ms: float = Field(100.0, gt=0, le=60_000)
    """Budget of a scoring request without timeout_ms. The feature fetch gets 80 % of what is
    left of it at most (and feature_timeout_ms at most, three times that while the event loop is
    too busy to read the reply); a request still waiting for the model past it is answered 503
    deadline_exceeded at once instead of late."""
    warmup_batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    """Batch sizes run once at load: the first requests must not pay onnxruntime's first run."""

    feature_backend: Literal["redis", "memory"] = "redis"
    """Where online features live; memory is an in-process store for demos and tests."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the online features."""
    feature_namespace: str = "adscore"
    """Key prefix of the online features ({namespace}:u:{user_id}, {namespace}:a:{ad_id})."""
    feature_timeout_ms: float = Field(20.0, gt=0)
    """Budget of one feature fetch; past it the request is scored on defaults (degraded). While
    the event loop runs late the fetch may wait up to three budgets: the reply may be here,
    unread (see service/loop_lag.py)."""
    feature_reads_in_flight: int = Field(2, ge=1, le=64)
    """MGETs to Redis at once; concurrent requests' keys are merged into them (more for a remote
    or clustered Redis, where round trips dominate)."""
    ad_feature_cache_seconds: float = Field(0.0, ge=0)
    """Keep ads' feature vectors in the process for at most this long after reading them, so
    that hot ads are not read from Redis by every request (0: off). Ad features then reach
    scoring up to this late; users and absent ads are always read from the store."""
    ad_feature_cache_entries: int = Field(200_000, ge=2)
    """Most ad vectors the cache holds (about 100 bytes each for the demo spec)."""
    on_feature_store_error: Literal["degrade", "fail"] = "degrade"
    """When the store fails: score on defaults with degraded=true, or answer 503."""
    breaker_failure_threshold: int = Field(5, ge=1)
    """Feature-store failures in a row that open the circuit (no fetch is tried while open)."""
    breaker_open_seconds: float = Field(1.0, gt=0)
    """How long the circuit stays open before one request probes the store again."""

    auth_enabled: bool = True
    """Require API keys (see api_keys_file). Turn off only for a local demo."""
    api_keys_file: Path | None = None
    """JSON file of hashed API keys with roles and tenants (`adscore keys create` writes it); a
    Kubernetes secret can be mounted there. Re-read when it changes."""

    max_candidates: int = Field(1024, ge=1)
    """More candidates in one request are refused with 413."""
    max_explain_candidates: int = Field(64, ge=1)
    """Candidates of a request with "explain": true, at most (413 beyond): explaining costs one
    model row per feature per candidate."""
    explain_top_k: int = Field(5, ge=1, le=64)
    """Features listed per candidate when a request asks for explanations without explain_top_k."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Larger request bodies are refused with 413."""
    max_id_length: int = Field(128, ge=1)
    """Longest accepted user_id, ad_id, request_id or tenant."""
    max_in_flight: int = Field(16, ge=1)
    """Scoring requests a replica holds at once; beyond, it answers 503 with Retry-After at once
    instead of queueing (a late score is worth nothing to an auction)."""
    overload_in_flight_fraction: float = Field(0.5, gt=0, le=1)
    """Under sustained overload (more than a tenth of arrivals refused in two intervals of at least
    100 ms in a row) the bound is this fraction of max_in_flight, rounded down, at least 1, so
    refusals and the accepted requests' tail stay short while bursts still get every slot; 1
    keeps the bound fixed (service/admission.py says when it returns)."""

    overload_inference_threads: int = Field(64, ge=1, le=64)
    """Inference threads that take batches while the bound is lowered under sustained overload
    (at most inference_threads; the default, 64, keeps them all). Fewer leave the event loop,
    which reads and refuses the excess, more of the cores, but where the threads are what
    limits throughput they cut it: one thread of two served 0.91x the requests at 150 % load
    on 2 vCPUs, and at 70 % load, where one thread could not keep up with the arrivals, the
    bound stayed lowered."""

    @property
    def overload_in_flight(self) -> int:
        """The bound on requests in flight under sustained overload (equal to max_in_flight when
        that is 1: the bound is then fixed)."""
        # Rounded down (1e-9 absorbs float error: 100 x 0.29 is 28.999...), at least 1.
        return max(1, math.floor(self.max_in_flight * self.overload_in_flight_fraction + 1e-9))
