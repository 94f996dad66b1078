"""How long to wait before the next attempt of a migration that lost its destination.

1 s, doubling, at most 30 s (issue 3).  No jitter: one source retries one
destination, so there is no herd to spread, and a fixed sequence is what
an operator reading the status line expects.

The delay goes back to the start only when an attempt made real progress
(:meth:`Backoff.reset` after a pass ends): resetting on every connection, as
Twisted's ``ReconnectingClientFactory`` does, would retry a destination that
accepts the hello and then fails every time once a second forever.
"""

from __future__ import annotations

from typing import Final

__all__ = ["INITIAL_DELAY", "MAX_DELAY", "Backoff"]

INITIAL_DELAY: Final = 1.0
MAX_DELAY: Final = 30.0


class Backoff:
    """The delays before successive retries: ``initial * factor**n``, capped at ``maximum``."""

    __slots__ = ("_attempts", "factor", "initial", "maximum")

    def __init__(
        self, initial: float = INITIAL_DELAY, maximum: float = MAX_DELAY, factor: float = 2.0
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial ({initial}) <= maximum ({maximum})")
        if factor < 1:
            raise ValueError(f"factor {factor} is less than 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._attempts = 0

    @property
    def retries(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempts

    def peek(self) -> float:
        """The delay :meth:`next_delay` would return, without counting it."""
        # Once capped, stop multiplying: the float would overflow after ~1000 retries.
        delay = self.initial
        for _ in range(self._attempts):
            delay *= self.factor
            if delay >= self.maximum:
                return self.maximum
        return min(delay, self.maximum)

    def next_delay(self) -> float:
        """The delay before the next retry; each call counts one retry."""
        delay = self.peek()
        self._attempts += 1
        return delay

    def reset(self) -> None:
        """Start again from ``initial``: the last attempt made progress."""
        self._attempts = 0
