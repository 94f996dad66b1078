"""The source's side of moving client connections with the image.

At the commit the switchover asks a :class:`Carriage` to take the export's
client connections along: each has a machine of its own
(``statecharts/connection.yaml``; its comments give the steps and why they
come in that order), and each that can move is frozen, checkpointed and
carried to the destination in a ``FERRY_CMD_CONNECTION`` just before the
commit.  What happens then follows the commit:

* it landed (:meth:`Carriage.handed_over`): every connection the destination
  rebuilt is released (its socket closed in repair mode, no packet), every
  other client is disconnected, as all were before connections could move;
* it did not (:meth:`Carriage.taken_back`): every connection whose socket
  this node still holds is resumed and served again; one whose socket is
  already gone (on one host it had to go before the destination could
  rebuild it) is lost.

Whether a connection can move is the connection's to say
(``why_not_movable``: a FLUSH still running, TLS, half-closed) and the
destination's: it must have said it takes connections
(``FERRY_OPT_CONNECTIONS``), and unless it shares this node's network stack
it must take over the address the client talks to (``--service-address``
on both sides, the same IP).  A connection never fails or delays the
image's handoff: every step that goes wrong for one connection is that
connection's abort, and the commit goes whatever becomes of them.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ferry import statecharts
from ferry.chartnames import ConnectionState, ConnectionTrigger
from ferry.clock import Clock
from ferry.handoff import tcp_repair
from ferry.handoff.capability import can_move_connections
from ferry.handoff.carried import CarriedConnection
from ferry.handoff.errors import HandoffError
from ferry.handoff.freeze import Flow, Freezer
from ferry.handoff.host import network_identity
from ferry.migrate.gate import ClientGate
from ferry.migrate.service import ServiceAddressHolder
from ferry.nbd.events import ConnectionLanding, Reply
from ferry.nbd.session import SnapshotError
from ferry.serve.export import Attached
from ferry.serve.stats import HandoffCounts

if TYPE_CHECKING:
    from ferry.migrate.wire import MirrorProtocol
    from ferry.trace import Tracer

__all__ = ["Carriage", "Carrier"]

_log = Logger()


@dataclass
class Carrier:
    """What this node needs to move connections, made once at start.

    ``freezer`` is None when this host cannot move connections at all
    (``why_not`` says why: the status field ``can_move_connections``);
    ``identity`` is :func:`ferry.handoff.host.network_identity`.
    """

    identity: str
    freezer: Freezer | None = None
    why_not: str = ""
    service: ServiceAddressHolder | None = None

    @property
    def can_move(self) -> bool:
        return self.freezer is not None

    @classmethod
    def open(cls, service: ServiceAddressHolder | None = None) -> Carrier:
        """Probe this host once (:func:`~ferry.handoff.capability.can_move_connections`)
        and open the freeze table ahead of any switchover."""
        identity = network_identity()
        able, why = can_move_connections()
        if not able:
            _log.info("client connections cannot move from or to this host: {why}", why=why)
            return cls(identity, None, why, service)
        try:
            freezer = Freezer()
        except HandoffError as error:
            return cls(identity, None, str(error), service)
        return cls(identity, freezer, "", service)

    def landing(self) -> ConnectionLanding | None:
        """What this node tells a sender that asks (None: it takes no connections)."""
        if not self.can_move:
            return None
        service = "" if self.service is None else str(self.service.address)
        return ConnectionLanding(self.identity, service)

    def close(self) -> None:
        if self.freezer is not None:
            self.freezer.close()
        if self.service is not None:
            self.service.close()


class _Move:
    """One client connection at a handoff: the model its connection machine drives."""

    state: str

    def __init__(self, client: Attached) -> None:
        self.client = client
        self.flow: Flow | None = None
        self.handle: int | None = None
        self.socket_kept = False  # this node still holds the (repaired) socket
        self.why = ""

    def fire(self, trigger: ConnectionTrigger) -> None:
        getattr(self, trigger)()


@dataclass
class Carriage:
    """The client connections of one export at one commit; see the module doc."""

    name: str
    gate: ClientGate
    carrier: Carrier | None
    landing: ConnectionLanding | None
    clock: Clock
    tracer: Tracer | None = None
    moves: list[_Move] = field(default_factory=list)
    counts: HandoffCounts = field(default_factory=HandoffCounts)
    address_moves: bool = False

    def __post_init__(self) -> None:
        chart = statecharts.load("connection")
        for client in self.gate.clients:
            move = _Move(client)
            statecharts.build(
                chart,
                move,
                instance=f"{self.name}/{_name(client)}",
                tracer=self.tracer,
                clock=self.clock,
            )
            self.moves.append(move)

    # -- before the commit ------------------------------------------------------------

    def send(self, wire: MirrorProtocol) -> None:
        """Freeze, checkpoint and carry every client that can move; the commit goes next."""
        carrier, landing = self.carrier, self.landing
        if carrier is None or carrier.freezer is None or landing is None or not self.moves:
            return
        same_stack = landing.host == carrier.identity
        movable = [move for move in self.moves if self._movable(move, landing, same_stack)]
        if not movable:
            return
        for move in movable:
            move.client.suspend()
        try:
            flows = [Flow.of_socket(move.client.tcp_socket) for move in movable]
            carrier.freezer.freeze(*flows)
        except (OSError, HandoffError) as error:
            _log.error("cannot freeze the client connections: {error}", error=error)
            for move in movable:
                move.client.resume_after_move()
            return
        for move, flow in zip(movable, flows, strict=True):
            move.flow = flow
            move.fire(ConnectionTrigger.FREEZE)
        for move in movable:
            self._checkpoint(move, wire, same_stack)
        carried = [move for move in movable if move.state == ConnectionState.SENT]
        # The destination takes the address at the commit; this node lets it go
        # once the outcome is known (handed_over), not before: the clients that
        # do not move must still hear their goodbye from it.
        self.address_moves = bool(carried) and not same_stack
        if carried:
            _log.info(
                "{name}: carrying {n} of {total} client connection(s) to the destination",
                name=self.name,
                n=len(carried),
                total=len(self.moves),
            )

    def _movable(self, move: _Move, landing: ConnectionLanding, same_stack: bool) -> bool:
        why = move.client.why_not_movable()
        if why is None and not same_stack:
            why = _address_does_not_move(move.client, landing)
        if why is not None:
            move.why = why
            _log.info(
                "{name}: {peer} cannot move: {why}",
                name=self.name,
                peer=move.client.peer_host,
                why=why,
            )
            return False
        return True

    def _checkpoint(self, move: _Move, wire: MirrorProtocol, same_stack: bool) -> None:
        client = move.client
        sock = client.tcp_socket
        try:
            state = tcp_repair.checkpoint(sock)
            carried = CarriedConnection(state, client.session_snapshot(), client.unsent())
            blob = carried.to_bytes()
        except (HandoffError, SnapshotError, OSError) as error:
            move.why = f"cannot checkpoint it: {error}"
            _log.warn("{name}: {why}", name=self.name, why=move.why)
            self._resume(move)
            return
        move.fire(ConnectionTrigger.CHECKPOINT)
        if same_stack:
            # One 4-tuple cannot exist twice in a namespace: ours goes first,
            # in repair mode, so the client hears nothing.
            tcp_repair.release(sock)
            client.moved("to the destination")
        else:
            move.socket_kept = True
        move.handle = wire.carry(blob)
        move.fire(ConnectionTrigger.SEND)

    # -- the destination's answers -----------------------------------------------------

    def owns(self, handle: int) -> bool:
        return any(move.handle == handle for move in self.moves)

    def answered(self, reply: Reply) -> None:
        """The destination rebuilt a connection, or could not."""
        move = next(m for m in self.moves if m.handle == reply.handle)
        move.handle = None
        if move.state != ConnectionState.SENT:
            return
        if not reply.error:
            move.fire(ConnectionTrigger.RESTORED)
            return
        move.why = f"the destination could not rebuild it: {reply.error.name} {reply.message}"
        _log.warn("{name}: {why}", name=self.name, why=move.why)
        if not move.socket_kept:
            self._abort(move)  # gone from here, not there: lost

    # -- the commit decided ------------------------------------------------------------

    def handed_over(self, destination: str) -> None:
        """The destination has the image: release what moved, disconnect the rest."""
        for move in self.moves:
            if move.state == ConnectionState.RESTORED:
                if move.socket_kept:
                    tcp_repair.release(move.client.tcp_socket)
                    move.client.moved(f"to {destination}")
                move.fire(ConnectionTrigger.RELEASE)
                self.counts.moved += 1
            elif move.state != ConnectionState.ABORTED:
                if move.socket_kept:
                    # Out of repair mode, so the goodbye is heard; nothing held is
                    # performed here any more.
                    self._resume(move, serve=False)
                self._abort(move)
        # Every client still here could not move: held requests dropped, disconnected
        # while this node still has their address, so the goodbye reaches them.
        self.gate.disconnect_all(f"the image was handed over to {destination}")
        carrier = self.carrier
        if self.address_moves and carrier is not None and carrier.service is not None:
            # Before the unfreeze: a moved client's packet that still reaches
            # this host finds no address here, rather than a reset.
            carrier.service.give_up()
        self._unfreeze()
        self._log_counts()

    def taken_back(self) -> None:
        """The image stays here: resume what this node still holds; the rest is lost."""
        for move in self.moves:
            if move.state in (ConnectionState.ESTABLISHED, ConnectionState.ABORTED):
                continue
            if move.socket_kept:
                self._resume(move)
            else:
                self._abort(move)  # gone from here, not kept there: lost
        self._unfreeze()

    @property
    def pending(self) -> bool:
        """Some connection is still between its two sockets."""
        chart = statecharts.load("connection")
        return any(chart.property(move.state, "moving") for move in self.moves)

    # -- one connection's end ---------------------------------------------------------

    def _resume(self, move: _Move, *, serve: bool = True) -> None:
        client = move.client
        with contextlib.suppress(OSError, HandoffError):
            tcp_repair.resume(client.tcp_socket)
        move.socket_kept = False
        self._unfreeze(move)
        if serve:
            client.resume_after_move()
        if move.state != ConnectionState.ESTABLISHED:
            move.fire(ConnectionTrigger.RESUME)

    def _abort(self, move: _Move) -> None:
        move.fire(ConnectionTrigger.ABORT)
        self.counts.aborted += 1

    def _unfreeze(self, move: _Move | None = None) -> None:
        carrier = self.carrier
        if carrier is None or carrier.freezer is None:
            return
        flows = [m.flow for m in ([move] if move else self.moves) if m.flow is not None]
        try:
            carrier.freezer.unfreeze(*flows)
        except HandoffError as error:
            _log.error("cannot unfreeze client connections: {error}", error=error)
        for m in [move] if move else self.moves:
            m.flow = None

    def _log_counts(self) -> None:
        if self.moves:
            _log.info(
                "{name}: {moved} client connection(s) moved, {aborted} disconnected",
                name=self.name,
                moved=self.counts.moved,
                aborted=self.counts.aborted,
            )


def _name(client: Attached) -> str:
    try:
        host, port = client.tcp_socket.getpeername()[:2]
    except (OSError, AttributeError, AssertionError):
        return client.peer_host or "client"
    return f"{host}:{port}"


def _address_does_not_move(client: Attached, landing: ConnectionLanding) -> str | None:
    """Across hosts a connection moves only if its local address moves with the image."""
    if not landing.service_address:
        return "the destination is another host and takes over no service address"
    destination_ip = landing.service_address.partition("/")[0]
    try:
        local = ipaddress.ip_address(client.tcp_socket.getsockname()[0])
        if local == ipaddress.ip_address(destination_ip):
            return None
    except (OSError, ValueError) as error:
        return f"its address cannot be compared with the service address: {error}"
    return (
        f"it talks to {local}, and the destination takes over {landing.service_address}, "
        "not that address"
    )
