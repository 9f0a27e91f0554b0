"""AdmissionControl: the bound on requests in flight."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from service.admission import AdmissionControl
from service.errors import Overloaded
from service.metrics import Metrics


def _control(limit: int) -> tuple[AdmissionControl, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return AdmissionControl(limit, metrics.in_flight, metrics.shed), metrics


def _value(metrics: Metrics, name: str) -> float | None:
    labels = {"reason": "max_in_flight"} if name.startswith("adscore_shed") else {}
    return metrics.registry.get_sample_value(name, labels)


def test_requests_beyond_the_limit_are_shed_with_retry_after() -> None:
    control, metrics = _control(limit=2)
    with control.admit(), control.admit():
        assert _value(metrics, "adscore_in_flight_requests") == 2
        with (
            pytest.raises(Overloaded, match="2 scoring requests in flight, the limit is 2") as shed,
            control.admit(),
        ):
            pass  # pragma: no cover - never admitted
        assert shed.value.status_code == 503 and shed.value.headers["Retry-After"] == "1"
    assert control.in_flight == 0
    assert _value(metrics, "adscore_in_flight_requests") == 0
    assert _value(metrics, "adscore_shed_requests_total") == 1
    with control.admit():  # room again once the others finished
        assert control.in_flight == 1


def test_a_failing_request_still_leaves_the_count() -> None:
    control, metrics = _control(limit=1)
    with pytest.raises(ValueError), control.admit():
        raise ValueError("the request failed")
    assert control.in_flight == 0 and _value(metrics, "adscore_in_flight_requests") == 0
