"""The source's half of moving a lease with the image, against a scripted destination.

The source holds its lease in the in-memory lockspace; the fake destination
takes it over by the commit's token (as ``ferry listen --lockspace`` does)
or does not, then acknowledges, refuses or drops the commit.  What must
hold: the commit carries the offered token; an ack releases the source's
lease; a refusal takes it back *before* clients are released; a lost ack is
settled by the lockspace, without an operator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from fakes.destination import Commit, FakeDestination, Script
from fakes.lockspace import FakeLockspace
from ferry.lease.manager import LeaseManager
from ferry.migrate.core.stats import FailureReason
from ferry.migrate.options import MirrorOptions
from ferry.migrate.source import MirrorSource
from ferry.trace import TraceRecord

from .test_migrate_source import SIZE, Rig, listen, reactor, within

__all__ = ["listen"]  # the fixture, for pytest

RESOURCE = "vm1.img"


class LeasedRig(Rig):
    def __init__(
        self, tmp_path: Path, port: int, scripts: list[Script], ttl: float | None = None
    ) -> None:
        super().__init__(tmp_path, port)
        self.lockspace = FakeLockspace(self.rclock, ttl=ttl)
        self.lease = LeaseManager(
            self.lockspace,
            resource=RESOURCE,
            owner="source",
            clock=self.rclock,
            tracer=self.tracer,
            on_fenced=self._fenced,
        )
        self.lease.register()
        self.lease.acquire()
        self.first_token = self.lease.token
        self.lease_at_release: list[str] = []
        chart = self.export.role_chart

        def watch_release(trigger: str, source: str, dest: str) -> None:
            """The lease's state whenever held clients go on being served (or get EIO)."""
            held = chart.property(source, "clients_held")
            if held and not chart.property(dest, "clients_held") and dest != "handed_off":
                self.lease_at_release.append(self.lease.state)

        self.export.observe_role(watch_release)
        self.source = MirrorSource(
            self.export,
            self.source.destination,
            gate=self.gate,
            clock=self.rclock,
            connector=self.source._connector,
            options=MirrorOptions(action=self.source.options.action),
            tracer=self.tracer,
            lease=self.lease,
        )

    def _fenced(self, reason: str) -> None:
        """What ``ferry.node`` does when the lease is lost: fence the role, end the job."""
        if self.export.has_control:
            self.export.trigger("lease_lost")
        self.source.lease_lost(reason)

    def lease_reached(self, state: str) -> Deferred[None]:
        """Fires once the lease enters ``state`` (at once if it is there)."""
        d: Deferred[None] = Deferred()
        if self.lease.state == state:
            d.callback(None)
            return within(d)

        def sink(rec: TraceRecord) -> None:
            if rec.machine == "lease" and rec.dest == state and rec.ok and not d.called:
                unsubscribe()
                reactor.callLater(0, d.callback, None)

        unsubscribe = self.tracer.subscribe(sink)
        return within(d)

    def take_over(self, token: int) -> None:
        self.lockspace.take_over(RESOURCE, "destination", token)

    def holder(self) -> str:
        (holder,) = self.lockspace.holders_now(RESOURCE)
        return holder.owner


@pytest_twisted.ensureDeferred
async def test_the_ack_hands_the_lease_over(tmp_path: Path, listen: Any) -> None:
    scripts = [Script()]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    scripts[0].take_lease = rig.take_over
    await within(rig.source.start())
    result = await within(rig.source.finished)
    assert result.handed_off and bytes(fake.disk) == rig.original
    (session,) = fake.sessions
    assert session.source_resource == RESOURCE  # named in FERRY_OPT_MIGRATE
    # The commit carries the offered token; taking it over moved it on.
    assert session.commit_token is not None and session.commit_token >= rig.first_token
    assert rig.lease.state == "released" and rig.holder() == "destination"
    (holder,) = rig.lockspace.holders_now(RESOURCE)
    assert holder.token > session.commit_token


@pytest_twisted.ensureDeferred
async def test_a_refused_commit_takes_the_lease_back_before_clients_go_on(
    tmp_path: Path, listen: Any
) -> None:
    scripts = [Script(commit=Commit.REFUSE), Script()]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    scripts[1].take_lease = rig.take_over
    await within(rig.source.start())
    await rig.reached("migration", "retry_wait")
    assert rig.lease.state == "held" and rig.holder() == "source"
    # The role kept control but served nothing until the lease was back.
    migration = rig.states("migration")
    assert migration[migration.index("committing") :][:3] == [
        "committing",
        "reclaiming",
        "retry_wait",
    ]
    role = rig.states("role")
    assert role[role.index("handing_off") :][:2] == ["handing_off", "migrating"]
    rig.clock.advance(1.0)  # the backoff, on the simulated clock
    result = await within(rig.source.finished)
    assert result.handed_off and bytes(fake.disk) == rig.original
    # The refusal's release of the held clients came with the lease held again.
    assert rig.lease_at_release[0] == "held"
    first, second = (s.commit_token for s in fake.sessions)
    assert first is not None and second is not None and second > first
    assert rig.holder() == "destination"


@pytest_twisted.ensureDeferred
async def test_a_lease_the_destination_cannot_take_fails_the_migration_at_once(
    tmp_path: Path, listen: Any
) -> None:
    """EPERM to the commit: the lease comes back first, then no retry can change it."""
    scripts = [Script(commit=Commit.REJECT), Script()]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    await within(rig.source.start())
    await rig.reached("migration", "retry_wait")
    rig.clock.advance(0)  # the policy decides after the transition, on the clock
    result = await within(rig.source.finished)
    assert (result.state, result.handed_off) == ("failed", False)
    assert result.reason.startswith("lease_refused: commit refused: EPERM no lease for you")
    assert rig.states("migration")[-3:] == ["reclaiming", "retry_wait", "failed"]
    assert rig.export.state == "serving" and rig.lease.state == "held"
    assert rig.holder() == "source" and rig.lease_at_release[0] == "held"
    assert len(fake.sessions) == 1  # nothing retried
    assert dict(rig.source.stats.failures) == {FailureReason.LEASE_REFUSED: 1}
    assert rig.source.last_failure == "lease_refused"
    give_up = [r for r in rig.records if r.machine == "migration" and r.event == "give_up"]
    assert give_up and give_up[0].reason == result.reason  # the events say why
    rig.replays()


@pytest.mark.parametrize("taken", [True, False], ids=["taken-over", "not-taken"])
@pytest_twisted.ensureDeferred
async def test_a_lost_ack_is_settled_by_the_lease(tmp_path: Path, listen: Any, taken: bool) -> None:
    scripts = [Script(commit=Commit.CLOSE)]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    if taken:
        scripts[0].take_lease = rig.take_over
    await within(rig.source.start())
    result = await within(rig.source.finished)  # no operator resolves it
    assert "in_doubt" in rig.states("migration")
    if taken:
        assert result.handed_off and rig.export.state == "handed_off"
        assert rig.lease.state == "released" and rig.holder() == "destination"
    else:
        assert not result.handed_off and rig.export.state == "serving"
        assert rig.lease.state == "held" and rig.holder() == "source"
        assert rig.lease_at_release == ["held"]
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_a_break_while_the_lease_is_offered_lets_clients_go_once_it_is_back(
    tmp_path: Path, listen: Any
) -> None:
    scripts = [Script()]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    rig.lockspace.delayed = {"offer"}  # the offer is on its way, its answer not back
    await within(rig.source.start())
    await rig.lease_reached("transferring")
    rig.source.cancel()
    # Released now, the held clients would meet a lease that may not write: EIO.
    assert rig.lease_at_release == [] and rig.gate.holding
    rig.lockspace.deliver()
    await rig.lease_reached("held")
    await within(rig.source.finished)
    assert rig.lease_at_release == ["held"] and not rig.gate.holding
    assert rig.holder() == "source" and rig.export.state == "serving"
    assert "COMMIT" not in fake.sessions[0].commands
    rig.replays()


@pytest.mark.parametrize("when", ["bulk_pass", "quiescing"])
@pytest_twisted.ensureDeferred
async def test_a_lost_lease_ends_the_migration_at_once(
    tmp_path: Path, listen: Any, when: str
) -> None:
    scripts = [Script(hold_flush=2 if when == "quiescing" else None)]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    await within(rig.source.start())
    if when == "quiescing":
        await within(fake.sessions[0].arrived("FLUSH", 2))  # the switchover's FLUSH, held
        assert rig.gate.holding
    rig.lockspace.lose(RESOURCE)
    result = await within(rig.source.finished)
    assert (result.state, result.handed_off) == ("failed", False)
    assert result.reason.startswith("the lease was lost")
    assert rig.source.outcome is not None and rig.source.outcome.message == "Mirror started"
    assert rig.source.state == "failed" and "retry_wait" not in rig.states("migration")
    assert rig.export.state == "fenced" and not rig.gate.holding
    assert rig.source.stats.failures[FailureReason.LEASE] == 1
    assert "COMMIT" not in fake.sessions[0].commands and len(fake.sessions) == 1
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_in_doubt_with_the_lockspace_gone_past_the_deadline_is_fenced(
    tmp_path: Path, listen: Any
) -> None:
    scripts = [Script(commit=Commit.CLOSE)]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts, ttl=9.0)
    await within(rig.source.start())
    await within(fake.sessions[0].arrived("COMMIT"))
    rig.lockspace.unreachable = True  # nobody can say whether the destination took it
    await rig.reached("role", "in_doubt")
    while rig.lease.state != "fenced":  # asked every 2 s, in vain, until the deadline
        assert rig.source.state == "in_doubt" and rig.export.state == "in_doubt"
        rig.clock.advance(1.0)
    assert rig.clock.seconds() < 10  # within the TTL
    result = await within(rig.source.finished)
    assert (result.state, result.handed_off) == ("failed", False)
    assert "in doubt" in result.reason
    assert rig.export.state == "fenced" and not rig.gate.holding
    assert rig.source.stats.failures[FailureReason.IN_DOUBT] == 1
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_a_lease_lost_while_committing_fences_without_waiting_for_the_answer(
    tmp_path: Path, listen: Any
) -> None:
    scripts = [Script(commit=Commit.HANG)]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    await within(rig.source.start())
    await within(fake.sessions[0].arrived("COMMIT"))
    rig.lockspace.lose(RESOURCE)
    result = await within(rig.source.finished)
    assert (result.state, result.handed_off) == ("failed", False)
    assert rig.states("migration")[-2:] == ["committing", "failed"]
    assert rig.export.state == "fenced" and not rig.gate.holding
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_a_refused_commit_whose_lease_someone_else_took_fences_the_source(
    tmp_path: Path, listen: Any
) -> None:
    """The destination refuses, but a third party took the offered lease by its token."""
    scripts = [Script(commit=Commit.REJECT)]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts)
    scripts[0].take_lease = lambda token: rig.lockspace.take_over(RESOURCE, "intruder", token)
    await within(rig.source.start())
    result = await within(rig.source.finished)
    assert (result.state, result.handed_off) == ("failed", False)
    assert "retry_wait" not in rig.states("migration")
    assert rig.export.state == "fenced" and not rig.export.has_control
    assert rig.lease.state in ("released", "fenced") and not rig.lease.may_write()
    assert rig.holder() == "intruder"
    assert not rig.gate.holding  # the held clients went on, to the EIO of a fenced export
    assert len(fake.sessions) == 1  # and nothing was retried
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_a_refused_commit_waits_for_the_lease_until_its_deadline_then_fences(
    tmp_path: Path, listen: Any
) -> None:
    scripts = [Script(commit=Commit.REJECT)]
    fake = FakeDestination(SIZE, scripts)
    rig = LeasedRig(tmp_path, listen(fake), scripts, ttl=9.0)
    await within(rig.source.start())
    await within(fake.sessions[0].arrived("COMMIT"))
    rig.lockspace.unreachable = True  # the take-back cannot be asked
    await rig.reached("migration", "reclaiming")
    while rig.lease.state != "fenced":  # asked every 2 s, in vain, until the deadline
        assert rig.source.state == "reclaiming" and rig.export.state == "handing_off"
        assert rig.gate.holding and not rig.lease.may_write()
        rig.clock.advance(1.0)
    assert rig.clock.seconds() < 10  # within the TTL
    result = await within(rig.source.finished)
    assert (result.state, result.handed_off) == ("failed", False)
    assert rig.states("migration")[-2:] == ["reclaiming", "failed"]
    assert rig.export.state == "fenced" and not rig.gate.holding
    rig.replays()
