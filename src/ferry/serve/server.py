"""The NBD listener: admits connections and tells the handshake what it may offer.

``NBDServer`` is the Twisted factory and the export catalog the sans-IO
handshake consults.  The catalog refuses an export whose role does not
admit clients (a listener waiting for a migration, an export being handed
off) with an NBD error *and a message*, so a client sees why, instead of a
bare disconnect.

It is also the locator (``ferry.nbd.server.Locator``): once an export has
been handed off, ``FERRY_OPT_LOCATE`` answers where it went, so a ``ferry
proxy`` that lost this server finds the new one without an operator.

And it is the migration catalog (``ferry.nbd.server.MigrationCatalog``):
``FERRY_OPT_MIGRATE`` is acknowledged while an export is ``listening``, and
the acknowledged connection then finds that export although it refuses
ordinary clients.  One sender at a time: once a sender's handshake has made
the export ``receiving``, every other sender is refused with ERR_POLICY ("a
migration is already being received") at the option, or at GO if it was
acknowledged before.  (Both happen on the reactor thread, and the first
sender's ``HandshakeComplete`` is handled in the same call that looked the
export up for it, so two senders can never both get through GO.)

The image size is *not* checked here: the sender's GO is answered with this
export's size, and a source that finds a different one says so in flexnbd's
words ("Remote size does not match local size"); the connection then closes
without ever becoming the sender (see ``NBDServerProtocol``).

A flexnbd source (``ferry listen --oldstyle``) has an oldstyle hello, so no
option can say "I am the sender": the handshake looks the default export up
through ``lookup_sender`` when ``lookup`` refuses it, and the connection is
mirror-only (see ``ferry.nbd.server`` and ``ferry.serve.connection``): the
first to send a write whose handle is ``FLEXNBD_MIRROR_HANDLE`` becomes the
sender, and its NBD_CMD_DISC is the commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ferry.clock import Clock
from ferry.nbd.constants import OptionReply
from ferry.nbd.events import ExportInfo, MigrationRequest, Refusal
from ferry.nbd.locate import Location
from ferry.serve.acl import Acl
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import RECEIVING_STATES, Export

log = Logger()

# A client has this long to finish the handshake: a connection that never
# negotiates would otherwise hold a client slot forever.
HANDSHAKE_TIMEOUT: Final = 10.0
# A migration sender that sends nothing for this long while the export is
# receiving is closed, and the export listens again: otherwise a source that
# hung (or a peer that only pretends to be one) keeps the export receiving,
# refusing every other sender, forever.  A source is never silent this long:
# it paces its requests to at most a second's worth of its rate limit.
SENDER_TIMEOUT: Final = 120.0
# Connections (handshaking or transmitting) admitted at once; more are closed
# as soon as they are accepted.
MAX_CLIENTS: Final = 256

RunBlocking = Callable[[Callable[[], object]], "defer.Deferred[Any]"]


class NBDServer(Factory):
    protocol = NBDServerProtocol

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        clock: Clock,
        run_blocking: RunBlocking,
        acl: Acl | None = None,
        oldstyle: bool = False,
        max_clients: int = MAX_CLIENTS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        sender_timeout: float = SENDER_TIMEOUT,
    ) -> None:
        if not exports:
            raise ValueError("a server needs at least one export")
        self.exports = {export.name: export for export in exports}
        self.default_export = exports[0]
        self.clock = clock
        self.run_blocking = run_blocking
        self.acl = acl or Acl()
        self.oldstyle = oldstyle
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.sender_timeout = sender_timeout
        self.connections: set[NBDServerProtocol] = set()
        self.accepting = True

    # -- Factory ------------------------------------------------------------------

    def buildProtocol(self, addr: IAddress | None) -> NBDServerProtocol | None:
        if not self.accepting:
            return None
        if len(self.connections) >= self.max_clients:
            log.warn("refusing a connection: {n} clients already", n=len(self.connections))
            return None
        return NBDServerProtocol(self)

    def connection_opened(self, connection: NBDServerProtocol) -> None:
        self.connections.add(connection)

    def connection_closed(self, connection: NBDServerProtocol) -> None:
        self.connections.discard(connection)

    # -- ExportCatalog ------------------------------------------------------------

    def export_named(self, name: str) -> Export | None:
        if name == "":
            return self.default_export
        return self.exports.get(name)

    def lookup(self, name: str) -> ExportInfo | Refusal:
        export = self.export_named(name)
        if export is None:
            return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        if not self.accepting:
            return Refusal(OptionReply.ERR_SHUTDOWN, "server is shutting down")
        if not export.clients_allowed:
            state = export.state
            if state == "listening":
                why = "is listening for a migration and accepts clients once it has control"
            elif state in RECEIVING_STATES:
                why = f"is {state} a migration and accepts clients once it has control"
            else:
                why = f"does not accept clients while {state}"
            return Refusal(OptionReply.ERR_POLICY, f"export {export.name!r} {why}")
        return export.info()

    def listing(self) -> Sequence[ExportInfo]:
        return [export.info() for export in self.exports.values()]

    # -- MigrationCatalog ------------------------------------------------------------

    def admit_migration(self, request: MigrationRequest) -> Refusal | None:
        if not self.accepting:
            return Refusal(OptionReply.ERR_SHUTDOWN, "server is shutting down")
        # The option names no export (GO does): any listening one will do here.
        exports = list(self.exports.values())
        listening = [export for export in exports if export.state == "listening"]
        for export in listening:
            incoming = export.incoming_lease
            why = None if incoming is None else incoming.refusal(request.resource)
            if why is None:
                return None
        if listening:
            return Refusal(OptionReply.ERR_POLICY, why or "")
        busy = [export for export in exports if export.state in RECEIVING_STATES]
        return _not_listening(busy[0] if busy else self.default_export)

    def lookup_sender(self, name: str) -> ExportInfo | Refusal:
        export = self.export_named(name)
        if export is None:
            return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        if not self.accepting:
            return Refusal(OptionReply.ERR_SHUTDOWN, "server is shutting down")
        if export.state != "listening":
            return _not_listening(export)
        return export.info()

    # -- Locator ---------------------------------------------------------------------

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        """``FERRY_OPT_LOCATE``: where a handed-off export went; here (empty) otherwise."""
        export = self.export_named(name)
        if export is None:
            return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        if export.state == "handed_off" and export.handed_to is not None:
            return [export.handed_to]
        return []

    # -- the control plane's handles -------------------------------------------------

    def replace_acl(self, acl: Acl) -> int:
        """Install ``acl`` and disconnect every client it no longer admits."""
        self.acl = acl
        refused = [c for c in self.connections if not acl.allows(c.peer_host)]
        for connection in refused:
            connection.disconnect("no longer allowed by the ACL")
        return len(refused)

    def drain(self) -> defer.Deferred[Any]:
        """Stop admitting clients and let every connection finish what it received."""
        self.accepting = False
        return defer.DeferredList([c.drain() for c in list(self.connections)])


def _not_listening(export: Export) -> Refusal:
    """Why ``export`` takes no migration sender now."""
    if export.state in RECEIVING_STATES:
        return Refusal(OptionReply.ERR_POLICY, "a migration is already being received")
    return Refusal(
        OptionReply.ERR_POLICY,
        f"export {export.name!r} is {export.state}: it is not listening for a migration",
    )
