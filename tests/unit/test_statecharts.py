"""The statechart loader, the role chart, the machines build() makes, and the diagrams."""

from __future__ import annotations

import keyword
import tomllib
from collections import deque
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from transitions import MachineError
from twisted.internet import task

from ferry import statecharts
from ferry.clock import ReactorClock
from ferry.replay import replay
from ferry.statecharts import (
    Statechart,
    StatechartError,
    StateSpec,
    TransitionSpec,
    build,
    load,
    load_file,
    render_all,
    render_dot,
    render_mermaid,
)
from ferry.trace import CREATED, TraceFile, Tracer, TraceRecord

REPO = Path(__file__).resolve().parents[2]

ROLE_STATES = [
    "starting",
    "listening",
    "receiving",
    "committing",
    "serving",
    "migrating",
    "quiescing",
    "handing_off",
    "passing_on",
    "handed_off",
    "in_doubt",
    "fenced",
    "stopped",
]

# The role machine as the issue specifies it, written out independently of the YAML.
ROLE_TRANSITIONS = {
    ("serve", "starting", "serving"),
    ("listen", "starting", "listening"),
    ("sender_connected", "listening", "receiving"),
    ("sender_lost", "receiving", "listening"),
    ("sender_lost", "committing", "listening"),
    ("commit", "receiving", "committing"),
    ("committed", "committing", "serving"),
    ("migrate", "serving", "migrating"),
    ("quiesce", "migrating", "quiescing"),
    ("hand_off", "quiescing", "handing_off"),
    ("handed_off", "handing_off", "handed_off"),
    ("commit_unknown", "handing_off", "in_doubt"),
    ("resolve_serving", "in_doubt", "serving"),
    ("resolve_handed_off", "in_doubt", "handed_off"),
    ("resolve_fenced", "in_doubt", "fenced"),
    ("migration_failed", "migrating", "serving"),
    ("migration_failed", "quiescing", "serving"),
    ("retry_migration", "quiescing", "migrating"),
    ("retry_migration", "handing_off", "migrating"),
    ("mirrored", "quiescing", "serving"),
    ("break_migration", "migrating", "serving"),
    ("break_migration", "quiescing", "serving"),
    # a takeover on one host (issue 11): the old process's export, then the new one's
    ("pass_on", "serving", "passing_on"),
    ("kept", "passing_on", "serving"),
    ("passed_on", "passing_on", "handed_off"),
    ("taken_over", "starting", "serving"),
    *(
        ("lease_lost", s, "fenced")
        for s in ("serving", "migrating", "quiescing", "handing_off", "passing_on")
    ),
    *(("shutdown", s, "stopped") for s in ROLE_STATES if s != "stopped"),
}

HAS_CONTROL = {
    "starting": False,
    "listening": False,
    "receiving": False,
    "committing": False,
    "serving": True,
    "migrating": True,
    "quiescing": True,
    "handing_off": True,
    "passing_on": True,
    "handed_off": False,
    "in_doubt": False,
    "fenced": False,
    "stopped": False,
}

CLIENTS_ALLOWED = {
    "starting": False,
    "listening": False,
    "receiving": False,
    "committing": False,
    "serving": True,
    "migrating": True,
    "quiescing": False,
    "handing_off": False,
    "passing_on": False,
    "handed_off": False,
    "in_doubt": False,
    "fenced": False,
    "stopped": False,
}


class Model:
    """A bare model; transitions adds ``state`` and the trigger methods."""

    state: str


def path_to(chart: Statechart, target: str) -> list[str]:
    """Triggers that lead from the initial state to ``target`` (breadth first)."""
    paths: dict[str, list[str]] = {chart.initial: []}
    queue = deque([chart.initial])
    while queue:
        here = queue.popleft()
        for t in chart.transitions:
            if t.source == here and t.dest not in paths:
                paths[t.dest] = [*paths[here], t.trigger]
                queue.append(t.dest)
    return paths[target]


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def role() -> Statechart:
    return load("role")


# -- role.yaml ------------------------------------------------------------------


def test_role_states_and_transitions_are_the_specified_ones(role: Statechart) -> None:
    assert role.name == "role"
    assert role.initial == "starting"
    assert list(role.state_names()) == ROLE_STATES
    assert {(t.trigger, t.source, t.dest) for t in role.transitions} == ROLE_TRANSITIONS
    assert len(role.transitions) == len(ROLE_TRANSITIONS)


def test_every_role_state_is_reachable_from_starting(role: Statechart) -> None:
    for state in ROLE_STATES:
        path = path_to(role, state)
        here = role.initial
        for trigger in path:
            nxt = role.next_state(here, trigger)
            assert nxt is not None
            here = nxt
        assert here == state
    assert role.reachable() == frozenset(ROLE_STATES)


def test_has_control_table(role: Statechart) -> None:
    assert {s: role.property(s, "has_control") for s in ROLE_STATES} == HAS_CONTROL


def test_clients_allowed_table(role: Statechart) -> None:
    assert {s: role.property(s, "clients_allowed") for s in ROLE_STATES} == CLIENTS_ALLOWED


def test_clients_are_only_allowed_where_there_is_control(role: Statechart) -> None:
    assert set(role.states_where("clients_allowed")) <= set(role.states_where("has_control"))


def test_lease_lost_leaves_exactly_the_states_with_control(role: Statechart) -> None:
    sources = {t.source for t in role.transitions if t.trigger == "lease_lost"}
    assert sources == set(role.states_where("has_control"))


def test_shutdown_is_legal_everywhere_but_stopped(role: Statechart) -> None:
    for state in ROLE_STATES:
        expected = None if state == "stopped" else "stopped"
        assert role.next_state(state, "shutdown") == expected
    assert role.triggers_from("stopped") == ()


def test_break_is_spelled_break_migration(role: Statechart) -> None:
    assert "break_migration" in role.triggers()
    assert not any(keyword.iskeyword(t) for t in role.triggers())


def test_every_role_state_has_a_one_line_description(role: Statechart) -> None:
    for state in role.states:
        assert state.description
        assert "\n" not in state.description


def test_state_and_property_lookups_fail_loudly(role: Statechart) -> None:
    with pytest.raises(KeyError, match="no state 'nowhere'"):
        role.state("nowhere")
    with pytest.raises(KeyError, match="no property 'colour'"):
        role.property("serving", "colour")
    assert role.next_state("listening", "migrate") is None
    assert role.next_state("serving", "no_such_trigger") is None


def test_loaded_charts_cannot_be_edited(role: Statechart) -> None:
    with pytest.raises(TypeError):
        role.state("serving").properties["has_control"] = False  # type: ignore[index]
    assert {role: "charts can be dict keys"}[load_file(REPO / "statecharts" / "role.yaml")]


def test_load_is_cached_and_load_all_includes_role(role: Statechart) -> None:
    assert load("role") is role
    assert statecharts.load_all()["role"] is role


def test_load_refuses_a_name_that_is_not_a_chart_name() -> None:
    with pytest.raises(StatechartError):
        load("../role")
    with pytest.raises(StatechartError, match="cannot read"):
        load("no_such_chart")


# -- where the YAML is found ----------------------------------------------------


def test_charts_dir_in_a_checkout_is_the_repository_statecharts() -> None:
    assert statecharts.charts_dir() == REPO / "statecharts"


def test_charts_dir_prefers_the_copy_inside_an_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "ferry"
    (package / "statechart_data").mkdir(parents=True)
    monkeypatch.setattr(statecharts, "__file__", str(package / "statecharts.py"))
    assert statecharts.charts_dir() == package / "statechart_data"


def test_charts_dir_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statecharts, "__file__", str(tmp_path / "a" / "b" / "statecharts.py"))
    with pytest.raises(StatechartError, match="statechart_data"):
        statecharts.charts_dir()


def test_the_wheel_carries_the_statecharts_where_charts_dir_looks() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert include["statecharts"] == "ferry/statechart_data"


# -- what the loader refuses ---------------------------------------------------

GOOD = """\
initial: a
states:
  a:
    description: the first
    flag: true
  b:
    description: the second
    flag: false
transitions:
  - [go, a, b]
  - [back, b, a]
"""


def write_chart(tmp_path: Path, text: str, name: str = "toy") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(dedent(text))
    return path


def test_a_small_chart_loads(tmp_path: Path) -> None:
    chart = load_file(write_chart(tmp_path, GOOD))
    assert chart.name == "toy"
    assert chart.states == (
        StateSpec("a", "the first", {"flag": True}),
        StateSpec("b", "the second", {"flag": False}),
    )
    assert chart.transitions == (TransitionSpec("go", "a", "b"), TransitionSpec("back", "b", "a"))
    assert chart.triggers() == {"go", "back"}


BAD_CHARTS = {
    "unknown source state": (GOOD + "  - [jump, nowhere, a]\n", "unknown source state 'nowhere'"),
    "unknown dest state": (GOOD + "  - [jump, a, nowhere]\n", "unknown dest state 'nowhere'"),
    "duplicate trigger from one source": (
        GOOD + "  - [go, a, a]\n",
        "trigger 'go' leaves 'a' twice",
    ),
    "missing initial": (GOOD.replace("initial: a\n", ""), "missing initial"),
    "initial not a state": (GOOD.replace("initial: a", "initial: z"), "initial state 'z'"),
    "state declared twice": (
        GOOD.replace("transitions:", "  a:\n    description: again\n    flag: true\ntransitions:"),
        "duplicate key 'a'",
    ),
    "unreachable state": (
        GOOD.replace("transitions:", "  c:\n    description: alone\n    flag: true\ntransitions:"),
        "unreachable from 'a': 'c'",
    ),
    "properties differ": (GOOD.replace("    flag: false\n", ""), "every state must set the same"),
    "property of a bad type": (GOOD.replace("flag: false", "flag: 1.5"), "bool, int or str"),
    "missing description": (GOOD.replace("    description: the second\n", ""), "description"),
    "keyword trigger": (GOOD + "  - [break, b, b]\n", "'break' is not a Python identifier"),
    "private trigger": (GOOD + "  - [_go, b, b]\n", "starts with '_'"),
    "reserved trigger": (GOOD + "  - [is_b, a, a]\n", "clashes with the methods"),
    "row of two": (GOOD + "  - [go, a]\n", "expected a row"),
    "empty source list": (GOOD + "  - [stay, [], a]\n", "non-empty list"),
    "source listed twice": (GOOD + "  - [stay, [b, b], a]\n", "listed twice"),
    "unknown top-level key": (GOOD + "colour: red\n", "unknown top-level key colour"),
    "not a mapping": ("- a\n- b\n", "expected a mapping"),
    "not YAML": ("initial: [a\n", "not valid YAML"),
    "yes is not a state name": (GOOD.replace("  b:", "  yes:"), "True"),
    "effects not a mapping": (GOOD + "  - [stay, b, b, role]\n", "effects must map"),
    "effect on a keyword trigger": (GOOD + "  - [stay, b, b, {role: break}]\n", "'break'"),
    "row of five": (GOOD + "  - [stay, b, b, {}, {}]\n", "expected a row"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHARTS))
def test_invalid_charts_raise_statechart_error_naming_the_file(tmp_path: Path, case: str) -> None:
    text, reason = BAD_CHARTS[case]
    path = write_chart(tmp_path, text)
    with pytest.raises(StatechartError) as info:
        load_file(path)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")
    assert reason in info.value.reason


def test_a_missing_file_is_a_statechart_error(tmp_path: Path) -> None:
    with pytest.raises(StatechartError, match="cannot read"):
        load_file(tmp_path / "absent.yaml")


def test_charts_built_in_code_are_checked_too() -> None:
    with pytest.raises(StatechartError, match="unknown dest state"):
        Statechart("toy", "a", (StateSpec("a", "a"),), (TransitionSpec("go", "a", "b"),))


# -- build() --------------------------------------------------------------------


def traced(
    chart: Statechart, clock: task.Clock, instance: str = "export0", model: Any = None
) -> tuple[Any, list[TraceRecord]]:
    records: list[TraceRecord] = []
    model = Model() if model is None else model
    build(chart, model, instance=instance, tracer=Tracer(records.append), clock=ReactorClock(clock))
    return model, records


def rec(time: float, event: str, source: str, dest: str, ok: bool = True, error: str | None = None):
    return TraceRecord(time, "role", "export0", event, source, dest, ok, error)


def test_a_migration_writes_one_record_per_transition(role: Statechart, clock: task.Clock) -> None:
    model, records = traced(role, clock)
    assert model.state == "starting"
    steps = ["serve", "migrate", "quiesce", "hand_off", "handed_off"]
    for trigger in steps:
        clock.advance(1.5)
        assert getattr(model, trigger)() is True
    assert model.state == "handed_off"
    assert records == [
        rec(0.0, CREATED, "starting", "starting"),
        rec(1.5, "serve", "starting", "serving"),
        rec(3.0, "migrate", "serving", "migrating"),
        rec(4.5, "quiesce", "migrating", "quiescing"),
        rec(6.0, "hand_off", "quiescing", "handing_off"),
        rec(7.5, "handed_off", "handing_off", "handed_off"),
    ]


def test_an_illegal_trigger_raises_and_is_recorded(role: Statechart, clock: task.Clock) -> None:
    model, records = traced(role, clock)
    model.listen()
    clock.advance(2)
    with pytest.raises(MachineError, match="Can't trigger event migrate from state listening"):
        model.migrate()
    assert model.state == "listening"
    last = records[-1]
    assert (last.time, last.event, last.source, last.dest, last.ok) == (
        2.0,
        "migrate",
        "listening",
        "listening",
        False,
    )
    assert last.error == (
        "MachineError: role/export0: Can't trigger event migrate from state listening!"
    )
    # The machine is still usable afterwards.
    model.sender_connected()
    assert records[-1] == rec(2.0, "sender_connected", "listening", "receiving")


def test_trigger_by_name_goes_through_the_same_hook(role: Statechart, clock: task.Clock) -> None:
    model, records = traced(role, clock)
    model.trigger("serve")
    with pytest.raises(MachineError):
        model.trigger("commit")
    assert [(r.event, r.ok) for r in records[1:]] == [("serve", True), ("commit", False)]


def test_a_trigger_fired_in_a_callback_runs_after_the_current_one(
    role: Statechart, clock: task.Clock
) -> None:
    log: list[str] = []

    class Migrating(Model):
        def on_enter_migrating(self, event: Any) -> None:
            log.append(f"enter migrating from {event.transition.source}")
            assert self.quiesce() is True  # queued: returns at once ...
            log.append(f"quiesce queued, still {self.state}")  # ... without moving yet

        def on_enter_quiescing(self, event: Any) -> None:
            log.append("enter quiescing")

    model, records = traced(role, clock, model=Migrating())
    model.serve()
    model.migrate()
    assert model.state == "quiescing"
    assert log == [
        "enter migrating from serving",
        "quiesce queued, still migrating",
        "enter quiescing",
    ]
    assert [(r.event, r.source, r.dest, r.ok) for r in records[2:]] == [
        ("migrate", "serving", "migrating", True),
        ("quiesce", "migrating", "quiescing", True),
    ]


def test_events_dropped_from_the_queue_are_recorded(role: Statechart, clock: task.Clock) -> None:
    class Confused(Model):
        def on_enter_migrating(self, event: Any) -> None:
            self.hand_off()  # illegal in migrating: raises when its turn comes
            self.quiesce()  # legal, but transitions drops it when hand_off raises

    model, records = traced(role, clock, model=Confused())
    model.serve()
    with pytest.raises(MachineError, match="hand_off"):
        model.migrate()  # the queued error surfaces from the outermost trigger
    assert model.state == "migrating"
    assert [(r.event, r.source, r.dest, r.ok) for r in records[2:]] == [
        ("migrate", "serving", "migrating", True),
        ("hand_off", "migrating", "migrating", False),
        ("quiesce", "migrating", "migrating", False),
    ]
    assert records[-1].error == "dropped: queued behind 'hand_off', which raised"
    assert replay([r.to_json() for r in records], {"role": role}).final_states == {
        ("role", "export0"): "migrating"
    }


def test_a_callback_that_raises_after_the_state_changed(
    role: Statechart, clock: task.Clock
) -> None:
    class Fragile(Model):
        def on_enter_serving(self, event: Any) -> None:
            raise RuntimeError("disk on fire")

    model, records = traced(role, clock, model=Fragile())
    with pytest.raises(RuntimeError, match="disk on fire"):
        model.serve()
    assert model.state == "serving"
    assert records[-1] == rec(
        0.0, "serve", "starting", "serving", False, "RuntimeError: disk on fire"
    )
    assert replay([r.to_json() for r in records], {"role": role}).final_states == {
        ("role", "export0"): "serving"
    }


def test_build_matches_next_state_for_every_state_and_trigger(
    role: Statechart, clock: task.Clock
) -> None:
    for state in role.state_names():
        for trigger in sorted(role.triggers()):
            model, records = traced(role, clock)
            for step in path_to(role, state):
                model.trigger(step)
            expected = role.next_state(state, trigger)
            if expected is None:
                with pytest.raises(MachineError):
                    model.trigger(trigger)
                assert model.state == state
            else:
                model.trigger(trigger)
                assert model.state == expected
            assert records[-1].event == trigger
            assert records[-1].ok is (expected is not None)


def test_build_refuses_a_model_whose_names_would_be_skipped(
    role: Statechart, clock: task.Clock
) -> None:
    class Shadowing:
        def serve(self) -> None:
            """transitions would leave this in place and bypass the machine."""

    with pytest.raises(ValueError, match="already has serve"):
        build(role, Shadowing(), instance="x", tracer=None, clock=ReactorClock(clock))
    model = Model()
    build(role, model, instance="x", tracer=None, clock=ReactorClock(clock))
    with pytest.raises(ValueError, match="already has"):
        build(role, model, instance="x", tracer=None, clock=ReactorClock(clock))


def test_build_without_a_tracer(role: Statechart, clock: task.Clock) -> None:
    model = Model()
    machine = build(role, model, instance="x", tracer=None, clock=ReactorClock(clock))
    model.serve()
    assert model.state == "serving"
    assert machine.has_queue


def test_build_needs_an_instance_name(role: Statechart, clock: task.Clock) -> None:
    with pytest.raises(ValueError, match="instance"):
        build(role, Model(), instance="", tracer=None, clock=ReactorClock(clock))


def test_a_trace_file_of_a_session_replays(
    role: Statechart, clock: task.Clock, tmp_path: Path
) -> None:
    path = tmp_path / "trace.jsonl"
    with TraceFile(path) as trace_file:
        tracer = Tracer(trace_file.write)
        source, target = Model(), Model()
        build(role, source, instance="src", tracer=tracer, clock=ReactorClock(clock))
        build(role, target, instance="dst", tracer=tracer, clock=ReactorClock(clock))
        source.serve()
        target.listen()
        target.sender_connected()
        source.migrate()
        source.quiesce()
        source.hand_off()
        target.commit()
        target.committed()
        source.handed_off()
        source.shutdown()
    with path.open() as lines:
        result = replay(lines, statecharts.load_all())
    assert result.final_states == {("role", "src"): "stopped", ("role", "dst"): "serving"}
    assert result.lines == 12


def test_any_chart_builds_not_just_role(tmp_path: Path, clock: task.Clock) -> None:
    chart = load_file(write_chart(tmp_path, GOOD))
    model = Model()
    records: list[TraceRecord] = []
    build(chart, model, instance="t", tracer=Tracer(records.append), clock=ReactorClock(clock))
    model.go()
    model.back()
    assert [(r.machine, r.event, r.dest) for r in records] == [
        ("toy", CREATED, "a"),
        ("toy", "go", "b"),
        ("toy", "back", "a"),
    ]


# -- diagrams -------------------------------------------------------------------


def test_diagrams_are_deterministic_and_mark_control(role: Statechart) -> None:
    dot = render_dot(role)
    assert dot == render_dot(load_file(REPO / "statecharts" / "role.yaml"))
    for state in ROLE_STATES:
        line = next(x for x in dot.splitlines() if x.startswith(f"  {state} ["))
        assert ("filled" in line) is HAS_CONTROL[state], line
    assert '  migrating -> serving [label="migration_failed\\nbreak_migration"];' in dot

    mermaid = render_mermaid(role)
    assert mermaid == render_mermaid(load_file(REPO / "statecharts" / "role.yaml"))
    assert mermaid.splitlines()[3] == "stateDiagram-v2"
    assert "    class serving,migrating,quiescing,handing_off,passing_on control" in mermaid
    assert "    [*] --> starting" in mermaid


def test_a_chart_without_control_has_no_control_styling(tmp_path: Path) -> None:
    chart = load_file(write_chart(tmp_path, GOOD))
    assert "filled" not in render_dot(chart)
    assert "class " not in render_mermaid(chart)


def test_render_all_writes_beside_each_yaml(tmp_path: Path) -> None:
    write_chart(tmp_path, GOOD, "toy")
    write_chart(tmp_path, GOOD, "other")
    written = render_all(tmp_path)
    assert written == [
        tmp_path / "other.dot",
        tmp_path / "other.mmd",
        tmp_path / "toy.dot",
        tmp_path / "toy.mmd",
    ]
    assert (tmp_path / "toy.dot").read_text() == render_dot(load_file(tmp_path / "toy.yaml"))
    assert render_all(str(tmp_path)) == written


def test_committed_diagrams_are_up_to_date() -> None:
    directory = statecharts.charts_dir()
    charts = sorted(directory.glob("*.yaml"))
    assert charts, f"no statecharts in {directory}"
    for path in charts:
        chart = load_file(path)
        for suffix, render in ((".dot", render_dot), (".mmd", render_mermaid)):
            diagram = path.with_suffix(suffix)
            committed = diagram.read_text() if diagram.exists() else None
            assert committed == render(chart), (
                f"{diagram} is missing or stale: run `ferry statecharts render` "
                "and commit the result"
            )


# -- effects: one machine driving another ----------------------------------------

LEADER = """\
initial: idle
states:
  idle:
    description: nothing happens
  busy:
    description: something happens
transitions:
  - [start, idle, busy, {follower: wake}]
  - [stop, busy, idle, {follower: sleep}]
  - [poke, busy, busy]
"""


def test_effects_are_parsed_per_source_and_drive_the_follower(
    tmp_path: Path, clock: task.Clock
) -> None:
    leader = load_file(write_chart(tmp_path, LEADER, "leader"))
    assert leader.transition("idle", "start") == TransitionSpec(
        "start", "idle", "busy", {"follower": "wake"}
    )
    assert leader.effects_on("follower") == {("idle", "start"): "wake", ("busy", "stop"): "sleep"}
    assert leader.effects_on("nobody") == {}
    fired: list[str] = []
    changes: list[tuple[str, str, str]] = []
    model = Model()
    build(
        leader,
        model,
        instance="l",
        tracer=None,
        clock=ReactorClock(clock),
        followers={"follower": fired.append},
        on_change=lambda *change: changes.append(change),
    )
    model.trigger("start")
    model.trigger("poke")
    model.trigger("stop")
    assert fired == ["wake", "sleep"]
    assert changes == [
        ("start", "idle", "busy"),
        ("poke", "busy", "busy"),
        ("stop", "busy", "idle"),
    ]
    with pytest.raises(MachineError):
        model.trigger("stop")  # illegal: no effect fires
    assert fired == ["wake", "sleep"]


def test_diagrams_label_effects(tmp_path: Path) -> None:
    leader = load_file(write_chart(tmp_path, LEADER, "leader"))
    assert "idle --> busy: start / follower.wake" in render_mermaid(leader)


def test_every_effect_names_a_trigger_of_its_machine() -> None:
    charts = statecharts.load_all()
    for chart in charts.values():
        for t in chart.transitions:
            for machine, trigger in t.effects.items():
                assert machine in charts, (chart.name, t)
                assert trigger in charts[machine].triggers(), (chart.name, t)


def test_the_generated_names_are_the_yamls() -> None:
    from ferry import chartnames

    charts = statecharts.load_all()
    assert statecharts.names_module_path().read_text() == statecharts.render_names(
        charts.values()
    ), "src/ferry/chartnames.py is stale: run `ferry statecharts render`"
    for name, chart in charts.items():
        stem = "".join(part.capitalize() for part in name.split("_"))
        states = getattr(chartnames, f"{stem}State")
        triggers = getattr(chartnames, f"{stem}Trigger")
        assert [s.value for s in states] == list(chart.state_names())
        assert {t.value for t in triggers} == chart.triggers()
