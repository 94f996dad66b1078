"""When to switch over, and how hard to slow writers that keep the image dirty.

Convergence works as in QEMU, not as in flexnbd (which disconnects every
client once its ETA drops under five seconds).  At the end of each pass the
source asks: if client requests were held *now*, how long would the last
pass take?  That is the bytes left divided by the rate of the last dirty
pass (the expected downtime): the last pass is a dirty pass too, and a
bulk pass's sequential rate would promise far too much (see
``MigrationJob._pass_rate``).  When it is within ``max_downtime``, or when nothing is
dirty, the source quiesces; otherwise it runs another pass.

A writer that dirties the image as fast as the stream drains it would keep
that answer "no" for a long time.  After ``max_passes`` passes without converging,
client writes are throttled progressively instead of cut off: QEMU's
auto-converge throttles the guest's CPUs by ``cpu-throttle-initial`` (20 %)
and then ``cpu-throttle-increment`` (10 %) more each further pass, up to
``max-cpu-throttle`` (99 %).  ferry has no CPUs to slow, so the same
percentage becomes a cap on the client write rate: ``(1 - p)`` times the
rate at which clients dirtied the image before throttling began.  The data
plane applies the cap with a :class:`ferry.ratelimit.RateLimiter`
on client writes (a delay before each write is dispatched), so clients see
slower writes, never errors.  The cap is taken from a base fixed when
throttling starts, so the steps do not compound and the cap never creeps
up while a throttled writer's measured rate falls.

Unlike QEMU's, the throttle has a floor (:data:`MIN_WRITE_RATE`), so the
answer can stay "no" for good: under a ``max_bps`` below twice the floor,
or a ``max_downtime`` shorter than one dirty block at the rate limit, no
pass ever converges.  So a migration is bounded: once the throttle has been
at its maximum for :data:`GIVE_UP_PASSES` passes, the answer is to give up
(the job fails, clients go on, the reason says what to change) rather than
to hold clients longer than ``max_downtime`` promised.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_DOWNTIME",
    "DEFAULT_MAX_PASSES",
    "GIVE_UP_PASSES",
    "MIN_WRITE_RATE",
    "Action",
    "ConvergencePolicy",
    "Decision",
    "expected_downtime",
    "write_rate_cap",
]

#: Seconds a switchover may hold client requests (``--max-downtime``).
DEFAULT_MAX_DOWNTIME: Final = 0.3
#: Passes before auto-converge starts (``--max-passes``).
DEFAULT_MAX_PASSES: Final = 30
#: The throttle never caps client writes below this (bytes per second), so a
#: throttled client still makes progress, however dirty it keeps the image.
MIN_WRITE_RATE: Final = 64 * 1024
#: Passes with the throttle at its maximum after which a migration that still
#: does not converge gives up (see the module doc).
GIVE_UP_PASSES: Final = 10


def expected_downtime(bytes_left: int, rate: float | None) -> float | None:
    """Seconds the last pass would hold clients for; None if no rate is known yet.

    Nothing left costs nothing even before a rate is known.
    """
    if bytes_left < 0:
        raise ValueError(f"bytes_left {bytes_left} is negative")
    if bytes_left == 0:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return bytes_left / rate


class Action(enum.Enum):
    """What the source does when a pass ends."""

    NEXT_PASS = "next_pass"
    SWITCH_OVER = "quiesce"
    NOT_CONVERGED = "not_converged"

    @property
    def trigger(self) -> str:
        """The migration chart's trigger for this action."""
        return self.value


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer at the end of a pass, with what it was based on (for logs and traces).

    ``throttle`` is the fraction of the base client write rate to take
    away during the next pass (0.0: none); it only matters for NEXT_PASS.
    """

    action: Action
    expected_downtime: float | None
    throttle: float
    reason: str


@dataclass(frozen=True, slots=True)
class ConvergencePolicy:
    """The knobs of convergence, with QEMU's auto-converge defaults."""

    max_downtime: float = DEFAULT_MAX_DOWNTIME
    max_passes: int = DEFAULT_MAX_PASSES
    throttle_initial: float = 0.20
    throttle_increment: float = 0.10
    throttle_max: float = 0.99

    def __post_init__(self) -> None:
        if not (self.max_downtime >= 0 and math.isfinite(self.max_downtime)):
            raise ValueError(f"max_downtime {self.max_downtime} is not a finite number >= 0")
        if self.max_passes < 1:
            raise ValueError(f"max_passes {self.max_passes} is less than 1")
        for name in ("throttle_initial", "throttle_increment", "throttle_max"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} {value} is not in [0, 1)")
        if self.throttle_initial > self.throttle_max:
            raise ValueError("throttle_initial is above throttle_max")

    def throttle(self, passes_done: int) -> float:
        """The throttle for the pass after ``passes_done`` unconverged passes.

        Zero up to ``max_passes``; then initial, initial + increment, ...
        capped at ``throttle_max``.
        """
        beyond = passes_done - self.max_passes
        if beyond < 0:
            return 0.0
        return min(self.throttle_max, self.throttle_initial + beyond * self.throttle_increment)

    @property
    def give_up_after(self) -> int:
        """Passes after which a migration that does not converge gives up."""
        rise = self.throttle_max - self.throttle_initial
        steps = math.ceil(rise / self.throttle_increment) if self.throttle_increment else 0
        return self.max_passes + steps + GIVE_UP_PASSES

    def decide(self, *, bytes_left: int, rate: float | None, passes_done: int) -> Decision:
        """Switch over now, run another pass (throttled after ``max_passes``), or give up?

        ``bytes_left`` is what the last pass would send (the dirty bytes),
        ``rate`` the measured migration speed, ``passes_done`` how many passes
        of this attempt have ended, counting the one that just did.
        """
        downtime = expected_downtime(bytes_left, rate)
        if bytes_left == 0:
            return Decision(Action.SWITCH_OVER, downtime, 0.0, "nothing dirty")
        basis = (
            f"{bytes_left} bytes left"
            if rate is None
            else (f"{bytes_left} bytes left at {rate / 1e6:.1f} MB/s")
        )
        if downtime is not None and downtime <= self.max_downtime:
            return Decision(
                Action.SWITCH_OVER,
                downtime,
                0.0,
                f"expected downtime {downtime:.3f}s <= {self.max_downtime}s ({basis})",
            )
        throttle = self.throttle(passes_done)
        why = "no rate yet" if downtime is None else f"expected downtime {downtime:.3f}s"
        why += f" ({basis})"
        if passes_done >= self.give_up_after:
            why = (
                f"did not converge in {passes_done} passes, the last {GIVE_UP_PASSES} with "
                f"client writes throttled {throttle:.0%}: {why}, max_downtime "
                f"{self.max_downtime}s; raise max_downtime or max_bps"
            )
            return Decision(Action.NOT_CONVERGED, downtime, throttle, why)
        if throttle:
            why += f"; pass {passes_done} >= {self.max_passes}: throttle writes {throttle:.0%}"
        return Decision(Action.NEXT_PASS, downtime, throttle, why)


def write_rate_cap(throttle: float, base_rate: float) -> int | None:
    """The client write cap (bytes per second) for a throttle; None means no cap.

    ``base_rate`` is the rate clients dirtied the image at when throttling
    began (dirty bytes of a pass over its duration).
    """
    if not 0 <= throttle < 1:
        raise ValueError(f"throttle {throttle} is not in [0, 1)")
    if throttle == 0:
        return None
    return max(MIN_WRITE_RATE, int(base_rate * (1 - throttle)))
