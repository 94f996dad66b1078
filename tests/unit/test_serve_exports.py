"""Several exports on one listener: each export's own ACL, and each export's own lane.

The listener's ACL is checked at connect (``test_serve_connection``); an
export's is checked by name in the handshake, so one peer may reach one
export of a daemon and not another.  An export's flushes go through its
lane: a disk that never answers holds that export's share of the worker
threads and no more.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

import serve_doubles
from ferry.clock import ReactorClock
from ferry.migrate.destination import Receiver
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import Command, Errno, OptionReply
from ferry.nbd.events import (
    ExportInfo,
    MigrationRequest,
    Negotiated,
    NegotiationFailed,
    Refusal,
    Reply,
)
from ferry.nbd.server import ServerConnection
from ferry.serve.acl import Acl
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.lanes import JOBS_PER_EXPORT, Lane
from ferry.serve.server import NBDServer
from ferry.storage import Image
from serve_doubles import Blocking

SIZE = 1 << 20
INSIDE = "192.0.2.7"
OUTSIDE = "198.51.100.9"


class Node:
    """Two exports, ``open`` and ``guarded``, on one listener with a fake clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.reactor = task.Clock()
        self.clock = ReactorClock(self.reactor)
        self.blocking = Blocking()
        self.exports = {name: self._export(tmp_path, name) for name in ("open", "guarded")}
        self.exports["guarded"].acl = Acl.parse([f"{INSIDE}/32"])
        self.server = NBDServer(
            list(self.exports.values()), clock=self.clock, run_blocking=self.blocking
        )

    def _export(self, tmp_path: Path, name: str, role: str = "serve") -> Export:
        path = tmp_path / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        export = Export(name, Image.open(path), clock=self.clock)
        export.trigger(role)
        return export

    def connect(self, name: str, host: str) -> Peer:
        protocol = self.server.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol.makeConnection(transport)
        return Peer(protocol, transport, name)


class Peer(serve_doubles.Peer):
    protocol: NBDServerProtocol

    def __init__(self, protocol: NBDServerProtocol, transport: StringTransport, name: str) -> None:
        super().__init__(protocol, transport, ClientConnection(name))

    def outcome(self) -> Negotiated | NegotiationFailed:
        for event in self.pump():
            if isinstance(event, Negotiated | NegotiationFailed):
                return event
        raise AssertionError(f"no outcome: {self.events}")

    def replies(self) -> dict[int, Reply]:
        self.pump()
        return {e.handle: e for e in self.events if isinstance(e, Reply)}


def listing(node: Node, host: str) -> list[str]:
    """What NBD_OPT_LIST shows a client at ``host``."""
    return [info.name for info in node.server.catalog_for(host).listing()]


def test_an_export_s_acl_admits_by_name_in_the_handshake(tmp_path: Path) -> None:
    node = Node(tmp_path)
    inside = node.connect("guarded", INSIDE)
    assert isinstance(inside.outcome(), Negotiated)
    outside = node.connect("guarded", OUTSIDE)
    refused = outside.outcome()
    assert isinstance(refused, NegotiationFailed)
    assert refused.error == OptionReply.ERR_POLICY
    assert refused.message == f"export 'guarded' does not admit {OUTSIDE}"
    # The same peer still reaches the export that admits everyone.
    assert isinstance(node.connect("open", OUTSIDE).outcome(), Negotiated)
    assert node.exports["guarded"].num_clients == 1


def test_the_list_shows_each_peer_only_the_exports_it_may_use(tmp_path: Path) -> None:
    node = Node(tmp_path)
    assert listing(node, INSIDE) == ["open", "guarded"]
    assert listing(node, OUTSIDE) == ["open"]
    # And the bytes of a real NBD_OPT_LIST say the same.
    handshake = ServerConnection(node.server.catalog_for(OUTSIDE))
    handshake.data_to_send()
    list_option = (
        b"\x00\x00\x00\x03"  # client flags: fixed newstyle, no zeroes
        + b"IHAVEOPT"
        + (3).to_bytes(4, "big")  # NBD_OPT_LIST
        + (0).to_bytes(4, "big")
    )
    handshake.receive_data(list_option)
    answer = handshake.data_to_send()
    assert b"open" in answer and b"guarded" not in answer


def test_the_list_leaves_out_an_export_no_client_may_use_yet(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.server.add_export(node._export(tmp_path, "incoming", role="listen"))
    assert listing(node, INSIDE) == ["open", "guarded"]
    assert [info.name for info in node.server.listing()] == ["open", "guarded"]


def test_the_default_export_is_refused_too_when_its_acl_refuses(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.server.remove_export("open")
    refused = node.server.catalog_for(OUTSIDE).lookup("")
    assert isinstance(refused, Refusal) and refused.error == OptionReply.ERR_POLICY
    assert not isinstance(node.server.catalog_for(INSIDE).lookup(""), Refusal)


def test_a_new_export_acl_closes_only_that_export_s_clients_it_refuses(tmp_path: Path) -> None:
    node = Node(tmp_path)
    guarded_inside = node.connect("guarded", INSIDE)
    open_inside = node.connect("open", INSIDE)
    assert isinstance(guarded_inside.outcome(), Negotiated)
    assert isinstance(open_inside.outcome(), Negotiated)
    disconnected = node.server.replace_export_acl("guarded", Acl.parse([OUTSIDE]))
    assert disconnected == 1
    assert guarded_inside.transport.disconnecting or guarded_inside.transport.disconnected
    assert not open_inside.transport.disconnecting
    # A default-deny ACL with no entries admits no one, by name.
    node.server.replace_export_acl("open", Acl.parse([], default_deny=True))
    assert listing(node, INSIDE) == []


def test_the_listener_acl_still_refuses_at_connect(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.server.acl = Acl.parse([OUTSIDE])
    peer = node.connect("open", INSIDE)
    assert peer.transport.disconnecting or peer.transport.disconnected
    assert peer.transport.value() == b""  # not even the greeting


def test_a_listening_export_takes_a_sender_only_from_an_address_an_acl_names(
    tmp_path: Path,
) -> None:
    """A daemon's listener names no one: a listening export's own ACL names its sources."""
    node = Node(tmp_path)
    node.server.receiver = Receiver(run_blocking=node.blocking, clock=node.clock)
    incoming = node._export(tmp_path, "incoming", role="listen")
    node.server.add_export(incoming)
    request = MigrationRequest(version=1, size=SIZE)

    def admitted(host: str) -> bool:
        return node.server.catalog_for(host).admit_migration(request) is None

    # No ACL names anyone: loopback only, as for ``ferry listen``.
    assert admitted("127.0.0.1") and not admitted(INSIDE) and not admitted(OUTSIDE)
    incoming.acl = Acl.parse([INSIDE])
    assert admitted(INSIDE) and not admitted(OUTSIDE) and not admitted("127.0.0.1")
    refused = node.server.catalog_for(OUTSIDE).admit_migration(request)
    assert refused is not None and refused.error == OptionReply.ERR_POLICY
    assert refused.message == f"{OUTSIDE} may not send a migration here: its ACL does not name it"
    # flexnbd's sender names the export: the same rule, by name.
    assert isinstance(node.server.catalog_for(INSIDE).lookup_sender("incoming"), ExportInfo)
    refused = node.server.catalog_for(OUTSIDE).lookup_sender("incoming")
    assert isinstance(refused, Refusal) and refused.error == OptionReply.ERR_POLICY
    # A listener's ACL that names the source admits it to an export whose ACL is empty.
    incoming.acl = Acl()
    node.server.acl = Acl.parse([OUTSIDE])
    assert admitted(OUTSIDE)


def test_a_hung_disk_holds_only_its_export_s_share_of_the_threads(tmp_path: Path) -> None:
    """``guarded``'s flushes never finish; ``open``'s still reach a thread at once."""
    node = Node(tmp_path)
    hung = node.connect("guarded", INSIDE)
    assert isinstance(hung.outcome(), Negotiated)
    flushes = [hung.client.request(Command.FLUSH) for _ in range(3 * JOBS_PER_EXPORT)]
    hung.pump()
    assert len(node.blocking.jobs) == JOBS_PER_EXPORT  # the rest wait in the lane
    healthy = node.connect("open", INSIDE)
    assert isinstance(healthy.outcome(), Negotiated)
    flush = healthy.client.request(Command.FLUSH)
    healthy.pump()
    assert len(node.blocking.jobs) == JOBS_PER_EXPORT + 1
    # Only the healthy export's job is let finish: its client has its answer.
    work, answered = node.blocking.jobs.pop()
    answered.callback(work())
    assert healthy.replies()[flush].error == Errno.OK
    assert hung.replies() == {}
    # When the disk answers, the rest of the hung export's flushes go through in turn.
    while node.blocking.jobs:
        node.blocking.release_all()
    assert sorted(hung.replies()) == sorted(flushes)


def test_a_lane_runs_at_most_its_limit_at_once_in_order() -> None:
    started: list[int] = []
    pending: list[defer.Deferred[object]] = []

    def run_blocking(work: object) -> defer.Deferred[object]:
        assert callable(work)
        started.append(work())  # type: ignore[arg-type]
        d: defer.Deferred[object] = defer.Deferred()
        pending.append(d)
        return d

    lane = Lane(run_blocking, limit=2)
    results = [lane(lambda i=i: i) for i in range(5)]
    assert started == [0, 1] and lane.waiting == 3
    pending.pop(0).callback("a")
    assert started == [0, 1, 2]
    fired: list[object] = []
    results[0].addCallback(fired.append)
    assert fired == ["a"]
