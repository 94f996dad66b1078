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

from typing import Any

from ferry import statecharts
from ferry.clock import Clock, DelayedCall
from ferry.migrate.backoff import Backoff
from ferry.migrate.convergence import (
    Action,
    ConvergencePolicy,
    Decision,
    expected_downtime,
    write_rate_cap,
)
from ferry.migrate.passes import (
    DEFAULT_MAX_DATA_LENGTH,
    CopyOp,
    ExtentSource,
    OpKind,
    PassPlan,
    PassPlanner,
)
from ferry.migrate.progress import MigrationProgress, estimate_seconds_left
from ferry.migrate.ratelimit import RateLimiter
from ferry.migrate.speed import SpeedMeter
from ferry.storage.dirtymap import DirtyMap
from ferry.trace import Tracer

__all__ = ["CHART", "MigrationJob"]

CHART = "migration"


class MigrationJob:
    """One migration from this source, as a state machine with its counters.

    Built in ``connecting``.  Triggers (methods added by the chart):
    ``connected``, ``accepted``, ``next_pass`` / ``quiesce`` (fired by
    :meth:`end_of_pass`, not by the caller), ``commit``, ``committed``,
    ``commit_rejected``, ``fail``, ``retry`` (fired by the retry timer),
    ``resolve_committed``, ``resolve_aborted``, ``break_migration``.

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
        self._pass_started_at = self.started_at
        self._dirty_pass_rate: float | None = None
        self._retry_call: DelayedCall | None = None
        self._longest_hold: float | None = None
        self.chart = statecharts.load(CHART)
        statecharts.build(self.chart, self, instance=instance, tracer=tracer, clock=clock)

    def __repr__(self) -> str:
        return f"<MigrationJob {self.state} plan={self.plan!r}>"

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
        self._dirty_pass_rate = None
        self.throttle = 0.0
        self._throttle_base = None
        self.last_decision = None
        self._start_pass(self.planner.bulk_pass())

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
        if self.state != "quiescing" or self.plan is not None:
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
        self.retry()  # type: ignore[attr-defined]  # added by the chart

    def on_enter_committing(self, event: object) -> None:
        self.plan = None

    def on_enter_completed(self, event: object) -> None:
        self.plan = None

    def on_enter_failed(self, event: object) -> None:
        self.plan = None

    def on_enter_cancelled(self, event: object) -> None:
        self.plan = None

    def _planner(self) -> PassPlanner:
        assert self.planner is not None, "a dirty pass without a bulk pass"
        return self.planner

    def _start_pass(self, plan: PassPlan) -> None:
        self.plan = plan
        self._pass_started_at = self.clock.seconds()

    # -- what the data plane reports ---------------------------------------------

    def sent(self, op: CopyOp) -> None:
        """The destination acknowledged ``op`` of the current plan."""
        if self.plan is None:
            raise RuntimeError(f"no pass is running in {self.state}")
        self.plan.done(op)
        if op.kind is OpKind.DATA:
            self.speed.record(op.length)

    def end_of_pass(self) -> Decision:
        """The current pass is done (every request acknowledged): decide, and move on.

        Fires ``quiesce`` or ``next_pass``; on entering the next state the new
        plan is in :attr:`plan`.  Only for bulk and dirty passes: the end of
        the last pass (in ``quiescing``) is the flush, then ``commit``.
        """
        if self.state not in ("bulk_pass", "dirty_pass"):
            raise RuntimeError(f"end_of_pass in {self.state}")
        plan = self.plan
        assert plan is not None
        # A pass that got through is progress: the next failure retries from 1 s.
        self.backoff.reset()
        self._measure_dirty_pass(plan)
        bytes_left = self.dirty.dirty_bytes
        decision = self.policy.decide(
            bytes_left=bytes_left, rate=self._dirty_pass_rate, passes_done=plan.number
        )
        if decision.throttle and self._throttle_base is None:
            self._throttle_base = self.dirty_rate()
        self.throttle = decision.throttle
        self.last_decision = decision
        if decision.action is Action.SWITCH_OVER:
            self.quiesce()  # type: ignore[attr-defined]
        else:
            self.next_pass()  # type: ignore[attr-defined]
        return decision

    def _measure_dirty_pass(self, plan: PassPlan) -> None:
        """Remember how fast a dirty pass went: the rate the switchover is judged by.

        The last pass is a dirty pass: scattered blocks, a request each, so
        it goes at a fraction of the bulk pass's speed over big sequential
        extents.  Judged by the bulk rate, a switchover after pass 1 held
        clients for 1.6 s where 0.3 s was expected (benchmarks/migrate.py,
        1 GiB, 20 MB/s of 4 KiB writes).  So only a dirty pass's own rate,
        first request to last acknowledgement, predicts the last one, and
        until one has run there is no rate: the source runs at least one
        dirty pass unless nothing is dirty (QEMU likewise judges by the
        bandwidth of the previous iteration).
        """
        elapsed = self.clock.seconds() - self._pass_started_at
        if not plan.bulk and plan.total_bytes and elapsed > 0:
            self._dirty_pass_rate = plan.total_bytes / elapsed

    def note_hold(self, seconds: float) -> None:
        """A client request was held ``seconds`` by the switchover (for last_downtime_ms)."""
        if self._longest_hold is None or seconds > self._longest_hold:
            self._longest_hold = seconds

    def set_max_bps(self, limit: int | None) -> None:
        """``mirror_max_bps``: takes effect for the next request; re-ask the limiter's delay."""
        self.limiter.set_limit(limit)

    # -- what the job reports ---------------------------------------------------

    def dirty_rate(self) -> float:
        """Bytes per second clients have dirtied the image since the current pass began."""
        elapsed = self.clock.seconds() - self._pass_started_at
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

    def progress(self) -> MigrationProgress:
        """Every migration status field now; the live ones only while copying."""
        last = None if self._longest_hold is None else round(self._longest_hold * 1000)
        if not self.copying or self.plan is None:
            return MigrationProgress(
                is_migrating=self.is_migrating, phase=self.state, last_downtime_ms=last
            )
        now = self.clock.seconds()
        rate = self.speed.rate()
        left = self.bytes_left()
        downtime = expected_downtime(left, self._dirty_pass_rate)
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
