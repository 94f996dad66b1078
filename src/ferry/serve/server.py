"""The NBD listener: admits connections and tells the handshake what it may offer.

``NBDServer`` is the Twisted factory and the export catalog the sans-IO
handshake consults.  The catalog refuses an export whose role does not
admit clients (a listener waiting for a migration, an export being handed
off) with an NBD error *and a message*, so a client sees why, instead of a
bare disconnect.
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
from ferry.nbd.events import ExportInfo, Refusal
from ferry.serve.acl import Acl
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export

log = Logger()

# A client has this long to finish the handshake: a connection that never
# negotiates would otherwise hold a client slot forever.
HANDSHAKE_TIMEOUT: Final = 10.0
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
            return Refusal(
                OptionReply.ERR_POLICY,
                f"export {export.name!r} does not accept clients while {export.state}",
            )
        return export.info()

    def listing(self) -> Sequence[ExportInfo]:
        return [export.info() for export in self.exports.values()]

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
