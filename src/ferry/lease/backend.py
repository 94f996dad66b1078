"""What a lockspace is to ferry: the value objects and the one backend interface.

A *resource* is a name (by default an image's absolute path); a *holder* is
one process's claim on it, in a mode, stamped with a *fencing token*.  The
token is the whole point: it is a number that strictly increases every time
exclusive control of a resource changes hands, so anything downstream (the
migration commit, a storage target) can refuse a holder whose token is not
the newest one it has seen.

Backends (``local:DIR``, ``etcd:URL``) implement :class:`LeaseBackend`.  Every
method returns a ``Deferred`` and never blocks the reactor, so the lease
manager above them is one piece of Twisted code for both.  A backend is
stateless about *policy*: it does not decide when to renew or when to fence;
the manager does, on its injected clock.

Migration needs two operations an ordinary lock does not have:

* :meth:`LeaseBackend.offer` -- the source, quiesced and flushed, marks its
  exclusive lease as being handed over.  It still holds it: nobody else can
  acquire it; only :meth:`take_over` with the offered token can move it.
* :meth:`LeaseBackend.take_over` -- the destination takes an exclusive lease
  *by its token*: it succeeds only if the resource is still held (or offered)
  under exactly that token, and the result carries a new, larger token.  If
  the source took it back meanwhile (a cancelled migration) the token no
  longer matches and the destination gets :class:`LeaseConflict`, so the two
  can never both end up holding it.  The source uses the same call with its
  own offered token to cancel an offer.

A takeover on one host (``ferry serve --takeover``: an upgrade) needs a third
way, :class:`PassingBackend`: the grant does not change hands in the
lockspace at all.  The old process describes it (:meth:`~PassingBackend.pass_on`:
for a local lock file, the descriptor whose open file description holds the
locks; for etcd, the lease ID and token), the new one keeps it
(:meth:`~PassingBackend.adopt`: the same grant, the same token) and the old
one forgets it without releasing it (:meth:`~PassingBackend.let_go`).  To the
lockspace there is one holder throughout, never two and never none, so no
third party can slip in between; which of the two processes may write is
settled between them (``ferry.takeover``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

__all__ = [
    "Grant",
    "Holder",
    "LeaseBackend",
    "LeaseConflict",
    "LeaseError",
    "LeaseLost",
    "LeaseMode",
    "LockspaceUnavailable",
    "PassedGrant",
    "PassingBackend",
    "in_holder_order",
]


class LeaseMode(enum.Enum):
    """How a holder uses the resource.

    ``exclusive`` excludes every other holder.  ``shared`` and ``readonly``
    holders coexist with each other and exclude an exclusive one (as in
    libvirt's lock manager, where a read-only disk never blocks a reader).
    """

    EXCLUSIVE = "exclusive"
    SHARED = "shared"
    READONLY = "readonly"


@dataclass(frozen=True)
class Holder:
    """One claim on a resource, as :meth:`LeaseBackend.inquire` reports it.

    ``owner`` is an identity an operator can read (``host:pid:label``).
    ``token`` is the fencing token; for shared and read-only holders it is
    informative only.  ``offered`` is true while an exclusive holder is
    handing the resource over (between :meth:`~LeaseBackend.offer` and
    :meth:`~LeaseBackend.take_over`).
    """

    owner: str
    mode: LeaseMode
    token: int
    offered: bool = False

    def describe(self) -> str:
        """One phrase for error messages and ``ferry lock status``."""
        state = ", offered for migration" if self.offered else ""
        return f"{self.owner} ({self.mode.value}, token {self.token}{state})"


def in_holder_order(holders: Iterable[Holder]) -> tuple[Holder, ...]:
    """Holders in the order every lockspace reports them: the exclusive one first, then by owner.

    One order for both backends, so ``inquire`` and ``ferry lock status``
    answer alike whichever slot or key a holder happened to take.
    """
    return tuple(sorted(holders, key=lambda h: (h.mode is not LeaseMode.EXCLUSIVE, h.owner)))


@dataclass(frozen=True)
class Grant:
    """What a successful acquire or take-over hands back: proof of holding.

    ``ttl`` is how long the backend honours the grant without a renewal
    (``None``: as long as this process lives, as with a local file lock).
    ``handle`` is the backend's own reference (an etcd lease ID, a file
    descriptor number); callers only pass the grant back.
    """

    resource: str
    holder: Holder
    ttl: float | None
    handle: int = 0

    @property
    def token(self) -> int:
        return self.holder.token


class LeaseError(Exception):
    """A lease operation that did not happen, and why, in one line."""


class LeaseConflict(LeaseError):
    """Someone else holds the resource in a mode that excludes the request."""

    def __init__(self, resource: str, holders: tuple[Holder, ...], reason: str = "") -> None:
        self.resource = resource
        self.holders = holders
        named = ", ".join(h.describe() for h in holders) or "nobody"
        super().__init__(reason or f"lease on {resource} is held by {named}")


class LeaseLost(LeaseError):
    """The backend no longer has this grant: expired, taken over, or removed."""


class LockspaceUnavailable(LeaseError):
    """The lockspace cannot be reached or used (etcd down, directory missing)."""


class LeaseBackend(Protocol):
    """A lockspace.  Every call answers with a ``Deferred``; none blocks.

    Failures are :class:`LeaseConflict`, :class:`LeaseLost` or
    :class:`LockspaceUnavailable`; nothing else escapes for an expected
    condition.
    """

    @property
    def spec(self) -> str:
        """The ``--lockspace`` text that names this backend (for status and errors)."""
        ...

    def acquire(self, resource: str, owner: str, mode: LeaseMode) -> Deferred[Grant]:
        """Take the lease now, or fail with :class:`LeaseConflict` naming the holders.

        Never waits for a holder to go away; a caller that wants to wait
        retries.  An exclusive acquire gets a token larger than any earlier
        exclusive token of this resource.
        """
        ...

    def renew(self, grant: Grant) -> Deferred[None]:
        """Keep the grant alive for another ``ttl`` (a no-op check for ``ttl=None``).

        Fails with :class:`LeaseLost` if the backend no longer has this exact
        grant, and with :class:`LockspaceUnavailable` if it cannot tell.
        """
        ...

    def release(self, grant: Grant) -> Deferred[None]:
        """Give the lease up.  Releasing a grant that is already gone succeeds."""
        ...

    def inquire(self, resource: str) -> Deferred[tuple[Holder, ...]]:
        """Who holds the resource now (empty: nobody)."""
        ...

    def offer(self, grant: Grant) -> Deferred[Grant]:
        """Mark an exclusive grant as being handed over; the answer is the updated grant.

        The holder keeps holding (and renewing) it; only :meth:`take_over`
        with ``grant.token`` can move it from here.
        """
        ...

    def take_over(self, resource: str, owner: str, token: int) -> Deferred[Grant]:
        """Take the exclusive lease held or offered under ``token``; a new, larger token.

        Fails with :class:`LeaseConflict` if the resource's current token is
        not ``token`` (someone took it back or took it first).
        """
        ...

    def publish(self, grant: Grant, address: str) -> Deferred[None]:
        """Record that the holder of ``grant`` serves the resource at ``address`` (HOST:PORT).

        Only while ``grant`` is the resource's current exclusive grant (else
        :class:`LeaseLost`); the record goes with the grant.  A ``ferry
        proxy`` finds a migrated image by it (:meth:`where`).
        """
        ...

    def where(self, resource: str) -> Deferred[list[str]]:
        """The address the resource's current exclusive holder published (empty: none)."""
        ...

    def watch(self, grant: Grant, on_lost: Callable[[str], None]) -> Callable[[], None]:
        """Call ``on_lost(reason)`` once if the backend sees the grant go.

        The answer stops watching.  Backends that cannot notice a loss
        without being asked (a local lock) may rely on :meth:`renew`
        instead and return a no-op.
        """
        ...

    def close(self) -> Deferred[None]:
        """Drop connections and files; grants still held are released by the backend's rules."""
        ...


@dataclass(frozen=True)
class PassedGrant:
    """A grant on its way to a successor process on this host (``ferry serve --takeover``).

    ``grant`` is the grant as its holder knows it; ``detail`` is what the
    backend needs besides to recognise it (a local lock file's grant id and
    slot; nothing for etcd, whose grant is its lease ID and token); ``fd``
    is the descriptor that holds it, for a backend whose grant lives in
    one (a local lock file's), or None.  ``valid_for`` is how many seconds
    the grant was still good for when it was described (None: no TTL): the
    successor counts them from *before* it asked, so its deadline is never
    later than the predecessor's.
    """

    grant: Grant
    detail: Mapping[str, Any] = field(default_factory=dict)
    fd: int | None = None
    valid_for: float | None = None


@runtime_checkable
class PassingBackend(Protocol):
    """A lockspace whose grants can be handed to another process on this host as they are.

    None of these asks the lockspace anything: the grant stays exactly what
    it is, under the same token, so the lockspace sees one holder throughout.
    """

    def pass_on(self, grant: Grant) -> PassedGrant:
        """Describe ``grant`` for a successor; nothing changes (it is still held here)."""
        ...

    def let_go(self, grant: Grant) -> None:
        """Forget ``grant`` without releasing it: the successor holds it now."""
        ...

    def adopt(self, passed: PassedGrant) -> Grant:
        """Keep a grant a predecessor passed on (this process's grant from now on).

        Raises :class:`LeaseLost` if it is not the grant it says it is (a
        local lock file replaced, its record overwritten), or
        :class:`LeaseError` if this backend cannot keep it.  On success a
        descriptor in ``passed`` belongs to the backend; on failure it is
        still the caller's.
        """
        ...
