"""The migration bandwidth limit on a simulated clock: held within 5 %, changeable mid-run."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task

from ferry.clock import ReactorClock
from ferry.ratelimit import BURST_SECONDS, RateLimiter

from .migrate_support import KIB, MIB, run_until


class Stream:
    """A sender that always has ``chunk`` bytes ready and obeys the limiter."""

    def __init__(self, clock: task.Clock, limiter: RateLimiter, chunk: int) -> None:
        self.clock = clock
        self.limiter = limiter
        self.chunk = chunk
        self.sends: list[tuple[float, int]] = []
        self.running = True
        self._next()

    def _next(self) -> None:
        if self.running:
            self.clock.callLater(self.limiter.reserve(self.chunk), self._send)

    def _send(self) -> None:
        self.sends.append((self.clock.seconds(), self.chunk))
        self._next()

    def bytes_between(self, start: float, end: float) -> int:
        return sum(n for t, n in self.sends if start <= t < end)


def make(limit: int | None) -> tuple[task.Clock, RateLimiter]:
    clock = task.Clock()
    return clock, RateLimiter(ReactorClock(clock), limit)


@pytest.mark.parametrize(
    ("limit", "chunk"),
    [(10 * MIB, 256 * KIB), (1 * MIB, 4 * MIB), (100 * MIB, 4 * MIB), (50 * KIB, 4 * KIB)],
)
def test_the_limit_is_held_within_5_percent(limit: int, chunk: int) -> None:
    clock, limiter = make(limit)
    stream = Stream(clock, limiter, chunk)
    run_until(clock, 60.0)
    rate = stream.bytes_between(0.0, 60.0) / 60.0
    assert rate == pytest.approx(limit, rel=0.05)
    # ... and over every whole second, not only on average.
    for second in range(1, 60):
        got = stream.bytes_between(float(second), second + 1.0)
        assert got <= limit * (1 + BURST_SECONDS) + chunk


def test_a_change_mid_run_takes_effect_at_once() -> None:
    clock, limiter = make(10 * MIB)
    stream = Stream(clock, limiter, 64 * KIB)
    run_until(clock, 20.0)
    limiter.set_limit(2 * MIB)
    run_until(clock, 40.0)
    limiter.set_limit(20 * MIB)
    run_until(clock, 60.0)
    assert stream.bytes_between(0, 20) / 20 == pytest.approx(10 * MIB, rel=0.05)
    assert stream.bytes_between(20, 40) / 20 == pytest.approx(2 * MIB, rel=0.05)
    assert stream.bytes_between(40, 60) / 20 == pytest.approx(20 * MIB, rel=0.05)
    assert limiter.limit == 20 * MIB


def test_lowering_the_limit_repays_what_is_reserved_at_the_new_rate() -> None:
    _, limiter = make(1 * MIB)
    limiter.reserve(1 * MIB)  # paid off 0.9 s from now (0.1 s of burst credit)
    assert limiter.backlog() == pytest.approx(0.9)
    limiter.set_limit(MIB // 2)
    assert limiter.backlog() == pytest.approx(1.8)
    assert limiter.delay_for(0) == pytest.approx(1.8)


def test_raising_or_lifting_the_limit_releases_a_long_wait() -> None:
    _, limiter = make(1 * MIB)
    assert limiter.reserve(10 * MIB) == pytest.approx(9.9)
    limiter.set_limit(100 * MIB)
    assert limiter.delay_for(0) == pytest.approx(0.099)
    limiter.set_limit(None)
    assert limiter.delay_for(10 * MIB) == 0.0
    assert limiter.backlog() == 0.0


def test_limiting_after_unlimited_starts_with_one_burst() -> None:
    _, limiter = make(None)
    for _ in range(100):
        assert limiter.reserve(MIB) == 0.0
    limiter.set_limit(MIB)
    assert limiter.delay_for(MIB // 10) == 0.0
    assert limiter.delay_for(MIB) == pytest.approx(0.9)


def test_idle_time_earns_no_more_than_the_burst() -> None:
    clock, limiter = make(MIB)
    clock.advance(3600)
    assert limiter.reserve(MIB // 10) == 0.0
    assert limiter.reserve(MIB // 10) == pytest.approx(0.1, rel=1e-4)


def test_delay_for_does_not_reserve() -> None:
    _, limiter = make(MIB)
    assert limiter.delay_for(2 * MIB) == pytest.approx(1.9)
    assert limiter.delay_for(2 * MIB) == pytest.approx(1.9)
    assert limiter.backlog() == 0.0


@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_must_be_positive(bad: int) -> None:
    _, limiter = make(None)
    with pytest.raises(ValueError, match="not positive"):
        limiter.set_limit(bad)
    with pytest.raises(TypeError):
        limiter.set_limit(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        limiter.delay_for(-1)


@given(
    limit=st.integers(1 * KIB, 100 * MIB),
    steps=st.lists(
        st.tuples(st.integers(0, 8 * MIB), st.floats(0, 2.0, allow_nan=False)),
        min_size=1,
        max_size=40,
    ),
)
def test_no_run_of_sends_beats_the_limit_by_more_than_one_burst(
    limit: int, steps: list[tuple[int, float]]
) -> None:
    clock, limiter = make(limit)
    sends: list[tuple[float, int]] = []
    for nbytes, idle in steps:
        clock.advance(idle)
        clock.advance(limiter.reserve(nbytes))
        sends.append((clock.seconds(), nbytes))
    # Any run of sends carries at most the limit over its span, plus one
    # burst or its first request, whichever is larger.
    for i, (start, first) in enumerate(sends):
        allowance = max(limit * BURST_SECONDS, first)
        total = 0
        for end, nbytes in sends[i:]:
            total += nbytes
            assert total <= (limit * (end - start) + allowance) * (1 + 1e-9) + 1
