"""The switchover decision, auto-converge's throttle, and the retry backoff."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.migrate.core.backoff import Backoff
from ferry.migrate.core.convergence import (
    MIN_WRITE_RATE,
    Action,
    ConvergencePolicy,
    expected_downtime,
    write_rate_cap,
)

from .migrate_support import MIB

NEXT, SWITCH, GIVE_UP = Action.NEXT_PASS, Action.SWITCH_OVER, Action.NOT_CONVERGED

# bytes_left, rate (B/s), passes_done -> action, expected downtime, throttle
DECISIONS = [
    # nothing dirty: switch over, whatever the rate (even before one is known)
    (0, None, 1, SWITCH, 0.0, 0.0),
    (0, 0.0, 1, SWITCH, 0.0, 0.0),
    (0, 100 * MIB, 40, SWITCH, 0.0, 0.0),
    # under or at the limit (0.3 s): switch over
    (30 * MIB, 100 * MIB, 1, SWITCH, 0.3, 0.0),
    (1, 100 * MIB, 2, SWITCH, 1 / (100 * MIB), 0.0),
    # over the limit: another pass
    (30 * MIB + 1, 100 * MIB, 1, NEXT, (30 * MIB + 1) / (100 * MIB), 0.0),
    (1 * MIB, 1 * MIB, 5, NEXT, 1.0, 0.0),
    # no rate yet, something dirty: another pass
    (1, None, 1, NEXT, None, 0.0),
    (1, 0.0, 1, NEXT, None, 0.0),
    # not converging after max_passes (30): auto-converge
    (1 * MIB, 1 * MIB, 29, NEXT, 1.0, 0.0),
    (1 * MIB, 1 * MIB, 30, NEXT, 1.0, 0.2),
    (1 * MIB, 1 * MIB, 31, NEXT, 1.0, 0.3),
    (1 * MIB, 1 * MIB, 37, NEXT, 1.0, 0.9),
    (1 * MIB, 1 * MIB, 38, NEXT, 1.0, 0.99),
    # ten passes at the most throttle without converging: give up
    (1 * MIB, 1 * MIB, 47, NEXT, 1.0, 0.99),
    (1 * MIB, 1 * MIB, 48, GIVE_UP, 1.0, 0.99),
    (1 * MIB, 1 * MIB, 1000, GIVE_UP, 1.0, 0.99),
    (1, None, 48, GIVE_UP, None, 0.99),
    # converging while throttled switches over and stops throttling
    (1 * MIB, 100 * MIB, 35, SWITCH, 0.01, 0.0),
]


@pytest.mark.parametrize(("left", "rate", "passes", "action", "downtime", "throttle"), DECISIONS)
def test_the_decision_table(
    left: int,
    rate: float | None,
    passes: int,
    action: Action,
    downtime: float | None,
    throttle: float,
) -> None:
    decision = ConvergencePolicy().decide(bytes_left=left, rate=rate, passes_done=passes)
    assert decision.action is action
    if downtime is None:
        assert decision.expected_downtime is None
    else:
        assert decision.expected_downtime == pytest.approx(downtime)
    assert decision.throttle == pytest.approx(throttle)
    assert decision.reason


def test_the_limit_and_the_pass_count_are_settable() -> None:
    policy = ConvergencePolicy(max_downtime=2.0, max_passes=3)
    assert policy.decide(bytes_left=MIB, rate=MIB / 2, passes_done=1).action is SWITCH
    assert policy.decide(bytes_left=MIB, rate=MIB / 3, passes_done=2).throttle == 0.0
    assert policy.decide(bytes_left=MIB, rate=MIB / 3, passes_done=3).throttle == pytest.approx(0.2)
    zero = ConvergencePolicy(max_downtime=0.0)
    assert zero.decide(bytes_left=1, rate=1e12, passes_done=1).action is NEXT
    assert zero.decide(bytes_left=0, rate=None, passes_done=1).action is SWITCH


def test_actions_name_the_chart_triggers() -> None:
    assert NEXT.trigger == "next_pass"
    assert SWITCH.trigger == "quiesce"
    assert GIVE_UP.trigger == "not_converged"


def test_auto_converge_tightens_each_pass_like_qemu() -> None:
    policy = ConvergencePolicy(max_passes=30)
    throttles = [policy.throttle(n) for n in range(28, 42)]
    assert throttles == pytest.approx(
        [0, 0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 0.99, 0.99, 0.99]
    )
    base = 100 * MIB
    caps = [write_rate_cap(t, base) for t in throttles]
    assert caps[:2] == [None, None]
    tightening = [c for c in caps if c is not None]
    assert tightening == sorted(tightening, reverse=True)
    assert tightening[0] == int(base * 0.8)
    assert tightening[-1] == int(base * 0.01)


def test_the_write_cap_never_stops_clients() -> None:
    assert write_rate_cap(0.99, 1000.0) == MIN_WRITE_RATE
    assert write_rate_cap(0.5, 0.0) == MIN_WRITE_RATE
    with pytest.raises(ValueError):
        write_rate_cap(1.0, 1000.0)


@given(
    left=st.integers(0, 2**50),
    rate=st.none() | st.floats(0, 1e12, allow_nan=False),
    passes=st.integers(1, 200),
    max_downtime=st.floats(0, 10, allow_nan=False),
)
def test_switch_over_exactly_when_the_expected_downtime_fits(
    left: int, rate: float | None, passes: int, max_downtime: float
) -> None:
    policy = ConvergencePolicy(max_downtime=max_downtime)
    decision = policy.decide(bytes_left=left, rate=rate, passes_done=passes)
    downtime = expected_downtime(left, rate)
    fits = downtime is not None and downtime <= max_downtime
    assert (decision.action is SWITCH) is fits
    assert decision.expected_downtime == downtime
    assert 0 <= decision.throttle <= 0.99
    if decision.action is SWITCH:
        assert decision.throttle == 0


def test_expected_downtime() -> None:
    assert expected_downtime(0, None) == 0.0
    assert expected_downtime(10, None) is None
    assert expected_downtime(10, 0.0) is None
    assert expected_downtime(10, 4.0) == 2.5
    with pytest.raises(ValueError):
        expected_downtime(-1, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_downtime": -0.1},
        {"max_downtime": math.inf},
        {"max_passes": 0},
        {"throttle_initial": 1.0},
        {"throttle_increment": -0.1},
        {"throttle_initial": 0.5, "throttle_max": 0.4},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ConvergencePolicy(**kwargs)  # type: ignore[arg-type]


# -- backoff --------------------------------------------------------------------


def test_backoff_doubles_from_one_second_to_thirty() -> None:
    backoff = Backoff()
    assert [backoff.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.retries == 8


def test_backoff_reset_starts_again_and_peek_does_not_count() -> None:
    backoff = Backoff()
    for _ in range(4):
        backoff.next_delay()
    assert backoff.peek() == 16
    assert backoff.peek() == 16
    backoff.reset()
    assert backoff.retries == 0
    assert backoff.next_delay() == 1


def test_backoff_stays_capped_after_many_retries() -> None:
    backoff = Backoff()
    for _ in range(5000):
        assert backoff.next_delay() <= 30
    assert backoff.next_delay() == 30


def test_backoff_arguments() -> None:
    assert [Backoff(0.5, 3, 3).next_delay() for _ in range(1)] == [0.5]
    with pytest.raises(ValueError):
        Backoff(0, 30)
    with pytest.raises(ValueError):
        Backoff(40, 30)
    with pytest.raises(ValueError):
        Backoff(1, 30, 0.5)
