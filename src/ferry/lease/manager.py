"""The lease manager: one holder's lease on one resource, kept, fenced and handed over.

It is libvirt's ``virLockManager`` lifecycle (register, acquire, release,
inquire, and the migration hand-over) on Twisted, driving the lease machine
(``statecharts/lease.yaml``).  What a state *means* -- whether the grant is
ours, whether I/O may touch the image -- is read from that YAML, never
kept in flags beside it.

Keeping the lease
-----------------
A keep-alive renews every ``ttl / 3`` (a grant without a TTL, a local file
lock, is checked every :data:`CHECK_INTERVAL` seconds instead: only a
renewal notices that its lock file was removed or taken over).  The holder
keeps a local *deadline*: the clock time at which the last renewal that
succeeded was **sent**, plus ``ttl``, minus a ``margin``.  Counting from the
send, not the answer, is what makes it safe: the backend started its new
TTL no earlier than the request left.  Until the deadline, writes may go
on even while renewals fail (``renew_failed``); at the deadline the lease is
``fenced`` and ``on_fenced(reason)`` is called, once.  A definite loss
(``LeaseLost`` from a renewal or from the backend's watch) fences at once.

:meth:`LeaseManager.may_write` is on the data plane's hot path: it checks
the state's ``may_write`` (cached on each transition) *and* that the clock
is still before the deadline, so a process stopped past its TTL (SIGSTOP,
a VM paused, a long GC) refuses its first write on resuming, before any of
its timers has had a chance to run.

The margin
----------
Default ``max(0.5 s, ttl / 5)``, never more than ``ttl / 2``.  It pays for
what happens *after* ``may_write`` said yes: a write admitted an instant
before the deadline must reach the disk before the backend could let
anyone else in, and disk latency under load is tens to hundreds of
milliseconds, hence the half-second floor.  Scaling with the TTL keeps two
renewal attempts inside every deadline (renewals at ttl/3 and 2ttl/3, the
deadline at 4ttl/5) and absorbs clock-rate drift between this host and the
lockspace, which grows with the interval.  The ``ttl / 2`` cap keeps a
short test TTL usable.

Migration
---------
Source: :meth:`~LeaseManager.prepare_migrate` (quiesced and flushed) stops
writes and offers the grant; its answer is the token for the commit.  Then
exactly one of :meth:`~LeaseManager.complete_migrate_out` (the destination
acknowledged), :meth:`~LeaseManager.cancel_migrate_out` (take it back by
that token) or, when the acknowledgement was lost,
:meth:`~LeaseManager.resolve_in_doubt`.  Destination:
``register(incoming=True)``, then :meth:`~LeaseManager.acquire_incoming`
with the commit's token, and :meth:`~LeaseManager.may_write` once more
before it acknowledges.

Passing it on (``ferry serve --takeover``): the old process calls
:meth:`~LeaseManager.hand_on` (writes stop; the answer describes the grant
for the new process, with how long it is still good for), then
:meth:`~LeaseManager.keep` or :meth:`~LeaseManager.passed_on`; the new
process's manager takes the grant its backend kept with
:meth:`~LeaseManager.adopt`.  The lockspace is not asked: see ``lease.yaml``.

A loss of the grant while it is offered is judged rather than assumed: the
destination's take-over *is* a loss of the source's grant.  If an exclusive
holder now has a larger token and the local deadline has not passed, the
backend was still honouring our grant, so only a take-over by our token can
explain it: the lease was ``taken_over`` (released, not fenced).  See the
essay at the top of ``lease.yaml``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry import statecharts
from ferry.chartnames import LeaseTrigger
from ferry.clock import Clock, DelayedCall
from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseBackend,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    PassedGrant,
    PassingBackend,
)

if TYPE_CHECKING:
    from ferry.trace import Tracer

__all__ = [
    "CHECK_INTERVAL",
    "MIN_MARGIN",
    "InDoubtOutcome",
    "LeaseManager",
    "LeaseStateError",
    "default_margin",
]

_log = Logger()
_T = TypeVar("_T")

CHECK_INTERVAL: Final = 5.0
"""Seconds between checks of a grant without a TTL (a local file lock)."""

MIN_MARGIN: Final = 0.5
"""The smallest margin: a write admitted before the deadline needs time to land."""


def default_margin(ttl: float) -> float:
    """How long before the backend's TTL ends this holder stops writing (see the module doc)."""
    return min(max(MIN_MARGIN, ttl / 5), ttl / 2)


class InDoubtOutcome(enum.Enum):
    """Who owns the image after :meth:`LeaseManager.resolve_in_doubt`.

    The values are the role machine's ``resolve_<value>`` triggers.
    """

    HANDED_OFF = "handed_off"
    """The token moved on: the destination took the lease; never write again."""
    SERVING = "serving"
    """Nobody took it: the source took it back (a new token) and serves on."""


class LeaseStateError(LeaseError):
    """The operation is not legal in the lease's current state (a caller's mistake)."""


class _LeaseModel:
    """What the lease machine drives; ``transitions`` adds ``state`` and the triggers."""

    state: str


class LeaseManager:
    """One lease: its machine, its grant, its keep-alive and its deadline.

    Operations that talk to the backend answer with a ``Deferred``; calling
    one in a state where it is not legal raises :class:`LeaseStateError` at
    once.  ``on_fenced(reason)`` is called exactly once if the lease is lost
    or expires while it is ours; a migration out is not a fence.
    """

    def __init__(
        self,
        backend: LeaseBackend,
        *,
        resource: str,
        owner: str,
        mode: LeaseMode = LeaseMode.EXCLUSIVE,
        clock: Clock,
        tracer: Tracer | None = None,
        on_fenced: Callable[[str], object] | None = None,
        margin: float | None = None,
        instance: str | None = None,
    ) -> None:
        if margin is not None and not margin >= 0:
            raise ValueError(f"margin must be a number of seconds >= 0, not {margin!r}")
        self.resource = resource
        self.owner = owner
        self.mode = mode
        self._backend = backend
        self._clock = clock
        self._on_fenced = on_fenced
        self._margin = margin
        self._chart = statecharts.load("lease")
        self._model = _LeaseModel()
        statecharts.build(
            self._chart, self._model, instance=instance or resource, tracer=tracer, clock=clock
        )
        self._writable = False
        self._grant: Grant | None = None
        # Bumped for every new grant (and when one ends), so the answer to a
        # request made for an earlier grant is recognised and ignored.
        self._epoch = 0
        self._deadline = -math.inf
        self._keepalive: LoopingCall | None = None
        self._expiry: DelayedCall | None = None
        self._unwatch: Callable[[], None] | None = None
        self._renewal_epoch: int | None = None  # the epoch of the renewal in flight
        self._judging_loss = False
        self._fence_reported = False
        # While our own take-back is in flight, the backend reports the
        # offered grant as lost (it is: the take-back replaces it).  Such a
        # loss is held here and judged only if the take-back fails.
        self._reclaiming = False
        self._loss_while_reclaiming: str | None = None
        self._handed_over = False  # released because the destination has it
        self._holders: tuple[Holder, ...] = ()
        # Where this node serves the resource (HOST:PORT), published with
        # every grant it holds, for a ferry proxy to find (see _publish).
        self.serving_address: str | None = None
        self.last_error: str | None = None
        """The last thing that went wrong with the lockspace (for status and logs)."""
        self.reason: str | None = None
        """Why the lease ended (released, fenced, handed over); None while it has not."""

    # -- what status shows ------------------------------------------------------

    @property
    def state(self) -> str:
        return self._model.state

    @property
    def token(self) -> int | None:
        """The fencing token of the grant this holder has (or offered); None without one."""
        return None if self._grant is None else self._grant.token

    @property
    def grant(self) -> Grant | None:
        return self._grant

    @property
    def deadline(self) -> float | None:
        """Clock time at which writes stop unless renewed; ``inf`` without a TTL; None unheld."""
        return self._deadline if self.holds else None

    @property
    def holders(self) -> tuple[Holder, ...]:
        """The holders last reported by the lockspace (an inquire, or a conflict's answer)."""
        return self._holders

    @property
    def holds(self) -> bool:
        return self._is("holds")

    def may_write(self) -> bool:
        """Whether I/O under this lease may touch the image now: the state, and the deadline."""
        return self._writable and self._clock.seconds() < self._deadline

    # -- registering and acquiring ----------------------------------------------

    def register(self, *, incoming: bool = False) -> None:
        """Name the resource's role: an ordinary holder, or (``incoming``) a destination."""
        self._fire(LeaseTrigger.REGISTER_INCOMING if incoming else LeaseTrigger.REGISTER)

    def acquire(self) -> Deferred[Grant]:
        """Take the lease (registered -> acquiring -> held, or back to registered)."""
        self._fire(LeaseTrigger.ACQUIRE)
        sent_at = self._clock.seconds()
        d = self._backend.acquire(self.resource, self.owner, self.mode)
        return d.addCallbacks(
            self._granted,
            self._refused,
            callbackArgs=(sent_at, LeaseTrigger.ACQUIRED),
            errbackArgs=(LeaseTrigger.ACQUIRE_FAILED,),
        )

    def acquire_incoming(self, token: int) -> Deferred[Grant]:
        """The destination takes the lease by the token the migration commit carried."""
        self._require_exclusive("take a lease over")
        self._fire(LeaseTrigger.TAKE_OVER)
        sent_at = self._clock.seconds()
        d = self._backend.take_over(self.resource, self.owner, token)
        return d.addCallbacks(
            self._granted,
            self._refused,
            callbackArgs=(sent_at, LeaseTrigger.ACQUIRED),
            errbackArgs=(LeaseTrigger.TAKE_OVER_FAILED,),
        )

    def cancel_migrate_in(self) -> Deferred[None]:
        """The destination gives up: before the take-over, stop waiting; after it, release.

        Harmless once the lease has ended.  Not legal while the take-over is
        in flight (wait for its answer) or on a lease that never was incoming.
        """
        if self._can(LeaseTrigger.CANCEL_INCOMING):
            self._fire(LeaseTrigger.CANCEL_INCOMING)
            self._end("migration in cancelled before its commit")
            return defer.succeed(None)
        if self.holds:
            return self.release()
        if self._is("ended"):
            return defer.succeed(None)
        raise LeaseStateError(f"cannot cancel a migration in while the lease is {self.state}")

    def inquire(self) -> Deferred[tuple[Holder, ...]]:
        """Who holds the resource now, as the lockspace says; remembered in :attr:`holders`."""
        d = self._backend.inquire(self.resource)
        return d.addCallback(self._remember_holders)

    # -- the source's side of a migration ------------------------------------------

    def prepare_migrate(self) -> Deferred[int]:
        """Stop writing and offer the lease; the answer is the token to put in the commit.

        Call it quiesced and flushed: writes stop (``transferring``) before
        the offer is sent.  If the offer fails the lease is held again, or
        fenced if the failure says it is lost.
        """
        self._require_exclusive("migrate")
        self._fire(LeaseTrigger.PREPARE_MIGRATE)
        grant, epoch = self._current()
        d = self._backend.offer(grant)

        def offered(updated: Grant) -> int:
            if epoch != self._epoch or not self._is("offered"):
                raise LeaseStateError(f"lease on {self.resource} became {self.state} meanwhile")
            self._grant = updated
            return updated.token

        def not_offered(failure: Failure) -> Failure:
            if epoch == self._epoch and self._is("offered"):
                if isinstance(failure.value, LeaseLost):
                    self._fence(LeaseTrigger.LOST, f"lost while offering it: {failure.value}")
                else:
                    self._note_error(failure)
                    self._fire(LeaseTrigger.OFFER_FAILED)
            return failure

        return d.addCallbacks(offered, not_offered)

    def cancel_migrate_out(self) -> Deferred[Grant]:
        """The source takes its offered lease back, by its own token: held again, new token.

        Fails with :class:`LeaseConflict` if the destination took it first;
        the lease is then released (taken over) and this node must not
        serve.  A lockspace that cannot be reached leaves it offered.
        """
        if not self._can(LeaseTrigger.RECLAIMED):
            raise LeaseStateError(f"cannot cancel a migration of a lease that is {self.state}")
        old, epoch = self._current()
        sent_at = self._clock.seconds()
        self._reclaiming, self._loss_while_reclaiming = True, None
        d = self._backend.take_over(self.resource, self.owner, old.token)
        d.addBoth(self._reclaim_answered)

        def reclaimed(grant: Grant) -> Grant:
            if epoch != self._epoch or not self._is("offered"):
                self._release_quietly(grant)
                raise LeaseStateError(f"lease on {self.resource} became {self.state} meanwhile")
            self._fire(LeaseTrigger.RECLAIMED)
            self._stop_timers()
            self._release_quietly(old)
            self._hold(grant, sent_at)
            return grant

        def not_reclaimed(failure: Failure) -> Any:  # the failure, passed on (maybe later)
            if epoch != self._epoch or not self._is("offered"):
                return failure
            self._note_error(failure)
            if isinstance(failure.value, LeaseConflict):
                self._holders = failure.value.holders
                return self._judge_refused_take_back(epoch, failure)
            if old.ttl is None:
                # No deadline will ever settle it (a local lock file that cannot
                # be used now): whatever it takes, this holder stops here.
                why = f"cannot take the offered lease back: {failure.value}"
                self._fence(LeaseTrigger.LOST, why)
            else:
                self._judge_held_loss(epoch)  # the deadline decides, if nothing else does
            return failure

        return d.addCallbacks(reclaimed, not_reclaimed)

    def _judge_refused_take_back(self, epoch: int, failure: Failure) -> Deferred[Failure]:
        """The take-back was refused: taken over by the destination, or lost for real?

        A conflict proves only that the take-over did not happen now: the
        token may have moved (someone took it over with our offer), or the
        lockspace may be in someone's way.  Only an exclusive holder with a
        larger token, seen before our deadline, is a take-over (released);
        anything else is a loss (fenced).  Either way this holder never
        writes under the offered grant again, and the refusal is passed on.
        """
        token = self.token
        assert token is not None
        reason = f"cannot take the offered lease back: {failure.value}"

        def judge(holders: tuple[Holder, ...]) -> Failure:
            if epoch == self._epoch and self._is("offered"):
                taker = self._newer_holder(holders, token)
                if taker is not None and self._clock.seconds() < self._deadline:
                    self._finish_out(LeaseTrigger.TAKEN_OVER, f"taken over by {taker.describe()}")
                else:
                    self._fence(LeaseTrigger.LOST, reason)
            return failure

        def cannot_tell(_: Failure) -> Failure:
            if epoch == self._epoch and self._is("offered"):
                why = f"{reason}; and the lockspace cannot say who holds it now"
                self._fence(LeaseTrigger.LOST, why)
            return failure

        return self.inquire().addCallbacks(judge, cannot_tell)

    def complete_migrate_out(self) -> Deferred[None]:
        """The destination acknowledged the commit: released, never to write again.

        Already released because the take-over was seen first: nothing to do.
        """
        if self._handed_over:
            return defer.succeed(None)
        if not self._can(LeaseTrigger.MIGRATED_OUT):
            raise LeaseStateError(f"cannot complete a migration of a lease that is {self.state}")
        return self._finish_out(
            LeaseTrigger.MIGRATED_OUT, "handed over to the migration's destination"
        )

    def resolve_in_doubt(self) -> Deferred[InDoubtOutcome]:
        """The commit's ack was lost: find out whether the destination took the lease.

        Asks the lockspace; if an exclusive holder has a larger token the
        destination took it: ``HANDED_OFF`` (and the lease is released).
        Otherwise tries to take it back by the offered token, which the
        lockspace decides atomically: success is ``SERVING`` (held again,
        new token); :class:`LeaseConflict` means the token moved meanwhile,
        ``HANDED_OFF``.  If the lockspace cannot be reached the Deferred
        fails and the lease stays offered: ask again later.
        """
        if self._handed_over:
            return defer.succeed(InDoubtOutcome.HANDED_OFF)
        if not self._is("offered"):
            raise LeaseStateError(f"nothing to resolve: the lease is {self.state}")
        grant, _ = self._current()
        d = self.inquire()

        def judge(holders: tuple[Holder, ...]) -> Deferred[InDoubtOutcome]:
            # (A watch may have seen the take-over while inquire was in flight.)
            if self._handed_over or self._newer_holder(holders, grant.token) is not None:
                return self.complete_migrate_out().addCallback(_outcome, InDoubtOutcome.HANDED_OFF)
            taken_back = self.cancel_migrate_out().addCallback(_outcome, InDoubtOutcome.SERVING)
            return taken_back.addErrback(self._handed_off_if_taken)

        return d.addCallback(judge)

    # -- a takeover on this host ---------------------------------------------------

    @property
    def can_pass_on(self) -> bool:
        """Whether this lease's lockspace can hand its grant to another process as it is."""
        return isinstance(self._backend, PassingBackend)

    def hand_on(self) -> PassedGrant:
        """Stop writing, and describe the grant for a new process on this host.

        held or renew_failed -> passing.  Nothing is asked of the lockspace:
        the grant stays ours (and renewed) until :meth:`passed_on` or
        :meth:`keep`.  ``valid_for`` in the answer is how long the grant is
        good for from now (None without a TTL).
        """
        backend = self._backend
        if not isinstance(backend, PassingBackend):
            raise LeaseStateError(f"{backend.spec} cannot pass a grant to another process")
        if not self._can(LeaseTrigger.PASS_ON):
            raise LeaseStateError(f"cannot pass on a lease that is {self.state}")
        grant, _ = self._current()
        passed = backend.pass_on(grant)
        self._fire(LeaseTrigger.PASS_ON)
        valid_for = None
        if grant.ttl is not None:
            valid_for = max(0.0, self._deadline - self._clock.seconds())
        return PassedGrant(passed.grant, passed.detail, passed.fd, valid_for)

    def keep(self) -> None:
        """The new process did not take it: this holder writes under it again (passing -> held)."""
        if self._can(LeaseTrigger.KEPT):
            self._fire(LeaseTrigger.KEPT)

    def passed_on(self) -> None:
        """The new process holds the grant: forget it here, never write under it again.

        passing -> released, without releasing anything in the lockspace.
        """
        backend = self._backend
        assert isinstance(backend, PassingBackend)
        grant, _ = self._current()
        self._fire(LeaseTrigger.PASSED_ON)
        self._end("handed on to a new process on this host")
        self._handed_over = True
        backend.let_go(grant)

    def adopt(self, grant: Grant, *, valid_until: float | None) -> None:
        """Hold the grant a predecessor passed on, which the backend has kept (``adopt``).

        registered -> held, at once: no lockspace call.  ``valid_until`` is the
        clock time its predecessor's deadline allows (None without a TTL);
        a renewal is sent now, so the deadline soon rests on this
        process's own.
        """
        if grant.resource != self.resource or grant.holder.owner != self.owner:
            raise LeaseStateError(
                f"the grant is {grant.holder.owner}'s on {grant.resource}, "
                f"not {self.owner}'s on {self.resource}"
            )
        self._fire(LeaseTrigger.ADOPTED)
        self._hold(grant, -math.inf, deadline=-math.inf if valid_until is None else valid_until)
        if grant.ttl is not None:
            self._renew_now()

    # -- ending it -----------------------------------------------------------------

    def release(self) -> Deferred[None]:
        """Give the lease up.  Without a grant there is nothing to give: no transition."""
        if self._can(LeaseTrigger.RELEASE):
            grant, _ = self._current()
            self._fire(LeaseTrigger.RELEASE)
            self._end("released")
            return self._backend.release(grant)
        if self._can(LeaseTrigger.ACQUIRED):
            raise LeaseStateError(f"cannot release a lease that is {self.state}: wait for it")
        return defer.succeed(None)

    def shutdown(self) -> Deferred[None]:
        """Stop: timers cancelled, the grant (if any) released.  Harmless when stopped."""
        if not self._can(LeaseTrigger.SHUTDOWN):
            return defer.succeed(None)
        grant = self._grant if self.holds else None
        self._fire(LeaseTrigger.SHUTDOWN)
        self._end(self.reason or "shut down")
        if grant is None:
            return defer.succeed(None)
        return self._backend.release(grant).addErrback(self._log_failure, "release at shutdown")

    # -- getting a grant ------------------------------------------------------------------

    def _granted(self, grant: Grant, sent_at: float, trigger: LeaseTrigger) -> Grant:
        if not self._can(trigger):
            # Shut down while the request was in flight: the grant is unwanted.
            self._release_quietly(grant)
            raise LeaseStateError(f"lease on {self.resource} became {self.state} meanwhile")
        self._fire(trigger)
        self._hold(grant, sent_at)
        return grant

    def _refused(self, failure: Failure, trigger: LeaseTrigger) -> Failure:
        if isinstance(failure.value, LeaseConflict):
            self._holders = failure.value.holders
        self._note_error(failure)
        if self._can(trigger):
            self._fire(trigger)
        return failure

    def _hold(self, grant: Grant, sent_at: float, *, deadline: float = -math.inf) -> None:
        """Start keeping ``grant``: deadline (at least ``deadline``), keep-alive, watch."""
        self._epoch += 1
        self._grant = grant
        self._deadline = deadline
        self._extend(grant, sent_at)
        interval = CHECK_INTERVAL if grant.ttl is None else grant.ttl / 3
        self._keepalive = self._clock.looping_call(interval, self._renew_now)
        epoch = self._epoch
        self._unwatch = self._backend.watch(grant, lambda reason: self._lose(epoch, reason))
        self._publish(grant)

    def _publish(self, grant: Grant) -> None:
        address = self.serving_address
        if address is not None:
            d = self._backend.publish(grant, address)
            d.addErrback(self._log_failure, f"publishing {address}")

    # -- keeping it --------------------------------------------------------------------------

    def _renew_now(self) -> None:
        """One keep-alive tick; never raises (a raising LoopingCall stops for good)."""
        if self._grant is None or not self.holds or self._renewal_epoch == self._epoch:
            return
        grant, epoch = self._current()
        sent_at = self._clock.seconds()
        self._renewal_epoch = epoch
        d = self._backend.renew(grant)
        d.addCallbacks(
            self._renewed,
            self._renewal_failed,
            callbackArgs=(epoch, sent_at),
            errbackArgs=(epoch,),
        )
        d.addErrback(self._log_failure, "renewal")

    def _renewed(self, _: None, epoch: int, sent_at: float) -> None:
        if self._renewal_epoch == epoch:
            self._renewal_epoch = None
        if epoch != self._epoch or not self.holds:
            return
        assert self._grant is not None
        self._extend(self._grant, sent_at)
        if self._can(LeaseTrigger.RENEWED) and self._clock.seconds() < self._deadline:
            self._fire(LeaseTrigger.RENEWED)

    def _renewal_failed(self, failure: Failure, epoch: int) -> None:
        if self._renewal_epoch == epoch:
            self._renewal_epoch = None
        if epoch != self._epoch or not self.holds:
            return
        if isinstance(failure.value, LeaseLost):
            self._lose(epoch, str(failure.value))
            return
        # Unreachable, or an answer nobody expected: either way the lockspace
        # could not confirm the grant; the deadline decides.
        self._note_error(failure)
        if self._can(LeaseTrigger.RENEWAL_FAILED):
            self._fire(LeaseTrigger.RENEWAL_FAILED)

    def _extend(self, grant: Grant, sent_at: float) -> None:
        """Move the deadline to ``sent_at + ttl - margin`` and arm the expiry timer for it."""
        if grant.ttl is None:
            self._deadline = math.inf
            return
        margin = default_margin(grant.ttl) if self._margin is None else self._margin
        self._deadline = max(self._deadline, sent_at + grant.ttl - margin)
        delay = max(0.0, self._deadline - self._clock.seconds())
        if self._expiry is not None and self._expiry.active():
            self._expiry.reset(delay)
        else:
            self._expiry = self._clock.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        if not self.holds:
            return
        if self._clock.seconds() < self._deadline:  # extended meanwhile
            self._expiry = self._clock.call_later(
                self._deadline - self._clock.seconds(), self._expire
            )
            return
        detail = f"; last error: {self.last_error}" if self.last_error else ""
        self._fence(LeaseTrigger.EXPIRED, f"no renewal confirmed before the deadline{detail}")

    # -- losing it ---------------------------------------------------------------------------------

    def _lose(self, epoch: int, reason: str) -> None:
        """The backend says the grant of ``epoch`` is gone: fence, unless it was a take-over."""
        if epoch != self._epoch or not self.holds:
            return
        if self._is("offered") and self._reclaiming:
            self._loss_while_reclaiming = reason
        elif self._is("offered"):
            self._judge_loss(epoch, reason)
        else:
            self._fence(LeaseTrigger.LOST, reason)

    def _judge_loss(self, epoch: int, reason: str) -> None:
        """An offered grant was lost: taken over by the destination, or lost for real?"""
        if self._judging_loss:
            return
        self._judging_loss = True
        token = self.token
        assert token is not None

        def judge(holders: tuple[Holder, ...]) -> None:
            self._judging_loss = False
            if epoch != self._epoch or not self._is("offered"):
                return
            taker = self._newer_holder(holders, token)
            if taker is not None and self._clock.seconds() < self._deadline:
                self._finish_out(LeaseTrigger.TAKEN_OVER, f"taken over by {taker.describe()}")
            else:
                self._fence(LeaseTrigger.LOST, reason)

        def cannot_tell(failure: Failure) -> None:
            self._judging_loss = False
            if epoch == self._epoch and self._is("offered"):
                why = f"{reason}; and the lockspace cannot say who holds it now"
                self._fence(LeaseTrigger.LOST, why)

        d = self.inquire()
        d.addCallbacks(judge, cannot_tell)
        d.addErrback(self._log_failure, "judging a lost offer")

    def _reclaim_answered(self, outcome: _T) -> _T:
        self._reclaiming = False
        return outcome

    def _judge_held_loss(self, epoch: int) -> None:
        """The take-back failed: a loss reported while it was in flight counts after all."""
        reason, self._loss_while_reclaiming = self._loss_while_reclaiming, None
        if reason is not None:
            self._lose(epoch, reason)

    def _fence(self, trigger: LeaseTrigger, reason: str) -> None:
        """``expired`` or ``lost``: fenced, timers stopped, ``on_fenced`` told (once)."""
        grant = self._grant
        self._fire(trigger)
        self._end(reason)
        if grant is not None:
            self._release_quietly(grant)
        _log.warn("lease on {resource} fenced: {reason}", resource=self.resource, reason=reason)
        if self._on_fenced is not None and not self._fence_reported:
            self._fence_reported = True
            self._on_fenced(reason)

    def _finish_out(self, trigger: LeaseTrigger, reason: str) -> Deferred[None]:
        """``migrated_out`` or ``taken_over``: released, never to write again."""
        grant, _ = self._current()
        self._fire(trigger)
        self._end(reason)
        self._handed_over = True
        return self._backend.release(grant).addErrback(self._log_failure, "release after hand-over")

    def _end(self, reason: str) -> None:
        """The grant is over: stop every timer and the watch; remember why."""
        self._stop_timers()
        self._epoch += 1
        self._grant = None
        self._deadline = -math.inf
        self.reason = reason

    def _stop_timers(self) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if self._unwatch is not None:
            self._unwatch()
        self._unwatch = None

    # -- small helpers ---------------------------------------------------------------------------

    def _fire(self, trigger: LeaseTrigger) -> None:
        if not self._can(trigger):
            raise LeaseStateError(
                f"lease on {self.resource}: {trigger} is not legal while {self.state}"
            )
        model: Any = self._model
        model.trigger(trigger)
        self._writable = self._is("may_write")

    def _can(self, trigger: LeaseTrigger) -> bool:
        return self._chart.next_state(self.state, trigger) is not None

    def _is(self, prop: str) -> bool:
        return bool(self._chart.property(self.state, prop))

    def _current(self) -> tuple[Grant, int]:
        if self._grant is None:
            raise LeaseStateError(f"lease on {self.resource} has no grant while {self.state}")
        return self._grant, self._epoch

    def _require_exclusive(self, what: str) -> None:
        if self.mode is not LeaseMode.EXCLUSIVE:
            raise LeaseStateError(f"cannot {what}: the lease is {self.mode.value}, not exclusive")

    @staticmethod
    def _newer_holder(holders: tuple[Holder, ...], token: int) -> Holder | None:
        """The exclusive holder with a token larger than ``token``: whoever took it over."""
        newer = [h for h in holders if h.mode is LeaseMode.EXCLUSIVE and h.token > token]
        return max(newer, key=lambda h: h.token, default=None)

    def _handed_off_if_taken(self, failure: Failure) -> InDoubtOutcome:
        """A take-back refused because the token moved: the destination has it."""
        if isinstance(failure.value, LeaseConflict) and self._handed_over:
            return InDoubtOutcome.HANDED_OFF
        failure.raiseException()

    def _remember_holders(self, holders: tuple[Holder, ...]) -> tuple[Holder, ...]:
        self._holders = holders
        return holders

    def _note_error(self, failure: Failure) -> None:
        self.last_error = str(failure.value) or type(failure.value).__name__

    def _release_quietly(self, grant: Grant) -> None:
        """Release a grant this holder no longer wants; a failure is only logged."""
        self._backend.release(grant).addErrback(self._log_failure, "release")

    def _log_failure(self, failure: Failure, what: str) -> None:
        if isinstance(failure.value, LeaseError):
            # Expected (the lockspace unreachable, the grant gone): one line, no traceback.
            _log.warn(
                "lease on {resource}: {what} failed: {error}",
                resource=self.resource,
                what=what,
                error=failure.getErrorMessage(),
            )
            return
        _log.failure(
            "lease on {resource}: {what} failed", failure, resource=self.resource, what=what
        )


def _outcome(_: object, outcome: InDoubtOutcome) -> InDoubtOutcome:
    return outcome
