"""What the migration source needs of the export's client connections.

The source does not touch client connections itself: the serve side
implements :class:`ClientGate` over them, and the source calls it at the
switchover and for auto-converge.  The contract, in the order of a
migration:

- :meth:`~ClientGate.set_write_cap` while passes run: a cap (bytes per
  second) on client writes, or None for no cap.  Clients see slower writes,
  never errors.
- :meth:`~ClientGate.hold` on entering ``quiescing``: from now on client
  requests are *held* (queued, neither failed nor answered, the connections
  kept open), and the Deferred fires once every client write dispatched
  before the hold has reached the image and marked the dirty map.  Only
  then can the last pass be planned without losing a write.  ``hold`` is
  called at most once per switchover; the Deferred never errbacks.
- Then exactly one of:

  * :meth:`~ClientGate.release`: the switchover did not happen (a failure,
    ``break``, the commit refused, or a mirror into a plain NBD server that
    keeps the image here): held requests are dispatched in order, new ones
    flow again.  Releasing while the hold's Deferred has not fired yet is
    allowed; the Deferred may then fire or not, and the source ignores it.
  * :meth:`~ClientGate.disconnect_all`: the destination took the image;
    held requests are dropped unanswered and every client is disconnected
    (a later issue moves them instead).

- :attr:`~ClientGate.longest_hold`: the longest any request has been held
  by this gate so far, in seconds (0.0 if none was), which becomes the
  status field ``last_downtime_ms``.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

__all__ = ["ClientGate"]


class ClientGate(Protocol):
    """Holds, releases and throttles the client requests of one export."""

    def hold(self) -> Deferred[None]:
        """Hold client requests; fires once writes already in flight have landed."""
        ...

    def release(self) -> None:
        """Stop holding: dispatch what was held, admit new requests."""
        ...

    def disconnect_all(self, reason: str) -> None:
        """The image is someone else's now: drop what is held and disconnect every client."""
        ...

    @property
    def longest_hold(self) -> float:
        """Seconds: the longest time one request was held (0.0 when none was)."""
        ...

    def set_write_cap(self, bytes_per_second: int | None) -> None:
        """Auto-converge: cap client writes at this rate; None lifts the cap."""
        ...
