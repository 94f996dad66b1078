"""statecharts/lease.yaml: one holder's lease, its states and what they mean."""

from __future__ import annotations

import ast
import inspect
from collections import deque

import pytest
from transitions import MachineError
from twisted.internet import task

from ferry.chartnames import LeaseTrigger
from ferry.clock import ReactorClock
from ferry.lease import manager
from ferry.statecharts import Statechart, build, load

STATES = [
    "unregistered",
    "registered",
    "incoming",
    "acquiring",
    "taking_over",
    "held",
    "renew_failed",
    "transferring",
    "passing",
    "released",
    "fenced",
    "stopped",
]
OURS = ["held", "renew_failed", "transferring", "passing"]
ENDED = {"released", "fenced", "stopped"}

# Written out from DESIGN.md and issue 4, independently of the YAML.
TRANSITIONS = {
    ("register", "unregistered", "registered"),
    ("register_incoming", "unregistered", "incoming"),
    ("acquire", "registered", "acquiring"),
    ("acquired", "acquiring", "held"),
    ("acquired", "taking_over", "held"),
    ("acquire_failed", "acquiring", "registered"),
    ("take_over", "incoming", "taking_over"),
    ("take_over_failed", "taking_over", "incoming"),
    ("cancel_incoming", "incoming", "released"),
    ("renewal_failed", "held", "renew_failed"),
    ("renewed", "renew_failed", "held"),
    ("prepare_migrate", "held", "transferring"),
    ("offer_failed", "transferring", "held"),
    ("reclaimed", "transferring", "held"),
    ("migrated_out", "transferring", "released"),
    ("taken_over", "transferring", "released"),
    # a takeover on one host (issue 11): passed to a new process as it is
    ("pass_on", "held", "passing"),
    ("pass_on", "renew_failed", "passing"),
    ("kept", "passing", "held"),
    ("passed_on", "passing", "released"),
    ("adopted", "registered", "held"),
    *(("release", s, "released") for s in OURS),
    *(("expired", s, "fenced") for s in OURS),
    *(("lost", s, "fenced") for s in OURS),
    *(("shutdown", s, "stopped") for s in STATES if s != "stopped"),
}


@pytest.fixture
def chart() -> Statechart:
    return load("lease")


def prop(chart: Statechart, key: str) -> set[str]:
    return set(chart.states_where(key))


def test_states_and_transitions_are_the_specified_ones(chart: Statechart) -> None:
    assert chart.initial == "unregistered"
    assert list(chart.state_names()) == STATES
    assert {(t.trigger, t.source, t.dest) for t in chart.transitions} == TRANSITIONS
    assert len(chart.transitions) == len(TRANSITIONS)


def test_every_state_is_reachable_and_can_still_stop(chart: Statechart) -> None:
    assert chart.reachable() == frozenset(STATES)
    for state in STATES:
        seen, queue = {state}, deque([state])
        while queue:
            here = queue.popleft()
            for t in chart.transitions:
                if t.source == here and t.dest not in seen:
                    seen.add(t.dest)
                    queue.append(t.dest)
        assert "stopped" in seen, state


def test_the_design_path_is_in_the_chart(chart: Statechart) -> None:
    """DESIGN.md: unregistered -> registered -> acquiring -> held -> transferring -> released."""
    here = chart.initial
    for trigger in ["register", "acquire", "acquired", "prepare_migrate", "migrated_out"]:
        nxt = chart.next_state(here, trigger)
        assert nxt is not None, (here, trigger)
        here = nxt
    assert here == "released"
    assert chart.next_state("transferring", "reclaimed") == "held"
    assert chart.next_state("held", "renewal_failed") == "renew_failed"
    assert chart.next_state("renew_failed", "expired") == "fenced"


def test_may_write_only_where_the_grant_is_ours_and_not_offered(chart: Statechart) -> None:
    assert prop(chart, "holds") == set(OURS)
    assert prop(chart, "may_write") == {"held", "renew_failed"}
    assert prop(chart, "may_write") <= prop(chart, "holds")
    assert prop(chart, "offered") == {"transferring"}
    assert not prop(chart, "offered") & prop(chart, "may_write")
    assert prop(chart, "ended") == ENDED
    assert not prop(chart, "ended") & prop(chart, "holds")


def test_ended_states_are_left_only_by_shutdown(chart: Statechart) -> None:
    for state in ENDED:
        assert set(chart.triggers_from(state)) <= {"shutdown"}, state
    assert chart.triggers_from("stopped") == ()


def test_a_loss_or_an_expiry_can_happen_wherever_the_grant_is_ours(chart: Statechart) -> None:
    for trigger in ("lost", "expired", "release"):
        assert {t.source for t in chart.transitions if t.trigger == trigger} == prop(chart, "holds")


def test_writes_start_only_on_getting_the_grant(chart: Statechart) -> None:
    """Entering a writable state from a non-writable one happens only by getting the grant
    (acquired, or adopted from a predecessor on this host) or by a hand-over that did not
    happen (offer_failed, reclaimed, kept)."""
    writable = prop(chart, "may_write")
    starts = {
        t.trigger for t in chart.transitions if t.dest in writable and t.source not in writable
    }
    assert starts == {"acquired", "adopted", "offer_failed", "reclaimed", "kept"}


def _strings(node: ast.AST) -> set[str]:
    """The trigger names in ``node``: ``LeaseTrigger.NAME`` members (and plain strings)."""
    names = {
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    for n in ast.walk(node):
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id == "LeaseTrigger"
        ):
            names.add(LeaseTrigger[n.attr].value)
    return names


_FIRING = {"_fire", "_can", "_fence", "_finish_out"}


def _fired_triggers() -> set[str]:
    """The trigger names ferry.lease.manager fires or asks about, read from its source."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(manager))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _FIRING
        ):
            names |= _strings(node.args[0])
        elif isinstance(node, ast.keyword) and node.arg in {"callbackArgs", "errbackArgs"}:
            names |= _strings(node.value)
    return names


def test_the_manager_fires_exactly_the_charts_triggers(chart: Statechart) -> None:
    assert _fired_triggers() == set(chart.triggers())


def test_the_properties_the_manager_reads_exist(chart: Statechart) -> None:
    tree = ast.parse(inspect.getsource(manager))
    read = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "_is"
        and isinstance(node.args[0], ast.Constant)
    }
    assert read == set(chart.states[0].properties)


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
                model.trigger(step)  # type: ignore[attr-defined]
            expected = chart.next_state(state, trigger)
            if expected is None:
                with pytest.raises(MachineError):
                    model.trigger(trigger)  # type: ignore[attr-defined]
                assert model.state == state
            else:
                model.trigger(trigger)  # type: ignore[attr-defined]
                assert model.state == expected
