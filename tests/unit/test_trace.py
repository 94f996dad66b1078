"""Trace records, the tracer and its file, replay, and the clock that stamps the records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transitions import MachineError
from twisted.internet import task

from ferry.clock import Clock, ReactorClock, ReactorTime
from ferry.replay import ReplayResult, replay
from ferry.statecharts import Statechart, StateSpec, TransitionSpec, build, load
from ferry.trace import (
    CREATED,
    ReplayError,
    TraceFile,
    TraceFormatError,
    Tracer,
    TraceRecord,
)
from support import wait_until


class Model:
    state: str


def record(**overrides: Any) -> TraceRecord:
    fields: dict[str, Any] = {
        "time": 12.5,
        "machine": "role",
        "instance": "export0",
        "event": "serve",
        "source": "starting",
        "dest": "serving",
        "ok": True,
        "error": None,
    }
    fields.update(overrides)
    return TraceRecord(**fields)


# -- records --------------------------------------------------------------------


def test_a_record_is_one_line_with_its_keys_in_order() -> None:
    line = record().to_json()
    assert "\n" not in line
    assert list(json.loads(line)) == [
        "time",
        "machine",
        "instance",
        "event",
        "source",
        "dest",
        "ok",
        "error",
    ]
    assert line == (
        '{"time": 12.5, "machine": "role", "instance": "export0", "event": "serve", '
        '"source": "starting", "dest": "serving", "ok": true, "error": null}'
    )


def test_a_record_survives_the_round_trip() -> None:
    for original in (
        record(),
        record(time=1e9 + 0.123456789, instance='odd "name"\n'),
        record(ok=False, dest="starting", error="MachineError: no"),
    ):
        assert TraceRecord.from_json(original.to_json()) == original


def test_error_may_be_left_out_of_a_line() -> None:
    line = json.dumps({k: v for k, v in json.loads(record().to_json()).items() if k != "error"})
    assert TraceRecord.from_json(line) == record()


BAD_LINES = {
    "not JSON": ("{time: 1}", "not JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing fields": ('{"time": 1, "machine": "role"}', "missing instance, event"),
    "unknown field": (
        record().to_json()[:-1] + ', "colour": "red"}',
        "unknown field colour",
    ),
    "time is a string": (record().to_json().replace("12.5", '"12.5"'), "time must be a number"),
    "time is a bool": (record().to_json().replace("12.5", "true"), "time must be a number"),
    "time is NaN": (record().to_json().replace("12.5", "NaN"), "time must be finite"),
    "empty machine": (record().to_json().replace('"role"', '""'), "machine must be a non-empty"),
    "ok is a string": (record().to_json().replace("true", '"yes"'), "ok must be true or false"),
    "ok with an error": (record().to_json().replace("null", '"boom"'), "carries no error"),
    "failure without an error": (record().to_json().replace("true", "false"), "must say what"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_lines_raise_trace_format_error(case: str) -> None:
    line, reason = BAD_LINES[case]
    with pytest.raises(TraceFormatError, match=reason):
        TraceRecord.from_json(line)


def test_records_are_checked_when_built_in_code_too() -> None:
    with pytest.raises(TraceFormatError):
        record(ok=False)
    with pytest.raises(TraceFormatError):
        record(instance="")


# -- the tracer -----------------------------------------------------------------


def test_every_record_goes_to_every_sink() -> None:
    first: list[TraceRecord] = []
    second: list[TraceRecord] = []
    tracer = Tracer(first.append)
    tracer.subscribe(second.append)
    tracer.record(record())
    assert first == second == [record()]


def test_unsubscribe_stops_delivery_and_is_idempotent() -> None:
    seen: list[TraceRecord] = []
    tracer = Tracer()
    unsubscribe = tracer.subscribe(seen.append)
    tracer.record(record(time=1))
    unsubscribe()
    unsubscribe()
    tracer.record(record(time=2))
    assert [r.time for r in seen] == [1]


def test_the_same_sink_twice_is_two_subscriptions() -> None:
    seen: list[TraceRecord] = []
    tracer = Tracer()
    first = tracer.subscribe(seen.append)
    tracer.subscribe(seen.append)
    first()
    tracer.record(record())
    assert len(seen) == 1


def test_a_failing_sink_does_not_starve_the_others() -> None:
    seen: list[TraceRecord] = []

    def broken(rec: TraceRecord) -> None:
        raise OSError("disk full")

    tracer = Tracer(broken, seen.append)
    tracer.record(record())
    assert seen == [record()]


def test_a_sink_may_unsubscribe_while_records_are_delivered() -> None:
    seen: list[str] = []
    tracer = Tracer()

    def once(rec: TraceRecord) -> None:
        seen.append("once")
        unsubscribe()

    unsubscribe = tracer.subscribe(once)
    tracer.subscribe(lambda rec: seen.append("always"))
    tracer.record(record())
    tracer.record(record())
    assert seen == ["once", "always", "always"]


def test_a_trace_file_appends_and_flushes_each_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    trace_file = TraceFile(path)
    trace_file.write(record(time=1))
    # Written and flushed before close, by the file's thread: a crash then would keep it.
    first = record(time=1).to_json() + "\n"
    wait_until("the first line on the file", lambda: path.read_text() == first)
    trace_file(record(time=2))
    trace_file.close()
    trace_file.close()
    with TraceFile(path) as again:
        again.write(record(time=3))
    assert [TraceRecord.from_json(x).time for x in path.read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(ValueError, match="closed"):
        trace_file.write(record())


# -- replay ---------------------------------------------------------------------


@pytest.fixture
def role() -> Statechart:
    return load("role")


def session(role: Statechart) -> list[str]:
    """A recorded session: a source migrating to a destination, one export each."""
    clock = task.Clock()
    lines: list[str] = []
    tracer = Tracer(lambda rec: lines.append(rec.to_json()))
    source, target = Model(), Model()
    build(role, source, instance="src", tracer=tracer, clock=ReactorClock(clock))
    build(role, target, instance="dst", tracer=tracer, clock=ReactorClock(clock))
    source.serve()
    target.listen()
    target.sender_connected()
    for step in ("migrate", "quiesce", "hand_off"):
        clock.advance(1)
        source.trigger(step)
    with pytest.raises(MachineError):
        source.migrate()  # an operator's mistake: recorded as ok=false
    target.commit()
    target.committed()
    source.commit_unknown()
    source.resolve_handed_off()
    return lines


def test_a_recorded_session_replays_to_its_final_states(role: Statechart) -> None:
    lines = session(role)
    result = replay(lines, {"role": role})
    assert result == ReplayResult(
        final_states={("role", "src"): "handed_off", ("role", "dst"): "serving"},
        lines=len(lines),
    )


def test_blank_lines_are_ignored(role: Statechart) -> None:
    lines = session(role)
    spaced = ["\n", *(line + "\n" for line in lines), "   \n", ""]
    assert replay(spaced, {"role": role}).lines == len(lines)


def edited(lines: list[str], index: int, **changes: Any) -> list[str]:
    obj = json.loads(lines[index])
    obj.update(changes)
    return [*lines[:index], json.dumps(obj), *lines[index + 1 :]]


def test_an_edited_illegal_line_is_reported_with_its_line_number(role: Statechart) -> None:
    lines = session(role)
    # Line 4 is "listen" on dst; make it "migrate", which starting does not allow.
    assert json.loads(lines[3])["event"] == "listen"
    bad = edited(lines, 3, event="migrate")
    with pytest.raises(ReplayError) as info:
        replay(bad, {"role": role})
    assert info.value.line_number == 4
    assert info.value.line == bad[3]
    assert str(info.value) == "line 4: role/dst: no transition 'migrate' from 'starting'"


@pytest.mark.parametrize(
    ("index", "changes", "reason"),
    [
        (2, {"dest": "listening"}, "'serve' from 'starting' goes to 'serving', not 'listening'"),
        (4, {"source": "serving"}, "record starts in 'serving' but the machine is in 'listening'"),
        (4, {"event": "warp"}, "no trigger 'warp' in role"),
        (2, {"machine": "rolex"}, "unknown machine 'rolex'"),
        (0, {"dest": "serving"}, "created in its initial state 'starting'"),
        (
            8,
            {"dest": "serving"},
            "failed 'migrate' left the machine in 'serving'; expected 'handing_off'",
        ),
    ],
)
def test_illegal_lines_say_what_was_expected(
    role: Statechart, index: int, changes: dict[str, Any], reason: str
) -> None:
    bad = edited(session(role), index, **changes)
    with pytest.raises(ReplayError) as info:
        replay(bad, {"role": role})
    assert info.value.line_number == index + 1
    assert reason in info.value.reason


def test_a_failed_event_may_not_invent_a_state(role: Statechart) -> None:
    lines = session(role)
    assert json.loads(lines[8])["ok"] is False
    with pytest.raises(ReplayError, match="line 9:"):
        replay(edited(lines, 8, source="serving", dest="serving"), {"role": role})


def test_a_bad_json_line_is_reported_with_its_line_number(role: Statechart) -> None:
    lines = session(role)
    lines[5] = lines[5][:-3]
    with pytest.raises(ReplayError) as info:
        replay(lines, {"role": role})
    assert info.value.line_number == 6
    assert str(info.value).startswith("line 6: not JSON")


def test_an_instance_built_again_starts_again(role: Statechart) -> None:
    """A trace file appended to by two runs of the program."""
    first = session(role)
    second = session(role)
    assert replay(first + second, {"role": role}).final_states == {
        ("role", "src"): "handed_off",
        ("role", "dst"): "serving",
    }


def test_without_a_created_record_an_instance_starts_in_the_initial_state(
    role: Statechart,
) -> None:
    lines = [line for line in session(role) if json.loads(line)["event"] != CREATED]
    assert replay(lines, {"role": role}).final_states[("role", "src")] == "handed_off"


def test_replay_keeps_machines_apart() -> None:
    toggle = Statechart(
        "toggle",
        "off",
        (StateSpec("off", "dark"), StateSpec("on", "lit")),
        (TransitionSpec("flip", "off", "on"), TransitionSpec("flip", "on", "off")),
    )
    clock = task.Clock()
    lines: list[str] = []
    tracer = Tracer(lambda rec: lines.append(rec.to_json()))
    lamp, export = Model(), Model()
    build(toggle, lamp, instance="x", tracer=tracer, clock=ReactorClock(clock))
    build(load("role"), export, instance="x", tracer=tracer, clock=ReactorClock(clock))
    lamp.flip()
    export.serve()
    lamp.flip()
    lamp.flip()
    result = replay(lines, {"toggle": toggle, "role": load("role")})
    assert result.final_states == {("toggle", "x"): "on", ("role", "x"): "serving"}


# -- replay of random sessions ---------------------------------------------------


@st.composite
def walks(draw: st.DrawFn, *, legal_only: bool) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Drive 1-3 role machines with random triggers; return the trace and where they ended."""
    role = load("role")
    clock = task.Clock()
    lines: list[str] = []
    tracer = Tracer(lambda rec: lines.append(rec.to_json()))
    models = [Model() for _ in range(draw(st.integers(1, 3)))]
    for i, model in enumerate(models):
        build(role, model, instance=f"export{i}", tracer=tracer, clock=ReactorClock(clock))
    every_trigger = sorted(role.triggers())
    for _ in range(draw(st.integers(0, 30))):
        model = draw(st.sampled_from(models))
        choices = role.triggers_from(model.state) if legal_only else every_trigger
        if not choices:
            continue
        clock.advance(draw(st.floats(0, 10, allow_nan=False)))
        trigger = draw(st.sampled_from(choices))
        if role.next_state(model.state, trigger) is None:
            with pytest.raises(MachineError):
                model.trigger(trigger)
        else:
            model.trigger(trigger)
    return lines, {("role", f"export{i}"): m.state for i, m in enumerate(models)}


@settings(max_examples=150, deadline=None)
@given(walks(legal_only=True))
def test_random_walks_of_legal_triggers_replay_cleanly(
    walk: tuple[list[str], dict[tuple[str, str], str]],
) -> None:
    lines, final = walk
    result = replay(lines, {"role": load("role")})
    assert result.final_states == final
    assert result.lines == len(lines)
    assert all(json.loads(line)["ok"] for line in lines)


@settings(max_examples=150, deadline=None)
@given(walks(legal_only=False))
def test_random_walks_with_illegal_triggers_replay_cleanly(
    walk: tuple[list[str], dict[tuple[str, str], str]],
) -> None:
    lines, final = walk
    assert replay(lines, {"role": load("role")}).final_states == final


# -- the clock that stamps the records -------------------------------------------


def test_twisted_test_clock_and_the_reactor_fit_reactor_time() -> None:
    from twisted.internet import reactor

    assert isinstance(task.Clock(), ReactorTime)
    assert isinstance(reactor, ReactorTime)
    clock: Clock = ReactorClock(task.Clock())
    assert clock.seconds() == 0.0


def test_call_later_runs_on_simulated_time() -> None:
    fake = task.Clock()
    clock = ReactorClock(fake)
    calls: list[tuple[float, str]] = []
    handle = clock.call_later(5, lambda tag: calls.append((fake.seconds(), tag)), "timeout")
    assert handle.active() and handle.getTime() == 5
    assert clock.pending() == 1
    fake.advance(4.9)
    assert calls == []
    fake.advance(0.1)
    assert calls == [(5.0, "timeout")]
    assert not handle.active()
    assert clock.pending() == 0


def test_cancelled_and_failed_calls_are_forgotten() -> None:
    fake = task.Clock()
    clock = ReactorClock(fake)
    clock.call_later(1, lambda: None).cancel()
    assert clock.pending() == 0

    def boom() -> None:
        raise RuntimeError("boom")

    clock.call_later(1, boom)
    with pytest.raises(RuntimeError):
        fake.advance(1)  # task.Clock lets the error through
    assert clock.pending() == 0


def test_reset_and_delay_reach_the_underlying_call() -> None:
    fake = task.Clock()
    clock = ReactorClock(fake)
    calls: list[float] = []
    handle = clock.call_later(1, lambda: calls.append(fake.seconds()))
    handle.delay(1)
    handle.reset(3)
    fake.advance(2.5)
    assert calls == []
    fake.advance(0.5)
    assert calls == [3.0]


def test_looping_call_runs_on_the_clock_given() -> None:
    fake = task.Clock()
    clock = ReactorClock(fake)
    ticks: list[float] = []
    loop = clock.looping_call(2, lambda: ticks.append(fake.seconds()))
    assert loop.clock is fake
    fake.advance(2)
    fake.advance(2)
    assert ticks == [2.0, 4.0]
    loop.stop()
    assert clock.pending() == 0
    now = clock.looping_call(2, lambda: ticks.append(-1), now=True)
    assert ticks[-1] == -1
    now.stop()


def test_a_looping_call_that_raises_stops_and_is_forgotten() -> None:
    fake = task.Clock()
    clock = ReactorClock(fake)

    def boom() -> None:
        raise RuntimeError("boom")

    loop = clock.looping_call(1, boom)
    fake.advance(1)
    assert not loop.running
    assert clock.pending() == 0


def test_cancel_all_stops_everything_pending() -> None:
    fake = task.Clock()
    clock = ReactorClock(fake)
    calls: list[str] = []
    clock.call_later(1, calls.append, "later")
    clock.call_later(2, calls.append, "cancelled by hand").cancel()
    loop = clock.looping_call(1, calls.append, "loop")
    assert clock.pending() == 2
    clock.cancel_all()
    assert clock.pending() == 0
    assert not loop.running
    assert fake.getDelayedCalls() == []
    fake.advance(10)
    assert calls == []
    clock.call_later(1, calls.append, "after shutdown")
    fake.advance(1)
    assert calls == ["after shutdown"]
