"""Active mirroring: a write-blocking migration's client writes, sent to the destination too.

QEMU's ``copy-mode=write-blocking``.  In the background mode a client write
only marks the dirty map, and a later pass copies it: a writer faster than
the stream keeps the dirty set from shrinking, and only auto-converge's
throttle ends the migration.  In write-blocking mode the export's write
gate (:meth:`ferry.serve.export.Export.gate_writes`) hands every client
write that has landed here to :meth:`WriteMirror.client_wrote`:

* A write to a range the passes have been over already
  (:meth:`~ferry.migrate.core.job.MigrationJob.copied`: behind the bulk
  pass's cursor, or anywhere after the bulk pass) is sent to the
  destination on the migration's connection -- WRITE with the client's
  bytes; WRITE_ZEROES for WRITE_ZEROES and TRIM, since ferry's image reads
  zeroes where it trimmed -- and its reply to the client waits for the
  destination's answer.  It is not marked dirty: the dirty set only
  shrinks, and the migration converges whatever the write rate, at the
  cost of one round trip to the destination for each such write.
* A write to a range the passes hold in data requests whose bytes are
  not yet being read needs nothing: those reads start after it landed, and
  carry it.
* Anything else is marked dirty as in the background mode: a range ahead of
  the bulk pass (the pass will read it), a failed write, a write longer than
  the destination takes, a zeroing the destination cannot do, no
  connection (a retry's wait: its bulk pass copies everything anyway), and
  the two cases below.

Ordering.  No two overlapping writes are on the wire at once (see
:mod:`ferry.migrate.core.ranges`): a client write overlapping a range a
pass has in hand (taken from the plan, unanswered) whose bytes may have
been read before it landed, or a zero request's, or another mirrored
write not yet answered, is marked dirty instead.  A pass's request
taken while a mirrored write of its range is on the wire goes only after
that write's answer (:class:`~ferry.migrate.copier.PassCopier`); its bytes
were read after the client's write landed, so it carries that write or a
newer one.  A pass's read that may have come before a client write landed
belongs to a request taken before the write's landing was reported: still
in hand then, the write was marked dirty; answered by then, it is on the
destination before the mirrored write is sent.

Failure.  A mirrored write answered with an error is marked dirty, its
client is answered OK (the write is on the source, which is still the
image's owner), and the attempt fails as a pass's failed WRITE does: the
job retries, with a fresh bulk pass, or gives up, per the retry policy --
QEMU's choice too (the guest's write succeeds; the job's error policy
decides).  When an attempt is given up for any reason (its connection
lost, no reply within ``reply_timeout``, ``break``), every mirrored write
still on its wire is marked dirty and its client answered the same way:
none is left hanging, and none is acknowledged unless it is on the source.

FUA and FLUSH.  A client's FUA and FLUSH make the source durable, as ever;
the destination's copy is made durable by the switchover's FLUSH and the
commit's fsync before it takes control, which is all a client of the
image can observe, so the mirrored write goes without FUA.

The switchover waits, after the client writes in flight have landed,
until no mirrored write is on the wire (:meth:`WriteMirror.drained`), so
the last pass and its FLUSH cover every one of them.  ``--max-bps`` paces
the passes only: a mirrored write goes at its client's pace, though
behind whatever the passes have on the one connection, which is why they
keep less in flight in this mode
(:data:`~ferry.migrate.copier.WRITE_BLOCKING_BYTES_IN_FLIGHT`).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed

from ferry.migrate.attempt import Attempt, Driver, MirroredWrite
from ferry.migrate.core.passes import OpKind
from ferry.migrate.core.stats import FailureReason, MigrationStats, failure_of_reply
from ferry.nbd.constants import Command, TransmissionFlag
from ferry.nbd.events import Reply, Request
from ferry.storage.dirtymap import DirtyMap

__all__ = ["MirrorDriver", "WriteMirror"]


class MirrorDriver(Driver, Protocol):
    """What the mirror needs of the source beyond what the copier does."""

    @property
    def attempt(self) -> Attempt:
        """The attempt being made now."""
        ...


class WriteMirror:
    """A write-blocking migration's write gate: mirror a client write, or mark it dirty."""

    def __init__(self, driver: MirrorDriver, dirty: DirtyMap, stats: MigrationStats) -> None:
        self._driver = driver
        self._dirty = dirty
        self._stats = stats

    def client_wrote(
        self, offset: int, length: int, request: Request | None
    ) -> Deferred[None] | None:
        """The export's write gate: a Deferred the client's reply waits for, or None."""
        driver = self._driver
        attempt = driver.attempt
        wire = attempt.wire
        end = offset + length
        if (
            request is None
            or wire is None
            or attempt.negotiated is None
            or not driver.job.copied(offset, end)
            or attempt.mirrors.overlaps(offset, end)
        ):
            self._dirty.mark(offset, length)
            return None
        in_hand = list(attempt.in_hand.overlapping(offset, end))
        if in_hand:
            if not all(piece.op.kind is OpKind.DATA and not piece.read for piece in in_hand):
                self._dirty.mark(offset, length)
            # else: the pass's reads of the range start after this write landed,
            # and carry it.
            return None
        if request.command is Command.WRITE:
            if length > driver.job.max_data_length:
                self._dirty.mark(offset, length)
                return None
            data = request.data
            handle = wire.request(
                Command.WRITE, offset, data=data if type(data) is bytes else bytes(data)
            )
        else:  # WRITE_ZEROES or TRIM: the image reads zeroes there now (Image.punch_hole)
            if not attempt.can(TransmissionFlag.SEND_WRITE_ZEROES):
                self._dirty.mark(offset, length)
                return None
            handle = wire.request(Command.WRITE_ZEROES, offset, length)
        mirrored = MirroredWrite(offset, end, time.perf_counter(), Deferred())
        attempt.mirrors.add(offset, end, mirrored)
        attempt.mirrored[handle] = mirrored
        attempt.unflushed_bytes += length
        if attempt.preflush_handle is not None:
            attempt.overlapped = True  # as for a pass's request (see Attempt.overlapped)
        driver.arm_reply_timer(attempt)
        return mirrored.reply

    def owns(self, attempt: Attempt, handle: int) -> bool:
        """Whether ``handle`` is one of ``attempt``'s mirrored writes."""
        return handle in attempt.mirrored

    def answered(self, attempt: Attempt, reply: Reply) -> None:
        """The destination's answer to a mirrored write: its client's reply goes."""
        driver = self._driver
        mirrored = attempt.mirrored.pop(reply.handle)
        attempt.mirrors.remove(mirrored.offset)
        driver.settle_reply_timer(attempt)
        length = mirrored.end - mirrored.offset
        if reply.error:
            self._dirty.mark(mirrored.offset, length)
            mirrored.settle()
            driver.fail(
                attempt,
                "",
                f"mirrored write of [{mirrored.offset}, {mirrored.end}) failed: "
                f"{reply.error.name} {reply.message}",
                failure_of_reply(reply.error, FailureReason.WRITE_ERROR),
            )
            return
        stats = self._stats
        stats.mirrored_writes += 1
        stats.mirrored_bytes += length
        stats.mirrored_latency.observe(time.perf_counter() - mirrored.sent_at)
        mirrored.settle()

    def release(self, attempt: Attempt) -> None:
        """``attempt`` is given up: its mirrored writes are marked dirty, their clients answered."""
        pending = list(attempt.mirrored.values())
        attempt.mirrored.clear()
        for mirrored in pending:
            attempt.mirrors.remove(mirrored.offset)
            self._dirty.mark(mirrored.offset, mirrored.end - mirrored.offset)
        for mirrored in pending:
            mirrored.settle()

    def drained(self, attempt: Attempt) -> Deferred[None]:
        """Fires once none of ``attempt``'s mirrored writes is on the wire (answered or
        released); the switchover's last pass goes after it."""
        pending = list(attempt.mirrored.values())
        if not pending:
            return succeed(None)
        waits: list[Deferred[None]] = []
        for mirrored in pending:
            settled: Deferred[None] = Deferred()
            mirrored.waiters.append(partial(settled.callback, None))
            waits.append(settled)
        return DeferredList(waits).addCallback(lambda _: None)
