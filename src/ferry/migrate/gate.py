"""What the migration source needs of the export's client connections.

The source does not touch client connections itself, and it does not hold
or release them either: the export's role does.  While the role is in a
state with ``clients_held`` (``quiescing``, ``handing_off``, ``in_doubt``;
the migration chart's effects put it there), client requests are *held* --
queued, neither failed nor answered, the connections kept open and no
longer read -- and every transition out of such a state lets them go on.
What is left for the source, in the order of a migration:

- :meth:`~ClientGate.set_write_cap` while passes run: a cap (bytes per
  second) on client writes, or None for no cap.  Clients see slower writes,
  never errors.
- :meth:`~ClientGate.writes_landed` on entering ``quiescing``: fires once
  every client write dispatched before the hold has reached the image and
  marked the dirty map.  Only then can the last pass be planned without
  losing a write.  Never errbacks.
- :attr:`~ClientGate.clients` at the commit: the connections that may move
  with the image (``ferry.migrate.carry``).
- :meth:`~ClientGate.disconnect_all` once the destination has the image:
  held requests are dropped unanswered and every client still here (those
  that could not move) is disconnected.
- :attr:`~ClientGate.longest_hold`: the longest any request has been held
  so far, in seconds (0.0 if none was), which becomes the status field
  ``last_downtime_ms``.

``ferry.serve.export.Export`` is the real gate.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from ferry.serve.export import Attached

__all__ = ["ClientGate"]


class ClientGate(Protocol):
    """Throttles, drains and ends the client requests of one export."""

    def writes_landed(self) -> Deferred[None]:
        """Fires once client writes already dispatched have landed in the image."""
        ...

    def disconnect_all(self, reason: str) -> None:
        """The image is someone else's now: drop what is held and disconnect every client."""
        ...

    @property
    def clients(self) -> list[Attached]:
        """The client connections in transmission."""
        ...

    @property
    def longest_hold(self) -> float:
        """Seconds: the longest time one request was held (0.0 when none was)."""
        ...

    def set_write_cap(self, bytes_per_second: int | None) -> None:
        """Auto-converge: cap client writes at this rate; None lifts the cap."""
        ...
