"""Bugs planted in the simulator's own doubles, so that a test can prove the checks still bite.

A simulator that stopped checking would pass every seed; so would one whose
faults never reach the windows that matter.  Each bug here is switched on
by ``--bug NAME`` and lives only in a subclass or a wrapper the simulator
builds -- never in a code path ``ferry serve`` runs -- and
``tests/unit/test_sim.py`` asserts that each is caught within a bounded
number of seeds.

* ``ack-before-fsync``: the destination answers its migration sender's
  FLUSH and commit as soon as it is asked, and syncs afterwards (its
  ``run_blocking`` answers a flush of the image at once while the role
  is receiving or committing, and runs it later);
* ``release-before-ack``: the source releases its lease as soon as it has
  offered it, before the destination's acknowledgement (a wrapper around
  the lease the migration hands over);
* ``skip-last-pass``: the source's last pass copies nothing (the dirty map
  is cleared before the final pass is planned);
* ``ignore-token``: the destination takes the lease over whatever token
  its commit carries (a wrapper around its lockspace backend: a take-over
  refused for its token is made again with the holder's own token, or as
  an acquire when nobody holds the lease).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ferry.lease.backend import Grant, Holder, LeaseBackend, LeaseConflict, LeaseMode
from ferry.lease.manager import LeaseManager
from ferry.migrate.lease import OutgoingLease
from ferry.migrate.options import Destination, MirrorOptions, StartOutcome
from ferry.serve.export import RECEIVING_STATES, Export
from ferry.sim.mirrors import WatchedMirrors

__all__ = ["BUGS", "backend", "mirror_manager", "outgoing_lease", "run_blocking"]

BUGS: Final = ("ack-before-fsync", "release-before-ack", "skip-last-pass", "ignore-token")

RunBlocking = Callable[[Callable[[], object]], "Deferred[Any]"]


def run_blocking(bug: str | None, export: Export, real: RunBlocking) -> RunBlocking:
    """A process's worker threads; ``ack-before-fsync`` answers the sender's before syncing."""
    if bug != "ack-before-fsync":
        return real

    def answer_first(work: Callable[[], object]) -> Deferred[Any]:
        # Only the flush: the data plane's batches of writes need their results.
        if export.state not in RECEIVING_STATES or work != export.image.flush:
            return real(work)
        real(work).addErrback(lambda _: None)  # the sync happens, later, whatever it says
        done: Deferred[Any] = Deferred()
        done.callback(None)
        return done

    return answer_first


class _SkipsLastPass(WatchedMirrors):
    """``skip-last-pass``: the final pass is planned from a dirty map cleared first."""

    def _start(self, destination: Destination, options: MirrorOptions) -> Deferred[StartOutcome]:
        started = super()._start(destination, options)
        assert self.current is not None
        job = self.current.job
        plan_final_pass = job.start_final_pass

        def skip_it() -> Any:
            job.dirty.snapshot_and_clear()
            return plan_final_pass()

        job.start_final_pass = skip_it  # type: ignore[method-assign]
        return started


def mirror_manager(bug: str | None) -> type[WatchedMirrors]:
    return _SkipsLastPass if bug == "skip-last-pass" else WatchedMirrors


class _ReleasesBeforeAck:
    """``release-before-ack``: the lease, released the moment its offer is answered."""

    def __init__(self, lease: LeaseManager) -> None:
        self._lease = lease

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lease, name)  # all but prepare_migrate, as they are

    def prepare_migrate(self) -> Deferred[int]:
        def release_now(token: int) -> int:
            self._lease.release().addErrback(lambda _: None)
            return token

        return self._lease.prepare_migrate().addCallback(release_now)


def outgoing_lease(bug: str | None, lease: LeaseManager) -> OutgoingLease:
    """The lease a migration of this process hands over."""
    if bug == "release-before-ack":
        return cast(OutgoingLease, _ReleasesBeforeAck(lease))
    return lease


class _IgnoresToken:
    """``ignore-token``: a lockspace backend whose take-over does not care for the token."""

    def __init__(self, real: LeaseBackend) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def take_over(self, resource: str, owner: str, token: int) -> Deferred[Grant]:
        real = self._real

        def anyway(failure: Failure) -> Deferred[Grant]:
            if not isinstance(failure.value, LeaseConflict):
                return defer.fail(failure)

            def steal(holders: tuple[Holder, ...]) -> Deferred[Grant]:
                held = [h for h in holders if h.mode is LeaseMode.EXCLUSIVE]
                if held:
                    return real.take_over(resource, owner, held[0].token)
                return real.acquire(resource, owner, LeaseMode.EXCLUSIVE)

            return real.inquire(resource).addCallback(steal)

        return real.take_over(resource, owner, token).addErrback(anyway)


def backend(bug: str | None, mode: str, real: LeaseBackend) -> LeaseBackend:
    """A process's lockspace backend; ``ignore-token`` wraps a listening process's."""
    if bug == "ignore-token" and mode == "listen":
        return cast(LeaseBackend, _IgnoresToken(real))
    return real
