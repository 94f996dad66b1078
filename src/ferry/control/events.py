"""Live transition events on the control socket: ``subscribe``, ``unsubscribe``, ``end``.

Every record the node's :class:`~ferry.trace.Tracer` sees -- the same record
its ``--trace`` file gets -- goes to every subscribed JSON-lines connection
as a notification (a JSON-RPC request without an id)::

    -> {"id": 1, "method": "subscribe"}
    <- {"id": 1, "result": {"subscribed": true, "current": [RECORD, ...], "max_backlog_bytes": N}}
    <- {"method": "event", "params": RECORD}          one per transition, as it happens
    -> {"id": 2, "method": "unsubscribe"}
    <- {"id": 2, "result": {"subscribed": false}}     no event follows this answer

``{"params": {"export": NAME}}`` narrows the subscription to one export's
machines (its role, its migrations, its lease), for a node with many; an
unknown name is refused.

``current`` is where every machine instance stands at the moment of the
subscription: the last record each one wrote (its ``dest`` is the state,
``time`` says since when, ``event`` by what), oldest first.  A subscriber
that arrives late -- in the middle of a migration -- so knows where things
are without having seen them happen; ``{"params": {"current": false}}``
leaves it out.  The answer and the stream are consistent: no record falls
between the two, and none is in both.

The connection ends with ``{"method": "end", "params": {"reason": ...,
"complete": ...}}`` when the server shuts down (after the last transition it
records; ``complete`` true) or when the subscriber reads too slowly to keep
up (``complete`` false: what waited for it was thrown away; the cap is
:data:`~ferry.control.jsonlines.MAX_BACKLOG_BYTES`, see
:mod:`ferry.control.jsonlines`); then the server closes it.  Closing the
connection from the client side unsubscribes too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.internet.defer import Deferred, DeferredList

from ferry.clock import Clock
from ferry.control.jsonlines import JsonLines
from ferry.trace import Tracer, TraceRecord

__all__ = ["STREAM_METHODS", "EventHub", "EventStream", "MachineBoard"]

#: The JSON methods that belong to the connection rather than to the node's
#: commands: the control protocol hands these to the connection's stream.
STREAM_METHODS: Final = frozenset({"subscribe", "unsubscribe"})

#: JSON-RPC's "invalid params"; the other codes are the control protocol's.
_BAD_PARAMS: Final = -32602

RecordFilter = Callable[[TraceRecord], bool]
"""Whether a subscriber wants a record (the records of one export)."""

Scope = Callable[[str], RecordFilter]
"""The filter of export ``name``'s records; LookupError, saying so, if there is none."""


class MachineBoard:
    """Where every machine instance stands, as the trace has seen it: its last record.

    Fed by the tracer from the node's start, so it knows the instances that
    exist (a machine's first record is :data:`~ferry.trace.CREATED`).  It
    holds one record per (machine, instance) name, and a node has a handful
    of those (its export's role and migration, its leases): a new migration
    replaces the last one's entry.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], TraceRecord] = {}

    def record(self, rec: TraceRecord) -> None:
        self._last[(rec.machine, rec.instance)] = rec

    def current(self) -> list[TraceRecord]:
        """The last record of every instance, oldest first (ties in the order they were made)."""
        return sorted(self._last.values(), key=lambda rec: rec.time)


class EventHub:
    """One node's live subscribers, fed by its tracer."""

    def __init__(self, tracer: Tracer, clock: Clock, *, scope: Scope | None = None) -> None:
        self.clock = clock
        self.board = MachineBoard()
        self.scope = scope
        self._subscribers: list[tuple[JsonLines, RecordFilter | None]] = []
        self._closing: str | None = None
        tracer.subscribe(self.record)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def record(self, rec: TraceRecord) -> None:
        """A tracer sink: remember where the machine is, and tell every subscriber."""
        self.board.record(rec)
        if not self._subscribers:
            return
        # Encoded once for everyone, from the very text the trace file gets.
        line = b'{"method": "event", "params": ' + rec.to_json().encode("utf-8") + b"}\n"
        for out, only in tuple(self._subscribers):
            if only is not None and not only(rec):
                continue
            out.send_line(line)
            if out.ended:  # dropped for being slow
                self.unsubscribe(out)

    def subscribe(self, out: JsonLines, only: RecordFilter | None = None) -> list[TraceRecord]:
        """Add ``out`` (for the records ``only`` takes, or all); return where every
        machine it follows stands now.

        Refused (``ValueError``) once the hub is closing: the server is
        going away and will send nothing more.
        """
        if self._closing is not None:
            raise ValueError(self._closing)
        self._subscribers.append((out, only))
        current = self.board.current()
        return current if only is None else [rec for rec in current if only(rec)]

    def unsubscribe(self, out: JsonLines) -> bool:
        """Remove ``out``; False if it was not subscribed."""
        for i, (existing, _) in enumerate(self._subscribers):
            if existing is out:
                del self._subscribers[i]
                return True
        return False

    def close(self, reason: str) -> Deferred[None]:
        """End every subscription with ``reason``; fires once their connections are gone.

        For shutdown, after the last transition: each subscriber gets what
        waits for it and the ``end`` line, and a connection that does not
        take them is aborted after the grace period, so this always fires.
        """
        self._closing = reason
        subscribers = [out for out, _ in self._subscribers]
        self._subscribers = []
        for out in subscribers:
            out.end(reason)
        gone = DeferredList([out.when_lost() for out in subscribers])
        return gone.addCallback(lambda _: None)


class EventStream:
    """One JSON connection's side of the hub: at most one subscription, and its requests."""

    def __init__(self, hub: EventHub, out: JsonLines) -> None:
        self._hub = hub
        self._out = out
        self._subscribed = False

    def request(self, request_id: Any, method: str, params: object) -> dict[str, Any]:
        """The answer to a ``subscribe`` or ``unsubscribe`` request (a JSON-RPC object)."""
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            return _error(request_id, _BAD_PARAMS, f"{method}: params must be an object")
        if method == "subscribe":
            return self._subscribe(request_id, params)
        return self._unsubscribe(request_id, params)

    def _subscribe(self, request_id: Any, params: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - {"current", "export"})
        if unknown:
            return _error(
                request_id,
                _BAD_PARAMS,
                f"subscribe: unknown params {', '.join(map(repr, unknown))}; "
                "it takes only 'current' and 'export'",
            )
        current = params.get("current", True)
        if not isinstance(current, bool):
            return _error(request_id, _BAD_PARAMS, "subscribe: current must be true or false")
        only = None
        name = params.get("export")
        if name is not None:
            if not isinstance(name, str) or not name:
                return _error(request_id, _BAD_PARAMS, "subscribe: export must be a name")
            if self._hub.scope is None:
                return _error(request_id, 1, "subscribe: this server has no exports by name")
            try:
                only = self._hub.scope(name)
            except LookupError as unknown_export:
                return _error(request_id, 1, f"subscribe: {unknown_export}")
        if self._subscribed:
            return _error(request_id, 1, "already subscribed on this connection")
        try:
            records = self._hub.subscribe(self._out, only)
        except ValueError as closing:
            return _error(request_id, 1, str(closing))
        self._subscribed = True
        result: dict[str, Any] = {
            "subscribed": True,
            "max_backlog_bytes": self._out.max_backlog,
        }
        if current:
            result["current"] = [rec.to_dict() for rec in records]
        return {"id": request_id, "result": result}

    def _unsubscribe(self, request_id: Any, params: Mapping[str, Any]) -> dict[str, Any]:
        if params:
            return _error(request_id, _BAD_PARAMS, "unsubscribe takes no params")
        if not self._subscribed:
            return _error(request_id, 1, "not subscribed")
        self.stop()
        return {"id": request_id, "result": {"subscribed": False}}

    def stop(self) -> None:
        """Unsubscribe (the client asked, or the connection is gone)."""
        self._subscribed = False
        self._hub.unsubscribe(self._out)


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code, "message": message}}
