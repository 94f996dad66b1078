"""MigrationJob on a simulated clock: passes, convergence, retries, break, status fields."""

from __future__ import annotations

from pathlib import Path

import pytest
from transitions import MachineError
from twisted.internet import task

from ferry import statecharts
from ferry.clock import ReactorClock
from ferry.migrate.core import Action, ConvergencePolicy, MigrationJob, MigrationProgress, OpKind
from ferry.migrate.core.progress import estimate_seconds_left, format_bytes, format_seconds
from ferry.replay import replay
from ferry.status import STATUS_FIELDS, StatusSnapshot
from ferry.storage import DirtyMap
from ferry.trace import Tracer, TraceRecord

from .migrate_support import KIB, MIB, sparse_image

SIZE = 4 * MIB
G = 64 * KIB


class Rig:
    """A job over a real sparse image, and a sender that takes ``rate`` bytes per second."""

    def __init__(self, tmp_path: Path, **kwargs: object) -> None:
        self.clock = task.Clock()
        self.image = sparse_image(
            tmp_path / "src.img", SIZE, [(0, b"a" * MIB), (3 * MIB, b"b" * 512 * KIB)]
        )
        self.dirty = DirtyMap(SIZE, G)
        self.records: list[TraceRecord] = []
        self.job = MigrationJob(
            image=self.image,
            dirty=self.dirty,
            clock=ReactorClock(self.clock),
            instance="export0",
            tracer=Tracer(self.records.append),
            **kwargs,  # type: ignore[arg-type]
        )

    def send_pass(self, rate: float, writes_per_op: int = 0) -> None:
        """Send every op of the current plan at ``rate``; clients write as it goes."""
        plan = self.job.plan
        assert plan is not None
        for op in plan.ops():
            if op.kind is OpKind.DATA:
                self.clock.advance(op.length / rate)
            for i in range(writes_per_op):
                self.write((op.offset + (i + 1) * 3 * G) % SIZE, G)
            self.job.sent(op)
        assert plan.finished

    def write(self, offset: int, length: int) -> None:
        self.image.pwrite(b"w" * length, offset)
        self.dirty.mark(offset, length)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_an_idle_image_goes_over_in_one_pass(rig: Rig) -> None:
    job = rig.job
    assert (job.state, job.is_migrating, job.copying, job.plan) == ("connecting", True, False, None)
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    assert job.state == "bulk_pass" and job.copying and not job.clients_held
    assert job.plan is not None and job.plan.total_bytes == MIB + 512 * KIB
    rig.send_pass(100 * MIB)
    decision = job.end_of_pass()
    assert decision.action is Action.SWITCH_OVER and decision.reason == "nothing dirty"
    assert job.state == "quiescing" and job.clients_held and job.plan is None
    final = job.start_final_pass()  # once the client writes in flight have landed
    assert job.plan is final and (final.number, final.total_bytes) == (2, 0)
    with pytest.raises(RuntimeError, match="start_final_pass in quiescing"):
        job.start_final_pass()
    job.commit()  # type: ignore[attr-defined]
    job.committed()  # type: ignore[attr-defined]
    assert (job.state, job.is_migrating, job.final, job.plan) == ("completed", False, True, None)
    events = [r.event for r in rig.records[1:]]
    assert events == ["connected", "accepted", "quiesce", "commit", "committed"]
    result = replay([r.to_json() for r in rig.records], statecharts.load_all())
    assert result.final_states == {("migration", "export0"): "completed"}
    # What ``ferry mirror --wait`` prints last, however fast the job was.
    rig.clock.advance(1)  # after the end: not counted
    assert job.summary() == "completed after 2 passes: 1.5 MiB in 0.0 s (100 MiB/s)"


def test_passes_count_and_the_decision_uses_the_slower_of_two_dirty_passes(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, policy=ConvergencePolicy(max_downtime=0.2))
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    # No FLUSH is measured here, so each byte is taken to cost twice its sending.
    # 1.5 MiB of data at 10 MiB/s in 4 requests (2 data, 2 zero), each op a client write.
    rig.send_pass(10 * MIB, writes_per_op=1)
    assert rig.dirty.dirty_bytes == 4 * G
    decision = job.end_of_pass()
    # At the bulk rate 4 x 64 KiB would take 25 ms, but the bulk pass says
    # nothing about how fast scattered dirty blocks go: run a dirty pass.
    assert (decision.action, decision.expected_downtime) == (Action.NEXT_PASS, None)
    assert decision.reason == f"no rate yet ({4 * G} bytes left)"
    assert (job.state, job.plan.number) == ("dirty_pass", 2)  # type: ignore[union-attr]
    assert job.plan.total_bytes == 4 * G  # type: ignore[union-attr]
    progress = job.progress()
    assert progress.migration_pass == 2
    assert progress.pass_dirty_bytes == 4 * G
    assert progress.pass_clean_bytes == SIZE - 4 * G
    assert progress.migration_bytes_left == 4 * G
    assert progress.expected_downtime_ms is None
    # Pass 2 goes at 1 MiB/s while clients dirty 4 blocks again: 2 x 250 ms > 200 ms.
    rig.send_pass(1 * MIB, writes_per_op=1)
    assert job.progress().pass_dirty_bytes == 0
    decision = job.end_of_pass()
    assert decision.action is Action.NEXT_PASS
    assert decision.expected_downtime == pytest.approx(2 * 4 * G / MIB)
    # Pass 3 goes at 4 MiB/s and leaves one block: 2 x 15.6 ms at that rate,
    # 2 x 62.5 ms at pass 2's 1 MiB/s; the slower one is the estimate.
    plan = job.plan
    assert plan is not None and plan.number == 3
    for op in plan.ops():
        rig.clock.advance(op.length / (4 * MIB))
        job.sent(op)
    rig.write(0, 1)
    decision = job.end_of_pass()
    assert decision.action is Action.SWITCH_OVER
    assert decision.expected_downtime == pytest.approx(2 * G / MIB)
    assert job.state == "quiescing"
    rig.write(2 * G, 1)  # a client write that was in flight when requests were held
    assert job.start_final_pass().total_bytes == 2 * G


def test_the_switchover_estimate_adds_the_flush_of_scattered_blocks(tmp_path: Path) -> None:
    rig = Rig(tmp_path, policy=ConvergencePolicy(max_downtime=0.1))
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    rig.send_pass(10 * MIB, writes_per_op=1)
    job.end_of_pass()
    rig.send_pass(8 * MIB, writes_per_op=1)  # 4 blocks dirtied again
    # No FLUSH measured yet: it is taken to cost as much as sending,
    # 4 x 64 KiB at 8 MiB/s twice: 62.5 ms.
    assert job.would_switch_over()
    assert job.progress().expected_downtime_ms == 62
    # Its FLUSH goes at 2 MiB/s: 31.25 + 125 ms in all.
    job.flushed(4 * G, 4 * G / (2 * MIB))
    assert not job.would_switch_over()
    decision = job.end_of_pass()
    assert decision.action is Action.NEXT_PASS
    assert decision.expected_downtime == pytest.approx(4 * G / (8 * MIB) + 4 * G / (2 * MIB))
    # A faster FLUSH later does not make the estimate shorter: the slower of the last two.
    job.flushed(4 * G, 4 * G / (64 * MIB))
    assert job.progress().expected_downtime_ms == 156
    job.flushed(4 * G, 4 * G / (64 * MIB))
    expected = 4 * G / (8 * MIB) + 4 * G / (64 * MIB)
    assert job.progress().expected_downtime_ms == round(1000 * expected)


def test_auto_converge_throttles_client_writes_after_max_passes(tmp_path: Path) -> None:
    rig = Rig(tmp_path, policy=ConvergencePolicy(max_downtime=0.001, max_passes=2))
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    caps = []
    for _ in range(5):
        rig.send_pass(1 * MIB, writes_per_op=1)
        if job.plan is not None and job.plan.total_bytes == 0:
            rig.write(0, G)
        decision = job.end_of_pass()
        assert decision.action is Action.NEXT_PASS
        caps.append((decision.throttle, job.client_write_cap))
    throttles = [t for t, _ in caps]
    assert throttles == pytest.approx([0, 0.2, 0.3, 0.4, 0.5])
    limits = [c for _, c in caps]
    assert limits[0] is None
    tightening = [c for c in limits[1:] if c is not None]
    assert len(tightening) == 4
    assert tightening == sorted(tightening, reverse=True)
    # One base, fixed when throttling began: the steps do not compound.
    assert tightening[3] == pytest.approx(tightening[0] / 0.8 * 0.5, rel=0.01)


def test_a_job_that_never_converges_gives_up(tmp_path: Path) -> None:
    """Found by the simulator (``python -m ferry.sim``): at 128 KiB/s one dirty block
    already exceeded a 50 ms max_downtime, and the job ran thousands of passes."""
    policy = ConvergencePolicy(max_downtime=0.001, max_passes=2)
    rig = Rig(tmp_path, policy=policy)
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    decisions = []
    while job.state != "failed":
        assert len(decisions) < policy.give_up_after
        rig.send_pass(1 * MIB, writes_per_op=1)
        if job.plan is not None and job.plan.total_bytes == 0:
            rig.write(0, G)
        decisions.append(job.end_of_pass())
    assert len(decisions) == policy.give_up_after == 2 + 8 + 10
    assert decisions[-1].action is Action.NOT_CONVERGED
    assert "did not converge in 20 passes" in decisions[-1].reason
    assert [r.event for r in rig.records][-1] == "not_converged"


def test_failure_after_negotiation_retries_with_backoff_and_fresh_counters(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, destination_empty=True)
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    assert job.planner is not None and job.planner.destination_empty
    rig.send_pass(10 * MIB, writes_per_op=1)
    job.end_of_pass()
    job.fail()  # type: ignore[attr-defined]
    assert (job.state, job.plan, job.is_migrating) == ("retry_wait", None, True)
    assert job.progress().migration_pass is None
    rig.clock.advance(0.999)
    assert job.state == "retry_wait"
    rig.clock.advance(0.001)
    assert job.state == "reconnecting"
    job.fail()  # type: ignore[attr-defined]  # refused this time
    rig.clock.advance(1.999)
    assert job.state == "retry_wait"
    rig.clock.advance(0.001)
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    assert (job.state, job.attempts, job.plan.number) == ("bulk_pass", 2, 1)  # type: ignore[union-attr]
    # The first attempt may have written anything: holes are zeroed this time.
    assert not job.planner.destination_empty
    assert job.speed.total == 0
    rig.send_pass(10 * MIB)
    job.end_of_pass()
    job.fail()  # type: ignore[attr-defined]
    assert rig.clock.getDelayedCalls()[0].getTime() - rig.clock.seconds() == 1.0  # reset


def test_failure_before_negotiation_ends_the_job(rig: Rig) -> None:
    rig.job.connected()  # type: ignore[attr-defined]
    rig.job.fail()  # type: ignore[attr-defined]
    assert (rig.job.state, rig.job.final, rig.job.is_migrating) == ("failed", True, False)
    assert rig.clock.getDelayedCalls() == []


def test_break_in_retry_wait_cancels_the_retry(rig: Rig) -> None:
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    job.fail()  # type: ignore[attr-defined]
    assert len(rig.clock.getDelayedCalls()) == 1
    job.break_migration()  # type: ignore[attr-defined]
    assert job.state == "cancelled"
    assert rig.clock.getDelayedCalls() == []
    rig.clock.advance(60)
    assert job.state == "cancelled"


def test_a_lost_ack_is_in_doubt_and_break_cannot_guess(rig: Rig) -> None:
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    rig.send_pass(100 * MIB)
    job.end_of_pass()
    rig.clock.advance(0.05)
    job.note_hold(0.05)
    job.note_hold(0.02)
    job.commit()  # type: ignore[attr-defined]
    job.fail()  # type: ignore[attr-defined]
    assert (job.state, job.clients_held, job.is_migrating) == ("in_doubt", True, True)
    with pytest.raises(MachineError):
        job.break_migration()  # type: ignore[attr-defined]
    assert job.state == "in_doubt"
    job.resolve_committed()  # type: ignore[attr-defined]
    progress = job.progress()
    assert (progress.is_migrating, progress.last_downtime_ms) == (False, 50)
    assert progress.migration_pass is None


def test_end_of_pass_only_while_passes_run(rig: Rig) -> None:
    with pytest.raises(RuntimeError, match="end_of_pass in connecting"):
        rig.job.end_of_pass()
    with pytest.raises(RuntimeError, match="no pass is running"):
        rig.job.sent(object())  # type: ignore[arg-type]


def test_progress_fills_the_status_snapshot(rig: Rig) -> None:
    job = rig.job
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    job.set_max_bps(50 * MIB)
    plan = job.plan
    assert plan is not None
    ops = plan.ops()
    for op in ops:
        rig.clock.advance(op.length / (50 * MIB))
        job.sent(op)
        if plan.dirty_bytes <= 512 * KIB:
            break
    rig.write(2 * MIB, G)
    progress = job.progress()
    fields = progress.status_fields()
    assert set(fields) <= set(STATUS_FIELDS)
    snapshot = StatusSnapshot(export="export0", **fields)
    assert snapshot.migration_speed == pytest.approx(50 * MIB, rel=0.02)
    assert snapshot.migration_speed_limit == 50 * MIB
    assert snapshot.migration_bytes_left == 512 * KIB + G
    # Only a dirty pass's rate predicts the last pass: none has run yet.
    assert snapshot.expected_downtime_ms is None
    assert snapshot.is_mirroring is True and snapshot.is_migrating is True
    assert snapshot.migration_duration == pytest.approx(MIB / (50 * MIB))
    assert snapshot.migration_seconds_left is not None
    line = snapshot.to_line()
    assert "migration_pass=1" in line and "pass_dirty_bytes=524288" in line
    assert progress.render() == "pass 1, 50 MiB/s (limit 50 MiB/s), 576 KiB left, ETA 0.0 s"


# -- progress.py --------------------------------------------------------------


def test_every_migration_status_field_is_in_the_progress_object() -> None:
    owned = set(MigrationProgress(is_migrating=True).status_fields())
    migration_fields = {
        "is_migrating",
        "is_mirroring",
        "migration_pass",
        "pass_dirty_bytes",
        "pass_clean_bytes",
        "migration_duration",
        "migration_speed",
        "migration_speed_limit",
        "migration_seconds_left",
        "migration_bytes_left",
        "expected_downtime_ms",
        "last_downtime_ms",
    }
    assert owned == migration_fields
    assert owned <= set(STATUS_FIELDS)


def test_the_progress_line() -> None:
    p = MigrationProgress(
        is_migrating=True,
        phase="dirty_pass",
        migration_pass=3,
        migration_speed=812 * MIB,
        migration_bytes_left=120 * MIB,
        migration_seconds_left=0.2,
    )
    assert p.render() == "pass 3, 812 MiB/s, 120 MiB left, ETA 0.2 s"
    assert MigrationProgress(is_migrating=True, phase="retry_wait").render() == "retry_wait"
    assert MigrationProgress(is_migrating=False).render() == "not migrating"
    q = MigrationProgress(is_migrating=True, phase="quiescing", migration_pass=4)
    assert q.render() == "pass 4, ETA ?, quiescing"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536 * MIB, "1.5 GiB"),
        (812 * MIB, "812 MiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("s", "text"), [(None, "?"), (0.24, "0.2 s"), (45.4, "45 s"), (185, "3m05s"), (7260, "2h01m")]
)
def test_format_seconds(s: float | None, text: str) -> None:
    assert format_seconds(s) == text


def test_seconds_left_accounts_for_clients_dirtying_again() -> None:
    assert estimate_seconds_left(0, None, 0, 0.3) == 0.0
    assert estimate_seconds_left(10, None, 0, 0.3) is None
    assert estimate_seconds_left(30, 100.0, 0, 0.3) == pytest.approx(0.3)  # one last pass
    # 1000 left at 100/s while clients dirty 50/s: it shrinks at 50/s until the
    # last 30 fit in 0.3 s, so 970 / 50 + 0.3.
    assert estimate_seconds_left(1000, 100.0, 50.0, 0.3) == pytest.approx(19.7)
    assert estimate_seconds_left(1000, 100.0, 100.0, 0.3) is None  # not converging


def test_before_a_pass_runs_the_status_shows_the_limit_and_the_time(tmp_path: Path) -> None:
    """Connecting or scanning: ``migration_speed_limit`` was missing until the bulk pass."""
    rig = Rig(tmp_path, max_bps=MIB)
    rig.clock.advance(2)
    early = rig.job.progress()
    assert (early.phase, early.migration_pass) == ("connecting", None)
    assert early.migration_speed_limit == MIB and early.migration_duration == 2
    rig.job.connected()  # type: ignore[attr-defined]
    rig.job.accepted()  # type: ignore[attr-defined]
    assert rig.job.progress().migration_speed_limit == MIB
