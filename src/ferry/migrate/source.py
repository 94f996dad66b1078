"""The migration source on Twisted: one :class:`MirrorSource` runs one mirror job.

:class:`ferry.migrate.core.job.MigrationJob` decides (passes, convergence,
retries, counters) and its chart moves the export's role (the effects in
``statecharts/migration.yaml``); this module connects, routes what the wire
says to the part that handles it, and decides what a failure means.  The
parts: :mod:`~ferry.migrate.negotiation` judges the handshake,
:mod:`~ferry.migrate.copier` sends the passes, :mod:`~ferry.migrate.switchover`
holds clients, flushes, moves the lease, commits and hands over.  One
attempt is one TCP connection (:mod:`~ferry.migrate.attempt`);
:meth:`MirrorSource.start`'s Deferred fires once the first one has
negotiated, with flexnbd's reply ("Mirror started", "Mirror failed to
connect", "Mirror was rejected", ...).

With ``MirrorOptions.flexnbd`` the destination is a ``flexnbd listen`` (or a
``ferry listen --oldstyle``) and the stream is flexnbd's: no option, an
oldstyle hello, every request with the handle ``.MIRROR.`` (so one in flight
at a time), and the handoff FLUSH then NBD_CMD_DISC, which nothing answers:
weaker than ferry's two-phase commit (see :mod:`~ferry.migrate.switchover`).

Any failure of an attempt after a good negotiation (an error reply, no reply
within ``reply_timeout``, a lost or broken connection) closes the connection
and fires the job's ``fail``: the job waits out its backoff in
``retry_wait`` and fires ``retry``, on which this module reconnects.  Before
a good negotiation a failure ends the job.  Every callback of an attempt
checks that its attempt is still the current one, so a late reply, timer or
``connectionLost`` from a connection already given up cannot touch the next.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.chartnames import MigrationState, MigrationTrigger, RoleState, RoleTrigger
from ferry.clock import Clock, cancel_call
from ferry.hooks import VETOING, Approver, HookOutcome, Hooks, Stage
from ferry.migrate.attempt import Attempt, AttemptCounters
from ferry.migrate.carry import Carriage, Carrier
from ferry.migrate.copier import PassCopier
from ferry.migrate.core.backoff import Backoff
from ferry.migrate.core.convergence import ConvergencePolicy
from ferry.migrate.core.job import MigrationJob
from ferry.migrate.core.progress import MigrationProgress
from ferry.migrate.core.stats import PERMANENT, FailureReason, MigrationStats
from ferry.migrate.gate import ClientGate
from ferry.migrate.lease import OutgoingLease
from ferry.migrate.mirroring import WriteMirror
from ferry.migrate.negotiation import Negotiation
from ferry.migrate.options import (
    CANCELLED,
    FAILED_TO_CONNECT,
    LEASE_LOST,
    MIRROR_STARTED,
    REASON_OF_REPLY,
    REJECTED,
    CannotBreak,
    CopyMode,
    Destination,
    FinishAction,
    MirrorError,
    MirrorOptions,
    MirrorResult,
    NotMirroring,
    StartOutcome,
)
from ferry.migrate.switchover import Switchover
from ferry.migrate.wire import Connector, MirrorProtocol, MirrorProtocolFactory, TLSForHost
from ferry.nbd.events import (
    Event,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    OptionData,
    Reply,
)
from ferry.nbd.locate import Location
from ferry.serve.export import Export
from ferry.storage import Extent, Image
from ferry.storage.dirtymap import DirtyMap
from ferry.trace import Tracer

__all__ = ["ImageCalls", "MirrorSource"]

ImageCalls = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Runs a call on the image (a read, an extent scan) on a worker thread, in the export's lane."""

_log = Logger()

#: The dirty map's chunk: a 4 KiB client write dirties 4 KiB, not the map's
#: default 64 KiB.  With 64 KiB chunks a 20 MB/s random 4 KiB writer dirties
#: over 300 MB/s of chunks, more than the stream sends, so passes never
#: converge; the map costs one byte per chunk (256 KiB for 1 GiB).
DIRTY_GRANULARITY = 4096

class _Job(MigrationJob):
    """The job, telling the source when its retry timer has fired."""

    def __init__(
        self, on_reconnect: Callable[[], None], on_retry_wait: Callable[[], None], **kwargs: Any
    ) -> None:
        self._on_reconnect = on_reconnect
        self._on_retry_wait = on_retry_wait
        super().__init__(**kwargs)

    def on_enter_reconnecting(self, event: object) -> None:
        self._on_reconnect()

    def on_enter_retry_wait(self, event: object) -> None:
        super().on_enter_retry_wait(event)
        self._on_retry_wait()


class MirrorSource:
    """Mirrors ``export`` to ``destination`` and, to a ferry listener, hands it over.

    Build one per ``mirror`` command.  The control plane calls
    :meth:`start` (its Deferred is the ``mirror`` reply), :meth:`cancel`
    (``break``), :meth:`set_max_bps` (``mirror_max_bps``), and
    :meth:`progress` (the status fields); :attr:`finished` fires with a
    :class:`MirrorResult` when the job has ended.  ``stop_process`` is
    called for the ``exit`` action after a handoff.
    """

    def __init__(
        self,
        export: Export,
        destination: Destination,
        *,
        gate: ClientGate,
        clock: Clock,
        connector: Connector,
        options: MirrorOptions | None = None,
        tracer: Tracer | None = None,
        stop_process: Callable[[], None] | None = None,
        lease: OutgoingLease | None = None,
        stats: MigrationStats | None = None,
        tls: TLSForHost | None = None,
        carrier: Carrier | None = None,
        hooks: Hooks | None = None,
        image_calls: ImageCalls | None = None,
        approver: Callable[[], Approver | None] = lambda: None,
    ) -> None:
        self._export = export
        # How the passes read the image off the reactor thread (None: inline, for tests).
        self._image_calls = image_calls
        self._tls = tls  # TLS with this node's certificate, verifying the destination
        self._tracer = tracer
        # The export's hooks: pre-migrate and pre-switchover may veto.
        self._hooks = hooks
        # ... and the export's approver, if a control connection registered one now.
        self._approver = approver
        # How client connections move with the image (None: they are disconnected).
        self._carrier = carrier
        # The connections of the commit in progress, until it is decided.
        self.carriage: Carriage | None = None
        # The export's counters, kept across jobs (by the MirrorManager).
        self._stats = MigrationStats() if stats is None else stats
        self.destination = destination
        self._lease = lease
        self._gate = gate
        self._clock = clock
        self._options = options = options or MirrorOptions()
        self._connector = connector
        self._stop_process = stop_process
        if options.action is FinishAction.EXIT and stop_process is None:
            raise ValueError("the exit action needs a stop_process callback")
        self._image = export.image
        self.dirty = DirtyMap(self._image.size, DIRTY_GRANULARITY)
        self._job = _Job(
            self._reconnect_soon,
            self._retry_wait_entered,
            image=self._image,
            dirty=self.dirty,
            clock=clock,
            instance=export.name,
            tracer=tracer,
            max_bps=options.max_bps,
            policy=ConvergencePolicy(
                max_downtime=options.max_downtime, max_passes=options.max_passes
            ),
            backoff=Backoff(options.retry_initial, options.retry_max),
            max_data_length=options.max_data_length,
            destination_empty=options.destination_empty,
            followers={"role": export.trigger},
        )
        if image_calls is not None:
            self._job.scan_extents = self._scan_extents
        self.started: Deferred[StartOutcome] = Deferred()
        self.finished: Deferred[MirrorResult] = Deferred()
        self.outcome: StartOutcome | None = None
        self.result: MirrorResult | None = None
        self._counters = AttemptCounters()
        self.last_error = ""
        # Why the last attempt failed (a FailureReason's value): the status's
        # migration_last_failure; None while none has.
        self.last_failure: str | None = None
        # The retry policy's count: attempts lost, since when, and why it gave up.
        self._lost = 0
        self._first_lost_at: float | None = None
        self._giving_up: str | None = None
        self._attempt = Attempt(0)
        self._unobserve: list[Callable[[], None]] = []
        self._write_cap: int | None = None
        self._closing: list[Deferred[None]] = []  # connections given up, not yet closed
        # Write-blocking: client writes to what is copied go to the destination too.
        self.mirror: WriteMirror | None = None
        if options.copy_mode is CopyMode.WRITE_BLOCKING:
            self.mirror = WriteMirror(self, self.dirty, self._stats)
        self._switchover = Switchover(self)
        self._negotiation = Negotiation(self)
        self.copier = PassCopier(
            self,
            on_quiesced=self._switchover.quiesced,
            on_last_pass_sent=self._switchover.last_pass_sent,
            on_gave_up=self._gave_up,
        )

    def __repr__(self) -> str:
        return f"<MirrorSource {self._export.name} -> {self.destination} {self._job.state}>"

    # -- what the parts share (attempt.Driver) ---------------------------------------

    @property
    def export(self) -> Export:
        return self._export

    @property
    def image(self) -> Image:
        return self._image

    @property
    def job(self) -> MigrationJob:
        return self._job

    @property
    def gate(self) -> ClientGate:
        return self._gate

    @property
    def lease(self) -> OutgoingLease | None:
        return self._lease

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def options(self) -> MirrorOptions:
        return self._options

    @property
    def stats(self) -> MigrationStats:
        return self._stats

    @property
    def counters(self) -> AttemptCounters:
        """What the current (or last) attempt sent."""
        return self._counters

    @property
    def destination_name(self) -> str:
        return str(self.destination)

    @property
    def destination_location(self) -> Location | None:
        destination = self.destination
        if destination.transport != "tcp":
            return None
        return Location(destination.host, destination.port, destination.export_name)

    def current(self, attempt: Attempt) -> bool:
        return attempt is self._attempt

    def read_image(self, offset: int, length: int) -> Deferred[bytes]:
        if self._image_calls is not None:
            return self._image_calls(partial(self._image.pread, offset, length))
        return maybeDeferred(self._image.pread, offset, length)

    def _scan_extents(self, then: Callable[[list[Extent]], None]) -> None:
        """The bulk pass's extent scan, on a worker thread; then its pass, and pump."""
        assert self._image_calls is not None
        attempt = self._attempt
        image = self._image

        def scanned(extents: list[Extent]) -> None:
            then(extents)
            if self.current(attempt):
                self.pump(attempt)

        def failed(failure: Failure) -> None:
            self.fail(
                attempt,
                "",
                f"reading the image's extents failed: {failure.getErrorMessage()}",
                FailureReason.READ_ERROR,
            )

        d = self._image_calls(partial(image.extents, 0, image.size))
        d.addCallbacks(scanned, failed)
        d.addErrback(lambda failure: _log.failure("after the extent scan", failure))

    def pump(self, attempt: Attempt) -> None:
        self.copier.pump(attempt)

    def mirrors_drained(self, attempt: Attempt) -> Deferred[None]:
        """Fires once no mirrored client write of ``attempt`` is on the wire (at once
        in the background mode)."""
        if self.mirror is None:
            return succeed(None)
        return self.mirror.drained(attempt)

    def note_error(self, error: str) -> None:
        self.last_error = error

    def stop_process(self) -> None:
        assert self._stop_process is not None
        self._stop_process()

    # -- the control plane's calls ---------------------------------------------------

    @property
    def state(self) -> str:
        """The migration chart's state."""
        return self._job.state

    def start(self) -> Deferred[StartOutcome]:
        """Begin: role ``migrating``, connect.  Fires once the first negotiation is settled."""
        if self._unobserve or self._job.final:
            raise MirrorError("this mirror has already been started")
        export = self._export
        if export.state != RoleState.SERVING:
            raise MirrorError(f"export {export.name} is {export.state}, not serving")
        # Observe before the bulk pass clears the map: nothing written from
        # now on can be missed.  Write-blocking, the mirror marks what it does not send.
        if self.mirror is None:
            self._unobserve.append(export.observe_writes(self.dirty.mark))
        else:
            self._unobserve.append(export.gate_writes(self.mirror.client_wrote))
        self._unobserve.append(export.observe_role(self._role_changed))
        export.trigger(RoleTrigger.MIGRATE)
        if self.wants_approval(Stage.PRE_MIGRATE):
            self.approve(Stage.PRE_MIGRATE).addCallback(self._pre_migrate_answered)
        else:
            self._connect()
        return self.started

    def _pre_migrate_answered(self, outcome: HookOutcome) -> None:
        if self._job.state != MigrationState.CONNECTING or self._attempt.number != 0:
            return  # broken off (or stopped) while the hook ran
        if outcome.ok:
            self._connect()
        else:
            self.veto(outcome.reason)

    # -- hooks (ferry.hooks) ------------------------------------------------------------

    def wants_approval(self, stage: Stage) -> bool:
        """Whether a hook, or the export's approver, must approve ``stage`` before the job
        goes on."""
        if stage in VETOING and self._approver() is not None:
            return True
        return self._hooks is not None and self._hooks.configured(stage)

    def approve(self, stage: Stage) -> Deferred[HookOutcome]:
        """Run ``stage``'s hook, then ask the approver; the outcome says whether the step may
        go on (the first no decides)."""
        peer = str(self.destination)
        ran = succeed(HookOutcome(True)) if self._hooks is None else self._hooks.run(stage, peer)

        def ask(outcome: HookOutcome) -> HookOutcome | Deferred[HookOutcome]:
            approver = self._approver()
            if not outcome.ok or approver is None or stage not in VETOING:
                return outcome
            return approver.ask(stage, peer)

        return ran.addCallback(ask)

    def veto(self, reason: str) -> None:
        """A hook said no: cancel the job (``veto``), release the clients, serve on.

        Only where the chart takes ``veto``: before the first connect, or
        quiesced and flushed but before the lease is offered.  The
        destination, if connected, loses the connection and listens again.
        """
        job = self._job
        if job.final or not job.can(MigrationTrigger.VETO):
            return
        self.abandon_attempt()
        detail = f"hook: {reason}"
        self.last_error = detail
        self.last_failure = FailureReason.HOOK.value
        self._stats.failures[FailureReason.HOOK] += 1
        _log.warn(
            "mirror of {export} to {dest}: cancelled in {state}: {why}",
            export=self._export.name,
            dest=str(self.destination),
            state=job.state,
            why=reason,
        )
        job.fire(MigrationTrigger.VETO, detail)
        self.end(MirrorResult("cancelled", False, detail), CANCELLED, detail)

    def cancel(self) -> None:
        """``break``: stop the job and keep serving; refused once the commit may have landed."""
        job = self._job
        if job.final:
            raise NotMirroring("not mirroring")
        state = job.state
        if not job.can(MigrationTrigger.BREAK_MIGRATION):
            why = (
                "the commit may have reached the destination"
                if job.chart.property(state, "commit_sent")
                else "the lease is being taken back"
            )
            raise CannotBreak(f"cannot break in {state}: {why}")
        self.abandon_attempt()
        job.fire(MigrationTrigger.BREAK_MIGRATION)
        if job.state == MigrationState.CANCELLING:
            self._switchover.reclaim()  # the offered lease first; then cancelled
            return
        self.end(MirrorResult("cancelled", False, "break"), CANCELLED)

    def stop(self, reason: str) -> None:
        """The node shuts down: ``break`` where it can be taken, else abandon the job.

        Where the commit may have landed (or the lease is being taken back)
        nothing this node could do now would settle it: the connection is
        dropped and the job ends ``failed``; the lease says who has the image.
        :attr:`finished` fires once the sockets are closed.
        """
        job = self._job
        if job.can(MigrationTrigger.BREAK_MIGRATION):
            self.cancel()
        elif job.can(MigrationTrigger.STOP):
            self.abandon_attempt()
            self.last_error = f"{reason} in {job.state}"
            job.fire(MigrationTrigger.STOP)
            self.end(MirrorResult("failed", False, self.last_error), CANCELLED, self.last_error)

    def lease_lost(self, reason: str) -> None:
        """The image's lease is gone and the role ``fenced``: nothing is left to hand over.

        The job ends ``failed`` at once: copying on would only read an image
        this node may no longer own, and a switchover would offer a lease it
        does not have.  Held clients go on, to the EIO a fenced export
        answers.  Once the commit has gone nobody may say any more whether
        the destination took the image, and this node may not write it
        either way: it is not waited for.
        """
        job = self._job
        if job.final:
            return
        in_doubt = job.state == MigrationState.IN_DOUBT
        self.abandon_attempt()
        if in_doubt:
            self.last_error = "the lease ran out while the commit was in doubt: this node is fenced"
            self._stats.failures[FailureReason.IN_DOUBT] += 1
        else:
            self.last_error = f"the lease was lost: {reason}"
            self._stats.failures[FailureReason.LEASE] += 1
        self.last_failure = FailureReason.LEASE.value
        job.fire(MigrationTrigger.LEASE_LOST)
        self.end(MirrorResult("failed", False, self.last_error), LEASE_LOST, self.last_error)

    def set_max_bps(self, limit: int | None) -> None:
        """``mirror_max_bps``: the new limit applies to the very next request."""
        if self._job.final:
            raise NotMirroring("Not currently mirroring")
        self._job.set_max_bps(limit)
        self.copier.repace(self._attempt)

    def progress(self) -> MigrationProgress:
        """The migration status fields now."""
        return self._job.progress()

    def summary(self) -> str:
        """The job summed up in one line, once it has ended."""
        return self._job.summary()

    def resolve(self, *, handed_off: bool) -> None:
        """Settle ``in_doubt`` once someone (the lease, an operator) knows who owns the image."""
        if self._job.state != MigrationState.IN_DOUBT:
            raise MirrorError(f"nothing to resolve in {self._job.state}")
        self._switchover.resolve(handed_off=handed_off)

    def _role_changed(self, trigger: str, source: str, dest: str) -> None:
        """Held clients went on (or away): their wait is the migration's last downtime."""
        chart = self._export.role_chart
        if chart.property(source, "clients_held") and not chart.property(dest, "clients_held"):
            self._job.note_hold(self._gate.longest_hold)

    # -- connecting ---------------------------------------------------------------------

    def _connect(self) -> None:
        attempt = self._attempt = Attempt(self._attempt.number + 1)
        factory = MirrorProtocolFactory(
            self,
            self._image.size,
            self.destination.export_name,
            flexnbd=self._options.flexnbd,
            resource="" if self._lease is None else self._lease.resource,
            tls=None if self._tls is None else self._tls(self.destination.host),
            carries=self._carrier is not None and self._carrier.can_move,
        )
        try:
            d = self._connector(self.destination, factory, self._options.connect_timeout)
        except Exception as exc:  # a bad bind address fails before any Deferred
            self.fail(attempt, FAILED_TO_CONNECT, f"cannot connect: {exc}")
            return

        def failed(failure: Failure) -> None:
            if attempt is self._attempt and attempt.wire is None:
                self.fail(attempt, FAILED_TO_CONNECT, failure.getErrorMessage())

        d.addErrback(failed)

    def _reconnect_soon(self) -> None:
        # Called inside the job's ``retry`` transition: connect after it, not in it.
        self._clock.call_later(0, self._reconnect)

    def _reconnect(self) -> None:
        if self._job.state == MigrationState.RECONNECTING:
            self._connect()

    # -- WireHandler -------------------------------------------------------------------

    def wire_connected(self, wire: MirrorProtocol) -> None:
        attempt = self._attempt
        connecting = (MigrationState.CONNECTING, MigrationState.RECONNECTING)
        if attempt.wire is not None or self._job.state not in connecting:
            wire.abort()  # a connection nobody is waiting for any more
            return
        attempt.wire = wire
        self._negotiation.wait_for_hello(attempt)
        self._job.fire(MigrationTrigger.CONNECTED)

    def wire_events(self, wire: MirrorProtocol, events: list[Event]) -> None:
        attempt = self._attempt
        for event in events:
            if wire is not attempt.wire or attempt is not self._attempt:
                return  # given up while handling an earlier event
            if isinstance(event, Reply):
                self._reply(attempt, event)
            elif isinstance(event, OptionData):
                self._negotiation.option_data(attempt, event)
            elif isinstance(event, OptionAnswered):
                self._negotiation.option_answered(attempt, event)
            elif isinstance(event, Negotiated):
                self._negotiation.negotiated(attempt, event)
            elif isinstance(event, NegotiationFailed):
                detail = f"{event.error.name}: {event.message}"
                self.fail(attempt, REJECTED, f"the destination refused: {detail}")

    def wire_broken(self, wire: MirrorProtocol, reason: str) -> None:
        attempt = self._attempt
        if wire is attempt.wire:
            self.fail(attempt, REJECTED, f"protocol error: {reason}", FailureReason.PROTOCOL_ERROR)

    def wire_lost(self, wire: MirrorProtocol, reason: str) -> None:
        attempt = self._attempt
        if wire is attempt.wire:
            self.fail(
                attempt, REJECTED, f"connection lost: {reason}", FailureReason.CONNECTION_LOST
            )

    def _reply(self, attempt: Attempt, reply: Reply) -> None:
        handle = reply.handle
        if handle == attempt.flush_handle:
            self._switchover.flush_answered(attempt, reply)
        elif handle == attempt.preflush_handle:
            self.copier.preflush_answered(attempt, reply)
        elif handle == attempt.commit_handle:
            self._switchover.commit_answered(attempt, reply)
        elif self.carriage is not None and self.carriage.owns(handle):
            self.carriage.answered(reply)
        elif self.mirror is not None and self.mirror.owns(attempt, handle):
            self.mirror.answered(attempt, reply)
        else:
            self.copier.data_answered(attempt, reply)

    # -- negotiated ----------------------------------------------------------------------

    def accepted(self, attempt: Attempt, negotiated: Negotiated) -> None:
        """The destination can take this migration (see :mod:`~ferry.migrate.negotiation`)."""
        attempt.negotiated = negotiated
        self._counters = AttemptCounters()
        self._job.max_data_length = min(self._options.max_data_length, negotiated.max_block_size)
        self._job.fire(MigrationTrigger.ACCEPTED)
        kind = "plain NBD target" if attempt.plain else "ferry listener"
        _log.info(
            "mirror of {export} to {dest}: attempt {n} negotiated ({kind}{tls}, {mode})",
            export=self._export.name,
            dest=str(self.destination),
            n=attempt.number,
            kind="flexnbd listener" if self._options.flexnbd else kind,
            tls=", TLS" if attempt.wire is not None and attempt.wire.client.tls else "",
            mode=self._options.copy_mode.value,
        )
        self.copier.pump(attempt)
        if self.outcome is None:
            # Last: whoever waits on ``started`` may call back into us at once.
            self._settle_start(StartOutcome(True, MIRROR_STARTED, plain_target=bool(attempt.plain)))

    # -- failures -------------------------------------------------------------------------

    def fail(
        self, attempt: Attempt, message: str, detail: str, reason: FailureReason | None = None
    ) -> None:
        """The current attempt failed: close it, and tell the job (which moves the role).

        ``message`` is flexnbd's reply if this ends the job before a good
        negotiation; after one it is only logged.  ``reason`` is what the
        counters say (by default the one of ``message``).
        """
        job = self._job
        if attempt is not self._attempt or job.final:
            return
        self.last_error = detail
        state = job.state
        self.abandon_attempt()
        _log.warn(
            "mirror of {export} to {dest}: attempt {n} failed in {state}: {why}",
            export=self._export.name,
            dest=str(self.destination),
            n=attempt.number,
            state=state,
            why=detail,
        )
        counted = reason if reason is not None else REASON_OF_REPLY[message or REJECTED]
        self.last_failure = counted.value
        if state == MigrationState.COMMITTING:
            # The commit may have landed: neither serve nor hand over.
            job.fire(MigrationTrigger.FAIL, detail)
            self._switchover.resolve_from_lease()
            return
        if not job.negotiated:
            self._stats.failures[counted] += 1
            job.fire(MigrationTrigger.FAIL, detail)
            self.end(MirrorResult("failed", False, detail), message or REJECTED, detail)
            return
        self.lost_attempt(counted, detail)
        job.fire(MigrationTrigger.FAIL, detail)
        if job.state == MigrationState.RECLAIMING:
            self._switchover.reclaim()  # the lease was being offered: it comes back first

    def _gave_up(self, attempt: Attempt, reason: str) -> None:
        """The passes never converged: the job has failed (``give_up``); clients go on here."""
        self.last_error = reason
        self._stats.failures[FailureReason.NOT_CONVERGED] += 1
        _log.warn("mirror of {export}: {why}", export=self._export.name, why=reason)
        self.close_attempt(attempt)
        self.end(MirrorResult("failed", False, reason))

    # -- the retry policy --------------------------------------------------------------

    def lost_attempt(self, reason: FailureReason, detail: str) -> None:
        """An attempt after a good negotiation is lost: count it, and decide whether to retry.

        An error no retry heals (:data:`PERMANENT`), or the policy's budget
        spent (``max_retries`` lost attempts, or ``retry_for`` seconds since
        the first), makes the job give up once it is in ``retry_wait``
        (where every lost attempt goes, after the lease is back): it ends
        ``failed`` with this reason.  Otherwise it is counted as a retry.
        """
        self.last_failure = reason.value
        self.last_error = detail
        options = self._options
        now = self._clock.seconds()
        if self._first_lost_at is None:
            self._first_lost_at = now
        self._lost += 1
        why = None
        if reason in PERMANENT:
            why = f"{reason.value}: {detail}"
        elif options.max_retries is not None and self._lost > options.max_retries:
            why = f"{reason.value}: {detail} (retried {options.max_retries} times)"
        elif options.retry_for is not None and now - self._first_lost_at >= options.retry_for:
            why = f"{reason.value}: {detail} (retried for {options.retry_for:g} s)"
        if why is None:
            self._stats.retries[reason] += 1
            return
        self._stats.failures[reason] += 1
        self._giving_up = why

    def _retry_wait_entered(self) -> None:
        # Called inside the transition: decide after it, not in it.
        if self._giving_up is not None:
            self._clock.call_later(0, self._give_up)

    def _give_up(self) -> None:
        why = self._giving_up
        if why is None or self._job.state != MigrationState.RETRY_WAIT:
            return
        _log.warn(
            "mirror of {export} to {dest}: giving up: {why}",
            export=self._export.name,
            dest=str(self.destination),
            why=why,
        )
        self._job.fire(MigrationTrigger.GIVE_UP, why)
        self.end(MirrorResult("failed", False, why), REJECTED, why)

    def abandon_attempt(self) -> None:
        """Stop everything of the current attempt; callbacks of it become no-ops."""
        attempt = self._attempt
        self._attempt = Attempt(attempt.number)
        for timer in attempt.timers():
            cancel_call(timer)
        wire, attempt.wire = attempt.wire, None
        if wire is not None:
            self._closing.append(wire.closed)
            wire.abort()
        if self.mirror is not None:
            self.mirror.release(attempt)

    def close_attempt(self, attempt: Attempt) -> None:
        """The attempt is done with: DISC and a clean close."""
        wire = attempt.wire
        for timer in attempt.timers():
            cancel_call(timer)
        self._attempt = Attempt(attempt.number)
        if wire is not None:
            self._closing.append(wire.closed)
            wire.disconnect()
        if self.mirror is not None:
            self.mirror.release(attempt)

    def arm_reply_timer(self, attempt: Attempt) -> None:
        if attempt.reply_timer is None:
            attempt.reply_timer = self._clock.call_later(
                self._options.reply_timeout, self._reply_timeout, attempt
            )

    def settle_reply_timer(self, attempt: Attempt) -> None:
        """A reply came: the next one has a full timeout again, or none is awaited."""
        timer = attempt.reply_timer
        if timer is None:
            return
        if attempt.awaiting_reply():
            timer.reset(self._options.reply_timeout)
        else:
            cancel_call(timer)
            attempt.reply_timer = None

    def _reply_timeout(self, attempt: Attempt) -> None:
        attempt.reply_timer = None
        if attempt is self._attempt:
            self.fail(
                attempt,
                "",
                f"no reply within {self._options.reply_timeout} s",
                FailureReason.REPLY_TIMEOUT,
            )

    # -- the end ---------------------------------------------------------------------------

    def set_write_cap(self, cap: int | None) -> None:
        if cap != self._write_cap:
            self._write_cap = cap
            self._gate.set_write_cap(cap)

    def _settle_start(self, outcome: StartOutcome) -> None:
        self.outcome = outcome
        self.started.callback(outcome)

    # -- the clients at the commit (ferry.migrate.carry) ----------------------------------

    def carry(self, attempt: Attempt) -> None:
        """The commit goes next: take the clients along, those that can come."""
        # Their requests held so far were held by this node; the clients that
        # move are never released here, so their wait counts now or never.
        self._job.note_hold(self._gate.longest_hold)
        self.carriage = Carriage(
            self._export.name,
            self._gate,
            self._carrier,
            attempt.landing,
            self._clock,
            self._tracer,
        )
        self._export.last_handoff = self.carriage.counts
        if attempt.wire is not None:
            self.carriage.send(attempt.wire)

    def clients_handed_over(self) -> None:
        """The destination has the image: what moved is released, every other client goes."""
        carriage = self.carriage
        if carriage is None:  # a commit resolved after this node stopped (never, today)
            carriage = Carriage(
                self._export.name, self._gate, None, None, self._clock, self._tracer
            )
            self._export.last_handoff = carriage.counts
        self.carriage = None
        carriage.handed_over(self.destination_name)

    def clients_taken_back(self) -> None:
        """The image stays: the clients that were moving are served here again."""
        carriage, self.carriage = self.carriage, None
        if carriage is not None:
            carriage.taken_back()

    def end(self, result: MirrorResult, start_message: str = "", detail: str = "") -> None:
        """The job has ended (its chart is final): report it, once the sockets are closed."""
        self.clients_taken_back()  # a job that ends here keeps its clients (none, if handed over)
        self.set_write_cap(None)
        if self.mirror is not None:
            self.mirror.release(self._attempt)  # none is left on a wire that is gone
        for undo in self._unobserve:
            undo()
        self._unobserve = []
        if self.outcome is None:
            self._settle_start(StartOutcome(False, start_message or CANCELLED, detail))
        self.result = result
        if result.state == "completed":
            self._stats.completed += 1
        _log.info(
            "mirror of {export} to {dest} ended {state}: {reason}",
            export=self._export.name,
            dest=str(self.destination),
            state=result.state,
            reason=result.reason,
        )
        # ``finished`` means the socket is closed too: a caller may stop the
        # destination, or the reactor, at once.
        closing = [d for d in self._closing if not d.called]
        self._closing = []
        if closing:
            gatherResults(closing).addBoth(lambda _: self.finished.callback(result))
        else:
            self.finished.callback(result)

    @property
    def attempt(self) -> Attempt:
        """The attempt being made now (for tests and logs)."""
        return self._attempt

