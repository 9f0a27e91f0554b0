"""AdmissionControl: the bound on requests in flight."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from prometheus_client import CollectorRegistry

from service.admission import AdmissionControl
from service.errors import Overloaded
from service.metrics import Metrics


def _control(limit: int) -> tuple[AdmissionControl, Metrics]:
    metrics = Metrics(CollectorRegistry())
    control = AdmissionControl(limit, metrics.in_flight, metrics.shed, metrics.admission_limit)
    return control, metrics


def _value(metrics: Metrics, name: str, reason: str = "max_in_flight") -> float | None:
    labels = {"reason": reason} if name.startswith("adscore_shed") else {}
    return metrics.registry.get_sample_value(name, labels)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _adaptive(limit: int, overload_limit: int) -> tuple[AdmissionControl, Metrics, FakeClock]:
    metrics = Metrics(CollectorRegistry())
    clock = FakeClock()
    control = AdmissionControl(
        limit,
        metrics.in_flight,
        metrics.shed,
        metrics.admission_limit,
        overload_limit=overload_limit,
        interval_s=1.0,
        clock=clock,
    )
    return control, metrics, clock


def _hold(stack: ExitStack, control: AdmissionControl, count: int) -> None:
    for _ in range(count):
        stack.enter_context(control.admit())


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


def _arrive(control: AdmissionControl, admitted: int, refused: int) -> None:
    """`admitted` requests that finish at once, then enough held to reach the bound (admitted
    too), and `refused` more that find it reached."""
    for _ in range(admitted):
        with control.admit():
            pass
    with ExitStack() as held:
        _hold(held, control, control.current_limit - control.in_flight)
        for _ in range(refused):
            with pytest.raises(Overloaded), control.admit():
                pass  # pragma: no cover - never admitted


def test_a_fixed_bound_never_changes_however_many_are_refused() -> None:
    control, metrics = _control(limit=4)
    for _ in range(5):
        _arrive(control, admitted=0, refused=50)
    assert not control.adaptive and control.current_limit == 4
    assert _value(metrics, "adscore_admission_limit") == 4
    assert _value(metrics, "adscore_shed_requests_total") == 250


def test_two_overloaded_intervals_in_a_row_lower_the_bound_until_one_is_not() -> None:
    control, metrics, clock = _adaptive(limit=8, overload_limit=4)
    _arrive(control, admitted=0, refused=20)  # 8 admitted, 20 refused: overloaded
    clock.now = 1
    _arrive(control, admitted=0, refused=20)  # closes the first overloaded interval
    assert control.current_limit == 8  # one overloaded interval may be a burst
    clock.now = 2
    with ExitStack() as held:
        _hold(held, control, 4)  # closes the second: the bound is lowered
        assert control.current_limit == 4
        assert _value(metrics, "adscore_admission_limit") == 4
        with pytest.raises(
            Overloaded, match="under sustained overload: the limit is 4 until it passes"
        ):
            _hold(held, control, 1)
    assert _value(metrics, "adscore_shed_requests_total", "sustained_overload") == 1
    assert _value(metrics, "adscore_shed_requests_total", "max_in_flight") == 40
    _arrive(control, admitted=30, refused=0)  # demand drops: no refusal in this interval
    clock.now = 3
    with control.admit():
        assert control.current_limit == 8
    assert _value(metrics, "adscore_admission_limit") == 8


def test_the_lowered_bound_stays_while_the_overload_lasts() -> None:
    control, _, clock = _adaptive(limit=8, overload_limit=4)
    for step in range(6):
        clock.now = step
        _arrive(control, admitted=10, refused=10)
        if step >= 2:
            assert control.current_limit == 4, step


def test_a_burst_refused_in_one_interval_keeps_every_slot() -> None:
    control, _, clock = _adaptive(limit=8, overload_limit=4)
    for step in range(6):
        clock.now = step
        refused = 30 if step % 2 == 0 else 0  # every other interval, never two in a row
        _arrive(control, admitted=60, refused=refused)
        assert control.current_limit == 8, step


def test_a_tenth_refused_or_a_trickle_is_not_an_overload() -> None:
    control, _, clock = _adaptive(limit=2, overload_limit=1)
    for step in range(4):
        clock.now = step
        _arrive(control, admitted=98, refused=10)  # 10 of 110 arrivals (the 2 holders too)
        assert control.current_limit == 2, step
    for step in range(4, 8):
        clock.now = step
        _arrive(control, admitted=0, refused=7)  # 7 of 9: most refused, but too few to tell
        assert control.current_limit == 2, step


@pytest.mark.parametrize("overload_limit", [0, 9])
def test_the_overload_bound_must_lie_within_the_limit(overload_limit: int) -> None:
    metrics = Metrics(CollectorRegistry())
    with pytest.raises(ValueError, match=r"overload_limit must be in 1\.\.8"):
        AdmissionControl(
            8,
            metrics.in_flight,
            metrics.shed,
            metrics.admission_limit,
            overload_limit=overload_limit,
        )
