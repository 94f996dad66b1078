"""The outbox: batched replies, sent straight to the socket or through the transport.

The direct path needs a real TCP transport, so these tests build Twisted's
own ``tcp.Server`` on one end of a loopback connection, with a
``MemoryReactorClock`` standing in for the reactor: the test plays the
reactor by calling ``doWrite`` itself, and reads the other end as the client.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from ferry.outbox import MAX_BATCH_BUFFERS, MAX_BATCH_BYTES, READ_SIZE, Outbox, tune


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Link:
    """A loopback TCP connection: a Twisted transport on one end, a plain socket on the other."""

    def __init__(self, *, small_buffers: bool = False) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.client = socket.create_connection(listener.getsockname())
            server, address = listener.accept()
        if small_buffers:
            # A small send buffer, so that a few hundred KiB fill the socket.
            # (Not a small receive buffer: a window under one loopback MSS
            # stalls the sender until the persist timer, hundreds of ms.)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.client.setblocking(False)
        self.reactor = MemoryReactorClock()
        self.transport = tcp.Server(server, Protocol(), address, None, 1, self.reactor)  # type: ignore[arg-type]
        self.received = bytearray()

    def read(self) -> int:
        """Read what the client can; returns how many bytes came."""
        got = 0
        while True:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            self.received += chunk
            got += len(chunk)

    def writing(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def drain(self) -> None:
        """Play the reactor until the transport has sent everything and the client has it."""
        for _ in range(100_000):
            if not self.read():
                # Loopback delivery may lag the send a little: wait for it.
                select.select([self.client], [], [], 0.01)
            if self.writing():
                self.transport.doWrite()
            elif not self.read():
                return
        raise AssertionError("the transport never drained")

    def close(self) -> None:
        self.client.close()
        self.transport.socket.close()


@pytest.fixture
def link() -> Iterator[Link]:
    link = Link()
    yield link
    link.close()


def test_a_batch_goes_straight_to_an_idle_socket(link: Link) -> None:
    outbox = Outbox(link.transport)
    assert outbox.direct
    outbox.add(b"header")
    outbox.add_all([b"-one-", b"", b"-two-"])
    assert outbox.pending == 16
    assert link.read() == 0  # nothing leaves before the flush
    outbox.flush()
    assert outbox.pending == 0
    assert outbox.direct_bytes == 16
    assert not link.writing()  # the transport never saw it
    link.drain()
    assert bytes(link.received) == b"header-one--two-"


def test_what_the_socket_refuses_goes_to_the_transport_in_order() -> None:
    link = Link(small_buffers=True)
    try:
        producer = Producer()
        link.transport.registerProducer(producer, True)
        outbox = Outbox(link.transport)
        first = os.urandom(MAX_BATCH_BYTES)
        outbox.add(first)  # over MAX_BATCH_BYTES: flushes by itself
        assert outbox.pending == 0
        assert 0 < outbox.direct_bytes < len(first)
        assert link.writing()
        assert producer.paused  # the rest waits in user space: backpressure
        # While the transport holds bytes, later batches queue behind them.
        sent_directly = outbox.direct_bytes
        second = os.urandom(100_000)
        outbox.add(second)
        outbox.flush()
        assert outbox.direct_bytes == sent_directly
        link.drain()
        assert not producer.paused
        assert bytes(link.received) == first + second
        # Idle again: the next batch is direct once more.
        outbox.add(b"again")
        outbox.flush()
        assert outbox.direct_bytes == sent_directly + 5
        link.drain()
        assert link.received.endswith(b"again")
    finally:
        link.close()


def test_a_closing_transport_is_never_bypassed(link: Link) -> None:
    outbox = Outbox(link.transport)
    link.transport.loseConnection()
    outbox.add(b"last words")
    outbox.flush()
    assert outbox.direct_bytes == 0


def test_any_other_transport_gets_write_sequence() -> None:
    transport = StringTransport()
    outbox = Outbox(transport)
    assert not outbox.direct
    outbox.add(b"a")
    outbox.add_all([b"b", b"c"])
    assert transport.value() == b""
    outbox.flush()
    assert transport.value() == b"abc"
    assert outbox.direct_bytes == 0


def test_a_full_batch_flushes_itself() -> None:
    transport = StringTransport()
    outbox = Outbox(transport)
    piece = b"x" * 4096
    for _ in range(MAX_BATCH_BYTES // len(piece) - 1):
        outbox.add(piece)
    assert transport.value() == b""
    outbox.add(piece)
    assert len(transport.value()) == MAX_BATCH_BYTES
    assert outbox.pending == 0
    for _ in range(MAX_BATCH_BUFFERS):
        outbox.add(b"y")
    assert outbox.pending == 0  # the buffer count caps a batch too


def test_discard_forgets_the_batch() -> None:
    transport = StringTransport()
    outbox = Outbox(transport)
    outbox.add(b"never sent")
    outbox.discard()
    outbox.flush()
    assert transport.value() == b""


def test_tune_sets_nodelay_and_sizes_on_tcp_only(link: Link) -> None:
    tune(link.transport)
    sock = link.transport.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert link.transport.bufferSize == READ_SIZE
    assert tcp.Server.bufferSize != READ_SIZE  # an instance attribute, not the class's
    other = StringTransport()
    tune(other)
    assert not hasattr(other, "bufferSize")


class BrokenSocket:
    """A socket whose every send fails as a reset connection does."""

    def sendmsg(self, buffers: list[bytes]) -> int:
        raise ConnectionResetError(errno.ECONNRESET, "reset by peer")


def test_a_send_error_is_left_to_the_transport(link: Link) -> None:
    outbox = Outbox(link.transport)
    outbox._socket = BrokenSocket()  # type: ignore[assignment]
    outbox.add(b"lost")
    outbox.flush()  # does not raise
    assert outbox.direct_bytes == 0
    assert link.writing()  # the transport has the bytes and will meet the error itself
    assert link.transport._tempDataLen == 4


def test_once_tls_has_started_nothing_goes_to_the_socket_directly(
    link: Link, tmp_path: Path
) -> None:
    from ferry.tls import load_credentials
    from tls_support import make_pki

    pki = make_pki(tmp_path)
    options = load_credentials(pki.node, server=True).server_options(verify_peer=False)
    outbox = Outbox(link.transport)
    outbox.add(b"in the clear")
    outbox.flush()
    assert outbox.direct_bytes == len(b"in the clear")
    link.transport.startTLS(options)  # what a connection does after STARTTLS's ACK
    outbox.add(b"a secret reply")
    outbox.flush()
    assert outbox.direct_bytes == len(b"in the clear")  # unchanged: TLS had it
    link.drain()
    # The handshake has not happened, so the reply waits inside TLS; it never
    # reaches the socket as it was written.
    assert bytes(link.received) == b"in the clear"
