"""The migration rate over a recent window, not since the start.

The convergence decision divides the bytes left by this rate, so it must
say how fast the stream goes *now*: an average since the start would
remember a fast idle pass 1 long after a busy destination slowed down (or a
slow start after a limit was lifted).  QEMU measures per iteration for the
same reason.

Samples are added into buckets of ``window / BUCKETS`` seconds, so memory
stays bounded however many small requests complete, at the price of the
window's edge being one bucket wide.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from ferry.clock import Clock

__all__ = ["BUCKETS", "DEFAULT_WINDOW", "SpeedMeter"]

#: Seconds the rate is measured over.
DEFAULT_WINDOW: Final = 2.0
#: Buckets per window: the resolution of the window's edge.
BUCKETS: Final = 20


class SpeedMeter:
    """Bytes per second over the last ``window`` seconds of the clock.

    Before a whole window has passed since :meth:`restart`, the rate is over
    the time since the restart, so the first pass shows a rate at once.
    """

    __slots__ = ("_buckets", "_clock", "_origin", "_total", "_width", "window")

    def __init__(self, clock: Clock, window: float = DEFAULT_WINDOW) -> None:
        if window <= 0:
            raise ValueError(f"window {window} is not positive")
        self._clock = clock
        self.window = window
        self._width = window / BUCKETS
        self._buckets: deque[list[float]] = deque()  # [bucket start, bytes]
        self._origin = clock.seconds()
        self._total = 0

    def restart(self) -> None:
        """Forget every sample: a new attempt measures afresh."""
        self._buckets.clear()
        self._origin = self._clock.seconds()
        self._total = 0

    @property
    def total(self) -> int:
        """Bytes recorded since the last restart."""
        return self._total

    def record(self, nbytes: int) -> None:
        """``nbytes`` more went out just now."""
        if nbytes < 0:
            raise ValueError(f"nbytes {nbytes} is negative")
        now = self._clock.seconds()
        self._total += nbytes
        buckets = self._buckets
        if buckets and now < buckets[-1][0] + self._width:
            buckets[-1][1] += nbytes
        else:
            buckets.append([now, float(nbytes)])
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        buckets = self._buckets
        while buckets and buckets[0][0] + self._width <= horizon:
            buckets.popleft()

    def rate(self) -> float | None:
        """Bytes per second over the window; None until any time has passed."""
        now = self._clock.seconds()
        self._expire(now)
        span = min(self.window, now - self._origin)
        if span <= 0:
            return None
        horizon = now - span
        in_window = sum(b for start, b in self._buckets if start >= horizon - self._width / 2)
        return in_window / span
