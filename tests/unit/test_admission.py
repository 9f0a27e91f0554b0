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


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


STEP_S = 0.001  # between arrivals; intervals are 1 s in these tests


class Simulation:
    """An adaptive AdmissionControl on a fake clock, driven interval by interval."""

    def __init__(self, limit: int = 8, overload_limit: int = 4) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.clock = FakeClock()
        self.overloaded: list[bool] = []  # what on_overload heard, in order
        self.control = AdmissionControl(
            limit,
            self.metrics.in_flight,
            self.metrics.shed,
            self.metrics.admission_limit,
            overload_limit=overload_limit,
            interval_s=1.0,
            clock=self.clock,
            on_overload=self.overloaded.append,
        )

    def interval(self, quick: int, refused: int) -> None:
        """One interval: `quick` requests admitted and finished at once, then the bound filled
        and held while `refused` more arrive; the holders finish as the interval ends."""
        started = self.clock.now
        for _ in range(quick):
            self.clock.now += STEP_S
            with self.control.admit():
                pass
        with ExitStack() as held:
            while self.control.in_flight < self.control.current_limit:
                self.clock.now += STEP_S
                held.enter_context(self.control.admit())
            for _ in range(refused):
                self.clock.now += STEP_S
                with pytest.raises(Overloaded), self.control.admit():
                    pass  # pragma: no cover - never admitted
        self.clock.now = started + 1.0

    def limit_after_next_arrival(self) -> int:
        """The bound once the next arrival has closed the interval before it."""
        self.clock.now += STEP_S
        with self.control.admit():
            pass
        return self.control.current_limit


def _hold(stack: ExitStack, control: AdmissionControl, count: int) -> None:
    for _ in range(count):
        stack.enter_context(control.admit())


def _value(metrics: Metrics, name: str, reason: str = "max_in_flight") -> float | None:
    labels = {"reason": reason} if name.startswith("adscore_shed") else {}
    return metrics.registry.get_sample_value(name, labels)


def test_a_fixed_bound_never_changes_however_many_are_refused() -> None:
    control, metrics = _control(limit=4)
    for _ in range(5):
        with ExitStack() as held:
            _hold(held, control, 4)
            for _ in range(50):
                with pytest.raises(Overloaded), control.admit():
                    pass  # pragma: no cover - never admitted
    assert not control.adaptive and control.current_limit == 4
    assert _value(metrics, "adscore_admission_limit") == 4
    assert _value(metrics, "adscore_shed_requests_total") == 250


def test_two_overloaded_intervals_in_a_row_lower_the_bound_until_one_is_not() -> None:
    sim = Simulation(limit=8, overload_limit=4)
    sim.interval(quick=30, refused=20)
    sim.interval(quick=30, refused=20)  # the first one closes here: one may be a burst
    assert sim.control.current_limit == 8
    sim.clock.now += STEP_S
    with ExitStack() as held:
        _hold(held, sim.control, 4)  # the first arrival closes the second: the bound halves
        assert sim.control.current_limit == 4
        assert sim.overloaded == [True]
        assert _value(sim.metrics, "adscore_admission_limit") == 4
        with pytest.raises(
            Overloaded, match="under sustained overload: the limit is 4 until it passes"
        ):
            _hold(held, sim.control, 1)
    assert _value(sim.metrics, "adscore_shed_requests_total", "sustained_overload") == 1
    assert _value(sim.metrics, "adscore_shed_requests_total", "max_in_flight") == 40
    sim.clock.now += 0.5
    sim.interval(quick=100, refused=0)  # demand drops: nothing refused in this interval
    assert sim.limit_after_next_arrival() == 8
    assert _value(sim.metrics, "adscore_admission_limit") == 8
    assert sim.overloaded == [True, False]


def test_the_lowered_bound_stays_while_the_overload_lasts_and_throughput_holds() -> None:
    sim = Simulation(limit=8, overload_limit=4)
    for index in range(8):
        sim.interval(quick=30, refused=20)  # 38 completions per interval at 8, 34 at 4
        if index >= 2:
            assert sim.control.current_limit == 4, index


def test_a_lowered_bound_that_costs_throughput_goes_back_to_full_for_a_while() -> None:
    # Requests wait on I/O: only the slots held complete, so halving them halves throughput.
    sim = Simulation(limit=8, overload_limit=4)
    limits = []
    for _ in range(12):
        sim.interval(quick=0, refused=20)
        limits.append(sim.control.current_limit)
    # Lowered after two overloaded intervals; two lowered intervals at half the throughput
    # bring it back, and it stays full for HOLD_FULL_S (5 intervals here) before trying again.
    assert limits[:2] == [8, 8]
    assert limits[2:4] == [4, 4]
    assert limits[4:9] == [8] * 5
    assert 4 in limits[9:]


def test_a_burst_refused_in_every_other_interval_keeps_every_slot() -> None:
    sim = Simulation(limit=8, overload_limit=4)
    for index in range(6):
        sim.interval(quick=60, refused=30 if index % 2 == 0 else 0)
        assert sim.control.current_limit == 8, index


@pytest.mark.parametrize(
    ("quick", "refused", "lowered"),
    [
        (88, 10, False),  # 10 of 100 arrivals (2 holders): a tenth is not an overload
        (87, 11, True),  # 11 of 100
        (0, 8, True),  # 8 of 10 arrivals: enough to tell
        (0, 7, False),  # 7 of 9: too few arrivals to tell
    ],
)
def test_the_thresholds(quick: int, refused: int, lowered: bool) -> None:
    sim = Simulation(limit=2, overload_limit=1)
    for _ in range(3):
        sim.interval(quick=quick, refused=refused)
    assert (sim.control.current_limit == 1) is lowered


def test_an_idle_gap_ends_the_overload() -> None:
    sim = Simulation(limit=8, overload_limit=4)
    sim.interval(quick=30, refused=20)
    sim.interval(quick=30, refused=20)
    sim.clock.now += 60  # traffic stops; the open interval was overloaded
    assert sim.limit_after_next_arrival() == 8
    sim.interval(quick=30, refused=20)  # one overloaded interval after the gap is not two
    assert sim.limit_after_next_arrival() == 8
    sim.interval(quick=30, refused=20)
    sim.interval(quick=30, refused=20)
    sim.clock.now += 60  # the bound is lowered when traffic stops ...
    assert sim.control.current_limit == 4
    assert sim.limit_after_next_arrival() == 8  # ... and full when it resumes


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
