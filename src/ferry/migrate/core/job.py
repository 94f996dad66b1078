"""The source's migration job without sockets: the chart, the passes and the counters.

:class:`MigrationJob` is the model of one ``migration`` machine.  The
Twisted side (next) owns the connection to the destination; it fires the
chart's triggers as the wire tells it things (``connected``, ``accepted``,
``fail``, ``commit``, ``committed``, ...), sends the requests of
:attr:`MigrationJob.plan`, and reports each acknowledged one with
:meth:`MigrationJob.sent`.  Everything else happens here, on the injected
clock: fresh counters on each attempt, the next plan on entering a pass, the
convergence decision at the end of one, the retry timer, the throttle, and
the status fields.

What a state means is read from the chart (``is_migrating``, ``copying``,
``clients_held``, ...), never kept in flags beside it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

from ferry import statecharts
from ferry.chartnames import MigrationState, MigrationTrigger
from ferry.clock import Clock, DelayedCall
from ferry.migrate.core.backoff import Backoff
from ferry.migrate.core.convergence import (
    Action,
    ConvergencePolicy,
    Decision,
    expected_downtime,
    write_rate_cap,
)
from ferry.migrate.core.passes import (
    DEFAULT_MAX_DATA_LENGTH,
    CopyOp,
    ExtentSource,
    OpKind,
    PassPlan,
    PassPlanner,
)
from ferry.migrate.core.progress import (
    MigrationProgress,
    estimate_seconds_left,
    format_bytes,
    format_seconds,
)
from ferry.migrate.core.speed import SpeedMeter
from ferry.ratelimit import RateLimiter
from ferry.storage.dirtymap import DirtyMap
from ferry.storage.image import Extent
from ferry.trace import Tracer

__all__ = ["CHART", "RATES_KEPT", "MigrationJob"]

CHART = "migration"
#: How many dirty passes' rates (and their FLUSHes') the switchover estimate
#: looks back over; it takes the slowest (see ``MigrationJob._switchover_rate``).
RATES_KEPT: Final = 2


class MigrationJob:
    """One migration from this source, as a state machine with its counters.

    Built in ``connecting``.  The caller fires the chart's triggers with
    :meth:`fire` (``MigrationTrigger.CONNECTED``, ...); ``next_pass`` and
    ``quiesce`` are fired by :meth:`end_of_pass`, ``retry`` by the retry
    timer.  ``followers`` are the other machines the chart's effects drive
    (``{"role": export.trigger}``: see ``statecharts/migration.yaml``).

    The data plane's calls: take requests from ``plan.ops()``, report each
    acknowledged one with :meth:`sent`, call :meth:`end_of_pass` when a
    bulk or dirty pass is done; in ``quiescing`` call
    :meth:`start_final_pass` once client writes in flight have landed.
    """

    state: str  # set by transitions

    def __init__(
        self,
        *,
        image: ExtentSource,
        dirty: DirtyMap,
        clock: Clock,
        instance: str,
        tracer: Tracer | None = None,
        max_bps: int | None = None,
        policy: ConvergencePolicy | None = None,
        backoff: Backoff | None = None,
        max_data_length: int = DEFAULT_MAX_DATA_LENGTH,
        destination_empty: bool = False,
        followers: Mapping[str, Callable[[str], object]] | None = None,
    ) -> None:
        self.image = image
        self.dirty = dirty
        self.clock = clock
        self.policy = policy or ConvergencePolicy()
        self.backoff = backoff or Backoff()
        self.limiter = RateLimiter(clock, max_bps)
        self.speed = SpeedMeter(clock)
        self.max_data_length = max_data_length
        self.destination_empty = destination_empty
        self.started_at = clock.seconds()
        self.attempts = 0
        self.planner: PassPlanner | None = None
        self.plan: PassPlan | None = None
        self.last_decision: Decision | None = None
        self.throttle = 0.0
        self._throttle_base: float | None = None
        self.pass_started_at = self.started_at  # when the current pass began (its rate)
        # For the line that sums the job up once it has ended (:meth:`summary`).
        self.passes = 0
        self.bytes_copied = 0
        self.ended_at: float | None = None
        # The last dirty passes' sending rates and their FLUSHes' rates (see _switchover_rate).
        self._data_rates: deque[float] = deque(maxlen=RATES_KEPT)
        self._flush_rates: deque[float] = deque(maxlen=RATES_KEPT)
        self._last_ack_at = self.started_at
        self._retry_call: DelayedCall | None = None
        self._longest_hold: float | None = None
        #: How the bulk pass reads the whole image's extents off the caller's
        #: thread: called with what to do with them once read (None: read at
        #: once, in the pass's transition).  The data plane sets it.
        self.scan_extents: Callable[[Callable[[list[Extent]], None]], None] | None = None
        self.chart = statecharts.load(CHART)
        statecharts.build(
            self.chart, self, instance=instance, tracer=tracer, clock=clock, followers=followers
        )

    def __repr__(self) -> str:
        return f"<MigrationJob {self.state} plan={self.plan!r}>"

    def fire(self, trigger: MigrationTrigger, reason: str | None = None) -> None:
        """Take ``trigger``; an illegal one raises ``transitions.MachineError``.

        ``reason`` (why: a failure's detail, a veto's) goes into the trace record.
        """
        model: Any = self
        if reason is None:
            model.trigger(trigger)
        else:
            model.trigger(trigger, reason=reason)

    def can(self, trigger: MigrationTrigger) -> bool:
        """Whether ``trigger`` is legal in the current state."""
        return self.chart.next_state(self.state, trigger) is not None

    # -- what the state means (from the chart) ---------------------------------

    def _property(self, key: str) -> Any:
        return self.chart.property(self.state, key)

    @property
    def is_migrating(self) -> bool:
        return bool(self._property("is_migrating"))

    @property
    def negotiated(self) -> bool:
        return bool(self._property("negotiated"))

    @property
    def copying(self) -> bool:
        return bool(self._property("copying"))

    @property
    def clients_held(self) -> bool:
        return bool(self._property("clients_held"))

    @property
    def final(self) -> bool:
        return bool(self._property("final"))

    # -- entering states ------------------------------------------------------

    def on_enter_bulk_pass(self, event: object) -> None:
        """A new attempt copies from scratch: every counter starts again."""
        self.attempts += 1
        self.planner = PassPlanner(
            self.image,
            self.dirty,
            max_data_length=self.max_data_length,
            # Only the first attempt knows the destination is empty: a lost
            # attempt may have written anything into it.
            destination_empty=self.destination_empty and self.attempts == 1,
        )
        self.speed.restart()
        self._data_rates.clear()
        self._flush_rates.clear()
        self.throttle = 0.0
        self._throttle_base = None
        self.last_decision = None
        if self.scan_extents is None:
            self._start_pass(self.planner.bulk_pass())
            return
        # The scan of a whole image may take long (and hang with its disk): it
        # runs elsewhere, after the map is cleared; the pass starts once it is done.
        planner = self.planner
        self.plan = None
        planner.begin_bulk_pass()
        self.scan_extents(lambda extents: self._bulk_scanned(planner, extents))

    def _bulk_scanned(self, planner: PassPlanner, extents: list[Extent]) -> None:
        """The bulk pass's extents are read: it starts, unless its attempt is over."""
        if planner is not self.planner or self.state != MigrationState.BULK_PASS:
            return
        if self.plan is None:
            self._start_pass(planner.bulk_pass(extents))

    def on_enter_dirty_pass(self, event: object) -> None:
        self._start_pass(self._planner().dirty_pass())

    def on_enter_quiescing(self, event: object) -> None:
        """No plan yet: the last pass starts only once client writes have drained."""
        self.plan = None

    def start_final_pass(self) -> PassPlan:
        """Plan the last pass; call it in ``quiescing`` once no client write is in flight.

        A write already dispatched marks the dirty map only when it has
        landed; snapshotting before it has would lose it.  So the data plane
        holds new requests, waits for the writes in flight, then calls this.
        After the last pass the dirty map must be empty; then FLUSH and commit.
        """
        if self.state != MigrationState.QUIESCING or self.plan is not None:
            raise RuntimeError(f"start_final_pass in {self.state} (plan {self.plan!r})")
        plan = self._planner().dirty_pass()
        self._start_pass(plan)
        return plan

    def on_enter_retry_wait(self, event: object) -> None:
        self.plan = None
        self._retry_call = self.clock.call_later(self.backoff.next_delay(), self._retry)

    def on_exit_retry_wait(self, event: object) -> None:
        call, self._retry_call = self._retry_call, None
        if call is not None and call.active():
            call.cancel()

    def _retry(self) -> None:
        self._retry_call = None
        self.fire(MigrationTrigger.RETRY)

    def on_enter_offering(self, event: object) -> None:
        self.plan = None

    def on_enter_committing(self, event: object) -> None:
        self.plan = None

    def on_enter_completed(self, event: object) -> None:
        self.plan = None
        self.ended_at = self.clock.seconds()

    def on_enter_failed(self, event: object) -> None:
        self.plan = None
        self.ended_at = self.clock.seconds()

    def on_enter_cancelled(self, event: object) -> None:
        self.plan = None
        self.ended_at = self.clock.seconds()

    def _planner(self) -> PassPlanner:
        assert self.planner is not None, "a dirty pass without a bulk pass"
        return self.planner

    def _start_pass(self, plan: PassPlan) -> None:
        self.plan = plan
        self.passes = plan.number
        self.pass_started_at = self.clock.seconds()

    # -- what the data plane reports ---------------------------------------------

    def sent(self, op: CopyOp) -> None:
        """The destination acknowledged ``op`` of the current plan."""
        if self.plan is None:
            raise RuntimeError(f"no pass is running in {self.state}")
        self.plan.done(op)
        self._last_ack_at = self.clock.seconds()
        if op.kind is OpKind.DATA:
            self.speed.record(op.length)
            self.bytes_copied += op.length

    def end_of_pass(self) -> Decision:
        """The current pass is done (every request acknowledged): decide, and move on.

        Fires ``quiesce``, ``next_pass`` or ``not_converged``; on entering the next
        state the new plan is in :attr:`plan`.  Only for bulk and dirty passes: the end of
        the last pass (in ``quiescing``) is the flush, then ``commit``.
        """
        decision = self._decide("end_of_pass")
        plan = self.plan
        assert plan is not None
        # A pass that got through is progress: the next failure retries from 1 s.
        self.backoff.reset()
        rate = self._pass_rate(plan)
        if rate is not None:
            self._data_rates.append(rate)
        if decision.throttle and self._throttle_base is None:
            self._throttle_base = self.dirty_rate()
        self.throttle = decision.throttle
        self.last_decision = decision
        if decision.action is Action.SWITCH_OVER:
            self.fire(MigrationTrigger.QUIESCE)
        elif decision.action is Action.NOT_CONVERGED:
            self.fire(MigrationTrigger.NOT_CONVERGED)
        else:
            self.fire(MigrationTrigger.NEXT_PASS)
        return decision

    def would_switch_over(self) -> bool:
        """Whether :meth:`end_of_pass` would switch over if called now; changes nothing.

        The data plane asks before it FLUSHes the destination between
        passes: a switchover is judged on a flushed destination, so it
        flushes first and ends the pass after the answer (see
        ``ferry.migrate.source.PREFLUSH_BYTES``).
        """
        return self._decide("would_switch_over").action is Action.SWITCH_OVER

    def _decide(self, asking: str) -> Decision:
        if self.state not in (MigrationState.BULK_PASS, MigrationState.DIRTY_PASS):
            raise RuntimeError(f"{asking} in {self.state}")
        plan = self.plan
        assert plan is not None
        return self.policy.decide(
            bytes_left=self.dirty.dirty_bytes,
            rate=self._switchover_rate(self._pass_rate(plan)),
            passes_done=plan.number,
        )

    def _pass_rate(self, plan: PassPlan) -> float | None:
        """How fast the dirty pass ``plan`` sent its data (None: a bulk or empty pass).

        The last pass is a dirty pass: scattered blocks, a request each, so
        it goes at a fraction of the bulk pass's speed over big sequential
        extents.  Judged by the bulk rate, a switchover after pass 1 held
        clients for 1.6 s where 0.3 s was expected (benchmarks/migrate.py,
        1 GiB, 20 MB/s of 4 KiB writes).  So only a dirty pass's own rate,
        first request to last acknowledgement, predicts the last one, and
        until one has run there is no rate: the source runs at least one
        dirty pass unless nothing is dirty (QEMU likewise judges by the
        bandwidth of the previous iteration).  The time after the last
        acknowledgement (waiting for a FLUSH) is not sending: a FLUSH has a
        rate of its own (:meth:`flushed`).
        """
        elapsed = self._last_ack_at - self.pass_started_at
        acknowledged = plan.total_bytes - plan.dirty_bytes
        if not plan.bulk and acknowledged and elapsed > 0:
            return acknowledged / elapsed
        return None

    def _switchover_rate(self, this_pass: float | None) -> float | None:
        """Bytes per second of the last pass, sending and flushing: it does both, in turn.

        The last pass sends what is dirty, then FLUSHes it (the FLUSHes
        between passes leave it nothing else), so each byte costs its
        share of both rates.  Judged by pass times that include waiting
        for a FLUSH, a switchover came a pass or two late; judged by the
        sending rate alone, it would promise half the hold it takes.  Here
        a dirty pass sends its 4 KiB blocks at 45 to 100 MB/s and the
        destination FLUSHes them at 50 to 170 MB/s.

        A FLUSH says what FLUSHing costs only when no other FLUSH was under
        way while its data went (:meth:`flushed`): one that overlapped the
        data has written some of it back, and the next one finds little to
        do (2 GB/s, measured).  With the FLUSHes overlapping the passes,
        that is rare, so until one has been measured a FLUSH is taken to
        cost as much as sending, which is within what was measured here.

        Each rate is the slower of the last two measured (``this_pass``,
        the pass just ended, among them): clients feel an estimate that is
        short, not one that is long.  Judged by the last pass alone, 8
        switchovers under a 20 MB/s writer held clients 1.05 to 1.59 times
        as long as expected, 3 of them over the 0.3 s limit.
        """
        sending = [*self._data_rates, *([] if this_pass is None else [this_pass])]
        if not sending:
            return None
        data_rate = min(sending[-RATES_KEPT:])
        flush_rate = min(self._flush_rates) if self._flush_rates else data_rate
        return 1 / (1 / data_rate + 1 / flush_rate)

    def flushed(self, flushed_bytes: int, seconds: float) -> None:
        """A FLUSH of a dirty pass made ``flushed_bytes`` durable in ``seconds``.

        The data plane reports only FLUSHes that measure what the last
        pass's will cost: of a dirty pass's scattered blocks (a bulk pass's
        sequential gigabytes go far faster), written while no other FLUSH
        was under way (see :meth:`_switchover_rate`).
        """
        if flushed_bytes > 0 and seconds > 0:
            self._flush_rates.append(flushed_bytes / seconds)

    def note_hold(self, seconds: float) -> None:
        """A client request was held ``seconds`` by the switchover (for last_downtime_ms)."""
        if self._longest_hold is None or seconds > self._longest_hold:
            self._longest_hold = seconds

    def set_max_bps(self, limit: int | None) -> None:
        """``mirror_max_bps``: takes effect for the next request; re-ask the limiter's delay."""
        self.limiter.set_limit(limit)

    def copied(self, offset: int, end: int) -> bool:
        """Whether this attempt's passes have been over ``[offset, end)`` already.

        A write-blocking migration mirrors a client write there (the passes
        will not come back for it unless it is marked dirty) and leaves
        the rest to the passes: in the bulk pass, what lies ahead of its
        cursor (or all of it, while its extents are being read); after
        the bulk pass, every range is behind one.  Whether a request of a
        pass still has the range in hand is the data plane's to check.
        """
        if not self.copying:
            return False
        if self.state != MigrationState.BULK_PASS:
            return True
        plan = self.plan
        return plan is not None and plan.bulk and end <= plan.cursor

    # -- what the job reports ---------------------------------------------------

    def dirty_rate(self) -> float:
        """Bytes per second clients have dirtied the image since the current pass began."""
        elapsed = self.clock.seconds() - self.pass_started_at
        return self.dirty.dirty_bytes / elapsed if elapsed > 0 else 0.0

    @property
    def client_write_cap(self) -> int | None:
        """Auto-converge: the cap on client writes (bytes per second), None when not throttled."""
        if not self.throttle or self._throttle_base is None:
            return None
        return write_rate_cap(self.throttle, self._throttle_base)

    def bytes_left(self) -> int:
        """What the migration still has to send: the rest of this pass and what clients dirtied."""
        if self.plan is None:
            return self.dirty.dirty_bytes
        return self.plan.bytes_left(self.dirty)

    def summary(self) -> str:
        """One line for a job that has ended: ``completed after 3 passes: 1.0 GiB in 4.2 s
        (244 MiB/s)``; a job that ends faster than ``ferry mirror --wait`` asks shows this."""
        end = self.clock.seconds() if self.ended_at is None else self.ended_at
        took = max(end - self.started_at, 0.0)
        copied = format_bytes(self.bytes_copied)
        passes = f"{self.passes} pass" + ("" if self.passes == 1 else "es")
        rate = f" ({format_bytes(self.bytes_copied / took)}/s)" if took > 0 else ""
        return f"{self.state} after {passes}: {copied} in {format_seconds(took)}{rate}"

    def progress(self) -> MigrationProgress:
        """Every migration status field now; the live ones only while copying."""
        last = None if self._longest_hold is None else round(self._longest_hold * 1000)
        now = self.clock.seconds()
        if not self.copying or self.plan is None:
            # Connecting, scanning, waiting to retry: what is known before a pass runs.
            migrating = self.is_migrating
            return MigrationProgress(
                is_migrating=migrating,
                phase=self.state,
                migration_duration=now - self.started_at if migrating else None,
                migration_speed_limit=self.limiter.limit if migrating else None,
                last_downtime_ms=last,
            )
        rate = self.speed.rate()
        left = self.bytes_left()
        downtime = expected_downtime(left, self._switchover_rate(self._pass_rate(self.plan)))
        return MigrationProgress(
            is_migrating=self.is_migrating,
            phase=self.state,
            migration_pass=self.plan.number,
            pass_dirty_bytes=self.plan.dirty_bytes,
            pass_clean_bytes=self.plan.clean_bytes,
            migration_duration=now - self.started_at,
            migration_speed=None if rate is None else int(rate),
            migration_speed_limit=self.limiter.limit,
            migration_seconds_left=estimate_seconds_left(
                left, rate, self.dirty_rate(), self.policy.max_downtime
            ),
            migration_bytes_left=left,
            expected_downtime_ms=None if downtime is None else round(downtime * 1000),
            last_downtime_ms=last,
        )
