"""LeaseManager on a simulated clock against the in-memory lockspace.

TTL 15 s keeps the arithmetic exact: a renewal every 5 s, a margin of 3 s,
so the deadline is 12 s after the last renewal that succeeded was sent.
Every test's trace is replayed against ``lease.yaml`` when it ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from fakes.lockspace import UNREACHABLE, FakeLockspace
from ferry.clock import ReactorClock
from ferry.lease.backend import Holder, LeaseConflict, LeaseMode, LockspaceUnavailable
from ferry.lease.manager import (
    CHECK_INTERVAL,
    InDoubtOutcome,
    LeaseManager,
    LeaseStateError,
    default_margin,
)
from ferry.replay import replay
from ferry.statecharts import load
from ferry.trace import CREATED, Tracer, TraceRecord

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

RESOURCE = "/srv/images/vm1.img"
TTL = 15.0
DEADLINE_AFTER = 12.0  # ttl - default_margin(ttl)


def result(d: Deferred[T]) -> T:
    """The result of a Deferred that has fired (failures are raised)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def failure_of(d: Deferred[Any], kind: type[E]) -> E:
    with pytest.raises(kind) as info:
        result(d)
    return info.value


class Rig:
    """One lockspace, one simulated clock, one trace, and the fences each holder reported."""

    def __init__(self, ttl: float | None = TTL) -> None:
        self.reactor = task.Clock()
        self.clock = ReactorClock(self.reactor)
        self.records: list[TraceRecord] = []
        self.tracer = Tracer(self.records.append)
        self.lockspace = FakeLockspace(self.clock, ttl=ttl)
        self.fenced: list[tuple[str, str]] = []

    def manager(self, owner: str = "src", **kwargs: Any) -> LeaseManager:
        return LeaseManager(
            self.lockspace,
            resource=RESOURCE,
            owner=owner,
            clock=self.clock,
            tracer=self.tracer,
            on_fenced=lambda reason: self.fenced.append((owner, reason)),
            instance=owner,
            **kwargs,
        )

    def holding(self, owner: str = "src", **kwargs: Any) -> LeaseManager:
        manager = self.manager(owner, **kwargs)
        manager.register()
        result(manager.acquire())
        return manager

    def incoming(self, owner: str = "dst") -> LeaseManager:
        manager = self.manager(owner)
        manager.register(incoming=True)
        return manager

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass as real time would: each timer runs at its own time.

        (One big ``task.Clock.advance`` runs a LoopingCall once and skips
        the beats it missed.)
        """
        end = self.reactor.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.reactor.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.reactor.advance(max(0.0, min(due) - self.reactor.seconds()))
        self.reactor.advance(end - self.reactor.seconds())

    def steps(self, instance: str) -> list[tuple[str, str, str]]:
        return [
            (r.event, r.source, r.dest)
            for r in self.records
            if r.instance == instance and r.event != CREATED
        ]


@pytest.fixture
def rig() -> Iterator[Rig]:
    rig = Rig()
    yield rig
    replay([r.to_json() for r in rig.records], {"lease": load("lease")})


# -- acquiring -----------------------------------------------------------------------


def test_acquire_holds_the_lease_with_a_deadline(rig: Rig) -> None:
    manager = rig.manager()
    assert manager.state == "unregistered"
    assert (manager.token, manager.deadline, manager.may_write()) == (None, None, False)
    manager.register()
    grant = result(manager.acquire())
    assert manager.state == "held"
    assert manager.holds and manager.may_write()
    assert manager.token == grant.token == 1
    assert manager.grant == grant
    assert manager.deadline == DEADLINE_AFTER
    assert rig.steps("src") == [
        ("register", "unregistered", "registered"),
        ("acquire", "registered", "acquiring"),
        ("acquired", "acquiring", "held"),
    ]


def test_a_conflict_goes_back_to_registered_and_names_the_holder(rig: Rig) -> None:
    first = rig.holding("src")
    second = rig.manager("other")
    second.register()
    conflict = failure_of(second.acquire(), LeaseConflict)
    assert conflict.holders == (Holder("src", LeaseMode.EXCLUSIVE, 1),)
    assert second.state == "registered"
    assert second.holders == conflict.holders
    assert second.last_error == str(conflict)
    assert not second.may_write()

    result(first.release())
    assert result(second.acquire()).token == 2
    assert second.state == "held"


def test_shared_holders_coexist_and_exclude_an_exclusive_one(rig: Rig) -> None:
    readers = [rig.holding(f"reader{i}", mode=LeaseMode.SHARED) for i in range(2)]
    assert all(r.may_write() for r in readers)
    writer = rig.manager("writer")
    writer.register()
    failure_of(writer.acquire(), LeaseConflict)
    assert [h.owner for h in result(writer.inquire())] == ["reader0", "reader1"]
    assert [h.owner for h in writer.holders] == ["reader0", "reader1"]
    with pytest.raises(LeaseStateError, match="shared, not exclusive"):
        readers[0].prepare_migrate()


def test_operations_in_the_wrong_state_are_refused_at_once(rig: Rig) -> None:
    manager = rig.manager()
    with pytest.raises(LeaseStateError, match="acquire is not legal while unregistered"):
        manager.acquire()
    manager.register()
    with pytest.raises(LeaseStateError):
        manager.prepare_migrate()
    with pytest.raises(LeaseStateError):
        manager.acquire_incoming(1)
    result(manager.acquire())
    with pytest.raises(LeaseStateError):
        manager.acquire()
    with pytest.raises(LeaseStateError, match="cannot cancel a migration"):
        manager.cancel_migrate_out()
    with pytest.raises(LeaseStateError):
        manager.complete_migrate_out()
    with pytest.raises(LeaseStateError, match="nothing to resolve"):
        manager.resolve_in_doubt()
    assert manager.state == "held"


def test_an_unreachable_lockspace_fails_the_acquire(rig: Rig) -> None:
    manager = rig.manager()
    manager.register()
    rig.lockspace.unreachable = True
    failure_of(manager.acquire(), LockspaceUnavailable)
    assert manager.state == "registered"
    assert manager.last_error == UNREACHABLE


def test_shutdown_while_acquiring_releases_the_late_grant(rig: Rig) -> None:
    manager = rig.manager()
    manager.register()
    rig.lockspace.delayed.add("acquire")
    pending = manager.acquire()
    assert manager.state == "acquiring"
    result(manager.shutdown())
    assert manager.state == "stopped"
    rig.lockspace.delayed.clear()
    rig.lockspace.deliver()
    failure_of(pending, LeaseStateError)
    assert rig.lockspace.holders_now(RESOURCE) == ()
    assert rig.reactor.getDelayedCalls() == []


# -- keeping it ----------------------------------------------------------------------


def test_the_keepalive_renews_every_third_of_the_ttl(rig: Rig) -> None:
    manager = rig.holding()
    rig.advance(14.0)
    assert rig.lockspace.renewals() == [5.0, 10.0]
    assert manager.deadline == 10.0 + DEADLINE_AFTER
    rig.advance(1.0)
    assert rig.lockspace.renewals() == [5.0, 10.0, 15.0]
    assert manager.state == "held"


def test_the_margin_can_be_chosen(rig: Rig) -> None:
    manager = rig.holding(margin=1.0)
    assert manager.deadline == TTL - 1.0


def test_the_default_margin() -> None:
    assert default_margin(15.0) == 3.0  # ttl / 5
    assert default_margin(1.0) == 0.5  # the floor
    assert default_margin(0.6) == 0.3  # never more than half the ttl
    with pytest.raises(ValueError, match="margin"):
        LeaseManager(
            FakeLockspace(ReactorClock(task.Clock())),
            resource="r",
            owner="o",
            clock=ReactorClock(task.Clock()),
            margin=-1.0,
        )


def test_failed_renewals_keep_writing_until_they_recover(rig: Rig) -> None:
    manager = rig.holding()
    rig.lockspace.renewals_fail = True
    rig.advance(5.0)
    assert manager.state == "renew_failed"
    assert manager.may_write()
    assert manager.deadline == DEADLINE_AFTER  # not moved by the failure
    assert manager.last_error is not None and "renewals are failing" in manager.last_error
    rig.lockspace.renewals_fail = False
    rig.advance(5.0)
    assert manager.state == "held"
    assert manager.deadline == 10.0 + DEADLINE_AFTER
    assert rig.fenced == []
    assert ("renewed", "renew_failed", "held") in rig.steps("src")


def test_failed_renewals_fence_exactly_at_the_deadline(rig: Rig) -> None:
    manager = rig.holding()
    rig.lockspace.renewals_fail = True
    rig.advance(DEADLINE_AFTER - 0.5)
    assert (manager.state, manager.may_write()) == ("renew_failed", True)
    rig.advance(0.5)
    assert manager.state == "fenced"
    assert not manager.may_write()
    assert [owner for owner, _ in rig.fenced] == ["src"]
    assert "no renewal confirmed before the deadline" in rig.fenced[0][1]
    assert "renewals are failing" in rig.fenced[0][1]
    assert manager.reason == rig.fenced[0][1]
    assert rig.steps("src")[-1] == ("expired", "renew_failed", "fenced")
    rig.advance(100.0)
    assert len(rig.fenced) == 1
    assert rig.reactor.getDelayedCalls() == []
    assert (manager.token, manager.deadline) == (None, None)


def test_a_renewal_that_hangs_expires_the_lease_from_held(rig: Rig) -> None:
    manager = rig.holding()
    rig.lockspace.renewals_hang = True
    rig.advance(DEADLINE_AFTER)
    assert rig.lockspace.renewals() == [5.0]  # one in flight at a time
    assert manager.state == "fenced"
    assert rig.steps("src")[-1] == ("expired", "held", "fenced")
    rig.lockspace.hung[0].callback(None)  # the answer finally arrives: too late
    assert manager.state == "fenced"
    assert len(rig.fenced) == 1


def test_may_write_is_false_the_instant_the_deadline_passes(rig: Rig) -> None:
    """A process stopped past its TTL refuses writes before any timer has run."""
    manager = rig.holding()
    rig.reactor.rightNow = TTL + 5.0  # time moved on; no timer has run
    assert manager.state == "held"
    assert not manager.may_write()
    rig.advance(0)  # the overdue timers run now
    assert manager.state == "fenced"
    assert [owner for owner, _ in rig.fenced] == ["src"]


def test_a_loss_the_lockspace_reports_fences_at_once(rig: Rig) -> None:
    manager = rig.holding()
    rig.lockspace.lose(RESOURCE, "deleted by an operator")
    assert manager.state == "fenced"
    assert rig.fenced == [("src", "deleted by an operator")]
    assert rig.reactor.getDelayedCalls() == []


def test_a_loss_found_by_a_renewal_fences(rig: Rig) -> None:
    rig.lockspace.watching = False
    manager = rig.holding()
    rig.lockspace.renewals_fail = True
    rig.advance(5.0)
    rig.lockspace.lose(RESOURCE)
    assert manager.state == "renew_failed"
    rig.lockspace.renewals_fail = False
    rig.advance(5.0)
    assert manager.state == "fenced"
    assert rig.steps("src")[-1] == ("lost", "renew_failed", "fenced")
    assert "gone" in rig.fenced[0][1]


def test_a_lease_without_ttl_is_checked_periodically_and_never_expires() -> None:
    rig = Rig(ttl=None)
    manager = rig.holding()
    assert manager.deadline == math.inf
    rig.lockspace.renewals_fail = True
    rig.advance(10 * CHECK_INTERVAL)
    assert rig.lockspace.renewals() == [CHECK_INTERVAL * i for i in range(1, 11)]
    assert (manager.state, manager.may_write()) == ("renew_failed", True)
    rig.lockspace.renewals_fail = False
    rig.lockspace.watching = False
    rig.lockspace.lose(RESOURCE)
    rig.advance(CHECK_INTERVAL)
    assert manager.state == "fenced"
    replay([r.to_json() for r in rig.records], {"lease": load("lease")})


# -- ending it ------------------------------------------------------------------------


def test_release_gives_the_lease_up_and_stops_every_timer(rig: Rig) -> None:
    manager = rig.holding()
    result(manager.release())
    assert manager.state == "released"
    assert manager.reason == "released"
    assert rig.lockspace.holders_now(RESOURCE) == ()
    assert rig.reactor.getDelayedCalls() == []
    assert not manager.may_write()
    result(manager.release())  # nothing left to release
    with pytest.raises(LeaseStateError):
        manager.acquire()


def test_shutdown_from_held_releases(rig: Rig) -> None:
    manager = rig.holding()
    result(manager.shutdown())
    assert manager.state == "stopped"
    assert rig.lockspace.holders_now(RESOURCE) == ()
    assert rig.reactor.getDelayedCalls() == []
    result(manager.shutdown())
    assert rig.fenced == []


def test_shutdown_from_every_state_is_legal() -> None:
    chart = load("lease")
    assert {t.source for t in chart.transitions if t.trigger == "shutdown"} == (
        set(chart.state_names()) - {"stopped"}
    )


# -- migrating out and in --------------------------------------------------------------


def test_a_migration_hands_the_lease_to_the_destination(rig: Rig) -> None:
    source = rig.holding("src")
    destination = rig.incoming("dst")
    token = result(source.prepare_migrate())
    assert token == 1
    assert source.state == "transferring"
    assert source.holds and not source.may_write()
    assert source.grant is not None and source.grant.holder.offered

    grant = result(destination.acquire_incoming(token))
    assert grant.token == 2
    assert destination.may_write() and destination.token == 2
    assert destination.may_write()
    # The source's watch saw the take-over, and asked: not a fence.
    assert source.state == "released"
    assert source.reason is not None and "taken over by dst" in source.reason
    assert rig.fenced == []
    result(source.complete_migrate_out())  # the ack arrives afterwards: nothing to do
    assert source.state == "released"
    assert rig.steps("src")[-2:] == [
        ("prepare_migrate", "held", "transferring"),
        ("taken_over", "transferring", "released"),
    ]
    assert rig.steps("dst") == [
        ("register_incoming", "unregistered", "incoming"),
        ("take_over", "incoming", "taking_over"),
        ("acquired", "taking_over", "held"),
    ]
    assert rig.reactor.getDelayedCalls() != []  # only the destination's keep-alive
    rig.advance(5.0)
    assert rig.lockspace.renewals() == [5.0]


def test_the_source_completes_on_the_ack_before_it_notices_the_take_over(rig: Rig) -> None:
    rig.lockspace.watching = False
    source = rig.holding("src")
    destination = rig.incoming("dst")
    result(destination.acquire_incoming(result(source.prepare_migrate())))
    assert source.state == "transferring"
    result(source.complete_migrate_out())
    assert source.state == "released"
    assert rig.steps("src")[-1] == ("migrated_out", "transferring", "released")
    assert rig.lockspace.holders_now(RESOURCE) == (Holder("dst", LeaseMode.EXCLUSIVE, 2),)
    rig.advance(20.0)
    assert rig.fenced == []


def test_a_take_over_found_by_a_renewal_is_a_migration_out(rig: Rig) -> None:
    rig.lockspace.watching = False
    source = rig.holding("src")
    destination = rig.incoming("dst")
    result(destination.acquire_incoming(result(source.prepare_migrate())))
    rig.advance(5.0)
    assert source.state == "released"
    assert rig.fenced == []


def test_a_loss_while_offered_with_nobody_taking_over_is_a_fence(rig: Rig) -> None:
    source = rig.holding("src")
    result(source.prepare_migrate())
    rig.lockspace.lose(RESOURCE, "deleted by an operator")
    assert source.state == "fenced"
    assert rig.fenced == [("src", "deleted by an operator")]
    assert rig.steps("src")[-1] == ("lost", "transferring", "fenced")


def test_the_source_cancels_by_taking_its_lease_back(rig: Rig) -> None:
    source = rig.holding("src")
    destination = rig.incoming("dst")
    token = result(source.prepare_migrate())
    grant = result(source.cancel_migrate_out())
    assert (grant.token, source.token, source.state) == (2, 2, "held")
    assert source.may_write()
    assert source.deadline == DEADLINE_AFTER  # counted from the take-back, sent at 0
    conflict = failure_of(destination.acquire_incoming(token), LeaseConflict)
    assert "token 2, not 1" in str(conflict)
    assert destination.state == "incoming"
    assert rig.lockspace.holders_now(RESOURCE) == (Holder("src", LeaseMode.EXCLUSIVE, 2),)
    assert rig.fenced == []
    rig.advance(5.0)
    assert source.state == "held"  # the old grant's watch and keep-alive are gone
    assert rig.lockspace.renewals() == [5.0]


def test_a_cancel_after_the_take_over_is_refused_and_releases(rig: Rig) -> None:
    rig.lockspace.watching = False
    source = rig.holding("src")
    destination = rig.incoming("dst")
    result(destination.acquire_incoming(result(source.prepare_migrate())))
    failure_of(source.cancel_migrate_out(), LeaseConflict)
    assert source.state == "released"
    assert rig.steps("src")[-1] == ("taken_over", "transferring", "released")
    assert destination.may_write()
    assert rig.fenced == []


def test_a_take_back_the_lockspace_cannot_answer_waits_for_the_deadline(rig: Rig) -> None:
    source = rig.holding("src")
    result(source.prepare_migrate())
    rig.lockspace.unreachable = True
    failure_of(source.cancel_migrate_out(), LockspaceUnavailable)
    assert source.state == "transferring"  # it may still be taken back ...
    assert not source.may_write()
    rig.advance(TTL)
    assert source.state == "fenced"  # ... until the deadline says it never will
    assert rig.fenced and rig.fenced[0][0] == "src"


def test_a_failed_offer_holds_the_lease_again(rig: Rig) -> None:
    source = rig.holding("src")
    rig.lockspace.unreachable = True
    failure_of(source.prepare_migrate(), LockspaceUnavailable)
    assert source.state == "held"
    assert source.may_write()
    assert rig.steps("src")[-2:] == [
        ("prepare_migrate", "held", "transferring"),
        ("offer_failed", "transferring", "held"),
    ]


def test_an_offered_lease_that_cannot_renew_stays_offered_until_its_deadline(rig: Rig) -> None:
    source = rig.holding("src")
    result(source.prepare_migrate())
    rig.lockspace.renewals_fail = True
    rig.advance(10.0)
    assert source.state == "transferring"
    rig.advance(DEADLINE_AFTER - 10.0)
    assert source.state == "fenced"
    assert rig.steps("src")[-1] == ("expired", "transferring", "fenced")


def test_a_take_over_with_a_wrong_token_waits_for_the_right_one(rig: Rig) -> None:
    source = rig.holding("src")
    destination = rig.incoming("dst")
    token = result(source.prepare_migrate())
    failure_of(destination.acquire_incoming(token + 7), LeaseConflict)
    assert destination.state == "incoming"
    result(destination.acquire_incoming(token))
    assert destination.state == "held"


def test_the_destination_cancels_before_and_after_its_take_over(rig: Rig) -> None:
    waiting = rig.incoming("dst")
    result(waiting.cancel_migrate_in())
    assert waiting.state == "released"
    result(waiting.cancel_migrate_in())  # ended: harmless

    source = rig.holding("src")
    taker = rig.incoming("dst2")
    result(taker.acquire_incoming(result(source.prepare_migrate())))
    result(taker.cancel_migrate_in())
    assert taker.state == "released" and not taker.may_write()


# -- a lost acknowledgement -------------------------------------------------------------


def test_in_doubt_after_the_take_over_is_handed_off(rig: Rig) -> None:
    rig.lockspace.watching = False
    source = rig.holding("src")
    destination = rig.incoming("dst")
    result(destination.acquire_incoming(result(source.prepare_migrate())))
    assert result(source.resolve_in_doubt()) is InDoubtOutcome.HANDED_OFF
    assert source.state == "released"
    assert [h.owner for h in source.holders] == ["dst"]
    assert result(source.resolve_in_doubt()) is InDoubtOutcome.HANDED_OFF  # and stays so
    assert rig.fenced == []


def test_in_doubt_without_a_take_over_serves_on(rig: Rig) -> None:
    source = rig.holding("src")
    destination = rig.incoming("dst")
    token = result(source.prepare_migrate())
    assert result(source.resolve_in_doubt()) is InDoubtOutcome.SERVING
    assert (source.state, source.token) == ("held", 2)
    assert source.may_write()
    failure_of(destination.acquire_incoming(token), LeaseConflict)


def test_in_doubt_when_the_take_over_wins_the_race(rig: Rig) -> None:
    """Inquire says "still ours", then the destination takes it before we take it back."""
    rig.lockspace.watching = False
    source = rig.holding("src")
    destination = rig.incoming("dst")
    token = result(source.prepare_migrate())
    rig.lockspace.delayed.add("inquire")
    answer = source.resolve_in_doubt()
    result(destination.acquire_incoming(token))  # lands while inquire's answer is on its way
    rig.lockspace.delayed.clear()
    rig.lockspace.deliver()
    assert result(answer) is InDoubtOutcome.HANDED_OFF
    assert source.state == "released"


def test_in_doubt_with_the_lockspace_unreachable_stays_in_doubt(rig: Rig) -> None:
    source = rig.holding("src")
    result(source.prepare_migrate())
    rig.lockspace.unreachable = True
    failure_of(source.resolve_in_doubt(), LockspaceUnavailable)
    assert source.state == "transferring"
    rig.lockspace.unreachable = False
    assert result(source.resolve_in_doubt()) is InDoubtOutcome.SERVING


# -- the trace --------------------------------------------------------------------------


def test_every_transition_is_traced_and_replays(rig: Rig) -> None:
    source = rig.holding("src")
    destination = rig.incoming("dst")
    rig.lockspace.renewals_fail = True
    rig.advance(5.0)
    rig.lockspace.renewals_fail = False
    rig.advance(5.0)
    token = result(source.prepare_migrate())
    result(source.cancel_migrate_out())
    token = result(source.prepare_migrate())
    result(destination.acquire_incoming(token))
    result(destination.shutdown())
    records = [r.to_json() for r in rig.records]
    final = replay(records, {"lease": load("lease")}).final_states
    assert final == {("lease", "src"): "released", ("lease", "dst"): "stopped"}
    assert all(r.ok for r in rig.records)
    assert rig.steps("src") == [
        ("register", "unregistered", "registered"),
        ("acquire", "registered", "acquiring"),
        ("acquired", "acquiring", "held"),
        ("renewal_failed", "held", "renew_failed"),
        ("renewed", "renew_failed", "held"),
        ("prepare_migrate", "held", "transferring"),
        ("reclaimed", "transferring", "held"),
        ("prepare_migrate", "held", "transferring"),
        ("taken_over", "transferring", "released"),
    ]


# -- passing it on to a new process on this host (--takeover) -------------------------


def successor(rig: Rig, owner: str = "src") -> LeaseManager:
    """The new process's manager: the same owner (the grant is the same), its own machine."""
    manager = LeaseManager(
        rig.lockspace,
        resource=RESOURCE,
        owner=owner,
        clock=rig.clock,
        tracer=rig.tracer,
        on_fenced=lambda reason: rig.fenced.append(("new", reason)),
        instance="new",
    )
    manager.register()
    return manager


def test_handing_on_stops_writes_and_says_how_long_the_grant_is_good_for(rig: Rig) -> None:
    old = rig.holding()
    rig.advance(4.0)
    passed = old.hand_on()
    assert old.state == "passing" and old.holds and not old.may_write()
    assert passed.grant == old.grant
    assert passed.valid_for == DEADLINE_AFTER - 4.0
    old.keep()
    assert old.state == "held" and old.may_write()
    assert rig.steps("src")[-2:] == [("pass_on", "held", "passing"), ("kept", "passing", "held")]


def test_the_successor_adopts_the_same_grant_and_the_lockspace_sees_one_holder(rig: Rig) -> None:
    old = rig.holding()
    rig.advance(4.0)
    asked_at = rig.clock.seconds()
    passed = old.hand_on()
    new = successor(rig)
    grant = rig.lockspace.adopt(passed)
    assert passed.valid_for is not None
    new.adopt(grant, valid_until=asked_at + passed.valid_for)
    old.passed_on()
    assert (old.state, old.may_write(), old.reason) == (
        "released",
        False,
        "handed on to a new process on this host",
    )
    assert new.state == "held" and new.may_write() and new.token == passed.grant.token
    assert rig.lockspace.holders_now(RESOURCE) == (Holder("src", LeaseMode.EXCLUSIVE, 1),)
    ops = [op for _, op, _ in rig.lockspace.calls]
    assert "release" not in ops
    assert ops[-4:] == ["pass_on", "adopt", "renew", "let_go"]
    # It renewed at once: its deadline rests on its own renewal now, not the old one's.
    assert new.deadline == asked_at + DEADLINE_AFTER
    rig.advance(30.0)
    assert new.may_write() and rig.fenced == []
    assert rig.steps("new") == [
        ("register", "unregistered", "registered"),
        ("adopted", "registered", "held"),
    ]


def test_an_adopted_grant_is_good_only_until_the_predecessors_deadline(rig: Rig) -> None:
    old = rig.holding()
    rig.advance(4.0)
    passed = old.hand_on()
    new = successor(rig)
    rig.lockspace.renewals_hang = True  # the successor's own renewal never answers
    new.adopt(rig.lockspace.adopt(passed), valid_until=rig.clock.seconds() + 8.0)
    assert new.deadline == rig.clock.seconds() + 8.0
    rig.advance(7.9)
    assert new.may_write()
    rig.advance(0.2)
    assert not new.may_write() and new.state == "fenced"


def test_a_loss_while_passing_fences(rig: Rig) -> None:
    old = rig.holding()
    old.hand_on()
    rig.lockspace.lose(RESOURCE)
    assert old.state == "fenced" and rig.fenced[0][0] == "src"


def test_passing_on_needs_a_lockspace_that_can(rig: Rig) -> None:
    class Plain:
        """A lockspace without pass_on/let_go/adopt."""

        def __getattr__(self, name: str) -> Any:
            if name in ("pass_on", "let_go", "adopt"):
                raise AttributeError(name)
            return getattr(rig.lockspace, name)

    manager = LeaseManager(Plain(), resource=RESOURCE, owner="x", clock=rig.clock)  # type: ignore[arg-type]
    manager.register()
    result(manager.acquire())
    assert not manager.can_pass_on
    with pytest.raises(LeaseStateError, match="cannot pass a grant"):
        manager.hand_on()
    assert manager.state == "held"


def test_adopt_refuses_someone_elses_grant(rig: Rig) -> None:
    old = rig.holding("src")
    passed = old.hand_on()
    new = successor(rig, owner="someone-else")
    with pytest.raises(LeaseStateError, match="not someone-else's"):
        new.adopt(passed.grant, valid_until=None)
    assert new.state == "registered"
