"""Prometheus metrics of one service instance, on a registry of its own (no globals).

Label values are bounded: routes come from the route table, stages and entities are fixed
lists, and model labels name versions, never users, ads or tenants.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; dense between 1 and 50 ms, where a scoring request lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05,
    0.1, 0.5,
)  # fmt: skip
CANDIDATE_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
STAGES = ("feature_fetch", "input_assembly", "inference", "response")


class Metrics:
    """All metrics adscore exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "adscore_request_duration_seconds",
            "Time from request received to response sent, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "adscore_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "adscore_stage_duration_seconds",
            "Time spent in each stage of a scoring request.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.candidates = Histogram(
            "adscore_candidates_per_request",
            "Ad candidates in one scoring request.",
            buckets=CANDIDATE_BUCKETS,
            registry=registry,
        )
        self.missing_entities = Counter(
            "adscore_missing_features",
            "Entities scored on default features because the store had none, by entity kind.",
            ["entity"],
            registry=registry,
        )
        self.rejected_feature_values = Counter(
            "adscore_rejected_feature_values",
            "Stored feature vectors refused (wrong length or schema version), by entity kind.",
            ["entity"],
            registry=registry,
        )
        self.degraded_responses = Counter(
            "adscore_degraded_responses",
            "Responses scored on default features because the feature store failed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.model_info = Gauge(
            "adscore_model_info",
            "1 for each model version this instance serves.",
            ["model", "version", "provider"],
            registry=registry,
        )
        self.model_load_seconds = Gauge(
            "adscore_model_load_seconds",
            "Time to verify, open and warm up the serving version.",
            ["model"],
            registry=registry,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for entity in ("user", "ad"):
            self.missing_entities.labels(entity)
            self.rejected_feature_values.labels(entity)
