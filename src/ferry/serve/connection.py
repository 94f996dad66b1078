"""One client connection: the NBD protocol driven by Twisted.

The byte-level protocol lives in :mod:`ferry.nbd.server`; this module only
moves bytes between it, the socket and the image.

Invariants:

* Every parsed request gets exactly one reply, unless the connection is lost.
* No disk call that may wait runs on the reactor thread.  Requests are
  dispatched in the order they arrive and performed on worker threads (the
  export's lane, :mod:`ferry.serve.lanes`), in the order
  :mod:`ferry.serve.ordering` keeps: overlapping requests where one writes
  run in arrival order, a FLUSH after every write before it.  A READ the
  page cache can answer at once (``Image.read_cached``) is answered on the
  spot, and so is a WRITE that overlaps nothing in flight and that the
  kernel takes without waiting (``Image.write_nowait``: XFS and btrfs do,
  ext4 does not); what the kernel did not take goes to a thread.  Replies
  leave as jobs finish, so they may come out of order, as NBD allows.
* A write is reported to the export (the dirty map) once it has landed and
  before anything that waited for it starts; a switchover's hold waits for
  the writes in flight (``Export.writes_landed``), and a sender's commit for
  its own.  Its reply waits for what the export's write gate returns (a
  write-blocking migration's mirrored write, :mod:`ferry.migrate.mirroring`).
* The connection is a push producer for its transport.  When the transport
  says "pause" (its write buffer is full), the connection stops reading from
  the socket *and* stops dispatching requests it has already parsed, so a
  client that pipelines reads without reading the replies cannot make the
  server buffer without bound (the reasoning of Twisted's
  ``HTTPChannel.pauseProducing``).
* Nothing a client sends can raise out of ``dataReceived``: a broken frame
  closes this connection and no other.
* Replies go through the connection's :class:`~ferry.outbox.Outbox`:
  those of one batch of requests leave together (one ``sendmsg``, without a
  copy, when the transport holds nothing), and the outbox is flushed before
  control returns to the reactor -- at the end of ``_dispatch``, after a
  batch of threads' results (:func:`ferry.workers.at_end_of_turn`), after
  handshake output.

The migration sender (a connection whose ``FERRY_OPT_MIGRATE`` was
acknowledged, see ``ferry.serve.server``) is served like any client -- its
WRITE, WRITE_ZEROES and TRIM go to the image in order, out of range is
ENOSPC or EINVAL with its handle -- but it is the export's *sender*, not one
of its clients, and three things are its own:

* its handshake makes a listening export ``receiving`` (``sender_connected``);
  a sender announcing another image size is closed instead, after the GO
  reply that lets the source see the mismatch;
* its ``Commit``, performed in order after everything it sent before, by
  the server's :class:`Receiver` (the destination's half of the two-phase
  commit, :mod:`ferry.migrate.destination`), which answers it through this
  connection -- OK once the image is durable and the lease taken, an
  error otherwise, after which the connection closes once its replies
  are out;
* its end, however it comes (lost, closed, refused, before or after any
  request, during the fsync) while ``receiving`` or ``committing``: role
  ``sender_lost`` (-> listening), and an fsync still running is never
  acknowledged -- unless the commit no longer depends on the socket (see
  :meth:`ferry.serve.export.Export.detach_commit`).

A flexnbd sender (``ferry listen --oldstyle``) cannot say who it is in the
handshake: every oldstyle connection to a listening export is *mirror-only*
(``HandshakeComplete.flexnbd``; the parser answers anything but a write with
handle ``.MIRROR.`` or a FLUSH with EPERM), and the first one to send a
``.MIRROR.`` write while the export is listening becomes the sender
(``sender_connected``).  Another one's writes, while there is a sender or
once the export is no longer listening, are EPERM: a listening export never
takes writes from anyone but its one sender.  NBD_CMD_DISC from the sender
is flexnbd's "you have it all: take control", performed in order after its
writes as a commit the receiver does not answer (flexnbd's listener sends
nothing; the sender has usually closed its socket already).  A sender whose
connection ends without DISC is ``sender_lost``, as above.  DISC from a
mirror-only connection that is not the sender is only a disconnect.

While the export's role holds clients (a switchover), and while a write
waits for the auto-converge cap, the connection stops reading its socket as
well as dispatching: however long the hold, it queues no more than what it
had already read.

TLS (``--tls``, see :mod:`ferry.tls`): the parser says when a client's
NBD_OPT_STARTTLS is acknowledged (``StartTLS``); the ACK is already flushed
in the clear, so the connection starts TLS on its transport as the server
and tells the parser, and everything after goes through Twisted's TLS layer
(the outbox sees ``transport.TLS`` and stops writing to the socket itself).
The TLS layer calls ``handshakeCompleted``; with ``--tls-verify-peer`` the
peer has then shown a certificate from the CA, and its subject
(``tls_subject``) authenticates it.  A failed handshake (no certificate,
another CA's, a bad one) closes the connection and is logged with the reason.

Once the handshake has verified a certificate the connection sees the
catalogs as that subject's (``catalog_for``): who may send a migration is
the server's rule (see :mod:`ferry.serve.server`).

A TLS client does not move at a handoff (``why_not_movable``): its session
lives in this process's OpenSSL, which no socket checkpoint carries; it is
disconnected like any client that cannot move.  And a node that requires
TLS takes no moved connections (the server's ``connection_landing`` refuses
FERRY_OPT_CONNECTIONS): those are all plaintext.
"""

from __future__ import annotations

import errno as os_errno
import fcntl
import os
import socket
import termios
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast
from typing import Protocol as TypingProtocol

from cryptography import x509
from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ferry.chartnames import RoleState
from ferry.clock import Clock, cancel_call
from ferry.letgo import let_go
from ferry.nbd.constants import (
    FLEXNBD_MIRROR_HANDLE,
    BlockState,
    Command,
    CommandFlag,
    Errno,
)
from ferry.nbd.events import (
    CarriedConnection,
    Commit,
    ConnectionLanding,
    Disconnect,
    Event,
    ExportInfo,
    Extent,
    HandshakeAborted,
    HandshakeComplete,
    MigrationRequest,
    ProtocolError,
    Refusal,
    RejectedRequest,
    Request,
    StartTLS,
)
from ferry.nbd.locate import Location
from ferry.nbd.server import ExportCatalog, Locator, MigrationCatalog, ServerConnection
from ferry.nbd.session import SessionSnapshot, encode_request
from ferry.outbox import Outbox, tune
from ferry.serve.acl import peer_host_of
from ferry.serve.export import RECEIVING_STATES
from ferry.serve.limits import (
    MAX_JOBS_PER_CONNECTION,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_REQUESTS,
    PARTIAL_REQUEST_TIMEOUT,
    REPLY_STALL_TIMEOUT,
    Budget,
)
from ferry.serve.ordering import Access, Job
from ferry.storage import Extent as StorageExtent
from ferry.storage import ZeroingNotFast
from ferry.tls import ServerTLS, describe_error, peer_subject
from ferry.workers import at_end_of_turn, turn

if TYPE_CHECKING:
    from ferry.serve.acl import Acl
    from ferry.serve.export import Export

log = Logger()

# Most extents one BLOCK_STATUS reply describes; a fragmented file could
# otherwise make one reply enormous.  Clients ask again from where it ends.
MAX_EXTENTS_PER_REPLY: Final = 1024

# The longest step of a WRITE_ZEROES or TRIM on a worker thread.  A request
# may cover the whole image, and where the file system cannot punch or
# zero a range its zeroes are written (a megabyte at a time): in steps, the
# export's other requests get their turn in its lane between them.
ZERO_STEP: Final = 64 * 1024 * 1024

# How an operating-system error becomes an NBD error.  Anything unlisted is
# reported as EIO: the client must not mistake it for a usage error.
_OS_TO_NBD: Final = {
    os_errno.ENOSPC: Errno.ENOSPC,
    os_errno.EDQUOT: Errno.ENOSPC,
    os_errno.EFBIG: Errno.ENOSPC,
    os_errno.EPERM: Errno.EPERM,
    os_errno.EACCES: Errno.EPERM,
    os_errno.EROFS: Errno.EPERM,
    os_errno.EBADF: Errno.EPERM,
    os_errno.ENOMEM: Errno.ENOMEM,
    os_errno.EINVAL: Errno.EINVAL,
    os_errno.EOPNOTSUPP: Errno.ENOTSUP,
}


# The hot path compares against these rather than ``Command.READ`` and
# ``request.flags & CommandFlag.FUA``: an enum member lookup costs ~130 ns,
# IntFlag's ``&`` ~850 ns and ``.name`` ~290 ns, against a few microseconds
# for a whole 4 KiB read.
_READ: Final = Command.READ
_WRITE: Final = Command.WRITE
_FLUSH: Final = Command.FLUSH
_TRIM: Final = Command.TRIM
_WRITE_ZEROES: Final = Command.WRITE_ZEROES
_CACHE: Final = Command.CACHE
_BLOCK_STATUS: Final = Command.BLOCK_STATUS
_FUA: Final = int(CommandFlag.FUA)
_NO_HOLE: Final = int(CommandFlag.NO_HOLE)
_FAST_ZERO: Final = int(CommandFlag.FAST_ZERO)
_NAMES: Final = {command: command.name for command in Command}


# What a migration sender sends that counts as progress (SENDER_TIMEOUT).
_PROGRESS: Final = (Request, RejectedRequest, Commit)


def nbd_errno(error: OSError) -> Errno:
    return _OS_TO_NBD.get(error.errno or 0, Errno.EIO)


RunBlocking = Callable[[Callable[[], object]], "defer.Deferred[Any]"]


CommitAnswer = Callable[[Errno, str], None]
"""How a receiver answers a commit: ``Errno.OK`` is the acknowledgement."""


class Receiver(TypingProtocol):
    """The destination's half of the two-phase commit (``ferry.migrate.destination``)."""

    def commit(
        self,
        export: Export,
        sender: object,
        token: int,
        source_resource: str,
        answer: CommitAnswer | None,
    ) -> defer.Deferred[None]:
        """Perform ``sender``'s commit on ``export`` and answer it (None: flexnbd's,
        which nothing answers); the Deferred fires once it is settled either way."""
        ...

    def connection_landing(self) -> ConnectionLanding | Refusal:
        """Whether this node rebuilds a sender's client connections, and who it is."""
        ...

    def carried(
        self, host: ConnectionHost, export: Export, state: bytes, answer: CommitAnswer
    ) -> None:
        """Rebuild one client connection carried to ``export`` (its sender is ``host``'s),
        and answer whether it was rebuilt."""
        ...


class PeerCatalogs(ExportCatalog, MigrationCatalog, Locator, TypingProtocol):
    """The catalogs one connection's handshake consults: its peer's view of the exports
    (and of where a handed-off one went)."""


class ConnectionHost(ExportCatalog, MigrationCatalog, Locator, TypingProtocol):
    """What a connection needs of the listener that made it (``NBDServer`` is one).

    The handshake asks it for exports (it is both catalogs) and where a
    handed-off export went (it is the locator); the connection
    reports itself opened and closed, reads the limits, and runs blocking
    work through it.
    """

    acl: Acl
    clock: Clock
    oldstyle: bool
    tls: ServerTLS
    handshake_timeout: float
    sender_timeout: float
    receiver: Receiver | None
    receive_budget: Budget
    reply_budget: Budget

    def room_for_replies(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more of replies fit the process's REPLY_BUDGET now."""
        ...

    def run_blocking(self, work: Callable[[], object]) -> defer.Deferred[Any]: ...

    def run_blocking_for(
        self, export: Export, work: Callable[[], object], *, short: bool = False
    ) -> defer.Deferred[Any]: ...

    def catalog_for(self, peer_host: str, subject: x509.Name | None = None) -> PeerCatalogs:
        """The catalogs as ``peer_host`` sees them (``subject``: its verified certificate's)."""
        ...

    def connection_opened(self, connection: NBDServerProtocol) -> None: ...

    def connection_closed(self, connection: NBDServerProtocol) -> None: ...

    def export_named(self, name: str) -> Export | None: ...


@dataclass(frozen=True, slots=True)
class Arrival:
    """A client's session that moved here, rebuilt (``ServerConnection.restore``).

    ``requests`` are its requests in flight, to perform once it joins its
    export; ``replies`` were written by the node it left and never reached
    that node's kernel: they go out first.
    """

    session: ServerConnection
    requests: list[Event]
    context_id: int
    replies: bytes = b""


@implementer(IPushProducer, IHandshakeListener)
class NBDServerProtocol(Protocol):
    def __init__(self, server: ConnectionHost, *, arrival: Arrival | None = None) -> None:
        self._server = server
        # A client's session moved here from another node's socket (see
        # "moving" below): no handshake, and nothing performed until it joins.
        self._arrival = arrival
        self._nbd: ServerConnection | None = None
        self._export: Export | None = None
        self._queue: deque[Request | RejectedRequest | Commit | CarriedConnection] = deque()
        self._outbox: Outbox | None = None
        self._paused = False
        self._in_flight = 0
        self._closing = False
        self._refused = False  # refused after GO: nothing more it sends is looked at
        self._lost = False
        self._drained: list[defer.Deferred[None]] = []
        self._settled: list[defer.Deferred[None]] = []  # waiting for _in_flight == 0
        self._handshake_timer: Any = None
        self._sender_timer: Any = None  # a sender's time without a request (SENDER_TIMEOUT)
        self._throttle_timer: Any = None  # a write waiting for the auto-converge cap
        self._write_charged = False  # the head write has already paid the cap
        self._held_since: float | None = None  # first request queued behind a hold
        self._hold_began: float | None = None  # when the export's hold stopped our reading
        self._context_id = 0
        self._flexnbd = False  # a mirror-only oldstyle connection: see the module doc
        # Why the socket is not read now: "backpressure", "closing", "held",
        # "throttled", "queue", "budget"; it is read again once every reason is gone.
        self._not_reading: set[str] = set()
        self._queued_bytes = 0  # WRITE payload held in the queue (MAX_QUEUED_BYTES)
        self._dispatching = False  # inside _dispatch (a job may end within it)
        self._dispatch_again = False  # ... and one did: dispatch again before leaving
        self._settling = False  # replies wait for the end of a batch of results
        self._jobs = 0  # requests of it in the export's order (admitted, not finished)
        self._writing = 0  # WRITE payload of jobs in flight (RECEIVE_BUDGET)
        self._reading = 0  # READ bytes of jobs in flight (REPLY_BUDGET)
        self._partial_timer: Any = None  # a request received in part (PARTIAL_REQUEST_TIMEOUT)
        self._stall_timer: Any = None  # replies unread while paused (REPLY_STALL_TIMEOUT)
        #: Why handshakes on this connection are refused (too many connections
        #: from its address), or None.
        self.refusal: Refusal | None = None
        #: The clock's time of the last request received or reply sent.
        self.last_active = 0.0
        self.peer_host = ""
        #: The subject of the peer's verified certificate (``--tls-verify-peer``), else None.
        self.tls_subject: x509.Name | None = None
        self._tls_handshaking = False  # STARTTLS acknowledged, the TLS handshake not done
        # The exports as this peer sees them (their ACLs and the sender rule
        # applied); set once the connection is made and its peer known.
        self._catalogs: PeerCatalogs | None = None

    # -- Twisted protocol -------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer_host = peer_host_of(self.transport.getPeer())  # type: ignore[union-attr]
        self._catalogs = self._server.catalog_for(self.peer_host)
        if self._arrival is not None:
            self._arrived(self._arrival)
            return
        if not self._server.acl.allows(self.peer_host):
            log.info("refused {peer}: not in the ACL", peer=self.peer_host)
            self._abort()
            return
        self._server.connection_opened(self)
        tune(self.transport)
        self._outbox = Outbox(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._handshake_timer = self._server.clock.call_later(
            self._server.handshake_timeout, self._handshake_expired
        )
        self.last_active = self._server.clock.seconds()
        self._nbd = ServerConnection(
            self,
            migration=self,
            locator=self,
            oldstyle=self._server.oldstyle,
            tls=self._server.tls.mode,
        )
        # An oldstyle server has chosen its export before the client speaks.
        self._receive(b"")

    def dataReceived(self, data: bytes) -> None:
        self._receive(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._tls_handshaking:
            log.warn(
                "closing {peer}: TLS handshake failed: {why}",
                peer=self.peer_host,
                why=_tls_failure(reason),
            )
        self._lost = True
        self._queue.clear()
        if self._outbox is not None:
            self._outbox.discard()
        self._cancel_handshake_timer()
        if self._sender_timer is not None and self._sender_timer.active():
            self._sender_timer.cancel()
        self._sender_timer = None
        if self._throttle_timer is not None and self._throttle_timer.active():
            self._throttle_timer.cancel()
        self._throttle_timer = None
        for timer in (self._partial_timer, self._stall_timer):
            cancel_call(timer)
        self._partial_timer = self._stall_timer = None
        self._server.receive_budget.forget(self)
        self._server.reply_budget.forget(self)
        export = self._export
        if export is not None:
            was_sender = export.sender is self and export.state in RECEIVING_STATES
            export.detach(self)
            if was_sender:
                log.info(
                    "{name}: the migration sender {peer} went away before the commit: "
                    "listening again",
                    name=export.name,
                    peer=self.peer_host,
                )
        self._server.connection_closed(self)
        self._fire_drained()
        self._fire_settled()

    # -- the catalogs: the server's as this peer sees them, unless it is refused ----------

    @property
    def _peer_catalogs(self) -> PeerCatalogs:
        catalogs = self._catalogs
        assert catalogs is not None, "a handshake before the connection was made"
        return catalogs

    def lookup(self, name: str) -> ExportInfo | Refusal:
        return self.refusal or self._peer_catalogs.lookup(name)

    def listing(self) -> Sequence[ExportInfo]:
        return () if self.refusal is not None else self._peer_catalogs.listing()

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        return self.refusal or self._peer_catalogs.locate(name)

    def admit_migration(self, request: MigrationRequest) -> Refusal | None:
        return self.refusal or self._peer_catalogs.admit_migration(request)

    def lookup_sender(self, name: str) -> ExportInfo | Refusal:
        return self.refusal or self._peer_catalogs.lookup_sender(name)

    def connection_landing(self) -> ConnectionLanding | Refusal:
        return self.refusal or self._peer_catalogs.connection_landing()

    # -- TLS ---------------------------------------------------------------------------

    def _start_tls(self) -> None:
        """STARTTLS was acknowledged (the ACK is out): TLS from here on, as the server."""
        assert self._nbd is not None and self.transport is not None
        options = self._server.tls.options
        assert options is not None  # the parser acknowledges STARTTLS only with TLS on
        self._tls_handshaking = True
        self.transport.startTLS(options)  # type: ignore[attr-defined]
        self._nbd.tls_started()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up; with --tls-verify-peer, the peer's certificate checked.

        A verified peer is logged (who connected is worth keeping); any other
        TLS client only with -v.
        """
        self._tls_handshaking = False
        if self._server.tls.verify_peer:
            self.tls_subject = peer_subject(self.transport)
            # Its certificate may make it a migration sender (see NBDServer).
            self._catalogs = self._server.catalog_for(self.peer_host, self.tls_subject)
        if self.tls_subject is None:
            log.debug("TLS with {peer}", peer=self.peer_host)
        else:
            subject = self.tls_subject.rfc4514_string()
            log.info("TLS with {peer}: {subject}", peer=self.peer_host, subject=subject)

    # -- IPushProducer -----------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._stop_reading("backpressure")
        if self._stall_timer is None:
            self._stall_timer = self._server.clock.call_later(
                REPLY_STALL_TIMEOUT, self._reply_stalled
            )

    def resumeProducing(self) -> None:
        # The transport has sent everything it held: none of our replies waits.
        self._paused = False
        cancel_call(self._stall_timer)
        self._stall_timer = None
        self._server.reply_budget.hold(self, 0)
        self._start_reading("backpressure")
        self._dispatch()

    def _reply_stalled(self) -> None:
        """Replies unread for REPLY_STALL_TIMEOUT: close it if others wait for what it holds."""
        self._stall_timer = None
        if not self._paused or self._lost:
            return
        self.account_replies()
        if self._server.reply_budget.pressed and self._outbox is not None and self._outbox.held():
            log.warn(
                "closing {peer}: it read none of its replies for {seconds:g} s "
                "while others wait for room",
                peer=self.peer_host,
                seconds=REPLY_STALL_TIMEOUT,
            )
            self._abort()
            return
        self._stall_timer = self._server.clock.call_later(REPLY_STALL_TIMEOUT, self._reply_stalled)

    def _stop_reading(self, why: str) -> None:
        if not self._not_reading and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._not_reading.add(why)

    def _start_reading(self, why: str) -> None:
        self._not_reading.discard(why)
        if not self._not_reading and self.transport is not None and not self._lost:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._abort()

    # -- the control plane's handles -----------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing in flight: closing it loses the client nothing."""
        return not self._queue and self._in_flight == 0 and not self._paused

    @property
    def export_name(self) -> str | None:
        """The export this connection chose (None before its handshake ends)."""
        return None if self._export is None else self._export.name

    def disconnect(self, reason: str) -> None:
        """Close this client at once (ACL change, handoff, fencing)."""
        log.info("disconnecting {peer}: {reason}", peer=self.peer_host, reason=reason)
        self._abort()

    def _close_after_replies(self) -> None:
        """Read and perform nothing more; close once what is in flight is answered."""
        self._closing = True
        self._queue.clear()
        self._stop_reading("closing")

    def drain(self) -> defer.Deferred[None]:
        """Stop reading, finish every request already received, then close.

        Used at shutdown: nothing the client was told "done" is lost, and
        nothing it sent is silently dropped.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if self._lost:
            d.callback(None)
            return d
        self._drained.append(d)
        self._closing = True
        self._stop_reading("closing")
        self._maybe_close()
        return d

    # -- moving to another socket (ferry.migrate.carry, ferry.takeover) ---------------
    #
    # At a handoff the source suspends each client connection, checkpoints its
    # socket and this session, and either lets it go (``moved``: the socket was
    # closed in repair mode, nothing was sent, the destination rebuilt it) or
    # takes it back (``resume_after_move``: the handoff did not happen).  The
    # destination builds the connection again from the session
    # (``arrival=``): it performs nothing until ``join`` gives it its export,
    # once the commit has landed; a commit that does not land closes it
    # without a packet (``moved`` again).
    #
    # A takeover on one host is the same dance with the socket itself: the old
    # process waits until the connection has no job on a thread (``settled``),
    # suspends it, passes the very socket on by SCM_RIGHTS with this session,
    # and once the new process serves, drops its own descriptor without a
    # packet (``handed_on``); the new process rebuilds the connection with
    # ``arrival=`` around the same kernel socket.

    def why_not_movable(self) -> str | None:
        """Why this connection cannot move now; None if it can."""
        transport = self.transport
        export = self._export
        if self._lost or self._closing or self._refused:
            return "it is closing"
        if self._nbd is None or export is None or self._flexnbd or export.sender is self:
            return "it is not a client in transmission"
        if self._in_flight:
            return "a request of it is still running"
        if not isinstance(transport, tcp.Connection) or not isinstance(
            transport.socket, socket.socket
        ):
            return "it is not a TCP connection"
        if transport.TLS:
            return "its TLS session cannot move"
        if transport.disconnecting or transport._writeDisconnected:
            return "it is half-closed"
        return None

    @property
    def tcp_socket(self) -> socket.socket:
        """The connection's socket (only for a connection ``why_not_movable`` passed)."""
        sock = self.transport.socket  # type: ignore[union-attr]
        assert isinstance(sock, socket.socket)
        return sock

    def suspend(self) -> None:
        """Neither read nor write the socket, and let no timer close it: it is being moved.

        Requests rejected while held are answered first (a rejection touches
        no image, and its payload is gone, so it could not travel).
        """
        assert self._nbd is not None
        rejected = [event for event in self._queue if type(event) is RejectedRequest]
        if rejected:
            self._queue = deque(e for e in self._queue if type(e) is not RejectedRequest)
            for event in rejected:
                self._reject(event)
            self._flush_outbox()
        self._stop_reading("moving")
        self.transport.stopWriting()  # type: ignore[union-attr]
        for timer in (self._partial_timer, self._stall_timer):
            cancel_call(timer)
        self._partial_timer = self._stall_timer = None

    def session_snapshot(self) -> SessionSnapshot:
        """The session, with the requests held here as its requests in flight."""
        assert self._nbd is not None
        in_flight = b"".join(encode_request(cast(Request, event)) for event in self._queue)
        return self._nbd.snapshot(in_flight)

    def unsent(self) -> bytes:
        """Replies written but still in this process: the move carries them."""
        return b"" if self._outbox is None else self._outbox.unsent()

    def resume_after_move(self) -> None:
        """The move did not happen and the socket is ours again: carry on where we stopped."""
        if self._lost:
            return
        transport = self.transport
        if self._outbox is not None and self._outbox.held():
            transport.startWriting()  # type: ignore[union-attr]
        self._start_reading("moving")
        self._account_received()
        self._dispatch()

    def settled(self) -> defer.Deferred[None]:
        """Fires once no job of this connection runs on a thread (any request now).

        Only then can its session move: such a job's reply is this process's
        to send.  With requests held, no new job starts meanwhile.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if self._in_flight == 0 or self._lost:
            d.callback(None)
        else:
            self._settled.append(d)
        return d

    def handed_on(self, where: str) -> None:
        """Another process holds this very socket now (SCM_RIGHTS): forget it without a packet.

        What was queued went with the session and the unsent replies with
        it; nothing is answered here, and nothing is done to the socket but
        dropping this process's descriptor (:func:`ferry.letgo.let_go`).
        """
        log.info("{peer}: connection handed {where}", peer=self.peer_host, where=where)
        self._queue.clear()
        self._queued_bytes = 0
        if self._outbox is not None:
            self._outbox.discard()
        transport = self.transport
        if transport is None or self._lost:
            return
        transport.unregisterProducer()  # type: ignore[attr-defined]
        let_go(transport)
        gone = Failure(ConnectionDone(f"handed {where}"))  # type: ignore[no-untyped-call]
        transport.connectionLost(gone)  # type: ignore[attr-defined]

    def moved(self, where: str) -> None:
        """The socket was closed in repair mode (the client is elsewhere): forget it quietly.

        What was queued went with the session; nothing is answered here.
        """
        log.info("{peer}: connection handed {where}", peer=self.peer_host, where=where)
        if self._export is not None:
            self._export.detach(self)
        self._queue.clear()
        self._queued_bytes = 0
        if self._outbox is not None:
            self._outbox.discard()
        self._abort()

    def _arrived(self, arrival: Arrival) -> None:
        """Built from a session that moved here: set up, queue its requests, perform nothing."""
        self._arrival = None
        self._server.connection_opened(self)
        tune(self.transport)
        self._outbox = Outbox(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.last_active = self._server.clock.seconds()
        self._nbd = arrival.session
        self._context_id = arrival.context_id
        self._stop_reading("arriving")
        if arrival.replies:
            self._outbox.add(arrival.replies)
            self._flush_outbox()
        for event in arrival.requests:  # the requests in flight, judged again here
            if type(event) is Request:
                self._queued_bytes += len(event.data)
                self._queue.append(event)
            elif type(event) is RejectedRequest:
                self._queue.append(event)

    def join(self, export: Export) -> None:
        """The commit landed: this arrival is one of ``export``'s clients from now on."""
        if self._lost or self._export is not None:
            return
        self._export = export
        export.attach(self)
        self._start_reading("arriving")
        self._account_received()
        self._dispatch()

    # -- receiving -------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        assert self._nbd is not None
        if self._refused:
            return
        if self._flexnbd:
            self._admit_if_serving()
        try:
            events = self._nbd.receive_data(data)
        except ProtocolError as error:
            log.warn("closing {peer}: {error}", peer=self.peer_host, error=error)
            if self._export is not None:
                self._export.stats.protocol_errors += 1
            self._flush_handshake()
            self._abort()
            return
        self._flush_handshake()
        if self._flexnbd:
            events = self._screen_flexnbd(events)
        if self._sender_timer is not None and any(type(e) in _PROGRESS for e in events):
            # Only whole requests count: a sender that trickles a byte at a
            # time, never finishing one, is as silent as one that sends nothing.
            self._sender_timer.reset(self._server.sender_timeout)
        if events:
            self.last_active = self._server.clock.seconds()
        for event in events:
            kind = type(event)
            if kind is Request:
                request = cast(Request, event)
                self._queue.append(request)
                self._queued_bytes += len(request.data)
            elif kind is RejectedRequest:
                self._queue.append(event)  # type: ignore[arg-type]
            elif kind is HandshakeComplete:
                if not self._handshake_complete(event):  # type: ignore[arg-type]
                    return  # refused and closing: what followed GO is not performed
            elif kind is Commit or kind is CarriedConnection:
                self._queue.append(event)  # type: ignore[arg-type]
            elif kind is Disconnect:
                self._closing = True
            elif kind is HandshakeAborted:
                self._flush_handshake()
                self._lose()
                return
            elif kind is StartTLS:
                self._start_tls()
        self._dispatch()
        self._account_received()

    def _account_received(self) -> None:
        """What this connection holds of its client's input, against every limit on it."""
        nbd = self._nbd
        if nbd is None or self._lost:
            return
        incomplete = nbd.buffered
        if incomplete and self._partial_timer is None:
            self._partial_timer = self._server.clock.call_later(
                PARTIAL_REQUEST_TIMEOUT, self._partial_expired
            )
        elif not incomplete and self._partial_timer is not None:
            cancel_call(self._partial_timer)
            self._partial_timer = None
        budget = self._server.receive_budget
        held = incomplete + self._queued_bytes + self._writing
        budget.hold(self, held)
        if len(self._queue) >= MAX_QUEUED_REQUESTS or self._queued_bytes >= MAX_QUEUED_BYTES:
            self._stop_reading("queue")
        elif "queue" in self._not_reading and len(self._queue) < MAX_QUEUED_REQUESTS // 2:
            self._start_reading("queue")
        # A connection that holds nothing may go on (a handshake, small requests
        # performed as they come); one that holds part of the budget waits.
        if held and not budget.fits() and not budget.exempt(self):
            self._stop_reading("budget")
            budget.wait(self, self._room_to_receive)
        elif not held and "budget" in self._not_reading:
            # What it held went to the disk (its writes ran on threads): it
            # holds nothing now, and may read again like any that holds nothing.
            self._start_reading("budget")

    def _room_to_receive(self) -> None:
        self._start_reading("budget")

    def _partial_expired(self) -> None:
        self._partial_timer = None
        if self._nbd is not None and self._nbd.buffered and not self._lost:
            log.warn(
                "closing {peer}: a request was not whole {seconds:g} s after it began",
                peer=self.peer_host,
                seconds=PARTIAL_REQUEST_TIMEOUT,
            )
            self._abort()

    def _flush_handshake(self) -> None:
        if self._nbd is not None and self._outbox is not None:
            out = self._nbd.data_to_send()
            if out:
                self._outbox.add(out)
                self._flush_outbox()

    def _handshake_complete(self, event: HandshakeComplete) -> bool:
        """Attach to the chosen export; False if refused after all (the connection closes)."""
        self._cancel_handshake_timer()
        export = self._server.export_named(event.export.name)
        self._context_id = next(iter(event.meta_contexts), 0)  # the sender's too
        if event.migration is not None:
            return self._become_sender(export, event)
        if event.flexnbd:
            if export is None or export.state != RoleState.LISTENING:
                self._refuse()
                return False
            # Not one of the export's clients: at most its sender, later.
            self._export = export
            self._flexnbd = True
            return True
        if export is None or not export.clients_allowed:
            # The export went away or lost control between INFO and GO.
            self._refuse()
            return False
        self._export = export
        export.attach(self)
        return True

    def _become_sender(self, export: Export | None, event: HandshakeComplete) -> bool:
        assert event.migration is not None
        if export is None or export.state != RoleState.LISTENING:
            # Cannot happen while lookup_sender and this run in one call; be safe.
            log.warn("closing sender {peer}: the export is not listening", peer=self.peer_host)
            self._refuse()
            return False
        if event.migration.size != export.image.size:
            log.warn(
                "closing sender {peer}: it sends {theirs} bytes, {name} has {ours}",
                peer=self.peer_host,
                theirs=event.migration.size,
                name=export.name,
                ours=export.image.size,
            )
            self._refuse()  # after the GO reply: the source sees the size itself
            return False
        self._export = export
        export.sender_connected(self)
        self._watch_sender()
        log.info("receiving {name} from {peer}", name=export.name, peer=self.peer_host)
        return True

    def _watch_sender(self) -> None:
        self._sender_timer = self._server.clock.call_later(
            self._server.sender_timeout, self._sender_silent
        )

    def _sender_silent(self) -> None:
        """Nothing from the sender for ``sender_timeout`` seconds: drop it, listen again.

        Only while ``receiving``: in ``committing`` the sender is waiting
        for our fsync and is silent by right.
        """
        self._sender_timer = None
        export = self._export
        if export is None or export.sender is not self or export.state != RoleState.RECEIVING:
            return
        log.warn(
            "{name}: closing the migration sender {peer}: nothing from it for {seconds:g} s",
            name=export.name,
            peer=self.peer_host,
            seconds=self._server.sender_timeout,
        )
        self._abort()

    def _admit_if_serving(self) -> None:
        """A mirror-only connection whose export took control since its hello is a client now.

        Another connection's migration landed while this one waited: it is
        served on the same port, as it would be had it reconnected.  Done
        before its bytes are parsed, so its next request is judged as a
        client's.
        """
        export = self._export
        if export is None or export.sender is self or not export.clients_allowed:
            return
        assert self._nbd is not None
        self._nbd.admit_as_client()
        self._flexnbd = False
        export.attach(self)

    def _screen_flexnbd(self, events: list[Event]) -> list[Event]:
        """A mirror-only connection's events: who is the sender, and DISC as its commit.

        Runs as the events are parsed, so the order of the stream is kept:
        the first ``.MIRROR.`` write while the export is listening makes this
        connection the sender before that write is queued.
        """
        export = self._export
        if export is None:
            return events
        screened: list[Event] = []
        for event in events:
            kind = type(event)
            if kind is Request:
                request: Request = event  # type: ignore[assignment]
                if (
                    export.sender is None
                    and export.state == RoleState.LISTENING
                    and request.command is not _FLUSH
                ):
                    export.sender_connected(self)
                    self._watch_sender()
                    log.info(
                        "receiving {name} from flexnbd sender {peer}",
                        name=export.name,
                        peer=self.peer_host,
                    )
                if export.sender is not self:
                    why = (
                        "a migration is already being received"
                        if export.sender is not None
                        else f"the export is {export.state}, not listening for a migration"
                    )
                    event = RejectedRequest(
                        request.handle,
                        request.command,
                        request.offset,
                        request.length,
                        Errno.EPERM,
                        why,
                    )
            elif kind is Disconnect and export.sender is self:
                # flexnbd's "you have it all: take control".
                screened.append(Commit(FLEXNBD_MIRROR_HANDLE, 0))
            screened.append(event)
        return screened

    def _refuse(self) -> None:
        self._refused = self._closing = True
        self._lose()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        log.info("closing {peer}: no handshake in time", peer=self.peer_host)
        self._abort()

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    # -- performing --------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Perform queued requests until none is left or the transport pauses us.

        Replies collect in the outbox and go out in one batch at the end (or
        sooner, when the batch is full; a flush that fills the transport's
        buffer pauses us, which ends the loop).
        """
        queue = self._queue
        export = self._export
        if export is None:
            return  # an arrival that has not joined its export: nothing is performed yet
        if self._dispatching:
            self._dispatch_again = True  # a job ended inside this loop: it goes round again
            return
        self._dispatching = True
        try:
            again = True
            while again:
                self._dispatch_again = False
                with turn():  # the requests that are ready together go to a thread together
                    self._dispatch_queued(queue, export)
                again = self._dispatch_again
        finally:
            self._dispatching = False
        self._flush_outbox()
        self._account_received()
        self._maybe_close()

    def _dispatch_queued(
        self, queue: deque[Request | RejectedRequest | Commit | CarriedConnection], export: Export
    ) -> None:
        while queue and not self._paused and not self._lost and self._throttle_timer is None:
            if export is not None and export.clients_held:
                # A switchover holds client requests: queued, not failed.
                self.hold_reading()
                break
            event = queue[0]
            if type(event) is Request:
                command = event.command
                if command is _READ and not self._server.room_for_replies(event.length):
                    # Replies already waiting for their clients fill the budget.
                    self._server.reply_budget.wait(self, self._dispatch)
                    break
                if self._in_flight >= MAX_JOBS_PER_CONNECTION:
                    break  # a job ends first (_settle_thread_job dispatches again)
                if (
                    command is _WRITE
                    and export is not None
                    and export.write_limiter is not None
                    and not self._write_charged
                ):
                    delay = export.write_limiter.reserve(event.length)
                    if delay > 0:
                        self._write_charged = True
                        self._throttle_timer = export.clock.call_later(delay, self._unthrottle)
                        self._stop_reading("throttled")
                        break
                self._write_charged = False
                queue.popleft()
                self._queued_bytes -= len(event.data)
                self._perform(event)
            else:
                if type(event) is Commit and self._jobs:
                    break  # the commit follows every write before it: they end first
                queue.popleft()
                if type(event) is Commit:
                    self._commit(event)
                elif type(event) is CarriedConnection:
                    self._carried(event)
                else:
                    self._reject(event)  # type: ignore[arg-type]

    def _unthrottle(self) -> None:
        self._throttle_timer = None
        self._start_reading("throttled")
        self._dispatch()

    @property
    def held_since(self) -> float | None:
        """Since when the hold has stalled this client; None if it has not.

        A client whose requests were queued or running when the hold began
        was stalled from then on; so was one whose next request is still
        unread in the socket, sent during the hold (at the latest).
        """
        if self._held_since is None and self._hold_began is not None and self._unread():
            return self._hold_began
        return self._held_since

    def _unread(self) -> bool:
        """Bytes wait in the socket, unread (FIONREAD; False where it cannot be asked)."""
        handle = getattr(self.transport, "socket", None)
        if not isinstance(handle, socket.socket):
            return False
        try:
            waiting = fcntl.ioctl(handle.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(waiting, "little") > 0

    def hold_reading(self) -> None:
        """The export holds client requests: from now on, neither dispatch nor read."""
        if self._export is None or not self._export.clients_held:
            return
        now = self._export.clock.seconds()
        if self._hold_began is None:
            self._hold_began = now
        if self._held_since is None and (self._queue or self._in_flight):
            self._held_since = now
        self._stop_reading("held")

    def resume_dispatch(self) -> None:
        """The export released its hold: account for the wait, then go on."""
        held_since = self.held_since
        if held_since is not None and self._export is not None:
            self._export.note_hold(self._export.clock.seconds() - held_since)
        self._held_since = self._hold_began = None
        self._start_reading("held")
        self._dispatch()

    def _reject(self, event: RejectedRequest) -> None:
        assert self._nbd is not None and self._export is not None
        self._export.stats.errors[event.error.name] += 1
        self._export.stats.requests[_command_name(event.command)] += 1
        self._send(self._nbd.reply_error(event.handle, event.error, event.reason))

    def _perform(self, request: Request) -> None:
        export = self._export
        nbd = self._nbd
        outbox = self._outbox
        assert export is not None and nbd is not None and outbox is not None
        refusal = self._refusal(export)
        if refusal is not None:
            self._fail(request, *refusal)
            return
        command = request.command
        started = time.perf_counter()  # latency is observed, never used for decisions
        image = export.image
        offset = request.offset
        length = request.length
        if command is _READ:
            if not export.order.conflicts(Access.READ, offset, length):
                # What the page cache holds is answered here and now: no disk
                # call, so no thread (and no round trip to one) is needed.
                try:
                    cached = image.read_cached(offset, length)
                except OSError as error:
                    self._fail(request, *_os_failure(request, error))
                    return
                if cached is not None:
                    export.stats.at_once[_NAMES[command]] += 1
                    export.stats.bytes_read += length
                    outbox.add_all(nbd.reply_read(request.handle, offset, cached))
                    export.stats.observe(_NAMES[command], time.perf_counter() - started)
                    return
            self._reading += length
            self._run(request, Access.READ, (lambda: image.pread(offset, length),), started)
        elif command is _WRITE:
            data = request.data
            written = 0
            if not export.order.conflicts(Access.WRITE, offset, length):
                # What the kernel takes without waiting (XFS, btrfs) is written
                # here and now, like a cached read; the rest goes to a thread.
                try:
                    written = image.write_nowait(data, offset)
                except OSError as error:
                    self._wrote_here(request, _os_failure(request, error), started)
                    return
                if written == length:
                    export.stats.at_once[_NAMES[command]] += 1
                    self._wrote_here(request, None, started)
                    return
            rest = memoryview(data)[written:] if written else data
            self._writing += len(data)
            self._run(
                request, Access.WRITE, (lambda: image.pwrite(rest, offset + written),), started
            )
        elif command is _FLUSH:
            self._run(request, Access.FLUSH, (image.flush,), started)
        elif command is _TRIM:
            steps = [
                partial(image.punch_hole, at, n) for at, n in _zero_steps(offset, length)
            ]
            self._run(request, Access.WRITE, steps, started)
        elif command is _WRITE_ZEROES:
            flags = int(request.flags)
            may_trim = not flags & _NO_HOLE
            fast_only = bool(flags & _FAST_ZERO)
            steps = [
                partial(image.write_zeroes, at, n, may_trim=may_trim, fast_only=fast_only)
                for at, n in _zero_steps(offset, length)
            ]
            self._run(request, Access.WRITE, steps, started)
        elif command is _CACHE:
            fd = image.fileno()
            advise = partial(os.posix_fadvise, fd, offset, length, os.POSIX_FADV_WILLNEED)
            self._run(request, Access.READ, (advise,), started)
        elif command is _BLOCK_STATUS:
            most = 1 if request.flags & CommandFlag.REQ_ONE else MAX_EXTENTS_PER_REPLY
            extents = partial(image.extents, offset, length, most)
            self._run(request, Access.READ, (extents,), started)
        else:  # the parser only emits known commands; DISC is an event of its own
            self._fail(request, Errno.EINVAL, "unsupported command")

    def _refusal(self, export: Export, *, admitted: bool = False) -> tuple[Errno, str] | None:
        """Why nothing of this connection's may touch the image now (None: it may).

        A request ``admitted`` before a switchover's hold (one waiting in the
        export's order) still runs while clients are held: it is only
        refused once the node has no control at all.
        """
        lease = export.lease
        if lease is not None and not lease.may_write():
            return Errno.EIO, "the image's lease is lost: this node may not touch it"
        allowed = export.has_control if admitted else export.clients_allowed
        if not allowed and export.sender is not self:
            # Let go by a role that serves no one (stopped, or no control any
            # more): nothing is performed, and the client is told why.
            if export.state == RoleState.STOPPED:
                return Errno.ESHUTDOWN, "the server is shutting down"
            return Errno.EIO, f"this node is {export.state}: it has no control"
        return None

    def _run(
        self,
        request: Request,
        access: Access,
        steps: Sequence[Callable[[], object]],
        started: float,
    ) -> None:
        """Perform ``request`` on worker threads, in the export's order; answer when done.

        ``steps`` run one after the other, each on its own turn in the
        export's lane (a long zeroing lets the export's other requests
        through between its steps); the answer is built from the last
        one's result.  A write is reported to the export (the dirty map)
        once it has landed, before anything that waited for it starts; a
        FUA write is answered after a FLUSH of its own.
        """
        export = self._export
        assert export is not None
        order = export.order
        short = access is not Access.FLUSH
        self._in_flight += 1
        self._jobs += 1
        remaining = list(steps)
        job = Job(access, request.offset, request.length, lambda: step())

        def step() -> None:
            refusal = self._refusal(export, admitted=True)
            if refusal is not None:
                end(refusal)
                return
            d = self._server.run_blocking_for(export, remaining.pop(0), short=short)
            d.addCallbacks(stepped, failed)
            d.addErrback(self._internal_error, request)

        def stepped(result: object) -> None:
            if remaining:
                step()
            else:
                end(result)

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, ZeroingNotFast):
                end((Errno.ENOTSUP, "zeroing would not be fast"))
            elif isinstance(error, OSError):
                end(_os_failure(request, error))
            else:
                log.failure("{command} failed", failure, command=request.command.name)
                end((Errno.EIO, "internal error"))

        def end(result: object) -> None:
            if access is Access.WRITE:
                self._landed(request, result, started, job)
            else:
                order.finish(job)
                self._finished(request, result, started)

        if order.admit(job):
            step()

    def _wrote_here(self, request: Request, result: object, started: float) -> None:
        """A WRITE performed on the reactor thread: reported and answered as a thread's is."""
        self._in_flight += 1
        self._jobs += 1
        self._writing += len(request.data)
        self._landed(request, result, started)

    def _landed(
        self, request: Request, result: object, started: float, job: Job | None = None
    ) -> None:
        """A write ended with ``result``: the dirty map hears of it before anything waiting starts.

        Even a failed write may have changed part of its range.  In a
        write-blocking migration the reply waits for the destination too.
        """
        export = self._export
        assert export is not None
        landed = None if type(result) is tuple else request
        mirrored = export.note_write(request.offset, request.length, landed)
        if job is not None:
            export.order.finish(job)
        if mirrored is None:
            self._finished(request, result, started)
        else:
            mirrored.addCallback(lambda _: self._finished(request, result, started))
            mirrored.addErrback(self._internal_error, request)

    def _finished(self, request: Request, result: object, started: float) -> None:
        """A job of this connection ended with ``result`` (an (Errno, message) on failure)."""
        export, nbd, outbox = self._export, self._nbd, self._outbox
        assert export is not None and nbd is not None and outbox is not None
        command = request.command
        self._jobs -= 1
        if command is _READ:
            self._reading -= request.length
        elif command is _WRITE:
            self._writing -= len(request.data)
        if type(result) is tuple:
            error, message = result
            self._fail(request, error, message)
        elif command is not _FLUSH and int(request.flags) & _FUA:
            if command is _WRITE:
                export.stats.bytes_written += request.length
            self._later(request, started, export.image.flush)
        elif not self._lost:
            if command is _READ:
                export.stats.bytes_read += request.length
                outbox.add_all(nbd.reply_read(request.handle, request.offset, result))  # type: ignore[arg-type]
            elif command is _BLOCK_STATUS:
                outbox.add(self._block_status(request, result))  # type: ignore[arg-type]
            else:
                if command is _WRITE:
                    export.stats.bytes_written += request.length
                outbox.add(nbd.reply_ok(request.handle))
            export.stats.observe(_NAMES[command], time.perf_counter() - started)
        self._settle_thread_job(None)

    def _internal_error(self, failure: Failure, request: Request) -> None:
        """A bug in answering ``request``: logged whole; the connection goes, nothing hangs."""
        log.failure("answering {command}", failure, command=request.command.name)
        self._abort()

    def _commit(self, event: Commit) -> None:
        """The sender's commit (ferry's FERRY_CMD_COMMIT, or flexnbd's DISC): the receiver's."""
        export = self._export
        nbd = self._nbd
        assert export is not None and nbd is not None
        export.stats.requests["COMMIT"] += 1
        if export.sender is not self or export.state != RoleState.RECEIVING:
            if self._flexnbd:
                log.warn(
                    "{name}: flexnbd DISC in {state}: nothing to commit",
                    name=export.name,
                    state=export.state,
                )
                return
            export.stats.errors["EINVAL"] += 1
            self._send(
                nbd.reply_error(event.handle, Errno.EINVAL, f"nothing to commit: {export.state}")
            )
            return
        migration = nbd.migration
        source_resource = "" if migration is None else migration.resource
        answer = None if self._flexnbd else self._commit_answer(event.handle)
        receiver = self._server.receiver
        assert receiver is not None  # a server without one admits no sender
        self._in_flight += 1
        settled = receiver.commit(export, self, event.token, source_resource, answer)
        settled.addBoth(self._settle_thread_job)

    def _carried(self, event: CarriedConnection) -> None:
        """The sender carried one of its clients here: the receiver rebuilds it, and answers."""
        export = self._export
        nbd = self._nbd
        receiver = self._server.receiver
        assert export is not None and nbd is not None and receiver is not None
        export.stats.requests["CONNECTION"] += 1
        if export.sender is not self or export.state != RoleState.RECEIVING:
            export.stats.errors["EINVAL"] += 1
            why = f"no connection is taken in {export.state}"
            self._send(nbd.reply_error(event.handle, Errno.EINVAL, why))
            return
        handle = event.handle

        def answer(error: Errno, message: str) -> None:
            if self._lost or self._nbd is None:
                return
            if error is Errno.OK:
                self._send(self._nbd.reply_ok(handle))
            else:
                export.stats.errors[error.name] += 1
                self._send(self._nbd.reply_error(handle, error, message))
            self._flush_outbox()

        receiver.carried(self._server, export, event.state, answer)

    def _commit_answer(self, handle: int) -> CommitAnswer:
        """How the receiver answers this sender's commit: a reply; after a no, close."""

        def answer(error: Errno, message: str) -> None:
            export, nbd = self._export, self._nbd
            assert export is not None and nbd is not None
            if error is not Errno.OK:
                export.stats.errors[error.name] += 1
            if self._lost:
                return
            if error is Errno.OK:
                self._send(nbd.reply_ok(handle))
            else:
                self._send(nbd.reply_error(handle, error, message))
                self._close_after_replies()
            self._flush_outbox()

        return answer

    def _block_status(self, request: Request, found: list[StorageExtent]) -> bytes:
        assert self._nbd is not None
        extents = [
            Extent(e.length, BlockState.HOLE | BlockState.ZERO if e.hole else BlockState.DATA)
            for e in found
        ]
        return self._nbd.reply_block_status(request.handle, self._context_id, extents)

    def _fail(self, request: Request, error: Errno, message: str) -> None:
        assert self._nbd is not None and self._export is not None
        self._export.stats.errors[error.name] += 1
        self._export.stats.requests[request.command.name] += 1
        if not self._lost:
            self._send(self._nbd.reply_error(request.handle, error, message))

    def _send(self, reply: bytes) -> None:
        """Add ``reply`` to the batch; _dispatch or the caller flushes it."""
        assert self._outbox is not None
        self._outbox.add(reply)

    def _later(self, request: Request, started: float, work: Callable[[], None]) -> None:
        """Finish ``request`` on a worker thread (fsync): later requests go on meanwhile."""
        assert self._export is not None
        self._in_flight += 1
        d = self._server.run_blocking_for(self._export, work)

        def done(_: object) -> None:
            assert self._nbd is not None and self._export is not None
            self._export.stats.observe(request.command.name, time.perf_counter() - started)
            if not self._lost:
                self._send(self._nbd.reply_ok(request.handle))

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, OSError):
                self._fail(request, nbd_errno(error), os.strerror(error.errno or os_errno.EIO))
            else:
                log.failure("{command} failed", failure, command=request.command.name)
                self._fail(request, Errno.EIO, "internal error")

        d.addCallbacks(done, failed)
        d.addBoth(self._settle_thread_job)

    def _settle_thread_job(self, result: object) -> None:
        """A job on the worker thread has answered: send its reply, then go on.

        When other jobs' results are being delivered in the same batch,
        the sending waits for the end of it: their replies leave together.
        """
        self._in_flight -= 1
        if self._settling:
            return
        if at_end_of_turn(self._jobs_answered):
            self._settling = True
        else:
            self._jobs_answered()

    def _jobs_answered(self) -> None:
        self._settling = False
        self._flush_outbox()
        if self._in_flight == 0:
            self._fire_settled()
        self._dispatch()

    def _flush_outbox(self) -> None:
        """Send what the outbox holds; what the socket did not take counts against the budget."""
        outbox = self._outbox
        if outbox is None or self._lost:
            return
        if outbox.pending:
            self.last_active = self._server.clock.seconds()
        outbox.flush()
        self.account_replies()

    def account_replies(self) -> None:
        """Count the reply bytes this connection's transport still holds (REPLY_BUDGET)."""
        if self._outbox is not None and not self._lost:
            self._server.reply_budget.hold(self, self._outbox.held() + self._reading)

    # -- closing ------------------------------------------------------------------------

    def _maybe_close(self) -> None:
        if self._closing and not self._queue and self._in_flight == 0 and not self._lost:
            self._lose()

    def _lose(self) -> None:
        if self.transport is not None:
            if getattr(self.transport, "TLS", False):
                # Twisted's TLS layer sends its close_notify, and closes, only
                # once no producer is registered.
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fire_drained(self) -> None:
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def _fire_settled(self) -> None:
        settled, self._settled = self._settled, []
        for d in settled:
            d.callback(None)


def _tls_failure(reason: Failure | None) -> str:
    """One line for why a TLS handshake ended."""
    if reason is None or reason.value is None:
        return "the connection closed"
    return describe_error(reason.value)


def _zero_steps(offset: int, length: int) -> list[tuple[int, int]]:
    """A zeroing or trim of ``[offset, offset + length)`` as steps of at most ZERO_STEP."""
    if length <= ZERO_STEP:
        return [(offset, length)]
    end = offset + length
    return [(at, min(ZERO_STEP, end - at)) for at in range(offset, end, ZERO_STEP)]


def _os_failure(request: Request, error: OSError) -> tuple[Errno, str]:
    """What a client is told of a disk call that failed (and the log line that says so)."""
    log.warn(
        "{command} at {offset}+{length} failed: {error}",
        command=request.command.name,
        offset=request.offset,
        length=request.length,
        error=error,
    )
    return nbd_errno(error), os.strerror(error.errno or os_errno.EIO)


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return "UNKNOWN"


class Given(ServerFactory):
    """Builds exactly the protocol it was given: for ``adoptStreamConnection``."""

    def __init__(self, protocol: NBDServerProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Any:
        return self._protocol
