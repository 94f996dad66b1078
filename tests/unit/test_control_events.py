"""The control socket's event stream on Twisted's test doubles: subscribe, backpressure, the cap.

The transport is a ``StringTransport``: a test plays the kernel, pausing the
connection's producer as a full socket buffer would (``pauseProducing``) and
resuming it as the peer reads.  Time is a ``task.Clock``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport

from ferry.clock import ReactorClock
from ferry.control.commands import Commands
from ferry.control.events import EventHub, MachineBoard
from ferry.control.jsonlines import CLOSE_GRACE, MAX_BACKLOG_BYTES, JsonLines
from ferry.control.server import ControlProtocol
from ferry.exports import ExportConfig, ExportRegistry, ExportUnit, export_of
from ferry.migrate.manager import MirrorManager
from ferry.serve.export import Export
from ferry.serve.server import NBDServer
from ferry.storage import Image
from ferry.trace import CREATED, Tracer, TraceRecord
from serve_doubles import Blocking


def record(n: int, *, machine: str = "role", instance: str = "disk") -> TraceRecord:
    return TraceRecord(float(n), machine, instance, f"e{n}", "a", "b", True)


class Node:
    """A tracer, an event hub on a fake clock, and control connections on StringTransports."""

    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "disk.img"
        path.write_bytes(b"\0" * 4096)
        self.reactor = task.Clock()
        self.clock = ReactorClock(self.reactor)
        self.tracer = Tracer()
        self.hub = EventHub(self.tracer, self.clock)
        self.image = Image.open(path)
        self.export = Export("disk", self.image, clock=self.clock, tracer=self.tracer)
        self.export.trigger("serve")
        server = NBDServer([self.export], clock=self.clock, run_blocking=Blocking())
        exports = ExportRegistry()
        mirrors = MirrorManager(
            self.export, gate=self.export, clock=self.clock, connector=refuse_to_connect
        )
        self.unit = ExportUnit(ExportConfig(str(path)), self.export, mirrors)
        exports.add(self.unit)
        self.commands = Commands(server, exports, default_deny=False)

    def connect(self) -> Client:
        protocol = ControlProtocol(self.commands, self.hub)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return Client(protocol, transport)


def refuse_to_connect(*args: Any) -> Any:
    raise AssertionError("no migration in these tests")


class Client:
    def __init__(self, protocol: ControlProtocol, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def send(self, request: dict[str, Any] | str) -> None:
        text = request if isinstance(request, str) else json.dumps(request)
        self.protocol.dataReceived(text.encode() + b"\n")

    def received(self) -> list[dict[str, Any]]:
        """Every JSON line written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return [json.loads(line) for line in data.splitlines()]

    def pause(self) -> None:
        """What the transport does when its buffer passes bufferSize."""
        self.transport.producer.pauseProducing()

    def resume(self) -> None:
        self.transport.producer.resumeProducing()

    def lose(self) -> None:
        self.protocol.connectionLost()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


# -- where machines stand -------------------------------------------------------------


def test_the_board_keeps_the_last_record_of_each_instance_oldest_first() -> None:
    board = MachineBoard()
    for rec in (record(1), record(2, machine="lease"), record(3), record(4, instance="other")):
        board.record(rec)
    assert [(r.machine, r.instance, r.time) for r in board.current()] == [
        ("lease", "disk", 2.0),
        ("role", "disk", 3.0),
        ("role", "other", 4.0),
    ]


# -- subscribe ------------------------------------------------------------------------


def test_subscribe_answers_where_machines_stand_then_streams_every_record(node: Node) -> None:
    client = node.connect()
    client.send({"id": 1, "method": "subscribe"})
    (answer,) = client.received()
    assert answer["id"] == 1
    assert answer["result"]["subscribed"] is True
    assert answer["result"]["max_backlog_bytes"] == MAX_BACKLOG_BYTES
    current = [TraceRecord(**fields) for fields in answer["result"]["current"]]
    assert [(r.machine, r.event, r.dest) for r in current] == [("role", "serve", "serving")]

    node.export.trigger("shutdown")
    (event,) = client.received()
    assert event["method"] == "event" and "id" not in event
    rec = TraceRecord(**event["params"])
    assert (rec.machine, rec.instance, rec.event, rec.dest) == (
        "role",
        "disk",
        "shutdown",
        "stopped",
    )
    # The very line the trace file gets.
    assert json.dumps(event["params"]) == rec.to_json()


def test_current_false_leaves_the_states_out(node: Node) -> None:
    client = node.connect()
    client.send({"id": 1, "method": "subscribe", "params": {"current": False}})
    (answer,) = client.received()
    assert answer["result"]["subscribed"] is True and "current" not in answer["result"]


def test_unsubscribe_stops_the_stream_and_closing_the_connection_does_too(node: Node) -> None:
    first, second = node.connect(), node.connect()
    for client in (first, second):
        client.send({"id": 1, "method": "subscribe"})
        client.received()
    assert node.hub.subscribers == 2
    first.send({"id": 2, "method": "unsubscribe"})
    assert first.received() == [{"id": 2, "result": {"subscribed": False}}]
    second.lose()
    assert node.hub.subscribers == 0
    node.tracer.record(record(9))
    assert first.received() == []
    # A connection may subscribe again after unsubscribing.
    first.send({"id": 3, "method": "subscribe", "params": {"current": False}})
    node.tracer.record(record(10))
    assert [m.get("id", m.get("method")) for m in first.received()] == [3, "event"]


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        ({"id": 1, "method": "subscribe", "params": {"machines": ["role"]}}, -32602, "'machines'"),
        ({"id": 1, "method": "subscribe", "params": {"current": "yes"}}, -32602, "true or false"),
        ({"id": 1, "method": "subscribe", "params": ["current"]}, -32602, "must be an object"),
        ({"id": 1, "method": "unsubscribe"}, 1, "not subscribed"),
        ({"id": 1, "method": "unsubscribe", "params": {"x": 1}}, -32602, "takes no params"),
    ],
)
def test_bad_stream_requests_are_answered_with_an_error(
    node: Node, request_: dict[str, Any], code: int, words: str
) -> None:
    client = node.connect()
    client.send(request_)
    (answer,) = client.received()
    assert answer["id"] == 1 and answer["error"]["code"] == code, answer
    assert words in answer["error"]["message"]
    assert node.hub.subscribers == 0
    assert not client.transport.disconnecting


def test_subscribing_twice_on_one_connection_is_refused(node: Node) -> None:
    client = node.connect()
    client.send({"id": 1, "method": "subscribe"})
    client.send({"id": 2, "method": "subscribe"})
    answers = client.received()
    assert answers[1] == {
        "id": 2,
        "error": {"code": 1, "message": "already subscribed on this connection"},
    }
    node.tracer.record(record(5))
    assert len(client.received()) == 1  # one subscription, one copy of each event


def test_replies_keep_their_place_among_events(node: Node) -> None:
    client = node.connect()
    client.send({"id": 1, "method": "subscribe", "params": {"current": False}})
    client.received()
    client.pause()
    node.tracer.record(record(1))
    client.send({"id": 2, "method": "status"})
    node.tracer.record(record(2))
    assert client.transport.value() == b""  # paused: everything waits, in order
    client.resume()
    kinds = [m.get("method") or m["id"] for m in client.received()]
    assert kinds == ["event", 2, "event"]


# -- backpressure and the cap ---------------------------------------------------------


def test_a_paused_connection_holds_lines_and_flushes_them_in_order(node: Node) -> None:
    transport = StringTransport()
    out = JsonLines(transport, node.clock)
    assert transport.producer is out and transport.streaming
    out.send({"n": 0})
    assert transport.value() == b'{"n": 0}\n'  # not paused: straight to the transport
    out.pauseProducing()
    for n in range(1, 4):
        out.send({"n": n})
    assert transport.value() == b'{"n": 0}\n' and out.backlog_bytes == 3 * len(b'{"n": 1}\n')
    out.resumeProducing()
    assert [json.loads(line)["n"] for line in transport.value().splitlines()] == [0, 1, 2, 3]
    assert out.backlog_bytes == 0


def test_a_transport_that_pauses_again_mid_flush_stops_the_flush(node: Node) -> None:
    class Filling(StringTransport):
        """Pauses its producer once it holds two lines, like a full socket buffer."""

        def write(self, data: bytes) -> None:
            super().write(data)
            if self.value().count(b"\n") == 2:
                self.producer.pauseProducing()

    transport = Filling()
    out = JsonLines(transport, node.clock)
    out.pauseProducing()
    for n in range(5):
        out.send({"n": n})
    out.resumeProducing()
    assert transport.value().count(b"\n") == 2  # paused again after the second line
    assert out.backlog_bytes == 3 * len(b'{"n": 0}\n')
    transport.clear()
    out.resumeProducing()
    assert [json.loads(line)["n"] for line in transport.value().splitlines()] == [2, 3]


def test_a_subscriber_past_the_cap_is_dropped_with_a_last_message(node: Node) -> None:
    client = node.connect()
    client.send({"id": 1, "method": "subscribe", "params": {"current": False}})
    client.received()
    client.pause()  # the peer stopped reading
    same = record(1)
    line = len(b'{"method": "event", "params": ' + same.to_json().encode() + b"}\n")
    fits = MAX_BACKLOG_BYTES // line
    for _ in range(fits):
        node.tracer.record(same)
    assert client.transport.value() == b"" and not client.transport.disconnecting
    assert node.hub.subscribers == 1

    node.tracer.record(same)  # one too many
    assert node.hub.subscribers == 0
    (end,) = client.received()  # the backlog was thrown away; only the reason is sent
    assert end["method"] == "end" and end["params"]["complete"] is False
    assert f"{fits} lines" in end["params"]["reason"]
    assert "read too slowly" in end["params"]["reason"]
    assert client.transport.producer is None  # or the transport would never close
    assert client.transport.disconnecting and not client.transport.disconnected

    node.tracer.record(same)
    assert client.transport.value() == b""  # nothing more, ever
    node.reactor.advance(CLOSE_GRACE)  # the peer never took the last line: abort
    assert client.transport.disconnected


def test_a_dropped_peer_that_goes_away_in_time_is_not_aborted(node: Node) -> None:
    transport = StringTransport()
    out = JsonLines(transport, node.clock, max_backlog=10)
    out.pauseProducing()
    out.send({"a": 1})  # 9 bytes: fits
    out.send({"b": 2})  # past 10: dropped
    assert transport.disconnecting and out.ended
    lost = out.when_lost()
    assert not lost.called
    out.connection_lost()
    assert lost.called and node.clock.pending() == 0
    node.reactor.advance(CLOSE_GRACE)
    assert not transport.disconnected


def test_closing_the_hub_ends_every_stream_complete_and_waits_for_them(node: Node) -> None:
    reader, stuck = node.connect(), node.connect()
    for client in (reader, stuck):
        client.send({"id": 1, "method": "subscribe", "params": {"current": False}})
        client.received()
    stuck.pause()
    node.export.trigger("shutdown")  # the last transition, then the hub closes
    done = node.hub.close("the server is shutting down")
    for client in (reader, stuck):
        *events, end = client.received()
        assert [TraceRecord(**e["params"]).event for e in events] == ["shutdown"]
        assert end == {
            "method": "end",
            "params": {"reason": "the server is shutting down", "complete": True},
        }
    reader.lose()
    assert not done.called  # the stuck one has not gone yet
    node.reactor.advance(CLOSE_GRACE)
    assert stuck.transport.disconnected
    stuck.lose()  # what the aborted transport tells its protocol
    assert done.called
    late = node.connect()
    late.send({"id": 1, "method": "subscribe"})
    assert late.received()[0]["error"]["message"] == "the server is shutting down"


def test_a_created_machine_shows_in_current_from_its_first_record(node: Node) -> None:
    node.tracer.record(
        TraceRecord(7.0, "migration", "disk", CREATED, "connecting", "connecting", True)
    )
    client = node.connect()
    client.send({"id": 1, "method": "subscribe"})
    (answer,) = client.received()
    states = {(r["machine"], r["dest"]) for r in answer["result"]["current"]}
    assert states == {("role", "serving"), ("migration", "connecting")}


def test_an_export_owns_the_records_of_its_connections_moving(node: Node) -> None:
    """A moving connection's machine is ``EXPORT/HOST:PORT`` (ferry.migrate.carry), so a
    subscription to one export, and the log's ``export``, see its clients move too."""
    mine = record(1, machine="connection", instance="disk/192.0.2.7:40000")
    assert export_of(mine) == "disk" and node.unit.owns(mine)
    theirs = record(2, machine="connection", instance="disk/b/[2001:db8::7]:40000")
    assert export_of(theirs) == "disk/b" and not node.unit.owns(theirs)
    assert node.unit.owns(record(3)) and not node.unit.owns(record(4, instance="disk/b"))
    assert export_of(record(5, machine="lease", instance="/images/disk.img")) is None
