"""A record of every state-machine transition, and a check that it was legal.

Every machine built by :func:`ferry.statecharts.build` hands each event it
processes, legal or not, to a :class:`Tracer` as one :class:`TraceRecord`.
The tracer fans it out to its sinks: a :class:`TraceFile` of JSON lines, the
log (:func:`log_transitions`), and the control socket's live subscribers
(:mod:`ferry.control.events`).

A trace is worth having only if it can be believed, so
:func:`ferry.replay.replay` reads one back and checks each line against the
statecharts' YAML: a record that
the YAML does not allow means either the trace was edited or the program
moved a machine behind ``transitions``' back.  Replay judges the records
against :meth:`Statechart.next_state` directly rather than by driving real
machines, so it never needs ``set_state`` and runs on a trace from any
process, including one that has crashed.

Records, invariants (checked when a record is built or parsed):

- ``ok`` is true exactly when ``error`` is None.
- ``time`` is a finite number of seconds from the machine's clock.
- a record whose ``event`` is :data:`CREATED` marks a machine being built in
  its initial state (``source == dest``): a trace file is appended to by
  successive runs, and the same export may get a fresh machine, so replay
  needs to know where an instance starts again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from twisted.logger import Logger

from ferry.appender import Appender
from ferry.safepath import open_append

__all__ = [
    "CREATED",
    "ReplayError",
    "Sink",
    "TraceFile",
    "TraceFormatError",
    "TraceRecord",
    "Tracer",
    "log_transitions",
    "read_records",
]

_log = Logger()

CREATED = "__created__"
"""The ``event`` of the record a machine writes when it is built.

Not a valid trigger name (the loader refuses triggers that start with ``_``),
so it cannot be confused with a real event.
"""

_FIELDS = ("time", "machine", "instance", "event", "source", "dest", "ok", "error", "reason")
#: The fields every record has; ``error`` and ``reason`` may be left out.
_REQUIRED = _FIELDS[:7]


class TraceFormatError(ValueError):
    """A trace record, or the JSON line it came from, is not well-formed."""


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One event processed by one machine: where it was, where it went, and whether it worked.

    ``ok`` false with ``source == dest`` is an event that was refused (an
    illegal trigger) or failed before the state changed; ``ok`` false with
    ``source != dest`` is a transition whose callbacks raised after the state
    had already changed, so the machine *is* in ``dest``.
    """

    time: float
    machine: str
    instance: str
    event: str
    source: str
    dest: str
    ok: bool
    error: str | None = None
    # Why the event happened, where the code that fired it said so (a
    # migration attempt's failure, a hook's veto); left out of the JSON when None.
    reason: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.time, bool) or not isinstance(self.time, int | float):
            raise TraceFormatError(f"time must be a number, not {self.time!r}")
        if not math.isfinite(self.time):
            raise TraceFormatError(f"time must be finite, not {self.time!r}")
        for name in ("machine", "instance", "event", "source", "dest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TraceFormatError(f"{name} must be a non-empty string, not {value!r}")
        if not isinstance(self.ok, bool):
            raise TraceFormatError(f"ok must be true or false, not {self.ok!r}")
        if self.ok and self.error is not None:
            raise TraceFormatError("a record with ok=true carries no error")
        if not self.ok and not (isinstance(self.error, str) and self.error):
            raise TraceFormatError("a record with ok=false must say what the error was")
        if self.reason is not None and not isinstance(self.reason, str):
            raise TraceFormatError(f"reason must be a string, not {self.reason!r}")

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON object, keys in field order (what the control socket streams)."""
        fields = {name: getattr(self, name) for name in _FIELDS}
        if self.reason is None:
            del fields["reason"]
        return fields

    def to_json(self) -> str:
        """One line of JSON, keys in field order, so traces diff and grep well."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> TraceRecord:
        try:
            obj: Any = json.loads(line)
        except ValueError as err:
            raise TraceFormatError(f"not JSON: {err}") from None
        if not isinstance(obj, dict):
            raise TraceFormatError(f"expected a JSON object, not {type(obj).__name__}")
        missing = [name for name in _REQUIRED if name not in obj]
        if missing:
            raise TraceFormatError(f"missing {', '.join(missing)}")
        unknown = sorted(set(obj) - set(_FIELDS))
        if unknown:
            raise TraceFormatError(f"unknown field {', '.join(unknown)}")
        return cls(**obj)


Sink = Callable[[TraceRecord], None]
"""Anything that takes records: a :class:`TraceFile`, ``list.append``, a live subscriber."""


class Tracer:
    """Hands every record to every sink.

    A sink that raises is logged and skipped, and the others still get the
    record: a full disk or a broken subscriber must not change what the
    control plane does (``transitions`` would swallow the error from its
    ``finalize_event`` hook anyway, only less visibly).
    """

    def __init__(self, *sinks: Sink) -> None:
        self._sinks: list[Sink] = list(sinks)

    def record(self, rec: TraceRecord) -> None:
        # Iterate over a copy: a sink may unsubscribe itself, or another.
        for sink in tuple(self._sinks):
            try:
                sink(rec)
            except Exception:
                _log.failure("trace sink {sink!r} failed on {event}", sink=sink, event=rec.event)

    def subscribe(self, sink: Sink) -> Callable[[], None]:
        """Add ``sink``; the function returned removes it (calling it twice is harmless)."""
        self._sinks.append(sink)

        def unsubscribe() -> None:
            # Remove this subscription by identity, not equality: bound
            # methods of one object compare equal.
            for i, existing in enumerate(self._sinks):
                if existing is sink:
                    del self._sinks[i]
                    return

        return unsubscribe


class TraceFile:
    """A trace sink appending JSON lines to a file.

    Each line is written and flushed by the file's own thread
    (:class:`ferry.appender.Appender`), so the reactor never waits on the
    disk, and a process that crashes leaves a trace that ends at one of its
    last transitions, which is when it is wanted.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: Appender | None = Appender(
            open_append(self.path, "trace file"), what="trace file"
        )

    def write(self, rec: TraceRecord) -> None:
        if self._file is None:
            raise ValueError(f"trace file {self.path} is closed")
        self._file.write(rec.to_json() + "\n")
        self._file.flush()

    __call__ = write

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TraceFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def log_transitions(export: str | Callable[[TraceRecord], str]) -> Sink:
    """A sink that logs each record as an event with the record's own fields, plus ``export``
    (a name, or how to find the name of the export a record belongs to).

    So a JSON log (``--log``) and a trace join on ``machine``, ``instance``,
    ``event`` and ``time``.  Transitions are debug events (``-v`` shows
    them on stderr; the JSON log has them always); one that failed is a
    warning, since it means a callback raised or a trigger came in a state
    that does not take it.
    """

    def sink(rec: TraceRecord) -> None:
        fields = rec.to_dict()
        name = export if isinstance(export, str) else export(rec)
        if rec.ok:
            _log.debug(_TRANSITION_FORMAT, export=name, **fields)
        else:
            _log.warn(_TRANSITION_FORMAT + " failed: {error}", export=name, **fields)

    return sink


_TRANSITION_FORMAT = "{machine}/{instance}: {event} {source} -> {dest}"


class ReplayError(Exception):
    """A trace line that is malformed or that the statecharts do not allow."""

    def __init__(self, line_number: int, line: str, reason: str) -> None:
        super().__init__(line_number, line, reason)
        self.line_number = line_number
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.reason}"


def read_records(lines: Iterable[str]) -> Iterator[tuple[int, str, TraceRecord]]:
    """Each record of a trace, with its line number and text; blank lines are skipped.

    A line that is not a well-formed record raises :class:`ReplayError`
    naming it, so every reader of traces words the problem the same way.
    """
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            rec = TraceRecord.from_json(line)
        except TraceFormatError as err:
            raise ReplayError(number, line, str(err)) from None
        yield number, line, rec
