"""Replay: a trace read back and judged against the statecharts, line by line.

A record that the YAML does not allow means either the trace was edited or
the program moved a machine behind ``transitions``' back.  Replay judges the
records against :meth:`Statechart.next_state` directly rather than by
driving real machines, so it never needs ``set_state`` and runs on a trace
from any process, including one that has crashed.  It sits above both
:mod:`ferry.trace` (the records) and :mod:`ferry.statecharts` (the charts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ferry.statecharts import Statechart
from ferry.trace import CREATED, ReplayError, TraceRecord, read_records

__all__ = ["ReplayError", "ReplayResult", "replay"]


@dataclass
class ReplayResult:
    """Where each machine instance ended up, and how many records were replayed."""

    final_states: dict[tuple[str, str], str] = field(default_factory=dict)
    lines: int = 0
    """Records replayed (blank lines are not counted)."""


def replay(lines: Iterable[str], charts: Mapping[str, Statechart]) -> ReplayResult:
    """Check a trace against the statecharts and return where every instance ended.

    Each (machine, instance) starts in its chart's initial state (again at
    each :data:`CREATED` record).  A record with ``ok`` true must start where
    the instance is and take a transition the YAML has; one with ``ok`` false
    must start where the instance is and either stay there or have reached
    the transition's legal destination before a callback raised.  The first
    record that breaks this raises :class:`ReplayError` naming its line.
    """
    result = ReplayResult()
    current = result.final_states
    for number, line, rec in read_records(lines):
        reason = _judge(rec, charts, current)
        if reason is not None:
            raise ReplayError(number, line, f"{rec.machine}/{rec.instance}: {reason}")
        result.lines += 1
    return result



def _judge(
    rec: TraceRecord,
    charts: Mapping[str, Statechart],
    current: dict[tuple[str, str], str],
) -> str | None:
    """Why ``rec`` cannot follow the states in ``current``, or None (and ``current`` moves on)."""
    chart = charts.get(rec.machine)
    if chart is None:
        return f"unknown machine {rec.machine!r}"
    key = (rec.machine, rec.instance)

    if rec.event == CREATED:
        if not (rec.source == rec.dest == chart.initial and rec.ok):
            return (
                f"a machine is created in its initial state {chart.initial!r}, "
                f"not {rec.source!r} -> {rec.dest!r}"
            )
        current[key] = chart.initial
        return None

    here = current.get(key, chart.initial)
    if rec.source != here:
        return f"record starts in {rec.source!r} but the machine is in {here!r}"
    if rec.event not in chart.triggers():
        return f"no trigger {rec.event!r} in {chart.name}"
    legal = chart.next_state(rec.source, rec.event)
    if rec.ok:
        if legal is None:
            return f"no transition {rec.event!r} from {rec.source!r}"
        if rec.dest != legal:
            return f"{rec.event!r} from {rec.source!r} goes to {legal!r}, not {rec.dest!r}"
    elif rec.dest not in (rec.source, legal):
        expected = repr(rec.source) if legal is None else f"{rec.source!r} or {legal!r}"
        return f"failed {rec.event!r} left the machine in {rec.dest!r}; expected {expected}"
    current[key] = rec.dest
    return None
