"""The migration stream's connection: ferry's sans-IO NBD client on a Twisted transport.

:class:`MirrorProtocol` only moves bytes: what the destination sends goes
into a :class:`ferry.nbd.client.ClientConnection`, the events it completes
go to a :class:`WireHandler`, and whatever the connection queued (option
requests, requests, the ABORT of a failed handshake) is written through an
:class:`ferry.outbox.Outbox`, the data plane's scatter-gather sender,
so a 4 MiB WRITE is never joined or concatenated in user space.  Requests
queued while the handler deals with a batch of replies go out together when
the batch is done (one ``sendmsg`` for a dirty pass's many small WRITEs);
a request made at any other time (a timer, the first request of a pass) goes
out at once.  Timeouts, the job and every decision live in
:mod:`ferry.migrate.source`.

The source asks for ``FERRY_OPT_MIGRATE`` (payload: protocol version and
image size) before anything else; a ferry listener answers ACK, any other
NBD server ERR_UNSUP.  A node with TLS certificates (``tls``) asks for
NBD_OPT_STARTTLS even before that and goes no further without it: the
destination's ACK is the last byte in the clear, the protocol then starts
TLS on the transport as the client (this node's certificate, the
destination checked against the CA and the address dialled), and the
handshake goes on encrypted.  In flexnbd mode it asks nothing (a flexnbd listener's
hello is oldstyle) and every request carries the handle ``.MIRROR.``, so
only one may be unanswered at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTCP
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ferry.migrate.options import Destination
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import (
    FERRY_MAX_RESOURCE,
    FERRY_MIGRATE_REQUEST,
    FERRY_MIGRATE_VERSION,
    FERRY_OPT_CONNECTIONS,
    FERRY_OPT_MIGRATE,
    FLEXNBD_MIRROR_HANDLE,
    Command,
    CommandFlag,
)
from ferry.nbd.events import Event, ProtocolError, StartTLS
from ferry.outbox import Outbox, tune
from ferry.tls import describe_error

__all__ = [
    "Connector",
    "MirrorProtocol",
    "MirrorProtocolFactory",
    "TLSForHost",
    "WireHandler",
    "migrate_option",
    "tcp_connector",
]

_NO_FLAGS = CommandFlag(0)

TLSForHost = Callable[[str], IOpenSSLClientConnectionCreator]
"""The TLS client settings for a destination host (``Credentials.client_creator``)."""


def migrate_option(size: int, resource: str = "") -> tuple[int, bytes]:
    """The ``FERRY_OPT_MIGRATE`` option for an image of ``size`` bytes under lease ``resource``."""
    name = resource.encode()
    if len(name) > FERRY_MAX_RESOURCE:
        raise ValueError(f"lease name of {len(name)} bytes; at most {FERRY_MAX_RESOURCE}")
    return FERRY_OPT_MIGRATE, FERRY_MIGRATE_REQUEST.pack(FERRY_MIGRATE_VERSION, size) + name


class WireHandler(TypingProtocol):
    """Who hears what happens on one migration connection."""

    def wire_connected(self, wire: MirrorProtocol) -> None: ...

    def wire_events(self, wire: MirrorProtocol, events: list[Event]) -> None: ...

    def wire_broken(self, wire: MirrorProtocol, reason: str) -> None:
        """The destination broke the protocol; the connection is being closed."""
        ...

    def wire_lost(self, wire: MirrorProtocol, reason: str) -> None:
        """The connection is gone (however it went); called once, last."""
        ...


class MirrorProtocol(Protocol):
    """One connection to the destination; see the module doc."""

    def __init__(
        self,
        handler: WireHandler,
        client: ClientConnection,
        fixed_handle: int | None = None,
        tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self.handler = handler
        self.client = client
        self._tls = tls
        # flexnbd's stream: every request carries this one handle.
        self.fixed_handle = fixed_handle
        self.closing = False
        self.closed: Deferred[None] = Deferred()  # fires once the connection is gone
        self._outbox: Outbox | None = None
        self._receiving = False  # requests wait for the end of the batch

    def connectionMade(self) -> None:
        # Small requests (FLUSH, the commit) must not wait for Nagle.
        tune(self.transport)
        self._outbox = Outbox(self.transport)
        self.handler.wire_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            events = self.client.receive_data(data)
        except ProtocolError as exc:
            self._broken(str(exc))
            return
        if events and type(events[-1]) is StartTLS:  # nothing follows it
            events.pop()
            self._start_tls()
        if events:
            self._receiving = True
            try:
                self.handler.wire_events(self, events)
            finally:
                self._receiving = False
        self.flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.closing:
            # A clean end of stream with nothing in flight is CLOSED for the
            # client; anything else is a ProtocolError.  Either way the
            # handler decides what the loss means.
            try:
                events = self.client.receive_data(b"")
            except ProtocolError:
                events = []
            if events:
                self.handler.wire_events(self, events)
        self.closing = True
        # OpenSSL's errors are lists of (library, function, reason): keep the reasons.
        why = reason.getErrorMessage() if reason.value is None else describe_error(reason.value)
        self.handler.wire_lost(self, why)
        self.closed.callback(None)

    def _start_tls(self) -> None:
        """STARTTLS was acknowledged: TLS from here on, as the client."""
        assert self._tls is not None and self.transport is not None
        self.transport.startTLS(self._tls)  # type: ignore[attr-defined]
        self.client.tls_started()

    def _broken(self, reason: str) -> None:
        self.handler.wire_broken(self, reason)
        self.abort()

    # -- what the source sends ----------------------------------------------------

    def flush(self) -> None:
        out = self.client.buffers_to_send()
        outbox = self._outbox
        if out and outbox is not None and not self.closing:
            outbox.add_all(out)
            outbox.flush()

    def request(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        data: bytes = b"",
        flags: CommandFlag = _NO_FLAGS,
    ) -> int:
        handle = self.client.request(
            command, offset, length, data=data, flags=flags, handle=self.fixed_handle
        )
        if not self._receiving:
            self.flush()
        return handle

    def commit(self, token: int) -> int:
        handle = self.client.commit(token)
        self.flush()
        return handle

    def carry(self, state: bytes) -> int:
        """One client connection's checkpoint, queued: the commit that follows flushes it."""
        return self.client.carry(state)

    def disconnect(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close once the bytes are out."""
        if self.closing or self.transport is None:
            return
        with contextlib.suppress(RuntimeError):  # not in transmission: just close
            self.client.request(Command.DISC, handle=self.fixed_handle)
        self.flush()
        self.closing = True
        self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes and all."""
        if self.transport is None:
            return
        self.closing = True
        self.transport.abortConnection()  # type: ignore[attr-defined]


class MirrorProtocolFactory(Factory):
    """Builds the one :class:`MirrorProtocol` of an attempt."""

    def __init__(
        self,
        handler: WireHandler,
        size: int,
        export_name: str = "",
        *,
        flexnbd: bool = False,
        resource: str = "",
        tls: IOpenSSLClientConnectionCreator | None = None,
        carries: bool = False,
    ) -> None:
        self.handler = handler
        self.tls = tls
        self.size = size
        self.export_name = export_name
        self.flexnbd = flexnbd
        self.resource = resource
        # Ask the listener whether it takes client connections (FERRY_OPT_CONNECTIONS).
        self.carries = carries

    def buildProtocol(self, addr: object) -> MirrorProtocol:
        tls = self.tls is not None
        if self.flexnbd:
            # With TLS this fails at flexnbd's oldstyle hello, as it must: no plaintext.
            client = ClientConnection(self.export_name, meta_contexts=(), tls=tls)
            protocol = MirrorProtocol(self.handler, client, FLEXNBD_MIRROR_HANDLE, self.tls)
        else:
            options = [migrate_option(self.size, self.resource)]
            if self.carries:
                options.append((FERRY_OPT_CONNECTIONS, b""))
            client = ClientConnection(
                self.export_name, meta_contexts=(), extra_options=options, tls=tls
            )
            protocol = MirrorProtocol(self.handler, client, tls=self.tls)
        protocol.factory = self
        return protocol


Connector = Callable[[Destination, Factory, float], "Deferred[Any]"]
"""Connects ``factory`` to the destination within a timeout; fires with the protocol."""


def tcp_connector(reactor: IReactorTCP) -> Connector:
    """The real :data:`Connector`: TCP to a name or address, from ``bind`` if given."""

    def connect(destination: Destination, factory: Factory, timeout: float) -> Deferred[Any]:
        bind = None if destination.bind is None else (destination.bind, 0)
        endpoint = HostnameEndpoint(
            reactor, destination.host, destination.port, timeout=timeout, bindAddress=bind
        )
        connecting: Deferred[Any] = endpoint.connect(factory)
        return connecting

    return connect
