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
    "committing",
    "completed",
    "reclaiming",
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

# Written out from DESIGN.md and issue 3, independently of the YAML.
TRANSITIONS = {
    ("connected", "connecting", "negotiating"),
    ("accepted", "negotiating", "bulk_pass"),
    ("next_pass", "bulk_pass", "dirty_pass"),
    ("next_pass", "dirty_pass", "dirty_pass"),
    ("quiesce", "bulk_pass", "quiescing"),
    ("quiesce", "dirty_pass", "quiescing"),
    ("commit", "quiescing", "committing"),
    ("committed", "committing", "completed"),
    ("fail", "connecting", "failed"),
    ("fail", "negotiating", "failed"),
    *(
        ("fail", s, "retry_wait")
        for s in ("reconnecting", "renegotiating", "bulk_pass", "dirty_pass", "quiescing")
    ),
    ("commit_rejected", "committing", "retry_wait"),
    ("fail", "committing", "in_doubt"),
    ("resolve_committed", "in_doubt", "completed"),
    ("resolve_aborted", "in_doubt", "failed"),
    ("retry", "retry_wait", "reconnecting"),
    ("connected", "reconnecting", "renegotiating"),
    ("accepted", "renegotiating", "bulk_pass"),
    ("reclaim", "committing", "reclaiming"),
    ("reclaimed", "reclaiming", "retry_wait"),
    *(("break_migration", s, "cancelled") for s in BREAKABLE),
    *(("lease_lost", s, "failed") for s in [*BREAKABLE, "reclaiming"]),
}


@pytest.fixture
def chart() -> Statechart:
    return load("migration")


def prop(chart: Statechart, key: str) -> set[str]:
    return set(chart.states_where(key))


def test_states_and_transitions_are_the_specified_ones(chart: Statechart) -> None:
    assert chart.initial == "connecting"
    assert list(chart.state_names()) == STATES
    assert {(t.trigger, t.source, t.dest) for t in chart.transitions} == TRANSITIONS
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
        if state in ("committing", "reclaiming", "in_doubt"):
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
        breakable = state not in FINAL and state not in sent and state != "reclaiming"
        assert dest == ("cancelled" if breakable else None), state


def test_commit_outcomes(chart: Statechart) -> None:
    assert chart.next_state("committing", "committed") == "completed"
    assert chart.next_state("committing", "commit_rejected") == "retry_wait"
    assert chart.next_state("committing", "reclaim") == "reclaiming"
    assert chart.triggers_from("reclaiming") == ("reclaimed", "lease_lost")
    assert chart.next_state("committing", "fail") == "in_doubt"
    assert chart.triggers_from("in_doubt") == ("resolve_committed", "resolve_aborted")


def test_clients_are_held_from_quiescing_until_the_end(chart: Statechart) -> None:
    assert prop(chart, "clients_held") == {"quiescing", "committing", "reclaiming", "in_doubt"}
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
