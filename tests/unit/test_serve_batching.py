"""The connection's write path: batched replies, direct sends, backpressure.

Two kinds of transport: Twisted's ``StringTransport`` (the outbox falls back
to ``writeSequence``, so batching and pausing can be watched call by call),
and Twisted's real ``tcp.Server`` over a loopback connection with a
``MemoryReactorClock`` (the direct ``sendmsg`` path; the test plays the
reactor and ferry's sans-IO client plays the NBD client).
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from ferry.clock import ReactorClock
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import MAX_REQUEST_SIZE, Command, Errno
from ferry.nbd.events import Reply
from ferry.outbox import MAX_BATCH_BYTES
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.server import NBDServer
from ferry.storage import Image

SIZE = 40 << 20


def run_now(work: Callable[[], object]) -> defer.Deferred[Any]:
    return defer.succeed(work())


@pytest.fixture
def content(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


def make_server(path: Path, reactor: Any) -> tuple[NBDServer, Export]:
    clock = ReactorClock(reactor)
    export = Export("disk", Image.open(path), clock=clock)
    export.trigger("serve")
    return NBDServer([export], clock=clock, run_blocking=run_now), export


# -- with a StringTransport ---------------------------------------------------------------


class CountingTransport(StringTransport):
    """Counts writes; pauses its producer once more than ``limit`` bytes were written."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.calls = 0
        self.limit = limit

    def write(self, data: bytes) -> None:
        self.calls += 1
        super().write(data)
        self._maybe_pause()

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        self.calls += 1
        super().writeSequence(seq)
        self._maybe_pause()

    def _maybe_pause(self) -> None:
        if self.limit is not None and len(self.value()) > self.limit and self.producer:
            self.producer.pauseProducing()


class Peer:
    def __init__(self, server: NBDServer, transport: CountingTransport) -> None:
        protocol = server.buildProtocol(None)
        assert protocol is not None
        self.protocol: NBDServerProtocol = protocol
        self.transport = transport
        protocol.makeConnection(transport)
        self.client = ClientConnection("disk")
        self.replies: dict[int, Reply] = {}
        self.pump()
        assert self.client.negotiated is not None

    def pump(self) -> None:
        while True:
            to_client = self.transport.value()
            self.transport.clear()
            if to_client:
                for event in self.client.receive_data(to_client):
                    if isinstance(event, Reply):
                        self.replies[event.handle] = event
            to_server = self.client.data_to_send()
            if to_server:
                self.protocol.dataReceived(to_server)
            if not to_client and not to_server:
                return


def test_the_replies_to_one_receive_leave_in_one_write(
    tmp_path: Path, content: tuple[Path, bytes]
) -> None:
    path, data = content
    server, _ = make_server(path, MemoryReactorClock())
    peer = Peer(server, CountingTransport())
    handles = [peer.client.request(Command.READ, i * 65536, 4096) for i in range(16)]
    peer.transport.calls = 0
    peer.protocol.dataReceived(peer.client.data_to_send())
    assert peer.transport.calls == 1
    peer.pump()
    for i, handle in enumerate(handles):
        assert peer.replies[handle].data == data[i * 65536 : i * 65536 + 4096]


def test_a_pause_in_the_middle_of_a_batch_stops_dispatching(
    tmp_path: Path, content: tuple[Path, bytes]
) -> None:
    path, data = content
    server, export = make_server(path, MemoryReactorClock())
    peer = Peer(server, CountingTransport())
    peer.transport.limit = 0  # from now on, any write fills the transport
    size = MAX_BATCH_BYTES // 2
    handles = [peer.client.request(Command.READ, i * size, size) for i in range(8)]
    export.stats.requests.clear()
    peer.protocol.dataReceived(peer.client.data_to_send())
    # Two reads fill a batch; its flush pauses the connection; the rest wait.
    assert export.stats.requests["READ"] == 2
    assert peer.transport.producerState == "paused"
    peer.pump()
    assert len(peer.replies) == 2
    peer.transport.limit = None
    peer.protocol.resumeProducing()
    peer.pump()
    assert export.stats.requests["READ"] == 8
    for i, handle in enumerate(handles):
        assert peer.replies[handle].data == data[i * size : (i + 1) * size]


# -- with a real TCP transport ---------------------------------------------------------------


class Wire:
    """ferry's connection on a real TCP transport; the test is reactor and client."""

    def __init__(self, path: Path) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.sock = socket.create_connection(listener.getsockname())
            accepted, address = listener.accept()
        self.sock.setblocking(False)
        self.reactor = MemoryReactorClock()
        self.server, self.export = make_server(path, self.reactor)
        protocol = self.server.buildProtocol(None)
        assert protocol is not None
        self.protocol: NBDServerProtocol = protocol
        self.transport = tcp.Server(accepted, protocol, address, None, 1, self.reactor)  # type: ignore[arg-type]
        protocol.makeConnection(self.transport)
        self.client = ClientConnection("disk")
        self.outgoing = bytearray()
        self.replies: dict[int, Reply] = {}
        self.client_reads = True

    def step(self) -> bool:
        """One round of client and reactor; True if anything moved."""
        moved = False
        self.outgoing += self.client.data_to_send()
        if self.outgoing:
            try:
                sent = self.sock.send(self.outgoing)
            except BlockingIOError:
                sent = 0
            del self.outgoing[:sent]
            moved |= sent > 0
        if self.transport in self.reactor.getReaders():
            before = self._progress()
            self.transport.doRead()
            moved |= self._progress() != before
        if self.transport in self.reactor.getWriters():
            before_offset = self.transport.offset
            self.transport.doWrite()
            moved |= self.transport.offset != before_offset
        if self.client_reads:
            try:
                chunk = self.sock.recv(4 << 20)
            except BlockingIOError:
                chunk = b""
            if chunk:
                moved = True
                for event in self.client.receive_data(chunk):
                    if isinstance(event, Reply):
                        self.replies[event.handle] = event
        return moved

    def _progress(self) -> tuple[int, int, int]:
        """What reading moves: replies read, writes done, part of a request received."""
        nbd = self.protocol._nbd
        stats = self.export.stats
        return stats.bytes_read, stats.bytes_written, 0 if nbd is None else nbd.buffered

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until ``until()`` holds, or until nothing has moved for a while."""
        idle = 0
        for _ in range(200_000):
            if until is not None and until():
                return
            if self.step():
                idle = 0
                continue
            idle += 1
            if idle > 5:
                if until is None:
                    return
                raise AssertionError("stuck")
            select.select([self.sock, self.transport.socket], [], [], 0.02)
        raise AssertionError("did not settle")

    def close(self) -> None:
        self.sock.close()
        self.transport.socket.close()


@pytest.fixture
def wire(content: tuple[Path, bytes]) -> Iterator[Wire]:
    wire = Wire(content[0])
    wire.run(until=lambda: wire.client.negotiated is not None)
    yield wire
    wire.close()


def test_large_reads_are_byte_exact_over_tcp(wire: Wire, content: tuple[Path, bytes]) -> None:
    _, data = content
    ranges = [
        (0, MAX_REQUEST_SIZE),
        (12345, 256 * 1024),
        (SIZE - 1_000_001, 1_000_001),
        (7, 1),
        (5 << 20, 3 << 20),
    ]
    handles = [wire.client.request(Command.READ, offset, length) for offset, length in ranges]
    wire.run(until=lambda: len(wire.replies) == len(handles))
    for (offset, length), handle in zip(ranges, handles, strict=True):
        reply = wire.replies[handle]
        assert reply.error == Errno.OK
        assert reply.data == data[offset : offset + length]
    assert wire.protocol._outbox is not None and wire.protocol._outbox.direct_bytes > 0


def test_writes_then_reads_over_tcp(wire: Wire) -> None:
    payload = os.urandom(3 << 20)
    write = wire.client.request(Command.WRITE, 1 << 20, data=payload)
    read = wire.client.request(Command.READ, 1 << 20, len(payload))
    wire.run(until=lambda: len(wire.replies) == 2)
    assert wire.replies[write].error == Errno.OK
    assert wire.replies[read].data == payload


def test_a_client_that_does_not_read_pauses_the_connection(
    wire: Wire, content: tuple[Path, bytes]
) -> None:
    _, data = content
    wire.client_reads = False
    size = 1 << 20
    count = 40
    handles = [wire.client.request(Command.READ, i * size, size) for i in range(count)]
    wire.run()  # until nothing moves: the socket and the transport are full
    assert wire.protocol._paused
    assert wire.transport not in wire.reactor.getReaders()  # reading stopped too
    performed = wire.export.stats.requests["READ"]
    assert performed < count  # the rest wait, parsed but not performed
    buffered = len(wire.transport.dataBuffer) + wire.transport._tempDataLen
    assert buffered <= wire.transport.bufferSize + MAX_BATCH_BYTES + size
    wire.client_reads = True
    wire.run(until=lambda: len(wire.replies) == count)
    assert wire.export.stats.requests["READ"] == count
    for i, handle in enumerate(handles):
        assert wire.replies[handle].data == data[i * size : (i + 1) * size]
