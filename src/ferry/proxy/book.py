"""One client's requests from arrival to reply, and the order they may reach the server in.

A proxy that re-sends requests after losing its server must not let a
re-sent write land on top of a later one.  The NBD specification leaves the
order of two overlapping requests in flight at once undefined, so a server
may well have performed (and answered) the later one first; replaying the
earlier one would then undo it.  So the book never lets two requests that
overlap, where at least one of them changes data, be in flight at the same
time: the later one waits in the book until the earlier one is answered.
Overlapping requests therefore reach the server one after the other in the
order the client sent them, on the first connection and after any replay,
and a replayed write can only land before the writes that came after it.
Reads overlapping reads, and requests on disjoint ranges (almost all of
them), go out at once, as many as the client sends.

Invariants (``tests/unit/test_proxy_book.py`` checks them):

1. Every request added is returned exactly once: by :meth:`RequestBook.take_ready`
   (to send), later by :meth:`answered` or :meth:`finish` (to reply), or by
   :meth:`fail_all`.
2. A request is *ready* (returned by ``take_ready``) only when no request
   added before it, and not yet finished, conflicts with it.  Two ready or
   in-flight requests therefore never conflict.
3. :meth:`lost` turns every request in flight back into a ready one, in the
   order they were added, so the next connection gets them again; the
   requests waiting behind them keep waiting.
4. FLUSH has no range and conflicts with nothing: it covers the writes
   answered before it was sent, and those were answered by a server first.

The book is pure bookkeeping: no sockets, no reactor, times passed in.  It
finds conflicts through an index of 1 MiB buckets, so a request is checked
against the few requests near it, not against everything in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from ferry.nbd.constants import Command
from ferry.nbd.events import Request

__all__ = ["Pending", "RequestBook"]

#: Requests are indexed by the 1 MiB buckets they touch ...
BUCKET_SHIFT: Final = 20
#: ... unless they touch more than this many (a TRIM of a whole disk): those
#: are kept in one list that every new request is checked against.
MAX_BUCKETS: Final = 64

_CHANGES_DATA: Final = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_CARRIES_BYTES: Final = frozenset({Command.READ, Command.WRITE})


@dataclass(slots=True, eq=False)
class Pending:
    """A client request the book holds until it is answered."""

    seq: int
    request: Request
    arrived: float
    writes: bool
    start: int
    end: int
    #: Bytes it makes the proxy hold: a write's payload, a read's answer.
    weight: int
    #: How many earlier requests it waits for; ready at 0.
    blockers: int = 0
    #: Later requests waiting for this one (None: none yet).
    dependents: list[Pending] | None = None
    #: The server's handle while it is in flight; None otherwise.
    handle: int | None = None
    #: How many times it was sent (more than once: replayed).
    sent: int = 0
    #: Since when it has been waiting for a server that is gone (None: it is not).
    held_since: float | None = None

    def conflicts(self, other: Pending) -> bool:
        """Both touch a common byte, and one of them changes it (empty ranges touch none)."""
        overlap = max(self.start, other.start) < min(self.end, other.end)
        return overlap and (self.writes or other.writes)


class RequestBook:
    """Every request of one client connection that has not been answered yet."""

    def __init__(self) -> None:
        self._next_seq = 0
        self._pending: dict[int, Pending] = {}  # by seq: insertion order is arrival order
        self._ready: list[Pending] = []
        self._in_flight: dict[int, Pending] = {}  # by the server's handle
        self._buckets: dict[int, list[Pending]] = {}
        self._wide: list[Pending] = []
        self._weight = 0
        self._held = 0
        self.longest_pause = 0.0

    # -- what the session asks ---------------------------------------------------

    def __len__(self) -> int:
        """Requests not answered yet."""
        return len(self._pending)

    @property
    def weight(self) -> int:
        """Bytes of payload and answers that requests not answered yet stand for."""
        return self._weight

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def held(self) -> int:
        """Requests that waited, or are waiting, for a server that went away."""
        return self._held

    def has_ready(self) -> bool:
        return bool(self._ready)

    def oldest_hold(self) -> float | None:
        """When the request that has waited longest for a server started waiting."""
        held = [p.held_since for p in self._pending.values() if p.held_since is not None]
        return min(held, default=None)

    # -- requests in ---------------------------------------------------------------

    def add(self, request: Request, now: float, *, held: bool = False) -> Pending:
        """Take a client request; ``held`` if no server is there to send it to now."""
        command = request.command
        start = request.offset
        end = start + request.length
        pending = Pending(
            self._next_seq,
            request,
            now,
            command in _CHANGES_DATA,
            start,
            end,
            request.length if command in _CARRIES_BYTES else 0,
        )
        self._next_seq += 1
        if held:
            pending.held_since = now
            self._held += 1
        if end > start and command is not Command.FLUSH:
            first = start >> BUCKET_SHIFT
            if first == (end - 1) >> BUCKET_SHIFT:
                # The usual case, one bucket: look there (and at the wide ones) only.
                bucket = self._buckets.get(first)
                if bucket is None:
                    self._buckets[first] = [pending]
                else:
                    self._wait_for(pending, bucket)
                    bucket.append(pending)
                if self._wide:
                    self._wait_for(pending, self._wide)
            else:
                self._wait_for(pending, self._candidates(pending))
                self._index(pending)
        self._pending[pending.seq] = pending
        self._weight += pending.weight
        if not pending.blockers:
            self._ready.append(pending)
        return pending

    @staticmethod
    def _wait_for(pending: Pending, earlier: Iterable[Pending]) -> None:
        """Make ``pending`` wait for each of ``earlier`` it conflicts with (all non-empty)."""
        writes, start, end = pending.writes, pending.start, pending.end
        for other in earlier:
            if (writes or other.writes) and other.start < end and start < other.end:
                if other.dependents is None:
                    other.dependents = [pending]
                else:
                    other.dependents.append(pending)
                pending.blockers += 1

    def take_ready(self) -> list[Pending]:
        """The requests that may go to the server now, in the order they arrived."""
        ready = self._ready
        self._ready = []
        if len(ready) > 1:
            ready.sort(key=_by_seq)
        return ready

    def sent(self, pending: Pending, handle: int) -> None:
        """``pending`` went to the server under ``handle``."""
        pending.handle = handle
        pending.sent += 1
        self._in_flight[handle] = pending

    # -- answers ---------------------------------------------------------------------

    def answered(self, handle: int, now: float) -> Pending | None:
        """The request the server answered under ``handle`` (None: not one of ours)."""
        pending = self._in_flight.pop(handle, None)
        if pending is not None:
            pending.handle = None
            self.finish(pending, now)
        return pending

    def finish(self, pending: Pending, now: float) -> None:
        """``pending`` has its answer (from the server, or from the proxy itself).

        The requests waiting for it may go once nothing else holds them.
        """
        if pending.handle is not None:
            del self._in_flight[pending.handle]
            pending.handle = None
        del self._pending[pending.seq]
        self._weight -= pending.weight
        if pending.held_since is not None:
            self.longest_pause = max(self.longest_pause, now - pending.held_since)
            self._held -= 1
        if pending.end > pending.start:
            self._unindex(pending)
        dependents = pending.dependents
        if dependents is not None:
            pending.dependents = None
            for waiting in dependents:
                waiting.blockers -= 1
                if not waiting.blockers:
                    self._ready.append(waiting)

    def lost(self, now: float) -> int:
        """The server is gone: every request in flight must be sent again; how many.

        Every request not answered starts (or goes on) waiting from ``now``.
        """
        resend = sorted(self._in_flight.values(), key=_by_seq)
        self._in_flight.clear()
        for pending in resend:
            pending.handle = None
        self._ready = sorted([*self._ready, *resend], key=_by_seq)
        for pending in self._pending.values():
            if pending.held_since is None:
                pending.held_since = now
                self._held += 1
        return len(resend)

    def fail_all(self, now: float) -> list[Pending]:
        """Every request not answered, oldest first, to be answered with an error."""
        failed = list(self._pending.values())
        for pending in failed:
            pending.dependents = None
            if pending.held_since is not None:
                self.longest_pause = max(self.longest_pause, now - pending.held_since)
        self._pending.clear()
        self._ready = []
        self._in_flight.clear()
        self._buckets.clear()
        self._wide = []
        self._weight = 0
        self._held = 0
        return failed

    # -- the conflict index -----------------------------------------------------------

    def _bucket_range(self, pending: Pending) -> range | None:
        first = pending.start >> BUCKET_SHIFT
        last = (pending.end - 1) >> BUCKET_SHIFT
        return None if last - first >= MAX_BUCKETS else range(first, last + 1)

    def _candidates(self, pending: Pending) -> Iterator[Pending]:
        """Earlier requests that may overlap ``pending``, each once."""
        buckets = self._bucket_range(pending)
        if buckets is None:  # a wide one: everything indexed (no FLUSH, nothing empty)
            for earlier in self._pending.values():
                if earlier.end > earlier.start and earlier.request.command is not Command.FLUSH:
                    yield earlier
            return
        yield from self._wide
        if len(buckets) == 1:
            yield from self._buckets.get(buckets[0], ())
            return
        seen: set[int] = set()
        for bucket in buckets:
            for earlier in self._buckets.get(bucket, ()):
                if earlier.seq not in seen:
                    seen.add(earlier.seq)
                    yield earlier

    def _index(self, pending: Pending) -> None:
        buckets = self._bucket_range(pending)
        if buckets is None:
            self._wide.append(pending)
            return
        for bucket in buckets:
            self._buckets.setdefault(bucket, []).append(pending)

    def _unindex(self, pending: Pending) -> None:
        if pending.request.command is Command.FLUSH:
            return
        buckets = self._bucket_range(pending)
        if buckets is None:
            self._wide.remove(pending)
            return
        for bucket in buckets:
            entries = self._buckets[bucket]
            entries.remove(pending)
            if not entries:
                del self._buckets[bucket]


def _by_seq(pending: Pending) -> int:
    return pending.seq
