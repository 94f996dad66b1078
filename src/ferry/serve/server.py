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

Two ACLs decide who gets in.  The listener's (``ferry serve``'s ``ACL_ENTRY``
arguments and its ``acl`` command) is checked when a connection is
accepted: a peer it refuses is closed at once, as flexnbd does.  Each
export's own (a daemon's ``acl`` per export) is checked by name in the
handshake: every connection sees the catalogs through a
:class:`PeerCatalog` for its peer, in which an export whose ACL refuses
the peer is not listed, and asking for it is answered ERR_POLICY with the
reason.  Changing an export's ACL closes its clients the new one refuses.
A migration sender must be let in by both and named by one of them (or,
neither naming anyone, come from loopback: ``Acl.admits_sender``) --
unless TLS has verified its certificate (``--tls-verify-peer``): then the
certificate is the proof, and no ACL need name it.  With
``--tls-allowed-subjects`` only a certificate whose subject is listed may
send, and no sender without one.  A connection's catalogs refuse any other
with ERR_POLICY, and the reason.
NBD_OPT_LIST shows only the exports a client may use now: not one that is
listening for its migration, or that has lost control.

Each export's blocking jobs (every disk call of its requests, and its
migration's reads) reach the worker threads through a
:class:`~ferry.serve.lanes.Lane` of its own, so an export whose disk hangs
holds only its share of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ferry.chartnames import RoleState
from ferry.clock import Clock, DelayedCall, cancel_call
from ferry.nbd.constants import OptionReply, TLSMode
from ferry.nbd.events import ConnectionLanding, ExportInfo, MigrationRequest, Refusal
from ferry.nbd.locate import Location
from ferry.serve.acl import Acl, peer_host_of
from ferry.serve.connection import NBDServerProtocol, Receiver
from ferry.serve.export import RECEIVING_STATES, Export
from ferry.serve.lanes import Lane
from ferry.serve.limits import (
    DRAIN_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_CLIENTS,
    MAX_CONNECTIONS_PER_ADDRESS,
    RECEIVE_BUDGET,
    REPLY_BUDGET,
    REPLY_RECOUNT,
    SENDER_TIMEOUT,
    Budget,
)
from ferry.tls import ServerTLS

log = Logger()

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
        max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        sender_timeout: float = SENDER_TIMEOUT,
        receiver: Receiver | None = None,
        receive_budget: int = RECEIVE_BUDGET,
        reply_budget: int = REPLY_BUDGET,
        tls: ServerTLS | None = None,
    ) -> None:
        if oldstyle and tls is not None and tls.mode is not TLSMode.OFF:
            raise ValueError("oldstyle negotiation cannot use TLS")
        self.clock = clock
        self.run_blocking = run_blocking
        self.exports: dict[str, Export] = {}
        self._lanes: dict[str, Lane] = {}
        for export in exports:
            self.add_export(export)
        self.acl = acl or Acl()
        self.oldstyle = oldstyle
        # --tls, its certificates, and who may send a migration by certificate.
        self.tls = tls or ServerTLS(TLSMode.OFF)
        self.max_clients = max_clients
        self.max_per_address = max_per_address
        self.receive_budget = Budget(receive_budget)
        self.reply_budget = Budget(reply_budget)
        self._recount: DelayedCall | None = None
        self.handshake_timeout = handshake_timeout
        self.sender_timeout = sender_timeout
        # Who performs a sender's commit; without one, no migration is taken.
        self.receiver = receiver
        # In the order they opened (a dict, not a set): whatever is done to every
        # connection is done in the same order every time (ferry.sim replays it).
        self.connections: dict[NBDServerProtocol, None] = {}
        self.accepting = True

    # -- Factory ------------------------------------------------------------------

    def buildProtocol(self, addr: IAddress | None) -> NBDServerProtocol | None:
        if not self.accepting:
            return None
        host = "" if addr is None else peer_host_of(addr)
        if len(self.connections) >= self.max_clients and not self._make_room(host):
            log.warn("refusing {host}: {n} clients already", host=host, n=len(self.connections))
            return None
        protocol = NBDServerProtocol(self)
        same = sum(1 for c in self.connections if c.peer_host == host)
        if host and same >= self.max_per_address:
            # Answered in the handshake (ERR_POLICY, with this message), then closed.
            protocol.refusal = Refusal(
                OptionReply.ERR_POLICY,
                f"too many connections from {host}: {self.max_per_address} at most",
            )
        return protocol

    def room_for_replies(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more of replies fit the REPLY_BUDGET, counted afresh if need be.

        A transport that drained without pausing its connection tells
        nobody, so a full budget is counted again from the transports
        themselves before anyone is made to wait; while someone waits, it is
        counted again every ``REPLY_RECOUNT`` seconds.
        """
        budget = self.reply_budget
        if budget.fits(nbytes):
            return True
        self._recount_replies()
        if budget.fits(nbytes):
            return True
        if self._recount is None:
            self._recount = self.clock.call_later(REPLY_RECOUNT, self._recount_while_waiting)
        return False

    def _recount_replies(self) -> None:
        for connection in list(self.connections):
            connection.account_replies()

    def _recount_while_waiting(self) -> None:
        self._recount = None
        self._recount_replies()
        if self.reply_budget.pressed:
            self._recount = self.clock.call_later(REPLY_RECOUNT, self._recount_while_waiting)

    def _make_room(self, host: str) -> bool:
        """The server is full: close the longest-idle connection of its biggest holder.

        The address that holds the most connections gives one up -- unless
        that is the newcomer's own address, or none of its connections is
        idle (nothing queued, nothing in flight): then the newcomer is refused.
        """
        by_host: dict[str, list[NBDServerProtocol]] = {}
        for connection in self.connections:
            by_host.setdefault(connection.peer_host, []).append(connection)
        hog, theirs = max(by_host.items(), key=lambda item: len(item[1]))
        idle = [c for c in theirs if c.idle]
        if hog == host or not idle:
            return False
        victim = min(idle, key=lambda c: c.last_active)
        victim.disconnect(f"the server is full; {hog} holds the most connections")
        self.connections.pop(victim, None)
        return True

    # -- the exports it serves ------------------------------------------------------

    def add_export(self, export: Export) -> None:
        """Serve ``export`` by its name (the first one added is the default export too)."""
        if export.name in self.exports:
            raise ValueError(f"an export named {export.name!r} is served already")
        self.exports[export.name] = export
        self._lanes[export.name] = Lane(self.run_blocking)

    def remove_export(self, name: str) -> Export:
        """Stop handing ``name`` to new clients (see :meth:`drain_export` for its clients)."""
        # The lane stays while the export's clients drain: their last flushes use it.
        return self.exports.pop(name)

    def run_blocking_for(
        self, export: Export, work: Callable[[], object], *, short: bool = False
    ) -> defer.Deferred[Any]:
        """Run ``work`` on a worker thread in ``export``'s lane (see the module doc).

        ``short``: a data-plane read or write, which may share its turn with others.
        """
        lane = self._lanes.get(export.name)
        if lane is None:
            lane = self._lanes[export.name] = Lane(self.run_blocking)
        return lane(work, short=short)

    def forget_lane(self, name: str) -> None:
        """The export ``name`` is gone and drained: its lane goes too."""
        if name not in self.exports:
            self._lanes.pop(name, None)

    def catalog_for(self, peer_host: str, subject: x509.Name | None = None) -> PeerCatalog:
        """The catalogs as a client at ``peer_host`` sees them (see the module doc);
        ``subject`` names the certificate it showed, if TLS verified one."""
        return PeerCatalog(self, peer_host, subject)

    @property
    def default_export(self) -> Export | None:
        """What the empty name (and an oldstyle hello) reaches: the first export added."""
        return next(iter(self.exports.values()), None)

    def connection_opened(self, connection: NBDServerProtocol) -> None:
        self.connections[connection] = None

    def connection_closed(self, connection: NBDServerProtocol) -> None:
        self.connections.pop(connection, None)

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
            if state == RoleState.LISTENING:
                why = "is listening for a migration and accepts clients once it has control"
            elif state in RECEIVING_STATES:
                why = f"is {state} a migration and accepts clients once it has control"
            else:
                why = f"does not accept clients while {state}"
            return Refusal(OptionReply.ERR_POLICY, f"export {export.name!r} {why}")
        return export.info()

    def listing(self) -> Sequence[ExportInfo]:
        """The exports a client may use now: one that listens for its migration (or has
        lost control) is left out, as a client asking for it would be refused."""
        return [export.info() for export in self.exports.values() if export.clients_allowed]

    # -- MigrationCatalog ------------------------------------------------------------

    def admit_migration(
        self,
        request: MigrationRequest,
        *,
        peer_host: str | None = None,
        subject: x509.Name | None = None,
    ) -> Refusal | None:
        """Whether a sender may start a migration here (``peer_host``: the sender rule applies,
        ``subject``: of its verified certificate).

        The option names no export (GO does): any listening one will do,
        among those this sender may send into (:meth:`_sender_refusal`).
        """
        exports = list(self.exports.values())
        if peer_host is not None:
            named = self._sender_exports(peer_host, subject)
            if isinstance(named, Refusal):
                return named
            exports = named
        if not self.accepting:
            return Refusal(OptionReply.ERR_SHUTDOWN, "server is shutting down")
        if self.receiver is None:
            return Refusal(OptionReply.ERR_POLICY, "this server takes no migrations")
        listening = [export for export in exports if export.state == RoleState.LISTENING]
        for export in listening:
            incoming = export.incoming_lease
            why = None if incoming is None else incoming.refusal(request.resource)
            if why is None:
                return None
        if listening:
            return Refusal(OptionReply.ERR_POLICY, why or "")
        busy = [export for export in exports if export.state in RECEIVING_STATES]
        target = busy[0] if busy else self.default_export
        if target is None:
            return Refusal(OptionReply.ERR_UNKNOWN, "this server has no export")
        return _not_listening(target)

    def connection_landing(
        self, *, peer_host: str | None = None, subject: x509.Name | None = None
    ) -> ConnectionLanding | Refusal:
        """Whether a sender's client connections may come along (``peer_host``,
        ``subject``: the sender rule applies, as to its migration).

        Not into a node that requires TLS: a connection that moves is never
        TLS (``NBDServerProtocol.why_not_movable``), and this node must not
        serve a client in the clear.
        """
        if peer_host is not None:
            exports = self._sender_exports(peer_host, subject)
            if isinstance(exports, Refusal):
                return exports
        if self.receiver is None:
            return Refusal(OptionReply.ERR_POLICY, "this server takes no migrations")
        if self.tls.mode is TLSMode.REQUIRE:
            return Refusal(
                OptionReply.ERR_POLICY,
                "this node requires TLS, and a client connection that moves is never TLS",
            )
        return self.receiver.connection_landing()

    def _sender_exports(self, peer_host: str, subject: x509.Name | None) -> list[Export] | Refusal:
        """The exports a migration sender may send into (:meth:`_sender_refusal`), or why none.

        With no export, the listener's rule alone decides.
        """
        exports = list(self.exports.values())
        if not exports:
            why = self._sender_refusal(peer_host, subject, None)
            return [] if why is None else _sender_refused(peer_host, why)
        reasons = [(e, self._sender_refusal(peer_host, subject, e)) for e in exports]
        named = [export for export, why in reasons if why is None]
        if named:
            return named
        return _sender_refused(peer_host, next(why for _, why in reasons if why is not None))

    def _sender_refusal(
        self, peer_host: str, subject: x509.Name | None, export: Export | None
    ) -> str | None:
        """Why a sender at ``peer_host`` may not send into ``export`` (None: it may).

        ``subject`` is its certificate's, verified by TLS (``--tls-verify-peer``),
        or None.  ``--tls-allowed-subjects`` admits only the subjects it lists
        (``ServerTLS.sender_refusal``).  A sender so authenticated needs no ACL
        to name it, only the export's to let it in; any other must be named by
        an ACL (``Acl.admits_sender``).
        """
        why = self.tls.sender_refusal(subject)
        if why is not None:
            return why
        export_acl = None if export is None else export.acl
        if subject is not None:
            if export is None or export.acl.allows(peer_host):
                return None
            return f"export {export.name!r} does not admit {peer_host}"
        if self.acl.admits_sender(peer_host, export_acl):
            return None
        return f"{peer_host} may not send a migration here: its ACL does not name it"

    def lookup_sender(
        self, name: str, *, peer_host: str | None = None, subject: x509.Name | None = None
    ) -> ExportInfo | Refusal:
        """The export a flexnbd sender names, if it listens (``peer_host``, ``subject``: the
        sender rule applies)."""
        export = self.export_named(name)
        if peer_host is not None:
            why = self._sender_refusal(peer_host, subject, export)
            if why is not None:
                return _sender_refused(peer_host, why)
        if self.receiver is None:
            return Refusal(OptionReply.ERR_POLICY, "this server takes no migrations")
        if export is None:
            return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        if not self.accepting:
            return Refusal(OptionReply.ERR_SHUTDOWN, "server is shutting down")
        if export.state != RoleState.LISTENING:
            return _not_listening(export)
        return export.info()

    # -- Locator ---------------------------------------------------------------------

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        """``FERRY_OPT_LOCATE``: where a handed-off export went; here (empty) otherwise."""
        export = self.export_named(name)
        if export is None:
            return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        if export.state == RoleState.HANDED_OFF and export.handed_to is not None:
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

    def replace_export_acl(self, name: str, acl: Acl) -> int:
        """Give export ``name`` the ACL ``acl``; disconnect its clients it no longer admits."""
        export = self.exports[name]
        export.acl = acl
        refused = [
            c for c in self.connections if c.export_name == name and not acl.allows(c.peer_host)
        ]
        for connection in refused:
            connection.disconnect(f"no longer allowed by the ACL of export {name!r}")
        return len(refused)

    def drain(self) -> defer.Deferred[Any]:
        """Stop admitting clients and let every connection finish what it received."""
        self.accepting = False
        return self._drain(list(self.connections))

    def drain_export(self, name: str) -> defer.Deferred[Any]:
        """Let the connections to export ``name`` finish what they received, then close."""
        return self._drain([c for c in list(self.connections) if c.export_name == name])

    def _drain(self, connections: list[NBDServerProtocol]) -> defer.Deferred[Any]:
        """Drain ``connections``; those not done within DRAIN_TIMEOUT are closed.

        A client that takes none of its replies cannot be drained: it would
        hold up the node's shutdown (or an export's removal) for ever.
        """
        drained = defer.DeferredList([c.drain() for c in connections])
        timer = self.clock.call_later(DRAIN_TIMEOUT, self._abort_undrained, connections)

        def done(result: object) -> object:
            cancel_call(timer)
            return result

        return drained.addBoth(done)

    def _abort_undrained(self, connections: list[NBDServerProtocol]) -> None:
        for connection in connections:
            if connection in self.connections:
                connection.disconnect(f"not drained within {DRAIN_TIMEOUT:g} s")


class PeerCatalog:
    """The export and migration catalogs as one peer sees them: its exports' ACLs applied.

    An export whose ACL refuses the peer is left out of the list and
    refused by name with ERR_POLICY; everything else is the server's answer.
    """

    def __init__(self, server: NBDServer, peer_host: str, subject: x509.Name | None = None) -> None:
        self._server = server
        self._peer_host = peer_host
        self._subject = subject  # of its certificate, once TLS has verified one

    def _refused(self, name: str) -> Refusal | None:
        export = self._server.export_named(name)
        if export is None or export.acl.allows(self._peer_host):
            return None
        return Refusal(
            OptionReply.ERR_POLICY,
            f"export {export.name!r} does not admit {self._peer_host or 'this client'}",
        )

    # -- ExportCatalog --------------------------------------------------------------

    def lookup(self, name: str) -> ExportInfo | Refusal:
        return self._refused(name) or self._server.lookup(name)

    def listing(self) -> Sequence[ExportInfo]:
        return [
            info
            for info in self._server.listing()
            if self._server.exports[info.name].acl.allows(self._peer_host)
        ]

    # -- MigrationCatalog ------------------------------------------------------------

    def admit_migration(self, request: MigrationRequest) -> Refusal | None:
        return self._server.admit_migration(
            request, peer_host=self._peer_host, subject=self._subject
        )

    def lookup_sender(self, name: str) -> ExportInfo | Refusal:
        return self._refused(name) or self._server.lookup_sender(
            name, peer_host=self._peer_host, subject=self._subject
        )

    def connection_landing(self) -> ConnectionLanding | Refusal:
        return self._server.connection_landing(peer_host=self._peer_host, subject=self._subject)

    # -- Locator ---------------------------------------------------------------------

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        return self._refused(name) or self._server.locate(name)


def _sender_refused(peer_host: str, why: str) -> Refusal:
    """A sender at ``peer_host`` may not hand this node an image, for reason ``why``."""
    log.warn("refused {peer} as a migration sender: {why}", peer=peer_host, why=why)
    return Refusal(OptionReply.ERR_POLICY, why)


def _not_listening(export: Export) -> Refusal:
    """Why ``export`` takes no migration sender now."""
    if export.state in RECEIVING_STATES:
        return Refusal(OptionReply.ERR_POLICY, "a migration is already being received")
    return Refusal(
        OptionReply.ERR_POLICY,
        f"export {export.name!r} is {export.state}: it is not listening for a migration",
    )
