"""A listening node's lease-to-be: which lease a migration's commit takes over, and taking it.

The destination of a migration must end up holding the *source's* lease:
the one whose token the commit carries.  The source names it in
``FERRY_OPT_MIGRATE``; a listener told ``--resource NAME`` takes over only
that lease (and refuses a source holding another at the option, before a
byte is copied); one told nothing takes over whatever the source names, so
two hosts reaching one image by different paths still agree.  A source
holding no lease (``--lockspace none``) hands over nothing: the destination
then acquires a lease of its own, under its own name, before it acknowledges.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred

from ferry.lease.backend import LeaseConflict
from ferry.lease.manager import LeaseManager

__all__ = ["IncomingLease"]

MakeLease = Callable[[str], LeaseManager]


class IncomingLease:
    """Builds the lease a commit takes over, registered ``incoming`` when its name is known."""

    def __init__(
        self,
        make: MakeLease,
        *,
        resource: str | None,
        fallback: str,
        on_taken: Callable[[LeaseManager], None],
    ) -> None:
        self._make = make
        self.resource = resource  # None: whatever the source names
        self._fallback = fallback  # ours when the source holds no lease
        self._on_taken = on_taken
        self.manager: LeaseManager | None = None
        if resource is not None:
            self.manager = self._incoming(resource)

    @property
    def state(self) -> str:
        return "incoming" if self.manager is None else self.manager.state

    @property
    def token(self) -> int | None:
        return None if self.manager is None else self.manager.token

    def may_write(self) -> bool:
        return self.manager is not None and self.manager.may_write()

    def refusal(self, source_resource: str) -> str | None:
        """Why a source holding ``source_resource`` cannot migrate here (None: it can)."""
        if self.resource is None or not source_resource or source_resource == self.resource:
            return None
        return (
            f"this listener takes over the lease {self.resource!r}; "
            f"the source holds {source_resource!r}"
        )

    def take_over(self, source_resource: str, token: int) -> Deferred[LeaseManager]:
        """Take the source's lease by the commit's ``token`` (or a fresh one if it has none).

        Every way this can fail is a failed Deferred, never an exception:
        the commit that asked must be answered, whatever went wrong.
        """
        return defer.maybeDeferred(self._take_over, source_resource, token)

    def _take_over(self, source_resource: str, token: int) -> Deferred[LeaseManager]:
        why = self.refusal(source_resource)
        if why is not None:
            raise LeaseConflict(source_resource, (), why)
        if source_resource:
            name = self.resource or source_resource
            manager = self.manager
            if manager is None or manager.resource != name or manager.state != "incoming":
                manager = self.manager = self._incoming(name)
            taking = manager.acquire_incoming(token)
        else:
            # The source holds no lease: this node takes one of its own, in a
            # manager of its own, and the incoming one (if any) stays ready
            # for the next commit until this one is taken.
            manager = self._make(self.resource or self._fallback)
            manager.register()
            taking = manager.acquire()
            taking.addErrback(self._discard, manager)

        def taken(_: object) -> LeaseManager:
            previous, self.manager = self.manager, manager
            if previous is not None and previous is not manager and previous.state == "incoming":
                previous.cancel_migrate_in()  # the source's lease never came: stop waiting
            self._on_taken(manager)
            return manager

        return taking.addCallback(taken)

    @staticmethod
    def _discard(failure: object, manager: LeaseManager) -> object:
        """A lease of our own that could not be had: its machine ends here."""
        manager.shutdown()
        return failure

    def _incoming(self, name: str) -> LeaseManager:
        manager = self._make(name)
        manager.register(incoming=True)
        return manager
