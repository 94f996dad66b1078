"""Timelines from trace records, their text table and their SVG layout: pure, no files."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from ferry.timeline import (
    MIN_BAND_WIDTH,
    UNKNOWN_EVENT,
    Timeline,
    build_timeline,
    format_duration,
    layout,
    nice_step,
    render_svg,
    render_text,
    state_colours,
)
from ferry.trace import CREATED, TraceRecord

SVG = "{http://www.w3.org/2000/svg}"


def rec(
    time: float,
    event: str,
    source: str,
    dest: str,
    *,
    machine: str = "role",
    instance: str = "disk",
    error: str | None = None,
) -> TraceRecord:
    return TraceRecord(time, machine, instance, event, source, dest, error is None, error)


def created(time: float, state: str, **kw: Any) -> TraceRecord:
    return rec(time, CREATED, state, state, **kw)


MIGRATION = [
    created(100.0, "starting"),
    rec(100.5, "serve", "starting", "serving"),
    created(101.0, "connecting", machine="migration"),
    rec(101.0, "migrate", "serving", "migrating"),
    rec(101.25, "connected", "connecting", "bulk_pass", machine="migration"),
    rec(103.0, "committed", "bulk_pass", "completed", machine="migration"),
    rec(103.0, "handed_off", "migrating", "handed_off"),
    rec(104.0, "shutdown", "handed_off", "stopped"),
]


def one(records: list[TraceRecord], name: str = "t.jsonl") -> Timeline:
    return build_timeline([(name, records)])


def test_each_instance_is_a_lane_of_spans_entered_by_its_events() -> None:
    timeline = one(MIGRATION)
    assert (timeline.start, timeline.end, timeline.records) == (100.0, 104.0, 8)
    assert [lane.label for lane in timeline.lanes] == ["role disk", "migration disk"]
    role, migration = timeline.lanes
    assert [(s.state, s.start, s.end, s.event) for s in role.spans] == [
        ("starting", 100.0, 100.5, CREATED),
        ("serving", 100.5, 101.0, "serve"),
        ("migrating", 101.0, 103.0, "migrate"),
        ("handed_off", 103.0, 104.0, "handed_off"),
        ("stopped", 104.0, 104.0, "shutdown"),
    ]
    assert [s.open for s in role.spans] == [False] * 4 + [True]
    # The migration's last state lasts to the end of the trace, not its own last record.
    assert (migration.spans[-1].state, migration.spans[-1].end) == ("completed", 104.0)
    assert migration.spans[-1].open


def test_a_trace_appended_by_several_runs_gives_a_lane_per_run() -> None:
    second = [
        created(200.0, "starting"),
        rec(200.1, "listen", "starting", "listening"),
    ]
    timeline = one(MIGRATION + second)
    roles = [lane for lane in timeline.lanes if lane.machine == "role"]
    assert [(lane.run, lane.label) for lane in roles] == [
        (1, "role disk"),
        (2, "role disk (run 2)"),
    ]
    # The first run's last state lasts until the instance is created again.
    assert roles[0].end == 200.0 and roles[0].spans[-1].open
    assert [s.state for s in roles[1].spans] == ["starting", "listening"]
    assert roles[1].end == 200.1


def test_failed_transitions_are_marks_or_failed_spans() -> None:
    records = [
        created(0.0, "serving"),
        rec(1.0, "commit", "serving", "serving", error="MachineError: no transition"),
        rec(2.0, "migrate", "serving", "migrating", error="RuntimeError: boom"),
    ]
    (lane,) = one(records).lanes
    # Refused, nothing moved: a failed event, not a span.
    assert [(f.time, f.event, f.state, f.error) for f in lane.failures] == [
        (1.0, "commit", "serving", "MachineError: no transition")
    ]
    # Moved, then a callback raised: the machine is in the new state, marked failed.
    assert [(s.state, s.ok, s.error) for s in lane.spans] == [
        ("serving", True, None),
        ("migrating", False, "RuntimeError: boom"),
    ]
    text = render_text(one(records))
    assert "commit FAILED: MachineError: no transition" in text
    assert "migrate (failed: RuntimeError: boom)" in text


def test_a_trace_cut_at_the_front_starts_where_its_first_record_does() -> None:
    (lane,) = one([rec(5.0, "quiesce", "migrating", "quiescing")]).lanes
    assert [(s.state, s.event) for s in lane.spans] == [
        ("migrating", UNKNOWN_EVENT),
        ("quiescing", "quiesce"),
    ]
    assert "(before the trace)" in render_text(one([rec(5.0, "quiesce", "migrating", "x")]))


def test_several_traces_share_one_time_axis_and_lanes_name_their_file() -> None:
    dest = [created(99.0, "starting"), rec(100.3, "listen", "starting", "listening")]
    timeline = build_timeline([("src.jsonl", MIGRATION), ("dst.jsonl", dest)])
    # Trace by trace (host by host), each in the order its lanes start.
    assert [(lane.file, lane.label) for lane in timeline.lanes] == [
        ("src.jsonl", "role disk"),
        ("src.jsonl", "migration disk"),
        ("dst.jsonl", "role disk"),
    ]
    assert timeline.start == 99.0 and timeline.end == 104.0
    assert "dst.jsonl: role disk" in render_text(timeline)


def test_the_text_table_gives_entry_time_state_duration_and_event() -> None:
    text = render_text(one(MIGRATION))
    lines = text.splitlines()
    assert lines[0].startswith("2 machine instances, 8 records, from 1970-01-01 00:01:40.000 UTC")
    role = lines[lines.index("role disk") + 1 : lines.index("migration disk") - 1]
    assert [line.split() for line in role] == [
        ["entered", "state", "for", "by"],
        ["+0.000", "starting", "500.0", "ms", CREATED],
        ["+0.500", "serving", "500.0", "ms", "serve"],
        ["+1.000", "migrating", "2.000", "s", "migrate"],
        ["+3.000", "handed_off", "1.000", "s", "handed_off"],
        ["+4.000", "stopped", "-", "shutdown"],
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0003, "0.3 ms"), (0.0284, "28.4 ms"), (1.16, "1.160 s"), (45, "45 s"), (185, "3m05s")],
)
def test_durations_read_well_from_microseconds_to_minutes(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("span", "step"), [(4.0, 0.5), (1.26, 0.2), (0.06, 0.01), (100.0, 20.0), (7.0, 1.0)]
)
def test_ticks_are_one_two_or_five_times_a_power_of_ten(span: float, step: float) -> None:
    assert nice_step(span) == pytest.approx(step)


def test_the_layout_scales_time_to_the_plot_and_keeps_short_states_visible() -> None:
    timeline = one(MIGRATION)
    pic = layout(timeline, width=1000)
    assert len(pic.rows) == 2
    width = pic.plot_right - pic.plot_left
    role = [b for b in pic.bands if b.lane == 0]
    assert [b.state for b in role] == ["starting", "serving", "migrating", "handed_off", "stopped"]
    # 0.5 s of 4 s is an eighth of the plot; bands follow one another.
    assert role[0].x == pytest.approx(pic.plot_left)
    assert role[0].width == pytest.approx(width / 8)
    assert role[1].x == pytest.approx(role[0].x + role[0].width)
    assert role[2].width == pytest.approx(width / 2)
    assert role[-1].width == MIN_BAND_WIDTH  # stopped at the very end: zero long, still drawn
    assert role[2].labelled and not role[-1].labelled
    # One colour per state name, the same in every lane.
    colours = state_colours(timeline)
    assert len(set(colours.values())) == len(colours)
    assert all(b.fill == colours[b.state] for b in pic.bands)
    assert [t.label for t in pic.ticks] == [f"{k * 0.5:.1f} s" for k in range(9)]
    assert pic.ticks[-1].x == pytest.approx(pic.plot_right)
    assert {s.state for s in pic.swatches} == set(colours)
    assert all(s.y + 4 < pic.height for s in pic.swatches)


def test_the_svg_parses_with_one_lane_group_per_lane_and_escapes_text() -> None:
    records = [
        *MIGRATION,
        created(104.0, "held", machine="lease", instance="/img/<a&b>.img"),
        rec(104.0, "renew", "held", "held", machine="lease", instance="/img/<a&b>.img", error="x"),
    ]
    root = ET.fromstring(render_svg(one(records)))
    assert root.tag == f"{SVG}svg"
    lanes = root.findall(f".//{SVG}g[@class='lane']")
    assert [lane.findtext(f"{SVG}text") for lane in lanes] == [
        "role disk",
        "migration disk",
        "lease /img/<a&b>.img",
    ]
    bands = [
        [b.get("data-state") for b in lane.findall(f"{SVG}g[@class='band']")] for lane in lanes
    ]
    assert bands[0] == ["starting", "serving", "migrating", "handed_off", "stopped"]
    assert len(lanes[2].findall(f"{SVG}g[@class='failed']")) == 1
    tick_labels = [t.text for t in root.findall(f".//{SVG}g[@class='axis']/{SVG}text")]
    assert tick_labels[:2] == ["0.0 s", "0.5 s"]


def test_long_lane_labels_are_cut_in_the_middle() -> None:
    path = "/var/lib/images/" + "x" * 80 + "/disk.img"
    pic = layout(one([created(0.0, "held", machine="lease", instance=path)]))
    (row,) = pic.rows
    assert row.label.startswith("lease /var/") and row.label.endswith("/disk.img")
    assert "…" in row.label and len(row.label) <= 44
    assert row.title == f"t.jsonl: lease {path}"
