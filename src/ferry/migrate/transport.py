"""How the migration stream reaches its destination: TCP, a Unix socket, or a command's stdio.

The source's :data:`~ferry.migrate.wire.Connector` is given a
:class:`~ferry.migrate.options.Destination` and a factory; whatever the
transport, the one :class:`~ferry.migrate.wire.MirrorProtocol` it builds
gets a transport to write to and read from, so the negotiation, the passes,
the two-phase commit and the lease's hand-over are the same code on each.

* TCP: :func:`~ferry.migrate.wire.tcp_connector`.
* ``unix:PATH``: Twisted's Unix client endpoint, after
  :func:`check_socket_path` (no symlink of someone else's is followed).
* ``exec:COMMAND``: the command is started (found on ``PATH``, no shell),
  the stream goes to its stdin and comes from its stdout; its stderr is
  ours, so an ``ssh`` error or a remote ferry's log reaches the operator.
  Giving the connection up closes the command's stdin and stdout, but never
  kills it: after a commit whose answer was lost the command may own the
  image now, and a destination that had not committed ends by itself
  (``ferry listen --stdio`` exits when its stdin closes before the
  migration completed).
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.python.failure import Failure

from ferry.migrate.options import Destination
from ferry.migrate.wire import Connector, tcp_connector
from ferry.safepath import UnsafePath

__all__ = ["CommandAddress", "check_socket_path", "connector"]


def connector(reactor: Any) -> Connector:
    """The real :data:`~ferry.migrate.wire.Connector`, for every kind of destination."""
    tcp = tcp_connector(reactor)

    def connect(destination: Destination, factory: Factory, timeout: float) -> Deferred[Any]:
        if destination.path is not None:
            check_socket_path(destination.path)
            endpoint = UNIXClientEndpoint(reactor, destination.path, timeout=timeout)  # type: ignore[no-untyped-call]
            connecting: Deferred[Any] = endpoint.connect(factory)  # type: ignore[no-untyped-call]
            return connecting
        if destination.command:
            return _spawn(reactor, destination.command, factory)
        return tcp(destination, factory, timeout)

    return connect


def check_socket_path(path: str) -> None:
    """Refuse to connect to ``path`` through a symlink someone else owns, or to a non-socket.

    A symlink of this user's (or root's) is followed, as it is ours; one of
    anyone else's could point the migration's stream, and so the image, at
    a socket of their choosing.  Raises :class:`~ferry.safepath.UnsafePath`
    or ``OSError`` (a missing path: ``FileNotFoundError``).
    """
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) and info.st_uid not in (os.geteuid(), 0):
        raise UnsafePath(
            f"unix:{path} is a symbolic link of uid {info.st_uid}'s: refusing to follow it"
        )
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(f"unix:{path} is not a socket")


class CommandAddress(UNIXAddress):
    """The peer of an ``exec:`` stream: the command (``str`` shows it)."""

    def __init__(self, command: tuple[str, ...]) -> None:
        super().__init__(None)
        self.command = command

    def __str__(self) -> str:
        return "exec:" + " ".join(self.command)


def _spawn(reactor: Any, command: tuple[str, ...], factory: Factory) -> Deferred[Any]:
    """Start ``command`` with its stdin and stdout as the stream; fire with the protocol."""
    executable = shutil.which(command[0])
    if executable is None:
        return fail(OSError(f"exec: {command[0]}: command not found"))
    address = CommandAddress(command)
    protocol = factory.buildProtocol(address)
    if protocol is None:
        return fail(OSError("exec: the connection was refused"))
    stream = _CommandStream(protocol, address)
    try:
        reactor.spawnProcess(
            stream, executable, list(command), env=dict(os.environ), childFDs={0: "w", 1: "r", 2: 2}
        )
    except OSError as error:
        return fail(OSError(f"exec: {command[0]}: {error.strerror or error}"))
    return succeed(protocol)


def _failure(error: Exception) -> Failure:
    return Failure(error)  # type: ignore[no-untyped-call]


class _CommandStream(ProcessProtocol):
    """A child process as one connection: its stdout in, its stdin out."""

    def __init__(self, protocol: Any, peer: CommandAddress) -> None:
        self.protocol = protocol
        self.peer = peer
        self.lost = False
        self.closing = False  # loseConnection: gone once stdin is flushed and closed

    def connectionMade(self) -> None:
        self.protocol.makeConnection(_CommandTransport(self))

    def outReceived(self, data: bytes) -> None:
        if not self.lost:
            self.protocol.dataReceived(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            self._lose(_failure(ConnectionDone("the command closed its stdout")))
        elif childFD == 0 and self.closing:
            # As a socket's close: our side is gone once what we wrote is out,
            # whatever the command does next (a listener with the image serves on).
            assert self.transport is not None
            self.transport.closeStdout()
            self._lose(_failure(ConnectionDone("the stream was closed")))

    def processEnded(self, reason: Failure) -> None:
        self._lose(_failure(ConnectionLost(f"the command ended: {reason.getErrorMessage()}")))

    def _lose(self, reason: Failure) -> None:
        if self.lost:
            return
        self.lost = True
        self.protocol.connectionLost(reason)


class _CommandTransport:
    """What :class:`~ferry.migrate.wire.MirrorProtocol` writes to: the command's stdin."""

    def __init__(self, stream: _CommandStream) -> None:
        self._stream = stream
        assert stream.transport is not None
        self._process: Any = stream.transport

    def write(self, data: bytes) -> None:
        self._process.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._process.writeSequence(data)

    def loseConnection(self) -> None:
        """Close the command's stdin once the bytes are out, then its stdout: the stream is
        closed (the command ends, or serves on)."""
        self._stream.closing = True
        self._process.closeStdin()

    def abortConnection(self) -> None:
        """Give the stream up now: stdin and stdout closed, the command not killed."""
        self._process.closeStdin()
        self._process.closeStdout()
        self._stream._lose(_failure(ConnectionLost("the stream was given up")))

    def getPeer(self) -> CommandAddress:
        return self._stream.peer

    def getHost(self) -> CommandAddress:
        return self._stream.peer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._process.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._process.unregisterProducer()
