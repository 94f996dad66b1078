"""The listening side on Twisted's test doubles: one migration sender, its lifecycle, its commit.

No sockets and a fake clock, as in ``test_serve_connection``: each peer is
ferry's sans-IO client wired to a ``StringTransport``; a sender is that
client with ``FERRY_OPT_MIGRATE`` among its options, as the migration
source sends it.  The fsync of a commit runs on a ``run_blocking`` the test
releases (or fails) by hand, so "before the fsync is done" is a state a
test can stand in, not a race.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

import serve_doubles
from fakes.lockspace import FakeLockspace
from ferry import statecharts
from ferry.clock import ReactorClock
from ferry.lease.incoming import IncomingLease
from ferry.lease.manager import LeaseManager
from ferry.migrate.destination import Receiver
from ferry.migrate.wire import migrate_option
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import (
    FERRY_CMD_COMMIT,
    FERRY_OPT_MIGRATE,
    FLEXNBD_MIRROR_HANDLE,
    Command,
    Errno,
    OptionReply,
)
from ferry.nbd.events import Negotiated, NegotiationFailed, OptionAnswered, Reply
from ferry.replay import replay
from ferry.serve.acl import Acl
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.server import NBDServer
from ferry.storage import Image
from ferry.storage import image as image_module
from ferry.trace import CREATED, Tracer, TraceRecord
from serve_doubles import Blocking

from . import nbd_frames as f

SIZE = 1 << 20
TOKEN = 0x0123456789ABCDEF
ALREADY = "a migration is already being received"


class WatchingTransport(StringTransport):
    """Remembers the export's role at each write, to show what was true when a reply left."""

    def __init__(self, export: Export, host: str = "127.0.0.1") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self.export = export
        self.states_at_write: list[str] = []

    def write(self, data: bytes) -> None:
        self.states_at_write.append(self.export.state)
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.states_at_write.append(self.export.state)
        super().writeSequence(seq)


class Peer(serve_doubles.Peer):
    """One connection, with the sender's and the listener's questions."""

    protocol: NBDServerProtocol
    transport: WatchingTransport

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def negotiated(self) -> Negotiated | None:
        return self.client.negotiated

    def failed(self) -> NegotiationFailed:
        self.pump()
        [failed] = [e for e in self.events if isinstance(e, NegotiationFailed)]
        return failed

    def answer(self) -> OptionAnswered:
        self.pump()
        [answer] = [e for e in self.events if isinstance(e, OptionAnswered)]
        assert answer.option == FERRY_OPT_MIGRATE
        return answer

    def replies(self) -> dict[int, Reply]:
        self.pump()
        return {e.handle: e for e in self.events if isinstance(e, Reply)}

    def lose(self) -> None:
        """The TCP connection goes (however it went: the protocol sees connectionLost)."""
        self.protocol.connectionLost(None)


class Listener:
    """A listening export behind an NBDServer, a traced role, a hand-run fsync."""

    def __init__(self, tmp_path: Path, *, role: str = "listen", oldstyle: bool = False) -> None:
        path = tmp_path / "dest.img"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        self.image = Image.open(path)
        self.reactor = task.Clock()
        self.clock = ReactorClock(self.reactor)
        self.records: list[TraceRecord] = []
        self.export = Export(
            "disk", self.image, clock=self.clock, tracer=Tracer(self.records.append)
        )
        self.export.trigger(role)
        self.blocking = Blocking()
        self.receiver = Receiver(run_blocking=self.blocking, clock=self.clock)
        self.server = NBDServer(
            [self.export],
            clock=self.clock,
            run_blocking=self.blocking,
            oldstyle=oldstyle,
            receiver=self.receiver,
        )

    def connect(self, client: ClientConnection, host: str = "127.0.0.1") -> Peer:
        protocol = self.server.buildProtocol(None)
        assert protocol is not None
        transport = WatchingTransport(self.export, host)
        protocol.makeConnection(transport)
        return Peer(protocol, transport, client)

    def sender(self, size: int = SIZE, host: str = "127.0.0.1") -> Peer:
        return self.connect(
            ClientConnection("", meta_contexts=(), extra_options=[migrate_option(size)]), host
        )

    def client(self) -> Peer:
        return self.connect(ClientConnection("disk"))

    def roles(self) -> list[str]:
        return [r.dest for r in self.records if r.machine == "role" and r.ok and r.event != CREATED]

    def replays(self) -> None:
        result = replay([r.to_json() for r in self.records], statecharts.load_all())
        assert result.final_states[("role", "disk")] == self.export.state


@pytest.fixture
def listener(tmp_path: Path) -> Listener:
    return Listener(tmp_path)


def receiving(listener: Listener) -> Peer:
    sender = listener.sender()
    sender.pump()
    assert sender.negotiated is not None, sender.events
    assert listener.export.state == "receiving"
    return sender


# -- before any sender ------------------------------------------------------------------


def test_a_listening_export_refuses_ordinary_clients_with_a_message(listener: Listener) -> None:
    failed = listener.client().failed()
    assert failed.error == OptionReply.ERR_POLICY
    assert failed.message == (
        "export 'disk' is listening for a migration and accepts clients once it has control"
    )
    assert listener.export.state == "listening" and listener.export.num_clients == 0


def test_a_serving_export_refuses_a_sender_at_the_option(tmp_path: Path) -> None:
    listener = Listener(tmp_path, role="serve")
    sender = listener.sender()
    answer = sender.answer()
    assert answer.reply == OptionReply.ERR_POLICY
    assert answer.message == "export 'disk' is serving: it is not listening for a migration"
    assert sender.negotiated is not None  # then it is a plain client of a serving export
    assert listener.export.state == "serving" and listener.export.sender is None


# -- the sender's lifecycle -------------------------------------------------------------------


def test_the_senders_handshake_makes_the_export_receiving(listener: Listener) -> None:
    sender = listener.sender()
    assert sender.answer().reply == OptionReply.ACK
    assert sender.negotiated is not None and sender.negotiated.size == SIZE
    export = listener.export
    assert export.state == "receiving" and not export.has_control
    assert export.sender is sender.protocol
    assert export.num_clients == 0  # the sender is not a client
    # Its writes, zeroes and trims go to the image.
    write = sender.client.request(Command.WRITE, 4096, 5, data=b"hello")
    zero = sender.client.request(Command.WRITE_ZEROES, 8192, 4096)
    trim = sender.client.request(Command.TRIM, 65536, 4096)
    past = sender.client.request(Command.WRITE, SIZE - 2, 4, data=b"over")
    replies = sender.replies()
    assert [replies[h].error for h in (write, zero, trim)] == [Errno.OK] * 3
    assert replies[past].error == Errno.ENOSPC  # same handle, the connection goes on
    assert listener.image.pread(4096, 5) == b"hello"
    assert export.state == "receiving" and not sender.transport.disconnecting
    # Ordinary clients are still refused while it receives.
    failed = listener.client().failed()
    assert failed.error == OptionReply.ERR_POLICY and "receiving a migration" in failed.message


def test_a_senders_block_status_answers_in_the_context_it_negotiated(listener: Listener) -> None:
    # Found by fuzz/nbd_client: the sender's replies carried context id 0, which
    # its handshake never gave it, and ferry's own client refused them.
    sender = listener.connect(ClientConnection("", extra_options=[migrate_option(SIZE)]))
    sender.pump()
    assert sender.negotiated is not None
    assert sender.negotiated.meta_contexts == {"base:allocation": 1}
    handle = sender.client.request(Command.BLOCK_STATUS, 0, 65536)
    reply = sender.replies()[handle]
    assert reply.error == Errno.OK and list(reply.extents) == [1]


def test_a_sender_lost_before_the_commit_sends_the_export_back_to_listening(
    listener: Listener,
) -> None:
    first = receiving(listener)
    first.client.request(Command.WRITE, 0, 3, data=b"abc")
    first.pump()
    first.lose()
    assert listener.export.state == "listening" and listener.export.sender is None
    # The next sender starts over.
    second = receiving(listener)
    assert listener.export.sender is second.protocol
    assert listener.roles() == ["listening", "receiving", "listening", "receiving"]
    listener.replays()


def test_a_silent_sender_is_closed_after_the_sender_timeout(listener: Listener) -> None:
    export = listener.export
    timeout = listener.server.sender_timeout
    sender = receiving(listener)
    listener.reactor.advance(timeout - 1)
    sender.client.request(Command.WRITE, 0, 3, data=b"abc")
    sender.pump()  # anything it sends starts the silence again
    listener.reactor.advance(timeout - 1)
    assert not sender.transport.disconnecting and export.state == "receiving"
    listener.reactor.advance(1)
    assert sender.transport.disconnecting
    sender.lose()
    assert export.state == "listening" and export.sender is None
    assert receiving(listener) is not None


def test_a_sender_trickling_bytes_without_a_whole_request_is_closed(listener: Listener) -> None:
    """The attack: one byte now and then resets no timer; only whole requests are progress."""
    export = listener.export
    timeout = listener.server.sender_timeout
    sender = receiving(listener)
    header = f.request(Command.WRITE, 1, 0, 4096)
    for byte in header[:20]:
        listener.reactor.advance(timeout / 20 - 0.01)
        sender.send_raw(bytes([byte]))
        if sender.transport.disconnecting:
            break
    listener.reactor.advance(1)
    assert sender.transport.disconnecting
    sender.lose()
    assert export.state == "listening"


def test_a_sender_waiting_for_the_commit_is_silent_by_right(listener: Listener) -> None:
    export = listener.export
    listener.receiver.timeout = listener.server.sender_timeout * 4
    sender = receiving(listener)
    commit = sender.client.commit(TOKEN)
    sender.pump()
    assert export.state == "committing"
    listener.reactor.advance(listener.server.sender_timeout * 2)  # a slow fsync
    assert not sender.transport.disconnecting
    listener.blocking.release_all()
    assert sender.replies()[commit].error == Errno.OK
    assert export.state == "serving"


def test_a_second_sender_at_once_is_refused_at_the_option(listener: Listener) -> None:
    first = receiving(listener)
    second = listener.sender()
    answer = second.answer()
    assert (answer.reply, answer.message) == (OptionReply.ERR_POLICY, ALREADY)
    failed = second.failed()  # its GO then finds an export that refuses clients
    assert failed.error == OptionReply.ERR_POLICY
    second.lose()
    assert listener.export.state == "receiving" and listener.export.sender is first.protocol
    handle = first.client.request(Command.WRITE, 0, 1, data=b"x")
    assert first.replies()[handle].error == Errno.OK


def test_two_senders_acked_together_only_the_first_through_go_is_the_sender(
    listener: Listener,
) -> None:
    one, two = listener.sender(), listener.sender()
    # Both have their option acknowledged before either sends GO.
    for peer in (one, two):
        peer.client.receive_data(peer.transport.value())  # the greeting
        peer.transport.clear()
        peer.protocol.dataReceived(peer.client.data_to_send())  # client flags + the option
        peer.events.extend(peer.client.receive_data(peer.transport.value()))
        peer.transport.clear()
        assert [e.reply for e in peer.events if isinstance(e, OptionAnswered)] == [OptionReply.ACK]
    one.pump()
    assert listener.export.sender is one.protocol
    failed = two.failed()
    assert (failed.error, failed.message) == (OptionReply.ERR_POLICY, ALREADY)
    assert listener.export.state == "receiving"


def test_a_sender_with_another_size_sees_ours_then_is_closed(listener: Listener) -> None:
    sender = listener.sender(size=SIZE * 2)
    sender.pump()
    assert sender.answer().reply == OptionReply.ACK
    assert sender.negotiated is not None and sender.negotiated.size == SIZE
    assert sender.transport.disconnecting
    sender.lose()
    assert listener.export.state == "listening" and listener.roles() == ["listening"]


def test_what_a_refused_sender_pipelined_after_go_is_not_performed(listener: Listener) -> None:
    sender = listener.sender(size=SIZE * 2)
    sender.client.receive_data(sender.transport.value())  # the greeting
    stream = (
        f.client_flags()
        + f.option(FERRY_OPT_MIGRATE, struct.pack(">IQ", 1, SIZE * 2))
        + f.option(f.OPT_GO, f.info_data(""))
        + f.write(1, 0, b"pipelined")
        + f.request(FERRY_CMD_COMMIT, 2, TOKEN)
    )
    sender.send_raw(stream)
    sender.send_raw(f.write(3, 0, b"and more"))  # before the close takes effect
    assert sender.transport.disconnecting
    assert listener.image.pread(0, 9) == bytes(9)
    assert listener.export.state == "listening"


@pytest.mark.parametrize(
    "when",
    [
        "at once",
        "after the hello",
        "after the client flags",
        "after the option",
        "mid-write",
        "with requests unanswered",
    ],
)
def test_a_sender_may_go_away_at_any_step(listener: Listener, when: str) -> None:
    sender = listener.sender()
    if when == "at once":
        sender.lose()
    elif when == "after the hello":
        sender.client.receive_data(sender.transport.value())
        sender.lose()
    elif when == "after the client flags":
        sender.client.receive_data(sender.transport.value())
        sender.send_raw(sender.client.data_to_send()[:4])
        sender.lose()
    elif when == "after the option":
        sender.client.receive_data(sender.transport.value())
        sender.transport.clear()
        sender.send_raw(sender.client.data_to_send())  # flags and FERRY_OPT_MIGRATE
        assert listener.export.state == "listening"
        sender.lose()
    elif when == "mid-write":
        sender.pump()
        assert listener.export.state == "receiving"
        sender.client.request(Command.WRITE, 0, 4096, data=b"w" * 4096)
        frame = sender.client.data_to_send()
        sender.send_raw(frame[: len(frame) // 2])
        sender.lose()
    else:
        sender.pump()
        sender.protocol.pauseProducing()  # parsed, queued, not performed
        sender.client.request(Command.WRITE, 0, 3, data=b"abc")
        sender.client.request(Command.FLUSH)
        sender.pump()
        sender.lose()
        sender.protocol.resumeProducing()
    export = listener.export
    assert export.state == "listening" and export.sender is None and not export.has_control
    assert receiving(listener) is not None  # and the next sender is welcome
    listener.replays()


def test_a_sender_that_disconnects_politely_also_ends_its_migration(listener: Listener) -> None:
    sender = receiving(listener)
    sender.client.request(Command.DISC)
    sender.pump()
    assert sender.transport.disconnecting
    sender.lose()
    assert listener.export.state == "listening"


# -- the commit -----------------------------------------------------------------------------


def test_the_commit_waits_for_the_senders_writes_still_on_threads(listener: Listener) -> None:
    listener.blocking.hold_all = True
    export = listener.export
    sender = receiving(listener)
    write = sender.client.request(Command.WRITE, 0, 7, data=b"payload")
    commit = sender.client.commit(TOKEN)
    sender.pump()
    assert export.state == "receiving"  # the write is not done: the commit waits behind it
    assert len(listener.blocking.jobs) == 1
    listener.blocking.release(0)  # the write lands; now the commit's fsync
    assert export.state == "committing" and listener.image.pread(0, 7) == b"payload"
    listener.blocking.release_all()
    replies = sender.replies()
    assert replies[write].error == Errno.OK and replies[commit].error == Errno.OK
    assert export.state == "serving"


def test_commit_takes_control_before_the_ack_and_then_serves_clients(listener: Listener) -> None:
    export = listener.export
    sender = receiving(listener)
    sender.client.request(Command.WRITE, 0, 7, data=b"payload")
    flush = sender.client.request(Command.FLUSH)
    sender.pump()
    listener.blocking.release_all()
    assert sender.replies()[flush].error == Errno.OK
    refused = listener.client()
    refused.pump()  # an ordinary client in the handshake; refused below

    commit = sender.client.commit(TOKEN)
    sender.pump()
    assert export.state == "committing" and not export.has_control
    assert commit not in sender.replies()  # no ack before the fsync
    assert len(listener.blocking.jobs) == 1
    writes_before = len(sender.transport.states_at_write)
    listener.blocking.release_all()
    reply = sender.replies()[commit]
    assert reply.error == Errno.OK
    # The ack left only once the export was serving.
    assert sender.transport.states_at_write[writes_before:] == ["serving"]
    assert export.state == "serving" and export.has_control and export.clients_allowed
    assert export.sender is None
    assert listener.roles() == ["listening", "receiving", "committing", "serving"]
    listener.replays()
    assert refused.failed().error == OptionReply.ERR_POLICY

    # Ordinary clients are served now, on the same server.
    client = listener.client()
    client.pump()
    assert client.negotiated is not None
    read = client.client.request(Command.READ, 0, 7)
    assert client.replies()[read].data == b"payload"
    assert export.num_clients == 1
    # The source says goodbye; nothing changes.
    sender.client.request(Command.DISC)
    sender.pump()
    sender.lose()
    assert export.state == "serving"
    # And a would-be sender is now told this node is serving.
    late = listener.sender()
    assert late.answer().message == "export 'disk' is serving: it is not listening for a migration"


def test_a_new_sender_makes_flushes_possible_again(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync fails every later flush of the image -- until a sender rewrites it all."""

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    first = receiving(listener)
    monkeypatch.setattr(image_module.os, "fdatasync", failing)
    with pytest.raises(OSError):
        listener.image.flush()  # the commit's fsync, say
    monkeypatch.undo()
    with pytest.raises(OSError, match="an earlier flush failed"):
        listener.image.flush()
    first.lose()
    receiving(listener)  # the next sender sends the whole image again
    listener.image.flush()


def test_a_failed_fsync_answers_eio_and_listens_again(listener: Listener) -> None:
    export = listener.export
    sender = receiving(listener)
    commit = sender.client.commit(TOKEN)
    sender.pump()
    assert export.state == "committing"
    listener.blocking.fail_all(OSError(errno.EIO, "Input/output error"))
    reply = sender.replies()[commit]
    assert reply.error == Errno.EIO
    assert export.state == "listening" and not export.has_control
    assert export.sender is None
    assert sender.transport.disconnecting  # the next sender starts over
    sender.lose()
    assert export.state == "listening"
    assert receiving(listener) is not None
    assert listener.roles() == [
        "listening",
        "receiving",
        "committing",
        "listening",
        "receiving",
    ]
    listener.replays()


def test_a_commit_that_does_not_sync_in_time_is_refused_and_listens_again(
    listener: Listener,
) -> None:
    export = listener.export
    sender = receiving(listener)
    commit = sender.client.commit(TOKEN)
    sender.pump()
    listener.reactor.advance(listener.receiver.timeout - 0.1)
    assert export.state == "committing" and commit not in sender.replies()
    listener.reactor.advance(0.1)
    reply = sender.replies()[commit]
    assert reply.error == Errno.EIO
    assert reply.message == (
        f"commit timed out: the image did not sync within {listener.receiver.timeout:g} s"
    )
    assert export.state == "listening" and export.sender is None
    listener.blocking.release_all()  # the fsync returns at last: too late, nothing changes
    assert export.state == "listening" and not export.has_control
    assert sender.transport.disconnecting
    sender.lose()
    assert receiving(listener) is not None  # the next sender is taken
    listener.replays()


class BrokenIncoming:
    """An incoming lease whose take-over raises, as a bug would."""

    state = "incoming"
    token = None

    def may_write(self) -> bool:
        return False

    def refusal(self, source_resource: str) -> str | None:
        return None

    def take_over(self, source_resource: str, token: int) -> Any:
        raise RuntimeError("a bug")


def test_a_bug_while_taking_the_lease_is_answered_and_listens_again(listener: Listener) -> None:
    export = listener.export
    export.incoming_lease = BrokenIncoming()
    sender = receiving(listener)
    commit = sender.client.commit(TOKEN)
    sender.pump()
    listener.blocking.release_all()
    reply = sender.replies()[commit]
    assert reply.error == Errno.EPERM and "a bug" in reply.message
    assert export.state == "listening" and not export.has_control
    listener.replays()


def test_a_sender_lost_during_the_fsync_is_never_acked(listener: Listener) -> None:
    export = listener.export
    sender = receiving(listener)
    sender.client.commit(TOKEN)
    sender.pump()
    assert export.state == "committing"
    sender.lose()
    assert export.state == "listening"
    # A new sender gets in before the old fsync returns; the late fsync changes nothing.
    second = receiving(listener)
    listener.blocking.release_all()
    assert export.state == "receiving" and export.sender is second.protocol
    assert sender.transport.value() == b""
    listener.replays()


def test_a_second_commit_or_a_malformed_one_is_einval(listener: Listener) -> None:
    sender = receiving(listener)
    first = sender.client.commit(1)
    second = sender.client.commit(2)
    sender.pump()
    replies = sender.replies()
    assert replies[second].error == Errno.EINVAL  # answered at once: it is committing
    listener.blocking.release_all()
    assert sender.replies()[first].error == Errno.OK
    again = sender.client.commit(3)
    assert sender.replies()[again].error == Errno.EINVAL  # serving: nothing to commit
    assert listener.export.state == "serving"


def test_an_ordinary_clients_commit_is_einval(tmp_path: Path) -> None:
    listener = Listener(tmp_path, role="serve")
    client = listener.client()
    client.pump()
    handle = client.client.commit(5)
    assert client.replies()[handle].error == Errno.EINVAL
    assert listener.export.state == "serving"
    assert not client.transport.disconnecting


# -- flexnbd: listen --oldstyle ------------------------------------------------------------------


@pytest.fixture
def oldstyle(tmp_path: Path) -> Listener:
    return Listener(tmp_path, oldstyle=True)


def mirror_only(listener: Listener) -> Peer:
    """An oldstyle connection to the listening export: hello received, not yet the sender."""
    peer = listener.connect(ClientConnection("", meta_contexts=()))
    peer.pump()
    assert peer.negotiated is not None and peer.negotiated.oldstyle
    assert peer.negotiated.size == SIZE
    return peer


def mirror_write(peer: Peer, offset: int, data: bytes) -> Reply:
    handle = peer.client.request(Command.WRITE, offset, data=data, handle=FLEXNBD_MIRROR_HANDLE)
    reply = peer.replies()[handle]
    peer.events.clear()
    return reply


def disc(peer: Peer) -> None:
    peer.client.request(Command.DISC, handle=FLEXNBD_MIRROR_HANDLE)
    peer.pump()


def test_the_first_mirror_write_makes_the_sender_and_disc_commits(oldstyle: Listener) -> None:
    export = oldstyle.export
    sender = mirror_only(oldstyle)
    assert export.state == "listening" and export.sender is None and export.num_clients == 0
    assert mirror_write(sender, 4096, b"flexnbd").error == Errno.OK
    assert export.state == "receiving" and export.sender is sender.protocol
    assert mirror_write(sender, 0, b"first").error == Errno.OK
    assert oldstyle.image.pread(4096, 7) == b"flexnbd"
    # Meanwhile nobody else gets in: another oldstyle connection is closed at once.
    other = oldstyle.connect(ClientConnection("", meta_contexts=()))
    assert other.transport.disconnecting and other.transport.value() == b""
    disc(sender)
    assert export.state == "committing" and oldstyle.blocking.jobs
    assert not sender.transport.disconnecting  # closes once the commit is done
    oldstyle.blocking.release_all()
    assert export.state == "serving" and export.has_control and export.sender is None
    assert sender.transport.value() == b"" and sender.transport.disconnecting  # no ack
    assert [r for r in sender.events if isinstance(r, Reply)] == []
    sender.lose()
    assert export.state == "serving"
    # A plain oldstyle client now reads what was sent, and may write.
    client = oldstyle.connect(ClientConnection("", meta_contexts=()))
    client.pump()
    read = client.client.request(Command.READ, 0, 5)
    write = client.client.request(Command.WRITE, 8192, data=b"mine")
    replies = client.replies()
    assert replies[read].error == Errno.OK and replies[write].error == Errno.OK
    assert export.num_clients == 1
    assert oldstyle.roles() == ["listening", "receiving", "committing", "serving"]
    oldstyle.replays()


def test_only_mirror_writes_are_accepted_while_listening(oldstyle: Listener) -> None:
    export = oldstyle.export
    peer = mirror_only(oldstyle)
    write = peer.client.request(Command.WRITE, 0, data=b"plain")
    read = peer.client.request(Command.READ, 0, 512)
    flush = peer.client.request(Command.FLUSH)
    replies = peer.replies()
    assert [replies[h].error for h in (write, read, flush)] == [Errno.EPERM] * 3
    assert export.state == "listening" and export.sender is None
    assert oldstyle.image.pread(0, 5) == bytes(5)
    # DISC from a connection that never became the sender is only a goodbye.
    disc(peer)
    assert peer.transport.disconnecting and export.state == "listening"
    assert oldstyle.blocking.jobs == []


def test_a_second_mirror_only_connection_cannot_write(oldstyle: Listener) -> None:
    export = oldstyle.export
    first = mirror_only(oldstyle)
    second = mirror_only(oldstyle)  # connected before the first one wrote
    assert mirror_write(first, 0, b"one").error == Errno.OK
    assert mirror_write(second, 0, b"two").error == Errno.EPERM
    disc(second)
    assert export.state == "receiving" and export.sender is first.protocol
    second.lose()
    assert export.state == "receiving"
    assert oldstyle.image.pread(0, 3) == b"one"


def test_a_mirror_only_connection_becomes_a_client_once_the_export_serves(
    oldstyle: Listener,
) -> None:
    export = oldstyle.export
    early = mirror_only(oldstyle)  # said hello while the export was listening
    sender = mirror_only(oldstyle)
    assert mirror_write(sender, 0, b"image").error == Errno.OK
    assert mirror_write(early, 0, b"nope").error == Errno.EPERM
    disc(sender)
    oldstyle.blocking.release_all()
    sender.lose()
    assert export.state == "serving" and export.num_clients == 0
    read = early.client.request(Command.READ, 0, 5)
    write = early.client.request(Command.WRITE, 8, data=b"mine")
    replies = early.replies()
    assert (replies[read].error, replies[write].error) == (Errno.OK, Errno.OK)
    assert oldstyle.image.pread(0, 12) == b"image\0\0\0mine"
    assert export.num_clients == 1
    early.lose()
    assert export.num_clients == 0


def test_a_flexnbd_sender_lost_without_disc_listens_again(oldstyle: Listener) -> None:
    export = oldstyle.export
    first = mirror_only(oldstyle)
    assert mirror_write(first, 0, b"part").error == Errno.OK
    first.lose()
    assert export.state == "listening" and export.sender is None
    second = mirror_only(oldstyle)
    assert mirror_write(second, 0, b"whole").error == Errno.OK
    assert export.sender is second.protocol
    assert oldstyle.roles() == ["listening", "receiving", "listening", "receiving"]
    oldstyle.replays()


def test_a_silent_flexnbd_sender_is_closed_too(oldstyle: Listener) -> None:
    first = mirror_only(oldstyle)
    assert mirror_write(first, 0, b"part").error == Errno.OK
    oldstyle.reactor.advance(oldstyle.server.sender_timeout)
    assert first.transport.disconnecting
    first.lose()
    assert oldstyle.export.state == "listening"


def test_the_commit_survives_the_sender_closing_after_disc(oldstyle: Listener) -> None:
    export = oldstyle.export
    sender = mirror_only(oldstyle)
    assert mirror_write(sender, 0, b"data").error == Errno.OK
    disc(sender)
    sender.lose()  # flexnbd closes its socket right after DISC
    assert export.state == "committing"
    oldstyle.blocking.release_all()
    assert export.state == "serving" and export.has_control
    oldstyle.replays()


def test_a_failed_fsync_after_disc_listens_again(oldstyle: Listener) -> None:
    export = oldstyle.export
    sender = mirror_only(oldstyle)
    assert mirror_write(sender, 0, b"data").error == Errno.OK
    disc(sender)
    oldstyle.blocking.fail_all(OSError(errno.EIO, "Input/output error"))
    assert export.state == "listening" and not export.has_control and export.sender is None
    assert sender.transport.disconnecting and sender.transport.value() == b""
    sender.lose()
    assert mirror_write(mirror_only(oldstyle), 0, b"again").error == Errno.OK
    assert export.state == "receiving"
    oldstyle.replays()


# -- the lease a commit takes -------------------------------------------------------------


class LeasedListener(Listener):
    """``listen --lockspace ... --resource vm1`` on the in-memory lockspace."""

    def __init__(self, tmp_path: Path, resource: str | None = "vm1") -> None:
        super().__init__(tmp_path)
        self.lockspace = FakeLockspace(self.clock)
        self.leases: list[LeaseManager] = []
        self.taken: list[LeaseManager] = []

        def make(name: str) -> LeaseManager:
            manager = LeaseManager(
                self.lockspace,
                resource=name,
                owner="dst",
                clock=self.clock,
                tracer=Tracer(self.records.append),
                instance=f"dst-{len(self.leases)}",
            )
            self.leases.append(manager)
            return manager

        self.export.incoming_lease = IncomingLease(
            make, resource=resource, fallback="dest.img", on_taken=self.taken.append
        )

    def held_elsewhere(self, resource: str) -> None:
        other = LeaseManager(self.lockspace, resource=resource, owner="other", clock=self.clock)
        other.register()
        other.acquire()
        assert other.state == "held"


def test_a_forged_commit_without_a_lease_is_refused_when_the_lease_is_held(
    tmp_path: Path,
) -> None:
    """The attack: a sender naming no lease commits to ``listen --resource vm1`` held elsewhere."""
    listener = LeasedListener(tmp_path)
    listener.held_elsewhere("vm1")
    sender = receiving(listener)
    commit = sender.client.commit(0)
    sender.pump()
    listener.blocking.release_all()
    reply = sender.replies()[commit]
    assert reply.error == Errno.EPERM
    assert reply.message == (
        "cannot take the lease: lease on vm1 is held by other (exclusive, token 1)"
    )
    assert listener.export.state == "listening" and not listener.export.has_control
    assert listener.taken == []
    # The listener is ready for the real source: its incoming lease waits as before.
    assert listener.export.incoming_lease is not None
    assert listener.export.incoming_lease.state == "incoming"
    assert [m.state for m in listener.leases] == ["incoming", "stopped"]
    sender.lose()
    assert receiving(listener) is not None
    listener.replays()


def test_a_commit_without_a_lease_takes_one_of_our_own(tmp_path: Path) -> None:
    listener = LeasedListener(tmp_path)
    sender = receiving(listener)
    commit = sender.client.commit(0)
    sender.pump()
    listener.blocking.release_all()
    assert sender.replies()[commit].error == Errno.OK
    assert listener.export.state == "serving"
    first, own = listener.leases
    assert (first.state, own.state) == ("released", "held")  # stopped waiting for vm1's
    assert listener.taken == [own] and own.resource == "vm1"
    listener.replays()


def test_a_commit_refused_after_taking_the_lease_gives_it_back(tmp_path: Path) -> None:
    """Found by the simulator (``python -m ferry.sim``): a listener paused while it took
    the lease over heard the answer past the lease's deadline and refused the commit --
    but kept the lease, as the lease of its data plane, and refused every later
    sender's writes with EIO."""
    listener = LeasedListener(tmp_path)
    source = LeaseManager(listener.lockspace, resource="vm1", owner="src", clock=listener.clock)
    source.register()
    source.acquire()
    offered: list[int] = []
    source.prepare_migrate().addCallback(offered.append)
    sender = listener.connect(
        ClientConnection("", meta_contexts=(), extra_options=[migrate_option(SIZE, "vm1")])
    )
    sender.pump()
    assert listener.export.state == "receiving"
    commit = sender.client.commit(offered[0])
    sender.pump()
    listener.lockspace.delayed = {"take_over"}
    listener.blocking.release_all()  # synced; the take-over is applied, its answer waits
    listener.reactor.rightNow += listener.lockspace.ttl or 0.0  # paused past its deadline
    listener.lockspace.deliver()
    reply = sender.replies()[commit]
    assert reply.error == Errno.EPERM and "before the ack" in reply.message
    export = listener.export
    assert export.state == "listening" and export.lease is None
    assert listener.lockspace.holders_now("vm1") == ()  # given back
    sender.lose()
    second = receiving(listener)
    write = second.client.request(Command.WRITE, 0, 5, data=b"again")
    assert second.replies()[write].error == Errno.OK
    listener.replays()


def test_a_sender_the_acl_does_not_name_is_refused_at_the_option(tmp_path: Path) -> None:
    """An empty ACL lets anyone be a client, and nobody off loopback hand it an image."""
    listener = Listener(tmp_path)
    sender = listener.sender(host="192.0.2.7")
    answer = sender.answer()
    assert answer.reply == OptionReply.ERR_POLICY
    assert answer.message == "192.0.2.7 may not send a migration here: its ACL does not name it"
    assert sender.failed().error == OptionReply.ERR_POLICY  # and GO finds no export for it
    assert listener.export.state == "listening"
    listener.server.acl = Acl.parse(["192.0.2.0/24"])
    named = listener.sender(host="192.0.2.7")
    assert named.answer().reply == OptionReply.ACK
