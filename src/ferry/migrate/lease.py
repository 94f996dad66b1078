"""What a migration source needs of the lease on its image.

``ferry.lease.LeaseManager`` is one.  The source offers the lease once the
last pass is flushed (``prepare_migrate``; the answer is the fencing token
the commit carries), completes the hand-over when the destination
acknowledges, takes the lease back when the destination refuses, and, when
the acknowledgement is lost, asks the lockspace who owns the image
(``resolve_in_doubt``): the lease, not a guess, settles ``in_doubt``.
Before a migration starts, whoever else holds the lease (``inquire``) may
block it (:mod:`ferry.migrate.blockers`).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred

from ferry.lease.backend import Holder
from ferry.lease.manager import InDoubtOutcome

__all__ = ["InDoubtOutcome", "OutgoingLease"]


class OutgoingLease(Protocol):
    @property
    def resource(self) -> str:
        """The lease's name, sent to the destination so that it takes over the same one."""
        ...

    @property
    def state(self) -> str: ...

    @property
    def owner(self) -> str:
        """Who this holder is (``HOST:PID:EXPORT``): any other holder is someone else."""
        ...

    @property
    def holds(self) -> bool: ...

    @property
    def holders(self) -> tuple[Holder, ...]:
        """The holders the lockspace named last (see ``inquire``)."""
        ...

    def inquire(self) -> Deferred[tuple[Holder, ...]]:
        """Ask the lockspace who holds the lease now (a shared holder blocks a migration)."""
        ...

    def prepare_migrate(self) -> Deferred[int]: ...

    def cancel_migrate_out(self) -> Deferred[Any]: ...

    def complete_migrate_out(self) -> Deferred[None]: ...

    def resolve_in_doubt(self) -> Deferred[InDoubtOutcome]: ...

    def release(self) -> Deferred[None]: ...
