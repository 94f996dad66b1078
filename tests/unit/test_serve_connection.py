"""The Twisted data plane with Twisted's own test doubles: no sockets, a fake clock.

The client side is ferry's sans-IO client, so these tests exercise the
whole request path (handshake, dispatch, replies) deterministically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

import serve_doubles
from ferry.clock import ReactorClock
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import Command, CommandFlag, Errno, OptionReply
from ferry.nbd.events import Negotiated, NegotiationFailed, Reply
from ferry.serve import connection as connection_module
from ferry.serve.acl import Acl
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.limits import HANDSHAKE_TIMEOUT
from ferry.serve.server import NBDServer
from ferry.storage import Image
from serve_doubles import Blocking

SIZE = 1 << 20


class Harness:
    def __init__(self, tmp_path: Path, *, acl: Acl | None = None, serve: bool = True) -> None:
        path = tmp_path / "disk.img"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        self.image = Image.open(path)
        self.reactor = task.Clock()
        self.clock = ReactorClock(self.reactor)
        self.export = Export("disk", self.image, clock=self.clock)
        self.export.trigger("serve" if serve else "listen")
        self.blocking = Blocking()
        self.server = NBDServer(
            [self.export], clock=self.clock, run_blocking=self.blocking, acl=acl
        )

    def connect(self, host: str = "127.0.0.1") -> Peer:
        protocol = self.server.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol.makeConnection(transport)
        return Peer(protocol, transport)


class Peer(serve_doubles.Peer):
    """A client connection: ferry's sans-IO client wired to a StringTransport."""

    protocol: NBDServerProtocol

    def __init__(self, protocol: NBDServerProtocol, transport: StringTransport) -> None:
        super().__init__(protocol, transport, ClientConnection("disk"))

    def negotiate(self) -> Negotiated:
        self.pump()
        negotiated = self.client.negotiated
        assert negotiated is not None, self.events
        self.events.clear()
        return negotiated

    def replies(self) -> dict[int, Reply]:
        self.pump()
        return {e.handle: e for e in self.events if isinstance(e, Reply)}


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_pipelined_requests_are_all_answered(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    write = peer.client.request(Command.WRITE, 4096, 5, data=b"hello")
    read = peer.client.request(Command.READ, 4096, 5)
    past = peer.client.request(Command.READ, SIZE - 1, 2)
    replies = peer.replies()
    assert replies[write].error == Errno.OK
    assert replies[read].data == b"hello"
    assert replies[past].error == Errno.EINVAL
    assert harness.export.num_clients == 1
    assert harness.export.stats.requests["READ"] == 2
    assert harness.export.stats.errors["EINVAL"] == 1


def test_paused_transport_stops_dispatching(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    peer.protocol.pauseProducing()
    assert peer.transport.producerState == "paused"
    handles = [peer.client.request(Command.READ, i * 512, 512) for i in range(3)]
    assert peer.replies() == {}  # parsed, queued, not performed
    peer.protocol.resumeProducing()
    assert peer.transport.producerState == "producing"
    assert sorted(peer.replies()) == sorted(handles)


def test_a_flush_completes_after_later_requests(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    flush = peer.client.request(Command.FLUSH)
    fua = peer.client.request(Command.WRITE, 0, 3, data=b"abc", flags=CommandFlag.FUA)
    read = peer.client.request(Command.READ, 0, 3)
    replies = peer.replies()
    assert set(replies) == {read}  # the flush and the FUA write wait on a thread
    harness.blocking.release_all()
    replies = peer.replies()
    assert replies[flush].error == Errno.OK and replies[fua].error == Errno.OK


def test_a_bad_magic_aborts_only_that_connection(harness: Harness) -> None:
    good, bad = harness.connect(), harness.connect()
    good.negotiate()
    bad.negotiate()
    bad.protocol.dataReceived(b"\xde\xad\xbe\xef" * 7)
    assert bad.transport.disconnecting
    assert not good.transport.disconnecting
    handle = good.client.request(Command.READ, 0, 1)
    assert good.replies()[handle].error == Errno.OK


def test_the_handshake_must_finish_in_time(harness: Harness) -> None:
    peer = harness.connect()
    harness.reactor.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not peer.transport.disconnecting
    harness.reactor.advance(0.2)
    assert peer.transport.disconnecting


def test_a_negotiated_client_has_no_handshake_deadline(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    harness.reactor.advance(HANDSHAKE_TIMEOUT * 10)
    assert not peer.transport.disconnecting


def test_the_acl_refuses_at_connect_and_on_replacement(tmp_path: Path) -> None:
    harness = Harness(tmp_path, acl=Acl.parse(["10.0.0.0/8"]))
    outsider = harness.connect("192.0.2.1")
    assert outsider.transport.disconnecting and outsider.transport.value() == b""
    insider = harness.connect("10.1.2.3")
    insider.negotiate()
    assert harness.server.replace_acl(Acl.parse(["10.9.0.0/16"])) == 1
    assert insider.transport.disconnecting


def test_an_export_without_control_refuses_clients_with_a_reason(tmp_path: Path) -> None:
    harness = Harness(tmp_path, serve=False)
    peer = harness.connect()
    events = peer.pump()
    failed = [e for e in events if isinstance(e, NegotiationFailed)]
    assert failed and failed[0].error == OptionReply.ERR_POLICY
    assert "listening" in failed[0].message


def test_drain_finishes_what_was_received_then_closes(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    flush = peer.client.request(Command.FLUSH)
    peer.pump()
    drained = harness.server.drain()
    assert not drained.called and not peer.transport.disconnecting
    harness.blocking.release_all()
    assert peer.replies()[flush].error == Errno.OK
    assert peer.transport.disconnecting
    peer.protocol.connectionLost(None)
    assert drained.called
    assert harness.server.buildProtocol(None) is None


def test_disc_closes_after_the_replies(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    read = peer.client.request(Command.READ, 0, 8)
    peer.client.request(Command.DISC)
    assert peer.replies()[read].error == Errno.OK
    assert peer.transport.disconnecting


def test_writes_are_observed_for_the_dirty_map(harness: Harness) -> None:
    seen: list[tuple[int, int]] = []
    undo = harness.export.observe_writes(lambda offset, length: seen.append((offset, length)))
    peer = harness.connect()
    peer.negotiate()
    peer.client.request(Command.WRITE, 100, 3, data=b"xyz")
    peer.client.request(Command.TRIM, 8192, 4096)
    peer.client.request(Command.WRITE_ZEROES, 65536, 512)
    peer.replies()
    undo()
    peer.client.request(Command.WRITE, 0, 1, data=b"q")
    peer.replies()
    assert seen == [(100, 3), (8192, 4096), (65536, 512)]


def hold(export: Any) -> None:
    """What a switchover does to the role: migrating, then quiescing (clients held)."""
    export.trigger("migrate")
    export.trigger("quiesce")


def release(export: Any) -> None:
    """What ``break`` in quiescing does: serving again, clients let go."""
    export.trigger("break_migration")


def test_a_hold_queues_requests_and_release_answers_them(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    hold(harness.export)
    # Writes are performed before their reply: nothing in flight to wait for.
    assert harness.export.writes_landed().called
    write = peer.client.request(Command.WRITE, 0, 4, data=b"held")
    read = peer.client.request(Command.READ, 0, 4)
    assert peer.replies() == {}
    assert harness.image.pread(0, 4) == bytes(4)  # not performed while held
    harness.reactor.advance(0.25)
    release(harness.export)
    replies = peer.replies()
    assert replies[write].error == Errno.OK and replies[read].data == b"held"
    assert harness.export.longest_hold == pytest.approx(0.25)
    assert not peer.transport.disconnecting


def test_the_hold_waits_for_the_writes_already_on_threads(harness: Harness) -> None:
    """The last pass is planned from the dirty map: every write before the hold is in it."""
    harness.blocking.hold_all = True
    marked: list[tuple[int, int]] = []
    harness.export.observe_writes(lambda offset, length: marked.append((offset, length)))
    peer = harness.connect()
    peer.negotiate()
    write = peer.client.request(Command.WRITE, 0, 4, data=b"late")
    zero = peer.client.request(Command.WRITE_ZEROES, 0, 512)  # after the write: it waits
    assert peer.replies() == {} and len(harness.blocking.jobs) == 1
    hold(harness.export)
    landed = harness.export.writes_landed()
    queued = peer.client.request(Command.WRITE, 8192, 4, data=b"held")  # held: not waited for
    peer.pump()
    harness.blocking.release(0)  # the write lands; the zeroing may start now
    assert not landed.called and marked == [(0, 4)]
    assert len(harness.blocking.jobs) == 1
    harness.blocking.release(0)
    assert landed.called and marked == [(0, 4), (0, 512)]
    assert harness.image.pread(0, 4) == bytes(4)
    assert set(peer.replies()) == {write, zero}
    release(harness.export)
    harness.blocking.release_all()
    assert set(peer.replies()) == {write, zero, queued}
    assert harness.image.pread(8192, 4) == b"held"


def test_a_held_connection_stops_reading_until_released(harness: Harness) -> None:
    """However long a hold lasts, a client that pipelines on costs no more memory."""
    peer = harness.connect()
    peer.negotiate()
    assert peer.transport.producerState == "producing"
    hold(harness.export)
    assert peer.transport.producerState == "paused"  # at once, with nothing queued
    peer.client.request(Command.READ, 0, 4)
    assert peer.replies() == {}
    release(harness.export)
    assert peer.transport.producerState == "producing"
    assert len(peer.replies()) == 1


def test_a_throttled_write_stops_reading_while_it_waits(harness: Harness) -> None:
    harness.export.set_write_cap(4096)
    peer = harness.connect()
    peer.negotiate()
    handles = [
        peer.client.request(Command.WRITE, i * 65536, 65536, data=bytes(65536)) for i in range(2)
    ]
    peer.replies()
    assert peer.transport.producerState == "paused"
    for _ in range(200):
        if set(peer.replies()) >= set(handles):
            break
        harness.reactor.advance(1.0)
    assert peer.transport.producerState == "producing"


def test_the_write_cap_delays_writes_in_order(harness: Harness) -> None:
    harness.export.set_write_cap(64 * 1024)
    peer = harness.connect()
    peer.negotiate()
    handles = [
        peer.client.request(Command.WRITE, i * 65536, 65536, data=bytes([i + 1]) * 65536)
        for i in range(4)
    ]
    read = peer.client.request(Command.READ, 0, 1)
    answered_at: dict[int, float] = {}
    for _ in range(40):
        for handle in peer.replies():
            answered_at.setdefault(handle, harness.reactor.seconds())
        harness.reactor.advance(0.25)
    assert set(answered_at) == {*handles, read}
    times = [answered_at[h] for h in [*handles, read]]
    assert times == sorted(times)  # performed in arrival order, the read behind the writes
    # 256 KiB at 64 KiB/s: about four seconds, less the limiter's small burst.
    assert 3.5 <= answered_at[handles[-1]] <= 4.25
    harness.export.set_write_cap(None)
    assert harness.export.write_limiter is None


def test_a_request_still_held_counts_towards_the_longest_hold(harness: Harness) -> None:
    peer = harness.connect()
    peer.negotiate()
    hold(harness.export)
    harness.reactor.advance(1.0)  # a hold with nothing queued stalls no one
    assert harness.export.longest_hold == 0.0
    peer.client.request(Command.READ, 0, 1)
    peer.replies()
    harness.reactor.advance(0.4)
    # At a handoff the client is disconnected while still held: its wait counts.
    assert harness.export.longest_hold == pytest.approx(0.4)
    peer.protocol.disconnect("handed off")
    peer.protocol.connectionLost(None)
    release(harness.export)


def test_a_long_zeroing_runs_in_steps_and_is_answered_after_the_last(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WRITE_ZEROES may cover the whole image: the export's other requests get turns."""
    monkeypatch.setattr(connection_module, "ZERO_STEP", 64 * 1024)
    harness.image.pwrite(b"\xff" * (256 * 1024), 0)
    harness.blocking.hold_all = True
    peer = harness.connect()
    peer.negotiate()
    zero = peer.client.request(Command.WRITE_ZEROES, 0, 256 * 1024, flags=CommandFlag.NO_HOLE)
    peer.pump()
    for step in range(4):
        assert len(harness.blocking.jobs) == 1, step  # one step at a time, in order
        assert peer.replies() == {}
        harness.blocking.release(0)
    assert peer.replies()[zero].error == Errno.OK
    assert harness.image.pread(0, 256 * 1024) == bytes(256 * 1024)


def test_block_status_builds_no_more_extents_than_one_reply_holds(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "MAX_EXTENTS_PER_REPLY", 4)
    asked: list[int | None] = []
    extents = Image.extents

    def counting(image: Image, offset: int, length: int, max_extents: int | None = None) -> Any:
        asked.append(max_extents)
        return extents(image, offset, length, max_extents)

    monkeypatch.setattr(Image, "extents", counting)
    for block in range(0, 16, 2):  # data, hole, data, hole...
        harness.image.pwrite(b"d" * 4096, block * 4096)
    peer = harness.connect()
    peer.negotiate()
    whole = peer.client.request(Command.BLOCK_STATUS, 0, 16 * 4096)
    one = peer.client.request(Command.BLOCK_STATUS, 0, 16 * 4096, flags=CommandFlag.REQ_ONE)
    replies = peer.replies()
    (found,) = replies[whole].extents.values()
    assert len(found) == 4 and sum(e.length for e in found) == 4 * 4096
    (first,) = replies[one].extents.values()
    assert len(first) == 1
    assert asked == [4, 1]  # the lookups stopped there: nothing was built to be cut
