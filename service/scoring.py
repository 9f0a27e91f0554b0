"""The hot path: one scoring request from ids to calibrated probabilities.

fetch the user's and the candidates' feature vectors (one store round trip)
-> on an inference thread, merged with concurrent requests (the micro-batcher): decode them
   and lay out the model inputs of the whole batch (numpy, no per-feature loop), run the model,
   calibrate -> one probability per candidate

A request's deadline (its timeout_ms, or request_timeout_ms) is spent across the stages: the
fetch gets most of what is left of it, and a request still waiting for the model when it passes is
refused at once rather than scored late.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from feature_client.assembly import ContextBlocks, ContextError, ModelInputs
from feature_client.batch_layout import PendingLayout, lay_out, lay_out_one
from feature_client.store import FeatureStore, FeatureStoreUnavailable, RawFeatures
from service.batcher import BatchingPolicy, MicroBatcher
from service.circuit_breaker import CircuitBreaker, CircuitState
from service.drift import DriftMonitor
from service.errors import FeaturesUnavailable, InvalidRequest
from service.explain import CandidateExplanation, contributions, occlude, top_contributions
from service.loop_lag import LoopLag, PatientTimeout
from service.metrics import Metrics
from service.prediction_log import build_prediction_log
from service.registry import LoadedModel
from service.routing import Router
from service.settings import Settings
from service.shadow import ShadowScorer

logger = logging.getLogger("adscore.scoring")

# The feature fetch may spend this share of a request's remaining budget at most, so that a
# request whose fetch timed out still has time to be scored on defaults.
FETCH_SHARE = 0.8

# While the event loop is busy, a fetch may wait this many budgets (feature_timeout_ms) in all
# for a reply that may already be here (see PatientTimeout), within FETCH_SHARE of its deadline.
PATIENCE_BUDGETS = 3


# The value objects built on every request have slots and are not frozen: a frozen dataclass
# sets each field through object.__setattr__ (five fields: 1.1 µs against 0.33 µs).
@dataclass(slots=True)
class ScoreRequest:
    """A validated scoring request."""

    user_id: str
    ad_ids: list[str]
    context: Mapping[str, str | int | float]
    request_id: str | None = None
    tenant: str | None = None
    timeout_ms: float | None = None
    explain: bool = False
    explain_top_k: int | None = None


@dataclass(slots=True)
class ScoreResult:
    """Calibrated probabilities, in candidate order, and how they were obtained."""

    request_id: str | None
    model: str
    model_version: int
    role: str
    scores: npt.NDArray[np.float64]
    missing_user: bool
    missing_ads: list[str]
    degraded: bool
    explanations: list[CandidateExplanation] | None = None

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "request_id": self.request_id,
            "model": self.model,
            "model_version": self.model_version,
            "scores": self.scores,
            "missing": {"user": self.missing_user, "ads": self.missing_ads},
            "degraded": self.degraded,
        }
        if self.explanations is not None:
            body["explanations"] = self.explanations
        return body


class ScoringPipeline:
    """Scores requests with the version the router picks and the feature store."""

    def __init__(
        self,
        router: Router,
        store: FeatureStore,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self._router = router
        self._store = store
        self._metrics = metrics
        self._settings = settings
        self.batcher = MicroBatcher(
            settings.inference_threads,
            BatchingPolicy(
                settings.max_batch_rows, settings.max_batch_delay_us, settings.max_queued_rows
            ),
            metrics.batching(),
        )
        self.shadow = ShadowScorer(metrics, settings.shadow_max_pending)
        self.drift = DriftMonitor(
            sample_rate=settings.drift_sample_rate,
            max_pending=settings.drift_max_pending,
            window_seconds=settings.drift_window_seconds,
            window_buckets=settings.drift_window_buckets,
            min_rows=settings.drift_min_rows,
            dropped=metrics.drift_dropped,
        )
        self.prediction_log = build_prediction_log(settings, metrics.prediction_log_rows)
        self._breaker = CircuitBreaker(
            settings.breaker_failure_threshold,
            settings.breaker_open_seconds,
            metrics.feature_store_circuit,
        )
        self.loop_lag = LoopLag(metrics.event_loop_lag)  # ticking once the app runs it
        self._store_answered_at = -math.inf  # loop time of the store's last reply
        stage = metrics.stage_seconds
        self._fetch_seconds = stage.labels("feature_fetch")
        self._assembly_seconds = stage.labels("input_assembly")
        self._inference_seconds = stage.labels("inference")

    def close(self) -> None:
        self.batcher.close()
        self.drift.close()
        if self.prediction_log is not None:
            self.prediction_log.close()

    def deadline(self, timeout_ms: float | None) -> float:
        """When a request arriving now must be answered, in the event loop's clock."""
        budget_ms = self._settings.request_timeout_ms if timeout_ms is None else timeout_ms
        return asyncio.get_running_loop().time() + budget_ms / 1000

    async def _fetch(
        self, request: ScoreRequest, deadline: float
    ) -> tuple[RawFeatures, str | None]:
        """The stored vectors, or empty ones and the reason when the store failed."""
        loop = asyncio.get_running_loop()
        timeout_s = self._settings.feature_timeout_ms / 1000
        longest = min(FETCH_SHARE * (deadline - loop.time()), PATIENCE_BUDGETS * timeout_s)
        if not self._breaker.allow():
            return self._without_features(request, "circuit_open", "the circuit is open")
        probe = self._breaker.state is CircuitState.HALF_OPEN
        timeout = PatientTimeout(
            self.loop_lag,
            min(timeout_s, longest),
            longest,
            lambda: self._store_answered_at,
            alone=probe,  # a half-open circuit lets no other fetch run beside the probe
        )
        try:
            async with timeout:
                raw = await self._store.fetch(request.user_id, request.ad_ids)
        except TimeoutError:
            if timeout.expired and timeout.loop_was_busy:
                # Busy to the end, while the store answered others: not the store's fault.
                self._breaker.record_inconclusive(probe)
                detail = "the event loop was too busy to read the reply in time"
                return self._without_features(request, "event_loop_busy", detail)
            self._breaker.record_failure()
            return self._without_features(request, "timeout", "timeout")
        except FeatureStoreUnavailable as exc:
            self._breaker.record_failure()
            return self._without_features(request, "unavailable", str(exc) or "unavailable")
        except asyncio.CancelledError:  # the caller went away: a probe must not stay pending
            self._breaker.record_inconclusive(probe)
            raise
        self._store_answered_at = loop.time()
        self._breaker.record_success()
        return raw, None

    def _without_features(
        self, request: ScoreRequest, reason: str, detail: str
    ) -> tuple[RawFeatures, str]:
        """Empty vectors and the reason (degrade policy), or FeaturesUnavailable (fail)."""
        if self._settings.on_feature_store_error == "fail":
            raise FeaturesUnavailable(f"feature store {reason.replace('_', ' ')}: {detail}")
        logger.debug("scoring on defaults, feature store %s: %s", reason, detail)
        return RawFeatures(None, [None] * len(request.ad_ids)), reason

    async def infer(
        self, model: LoadedModel, inputs: ModelInputs
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
        """Raw tensors in, logits and calibrated probabilities out (the OIP v2 path): the same
        batcher, inference threads and metrics as a scoring request."""
        started = time.perf_counter()
        logits, probabilities = await self.batcher.predict_calibrated(
            model.runtime, model.calibration.apply, inputs, self.deadline(None)
        )
        elapsed = time.perf_counter() - started
        self._inference_seconds.observe(elapsed)
        self._metrics.model_seconds_of(model.name).observe(elapsed)
        self._metrics.candidates.observe(len(probabilities))
        self._metrics.record_scores(model.name, model.version, "active", probabilities)
        return logits, probabilities

    @staticmethod
    def _context(model: LoadedModel, context: Mapping[str, str | int | float]) -> ContextBlocks:
        try:
            return model.context.blocks(context)
        except ContextError as exc:
            raise InvalidRequest(f"context.{exc}") from exc

    @staticmethod
    def _pending(model: LoadedModel, raw: RawFeatures, context: ContextBlocks) -> PendingLayout:
        return PendingLayout(model.user_codec, model.ad_codec, raw.user, raw.ads, context)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        # One route per request: the versions it names stay alive until it answers.
        route = self._router.route(request.tenant, request.user_id)
        model = route.model
        deadline = self.deadline(request.timeout_ms)
        started = time.perf_counter()
        # Before the fetch: a bad context is refused without spending a round trip on it.
        context = self._context(model, request.context)
        context_done = time.perf_counter()

        raw, degraded_reason = await self._fetch(request, deadline)
        fetched = time.perf_counter()
        self._fetch_seconds.observe(fetched - context_done)
        pending = self._pending(model, raw, context)

        explanations = None
        if request.explain:
            # Laid out here: the request's rows and their occluded copies share one model call.
            _, (laid,) = lay_out([pending])
            inputs = laid.inputs
            occlusion = occlude(model.spec, inputs)
            _, calibrated = await self.batcher.predict_calibrated(
                model.runtime, model.calibration.apply, occlusion.inputs, deadline
            )
            scores, table = contributions(calibrated, len(inputs))
            top_k = request.explain_top_k or self._settings.explain_top_k
            explanations = top_contributions(occlusion.features, request.ad_ids, table, top_k)
        elif 2 * len(request.ad_ids) > self._settings.max_batch_rows:
            # Alone in its batch, or nearly: laid out here, while the inference threads run
            # other batches. On a thread it would delay its own call, and that thread would wait
            # for the interpreter lock held by this loop (measured at 256 candidates: 0.94x).
            _, (laid,) = lay_out([pending])
            inputs = laid.inputs
            _, scores = await self.batcher.predict_calibrated(
                model.runtime, model.calibration.apply, inputs, deadline
            )
        else:
            # Laid out on the inference thread, together with the rest of its batch.
            scores, laid = await self.batcher.score_layout(
                model.runtime, model.calibration.apply, pending, deadline
            )
            inputs = laid.inputs
        scored = time.perf_counter()
        self._assembly_seconds.observe(context_done - started + laid.seconds)
        self._inference_seconds.observe(scored - fetched - laid.seconds)

        n = len(request.ad_ids)
        self._metrics.candidates.observe(n)
        self._metrics.model_seconds_of(model.name).observe(time.perf_counter() - started)
        self._metrics.record_scores(model.name, model.version, route.role, scores)
        if route.shadow is not None:
            shadow = route.shadow
            if shadow.spec == model.spec:
                shadow_inputs = inputs
            else:
                shadow_context = self._context(shadow, request.context)
                shadow_inputs = lay_out_one(self._pending(shadow, raw, shadow_context))[2]
            self.shadow.submit(shadow, shadow_inputs, scores)
        # A sample of requests, binned on the drift worker thread (O(1) here).
        self.drift.submit(model, inputs, scores, laid.user_found, laid.ads_found)
        if self.prediction_log is not None:
            self.prediction_log.submit(
                model, route.role, request.request_id, request.tenant, request.user_id,
                request.ad_ids, request.context, inputs, scores, degraded_reason is not None,
            )  # fmt: skip

        def result(missing_user: bool, missing_ads: list[str], degraded: bool) -> ScoreResult:
            return ScoreResult(
                request.request_id,
                model.name,
                model.version,
                route.role,
                scores,
                missing_user,
                missing_ads,
                degraded,
                explanations,
            )

        if degraded_reason is not None:
            self._metrics.degraded_responses.labels(degraded_reason).inc()
            return result(False, [], True)
        missing_ads = (
            [request.ad_ids[i] for i in np.flatnonzero(~laid.ads_found)] if laid.missing_ads else []
        )
        missing_user = not laid.user_found
        if missing_user:
            self._metrics.missing_entities.labels("user").inc()
        if missing_ads:
            self._metrics.missing_entities.labels("ad").inc(len(missing_ads))
        if laid.rejected_user:
            self._metrics.rejected_feature_values.labels("user").inc(laid.rejected_user)
        if laid.rejected_ads:
            self._metrics.rejected_feature_values.labels("ad").inc(laid.rejected_ads)
        return result(missing_user, missing_ads, False)
