"""One proxy session on Twisted's test doubles: a simulated clock, scripted servers.

The client is ferry's sans-IO client; each server connection the proxy
makes is answered by ferry's sans-IO server, played step by step by the
test (:class:`FakeServer`): it decides when each request is answered, in
which order, and when the server goes away.  So loss, replay order,
``--max-wait`` and the checks on a new server run deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

import serve_doubles
from ferry.clock import ReactorClock
from ferry.migrate.source import Destination
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import (
    BlockState,
    Command,
    CommandFlag,
    Errno,
    OptionReply,
    TransmissionFlag,
)
from ferry.nbd.events import (
    Event,
    ExportInfo,
    Extent,
    HandshakeComplete,
    Refusal,
    Reply,
    Request,
)
from ferry.nbd.locate import Location
from ferry.nbd.server import ServerConnection
from ferry.proxy.finder import FixedAddress
from ferry.proxy.listener import ProxyServer
from ferry.proxy.session import HANDSHAKE_TIMEOUT, MAX_OUTSTANDING, RETRY_INITIAL, ProxySession
from ferry.proxy.upstream import HELLO_TIMEOUT, MAX_REDIRECTS, Dialer
from ferry.trace import Tracer, TraceRecord

SIZE = 1 << 30
HERE = ("10.0.0.1", 10809)
MAX_WAIT = 30.0
FUA = CommandFlag.FUA
ALL_BUT_FUA = TransmissionFlag(
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_CACHE
)


@dataclass
class Catalog:
    """One export; once ``moved``, a handed-off ferry source: refused, and located elsewhere."""

    export: ExportInfo
    moved: Location | None = None

    def lookup(self, name: str) -> ExportInfo | Refusal:
        if name not in ("", self.export.name):
            return Refusal(OptionReply.ERR_UNKNOWN, f"no {name!r}")
        if self.moved is not None:
            return Refusal(OptionReply.ERR_POLICY, "handed off")
        return self.export

    def listing(self) -> Sequence[ExportInfo]:
        return [self.export]

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        return [] if self.moved is None else [self.moved]


class FakeServer:
    """One server connection of the proxy, answered by ferry's sans-IO server, by hand."""

    def __init__(
        self,
        protocol: Protocol,
        transport: StringTransport,
        catalog: Catalog,
        reactor: task.Clock,
    ) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.transport = transport
        self.nbd = ServerConnection(catalog, locator=catalog)
        self.requests: list[Request] = []
        self.handshake: HandshakeComplete | None = None
        self.gone = False

    def pump(self) -> None:
        """Move bytes both ways until quiet; requests collect in ``requests``."""
        while not self.gone:
            self.reactor.advance(0)  # the proxy's deferred pumps
            to_server = self.transport.value()
            self.transport.clear()
            events: list[Event] = self.nbd.receive_data(to_server) if to_server else []
            for event in events:
                if isinstance(event, Request):
                    self.requests.append(event)
                elif isinstance(event, HandshakeComplete):
                    self.handshake = event
            to_proxy = self.nbd.data_to_send()
            if to_proxy:
                self.protocol.dataReceived(to_proxy)
            if not to_server and not to_proxy:
                return

    def take(self) -> list[Request]:
        self.pump()
        taken, self.requests = self.requests, []
        return taken

    def answer(self, request: Request, error: Errno = Errno.OK, data: bytes | None = None) -> None:
        nbd = self.nbd
        if error is not Errno.OK:
            out = nbd.reply_error(request.handle, error, "fake error")
        elif request.command is Command.READ:
            out = b"".join(
                nbd.reply_read(request.handle, request.offset, data or bytes(request.length))
            )
        elif request.command is Command.BLOCK_STATUS:
            extents = [Extent(request.length, BlockState.HOLE | BlockState.ZERO)]
            out = nbd.reply_block_status(request.handle, 1, extents)
        else:
            out = nbd.reply_ok(request.handle)
        self.protocol.dataReceived(out)

    def go_away(self) -> None:
        self.gone = True
        self.protocol.connectionLost(Failure(ConnectionDone("the server went away")))


@dataclass
class Network:
    """The connector: which addresses answer, with which export, and every connection made."""

    reactor: task.Clock
    up: dict[tuple[str, int], ExportInfo] = field(default_factory=dict)
    moved: dict[tuple[str, int], Location] = field(default_factory=dict)
    silent: set[tuple[str, int]] = field(default_factory=set)  # accept, never greet
    servers: list[FakeServer] = field(default_factory=list)
    tries: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, destination: Destination, factory: Factory, timeout: float) -> Any:
        where = (destination.host, destination.port)
        self.tries.append(where)
        export = self.up.get(where)
        if export is None:
            return defer.fail(ConnectionRefusedError("nobody listens"))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        server = FakeServer(
            protocol, transport, Catalog(export, self.moved.get(where)), self.reactor
        )
        if where in self.silent:
            server.gone = True  # never pumped: no greeting, no answer
        else:
            self.servers.append(server)
            server.pump()
        return defer.succeed(protocol)

    @property
    def server(self) -> FakeServer:
        return self.servers[-1]


class Client(serve_doubles.Peer):
    """The client: ferry's sans-IO client on the proxy's transport."""

    protocol: ProxySession

    def __init__(self, harness: Harness, *args: Any) -> None:
        super().__init__(*args)
        self.harness = harness

    def pump(self) -> list[Any]:
        """Bytes both ways, and the proxy's deferred pumps, until nothing moves."""
        while True:
            super().pump()
            self.harness.reactor.advance(0)
            for server in self.harness.network.servers:
                server.pump()
            if not self.transport.value() and not self.client.data_to_send():
                return self.events

    def replies(self) -> dict[int, Reply]:
        self.pump()
        found = {e.handle: e for e in self.events if isinstance(e, Reply)}
        self.events = [e for e in self.events if not isinstance(e, Reply)]
        return found

    def send(self, command: Command, offset: int = 0, length: int = 0, **kw: Any) -> int:
        handle = self.client.request(command, offset, length, **kw)
        self.pump()
        return handle


class Harness:
    def __init__(self, export: ExportInfo | None = None) -> None:
        self.reactor = task.Clock()
        self.clock = ReactorClock(self.reactor)
        self.records: list[TraceRecord] = []
        self.network = Network(self.reactor, {HERE: export or ExportInfo("disk", SIZE)})
        self.proxy = ProxyServer(
            export_name="disk",
            finder=FixedAddress(Location(*HERE, "disk")),
            dialer=Dialer(connector=self.network, clock=self.clock),
            clock=self.clock,
            tracer=Tracer(self.records.append),
            max_wait=MAX_WAIT,
        )

    def connect(self, *, negotiate: bool = True, structured: bool = True) -> Client:
        session = self.proxy.buildProtocol(None)
        assert session is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        session.makeConnection(transport)
        client = Client(
            self, session, transport, ClientConnection("disk", structured_replies=structured)
        )
        if negotiate:
            self.network.server.pump()
            client.pump()
            assert client.client.negotiated is not None, client.events
            client.events.clear()
        return client

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass, in steps, so timers set meanwhile fire in time too."""
        until = self.reactor.seconds() + seconds
        while True:
            self.reactor.advance(min(step, until - self.reactor.seconds()))
            for server in self.network.servers:
                server.pump()
            if self.reactor.seconds() >= until:
                return

    def states(self, instance: str = "client-1") -> list[str]:
        return [r.dest for r in self.records if r.instance == instance and r.ok]


def data(n: int, length: int = 4096) -> bytes:
    return bytes([n % 256]) * length


# -- passing through ---------------------------------------------------------------------------


def test_the_client_gets_the_servers_export_and_many_requests_fly_at_once() -> None:
    h = Harness(ExportInfo("disk", SIZE, min_block_size=512, advertise=ALL_BUT_FUA))
    client = h.connect()
    negotiated = client.client.negotiated
    assert negotiated is not None
    assert negotiated.size == SIZE and negotiated.min_block_size == 512
    assert not negotiated.transmission_flags & TransmissionFlag.SEND_FUA  # the server has none
    handles = [client.send(Command.WRITE, n * 4096, data=data(n)) for n in range(16)]
    got = h.network.server.take()
    assert [r.data for r in got] == [data(n) for n in range(16)]
    for request in reversed(got):  # the server answers in its own order
        h.network.server.answer(request)
    assert sorted(client.replies()) == sorted(handles)
    assert h.states() == ["accepted", "accepted", "connected"]


def test_reads_come_back_with_their_data_and_block_status_is_translated() -> None:
    h = Harness()
    client = h.connect()
    read = client.send(Command.READ, 8192, 4096)
    status = client.send(Command.BLOCK_STATUS, 0, 65536)
    server = h.network.server
    for request in server.take():
        server.answer(request, data=data(7))
    replies = client.replies()
    assert replies[read].data == data(7)
    (extents,) = replies[status].extents.values()
    assert extents == (Extent(65536, BlockState.HOLE | BlockState.ZERO),)


def test_simple_replies_to_the_client_whatever_the_server_speaks() -> None:
    h = Harness()
    client = h.connect(structured=False)
    read = client.send(Command.READ, 0, 512)
    server = h.network.server
    assert server.handshake is not None and server.handshake.structured_replies
    (request,) = server.take()
    server.answer(request, data=data(3, 512))
    assert client.replies()[read].data == data(3, 512)


def test_no_greeting_until_the_server_is_reached_and_none_at_all_past_max_wait() -> None:
    h = Harness()
    h.network.up.clear()
    client = h.connect(negotiate=False)
    assert client.transport.value() == b""
    h.advance(MAX_WAIT - 0.01)
    assert len(h.network.tries) > 3 and not client.transport.disconnecting
    h.advance(0.02)
    assert client.transport.disconnecting
    assert set(h.states()) == {"accepted"}


def test_a_client_that_never_finishes_its_handshake_is_closed() -> None:
    h = Harness()
    client = h.connect(negotiate=False)
    h.network.server.pump()
    assert client.transport.value().startswith(b"NBDMAGIC")
    h.advance(HANDSHAKE_TIMEOUT)
    assert client.transport.disconnecting


# -- losing the server -------------------------------------------------------------------------


def test_requests_in_flight_are_sent_again_to_the_server_that_comes_back() -> None:
    h = Harness()
    client = h.connect()
    handles = [client.send(Command.WRITE, n * 4096, data=data(n)) for n in range(4)]
    first = h.network.server
    sent = first.take()
    first.answer(sent[1])  # one made it
    del h.network.up[HERE]
    first.go_away()
    session = client.protocol
    assert session.state == "upstream_lost"
    late = client.send(Command.READ, 1 << 20, 4096)  # held, not failed
    assert client.replies().keys() == {handles[1]}
    h.advance(0)  # the first attempt came at once: nobody there yet
    assert session.state == "upstream_lost"
    h.network.up[HERE] = ExportInfo("disk", SIZE)
    h.advance(RETRY_INITIAL)
    assert session.state == "replaying"
    second = h.network.server
    again = second.take()
    assert [r.data for r in again[:3]] == [data(0), data(2), data(3)]
    assert again[3].command is Command.READ
    for request in again:
        second.answer(request)
    assert client.replies().keys() == {handles[0], handles[2], handles[3], late}
    assert h.states()[-7:] == [
        "upstream_lost",
        "reconnecting",
        "upstream_lost",
        "reconnecting",
        "negotiating",
        "replaying",
        "connected",
    ]
    assert session.replayed == 3 and session.reconnects == 1
    stats = h.proxy.stats
    assert stats.reconnects == 1 and stats.requests_replayed == 3
    assert stats.longest_pause == pytest.approx(RETRY_INITIAL)


def test_overlapping_writes_reach_every_server_in_the_order_they_were_sent() -> None:
    h = Harness()
    client = h.connect()
    w1 = client.send(Command.WRITE, 0, data=data(1, 8192))
    w2 = client.send(Command.WRITE, 4096, data=data(2))  # overlaps w1
    w3 = client.send(Command.WRITE, 1 << 20, data=data(3))  # does not
    first = h.network.server
    assert [r.data for r in first.take()] == [data(1, 8192), data(3)]  # w2 waits in the proxy
    first.go_away()
    h.advance(0)
    second = h.network.server
    one, three = second.take()
    assert (one.data, three.data) == (data(1, 8192), data(3))  # w2 still waits
    second.answer(three)
    assert second.take() == []
    second.answer(one)  # only now may w2 go: the server never has both
    (two,) = second.take()
    assert two.data == data(2)
    second.answer(two)
    assert client.replies().keys() == {w1, w2, w3}


def test_a_max_wait_expiry_fails_what_waits_and_the_connection_goes_on() -> None:
    h = Harness()
    client = h.connect()
    write = client.send(Command.WRITE, 0, data=data(1))
    h.network.server.take()
    h.network.server.go_away()
    session = client.protocol
    del h.network.up[HERE]
    h.advance(10)
    held = client.send(Command.FLUSH)
    assert client.replies() == {}
    h.advance(MAX_WAIT - 10 - 0.01)
    assert client.replies() == {} and session.state in ("upstream_lost", "reconnecting")
    h.advance(0.02)
    replies = client.replies()
    assert {handle: r.error for handle, r in replies.items()} == {
        write: Errno.EIO,
        held: Errno.EIO,
    }
    assert session.state == "failed"
    # While there is no server, new requests fail at once ...
    eager = client.send(Command.READ, 0, 512)
    assert client.replies()[eager].error is Errno.EIO
    # ... and once it is back, the same connection works again.
    h.network.up[HERE] = ExportInfo("disk", SIZE)
    h.advance(10)
    assert session.state == "connected"
    read = client.send(Command.READ, 0, 512)
    (request,) = h.network.server.take()
    h.network.server.answer(request, data=data(9, 512))
    assert client.replies()[read].data == data(9, 512)
    assert not client.transport.disconnecting
    assert h.proxy.stats.requests_expired == 3
    assert "give_up" in [r.event for r in h.records]


def test_another_image_behind_the_address_is_refused() -> None:
    h = Harness()
    client = h.connect()
    write = client.send(Command.WRITE, 0, data=data(1))
    h.network.server.take()
    h.network.up[HERE] = ExportInfo("disk", SIZE // 2)
    h.network.server.go_away()
    h.advance(0)
    assert client.replies()[write].error is Errno.EIO
    assert client.protocol.state in ("failed", "retrying")
    assert "mismatch" in [r.event for r in h.records]


def test_a_flag_the_client_relied_on_and_the_new_server_lacks_fails_only_what_needs_it() -> None:
    h = Harness()
    client = h.connect()
    fua = client.send(Command.WRITE, 0, data=data(1), flags=FUA)
    plain = client.send(Command.WRITE, 8192, data=data(2))
    h.network.server.take()
    h.network.up[HERE] = ExportInfo("disk", SIZE, advertise=ALL_BUT_FUA)
    h.network.server.go_away()
    h.advance(0)
    assert client.replies()[fua].error is Errno.EIO
    (request,) = h.network.server.take()
    assert request.data == data(2)
    h.network.server.answer(request)
    assert client.replies()[plain].error is Errno.OK


def test_eshutdown_is_not_an_answer_the_request_goes_to_the_next_server() -> None:
    h = Harness()
    client = h.connect()
    write = client.send(Command.WRITE, 0, data=data(1))
    first = h.network.server
    (request,) = first.take()
    first.answer(request, Errno.ESHUTDOWN)
    first.go_away()  # what abortConnection does, on a real transport
    assert client.replies() == {}
    h.advance(0)
    (again,) = h.network.server.take()
    assert again.data == data(1)
    h.network.server.answer(again)
    assert client.replies()[write].error is Errno.OK


def test_a_client_that_sends_without_reading_is_paused_at_the_cap() -> None:
    h = Harness()
    client = h.connect()
    h.network.server.go_away()
    del h.network.up[HERE]
    for n in range(MAX_OUTSTANDING):
        client.client.request(Command.READ, n * 4096, 4096)
    frames = client.client.data_to_send()
    client.protocol.dataReceived(frames)
    assert client.transport.producerState == "paused"


def test_a_source_that_handed_the_image_off_sends_the_proxy_where_it_went() -> None:
    h = Harness()
    client = h.connect()
    write = client.send(Command.WRITE, 0, data=data(1))
    source = h.network.server
    source.take()
    there = ("10.0.0.2", 10810)
    h.network.up[there] = ExportInfo("disk", SIZE)
    h.network.moved[HERE] = Location(*there)  # the source stays up, handed off
    source.go_away()
    h.advance(0)
    destination = h.network.server
    assert h.network.tries[-2:] == [HERE, there]
    (again,) = destination.take()
    assert again.data == data(1)
    destination.answer(again)
    assert client.replies()[write].error is Errno.OK
    assert client.protocol.upstream == Location(*there, "disk")
    assert [r.event for r in h.records][-6:] == [
        "reconnect",
        "dialed",
        "redirected",
        "dialed",
        "negotiated",
        "replayed",
    ]
    # Lost again: the destination is tried first now.
    destination.go_away()
    h.advance(0)
    assert h.network.tries[-1] == there and client.protocol.state == "connected"


def test_in_failed_a_request_tries_the_server_at_once_and_waits_only_for_that() -> None:
    h = Harness()
    client = h.connect()
    client.send(Command.WRITE, 0, data=data(1))
    h.network.server.take()
    del h.network.up[HERE]
    h.network.server.go_away()
    h.advance(MAX_WAIT + 0.1)
    client.replies()
    session = client.protocol
    assert session.state == "failed"
    h.network.up[HERE] = ExportInfo("disk", SIZE)
    tries = len(h.network.tries)
    read = client.send(Command.READ, 0, 512)  # long before the retry timer
    assert len(h.network.tries) == tries + 1
    (request,) = h.network.server.take()
    h.network.server.answer(request, data=data(5, 512))
    assert client.replies()[read].data == data(5, 512)
    assert session.state == "connected"
    assert [r.event for r in h.records][-4:] == ["retry", "dialed", "negotiated", "replayed"]


def test_a_server_that_never_greets_is_given_up_after_the_hello_timeout() -> None:
    h = Harness()
    client = h.connect()
    write = client.send(Command.WRITE, 0, data=data(1))
    h.network.server.take()
    h.network.silent.add(HERE)
    h.network.server.go_away()
    h.advance(0)
    session = client.protocol
    assert session.state == "negotiating"  # connected, waiting for a hello
    h.advance(HELLO_TIMEOUT - 0.1)
    assert session.state == "negotiating"
    assert "attempt_failed" not in [r.event for r in h.records]
    h.network.silent.clear()  # the next attempt finds a server that answers
    h.advance(0.2)
    assert "attempt_failed" in [r.event for r in h.records]
    h.advance(RETRY_INITIAL)
    (again,) = h.network.server.take()
    h.network.server.answer(again)
    assert client.replies()[write].error is Errno.OK


def test_servers_that_send_the_proxy_to_each_other_are_followed_only_so_far() -> None:
    h = Harness()
    client = h.connect()
    client.send(Command.WRITE, 0, data=data(1))
    h.network.server.take()
    there = ("10.0.0.2", 10810)
    h.network.up[there] = ExportInfo("disk", SIZE)
    h.network.moved[HERE] = Location(*there)
    h.network.moved[there] = Location(*HERE)
    tries = len(h.network.tries)
    h.network.server.go_away()
    h.advance(0)
    assert len(h.network.tries) - tries == 1 + MAX_REDIRECTS  # then this attempt gives up
    assert client.protocol.state == "upstream_lost"
    assert [r.event for r in h.records].count("redirected") == MAX_REDIRECTS
