"""What one client may make this node hold, and for how long: every limit, named.

A hostile client costs bounded memory and locks nobody out.  These are the
bounds, each with the attack it answers (measured on the previous release,
on loopback):

* connections: ``MAX_CLIENTS`` in all, ``MAX_CONNECTIONS_PER_ADDRESS`` from
  one address.  A full server makes room for a newcomer by closing the
  longest-idle connection of the address that holds the most (256 idle
  connections from one address locked every other client out for as long
  as they stayed).
* time: a handshake must end within ``HANDSHAKE_TIMEOUT``; a request that
  has begun to arrive must be whole within ``PARTIAL_REQUEST_TIMEOUT``; a
  migration sender that completes no request for ``SENDER_TIMEOUT`` is
  closed.
* requests: a connection queues at most ``MAX_QUEUED_REQUESTS`` parsed
  requests, holding ``MAX_QUEUED_BYTES`` of payload, and has at most
  ``MAX_JOBS_PER_CONNECTION`` requests on the worker threads (or waiting in
  its export's order for one) at once; past either it stops reading
  (300,000 pipelined FLUSHes took 276 MB that were never returned, and a
  legitimate FLUSH waited 33 s behind them).  The payload of its WRITEs on
  threads counts against ``RECEIVE_BUDGET`` until they land, and the bytes
  of its READs on threads against ``REPLY_BUDGET``.
* memory, for the whole process: the bytes of requests received but not yet
  performed (``RECEIVE_BUDGET``) and of replies written but not yet taken
  by their clients (``REPLY_BUDGET``).  A connection that would go over
  waits, without reading (or without performing its next READ), until
  others have given some back; a client that holds reply bytes others wait
  for and reads nothing for ``REPLY_STALL_TIMEOUT`` is closed (100
  connections each halfway through a 32 MiB WRITE took 3.3 GB, and 40 that
  did not read a 32 MiB READ took 1.2 GB).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = [
    "DRAIN_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "MAX_CLIENTS",
    "MAX_CONNECTIONS_PER_ADDRESS",
    "MAX_JOBS_PER_CONNECTION",
    "MAX_QUEUED_BYTES",
    "MAX_QUEUED_REQUESTS",
    "PARTIAL_REQUEST_TIMEOUT",
    "RECEIVE_BUDGET",
    "REPLY_BUDGET",
    "REPLY_RECOUNT",
    "REPLY_STALL_TIMEOUT",
    "SENDER_TIMEOUT",
    "Budget",
]

MiB: Final = 1024 * 1024

MAX_CLIENTS: Final = 256
MAX_CONNECTIONS_PER_ADDRESS: Final = 32
HANDSHAKE_TIMEOUT: Final = 10.0
# A source is never this slow: it paces its requests to at most a second's
# worth of its rate limit.
SENDER_TIMEOUT: Final = 120.0
# 32 MiB in a minute is half a megabyte a second: any client on a storage
# network sends a whole request far faster.
PARTIAL_REQUEST_TIMEOUT: Final = 60.0
REPLY_STALL_TIMEOUT: Final = 60.0
MAX_QUEUED_REQUESTS: Final = 256
MAX_QUEUED_BYTES: Final = 64 * MiB
MAX_JOBS_PER_CONNECTION: Final = 16
RECEIVE_BUDGET: Final = 256 * MiB
REPLY_BUDGET: Final = 256 * MiB
# At shutdown (or when an export is removed) its clients finish what they
# sent; one that takes none of its replies is closed after this long.
DRAIN_TIMEOUT: Final = 10.0
# How often a spent REPLY_BUDGET is counted again while a READ waits for it.
REPLY_RECOUNT: Final = 0.5


class Budget:
    """Bytes the process holds for its clients, shared by every connection.

    Each holder (a connection) says how many bytes it holds now
    (:meth:`hold`); the budget keeps the total.  A holder that finds the
    budget spent asks to be woken (:meth:`wait`) and is called back, in the
    order the waiters came, once the total has fallen back under the limit.
    The check is made before more is taken on, so the total may pass the
    limit by what one step takes.

    The oldest holder (:meth:`exempt`) never has to wait: if every holder
    waited for the others to give bytes back, none would, and the bytes
    are given back by finishing what was begun.  When it lets go, the next
    oldest is woken.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a budget of {limit} bytes")
        self.limit = limit
        self.total = 0
        self._held: dict[object, int] = {}
        self._waiters: OrderedDict[object, Callable[[], object]] = OrderedDict()

    def hold(self, holder: object, nbytes: int) -> None:
        """``holder`` holds ``nbytes`` now (0: nothing); wakes waiters if that freed room."""
        before = self._held.get(holder, 0)
        if nbytes:
            self._held[holder] = nbytes  # in place: a holder keeps its age while it holds
        elif before:
            del self._held[holder]
        self.total += nbytes - before
        if nbytes < before:
            self._wake()

    def fits(self, nbytes: int = 0) -> bool:
        """Whether ``nbytes`` more may be taken on now (nobody waiting ahead counts too)."""
        return self.total + nbytes <= self.limit

    @property
    def pressed(self) -> bool:
        """Whether anyone is waiting for room."""
        return bool(self._waiters)

    def exempt(self, holder: object) -> bool:
        """Whether ``holder`` is the oldest holder, which goes on however full the budget."""
        return next(iter(self._held), None) is holder

    def wait(self, holder: object, wake: Callable[[], object]) -> None:
        """Call ``wake()`` once there is room again (once; a second wait replaces the first)."""
        self._waiters[holder] = wake

    def forget(self, holder: object) -> None:
        """``holder`` is gone: it holds nothing and waits for nothing."""
        self._waiters.pop(holder, None)
        self.hold(holder, 0)

    def _wake(self) -> None:
        """Wake, once, whoever waits now; one that still finds no room waits again."""
        if self._waiters and self.total < self.limit:
            waiters, self._waiters = self._waiters, OrderedDict()
            for wake in waiters.values():
                wake()
        oldest = next(iter(self._held), None)
        if oldest in self._waiters:
            self._waiters.pop(oldest)()
