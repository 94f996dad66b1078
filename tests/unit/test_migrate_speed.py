"""The migration rate is over a recent window, not since the start."""

from __future__ import annotations

import pytest
from twisted.internet import task

from ferry.clock import ReactorClock
from ferry.migrate.core.speed import SpeedMeter

from .migrate_support import MIB


def feed(clock: task.Clock, meter: SpeedMeter, rate: float, seconds: float, tick: float = 0.01):
    """Record ``rate`` bytes per second for ``seconds``, in ``tick``-second steps."""
    for _ in range(round(seconds / tick)):
        clock.advance(tick)
        meter.record(int(rate * tick))


def make(window: float = 2.0) -> tuple[task.Clock, SpeedMeter]:
    clock = task.Clock()
    return clock, SpeedMeter(ReactorClock(clock), window)


def test_no_rate_before_any_time_has_passed() -> None:
    clock, meter = make()
    assert meter.rate() is None
    meter.record(MIB)
    assert meter.rate() is None
    clock.advance(0.5)
    assert meter.rate() == pytest.approx(2 * MIB)


def test_a_steady_stream_measures_its_rate() -> None:
    clock, meter = make()
    feed(clock, meter, 100 * MIB, 10)
    assert meter.rate() == pytest.approx(100 * MIB, rel=0.05)
    assert meter.total == pytest.approx(1000 * MIB, rel=0.001)


def test_the_rate_follows_a_slowdown_within_one_window() -> None:
    clock, meter = make(window=2.0)
    feed(clock, meter, 500 * MIB, 60)  # a fast pass 1 for a minute ...
    feed(clock, meter, 10 * MIB, 2.5)  # ... then the destination slows down
    # Since the start the average would still be ~480 MiB/s.
    assert meter.rate() == pytest.approx(10 * MIB, rel=0.05)


def test_the_rate_falls_to_zero_when_nothing_is_sent() -> None:
    clock, meter = make()
    feed(clock, meter, 50 * MIB, 5)
    clock.advance(1.0)
    assert meter.rate() == pytest.approx(25 * MIB, rel=0.06)
    clock.advance(1.2)
    assert meter.rate() == 0.0


def test_restart_forgets_everything() -> None:
    clock, meter = make()
    feed(clock, meter, 50 * MIB, 5)
    meter.restart()
    assert meter.total == 0
    assert meter.rate() is None
    feed(clock, meter, 1 * MIB, 1)
    assert meter.rate() == pytest.approx(1 * MIB, rel=0.05)


def test_memory_is_bounded_by_the_buckets() -> None:
    clock, meter = make()
    for _ in range(100_000):
        clock.advance(0.0001)
        meter.record(10)
    assert len(meter._buckets) <= 22


def test_bad_arguments() -> None:
    clock, meter = make()
    with pytest.raises(ValueError):
        meter.record(-1)
    with pytest.raises(ValueError):
        SpeedMeter(ReactorClock(clock), 0)
