"""The limits on what a client may make a node hold (ferry.serve.limits), one attack each.

No sockets: connections on Twisted's StringTransport, jobs on a hand-run
thread pool, time on task.Clock.  A transport that has been told to stop
reading gets no more bytes here: :func:`feed` delivers only while the
transport produces, as a real one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from ferry.clock import ReactorClock
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import Command, CommandFlag, Errno, OptionReply
from ferry.nbd.events import NegotiationFailed, Reply
from ferry.outbox import Outbox
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.lanes import JOBS_PER_EXPORT
from ferry.serve.limits import (
    MAX_JOBS_PER_CONNECTION,
    MAX_QUEUED_REQUESTS,
    PARTIAL_REQUEST_TIMEOUT,
    REPLY_RECOUNT,
    REPLY_STALL_TIMEOUT,
    Budget,
)
from ferry.serve.server import NBDServer
from ferry.storage import Image
from serve_doubles import Blocking

from . import nbd_frames as f

SIZE = 4 << 20
KiB = 1024


class Client:
    def __init__(self, protocol: NBDServerProtocol, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.nbd = ClientConnection("disk")
        self.events: list[Any] = []

    def feed(self, data: bytes, step: int = 64 * KiB) -> int:
        """Deliver ``data`` while the transport reads; returns how much was delivered."""
        done = 0
        while done < len(data) and self.transport.producerState == "producing":
            if self.transport.disconnecting:
                break
            self.protocol.dataReceived(data[done : done + step])
            done += step
        return min(done, len(data))

    def exchange(self) -> None:
        """Both ways, until neither side has anything the other will take."""
        while True:
            out = self.transport.value()
            self.transport.clear()
            if out:
                self.events.extend(self.nbd.receive_data(out))
            pending = self.nbd.data_to_send()
            if pending:
                sent = self.feed(pending)
                if sent < len(pending):
                    self.backlog = pending[sent:]
                    return
            if not out and not pending:
                return

    def negotiate(self) -> None:
        self.exchange()
        assert self.nbd.negotiated is not None, self.events
        self.events.clear()

    def replies(self) -> dict[int, Reply]:
        self.exchange()
        return {e.handle: e for e in self.events if isinstance(e, Reply)}


class Node:
    def __init__(self, tmp_path: Path, **limits: Any) -> None:
        path = tmp_path / "disk.img"
        with open(path, "wb") as file:
            file.truncate(SIZE)
        self.reactor = task.Clock()
        self.clock = ReactorClock(self.reactor)
        self.export = Export("disk", Image.open(path), clock=self.clock)
        self.export.trigger("serve")
        self.blocking = Blocking()
        self.server = NBDServer(
            [self.export], clock=self.clock, run_blocking=self.blocking, **limits
        )
        self._port = 40000

    def connect(self, host: str = "127.0.0.1") -> Client | None:
        self._port += 1
        address = IPv4Address("TCP", host, self._port)
        protocol = self.server.buildProtocol(address)
        if protocol is None:
            return None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return Client(protocol, transport)

    def client(self, host: str = "127.0.0.1") -> Client:
        client = self.connect(host)
        assert client is not None
        client.negotiate()
        return client


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


# -- requests and jobs -------------------------------------------------------------------


def test_pipelined_flushes_run_a_few_jobs_at_a_time_and_stop_the_reading(node: Node) -> None:
    """300,000 pipelined FLUSHes once took 276 MB and stalled everyone's FLUSH for 33 s."""
    client = node.client()
    handles = [client.nbd.request(Command.FLUSH) for _ in range(3000)]
    client.exchange()
    # So many in flight; of those, the export's lane lets a few reach a thread at once.
    assert client.protocol._in_flight == MAX_JOBS_PER_CONNECTION
    assert len(node.blocking.jobs) == JOBS_PER_EXPORT
    assert client.transport.producerState == "paused"  # it reads no more while it waits
    # What it holds: the queue's limit, and what the one read that crossed it brought.
    per_read = 64 * KiB // len(f.request(Command.FLUSH))
    assert len(client.protocol._queue) <= MAX_QUEUED_REQUESTS + per_read
    answered: set[int] = set()
    for _ in range(10_000):
        node.blocking.release_all()
        backlog = getattr(client, "backlog", b"")
        if backlog:
            client.backlog = backlog[client.feed(backlog) :]
        answered |= set(client.replies())
        assert client.protocol._in_flight <= MAX_JOBS_PER_CONNECTION
        assert len(node.blocking.jobs) <= JOBS_PER_EXPORT
        if len(answered) == len(handles):
            break
    assert answered == set(handles)
    assert client.transport.producerState == "producing"


def test_a_request_received_in_part_must_be_whole_in_time(node: Node) -> None:
    client = node.client()
    header = f.request(Command.WRITE, 1, 0, 64 * KiB)
    client.protocol.dataReceived(header + bytes(1000))  # the rest never comes
    node.reactor.advance(PARTIAL_REQUEST_TIMEOUT - 1)
    assert not client.transport.disconnecting
    client.protocol.dataReceived(bytes(1000))  # a trickle is not the whole request
    node.reactor.advance(1)
    assert client.transport.disconnecting


def test_a_whole_request_stops_the_partial_request_clock(node: Node) -> None:
    client = node.client()
    handle = client.nbd.request(Command.WRITE, 0, data=b"x" * 4096)
    data = client.nbd.data_to_send()
    client.protocol.dataReceived(data[:100])
    node.reactor.advance(PARTIAL_REQUEST_TIMEOUT - 1)
    client.protocol.dataReceived(data[100:])
    node.reactor.advance(PARTIAL_REQUEST_TIMEOUT)
    assert not client.transport.disconnecting
    assert client.replies()[handle].error == Errno.OK


# -- the process's budgets -----------------------------------------------------------------


def test_the_receive_budget_makes_a_connection_wait_until_another_gives_back(
    tmp_path: Path,
) -> None:
    """100 connections each halfway through a 32 MiB WRITE once took 3.3 GB."""
    node = Node(tmp_path, receive_budget=1024 * KiB)
    first, second = node.client(), node.client()
    writes = []
    for client in (first, second):
        handle = client.nbd.request(Command.WRITE, 0, data=b"w" * (800 * KiB))
        writes.append((client, handle, client.nbd.data_to_send()))
    (_, one, first_bytes), (_, two, second_bytes) = writes
    first.feed(first_bytes[: 700 * KiB])
    sent = second.feed(second_bytes[: 700 * KiB])
    assert node.server.receive_budget.total > node.server.receive_budget.limit
    assert second.transport.producerState == "paused"  # it went over: it waits
    assert first.transport.producerState == "producing"  # the oldest goes on, to finish
    first.feed(first_bytes[700 * KiB :])
    assert first.replies()[one].error == Errno.OK  # performed: its bytes are given back
    assert second.transport.producerState == "producing"
    second.feed(second_bytes[sent:])
    assert second.replies()[two].error == Errno.OK
    assert node.server.receive_budget.total == 0


def test_a_read_waits_while_unread_replies_fill_the_reply_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 clients that did not read a 32 MiB READ each once took 1.2 GB."""
    node = Node(tmp_path, reply_budget=256 * KiB)
    stuck, reader = node.client(), node.client()
    held = {stuck.protocol._outbox: 256 * KiB}  # what stuck's transport still holds
    monkeypatch.setattr(Outbox, "held", lambda self: held.get(self, 0))
    stuck.protocol.account_replies()
    stuck.protocol.pauseProducing()  # its socket is full: the transport paused it
    handle = reader.nbd.request(Command.READ, 0, 4 * KiB)
    assert reader.replies() == {}  # waits: nothing more may be held for clients
    held[stuck.protocol._outbox] = 0  # stuck's client read at last, without a word to us
    node.reactor.advance(REPLY_RECOUNT)
    assert reader.replies()[handle].error == Errno.OK


def test_a_client_that_reads_nothing_while_others_wait_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path, reply_budget=256 * KiB)
    stuck, reader = node.client(), node.client()
    monkeypatch.setattr(
        Outbox, "held", lambda self: 256 * KiB if self is stuck.protocol._outbox else 0
    )
    stuck.protocol.account_replies()
    stuck.protocol.pauseProducing()
    node.reactor.advance(REPLY_STALL_TIMEOUT)
    assert not stuck.transport.disconnecting  # nobody waits for what it holds: kept
    reader.nbd.request(Command.READ, 0, 4 * KiB)
    reader.exchange()
    node.reactor.advance(REPLY_STALL_TIMEOUT)
    assert stuck.transport.disconnecting


def test_a_budget_wakes_its_waiters_in_order_once_there_is_room() -> None:
    budget = Budget(100)
    woken: list[str] = []
    budget.hold("a", 80)
    budget.hold("b", 40)
    assert not budget.fits() and budget.total == 120
    assert budget.exempt("a") and not budget.exempt("b")
    budget.wait("c", lambda: woken.append("c"))
    budget.wait("d", lambda: woken.append("d"))
    assert budget.pressed
    budget.hold("b", 30)
    assert woken == []  # 110: still over
    assert budget.exempt("a")  # still the oldest: changing what it holds keeps its age
    budget.forget("a")
    assert woken == ["c", "d"] and not budget.pressed
    with pytest.raises(ValueError):
        Budget(0)


# -- connections ------------------------------------------------------------------------


def test_one_address_may_not_take_every_connection(tmp_path: Path) -> None:
    node = Node(tmp_path, max_per_address=3)
    for _ in range(3):
        node.client("192.0.2.9")
    extra = node.connect("192.0.2.9")
    assert extra is not None
    extra.exchange()
    (failed,) = [e for e in extra.events if isinstance(e, NegotiationFailed)]
    assert failed.error == OptionReply.ERR_POLICY
    assert failed.message == "too many connections from 192.0.2.9: 3 at most"
    node.client("192.0.2.10")  # anyone else is served


def test_a_full_server_makes_room_at_the_expense_of_the_biggest_holder(tmp_path: Path) -> None:
    """256 idle connections once locked every other client out for as long as they stayed."""
    node = Node(tmp_path, max_clients=4)
    hog = []
    for _ in range(3):
        hog.append(node.client("192.0.2.1"))
        node.reactor.advance(1)
    busy = node.client("192.0.2.2")
    hog[1].nbd.request(Command.READ, 0, 512)  # a recent request: not the longest idle
    hog[1].exchange()
    assert node.connect("192.0.2.1") is None  # the hog cannot make room for itself
    newcomer = node.client("192.0.2.3")
    assert [c.transport.disconnecting for c in hog] == [True, False, False]
    assert not busy.transport.disconnecting
    handle = newcomer.nbd.request(Command.READ, 0, 512)
    assert newcomer.replies()[handle].error == Errno.OK


def test_fua_writes_count_as_jobs_too(node: Node) -> None:
    client = node.client()
    for i in range(MAX_JOBS_PER_CONNECTION + 5):
        client.nbd.request(Command.WRITE, i * 4096, data=b"f" * 4096, flags=CommandFlag.FUA)
    client.exchange()
    assert client.protocol._in_flight == MAX_JOBS_PER_CONNECTION
    assert len(client.protocol._queue) == 5  # they wait for a job to end
    assert len(node.blocking.jobs) == JOBS_PER_EXPORT  # the export's lane's share
    node.blocking.release_all()
    client.exchange()
    assert client.protocol._in_flight == MAX_JOBS_PER_CONNECTION
    assert len(client.protocol._queue) == 5 - JOBS_PER_EXPORT


def test_a_waiter_that_still_finds_no_room_waits_again_without_spinning() -> None:
    """A READ that needs more than was freed must not wake itself for ever (it once did)."""
    budget = Budget(100)
    budget.hold("stuck", 95)
    budget.hold("other", 10)
    calls: list[int] = []

    def read_of_50() -> None:
        calls.append(1)
        if not budget.fits(50):
            budget.wait("reader", read_of_50)

    budget.wait("reader", read_of_50)
    budget.hold("other", 0)  # 95 < 100: room, but not for 50
    assert calls == [1] and budget.pressed
    budget.hold("stuck", 0)
    assert calls == [1, 1] and not budget.pressed
