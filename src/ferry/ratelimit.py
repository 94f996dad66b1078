"""A bandwidth limit for the migration stream, on the injected clock.

The limiter keeps one number, the *theoretical arrival time* (``_tat``):
the instant at which everything reserved so far would have finished going
out at exactly the limit (the GCRA form of a token bucket).  Sending ``n``
bytes moves it ``n / limit`` seconds later; the bytes may go once it is no
further ahead of now than the burst allowance.  Because the bytes are paid
for *before* they go, the bytes sent in any interval of length ``T`` are at
most ``limit * T`` plus one burst or one request, whichever is larger: the
limit holds from the first second, not only on average.

Idle time earns credit only up to the burst allowance (``_tat`` never lags
more than that behind now), so a pause followed by a rush cannot exceed the
limit by more than one burst.  The allowance is QEMU's 100 ms rate-limit
period: small enough not to matter to the limit, large enough that a
request smaller than 100 ms of the limit goes without waiting.

Changing the limit (``mirror_max_bps``) converts what is outstanding: bytes
reserved but not yet paid for are repaid at the new rate, so lowering the
limit slows the very next request, and raising it (or lifting it) lets the
stream go at once instead of waiting out a delay computed at the old rate.
A caller that is waiting must ask :meth:`RateLimiter.delay_for` again after
a change; the limiter schedules nothing itself.
"""

from __future__ import annotations

from typing import Final

from ferry.clock import Clock

__all__ = ["BURST_SECONDS", "RateLimiter"]

#: How much idle credit the limiter keeps, in seconds of the limit.
BURST_SECONDS: Final = 0.1


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int number of bytes per second or None, not {limit!r}")
    if limit <= 0:
        raise ValueError(f"limit {limit} is not positive (use None for no limit)")
    return limit


class RateLimiter:
    """Says how long to wait before the next bytes of the stream may go.

    ``limit`` is in bytes per second; ``None`` means unlimited, and then
    every delay is zero.  The usual loop is::

        delay = limiter.reserve(len(chunk))   # the bytes are now accounted
        clock.call_later(delay, send, chunk)  # or send at once if delay == 0
    """

    __slots__ = ("_burst_seconds", "_clock", "_limit", "_tat")

    def __init__(
        self, clock: Clock, limit: int | None = None, *, burst_seconds: float = BURST_SECONDS
    ) -> None:
        if burst_seconds < 0:
            raise ValueError(f"burst_seconds {burst_seconds} is negative")
        self._clock = clock
        self._limit = _check_limit(limit)
        self._burst_seconds = burst_seconds
        self._tat = clock.seconds() - burst_seconds

    def __repr__(self) -> str:
        return f"<RateLimiter limit={self._limit} backlog={self.backlog():.3f}s>"

    @property
    def limit(self) -> int | None:
        """The limit in bytes per second (``migration_speed_limit``), or None."""
        return self._limit

    def set_limit(self, limit: int | None) -> None:
        """Change the limit now; bytes already reserved are repaid at the new rate."""
        limit = _check_limit(limit)
        now = self._clock.seconds()
        old = self._limit
        self._limit = limit
        if limit is None:
            return
        if old is None:
            # Nothing was accounted while unlimited: start with a full burst.
            self._tat = now - self._burst_seconds
            return
        # Seconds ahead of (positive) or behind (credit) now, at the old rate,
        # turned into bytes and back into seconds at the new one.
        owed_bytes = (self._tat - now) * old
        self._tat = max(now + owed_bytes / limit, now - self._burst_seconds)

    def _base(self, now: float) -> float:
        return max(self._tat, now - self._burst_seconds)

    def delay_for(self, nbytes: int) -> float:
        """Seconds until ``nbytes`` may go, without reserving them (0.0: now)."""
        if nbytes < 0:
            raise ValueError(f"nbytes {nbytes} is negative")
        if self._limit is None:
            return 0.0
        now = self._clock.seconds()
        return max(0.0, self._base(now) + nbytes / self._limit - now)

    def reserve(self, nbytes: int) -> float:
        """Account ``nbytes`` as sent and return how long to wait before sending them.

        The caller must then wait that long; the next reservation queues
        behind this one, so reservations never overlap.
        """
        delay = self.delay_for(nbytes)
        if self._limit is not None:
            self._tat = self._base(self._clock.seconds()) + nbytes / self._limit
        return delay

    def backlog(self) -> float:
        """Seconds of reserved bytes not yet paid for (0.0 when idle or unlimited)."""
        if self._limit is None:
            return 0.0
        return max(0.0, self._tat - self._clock.seconds())
