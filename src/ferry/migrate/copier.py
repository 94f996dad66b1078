"""The passes on the wire: the plan's requests sent pipelined, paced, and answered.

The job (:mod:`ferry.migrate.core.job`) says what each pass copies; the
:class:`PassCopier` sends it over the current attempt's connection:

* at most ``max_in_flight`` requests and ``max_bytes_in_flight`` data bytes
  (write-blocking: :data:`WRITE_BLOCKING_BYTES_IN_FLIGHT`) unanswered at
  once (a data request counts from when its bytes are being read), paced
  by the job's rate limiter (a data request is at most a second's worth of
  the limit, so the source is never long silent);
* a data request's bytes are read from the image on a worker thread
  (:meth:`Driver.read_image`), and the request goes out when they are
  there: requests may leave in another order than the plan's, which NBD
  allows (a pass's requests never overlap).  The read starts after the
  plan cleared the chunks it covers, so it sees every write that marked
  them (see :mod:`ferry.migrate.core.passes`);
* holes as WRITE_ZEROES where the destination has it, else as zero WRITEs;
* in a write-blocking migration (:mod:`ferry.migrate.mirroring`), every
  request is in the attempt's ``in_hand`` ranges from when it is taken from
  the plan until it is answered, and one whose range a mirrored client
  write is being sent to goes only after that write's answer;
* each good reply reported to the job (:meth:`~MigrationJob.sent`); an error
  reply fails the attempt;
* when a bulk or dirty pass is exhausted and answered, the job decides
  (:meth:`~MigrationJob.end_of_pass`: another pass, switch over, or give up),
  after a FLUSH between passes
  (:data:`PREFLUSH_BYTES`); in ``quiescing`` the end of the last pass is the
  switchover's FLUSH (:mod:`ferry.migrate.switchover`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.chartnames import MigrationState
from ferry.migrate.attempt import Attempt, Driver, InHand
from ferry.migrate.core.passes import CopyOp, OpKind
from ferry.migrate.core.stats import FailureReason, failure_of_reply
from ferry.migrate.options import CopyMode
from ferry.nbd.constants import Command, TransmissionFlag
from ferry.nbd.events import Reply

__all__ = ["MIN_PACED_REQUEST", "PREFLUSH_BYTES", "WRITE_BLOCKING_BYTES_IN_FLIGHT", "PassCopier"]

_log = Logger()

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
#: A write-blocking migration's data bytes in flight at most: a mirrored
#: client write queues behind the passes' bytes on the one connection, so
#: they bound its round trip.  With 32 MiB (the default) a 1 GiB migration
#: under a writer (benchmarks/migrate.py --runs writeblock) answered its
#: mirrored writes in 1.7 ms at the median, 262 ms at the 99th percentile
#: and 946 ms at worst; with 4 MiB in 2.2, 48 and 152 ms, the writer got
#: 10.4 MB/s through instead of 6.1, and the migration took 9.9 s instead
#: of 9.3.
WRITE_BLOCKING_BYTES_IN_FLIGHT: Final = 4 * 1024 * 1024
#: The shortest data request a rate limit cuts requests down to (see
#: ``PassCopier._longest_request``): at 1 KB/s, one request a minute.
MIN_PACED_REQUEST: Final = 64 * 1024


class PassCopier:
    """Sends the job's passes over the source's current attempt."""

    def __init__(
        self,
        driver: Driver,
        *,
        on_quiesced: Callable[[Attempt], None],
        on_last_pass_sent: Callable[[Attempt], None],
        on_gave_up: Callable[[Attempt, str], None],
    ) -> None:
        self._driver = driver
        self._on_quiesced = on_quiesced  # the job switched over: the switchover begins
        self._on_last_pass_sent = on_last_pass_sent  # every request of the last pass answered
        self._on_gave_up = on_gave_up  # the passes never converged: the job has failed
        # flexnbd's requests all carry one handle: one unanswered at a time.
        options = driver.options
        self.max_in_flight = 1 if options.flexnbd else options.max_in_flight
        # Write-blocking: the ranges in hand are kept for the mirror (see the module doc).
        self._tracks_ranges = options.copy_mode is CopyMode.WRITE_BLOCKING
        self.max_bytes_in_flight = options.max_bytes_in_flight
        if self._tracks_ranges:
            self.max_bytes_in_flight = min(self.max_bytes_in_flight, WRITE_BLOCKING_BYTES_IN_FLIGHT)
        self._pumping = False  # inside pump (a read may be answered within it)
        self._pump_again: Attempt | None = None

    def pump(self, attempt: Attempt) -> None:
        """Send what the plan, the limiter and the in-flight bounds allow now."""
        if self._pumping:
            self._pump_again = attempt  # asked from inside: the loop below goes round again
            return
        self._pumping = True
        try:
            again: Attempt | None = attempt
            while again is not None:
                self._pump_again = None
                self._pump(again)
                again = self._pump_again
        finally:
            self._pumping = False

    def _pump(self, attempt: Attempt) -> None:
        driver = self._driver
        while driver.current(attempt) and attempt.pace_timer is None:
            plan = driver.job.plan
            if plan is None:
                return
            if plan is not attempt.plan:
                attempt.plan = plan
                attempt.ops = plan.ops()
                attempt.queue.clear()
                attempt.exhausted = False
            if attempt.exhausted:
                if not attempt.in_flight and not attempt.reading:
                    self._pass_done(attempt)
                return
            if (
                len(attempt.in_flight) + attempt.reading >= self.max_in_flight
                or attempt.bytes_in_flight >= self.max_bytes_in_flight
            ):
                return
            op = self._next_op(attempt)
            if op is None:
                attempt.exhausted = True
                continue
            if op.kind is OpKind.DATA or not attempt.can(TransmissionFlag.SEND_WRITE_ZEROES):
                delay = driver.job.limiter.reserve(op.length)
                if delay > 0:
                    attempt.paced = op
                    attempt.pace_timer = driver.clock.call_later(delay, self._paced, attempt)
                    return
            self._send_op(attempt, op)

    def repace(self, attempt: Attempt) -> None:
        """The rate limit changed: the request waiting for it goes when the new limit says."""
        timer = attempt.pace_timer
        if timer is not None and timer.active():
            timer.reset(self._driver.job.limiter.backlog())

    def _paced(self, attempt: Attempt) -> None:
        attempt.pace_timer = None
        op, attempt.paced = attempt.paced, None
        if not self._driver.current(attempt) or op is None:
            return
        self._send_op(attempt, op)
        self.pump(attempt)

    def _next_op(self, attempt: Attempt) -> CopyOp | None:
        if attempt.queue:
            return attempt.queue.popleft()
        assert attempt.ops is not None
        op = next(attempt.ops, None)
        if op is None:
            return None
        step = self._longest_request(attempt, op)
        if op.length <= step:
            pieces = [op]
        else:
            pieces = [
                CopyOp(o, min(step, op.end - o), op.kind) for o in range(op.offset, op.end, step)
            ]
            attempt.queue.extend(pieces[1:])
        if self._tracks_ranges:
            for piece in pieces:
                attempt.in_hand.add(piece.offset, piece.end, InHand(piece))
        return pieces[0]

    def _longest_request(self, attempt: Attempt, op: CopyOp) -> int:
        """How long one request for ``op`` may be.

        Zeroes without WRITE_ZEROES go as data, in requests the destination
        takes.  Under a rate limit a data request is at most one second's
        worth of it (and at least ``MIN_PACED_REQUEST``), so the limit is
        held smoothly and the source is never silent for long between
        requests: a listener drops a sender that completes no request for
        ``SENDER_TIMEOUT``.
        """
        if op.kind is OpKind.ZERO and attempt.can(TransmissionFlag.SEND_WRITE_ZEROES):
            return op.length
        job = self._driver.job
        step = job.max_data_length
        limit = job.limiter.limit
        if limit is not None:
            paced = max(MIN_PACED_REQUEST, limit - limit % MIN_PACED_REQUEST)
            step = min(step, paced)
        return step

    def _after_mirrors(self, attempt: Attempt, op: CopyOp, then: Callable[[], None]) -> bool:
        """Whether ``op`` must wait for a mirrored client write of its range to be answered.

        If so, ``then`` is called once it is (and the pass pumped), and the
        op counts as being read meanwhile, so the pass does not end
        without it.  See :mod:`ferry.migrate.mirroring`.
        """
        blocking = next(attempt.mirrors.overlapping(op.offset, op.end), None)
        if blocking is None:
            return False
        attempt.reading += 1

        def answered() -> None:
            attempt.reading -= 1
            if self._driver.current(attempt):
                then()
                self.pump(attempt)

        blocking.waiters.append(answered)
        return True

    def _send_op(self, attempt: Attempt, op: CopyOp) -> None:
        if op.kind is not OpKind.DATA and self._after_mirrors(
            attempt, op, lambda: self._send_op(attempt, op)
        ):
            return
        if op.kind is OpKind.DATA:
            attempt.reading += 1
            attempt.bytes_in_flight += op.length
            if self._tracks_ranges:
                for in_hand in attempt.in_hand.overlapping(op.offset, op.end):
                    in_hand.read = True
            read = self._driver.read_image(op.offset, op.length)
            read.addCallbacks(
                self._read,
                self._read_failed,
                callbackArgs=(attempt, op),
                errbackArgs=(attempt, op),
            )
            return
        wire = attempt.wire
        assert wire is not None
        counters = self._driver.counters
        if attempt.can(TransmissionFlag.SEND_WRITE_ZEROES):
            handle = wire.request(Command.WRITE_ZEROES, op.offset, op.length)
            counters.zero_requests += 1
            counters.zero_bytes += op.length
        else:
            handle = wire.request(Command.WRITE, op.offset, data=bytes(op.length))
            counters.data_requests += 1
            counters.data_bytes += op.length
            attempt.bytes_in_flight += op.length
        self._sent(attempt, op, handle)

    def _read(self, data: bytes, attempt: Attempt, op: CopyOp) -> None:
        """``op``'s bytes are read: send them (unless the attempt ended meanwhile)."""
        attempt.reading -= 1
        self._send_read(data, attempt, op)

    def _send_read(self, data: bytes, attempt: Attempt, op: CopyOp) -> None:
        wire = attempt.wire
        if not self._driver.current(attempt) or wire is None:
            return
        if self._after_mirrors(attempt, op, lambda: self._send_read(data, attempt, op)):
            return
        handle = wire.request(Command.WRITE, op.offset, data=data)
        counters = self._driver.counters
        counters.data_requests += 1
        counters.data_bytes += op.length
        self._sent(attempt, op, handle)
        self.pump(attempt)

    def _read_failed(self, failure: Failure, attempt: Attempt, op: CopyOp) -> None:
        attempt.reading -= 1
        attempt.bytes_in_flight -= op.length
        if not self._driver.current(attempt):
            return
        self._driver.fail(
            attempt,
            "",
            f"reading [{op.offset}, {op.end}) of the image failed: {failure.getErrorMessage()}",
            FailureReason.READ_ERROR,
        )

    def _sent(self, attempt: Attempt, op: CopyOp, handle: int) -> None:
        attempt.in_flight[handle] = op
        attempt.unflushed_bytes += op.length
        if attempt.preflush_handle is not None:
            attempt.overlapped = True
        self._driver.arm_reply_timer(attempt)

    # -- replies -------------------------------------------------------------------

    def data_answered(self, attempt: Attempt, reply: Reply) -> None:
        """The reply to one of the pass's WRITE / WRITE_ZEROES requests."""
        driver = self._driver
        op = attempt.in_flight.pop(reply.handle)
        if self._tracks_ranges:
            attempt.in_hand.remove(op.offset)
        if op.kind is OpKind.DATA or not attempt.can(TransmissionFlag.SEND_WRITE_ZEROES):
            attempt.bytes_in_flight -= op.length
        driver.settle_reply_timer(attempt)
        if reply.error:
            what = "WRITE" if op.kind is OpKind.DATA else "zeroing"
            driver.fail(
                attempt,
                "",
                f"{what} of [{op.offset}, {op.end}) failed: {reply.error.name} {reply.message}",
                failure_of_reply(reply.error, FailureReason.WRITE_ERROR),
            )
            return
        driver.job.sent(op)
        self.pump(attempt)

    def preflush_answered(self, attempt: Attempt, reply: Reply) -> None:
        """The reply to a FLUSH between passes."""
        driver = self._driver
        attempt.preflush_handle = None
        driver.settle_reply_timer(attempt)
        if reply.error:
            driver.fail(
                attempt,
                "",
                f"FLUSH failed: {reply.error.name} {reply.message}",
                failure_of_reply(reply.error, FailureReason.FLUSH_ERROR),
            )
            return
        flushed, sent_at, measurable = attempt.preflush
        if measurable:
            driver.job.flushed(flushed, driver.clock.seconds() - sent_at)
        self.pump(attempt)  # a pass that waited on it ends now (see _pass_done)

    # -- the end of a pass -------------------------------------------------------------

    def _pass_done(self, attempt: Attempt) -> None:
        """Every request of the plan is answered."""
        driver = self._driver
        job = driver.job
        state = job.state
        if state in (MigrationState.BULK_PASS, MigrationState.DIRTY_PASS):
            if attempt.preflush_handle is not None:
                return  # the previous pass's FLUSH first (see PREFLUSH_BYTES)
            flush = attempt.unflushed_bytes > PREFLUSH_BYTES and attempt.can(
                TransmissionFlag.SEND_FLUSH
            )
            plan = job.plan
            assert plan is not None
            scattered = not plan.bulk  # what the FLUSH would write back
            if flush and job.would_switch_over():
                self._preflush(attempt, scattered=scattered)  # then decide again, flushed
                return
            started = job.pass_started_at
            decision = job.end_of_pass()
            _log.info(
                "mirror of {export}: pass {n} sent {sent} bytes in {seconds:.3f} s; {why}",
                export=driver.export.name,
                n=plan.number,
                sent=plan.total_bytes,
                seconds=driver.clock.seconds() - started,
                why=decision.reason,
            )
            if job.state == MigrationState.FAILED:
                self._on_gave_up(attempt, decision.reason)
                return
            driver.set_write_cap(job.client_write_cap)
            if job.state == MigrationState.QUIESCING:
                self._on_quiesced(attempt)
                return
            if flush:
                self._preflush(attempt, scattered=scattered)  # overlaps the next pass
            self.pump(attempt)
        elif state == MigrationState.QUIESCING and attempt.flush_handle is None:
            self._on_last_pass_sent(attempt)

    def _preflush(self, attempt: Attempt, *, scattered: bool) -> None:
        """FLUSH what the passes so far wrote, without holding anything up (PREFLUSH_BYTES)."""
        assert attempt.wire is not None
        # Only a dirty pass's scattered blocks, written with no other FLUSH
        # under way, say what the last pass's FLUSH will cost.
        measurable = scattered and not attempt.overlapped
        attempt.preflush = (attempt.unflushed_bytes, self._driver.clock.seconds(), measurable)
        attempt.overlapped = False
        attempt.unflushed_bytes = 0
        attempt.preflush_handle = attempt.wire.request(Command.FLUSH)
        self._driver.arm_reply_timer(attempt)
