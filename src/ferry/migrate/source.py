"""The migration source on Twisted: one :class:`MirrorSource` runs one mirror job.

:class:`ferry.migrate.job.MigrationJob` decides (passes, convergence,
retries, counters); this module moves the bytes and tells the job and the
export's role what the wire said.  One attempt is one TCP connection:

1. connect (``connecting`` / ``reconnecting``); refused or unreachable on the
   first attempt ends the job: "Mirror failed to connect".
2. negotiate (``negotiating`` / ``renegotiating``): ``FERRY_OPT_MIGRATE``
   first (ACK: a ferry listener, the mirror ends in a handoff; ERR_UNSUP: a
   plain NBD server, the mirror ends in FLUSH and DISC and this node keeps
   the image), then GO.  No hello within ``hello_timeout``: "Remote server
   failed to respond"; any refusal or broken handshake: "Mirror was
   rejected"; another size: "Remote size does not match local size".
   :meth:`MirrorSource.start`'s Deferred fires here, with the outcome.
3. passes (``bulk_pass``, ``dirty_pass``): the plan's requests go out
   pipelined (at most ``max_in_flight`` requests and ``max_bytes_in_flight``
   bytes unanswered) and paced by the job's rate limiter; each good reply is
   :meth:`~MigrationJob.sent`, and when the plan is exhausted and answered,
   :meth:`~MigrationJob.end_of_pass` decides.
4. switchover (``quiescing``): the role goes ``quiescing``, the gate holds
   client requests; once the writes in flight have landed the last pass is
   planned, sent, and FLUSHed.  Then, for a ferry destination, the role
   goes ``handing_off`` and FERRY_CMD_COMMIT carries the fencing token
   (``committing``): an OK reply is the handoff (``completed``, role
   ``handed_off``, clients disconnected, then the finish action); an error
   reply is a definite no (the job retries, role back to ``migrating``);
   a lost connection or no reply is ``in_doubt`` for both machines, clients
   still held, until :meth:`MirrorSource.resolve`.

With a lease (``serve --lockspace``) the switchover also moves the lease:
after the last FLUSH the source offers it, and the commit carries the
offer's token; the destination takes the lease over by that token before it
acknowledges.  An acknowledgement completes the hand-over (the source's
lease is released); a refusal takes the lease back *before* the held
clients are released (until then the data plane would answer them EIO);
a lost acknowledgement is settled by asking the lockspace, retried every
``RESOLVE_RETRY`` seconds while it cannot be reached.

With ``MirrorOptions.flexnbd`` the destination is a ``flexnbd listen`` (or a
``ferry listen --oldstyle``) and the stream is flexnbd's: no option, an
oldstyle hello is required (its size checked as above), every request
carries the handle ``.MIRROR.`` so only one is in flight at a time, zeroes
go as WRITEs unless the hello advertises WRITE_ZEROES, and the handoff is
FLUSH (flexnbd's listener advertises and performs it; flexnbd's own sender
sends none) then NBD_CMD_DISC, which means "you have it all: take control".
flexnbd's listener acknowledges nothing after DISC, so the source counts the
image as ``handed_off`` once DISC is written: weaker than ferry's two-phase
commit, where the destination's reply after its fsync is the handoff.  If
the listener fails after the DISC, nobody serves the image until an
operator steps in; with ferry's commit the source would know (``in_doubt``).

Any failure of an attempt after a good negotiation (an error reply, no reply
within ``reply_timeout``, a lost or broken connection) closes the connection
and fires the job's ``fail``: the job waits out its backoff in
``retry_wait`` and fires ``retry``, on which this module reconnects.  A
failure in ``quiescing`` releases the held clients first (role back to
``migrating``).  Before a good negotiation a failure ends the job, the role
goes back to ``serving``, and the start outcome carries flexnbd's reply.

Every callback of an attempt checks that its attempt is still the current
one (``_attempt``), so a late reply, timer or ``connectionLost`` from a
connection already given up cannot touch the next attempt.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.clock import Clock, DelayedCall
from ferry.migrate.backoff import INITIAL_DELAY, MAX_DELAY, Backoff
from ferry.migrate.convergence import DEFAULT_MAX_DOWNTIME, DEFAULT_MAX_PASSES, ConvergencePolicy
from ferry.migrate.gate import ClientGate
from ferry.migrate.job import MigrationJob
from ferry.migrate.lease import InDoubtOutcome, OutgoingLease
from ferry.migrate.passes import DEFAULT_MAX_DATA_LENGTH, CopyOp, OpKind, PassPlan
from ferry.migrate.progress import MigrationProgress
from ferry.migrate.stats import FailureReason, MigrationStats
from ferry.migrate.wire import MirrorProtocol, MirrorProtocolFactory
from ferry.nbd.constants import (
    FERRY_OPT_MIGRATE,
    Command,
    OptionReply,
    TransmissionFlag,
)
from ferry.nbd.events import (
    Event,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    Reply,
)
from ferry.nbd.locate import Location
from ferry.serve.export import Export
from ferry.storage.dirtymap import DirtyMap
from ferry.trace import Tracer

__all__ = [
    "FAILED_TO_CONNECT",
    "MIRROR_STARTED",
    "NO_HELLO",
    "REJECTED",
    "SIZE_MISMATCH",
    "CannotBreak",
    "Connector",
    "Destination",
    "FinishAction",
    "MirrorError",
    "MirrorOptions",
    "MirrorResult",
    "MirrorSource",
    "NotMirroring",
    "StartOutcome",
    "tcp_connector",
]

_log = Logger()

# flexnbd's replies to `mirror`, word for word (the control command prints them).
MIRROR_STARTED: Final = "Mirror started"
FAILED_TO_CONNECT: Final = "Mirror failed to connect"
NO_HELLO: Final = "Remote server failed to respond"
REJECTED: Final = "Mirror was rejected"
SIZE_MISMATCH: Final = "Remote size does not match local size"
CANCELLED: Final = "Mirror was cancelled"
LEASE_LOST: Final = "Mirror failed: the lease was lost"
#: The counted reason (``ferry_migration_*_total{reason}``) of a failure that
#: carries one of flexnbd's replies; the other failures name their own.
_REASON_OF_REPLY: Final = {
    FAILED_TO_CONNECT: FailureReason.CONNECT,
    NO_HELLO: FailureReason.NO_HELLO,
    REJECTED: FailureReason.REJECTED,
    SIZE_MISMATCH: FailureReason.SIZE_MISMATCH,
}
#: Seconds between attempts to settle ``in_doubt`` from an unreachable lockspace.
RESOLVE_RETRY: Final = 2.0

#: Requests and data bytes unanswered at once: enough to keep a fast link
#: busy across a round trip, small enough to bound the transport's buffer.
#: The request count matters for dirty passes (a 4 KiB WRITE each): the
#: more replies one read brings back, the more WRITEs one ``sendmsg`` sends.
DEFAULT_MAX_IN_FLIGHT: Final = 512
DEFAULT_MAX_BYTES_IN_FLIGHT: Final = 32 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_HELLO_TIMEOUT: Final = 5.0
DEFAULT_REPLY_TIMEOUT: Final = 60.0
#: The dirty map's chunk: a 4 KiB client write dirties 4 KiB, not the map's
#: default 64 KiB.  With 64 KiB chunks a 20 MB/s random 4 KiB writer dirties
#: over 300 MB/s of chunks, more than the stream sends, so passes never
#: converge; the map costs one byte per chunk (256 KiB for 1 GiB).
DIRTY_GRANULARITY: Final = 4096
#: At the end of every pass that wrote anything since the last FLUSH, the
#: destination is FLUSHed while clients still run, so the switchover's FLUSH
#: has only the last pass to write back.  Otherwise it writes back the
#: whole image after a bulk pass (about 0.7 s for 1 GiB here) and, after a
#: dirty pass, thousands of scattered blocks: 82 of a 157 ms hold for the
#: 21 MB that two dirty passes had left (benchmarks/migrate.py, 20 MB/s
#: writer).
#:
#: The FLUSH overlaps the next pass, which starts at once: waiting for it
#: cost a third of a migration under writes (0.7 s after the bulk pass and
#: 0.3 s after a 35 MB dirty pass, out of 3.5 s), while clients dirtied
#: more for the next pass.  Only a switchover waits: when a pass ends that
#: would switch over, its FLUSH goes first and the decision is taken again
#: once it is answered, so the rate that predicts the last pass includes a
#: FLUSH, as the last pass does, and the destination holds nothing
#: unflushed but the last pass when clients are held.  A pass that ends
#: while the previous FLUSH is still going waits for it before deciding.
PREFLUSH_BYTES: Final = 0
#: The shortest data request a rate limit cuts requests down to (see
#: ``MirrorSource._longest_request``): at 1 KB/s, one request a minute.
MIN_PACED_REQUEST: Final = 64 * 1024


class MirrorError(Exception):
    """A control request the mirror cannot do in its state; ``str`` is the reason."""


class NotMirroring(MirrorError):
    """``break`` / ``mirror_max_bps`` when the job has already ended."""


class CannotBreak(MirrorError):
    """``break`` once the commit may have landed (committing, in_doubt): it would be a guess."""


class FinishAction(enum.Enum):
    """What the source does with itself once the destination owns the image (flexnbd's)."""

    EXIT = "exit"
    UNLINK = "unlink"
    NOTHING = "nothing"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to mirror to: ``host`` (a name or an address), ``port``, optional ``bind`` address."""

    host: str
    port: int
    bind: str | None = None
    export_name: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MirrorOptions:
    """Everything a ``mirror`` command can say, with ferry's defaults."""

    max_bps: int | None = None
    max_downtime: float = DEFAULT_MAX_DOWNTIME
    max_passes: int = DEFAULT_MAX_PASSES
    action: FinishAction = FinishAction.EXIT  # flexnbd's default
    fencing_token: int = 0  # until leases exist
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT
    max_data_length: int = DEFAULT_MAX_DATA_LENGTH
    retry_initial: float = INITIAL_DELAY
    retry_max: float = MAX_DELAY
    destination_empty: bool = False
    flexnbd: bool = False  # the destination is a flexnbd listener: its stream and handoff

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "hello_timeout", "reply_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_in_flight < 1 or self.max_bytes_in_flight < 1 or self.max_data_length < 1:
            raise ValueError("in-flight limits and max_data_length must be positive")


@dataclass(frozen=True, slots=True)
class StartOutcome:
    """How the first negotiation went: what ``mirror`` answers.

    ``message`` is flexnbd's reply text; ``detail`` says why, for logs.
    ``plain_target``: the destination is an NBD server without ferry's
    migration extension (a mirror, no handoff).
    """

    ok: bool
    message: str
    detail: str = ""
    plain_target: bool = False

    @property
    def reply(self) -> str:
        """The control socket's reply line: ``0: Mirror started`` or ``1: ...``."""
        return f"{0 if self.ok else 1}: {self.message}"


@dataclass(frozen=True, slots=True)
class MirrorResult:
    """How the job ended: the migration chart's final state, and whether the image left."""

    state: str
    handed_off: bool
    reason: str = ""


Connector = Callable[[Destination, Factory, float], "Deferred[Any]"]
"""Connects ``factory`` to the destination within a timeout; fires with the protocol."""


def tcp_connector(reactor: IReactorTCP) -> Connector:
    """The real :data:`Connector`: TCP to a name or address, from ``bind`` if given."""

    def connect(destination: Destination, factory: Factory, timeout: float) -> Deferred[Any]:
        bind = None if destination.bind is None else (destination.bind, 0)
        endpoint = HostnameEndpoint(
            reactor, destination.host, destination.port, timeout=timeout, bindAddress=bind
        )
        return endpoint.connect(factory)

    return connect


class _Job(MigrationJob):
    """The job, telling the source when its retry timer has fired."""

    def __init__(self, on_reconnect: Callable[[], None], **kwargs: Any) -> None:
        self._on_reconnect = on_reconnect
        super().__init__(**kwargs)

    def on_enter_reconnecting(self, event: object) -> None:
        self._on_reconnect()


@dataclass(slots=True)
class AttemptCounters:
    """What one attempt sent (reset on every negotiation): for tests and logs."""

    data_requests: int = 0
    data_bytes: int = 0
    zero_requests: int = 0
    zero_bytes: int = 0


@dataclass(slots=True)
class _Attempt:
    """One connection's worth of state; a new one for every connect."""

    number: int
    wire: MirrorProtocol | None = None
    plain: bool | None = None  # learned from the answer to FERRY_OPT_MIGRATE
    negotiated: Negotiated | None = None
    hello_timer: DelayedCall | None = None
    reply_timer: DelayedCall | None = None
    plan: PassPlan | None = None
    ops: Iterator[CopyOp] | None = None
    queue: deque[CopyOp] = field(default_factory=deque)  # split ops, sent before ``ops``
    exhausted: bool = False
    in_flight: dict[int, CopyOp] = field(default_factory=dict)
    bytes_in_flight: int = 0
    paced: CopyOp | None = None  # reserved with the limiter, waiting to go
    pace_timer: DelayedCall | None = None
    flush_handle: int | None = None
    preflush_handle: int | None = None  # a FLUSH between passes (see PREFLUSH_BYTES)
    preflush: tuple[int, float, bool] = (0, 0.0, False)  # its bytes, when it went, measurable?
    # Data went while a FLUSH was in flight since the last FLUSH was sent: that
    # FLUSH may have written some of it back, so the next one says too little.
    overlapped: bool = False
    unflushed_bytes: int = 0  # written to the destination since the last FLUSH went
    commit_handle: int | None = None
    holding: bool = False  # the gate holds clients for this attempt's switchover
    # When the switchover's steps ended: clients held, last pass sent, FLUSHed (for the log).
    switchover: list[float] = field(default_factory=list)
    last_pass_bytes: int = 0
    # The lease is being offered for this attempt's commit (prepare_migrate
    # not yet answered); an attempt broken off meanwhile lets its held
    # clients go only once the lease is this node's again (release_pending).
    offering: bool = False
    release_pending: bool = False


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
    ) -> None:
        self.export = export
        # The export's counters, kept across jobs (by the MirrorManager).
        self.stats = MigrationStats() if stats is None else stats
        self.destination = destination
        self.lease = lease
        self.gate = gate
        self.clock = clock
        self.options = options = options or MirrorOptions()
        self._connector = connector
        self._stop_process = stop_process
        if options.action is FinishAction.EXIT and stop_process is None:
            raise ValueError("the exit action needs a stop_process callback")
        self.image = export.image
        self.dirty = DirtyMap(self.image.size, DIRTY_GRANULARITY)
        self.job = _Job(
            self._reconnect_soon,
            image=self.image,
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
        )
        self.started: Deferred[StartOutcome] = Deferred()
        self.finished: Deferred[MirrorResult] = Deferred()
        self.outcome: StartOutcome | None = None
        self.result: MirrorResult | None = None
        self.counters = AttemptCounters()
        self.last_error = ""
        self._attempt = _Attempt(0)
        self._unobserve: Callable[[], None] | None = None
        self._write_cap: int | None = None
        self._running = False
        self._closing: list[Deferred[None]] = []  # connections given up, not yet closed
        # flexnbd's requests all carry one handle: one unanswered at a time.
        self._max_in_flight = 1 if options.flexnbd else options.max_in_flight

    def __repr__(self) -> str:
        return f"<MirrorSource {self.export.name} -> {self.destination} {self.job.state}>"

    # -- the control plane's calls ---------------------------------------------------

    @property
    def state(self) -> str:
        """The migration chart's state."""
        return self.job.state

    def start(self) -> Deferred[StartOutcome]:
        """Begin: role ``migrating``, connect.  Fires once the first negotiation is settled."""
        if self._running or self.job.final:
            raise MirrorError("this mirror has already been started")
        if self.export.state != "serving":
            raise MirrorError(f"export {self.export.name} is {self.export.state}, not serving")
        self._running = True
        # Observe before the bulk pass clears the map: nothing written from
        # now on can be missed.
        self._unobserve = self.export.observe_writes(self.dirty.mark)
        self.export.trigger("migrate")
        self._connect()
        return self.started

    def cancel(self) -> None:
        """``break``: stop the job and keep serving; refused once the commit may have landed."""
        if self.job.final:
            raise NotMirroring("not mirroring")
        if self.job.chart.property(self.job.state, "commit_sent"):
            raise CannotBreak(
                f"cannot break in {self.job.state}: the commit may have reached the destination"
            )
        attempt = self._attempt
        self._abandon_attempt()
        if attempt.holding:
            self._release_clients_of(attempt)
        self.job.break_migration()  # type: ignore[attr-defined]
        self.export.trigger("break_migration")
        self._end(MirrorResult("cancelled", False, "break"), CANCELLED)

    def lease_lost(self, reason: str) -> None:
        """The image's lease is gone and the role ``fenced``: nothing is left to hand over.

        The job ends ``failed`` at once, wherever no commit may have landed:
        copying on would only read an image this node may no longer own,
        and a switchover would offer a lease it does not have.  Held
        clients are let go, to the EIO a fenced export answers.  Once the
        commit has gone (committing, in_doubt) nobody may say any more
        whether the destination took the image, and this node may not
        write it either way: see :meth:`_settle_fenced`.
        """
        if self.job.state == "committing":
            self._abandon_attempt()  # whatever the commit's answer, it comes too late
            self.job.fail()  # type: ignore[attr-defined]
        if self.job.state == "in_doubt":
            self._settle_fenced()
            return
        if self.job.final:
            return
        attempt = self._attempt
        self._abandon_attempt()
        if attempt.holding:
            self._release_clients()
        self.last_error = f"the lease was lost: {reason}"
        self.stats.failures[FailureReason.LEASE] += 1
        self.job.lease_lost()  # type: ignore[attr-defined]
        self._end(MirrorResult("failed", False, self.last_error), LEASE_LOST, self.last_error)

    def set_max_bps(self, limit: int | None) -> None:
        """``mirror_max_bps``: the new limit applies to the very next request."""
        if self.job.final:
            raise NotMirroring("Not currently mirroring")
        self.job.set_max_bps(limit)
        timer = self._attempt.pace_timer
        if timer is not None and timer.active():
            timer.reset(self.job.limiter.backlog())

    def progress(self) -> MigrationProgress:
        """The migration status fields now."""
        return self.job.progress()

    def resolve(self, *, handed_off: bool) -> None:
        """Settle ``in_doubt`` once someone (the lease, an operator) knows who owns the image."""
        if self.job.state != "in_doubt":
            raise MirrorError(f"nothing to resolve in {self.job.state}")
        if handed_off:
            self.job.resolve_committed()  # type: ignore[attr-defined]
            self.export.trigger("resolve_handed_off")
            self._hand_over()
        else:
            self.stats.failures[FailureReason.IN_DOUBT] += 1
            self.job.resolve_aborted()  # type: ignore[attr-defined]
            self.export.trigger("resolve_serving")
            self._release_clients()
            self._end(MirrorResult("failed", False, "resolved: the destination did not commit"))

    def _resolve_from_lease(self) -> None:
        """``in_doubt``: the lockspace knows whether the destination took the lease."""
        lease = self.lease
        if lease is None or self.job.state != "in_doubt":
            return  # an operator (or flexnbd's weaker handoff) must settle it

        def settled(outcome: InDoubtOutcome) -> None:
            if self.job.state == "in_doubt":
                _log.info(
                    "mirror of {export}: the lease says {outcome}",
                    export=self.export.name,
                    outcome=outcome.value,
                )
                self.resolve(handed_off=outcome is InDoubtOutcome.HANDED_OFF)

        def unknown(failure: Failure) -> None:
            if self.job.state != "in_doubt":
                return
            if lease.state == "fenced":
                self._settle_fenced()
                return
            self._lease_trouble(failure, "ask about")
            self.clock.call_later(RESOLVE_RETRY, self._resolve_from_lease)

        maybeDeferred(lease.resolve_in_doubt).addCallbacks(settled, unknown)

    def _settle_fenced(self) -> None:
        """``in_doubt``, and the lease ran out before the lockspace could say who won.

        Whether the destination took the image is still unknown, but this
        node may never write it again either way, so the job ends: the
        role goes ``fenced``, held clients meet its EIO, and the operator
        asks the lockspace (``ferry lock status``) who holds the image.
        """
        self.stats.failures[FailureReason.IN_DOUBT] += 1
        self.job.resolve_aborted()  # type: ignore[attr-defined]
        if self.export.state == "in_doubt":  # (from handing_off it is fenced already)
            self.export.trigger("resolve_fenced")
        self._release_clients()
        why = "the lease ran out while the commit was in doubt: this node is fenced"
        self._end(MirrorResult("failed", False, why))

    def _lease_trouble(self, failure: Failure, doing: str) -> None:
        _log.error(
            "mirror of {export}: cannot {doing} the lease: {why}",
            export=self.export.name,
            doing=doing,
            why=failure.getErrorMessage(),
        )

    # -- connecting ---------------------------------------------------------------------

    def _connect(self) -> None:
        attempt = self._attempt = _Attempt(self._attempt.number + 1)
        factory = MirrorProtocolFactory(
            self,
            self.image.size,
            self.destination.export_name,
            flexnbd=self.options.flexnbd,
            resource="" if self.lease is None else self.lease.resource,
        )
        try:
            d = self._connector(self.destination, factory, self.options.connect_timeout)
        except Exception as exc:  # a bad bind address fails before any Deferred
            self._fail(attempt, FAILED_TO_CONNECT, f"cannot connect: {exc}")
            return

        def failed(failure: Failure) -> None:
            if attempt is self._attempt and attempt.wire is None:
                self._fail(attempt, FAILED_TO_CONNECT, failure.getErrorMessage())

        d.addErrback(failed)

    def _reconnect_soon(self) -> None:
        # Called inside the job's ``retry`` transition: connect after it, not in it.
        self.clock.call_later(0, self._reconnect)

    def _reconnect(self) -> None:
        if self.job.state == "reconnecting":
            self._connect()

    # -- WireHandler -------------------------------------------------------------------

    def wire_connected(self, wire: MirrorProtocol) -> None:
        attempt = self._attempt
        if attempt.wire is not None or self.job.state not in ("connecting", "reconnecting"):
            wire.abort()  # a connection nobody is waiting for any more
            return
        attempt.wire = wire
        attempt.hello_timer = self.clock.call_later(
            self.options.hello_timeout, self._hello_timeout, attempt
        )
        self.job.connected()  # type: ignore[attr-defined]

    def wire_events(self, wire: MirrorProtocol, events: list[Event]) -> None:
        attempt = self._attempt
        for event in events:
            if wire is not attempt.wire or attempt is not self._attempt:
                return  # given up while handling an earlier event
            if isinstance(event, Reply):
                self._reply(attempt, event)
            elif isinstance(event, OptionAnswered):
                self._option_answered(attempt, event)
            elif isinstance(event, Negotiated):
                self._negotiated(attempt, event)
            elif isinstance(event, NegotiationFailed):
                detail = f"{event.error.name}: {event.message}"
                self._fail(attempt, REJECTED, f"the destination refused: {detail}")

    def wire_broken(self, wire: MirrorProtocol, reason: str) -> None:
        attempt = self._attempt
        if wire is attempt.wire:
            self._fail(attempt, REJECTED, f"protocol error: {reason}", FailureReason.PROTOCOL_ERROR)

    def wire_lost(self, wire: MirrorProtocol, reason: str) -> None:
        attempt = self._attempt
        if wire is attempt.wire:
            self._fail(
                attempt, REJECTED, f"connection lost: {reason}", FailureReason.CONNECTION_LOST
            )

    # -- negotiating -------------------------------------------------------------------

    def _hello_timeout(self, attempt: _Attempt) -> None:
        attempt.hello_timer = None
        if attempt is self._attempt and attempt.negotiated is None:
            self._fail(attempt, NO_HELLO, f"no hello within {self.options.hello_timeout} s")

    def _option_answered(self, attempt: _Attempt, event: OptionAnswered) -> None:
        if event.option != FERRY_OPT_MIGRATE:
            return
        if event.reply == OptionReply.ACK:
            attempt.plain = False
        elif event.reply == OptionReply.ERR_UNSUP:
            attempt.plain = True
        else:
            detail = f"{event.reply.name}: {event.message}" if event.message else event.reply.name
            self._fail(attempt, REJECTED, f"the destination refused the migration: {detail}")

    def _negotiated(self, attempt: _Attempt, negotiated: Negotiated) -> None:
        _cancel(attempt.hello_timer)
        attempt.hello_timer = None
        plain = attempt.plain if attempt.plain is not None else True  # oldstyle: no options
        if self.options.flexnbd:
            if not negotiated.oldstyle:
                self._fail(attempt, REJECTED, "not a flexnbd listener: its hello is not oldstyle")
                return
            plain = False  # flexnbd's listener takes control at the DISC
        if negotiated.size != self.image.size:
            self._fail(
                attempt,
                SIZE_MISMATCH,
                f"destination has {negotiated.size} bytes, this image {self.image.size}",
            )
            return
        if negotiated.transmission_flags & TransmissionFlag.READ_ONLY:
            self._fail(attempt, REJECTED, "the destination export is read-only")
            return
        if not plain and self.image.read_only:
            self._fail(
                attempt,
                REJECTED,
                "a read-only export cannot hand control over (its lease is read-only): "
                "mirror it into a plain NBD server, or serve it read-write to migrate it",
            )
            return
        if plain and self.options.action is not FinishAction.NOTHING:
            self._fail(
                attempt,
                REJECTED,
                "the destination is a plain NBD server: it cannot take control, "
                f"so action {self.options.action.value} is refused (use nothing)",
            )
            return
        attempt.plain = plain
        attempt.negotiated = negotiated
        self.counters = AttemptCounters()
        self.job.max_data_length = min(self.options.max_data_length, negotiated.max_block_size)
        self.job.accepted()  # type: ignore[attr-defined]
        _log.info(
            "mirror of {export} to {dest}: attempt {n} negotiated ({kind})",
            export=self.export.name,
            dest=str(self.destination),
            n=attempt.number,
            kind="plain NBD target"
            if plain
            else ("flexnbd listener" if self.options.flexnbd else "ferry listener"),
        )
        self._pump(attempt)
        if self.outcome is None:
            # Last: whoever waits on ``started`` may call back into us at once.
            self._settle_start(StartOutcome(True, MIRROR_STARTED, plain_target=plain))

    # -- passes --------------------------------------------------------------------------

    def _pump(self, attempt: _Attempt) -> None:
        """Send what the plan, the limiter and the in-flight bounds allow now."""
        options = self.options
        while attempt is self._attempt and attempt.pace_timer is None:
            plan = self.job.plan
            if plan is None:
                return
            if plan is not attempt.plan:
                attempt.plan = plan
                attempt.ops = plan.ops()
                attempt.queue.clear()
                attempt.exhausted = False
            if attempt.exhausted:
                if not attempt.in_flight:
                    self._pass_done(attempt)
                return
            if (
                len(attempt.in_flight) >= self._max_in_flight
                or attempt.bytes_in_flight >= options.max_bytes_in_flight
            ):
                return
            op = self._next_op(attempt)
            if op is None:
                attempt.exhausted = True
                continue
            if op.kind is OpKind.DATA or not self._can_write_zeroes(attempt):
                delay = self.job.limiter.reserve(op.length)
                if delay > 0:
                    attempt.paced = op
                    attempt.pace_timer = self.clock.call_later(delay, self._paced, attempt)
                    return
            self._send_op(attempt, op)

    def _paced(self, attempt: _Attempt) -> None:
        attempt.pace_timer = None
        op, attempt.paced = attempt.paced, None
        if attempt is not self._attempt or op is None:
            return
        self._send_op(attempt, op)
        self._pump(attempt)

    def _next_op(self, attempt: _Attempt) -> CopyOp | None:
        if attempt.queue:
            return attempt.queue.popleft()
        assert attempt.ops is not None
        op = next(attempt.ops, None)
        if op is None:
            return None
        step = self._longest_request(attempt, op)
        if op.length <= step:
            return op
        pieces = [CopyOp(o, min(step, op.end - o), op.kind) for o in range(op.offset, op.end, step)]
        attempt.queue.extend(pieces[1:])
        return pieces[0]

    def _longest_request(self, attempt: _Attempt, op: CopyOp) -> int:
        """How long one request for ``op`` may be.

        Zeroes without WRITE_ZEROES go as data, in requests the destination
        takes.  Under a rate limit a data request is at most one second's
        worth of it (and at least ``MIN_PACED_REQUEST``), so the limit is
        held smoothly and the source is never silent for long between
        requests: a listener drops a sender silent for ``SENDER_TIMEOUT``.
        """
        if op.kind is OpKind.ZERO and self._can_write_zeroes(attempt):
            return op.length
        step = self.job.max_data_length
        limit = self.job.limiter.limit
        if limit is not None:
            paced = max(MIN_PACED_REQUEST, limit - limit % MIN_PACED_REQUEST)
            step = min(step, paced)
        return step

    def _can_flush(self, attempt: _Attempt) -> bool:
        assert attempt.negotiated is not None
        return bool(attempt.negotiated.transmission_flags & TransmissionFlag.SEND_FLUSH)

    def _can_write_zeroes(self, attempt: _Attempt) -> bool:
        assert attempt.negotiated is not None
        return bool(attempt.negotiated.transmission_flags & TransmissionFlag.SEND_WRITE_ZEROES)

    def _send_op(self, attempt: _Attempt, op: CopyOp) -> None:
        wire = attempt.wire
        assert wire is not None
        if op.kind is OpKind.DATA:
            data = self.image.pread(op.offset, op.length)
            handle = wire.request(Command.WRITE, op.offset, data=data)
            self.counters.data_requests += 1
            self.counters.data_bytes += op.length
            attempt.bytes_in_flight += op.length
        elif self._can_write_zeroes(attempt):
            handle = wire.request(Command.WRITE_ZEROES, op.offset, op.length)
            self.counters.zero_requests += 1
            self.counters.zero_bytes += op.length
        else:
            handle = wire.request(Command.WRITE, op.offset, data=bytes(op.length))
            self.counters.data_requests += 1
            self.counters.data_bytes += op.length
            attempt.bytes_in_flight += op.length
        attempt.in_flight[handle] = op
        attempt.unflushed_bytes += op.length
        if attempt.preflush_handle is not None:
            attempt.overlapped = True
        self._arm_reply_timer(attempt)

    def _reply(self, attempt: _Attempt, reply: Reply) -> None:
        handle = reply.handle
        if handle == attempt.flush_handle:
            attempt.flush_handle = None
            self._settle_reply_timer(attempt)
            if reply.error:
                self._fail(
                    attempt,
                    "",
                    f"FLUSH failed: {reply.error.name} {reply.message}",
                    FailureReason.FLUSH_ERROR,
                )
            else:
                self._flushed(attempt)
            return
        if handle == attempt.preflush_handle:
            attempt.preflush_handle = None
            self._settle_reply_timer(attempt)
            if reply.error:
                self._fail(
                    attempt,
                    "",
                    f"FLUSH failed: {reply.error.name} {reply.message}",
                    FailureReason.FLUSH_ERROR,
                )
            else:
                flushed, sent_at, measurable = attempt.preflush
                if measurable:
                    self.job.flushed(flushed, self.clock.seconds() - sent_at)
                self._pump(attempt)  # a pass that waited on it ends now (see _pass_done)
            return
        if handle == attempt.commit_handle:
            attempt.commit_handle = None
            self._settle_reply_timer(attempt)
            self._commit_answered(attempt, reply)
            return
        op = attempt.in_flight.pop(handle)
        if op.kind is OpKind.DATA or not self._can_write_zeroes(attempt):
            attempt.bytes_in_flight -= op.length
        self._settle_reply_timer(attempt)
        if reply.error:
            what = "WRITE" if op.kind is OpKind.DATA else "zeroing"
            self._fail(
                attempt,
                "",
                f"{what} of [{op.offset}, {op.end}) failed: {reply.error.name} {reply.message}",
                FailureReason.WRITE_ERROR,
            )
            return
        self.job.sent(op)
        self._pump(attempt)

    def _pass_done(self, attempt: _Attempt) -> None:
        """Every request of the plan is answered."""
        state = self.job.state
        if state in ("bulk_pass", "dirty_pass"):
            if attempt.preflush_handle is not None:
                return  # the previous pass's FLUSH first (see PREFLUSH_BYTES)
            flush = attempt.unflushed_bytes > PREFLUSH_BYTES and self._can_flush(attempt)
            plan = self.job.plan
            assert plan is not None
            scattered = not plan.bulk  # what the FLUSH would write back
            if flush and self.job.would_switch_over():
                self._preflush(attempt, scattered=scattered)  # then decide again, flushed
                return
            started = self.job.pass_started_at
            decision = self.job.end_of_pass()
            _log.info(
                "mirror of {export}: pass {n} sent {sent} bytes in {seconds:.3f} s; {why}",
                export=self.export.name,
                n=plan.number,
                sent=plan.total_bytes,
                seconds=self.clock.seconds() - started,
                why=decision.reason,
            )
            self._set_write_cap(self.job.client_write_cap)
            if self.job.state == "quiescing":
                self._quiesce(attempt)
            else:
                if flush:
                    self._preflush(attempt, scattered=scattered)  # overlaps the next pass
                self._pump(attempt)
        elif state == "quiescing" and attempt.flush_handle is None:
            self._flush(attempt)

    def _preflush(self, attempt: _Attempt, *, scattered: bool) -> None:
        """FLUSH what the passes so far wrote, without holding anything up (PREFLUSH_BYTES)."""
        assert attempt.wire is not None
        # Only a dirty pass's scattered blocks, written with no other FLUSH
        # under way, say what the last pass's FLUSH will cost.
        measurable = scattered and not attempt.overlapped
        attempt.preflush = (attempt.unflushed_bytes, self.clock.seconds(), measurable)
        attempt.overlapped = False
        attempt.unflushed_bytes = 0
        attempt.preflush_handle = attempt.wire.request(Command.FLUSH)
        self._arm_reply_timer(attempt)

    # -- the switchover -----------------------------------------------------------------

    def _quiesce(self, attempt: _Attempt) -> None:
        self._set_write_cap(None)
        self.export.trigger("quiesce")
        attempt.holding = True
        self.gate.hold().addCallback(lambda _: self._held(attempt))

    def _held(self, attempt: _Attempt) -> None:
        if attempt is not self._attempt or self.job.state != "quiescing":
            return  # released or given up meanwhile
        attempt.switchover = [self.clock.seconds()]
        self.job.start_final_pass()
        self._pump(attempt)

    def _flush(self, attempt: _Attempt) -> None:
        assert attempt.wire is not None
        attempt.switchover.append(self.clock.seconds())
        plan = self.job.plan
        attempt.last_pass_bytes = 0 if plan is None else plan.total_bytes
        if not self._can_flush(attempt):
            self._flushed(attempt)  # a server without FLUSH writes through
            return
        attempt.unflushed_bytes = 0
        attempt.flush_handle = attempt.wire.request(Command.FLUSH)
        self._arm_reply_timer(attempt)

    def _flushed(self, attempt: _Attempt) -> None:
        wire = attempt.wire
        assert wire is not None
        attempt.switchover.append(self.clock.seconds())
        if attempt.plain:
            # A plain NBD server cannot take control: the job completes as a
            # mirror (FLUSH then DISC stand for the commit) and this node
            # keeps serving its image.
            self.job.commit()  # type: ignore[attr-defined]
            self.job.committed()  # type: ignore[attr-defined]
            self._release_clients()
            self.export.trigger("mirrored")
            self._close_attempt(attempt)
            self._end(MirrorResult("completed", False, "mirrored to a plain NBD server"))
            return
        if self.lease is not None and not self.options.flexnbd:
            attempt.offering = True
            self.lease.prepare_migrate().addCallbacks(
                lambda token: self._offered(attempt, token),
                lambda failure: self._offer_failed(attempt, failure),
            )
            return
        self._commit(attempt, self.options.fencing_token)

    def _offered(self, attempt: _Attempt, token: int) -> None:
        attempt.offering = False
        if attempt is self._attempt and self.job.state == "quiescing" and attempt.wire is not None:
            self._commit(attempt, token)
            return
        # Broken off while the lease was being offered: take it back, and
        # only then let the held clients go (they would meet EIO before).
        assert self.lease is not None
        taken_back = self.lease.cancel_migrate_out()
        taken_back.addErrback(self._lease_trouble, "take back")
        if attempt.release_pending:
            taken_back.addBoth(lambda _: self._release_clients_if_idle())

    def _offer_failed(self, attempt: _Attempt, failure: Failure) -> None:
        attempt.offering = False
        if attempt is self._attempt:
            why = f"cannot offer the lease: {failure.getErrorMessage()}"
            self._fail(attempt, "", why, FailureReason.LEASE)
        elif attempt.release_pending:
            self._release_clients_if_idle()  # the lease is held again (or fenced)

    def _commit(self, attempt: _Attempt, token: int) -> None:
        """Hand over: the commit carries ``token`` (flexnbd: DISC, and nothing is answered)."""
        wire = attempt.wire
        if attempt is not self._attempt or self.job.state != "quiescing" or wire is None:
            return  # broken off meanwhile
        self.export.trigger("hand_off")
        self.job.commit()  # type: ignore[attr-defined]
        if self.options.flexnbd:
            # DISC is flexnbd's handoff, and nothing answers it: once it is
            # written the listener has control (see the module doc).
            self._close_attempt(attempt)
            self.job.committed()  # type: ignore[attr-defined]
            self.export.trigger("handed_off")
            self._hand_over()
            return
        attempt.commit_handle = wire.commit(token)
        self._arm_reply_timer(attempt)

    def _commit_answered(self, attempt: _Attempt, reply: Reply) -> None:
        if reply.error:
            # A definite no: nothing was taken.  Clients go back to being
            # served while the job retries from scratch.
            self.last_error = f"commit refused: {reply.error.name} {reply.message}"
            self.stats.retries[FailureReason.COMMIT_REJECTED] += 1
            _log.warn("mirror of {export}: {why}", export=self.export.name, why=self.last_error)
            self._abandon_attempt()
            self.export.trigger("retry_migration")
            self.job.commit_rejected()  # type: ignore[attr-defined]
            if self.lease is None:
                self._release_clients()
                return
            # Clients go back only once the lease is ours again.
            taken_back = self.lease.cancel_migrate_out()
            taken_back.addErrback(self._lease_trouble, "take back")
            taken_back.addBoth(lambda _: self._release_clients())
            return
        self.job.committed()  # type: ignore[attr-defined]
        self.export.trigger("handed_off")
        self._log_switchover(attempt)
        self._close_attempt(attempt)
        self._hand_over()

    def _log_switchover(self, attempt: _Attempt) -> None:
        """How long the switchover held clients, step by step, against what was expected."""
        if len(attempt.switchover) != 3:
            return
        held, sent, flushed = attempt.switchover
        decision = self.job.last_decision
        expected = None if decision is None else decision.expected_downtime
        _log.info(
            "mirror of {export}: the switchover held clients {total:.3f} s (expected {expected}):"
            " last pass {bytes} bytes in {sent:.3f} s, FLUSH {flush:.3f} s, commit {commit:.3f} s",
            export=self.export.name,
            total=self.clock.seconds() - held,
            expected="?" if expected is None else f"{expected:.3f} s",
            bytes=attempt.last_pass_bytes,
            sent=sent - held,
            flush=flushed - sent,
            commit=self.clock.seconds() - flushed,
        )

    def _hand_over(self) -> None:
        """The destination owns the image: drop the clients, then the finish action."""
        lease = self.lease
        if lease is not None and lease.state == "transferring":
            lease.complete_migrate_out().addErrback(self._lease_trouble, "release")
        elif lease is not None:
            # flexnbd's listener takes no lease: ours goes with the image.
            lease.release().addErrback(self._lease_trouble, "release")
        self.job.note_hold(self.gate.longest_hold)
        # Before the clients go: a proxy among them asks where the image went.
        destination = self.destination
        self.export.handed_to = Location(
            destination.host, destination.port, destination.export_name
        )
        self.gate.disconnect_all(f"the image was handed over to {destination}")
        action = self.options.action
        if action is FinishAction.UNLINK:
            try:
                os.unlink(self.image.path)
            except OSError as exc:
                _log.error("cannot unlink {path}: {exc}", path=str(self.image.path), exc=exc)
        elif action is FinishAction.EXIT:
            assert self._stop_process is not None
            self._stop_process()
        self._end(MirrorResult("completed", True, f"handed over to {self.destination}"))

    # -- failures -------------------------------------------------------------------------

    def _fail(
        self, attempt: _Attempt, message: str, detail: str, reason: FailureReason | None = None
    ) -> None:
        """The current attempt failed: close it, and tell the job and the role.

        ``message`` is flexnbd's reply if this ends the job before a good
        negotiation; after one it is only logged.  ``reason`` is what the
        counters say (by default the one of ``message``).
        """
        if attempt is not self._attempt or self.job.final:
            return
        self.last_error = detail
        state = self.job.state
        was_holding = attempt.holding
        self._abandon_attempt()
        _log.warn(
            "mirror of {export} to {dest}: attempt {n} failed in {state}: {why}",
            export=self.export.name,
            dest=str(self.destination),
            n=attempt.number,
            state=state,
            why=detail,
        )
        if state == "committing":
            # The commit may have landed: neither serve nor hand over.
            self.export.trigger("commit_unknown")
            self.job.fail()  # type: ignore[attr-defined]
            self._resolve_from_lease()
            return
        counted = reason if reason is not None else _REASON_OF_REPLY[message or REJECTED]
        if not self.job.negotiated:
            self.stats.failures[counted] += 1
            self.job.fail()  # type: ignore[attr-defined]
            self.export.trigger("migration_failed")
            self._end(MirrorResult("failed", False, detail), message or REJECTED, detail)
            return
        self.stats.retries[counted] += 1
        if was_holding:
            self._release_clients_of(attempt)
            self.export.trigger("retry_migration")
        self.job.fail()  # type: ignore[attr-defined]

    def _abandon_attempt(self) -> None:
        """Stop everything of the current attempt; callbacks of it become no-ops."""
        attempt = self._attempt
        self._attempt = _Attempt(attempt.number)
        for timer in (attempt.hello_timer, attempt.reply_timer, attempt.pace_timer):
            _cancel(timer)
        wire, attempt.wire = attempt.wire, None
        if wire is not None:
            self._closing.append(wire.closed)
            wire.abort()

    def _close_attempt(self, attempt: _Attempt) -> None:
        """The attempt is done with: DISC and a clean close."""
        wire = attempt.wire
        self._abandon_attempt_timers(attempt)
        self._attempt = _Attempt(attempt.number)
        if wire is not None:
            self._closing.append(wire.closed)
            wire.disconnect()

    def _abandon_attempt_timers(self, attempt: _Attempt) -> None:
        for timer in (attempt.hello_timer, attempt.reply_timer, attempt.pace_timer):
            _cancel(timer)

    def _arm_reply_timer(self, attempt: _Attempt) -> None:
        if attempt.reply_timer is None:
            attempt.reply_timer = self.clock.call_later(
                self.options.reply_timeout, self._reply_timeout, attempt
            )

    def _settle_reply_timer(self, attempt: _Attempt) -> None:
        """A reply came: the next one has a full timeout again, or none is awaited."""
        waiting = attempt.in_flight or attempt.flush_handle is not None
        waiting = waiting or attempt.commit_handle is not None
        waiting = waiting or attempt.preflush_handle is not None
        timer = attempt.reply_timer
        if timer is None:
            return
        if waiting:
            timer.reset(self.options.reply_timeout)
        else:
            _cancel(timer)
            attempt.reply_timer = None

    def _reply_timeout(self, attempt: _Attempt) -> None:
        attempt.reply_timer = None
        if attempt is self._attempt:
            self._fail(
                attempt,
                "",
                f"no reply within {self.options.reply_timeout} s",
                FailureReason.REPLY_TIMEOUT,
            )

    # -- the end ---------------------------------------------------------------------------

    def _release_clients(self) -> None:
        self.job.note_hold(self.gate.longest_hold)
        self.gate.release()

    def _release_clients_of(self, attempt: _Attempt) -> None:
        """Let ``attempt``'s held clients go, but not while its lease offer is out (_offered)."""
        if attempt.offering:
            attempt.release_pending = True
        else:
            self._release_clients()

    def _release_clients_if_idle(self) -> None:
        """A deferred release, unless a later attempt holds clients by now for its switchover."""
        if not self._attempt.holding:
            self._release_clients()

    def _set_write_cap(self, cap: int | None) -> None:
        if cap != self._write_cap:
            self._write_cap = cap
            self.gate.set_write_cap(cap)

    def _settle_start(self, outcome: StartOutcome) -> None:
        self.outcome = outcome
        self.started.callback(outcome)

    def _end(self, result: MirrorResult, start_message: str = "", detail: str = "") -> None:
        self._set_write_cap(None)
        if self._unobserve is not None:
            self._unobserve()
            self._unobserve = None
        if self.outcome is None:
            self._settle_start(StartOutcome(False, start_message or CANCELLED, detail))
        self.result = result
        if result.state == "completed":
            self.stats.completed += 1
        _log.info(
            "mirror of {export} to {dest} ended {state}: {reason}",
            export=self.export.name,
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


def _cancel(timer: DelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()
