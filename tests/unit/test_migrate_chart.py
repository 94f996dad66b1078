"""statecharts/migration.yaml: the source's mirror job, its states and what they mean."""

from __future__ import annotations

from collections import deque

import pytest
from transitions import MachineError
from twisted.internet import task

from ferry.clock import ReactorClock
from ferry.statecharts import Statechart, build, load

STATES = [
    "connecting",
    "negotiating",
    "bulk_pass",
    "dirty_pass",
    "quiescing",
    "offering",
    "committing",
    "completed",
    "reclaiming",
    "cancelling",
    "in_doubt",
    "retry_wait",
    "reconnecting",
    "renegotiating",
    "failed",
    "cancelled",
]
FINAL = {"completed", "failed", "cancelled"}
BREAKABLE = [
    "connecting",
    "negotiating",
    "bulk_pass",
    "dirty_pass",
    "quiescing",
    "retry_wait",
    "reconnecting",
    "renegotiating",
]
LEASE_LOSABLE = [*BREAKABLE, "offering", "committing", "reclaiming", "cancelling"]

# Written out from DESIGN.md and the issues, independently of the YAML:
# (trigger, source, dest, what the export's role does or None).
TRANSITIONS = {
    ("connected", "connecting", "negotiating", None),
    ("accepted", "negotiating", "bulk_pass", None),
    ("next_pass", "bulk_pass", "dirty_pass", None),
    ("next_pass", "dirty_pass", "dirty_pass", None),
    ("quiesce", "bulk_pass", "quiescing", "quiesce"),
    ("quiesce", "dirty_pass", "quiescing", "quiesce"),
    ("offer", "quiescing", "offering", None),
    ("commit", "quiescing", "committing", "hand_off"),
    ("commit", "offering", "committing", "hand_off"),
    ("committed", "committing", "completed", "handed_off"),
    ("mirrored", "quiescing", "completed", "mirrored"),
    ("fail", "connecting", "failed", "migration_failed"),
    ("fail", "negotiating", "failed", "migration_failed"),
    *(
        ("fail", s, "retry_wait", None)
        for s in ("reconnecting", "renegotiating", "bulk_pass", "dirty_pass")
    ),
    ("fail", "quiescing", "retry_wait", "retry_migration"),
    ("offer_failed", "offering", "retry_wait", "retry_migration"),
    ("fail", "offering", "reclaiming", None),
    ("commit_rejected", "committing", "retry_wait", "retry_migration"),
    ("reclaim", "committing", "reclaiming", None),
    ("reclaimed", "reclaiming", "retry_wait", "retry_migration"),
    ("fail", "committing", "in_doubt", "commit_unknown"),
    ("resolve_committed", "in_doubt", "completed", "resolve_handed_off"),
    ("resolve_aborted", "in_doubt", "failed", "resolve_serving"),
    ("retry", "retry_wait", "reconnecting", None),
    ("give_up", "retry_wait", "failed", "migration_failed"),
    ("connected", "reconnecting", "renegotiating", None),
    ("accepted", "renegotiating", "bulk_pass", None),
    *(("break_migration", s, "cancelled", "break_migration") for s in BREAKABLE),
    ("break_migration", "offering", "cancelling", None),
    ("reclaimed", "cancelling", "cancelled", "break_migration"),
    ("veto", "connecting", "cancelled", "break_migration"),
    ("veto", "quiescing", "cancelled", "break_migration"),
    *(("lease_lost", s, "failed", None) for s in LEASE_LOSABLE),
    ("lease_lost", "in_doubt", "failed", "resolve_fenced"),
    *(("stop", s, "failed", None) for s in ("committing", "reclaiming", "cancelling", "in_doubt")),
}


@pytest.fixture
def chart() -> Statechart:
    return load("migration")


def prop(chart: Statechart, key: str) -> set[str]:
    return set(chart.states_where(key))


def test_states_and_transitions_are_the_specified_ones(chart: Statechart) -> None:
    assert chart.initial == "connecting"
    assert list(chart.state_names()) == STATES
    assert {
        (t.trigger, t.source, t.dest, t.effects.get("role")) for t in chart.transitions
    } == TRANSITIONS
    assert len(chart.transitions) == len(TRANSITIONS)


def test_final_states_are_final(chart: Statechart) -> None:
    assert prop(chart, "final") == FINAL
    for state in FINAL:
        assert chart.triggers_from(state) == ()
    assert prop(chart, "is_migrating") == set(STATES) - FINAL


def test_every_state_can_still_end(chart: Statechart) -> None:
    for state in STATES:
        seen, queue = {state}, deque([state])
        while queue:
            here = queue.popleft()
            for t in chart.transitions:
                if t.source == here and t.dest not in seen:
                    seen.add(t.dest)
                    queue.append(t.dest)
        assert seen & FINAL, state
    assert chart.reachable() == frozenset(STATES)


def test_a_failure_ends_the_job_before_a_good_negotiation_and_retries_after(
    chart: Statechart,
) -> None:
    for state in set(STATES) - FINAL:
        dest = chart.next_state(state, "fail")
        if state in ("offering", "committing", "reclaiming", "cancelling", "in_doubt"):
            continue
        negotiated = chart.property(state, "negotiated")
        if state == "retry_wait":
            assert dest is None  # nothing is connected to fail
        else:
            assert dest == ("retry_wait" if negotiated else "failed"), state
    assert prop(chart, "negotiated") == set(STATES) - FINAL - {"connecting", "negotiating"}


def test_break_works_wherever_no_commit_may_have_landed(chart: Statechart) -> None:
    sent = prop(chart, "commit_sent")
    assert sent == {"committing", "in_doubt", "completed"}
    for state in STATES:
        dest = chart.next_state(state, "break_migration")
        if state == "offering":
            assert dest == "cancelling"  # the offered lease comes back first
            continue
        breakable = state not in FINAL and state not in sent
        breakable = breakable and state not in ("reclaiming", "cancelling")
        assert dest == ("cancelled" if breakable else None), state


def test_a_veto_comes_only_before_anything_is_connected_or_offered(chart: Statechart) -> None:
    vetoable = {state for state in STATES if chart.next_state(state, "veto") is not None}
    assert vetoable == {"connecting", "quiescing"}
    assert not prop(chart, "commit_sent") & vetoable
    # The policy gives up only where a lost attempt waits, never with clients held.
    assert {s for s in STATES if chart.next_state(s, "give_up")} == {"retry_wait"}
    assert not chart.property("retry_wait", "clients_held")


def test_commit_outcomes(chart: Statechart) -> None:
    assert chart.next_state("committing", "committed") == "completed"
    assert chart.next_state("committing", "commit_rejected") == "retry_wait"
    assert chart.next_state("committing", "reclaim") == "reclaiming"
    assert chart.triggers_from("reclaiming") == ("reclaimed", "lease_lost", "stop")
    assert chart.triggers_from("cancelling") == ("reclaimed", "lease_lost", "stop")
    assert chart.next_state("committing", "fail") == "in_doubt"
    assert chart.triggers_from("in_doubt") == (
        "resolve_committed",
        "resolve_aborted",
        "lease_lost",
        "stop",
    )


def test_clients_are_held_from_quiescing_until_the_end(chart: Statechart) -> None:
    assert prop(chart, "clients_held") == {
        "quiescing",
        "offering",
        "committing",
        "reclaiming",
        "cancelling",
        "in_doubt",
    }
    for t in chart.transitions:
        # Only quiescing starts holding; every other held state is entered from a held one.
        if chart.property(t.dest, "clients_held") and t.dest != "quiescing":
            assert chart.property(t.source, "clients_held"), t


def test_copying_states_are_the_passes(chart: Statechart) -> None:
    assert prop(chart, "copying") == {"bulk_pass", "dirty_pass", "quiescing"}
    into_bulk = {t.source for t in chart.transitions if t.dest == "bulk_pass"}
    assert into_bulk == {"negotiating", "renegotiating"}  # each attempt starts at pass 1


class Model:
    state: str


def test_the_built_machine_follows_the_chart(chart: Statechart) -> None:
    clock = ReactorClock(task.Clock())
    paths: dict[str, list[str]] = {chart.initial: []}
    queue = deque([chart.initial])
    while queue:
        here = queue.popleft()
        for t in chart.transitions:
            if t.source == here and t.dest not in paths:
                paths[t.dest] = [*paths[here], t.trigger]
                queue.append(t.dest)
    for state in STATES:
        for trigger in sorted(chart.triggers()):
            model = Model()
            build(chart, model, instance="m", tracer=None, clock=clock)
            for step in paths[state]:
                getattr(model, step)()
            expected = chart.next_state(state, trigger)
            if expected is None:
                with pytest.raises(MachineError):
                    model.trigger(trigger)  # type: ignore[attr-defined]
                assert model.state == state
            else:
                model.trigger(trigger)  # type: ignore[attr-defined]
                assert model.state == expected


def test_the_role_holds_clients_exactly_while_the_migration_does(chart: Statechart) -> None:
    """Walk both machines together through every migration transition, by its effects."""
    role = load("role")
    # Every state the role can be in while the migration is in each state.
    where: dict[str, set[str]] = {"connecting": {"migrating"}}
    queue = deque(["connecting"])
    while queue:
        here = queue.popleft()
        for t in chart.transitions:
            if t.source != here or t.trigger == "lease_lost":
                continue  # lease_lost: whoever saw the loss fenced the role already
            effect = t.effects.get("role")
            reached = set()
            for role_state in where[here]:
                nxt = role_state if effect is None else role.next_state(role_state, effect)
                assert nxt is not None, (t, role_state)
                reached.add(nxt)
            if not reached <= where.setdefault(t.dest, set()):
                where[t.dest] |= reached
                queue.append(t.dest)
    for state, role_states in where.items():
        if state in FINAL:
            continue
        for role_state in role_states:
            assert chart.property(state, "clients_held") == role.property(
                role_state, "clients_held"
            ), (state, role_state)
    assert where["reclaiming"] == {"quiescing", "handing_off"}
    assert where["completed"] == {"handed_off", "serving"}  # mirrored: serves on
