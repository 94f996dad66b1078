"""One client connection: the NBD protocol driven by Twisted.

The byte-level protocol lives in :mod:`ferry.nbd.server`; this module only
moves bytes between it, the socket and the image.

Invariants:

* Every parsed request gets exactly one reply, unless the connection is lost.
* Requests are *performed* in the order they arrive; replies may complete
  out of order (a FLUSH or FUA write waits on a thread while later reads are
  answered).
* The connection is a push producer for its transport.  When the transport
  says "pause" (its write buffer is full), the connection stops reading from
  the socket *and* stops dispatching requests it has already parsed, so a
  client that pipelines reads without reading the replies cannot make the
  server buffer without bound (the reasoning of Twisted's
  ``HTTPChannel.pauseProducing``).
* Nothing a client sends can raise out of ``dataReceived``: a broken frame
  closes this connection and no other.
* Replies go through the connection's :class:`~ferry.serve.outbox.Outbox`:
  those of one batch of requests leave together (one ``sendmsg``, without a
  copy, when the transport holds nothing), and the outbox is flushed before
  control returns to the reactor -- at the end of ``_dispatch``, after a
  thread's result, after handshake output.

The migration sender (a connection whose ``FERRY_OPT_MIGRATE`` was
acknowledged, see ``ferry.serve.server``) is served like any client -- its
WRITE, WRITE_ZEROES and TRIM go to the image in order, out of range is
ENOSPC or EINVAL with its handle -- but it is the export's *sender*, not one
of its clients, and three things are its own:

* its handshake makes a listening export ``receiving`` (``sender_connected``);
  a sender announcing another image size is closed instead, after the GO
  reply that lets the source see the mismatch;
* its ``Commit``, performed in order after everything it sent before:
  role ``commit`` (-> committing), the fencing token recorded, fdatasync on
  the thread pool, then role ``committed`` (-> serving: control, clients
  allowed) and only then the OK reply, the two-phase commit's ack.  If the
  fsync fails the reply is EIO -- the source takes it as a definite no --
  the role goes back to ``listening`` (``sender_lost``) and the connection
  is closed: what was written cannot be trusted, so the next sender starts
  over.  A commit in any other state is EINVAL and changes nothing;
* its end, however it comes (lost, closed, refused, before or after any
  request, during the fsync) while ``receiving`` or ``committing``: role
  ``sender_lost`` (-> listening), and an fsync still running is never
  acknowledged.

A flexnbd sender (``ferry listen --oldstyle``) cannot say who it is in the
handshake: every oldstyle connection to a listening export is *mirror-only*
(``HandshakeComplete.flexnbd``; the parser answers anything but a write with
handle ``.MIRROR.`` or a FLUSH with EPERM), and the first one to send a
``.MIRROR.`` write while the export is listening becomes the sender
(``sender_connected``).  Another one's writes, while there is a sender or
once the export is no longer listening, are EPERM: a listening export never
takes writes from anyone but its one sender.  NBD_CMD_DISC from the sender
is flexnbd's "you have it all: take control", performed in order after its
writes: role ``commit``, fdatasync, role ``committed`` -- and no reply, as
flexnbd's listener sends none (the sender has usually closed its socket
already, so the commit, once begun, does not depend on this connection).
A failed fsync is ``sender_lost``.  A sender whose connection ends without
DISC is ``sender_lost``, as above.  DISC from a mirror-only connection that
is not the sender is only a disconnect.
"""

from __future__ import annotations

import errno as os_errno
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ferry.nbd.constants import FLEXNBD_MIRROR_HANDLE, BlockState, Command, CommandFlag, Errno
from ferry.nbd.events import (
    Commit,
    Disconnect,
    Event,
    Extent,
    HandshakeAborted,
    HandshakeComplete,
    ProtocolError,
    RejectedRequest,
    Request,
)
from ferry.nbd.server import ServerConnection
from ferry.serve.export import RECEIVING_STATES
from ferry.serve.outbox import Outbox, tune
from ferry.storage import ZeroingNotFast

if TYPE_CHECKING:
    from ferry.serve.export import Export
    from ferry.serve.server import NBDServer

log = Logger()

# Most extents one BLOCK_STATUS reply describes; a fragmented file could
# otherwise make one reply enormous.  Clients ask again from where it ends.
MAX_EXTENTS_PER_REPLY: Final = 1024

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


def nbd_errno(error: OSError) -> Errno:
    return _OS_TO_NBD.get(error.errno or 0, Errno.EIO)


RunBlocking = Callable[[Callable[[], object]], "defer.Deferred[Any]"]


@implementer(IPushProducer)
class NBDServerProtocol(Protocol):
    def __init__(self, server: NBDServer) -> None:
        self._server = server
        self._nbd: ServerConnection | None = None
        self._export: Export | None = None
        self._queue: deque[Request | RejectedRequest | Commit] = deque()
        self._outbox: Outbox | None = None
        self._paused = False
        self._in_flight = 0
        self._closing = False
        self._refused = False  # refused after GO: nothing more it sends is looked at
        self._lost = False
        self._drained: list[defer.Deferred[None]] = []
        self._handshake_timer: Any = None
        self._sender_timer: Any = None  # a sender's silence (SENDER_TIMEOUT)
        self._throttle_timer: Any = None  # a write waiting for the auto-converge cap
        self._write_charged = False  # the head write has already paid the cap
        self._held_since: float | None = None  # first request queued behind a hold
        self._context_id = 0
        self._flexnbd = False  # a mirror-only oldstyle connection: see the module doc
        # A commit past the point of no return (flexnbd's DISC; ferry's, once
        # fsynced and taking the lease) finishes even if the socket goes.
        self._commit_outlives_socket = False
        self.peer_host = ""

    # -- Twisted protocol -------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer_host = getattr(self.transport.getPeer(), "host", "")  # type: ignore[union-attr]
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
        self._nbd = ServerConnection(
            self._server,
            migration=self._server,
            locator=self._server,
            oldstyle=self._server.oldstyle,
        )
        # An oldstyle server has chosen its export before the client speaks.
        self._receive(b"")

    def dataReceived(self, data: bytes) -> None:
        self._receive(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
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
        export = self._export
        if export is not None and not self._commit_outlives_socket:
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

    # -- IPushProducer -----------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        if self.transport is not None and not self._closing:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._dispatch()

    def stopProducing(self) -> None:
        self._abort()

    # -- the control plane's handles -----------------------------------------------

    def disconnect(self, reason: str) -> None:
        """Close this client at once (ACL change, handoff, fencing)."""
        log.info("disconnecting {peer}: {reason}", peer=self.peer_host, reason=reason)
        self._abort()

    def _close_after_replies(self) -> None:
        """Read and perform nothing more; close once what is in flight is answered."""
        self._closing = True
        self._queue.clear()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

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
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._maybe_close()
        return d

    # -- receiving -------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        assert self._nbd is not None
        if self._refused:
            return
        if self._sender_timer is not None:
            self._sender_timer.reset(self._server.sender_timeout)
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
        for event in events:
            kind = type(event)
            if kind is Request or kind is RejectedRequest:
                self._queue.append(event)  # type: ignore[arg-type]
            elif kind is HandshakeComplete:
                if not self._handshake_complete(event):  # type: ignore[arg-type]
                    return  # refused and closing: what followed GO is not performed
            elif kind is Commit:
                self._queue.append(event)  # type: ignore[arg-type]
            elif kind is Disconnect:
                self._closing = True
            elif kind is HandshakeAborted:
                self._flush_handshake()
                self._lose()
                return
        self._dispatch()

    def _flush_handshake(self) -> None:
        if self._nbd is not None and self._outbox is not None:
            out = self._nbd.data_to_send()
            if out:
                self._outbox.add(out)
                self._outbox.flush()

    def _handshake_complete(self, event: HandshakeComplete) -> bool:
        """Attach to the chosen export; False if refused after all (the connection closes)."""
        self._cancel_handshake_timer()
        export = self._server.export_named(event.export.name)
        if event.migration is not None:
            return self._become_sender(export, event)
        if event.flexnbd:
            if export is None or export.state != "listening":
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
        self._context_id = next(iter(event.meta_contexts), 0)
        export.attach(self)
        return True

    def _become_sender(self, export: Export | None, event: HandshakeComplete) -> bool:
        assert event.migration is not None
        if export is None or export.state != "listening":
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
        if export is None or export.sender is not self or export.state != "receiving":
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
                    and export.state == "listening"
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
        while queue and not self._paused and not self._lost and self._throttle_timer is None:
            if export is not None and export.held:
                # A switchover holds client requests: queued, not failed.
                if self._held_since is None:
                    self._held_since = export.clock.seconds()
                break
            event = queue[0]
            if type(event) is Request:
                if (
                    event.command is _WRITE
                    and export is not None
                    and export.write_limiter is not None
                    and not self._write_charged
                ):
                    delay = export.write_limiter.reserve(event.length)
                    if delay > 0:
                        self._write_charged = True
                        self._throttle_timer = export.clock.call_later(delay, self._unthrottle)
                        break
                self._write_charged = False
                queue.popleft()
                self._perform(event)
            else:
                queue.popleft()
                if type(event) is Commit:
                    self._commit(event)
                else:
                    self._reject(event)  # type: ignore[arg-type]
        if self._outbox is not None and not self._lost:
            self._outbox.flush()
        self._maybe_close()

    def _unthrottle(self) -> None:
        self._throttle_timer = None
        self._dispatch()

    @property
    def held_since(self) -> float | None:
        return self._held_since

    def resume_dispatch(self) -> None:
        """The export released its hold: account for the wait, then go on."""
        if self._held_since is not None and self._export is not None:
            self._export.note_hold(self._export.clock.seconds() - self._held_since)
            self._held_since = None
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
        lease = export.lease
        if lease is not None and not lease.may_write():
            self._fail(request, Errno.EIO, "the image's lease is lost: this node may not touch it")
            return
        command = request.command
        fua = int(request.flags) & _FUA
        started = time.perf_counter()  # latency is observed, never used for decisions
        image = export.image
        try:
            if command is _READ:
                data = image.pread(request.offset, request.length)
                export.stats.bytes_read += request.length
                outbox.add_all(nbd.reply_read(request.handle, request.offset, data))
            elif command is _WRITE:
                image.pwrite(request.data, request.offset)
                export.stats.bytes_written += request.length
                export.note_write(request.offset, request.length)
                if fua:
                    self._later(request, started, image.flush)
                    return
                outbox.add(nbd.reply_ok(request.handle))
            elif command is _FLUSH:
                self._later(request, started, image.flush)
                return
            elif command is _TRIM:
                image.punch_hole(request.offset, request.length)
                export.note_write(request.offset, request.length)
                if fua:
                    self._later(request, started, image.flush)
                    return
                outbox.add(nbd.reply_ok(request.handle))
            elif command is _WRITE_ZEROES:
                flags = int(request.flags)
                image.write_zeroes(
                    request.offset,
                    request.length,
                    may_trim=not flags & _NO_HOLE,
                    fast_only=bool(flags & _FAST_ZERO),
                )
                export.note_write(request.offset, request.length)
                if fua:
                    self._later(request, started, image.flush)
                    return
                outbox.add(nbd.reply_ok(request.handle))
            elif command is _CACHE:
                os.posix_fadvise(
                    image.fileno(), request.offset, request.length, os.POSIX_FADV_WILLNEED
                )
                outbox.add(nbd.reply_ok(request.handle))
            elif command is _BLOCK_STATUS:
                outbox.add(self._block_status(request))
            else:  # the parser only emits known commands; DISC is an event of its own
                self._fail(request, Errno.EINVAL, "unsupported command")
                return
        except ZeroingNotFast:
            self._fail(request, Errno.ENOTSUP, "zeroing would not be fast")
            return
        except OSError as error:
            log.warn(
                "{command} at {offset}+{length} failed: {error}",
                command=command.name,
                offset=request.offset,
                length=request.length,
                error=error,
            )
            self._fail(request, nbd_errno(error), os.strerror(error.errno or os_errno.EIO))
            return
        export.stats.observe(_NAMES[command], time.perf_counter() - started)

    def _commit(self, event: Commit) -> None:
        """The sender's FERRY_CMD_COMMIT; see the module doc for what it promises."""
        if self._flexnbd:
            self._flexnbd_commit()
            return
        export = self._export
        nbd = self._nbd
        assert export is not None and nbd is not None
        export.stats.requests["COMMIT"] += 1
        if export.sender is not self or export.state != "receiving":
            export.stats.errors["EINVAL"] += 1
            self._send(
                nbd.reply_error(event.handle, Errno.EINVAL, f"nothing to commit: {export.state}")
            )
            return
        export.begin_commit(self, event.token)
        log.info(
            "{name}: commit from {peer} with token {token}; syncing",
            name=export.name,
            peer=self.peer_host,
            token=event.token,
        )
        self._in_flight += 1
        d = self._server.run_blocking(export.image.flush)

        def synced(_: object) -> None:
            if export.sender is not self or export.state != "committing":
                log.warn("{name}: commit abandoned: the sender went away", name=export.name)
                return
            # The image is durable; now the lease.  From here the commit no
            # longer depends on the socket: if we take the lease we serve,
            # ack or no ack (a source that lost the ack asks the lease).
            self._commit_outlives_socket = True
            self._in_flight += 1
            migration = nbd.migration
            source_resource = "" if migration is None else migration.resource
            taking = export.take_lease(event.token, source_resource)
            taking.addCallbacks(took, refused)
            taking.addBoth(settle)

        def took(_: object) -> None:
            export.committed(self)
            log.info("{name}: committed; serving with control", name=export.name)
            if not self._lost:
                self._send(nbd.reply_ok(event.handle))

        def refused(failure: Failure) -> None:
            why = failure.getErrorMessage()
            log.error(
                "{name}: commit refused: cannot take the lease: {why}", name=export.name, why=why
            )
            export.stats.errors["EPERM"] += 1
            export.sender_lost(self)
            if not self._lost:
                self._send(nbd.reply_error(event.handle, Errno.EPERM, f"lease: {why}"))
                self._close_after_replies()

        def settle(result: object) -> None:
            self._commit_outlives_socket = False
            self._settle_thread_job(result)

        def failed(failure: Failure) -> None:
            error = failure.value
            why = os.strerror(error.errno or os_errno.EIO) if isinstance(error, OSError) else ""
            log.error("{name}: commit failed, fsync: {why}", name=export.name, why=why or error)
            export.stats.errors["EIO"] += 1
            export.sender_lost(self)
            if not self._lost:
                self._send(nbd.reply_error(event.handle, Errno.EIO, f"fsync failed: {why}"))
                self._close_after_replies()

        d.addCallbacks(synced, failed)
        d.addBoth(self._settle_thread_job)

    def _flexnbd_commit(self) -> None:
        """The flexnbd sender's DISC: commit, fsync, take control; nothing is answered."""
        export = self._export
        assert export is not None
        export.stats.requests["COMMIT"] += 1
        if export.sender is not self or export.state != "receiving":
            log.warn(
                "{name}: flexnbd DISC in {state}: nothing to commit",
                name=export.name,
                state=export.state,
            )
            return
        export.begin_commit(self, 0)  # flexnbd has no fencing token
        self._commit_outlives_socket = True
        log.info(
            "{name}: flexnbd sender {peer} disconnected: taking control; syncing",
            name=export.name,
            peer=self.peer_host,
        )
        self._in_flight += 1
        d = self._server.run_blocking(export.image.flush)

        def synced(_: object) -> defer.Deferred[None] | None:
            if export.sender is not self or export.state != "committing":
                log.warn("{name}: commit abandoned", name=export.name)
                return None
            # flexnbd's source holds no ferry lease: take a fresh one, if
            # this node has a lockspace, before serving.
            return export.take_lease(0, "").addCallbacks(took, refused)

        def took(_: object) -> None:
            if export.committed(self):
                log.info("{name}: committed; serving with control", name=export.name)

        def refused(failure: Failure) -> None:
            log.error(
                "{name}: flexnbd handoff refused: cannot take the lease: {why}; "
                "nobody serves the image until an operator steps in",
                name=export.name,
                why=failure.getErrorMessage(),
            )
            export.sender_lost(self)

        def failed(failure: Failure) -> None:
            error = failure.value
            why = os.strerror(error.errno or os_errno.EIO) if isinstance(error, OSError) else ""
            log.error("{name}: commit failed, fsync: {why}", name=export.name, why=why or error)
            export.stats.errors["EIO"] += 1
            export.sender_lost(self)

        def settle(_: object) -> None:
            self._commit_outlives_socket = False
            self._in_flight -= 1
            self._maybe_close()

        d.addCallbacks(synced, failed)
        d.addBoth(settle)

    def _block_status(self, request: Request) -> bytes:
        assert self._nbd is not None and self._export is not None
        found = self._export.image.extents(request.offset, request.length)
        if request.flags & CommandFlag.REQ_ONE:
            found = found[:1]
        extents = [
            Extent(e.length, BlockState.HOLE | BlockState.ZERO if e.hole else BlockState.DATA)
            for e in found[:MAX_EXTENTS_PER_REPLY]
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
        self._in_flight += 1
        d = self._server.run_blocking(work)

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
        """A job on the worker thread has answered: send its reply now, maybe close."""
        self._in_flight -= 1
        if self._outbox is not None and not self._lost:
            self._outbox.flush()
        self._maybe_close()

    # -- closing ------------------------------------------------------------------------

    def _maybe_close(self) -> None:
        if self._closing and not self._queue and self._in_flight == 0 and not self._lost:
            self._lose()

    def _lose(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fire_drained(self) -> None:
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return "UNKNOWN"
