"""One attempt of a migration: one connection to the destination and what is under way on it.

A migration job may take several attempts (a lost connection, an error
reply, a refused commit: the job retries from scratch).  Everything that
belongs to one connection lives in an :class:`Attempt`, and the source
replaces the whole object when it gives the connection up, so a late reply,
timer or ``connectionLost`` of an earlier attempt finds it is no longer
current and changes nothing.  :class:`Driver` is what the parts of the
source (:mod:`~ferry.migrate.copier`, :mod:`~ferry.migrate.switchover`)
need of the :class:`~ferry.migrate.source.MirrorSource` that owns them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ferry.clock import Clock, DelayedCall
from ferry.migrate.core.passes import CopyOp, PassPlan
from ferry.migrate.core.ranges import RangeMap
from ferry.migrate.core.stats import FailureReason, MigrationStats
from ferry.migrate.wire import MirrorProtocol
from ferry.nbd.constants import TransmissionFlag
from ferry.nbd.events import ConnectionLanding, Negotiated

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ferry.migrate.core.job import MigrationJob
    from ferry.migrate.gate import ClientGate
    from ferry.migrate.lease import OutgoingLease
    from ferry.migrate.options import MirrorOptions
    from ferry.serve.export import Export
    from ferry.storage import Image

__all__ = ["Attempt", "AttemptCounters", "Driver", "InHand", "MirroredWrite"]


@dataclass(slots=True)
class AttemptCounters:
    """What one attempt sent (reset on every negotiation): for tests and logs."""

    data_requests: int = 0
    data_bytes: int = 0
    zero_requests: int = 0
    zero_bytes: int = 0


@dataclass(slots=True, eq=False)
class InHand:
    """A pass's request, from when it is taken from the plan until it is answered.

    ``read``: its bytes are being read (or were): a client write landing on
    its range now may or may not be in them.  Until then the read will see
    the write; a zero request never reads, and sends zeroes whatever lands.
    """

    op: CopyOp
    read: bool = False


@dataclass(slots=True, eq=False)
class MirroredWrite:
    """A client write sent to the destination by a write-blocking migration, until answered.

    ``reply`` fires (with None) when it is settled -- answered, or given up
    with its attempt and marked dirty instead -- and the client's reply
    goes; ``waiters`` are called then too (a pass's request for the same
    range, which goes on the wire only after it, see :mod:`~ferry.migrate.core.ranges`).
    """

    offset: int
    end: int
    sent_at: float  # time.perf_counter(), for the latency histogram only
    reply: Deferred[None]
    waiters: list[Callable[[], None]] = field(default_factory=list)

    def settle(self) -> None:
        waiters, self.waiters = self.waiters, []
        self.reply.callback(None)
        for waiter in waiters:
            waiter()


@dataclass(slots=True)
class Attempt:
    """One connection's worth of state; a new one for every connect."""

    number: int
    wire: MirrorProtocol | None = None
    plain: bool | None = None  # learned from the answer to FERRY_OPT_MIGRATE
    # What the destination said to FERRY_OPT_CONNECTIONS (None: it takes none):
    # its FERRY_REP_LANDING, offered, then the landing once the ACK followed it.
    offered_landing: ConnectionLanding | None = None
    landing: ConnectionLanding | None = None
    negotiated: Negotiated | None = None
    hello_timer: DelayedCall | None = None
    reply_timer: DelayedCall | None = None
    # The pass being sent: its plan, the iterator over it, split ops first.
    plan: PassPlan | None = None
    ops: Iterator[CopyOp] | None = None
    queue: deque[CopyOp] = field(default_factory=deque)
    exhausted: bool = False
    in_flight: dict[int, CopyOp] = field(default_factory=dict)
    bytes_in_flight: int = 0  # data being read from the image or sent, not yet answered
    reading: int = 0  # data requests whose bytes are being read from the image
    paced: CopyOp | None = None  # reserved with the limiter, waiting to go
    pace_timer: DelayedCall | None = None
    flush_handle: int | None = None
    preflush_handle: int | None = None  # a FLUSH between passes (see copier.PREFLUSH_BYTES)
    preflush: tuple[int, float, bool] = (0, 0.0, False)  # its bytes, when it went, measurable?
    # Data went while a FLUSH was in flight since the last FLUSH was sent: that
    # FLUSH may have written some of it back, so the next one says too little.
    overlapped: bool = False
    unflushed_bytes: int = 0  # written to the destination since the last FLUSH went
    commit_handle: int | None = None
    # When the switchover's steps ended: clients held, last pass sent, FLUSHed (for the log).
    switchover: list[float] = field(default_factory=list)
    last_pass_bytes: int = 0
    # A write-blocking migration's (ferry.migrate.mirroring): the ranges the
    # passes have in hand (taken from the plan, not yet answered), and the
    # mirrored client writes not yet answered, by range and by handle.
    in_hand: RangeMap[InHand] = field(default_factory=RangeMap)
    mirrors: RangeMap[MirroredWrite] = field(default_factory=RangeMap)
    mirrored: dict[int, MirroredWrite] = field(default_factory=dict)

    def timers(self) -> tuple[DelayedCall | None, ...]:
        return (self.hello_timer, self.reply_timer, self.pace_timer)

    def awaiting_reply(self) -> bool:
        """Whether any request of this attempt is still unanswered."""
        handles = (self.flush_handle, self.commit_handle, self.preflush_handle)
        return bool(self.in_flight) or bool(self.mirrored) or any(h is not None for h in handles)

    def can(self, flag: TransmissionFlag) -> bool:
        """Whether the destination's hello advertised ``flag``."""
        assert self.negotiated is not None
        return bool(self.negotiated.transmission_flags & flag)


class Driver(Protocol):
    """What the source's parts need of the source: its job, its image, its attempt."""

    @property
    def export(self) -> Export: ...

    @property
    def image(self) -> Image: ...

    @property
    def job(self) -> MigrationJob: ...

    @property
    def gate(self) -> ClientGate: ...

    @property
    def lease(self) -> OutgoingLease | None: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def options(self) -> MirrorOptions: ...

    @property
    def stats(self) -> MigrationStats: ...

    @property
    def counters(self) -> AttemptCounters: ...

    def read_image(self, offset: int, length: int) -> Deferred[bytes]:
        """The image's bytes ``[offset, offset + length)``, read off the reactor thread."""
        ...

    def current(self, attempt: Attempt) -> bool:
        """Whether ``attempt`` is still the one the source is making."""
        ...

    def fail(
        self, attempt: Attempt, message: str, detail: str, reason: FailureReason | None = None
    ) -> None:
        """The attempt failed: close it and tell the job (see ``MirrorSource.fail``)."""
        ...

    def arm_reply_timer(self, attempt: Attempt) -> None: ...

    def settle_reply_timer(self, attempt: Attempt) -> None: ...

    def set_write_cap(self, cap: int | None) -> None: ...
