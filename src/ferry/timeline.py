"""Timelines of state machines, built from traces: ``ferry trace show``'s table and picture.

A trace says when each machine moved; a timeline says what each was doing in
between: for every machine instance, the states it was in, each entered at
some time, by some event, for some while.  Everything here is pure -- records
in, a :class:`Timeline` out, then text or SVG -- so it is tested without
files, processes or a reactor.

How records become lanes and spans (records as :mod:`ferry.trace` defines them):

- A *lane* is one life of one machine instance.  It starts at the instance's
  :data:`~ferry.trace.CREATED` record; another ``CREATED`` for the same
  (machine, instance) in the same file starts a new lane (a trace appended to
  by several runs, or a second migration), numbered ``run 2``, ``run 3``...
- A record whose ``dest`` differs from the lane's state starts a new *span*
  there.  If it is ``ok: false`` (a callback raised after the state had
  changed) the span is marked failed.
- A record that changes nothing and is ``ok: false`` (a refused or failed
  event) is a :class:`FailedEvent` on the lane, not a span.
- A lane with no ``CREATED`` (a trace cut at the front) starts at its first
  record, in that record's ``source`` state, entered by an unknown event.
- The last span of a lane is *open*: it lasts until the same instance is
  created again, or to the end of the timeline (the last record of all the
  traces shown), and has no duration of its own in the table.
- Lanes are listed trace by trace (a trace is one host's), in the order they
  start; times are shown as seconds from the timeline's first record.

The picture has one lane per row, one band per span (one colour per state
name, the same in every lane), a red tick per failed event, a time axis and
a legend.  It is built by :func:`layout` (positions, still pure data) and
written by :func:`render_svg` with ``xml.etree``, which does the escaping.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from ferry.migrate.core.progress import format_seconds
from ferry.trace import CREATED, TraceRecord

__all__ = [
    "FailedEvent",
    "Lane",
    "Picture",
    "Span",
    "Timeline",
    "build_timeline",
    "layout",
    "render_svg",
    "render_text",
]

UNKNOWN_EVENT: Final = ""
"""The ``event`` of a lane's first span when the trace does not say how it began."""


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of time a machine spent in one state."""

    state: str
    start: float
    end: float
    event: str
    """What brought the machine here (:data:`~ferry.trace.CREATED` for its first state)."""
    ok: bool = True
    error: str | None = None
    open: bool = False
    """The lane's last span: it had not ended when the lane did."""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class FailedEvent:
    """An event that left the machine where it was and did not work."""

    time: float
    event: str
    state: str
    error: str


@dataclass(frozen=True, slots=True)
class Lane:
    """One life of one machine instance: its spans in order, and its failed events."""

    machine: str
    instance: str
    run: int
    spans: tuple[Span, ...]
    failures: tuple[FailedEvent, ...] = ()
    file: str = ""
    """The trace it came from, shown when a timeline joins several."""

    @property
    def start(self) -> float:
        return self.spans[0].start

    @property
    def end(self) -> float:
        return self.spans[-1].end

    @property
    def label(self) -> str:
        text = f"{self.machine} {self.instance}"
        return text if self.run == 1 else f"{text} (run {self.run})"


@dataclass(frozen=True, slots=True)
class Timeline:
    lanes: tuple[Lane, ...]
    start: float
    end: float
    records: int
    files: tuple[str, ...] = ()

    @property
    def duration(self) -> float:
        return self.end - self.start


# -- building -----------------------------------------------------------------------


@dataclass
class _Building:
    """A lane while its records come in; its last span has no end yet."""

    machine: str
    instance: str
    run: int
    file: str
    states: list[tuple[str, float, str, bool, str | None]] = field(default_factory=list)
    failures: list[FailedEvent] = field(default_factory=list)
    ends: float | None = None  # when the instance was created again

    @property
    def state(self) -> str:
        return self.states[-1][0]

    def finish(self, timeline_end: float) -> Lane:
        end = self.ends if self.ends is not None else timeline_end
        spans = []
        for i, (state, start, event, ok, error) in enumerate(self.states):
            last = i == len(self.states) - 1
            stop = end if last else self.states[i + 1][1]
            spans.append(Span(state, start, max(stop, start), event, ok, error, open=last))
        return Lane(
            self.machine, self.instance, self.run, tuple(spans), tuple(self.failures), self.file
        )


def build_timeline(traces: Sequence[tuple[str, Iterable[TraceRecord]]]) -> Timeline:
    """The timeline of one or more traces, each given as (its name, its records in order)."""
    lanes: list[_Building] = []
    count = 0
    first: float | None = None
    last: float | None = None
    for name, records in traces:
        live: dict[tuple[str, str], _Building] = {}
        runs: dict[tuple[str, str], int] = {}
        for rec in records:
            count += 1
            first = rec.time if first is None else min(first, rec.time)
            last = rec.time if last is None else max(last, rec.time)
            key = (rec.machine, rec.instance)
            lane = live.get(key)
            if rec.event == CREATED or lane is None:
                if lane is not None:
                    lane.ends = rec.time
                runs[key] = runs.get(key, 0) + 1
                lane = _Building(rec.machine, rec.instance, runs[key], name)
                live[key] = lane
                lanes.append(lane)
                if rec.event == CREATED:
                    lane.states.append((rec.dest, rec.time, CREATED, True, None))
                    continue
                lane.states.append((rec.source, rec.time, UNKNOWN_EVENT, True, None))
            _apply(lane, rec)
    if first is None or last is None:
        return Timeline((), 0.0, 0.0, 0, tuple(name for name, _ in traces))
    order = {name: i for i, (name, _) in enumerate(traces)}
    built = sorted(
        (lane.finish(last) for lane in lanes), key=lambda lane: (order[lane.file], lane.start)
    )
    return Timeline(tuple(built), first, last, count, tuple(name for name, _ in traces))


def _apply(lane: _Building, rec: TraceRecord) -> None:
    if rec.dest != lane.state:
        lane.states.append((rec.dest, rec.time, rec.event, rec.ok, rec.error))
    elif not rec.ok:
        lane.failures.append(FailedEvent(rec.time, rec.event, rec.dest, rec.error or ""))


# -- text ---------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``0.3 ms``, ``28.4 ms``, ``1.160 s``; from 10 s, the progress line's ``45 s``, ``3m05s``."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 10:
        return f"{seconds:.3f} s"
    return format_seconds(seconds)


def _wall(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def render_text(timeline: Timeline) -> str:
    """The table ``ferry trace show`` prints: a header, then each lane's spans and failures."""
    lines = [
        f"{len(timeline.lanes)} machine instances, {timeline.records} records, "
        f"from {_wall(timeline.start)} to {_wall(timeline.end)} "
        f"({format_duration(timeline.duration)})",
        "times are seconds from the start; '-': still in that state when its lane ends",
    ]
    several = len(timeline.files) > 1
    for lane in timeline.lanes:
        heading = f"{lane.file}: {lane.label}" if several else lane.label
        rows: list[tuple[float, int, list[str]]] = []
        for span in lane.spans:
            how = span.event if span.event != UNKNOWN_EVENT else "(before the trace)"
            if not span.ok:
                how += f" (failed: {span.error})"
            length = "-" if span.open else format_duration(span.duration)
            rows.append((span.start, 0, [_offset(span.start, timeline), span.state, length, how]))
        for failed in lane.failures:
            rows.append(
                (
                    failed.time,
                    1,
                    [
                        _offset(failed.time, timeline),
                        f"({failed.state})",
                        "",
                        f"{failed.event} FAILED: {failed.error}",
                    ],
                )
            )
        rows.sort(key=lambda row: (row[0], row[1]))
        table = [["entered", "state", "for", "by"], *(cells for _, _, cells in rows)]
        widths = [max(len(cells[i]) for cells in table) for i in range(3)]
        lines += ["", heading]
        for cells in table:
            padded = [cells[i].ljust(widths[i]) for i in range(3)]
            lines.append(("  " + "  ".join([*padded, cells[3]])).rstrip())
    return "\n".join(lines) + "\n"


def _offset(seconds: float, timeline: Timeline) -> str:
    return f"+{seconds - timeline.start:.3f}"


# -- picture ------------------------------------------------------------------------

WIDTH: Final = 960
MARGIN: Final = 12
TITLE_HEIGHT: Final = 28
LANE_HEIGHT: Final = 22
LANE_GAP: Final = 6
AXIS_HEIGHT: Final = 34
LEGEND_ROW: Final = 18
FONT_SIZE: Final = 11
#: Width of one character at FONT_SIZE in a sans-serif face, near enough to
#: decide whether a label fits (an SVG cannot measure text before drawing).
CHAR_WIDTH: Final = 6.3
MAX_LABEL_CHARS: Final = 44
MIN_BAND_WIDTH: Final = 1.5  # a state entered and left in the same millisecond still shows
TICK_TARGET: Final = 8
FAILED_COLOUR: Final = "#c62828"


@dataclass(frozen=True, slots=True)
class Row:
    y: float
    label: str
    title: str


@dataclass(frozen=True, slots=True)
class Band:
    lane: int  # index into Picture.rows
    x: float
    y: float
    width: float
    height: float
    fill: str
    state: str
    labelled: bool
    failed: bool
    title: str


@dataclass(frozen=True, slots=True)
class Mark:
    lane: int
    x: float
    y: float
    height: float
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True, slots=True)
class Swatch:
    x: float
    y: float
    fill: str
    state: str


@dataclass(frozen=True, slots=True)
class Picture:
    """Where everything goes, in SVG user units (pixels); :func:`render_svg` only draws it."""

    width: float
    height: float
    title: str
    plot_left: float
    plot_right: float
    axis_y: float
    rows: tuple[Row, ...]
    bands: tuple[Band, ...]
    marks: tuple[Mark, ...]
    ticks: tuple[Tick, ...]
    caption: str
    swatches: tuple[Swatch, ...]


def state_colours(timeline: Timeline) -> dict[str, str]:
    """One colour per state name, in order of first appearance, hues a golden angle apart.

    The same name gets the same colour in every lane (``stopped`` is one
    colour whichever machine stopped); neighbours in the order differ most.
    """
    colours: dict[str, str] = {}
    for lane in timeline.lanes:
        for span in lane.spans:
            if span.state not in colours:
                n = len(colours)
                hue = (n * 137.508 + 200) % 360
                light = (82, 70, 76)[n % 3]  # lightness varies too, for neighbouring hues
                colours[span.state] = f"hsl({hue:.0f}, 62%, {light}%)"
    return colours


def nice_step(span: float, target: int = TICK_TARGET) -> float:
    """A tick interval of 1, 2 or 5 times a power of ten giving about ``target`` ticks."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5):
        if raw <= multiple * magnitude:
            return multiple * magnitude
    return 10 * magnitude


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f} s"


def _shorten(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    """``text``, cut in the middle to ``limit`` characters (paths keep their file name)."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep // 2] + "…" + text[len(text) - (keep - keep // 2) :]


def layout(timeline: Timeline, *, width: float = WIDTH) -> Picture:
    """Place every lane, band, failure mark, tick and legend swatch."""
    several = len(timeline.files) > 1
    labels = [
        _shorten(f"{lane.file}: {lane.label}" if several else lane.label) for lane in timeline.lanes
    ]
    label_width = max((len(label) for label in labels), default=0) * CHAR_WIDTH
    plot_left = MARGIN + label_width + MARGIN
    plot_right = width - MARGIN
    plot_width = max(plot_right - plot_left, 1.0)
    span = timeline.duration if timeline.duration > 0 else 1.0

    def x_of(seconds: float) -> float:
        return plot_left + (seconds - timeline.start) / span * plot_width

    colours = state_colours(timeline)
    rows, bands, marks = [], [], []
    for index, (lane, label) in enumerate(zip(timeline.lanes, labels, strict=True)):
        y = TITLE_HEIGHT + index * (LANE_HEIGHT + LANE_GAP)
        rows.append(Row(y, label, f"{lane.file}: {lane.label}" if lane.file else lane.label))
        for s in lane.spans:
            x = x_of(s.start)
            band_width = max(x_of(s.end) - x, MIN_BAND_WIDTH)
            how = s.event if s.event != UNKNOWN_EVENT else "(before the trace)"
            length = "until the end" if s.open else f"for {format_duration(s.duration)}"
            title = (
                f"{lane.label}: {s.state}, at +{s.start - timeline.start:.3f} s {length}, by {how}"
            )
            if not s.ok:
                title += f" (failed: {s.error})"
            bands.append(
                Band(
                    index,
                    x,
                    y,
                    band_width,
                    LANE_HEIGHT,
                    colours[s.state],
                    s.state,
                    labelled=band_width >= len(s.state) * CHAR_WIDTH + 6,
                    failed=not s.ok,
                    title=title,
                )
            )
        for failed in lane.failures:
            marks.append(
                Mark(
                    index,
                    x_of(failed.time),
                    y,
                    LANE_HEIGHT,
                    f"{lane.label}: {failed.event} failed in {failed.state}: {failed.error}",
                )
            )
    axis_y = TITLE_HEIGHT + len(timeline.lanes) * (LANE_HEIGHT + LANE_GAP) + 2
    step = nice_step(span)
    ticks = [
        Tick(x_of(timeline.start + k * step), _tick_label(k * step, step))
        for k in range(int(span / step + 1e-9) + 1)
    ]
    caption = f"seconds from {_wall(timeline.start)}"
    swatches = []
    x, y = float(MARGIN), axis_y + AXIS_HEIGHT
    for state, fill in colours.items():
        item = 14 + len(state) * CHAR_WIDTH + 14
        if x + item > width - MARGIN and x > MARGIN:
            x, y = float(MARGIN), y + LEGEND_ROW
        swatches.append(Swatch(x, y, fill, state))
        x += item
    height = (y + LEGEND_ROW + MARGIN) if swatches else axis_y + AXIS_HEIGHT
    files = ", ".join(timeline.files)
    title = f"ferry trace timeline{': ' + files if files else ''}"
    return Picture(
        width,
        height,
        title,
        plot_left,
        plot_right,
        axis_y,
        tuple(rows),
        tuple(bands),
        tuple(marks),
        tuple(ticks),
        caption,
        tuple(swatches),
    )


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def render_svg(timeline: Timeline, *, width: float = WIDTH) -> str:
    """The timeline as a standalone SVG document."""
    pic = layout(timeline, width=width)
    svg = ET.Element(
        "svg",
        {
            "xmlns": "http://www.w3.org/2000/svg",
            "width": _num(pic.width),
            "height": _num(pic.height),
            "viewBox": f"0 0 {_num(pic.width)} {_num(pic.height)}",
            "font-family": "Helvetica, Arial, sans-serif",
            "font-size": str(FONT_SIZE),
        },
    )
    ET.SubElement(svg, "title").text = pic.title
    ET.SubElement(
        svg,
        "rect",
        {"width": _num(pic.width), "height": _num(pic.height), "fill": "white"},
    )
    heading = ET.SubElement(
        svg, "text", {"x": str(MARGIN), "y": "18", "font-size": "13", "font-weight": "bold"}
    )
    heading.text = pic.title
    lanes = ET.SubElement(svg, "g", {"class": "lanes"})
    for index, row in enumerate(pic.rows):
        lane = ET.SubElement(lanes, "g", {"class": "lane"})
        ET.SubElement(lane, "title").text = row.title
        label = ET.SubElement(
            lane,
            "text",
            {"x": str(MARGIN), "y": _num(row.y + LANE_HEIGHT / 2 + 4), "class": "lane-label"},
        )
        label.text = row.label
        for band in (b for b in pic.bands if b.lane == index):
            _band(lane, band)
        for mark in (m for m in pic.marks if m.lane == index):
            _mark(lane, mark)
    _axis(svg, pic)
    legend = ET.SubElement(svg, "g", {"class": "legend"})
    for swatch in pic.swatches:
        ET.SubElement(
            legend,
            "rect",
            {
                "x": _num(swatch.x),
                "y": _num(swatch.y - 9),
                "width": "10",
                "height": "10",
                "fill": swatch.fill,
                "stroke": "#555",
                "stroke-width": "0.5",
            },
        )
        text = ET.SubElement(legend, "text", {"x": _num(swatch.x + 14), "y": _num(swatch.y)})
        text.text = swatch.state
    ET.indent(svg)
    return ET.tostring(svg, encoding="unicode") + "\n"


def _band(parent: ET.Element, band: Band) -> None:
    group = ET.SubElement(parent, "g", {"class": "band", "data-state": band.state})
    ET.SubElement(group, "title").text = band.title
    attrs = {
        "x": _num(band.x),
        "y": _num(band.y),
        "width": _num(band.width),
        "height": _num(band.height),
        "fill": band.fill,
        "stroke": FAILED_COLOUR if band.failed else "white",
        "stroke-width": "1.5" if band.failed else "0.5",
    }
    ET.SubElement(group, "rect", attrs)
    if band.labelled:
        text = ET.SubElement(
            group,
            "text",
            {"x": _num(band.x + 3), "y": _num(band.y + band.height / 2 + 4)},
        )
        text.text = band.state


def _mark(parent: ET.Element, mark: Mark) -> None:
    group = ET.SubElement(parent, "g", {"class": "failed"})
    ET.SubElement(group, "title").text = mark.title
    ET.SubElement(
        group,
        "line",
        {
            "x1": _num(mark.x),
            "x2": _num(mark.x),
            "y1": _num(mark.y - 2),
            "y2": _num(mark.y + mark.height + 2),
            "stroke": FAILED_COLOUR,
            "stroke-width": "2",
        },
    )


def _axis(svg: ET.Element, pic: Picture) -> None:
    axis = ET.SubElement(svg, "g", {"class": "axis"})
    y = _num(pic.axis_y)
    ET.SubElement(
        axis,
        "line",
        {"x1": _num(pic.plot_left), "x2": _num(pic.plot_right), "y1": y, "y2": y, "stroke": "#333"},
    )
    for tick in pic.ticks:
        x = _num(tick.x)
        ET.SubElement(
            axis,
            "line",
            {"x1": x, "x2": x, "y1": y, "y2": _num(pic.axis_y + 4), "stroke": "#333"},
        )
        label = ET.SubElement(
            axis, "text", {"x": x, "y": _num(pic.axis_y + 15), "text-anchor": "middle"}
        )
        label.text = tick.label
    caption = ET.SubElement(
        axis, "text", {"x": _num(pic.plot_right), "y": "18", "text-anchor": "end"}
    )
    caption.text = pic.caption
