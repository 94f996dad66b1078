"""A scripted migration destination: a Twisted NBD server that misbehaves on cue.

Each connection follows one :class:`Script` (the factory takes a list: the
first connection gets the first script, and so on; the last one repeats),
so a test can say "fail on the third write, then behave" and watch the
source retry.  The handshake and transmission of a well-behaved connection
are :class:`ferry.nbd.server.ServerConnection`'s; the fake only adds what a
ferry listener adds (an answer to ``FERRY_OPT_MIGRATE``, and the commit,
which ``ServerConnection`` rejects as an unknown command and the fake
answers instead), and the broken behaviours, which are raw bytes.

Everything written is kept in :attr:`FakeDestination.disk`; WRITE_ZEROES
and TRIM zero it.  Tests wait on :attr:`FakeDestination.connected` and on
the source's own Deferreds, never on time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ferry.nbd.constants import (
    FERRY_CMD_COMMIT,
    FERRY_MIGRATE_REQUEST,
    FERRY_OPT_MIGRATE,
    IHAVEOPT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    Command,
    Errno,
    OptionReply,
)
from ferry.nbd.events import (
    Disconnect,
    ExportInfo,
    HandshakeAborted,
    ProtocolError,
    Refusal,
    RejectedRequest,
    Request,
)
from ferry.nbd.server import ServerConnection


class Hello(enum.Enum):
    """How the connection starts."""

    NORMAL = "normal"
    CLOSE_AT_ONCE = "close at once"  # accept, then close before any byte
    CLOSE_AFTER_HELLO = "close after hello"  # greeting, then close
    SILENT = "silent"  # accept, never say anything
    WRONG_MAGIC = "wrong magic"  # a greeting that is not NBD


class Migrate(enum.Enum):
    """The answer to FERRY_OPT_MIGRATE."""

    ACK = "ack"  # a ferry listener
    UNSUPPORTED = "unsupported"  # a plain NBD server
    REFUSE = "refuse"  # a ferry node that is not listening (ERR_POLICY)


class Commit(enum.Enum):
    ACK = "ack"
    REJECT = "reject"  # EPERM: it cannot take the lease (retrying will not change that)
    REFUSE = "refuse"  # EIO: it did not take control (the sync failed); worth a retry
    CLOSE = "close"  # close without an answer: the outcome is unknown
    HANG = "hang"  # never answer


@dataclass
class Script:
    """What one connection does; numbers count data-carrying requests (WRITE, WRITE_ZEROES)."""

    hello: Hello = Hello.NORMAL
    migrate: Migrate = Migrate.ACK
    size: int | None = None  # None: the destination's own size
    error_on_write: int | None = None  # answer EIO to this write (1 is the first)
    write_errno: Errno = Errno.EIO  # what error_on_write answers (ENOSPC: a full disk)
    hang_from_write: int | None = None  # never answer this write or any later request
    close_on_write: int | None = None  # close when this write arrives, before answering
    error_on_flush: int | None = None  # answer EIO to this FLUSH (1 is the first)
    hold_flush: int | None = None  # answer this FLUSH only on Session.release_flush()
    hold_write: int | None = None  # write this write at once, answer it on Session.release_write()
    commit: Commit = Commit.ACK
    # Called with the commit's token before it is answered: a destination
    # taking the lease over (a test wires it to a lockspace).
    take_lease: Callable[[int], object] | None = None


@dataclass
class Session:
    """What one connection saw, for assertions."""

    script: Script
    writes: int = 0
    write_lengths: list[int] = field(default_factory=list)  # of each WRITE, in order
    data_bytes: int = 0
    zero_bytes: int = 0
    commands: list[str] = field(default_factory=list)
    commit_token: int | None = None
    migrate_request: tuple[int, int] | None = None  # version, size
    source_resource: str = ""  # the lease the source named in FERRY_OPT_MIGRATE
    lost: Deferred[None] = field(default_factory=Deferred)
    hung: Deferred[str] = field(default_factory=Deferred)  # fires when it stops answering
    held_flush: Callable[[], None] | None = None  # answers the held FLUSH
    held_write: Callable[[], None] | None = None  # answers the held write
    _arrivals: list[tuple[str, int, Deferred[None]]] = field(default_factory=list)

    def arrived(self, command: str, count: int = 1) -> Deferred[None]:
        """Fires once ``count`` requests of ``command`` have arrived (at once if they have)."""
        d: Deferred[None] = Deferred()
        if self.commands.count(command) >= count:
            d.callback(None)
        else:
            self._arrivals.append((command, count, d))
        return d

    def release_flush(self) -> None:
        """Answer the FLUSH that ``Script.hold_flush`` keeps waiting."""
        release, self.held_flush = self.held_flush, None
        assert release is not None, "no FLUSH is held"
        release()

    def release_write(self) -> None:
        """Answer the write that ``Script.hold_write`` keeps waiting."""
        release, self.held_write = self.held_write, None
        assert release is not None, "no write is held"
        release()

    def note(self, command: str) -> None:
        self.commands.append(command)
        waiting, self._arrivals = self._arrivals, []
        for name, count, d in waiting:
            if self.commands.count(name) >= count:
                d.callback(None)
            else:
                self._arrivals.append((name, count, d))


class _Catalog:
    def __init__(self, size: int) -> None:
        self.size = size

    def lookup(self, name: str) -> ExportInfo | Refusal:
        return ExportInfo(name=name, size=self.size)

    def listing(self) -> Sequence[ExportInfo]:
        return [ExportInfo(name="", size=self.size)]


class _DestinationProtocol(Protocol):
    def __init__(self, factory: FakeDestination, session: Session) -> None:
        self.fake = factory
        self.session = session
        script = session.script
        self.server = ServerConnection(_Catalog(script.size or factory.size))
        self.preamble = b""  # handshake bytes not yet split into options
        self.flags_seen = False
        self.hung = False

    def connectionMade(self) -> None:
        hello = self.session.script.hello
        assert self.transport is not None
        if hello is Hello.CLOSE_AT_ONCE:
            self.transport.loseConnection()
        elif hello is Hello.WRONG_MAGIC:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(8))
        elif hello is Hello.NORMAL:
            self._send(self.server.data_to_send())
        elif hello is Hello.CLOSE_AFTER_HELLO:
            self._send(self.server.data_to_send())
            self.transport.loseConnection()
        self.fake.connected_count += 1
        waiters, self.fake._waiters = self.fake._waiters, []
        for d in waiters:
            d.callback(self.session)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session.lost.callback(None)

    def _send(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self.session.script.hello is not Hello.NORMAL or self.hung:
            return
        if not self.server.handshake_done:
            data = self._peel_options(data)
            if not data:
                return
        try:
            events = self.server.receive_data(data)
        except ProtocolError:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._send(self.server.data_to_send())
        for event in events:
            if self.hung or self.transport is None:
                return
            if isinstance(event, Request):
                self._request(event)
            elif isinstance(event, RejectedRequest):
                if event.command == FERRY_CMD_COMMIT:
                    self._commit(event)
                else:
                    self._send(self.server.reply_error(event.handle, event.error, event.reason))
            elif isinstance(event, (Disconnect, HandshakeAborted)):
                self.session.commands.append("DISC")
                self.transport.loseConnection()

    def _peel_options(self, data: bytes) -> bytes:
        """Answer FERRY_OPT_MIGRATE here; pass everything else to ServerConnection."""
        buf = self.preamble + data
        out = b""
        if not self.flags_seen:
            if len(buf) < 4:
                self.preamble = buf
                return b""
            out, buf = buf[:4], buf[4:]
            self.flags_seen = True
        while len(buf) >= OPTION_HEADER.size:
            magic, option, length = OPTION_HEADER.unpack_from(buf)
            end = OPTION_HEADER.size + length
            if magic != IHAVEOPT or option != FERRY_OPT_MIGRATE:
                break
            if len(buf) < end:
                self.preamble = out + buf  # wait for the whole option
                return b""
            payload = buf[OPTION_HEADER.size : end]
            buf = buf[end:]
            self._migrate_option(payload)
        self.preamble = b""
        return out + buf

    def _migrate_option(self, payload: bytes) -> None:
        version, size = FERRY_MIGRATE_REQUEST.unpack_from(payload)
        self.session.migrate_request = (version, size)
        self.session.source_resource = payload[FERRY_MIGRATE_REQUEST.size :].decode()
        answer = self.session.script.migrate
        if answer is Migrate.ACK:
            reply, message = OptionReply.ACK, b""
        elif answer is Migrate.UNSUPPORTED:
            reply, message = OptionReply.ERR_UNSUP, b"unknown option"
        else:
            reply, message = OptionReply.ERR_POLICY, b"not listening"
        header = OPTION_REPLY_HEADER.pack(
            OPTION_REPLY_MAGIC, FERRY_OPT_MIGRATE, reply, len(message)
        )
        self._send(header + message)

    def _request(self, request: Request) -> None:
        session, script, disk = self.session, self.session.script, self.fake.disk
        command = request.command
        session.note(command.name)
        if command in (Command.WRITE, Command.WRITE_ZEROES):
            session.writes += 1
            n = session.writes
            if n == script.close_on_write:
                self._hang(f"closed on write {n}")
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            if script.hang_from_write is not None and n >= script.hang_from_write:
                self._hang(f"hung on write {n}")
                return
            if n == script.error_on_write:
                error = script.write_errno
                self._send(self.server.reply_error(request.handle, error, "scripted failure"))
                return
        start, end = request.offset, request.offset + request.length
        if command is Command.WRITE:
            disk[start:end] = request.data
            session.data_bytes += request.length
            session.write_lengths.append(request.length)
        elif command in (Command.WRITE_ZEROES, Command.TRIM):
            disk[start:end] = bytes(request.length)
            session.zero_bytes += request.length
        elif command is Command.FLUSH and session.commands.count("FLUSH") == script.error_on_flush:
            self._send(self.server.reply_error(request.handle, Errno.EIO, "scripted flush failure"))
            return
        if command in (Command.WRITE, Command.WRITE_ZEROES) and session.writes == script.hold_write:
            reply = self.server.reply_ok(request.handle)
            session.held_write = lambda: self._send(reply)
            return
        if command is Command.FLUSH and session.commands.count("FLUSH") == script.hold_flush:
            reply = self.server.reply_ok(request.handle)
            session.held_flush = lambda: self._send(reply)
            return
        self._send(self.server.reply_ok(request.handle))

    def _commit(self, event: RejectedRequest) -> None:
        self.session.note("COMMIT")
        self.session.commit_token = event.offset
        if self.session.script.take_lease is not None:
            self.session.script.take_lease(event.offset)
        commit = self.session.script.commit
        if commit is Commit.ACK:
            self.fake.committed = True
            self._send(self.server.reply_ok(event.handle))
        elif commit is Commit.REJECT:
            self._send(self.server.reply_error(event.handle, Errno.EPERM, "no lease for you"))
        elif commit is Commit.REFUSE:
            self._send(self.server.reply_error(event.handle, Errno.EIO, "scripted sync failure"))
        elif commit is Commit.CLOSE:
            self._hang("closed on the commit")
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self._hang("hung on the commit")

    def _hang(self, why: str) -> None:
        self.hung = True
        self.session.hung.callback(why)


class FakeDestination(Factory):
    """Listens (the test binds it); one :class:`Session` per connection, scripted."""

    def __init__(self, size: int, scripts: Sequence[Script] = (Script(),)) -> None:
        if not scripts:
            raise ValueError("at least one script")
        self.size = size
        self.scripts = list(scripts)
        self.disk = bytearray(size)
        self.sessions: list[Session] = []
        self.connected_count = 0
        self.committed = False
        self._waiters: list[Deferred[Session]] = []

    def buildProtocol(self, addr: object) -> _DestinationProtocol:
        index = min(len(self.sessions), len(self.scripts) - 1)
        session = Session(self.scripts[index])
        self.sessions.append(session)
        return _DestinationProtocol(self, session)

    def next_connection(self) -> Deferred[Session]:
        """Fires with the next connection's session once it is made."""
        d: Deferred[Session] = Deferred()
        self._waiters.append(d)
        return d
