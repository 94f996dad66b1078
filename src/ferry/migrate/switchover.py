"""The switchover: hold clients, send the last pass, flush, move the lease, commit, hand over.

The steps follow the migration chart (``statecharts/migration.yaml``),
whose effects move the export's role in step; nothing here touches the
role's triggers:

1. ``quiescing`` (role ``quiescing``: clients held).  Once the client writes
   already dispatched have landed (:meth:`ClientGate.writes_landed`), and,
   in a write-blocking migration, the destination has answered those it
   was sent (:mod:`ferry.migrate.mirroring`), the last pass is planned
   from the dirty map and sent; then FLUSH.
2. flushed, to a plain NBD server (qemu-nbd, nbdkit): ``mirrored``; the copy
   is complete and this node serves on.
   With a ``pre-switchover`` hook (:mod:`ferry.hooks`), it runs here, clients
   still held: its no is ``veto`` (cancelled, clients released).
3. flushed (and approved), with a lease: ``offering``; the lease is offered and its answer
   is the token the commit carries (``offer_failed``: not offered, held
   again, the attempt is lost).  Without one: straight to the commit.
4. ``committing`` (role ``handing_off``): the clients that can move are
   carried to the destination first (:mod:`ferry.migrate.carry`), then
   FERRY_CMD_COMMIT with the token; for flexnbd, DISC, which nothing
   answers.  An OK reply is the handoff (``completed``, role
   ``handed_off``): the lease is handed on, the moved clients released and
   the others disconnected, the finish action run.  An error reply is a
   definite no: the clients still here are taken back, then
   ``commit_rejected`` to the retry, or with a lease ``reclaim``, which
   takes the lease back before any client goes on.  A lost connection or no reply
   is ``in_doubt``, settled by asking the lockspace (:meth:`resolve_from_lease`).
5. ``reclaiming`` / ``cancelling``: the offered lease is taken back (after
   the offer's own answer, if it is still out); taken back, the job retries
   (or, after ``break``, ends cancelled); if it cannot be had back, this
   node has lost its lease and with it control: fenced.
"""

from __future__ import annotations

import os
from typing import Final, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.chartnames import LeaseState, MigrationState, MigrationTrigger, RoleTrigger
from ferry.hooks import HookOutcome, Stage
from ferry.migrate.attempt import Attempt, Driver
from ferry.migrate.core.stats import FailureReason, failure_of_reply
from ferry.migrate.lease import InDoubtOutcome
from ferry.migrate.options import FinishAction, MirrorResult
from ferry.nbd.constants import Command, Errno, TransmissionFlag
from ferry.nbd.events import Reply
from ferry.nbd.locate import Location

__all__ = ["RESOLVE_RETRY", "Switchover"]

_log = Logger()

#: Seconds between attempts to settle ``in_doubt``, or to take a lease back,
#: while the lockspace cannot be reached.
RESOLVE_RETRY: Final = 2.0


class SwitchoverDriver(Driver, Protocol):
    """What the switchover needs of the source beyond what the copier does."""

    def close_attempt(self, attempt: Attempt) -> None: ...

    def abandon_attempt(self) -> None: ...

    def pump(self, attempt: Attempt) -> None: ...

    def mirrors_drained(self, attempt: Attempt) -> Deferred[None]:
        """Fires once no mirrored client write of ``attempt`` is on the wire."""
        ...

    def end(self, result: MirrorResult, start_message: str = "", detail: str = "") -> None: ...

    def lease_lost(self, reason: str) -> None: ...

    def stop_process(self) -> None: ...

    def wants_approval(self, stage: Stage) -> bool: ...

    def approve(self, stage: Stage) -> Deferred[HookOutcome]: ...

    def veto(self, reason: str) -> None: ...

    def note_error(self, error: str) -> None: ...

    def lost_attempt(self, reason: FailureReason, detail: str) -> None: ...

    def carry(self, attempt: Attempt) -> None: ...

    def clients_handed_over(self) -> None: ...

    def clients_taken_back(self) -> None: ...

    @property
    def destination_name(self) -> str: ...

    @property
    def destination_location(self) -> Location | None:
        """Where the image goes: what FERRY_OPT_LOCATE answers once it is there
        (None: a ``unix:`` or ``exec:`` destination, which has no address to give)."""
        ...


class Switchover:
    """The end of a migration, one attempt at a time; see the module doc."""

    def __init__(self, driver: SwitchoverDriver) -> None:
        self._driver = driver
        # The lease offer of the attempt in offering, while its answer is out.
        self._offer: Deferred[int] | None = None

    # -- 1. clients held, the last pass -------------------------------------------------

    def quiesced(self, attempt: Attempt) -> None:
        """The job switched over (role quiescing): the last pass, once writes have landed."""
        driver = self._driver
        driver.set_write_cap(None)
        landed = driver.gate.writes_landed()
        # Write-blocking: the writes that landed may still be on their way to
        # the destination; the last pass and its FLUSH go after their answers.
        landed.addCallback(lambda _: driver.mirrors_drained(attempt))
        landed.addCallback(lambda _: self._held(attempt))

    def _held(self, attempt: Attempt) -> None:
        driver = self._driver
        if not driver.current(attempt) or driver.job.state != MigrationState.QUIESCING:
            return  # released or given up meanwhile
        attempt.switchover = [driver.clock.seconds()]
        driver.job.start_final_pass()
        driver.pump(attempt)

    def last_pass_sent(self, attempt: Attempt) -> None:
        """Every request of the last pass is answered: FLUSH the destination."""
        driver = self._driver
        assert attempt.wire is not None
        attempt.switchover.append(driver.clock.seconds())
        plan = driver.job.plan
        attempt.last_pass_bytes = 0 if plan is None else plan.total_bytes
        if not attempt.can(TransmissionFlag.SEND_FLUSH):
            self._flushed(attempt)  # a server without FLUSH writes through
            return
        attempt.unflushed_bytes = 0
        attempt.flush_handle = attempt.wire.request(Command.FLUSH)
        driver.arm_reply_timer(attempt)

    def flush_answered(self, attempt: Attempt, reply: Reply) -> None:
        driver = self._driver
        attempt.flush_handle = None
        driver.settle_reply_timer(attempt)
        if reply.error:
            driver.fail(
                attempt,
                "",
                f"FLUSH failed: {reply.error.name} {reply.message}",
                failure_of_reply(reply.error, FailureReason.FLUSH_ERROR),
            )
            return
        self._flushed(attempt)

    # -- 2, 3. flushed: mirrored, or offer the lease, or commit -------------------------

    def _flushed(self, attempt: Attempt) -> None:
        driver = self._driver
        attempt.switchover.append(driver.clock.seconds())
        if attempt.plain:
            # A plain NBD server cannot take control: the copy is complete and
            # flushed, and this node keeps serving its image.
            driver.job.fire(MigrationTrigger.MIRRORED)
            driver.close_attempt(attempt)
            driver.end(MirrorResult("completed", False, "mirrored to a plain NBD server"))
            return
        if driver.wants_approval(Stage.PRE_SWITCHOVER):
            # Clients held, the last pass flushed, nothing offered or promised yet.
            approval = driver.approve(Stage.PRE_SWITCHOVER)
            approval.addCallback(lambda outcome: self._approved(attempt, outcome))
            approval.addErrback(self._internal_error, "running the pre-switchover hook")
            return
        self._switch(attempt)

    def _approved(self, attempt: Attempt, outcome: HookOutcome) -> None:
        driver = self._driver
        if not driver.current(attempt) or driver.job.state != MigrationState.QUIESCING:
            return  # broken off, lost or stopped while the hook ran
        if outcome.ok:
            self._switch(attempt)
        else:
            driver.veto(outcome.reason)

    def _switch(self, attempt: Attempt) -> None:
        """Approved: offer the lease (its answer is the commit's token), or commit."""
        driver = self._driver
        lease = driver.lease
        if lease is not None and not driver.options.flexnbd:
            driver.job.fire(MigrationTrigger.OFFER)
            offer: Deferred[int] = maybeDeferred(lease.prepare_migrate)
            self._offer = offer
            offer.addCallbacks(
                lambda token: self._offered(attempt, token),
                lambda failure: self._offer_failed(attempt, failure),
            )
            offer.addErrback(self._internal_error, "offering the lease")
            return
        self._commit(attempt, driver.options.fencing_token)

    def _offered(self, attempt: Attempt, token: int) -> None:
        self._offer = None
        driver = self._driver
        if driver.job.state == MigrationState.OFFERING and driver.current(attempt):
            self._commit(attempt, token)
        elif driver.job.state in (MigrationState.RECLAIMING, MigrationState.CANCELLING):
            self.reclaim()  # broken off while the offer was out: take it back now

    def _offer_failed(self, attempt: Attempt, failure: Failure) -> None:
        self._offer = None
        driver = self._driver
        why = f"cannot offer the lease: {failure.getErrorMessage()}"
        if driver.job.state == MigrationState.OFFERING and driver.current(attempt):
            # Not offered: the lease is held again (or fenced, and lease_lost
            # has ended the job already).  The attempt is lost.
            driver.lost_attempt(FailureReason.LEASE, why)
            _log.warn("mirror of {export}: {why}", export=driver.export.name, why=why)
            driver.abandon_attempt()
            driver.job.fire(MigrationTrigger.OFFER_FAILED, why)
        elif driver.job.state in (MigrationState.RECLAIMING, MigrationState.CANCELLING):
            self.reclaim()

    # -- 4. the commit ---------------------------------------------------------------------

    def _commit(self, attempt: Attempt, token: int) -> None:
        """Hand over: the commit carries ``token`` (flexnbd: DISC, and nothing is answered)."""
        driver = self._driver
        wire = attempt.wire
        if not driver.current(attempt) or wire is None:
            return  # broken off meanwhile
        driver.job.fire(MigrationTrigger.COMMIT)
        driver.carry(attempt)
        if driver.options.flexnbd:
            # DISC is flexnbd's handoff, and nothing answers it: once it is
            # written the listener has control (see the module doc of source).
            driver.close_attempt(attempt)
            driver.job.fire(MigrationTrigger.COMMITTED)
            self._hand_over()
            return
        attempt.commit_handle = wire.commit(token)
        driver.arm_reply_timer(attempt)

    def commit_answered(self, attempt: Attempt, reply: Reply) -> None:
        driver = self._driver
        attempt.commit_handle = None
        driver.settle_reply_timer(attempt)
        if reply.error:
            # A definite no: nothing was taken.  Clients go back to being
            # served while the job retries from scratch -- with a lease, only
            # once it is this node's again.
            why = f"commit refused: {reply.error.name} {reply.message}"
            driver.clients_taken_back()
            # EPERM: the destination cannot take the lease, which no retry changes.
            refused = (
                FailureReason.LEASE_REFUSED
                if reply.error == Errno.EPERM
                else FailureReason.COMMIT_REJECTED
            )
            driver.lost_attempt(refused, why)
            _log.warn("mirror of {export}: {why}", export=driver.export.name, why=why)
            driver.abandon_attempt()
            if driver.lease is None:
                driver.job.fire(MigrationTrigger.COMMIT_REJECTED, why)
            else:
                driver.job.fire(MigrationTrigger.RECLAIM, why)
                self.reclaim()
            return
        driver.job.fire(MigrationTrigger.COMMITTED)
        self._log_switchover(attempt)
        driver.close_attempt(attempt)
        self._hand_over()

    def _log_switchover(self, attempt: Attempt) -> None:
        """How long the switchover held clients, step by step, against what was expected."""
        if len(attempt.switchover) != 3:
            return
        driver = self._driver
        held, sent, flushed = attempt.switchover
        decision = driver.job.last_decision
        expected = None if decision is None else decision.expected_downtime
        now = driver.clock.seconds()
        _log.info(
            "mirror of {export}: the switchover held clients {total:.3f} s (expected {expected}):"
            " last pass {bytes} bytes in {sent:.3f} s, FLUSH {flush:.3f} s, commit {commit:.3f} s",
            export=driver.export.name,
            total=now - held,
            expected="?" if expected is None else f"{expected:.3f} s",
            bytes=attempt.last_pass_bytes,
            sent=sent - held,
            flush=flushed - sent,
            commit=now - flushed,
        )

    def _hand_over(self) -> None:
        """The destination owns the image: the lease, the clients, then the finish action."""
        driver = self._driver
        lease = driver.lease
        if lease is not None and lease.state == LeaseState.TRANSFERRING:
            lease.complete_migrate_out().addErrback(self._lease_trouble, "release")
        elif lease is not None:
            # flexnbd's listener takes no lease: ours goes with the image.
            lease.release().addErrback(self._lease_trouble, "release")
        driver.job.note_hold(driver.gate.longest_hold)
        # Before the clients go: a proxy among them whose connection did not
        # move asks where the image went.
        driver.export.handed_to = driver.destination_location
        driver.clients_handed_over()
        action = driver.options.action
        if action is FinishAction.UNLINK:
            try:
                os.unlink(driver.image.path)
            except OSError as exc:
                _log.error("cannot unlink {path}: {exc}", path=str(driver.image.path), exc=exc)
        elif action is FinishAction.EXIT:
            driver.stop_process()
        driver.end(MirrorResult("completed", True, f"handed over to {driver.destination_name}"))

    # -- 5. taking the lease back ---------------------------------------------------------

    def reclaim(self) -> None:
        """``reclaiming`` / ``cancelling``: the offered lease must be ours again, or lost.

        Taken back: ``reclaimed`` (the job retries, or ends cancelled; the
        role serves again).  Held already (its offer failed): the same.
        Refused for good (someone else holds it, or the lockspace is in the
        way and no deadline could change that), or found ended: the lease is
        lost and so is control.  Unanswered (the lockspace cannot be
        reached): asked again every ``RESOLVE_RETRY`` seconds, until the
        lease's deadline fences it.  While the offer is still out, its answer
        comes back here.
        """
        driver = self._driver
        lease = driver.lease
        states = (MigrationState.RECLAIMING, MigrationState.CANCELLING)
        if lease is None or driver.job.state not in states or self._offer is not None:
            return
        if lease.state == LeaseState.HELD:
            self._reclaimed()
            return
        if lease.state != LeaseState.TRANSFERRING:
            self._lose_control(f"the lease is {lease.state}: it could not be taken back")
            return

        def taken_back(_: object) -> None:
            if driver.job.state in states:
                self._reclaimed()

        def not_taken_back(failure: Failure) -> None:
            if driver.job.state not in states:
                return  # fenced meanwhile: lease_lost has ended the job
            self._lease_trouble(failure, "take back")
            if lease.state == LeaseState.TRANSFERRING:
                driver.clock.call_later(RESOLVE_RETRY, self.reclaim)
                return
            self._lose_control(
                f"the lease could not be taken back: {failure.getErrorMessage()}"
            )

        d = maybeDeferred(lease.cancel_migrate_out)
        d.addCallbacks(taken_back, not_taken_back)
        d.addErrback(self._internal_error, "taking the lease back")

    def _reclaimed(self) -> None:
        driver = self._driver
        cancelling = driver.job.state == MigrationState.CANCELLING
        driver.job.fire(MigrationTrigger.RECLAIMED)
        if cancelling:
            driver.end(MirrorResult("cancelled", False, "break"))

    def _lose_control(self, reason: str) -> None:
        """The lease is gone but nobody fenced the role: fence it, then end as lease_lost does."""
        driver = self._driver
        if driver.export.can(RoleTrigger.LEASE_LOST):
            driver.export.trigger(RoleTrigger.LEASE_LOST)
        driver.lease_lost(reason)

    # -- in doubt ----------------------------------------------------------------------------

    def resolve_from_lease(self) -> None:
        """``in_doubt``: the lockspace knows whether the destination took the lease."""
        driver = self._driver
        lease = driver.lease
        if lease is None or driver.job.state != MigrationState.IN_DOUBT:
            return  # an operator (or flexnbd's weaker handoff) must settle it

        def settled(outcome: InDoubtOutcome) -> None:
            if driver.job.state == MigrationState.IN_DOUBT:
                _log.info(
                    "mirror of {export}: the lease says {outcome}",
                    export=driver.export.name,
                    outcome=outcome.value,
                )
                self.resolve(handed_off=outcome is InDoubtOutcome.HANDED_OFF)

        def unknown(failure: Failure) -> None:
            if driver.job.state != MigrationState.IN_DOUBT:
                return  # settled meanwhile (the lease fenced: lease_lost)
            if lease.state == LeaseState.FENCED:
                driver.lease_lost("the lease ran out while the commit was in doubt")
                return
            self._lease_trouble(failure, "ask about")
            driver.clock.call_later(RESOLVE_RETRY, self.resolve_from_lease)

        d = maybeDeferred(lease.resolve_in_doubt)
        d.addCallbacks(settled, unknown)
        d.addErrback(self._internal_error, "settling in_doubt")

    def resolve(self, *, handed_off: bool) -> None:
        """Settle ``in_doubt`` once someone (the lease, an operator) knows who owns the image."""
        driver = self._driver
        if handed_off:
            driver.job.fire(MigrationTrigger.RESOLVE_COMMITTED)
            self._hand_over()
        else:
            driver.stats.failures[FailureReason.IN_DOUBT] += 1
            driver.clients_taken_back()
            driver.job.fire(MigrationTrigger.RESOLVE_ABORTED)
            driver.end(MirrorResult("failed", False, "resolved: the destination did not commit"))

    # -- trouble -----------------------------------------------------------------------------

    def _lease_trouble(self, failure: Failure, doing: str) -> None:
        _log.error(
            "mirror of {export}: cannot {doing} the lease: {why}",
            export=self._driver.export.name,
            doing=doing,
            why=failure.getErrorMessage(),
        )

    def _internal_error(self, failure: Failure, doing: str) -> None:
        """A bug in a lease callback: logged whole, and never left half-done.

        Wherever the commit cannot have landed, the job ends and this node
        gives up control (the lease may be in any state by now); where it
        may have, it stays ``in_doubt`` for the lease to settle.
        """
        driver = self._driver
        _log.failure(
            "mirror of {export}: internal error while {doing}",
            failure,
            export=driver.export.name,
            doing=doing,
        )
        job = driver.job
        if job.final or job.chart.property(job.state, "commit_sent"):
            return
        self._lose_control(f"internal error while {doing}: {failure.getErrorMessage()}")
