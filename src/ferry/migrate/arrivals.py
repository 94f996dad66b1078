"""The destination's side of moving client connections: rebuild each, hold it until the commit.

A sender that was told this node can take connections (``FERRY_OPT_CONNECTIONS``
answered by :meth:`Arrivals.landing`) carries each of its clients here in a
``FERRY_CMD_CONNECTION`` before it commits.  For each one, :meth:`Arrivals.carried`:

1. reads the checkpoint (:class:`~ferry.handoff.carried.CarriedConnection`),
   refusing one it cannot read (EINVAL) or a peer this node's ACL does not
   admit (EPERM);
2. rebuilds the NBD session first (pure code: a session that does not parse
   costs no socket), then the socket (``TCP_REPAIR``, bound with
   ``IP_FREEBIND`` so the service address need not be here yet), and hands it
   to the reactor as a connection that performs nothing yet;
3. answers OK, or EIO with the kernel's reason.

The rebuilt connections wait, unread and unanswered, for the export's role:

* ``committing -> serving`` (the commit landed, under the lease): first the
  service address is taken over (:class:`~ferry.migrate.service.ServiceAddressHolder`,
  when there is one), then each connection joins the export and its held
  requests are performed.  All of it happens before the commit is
  acknowledged, so the source never closes a socket nobody holds.
* any other way out of ``receiving`` / ``committing`` (the sender went away,
  the commit was refused): each one is closed in repair mode, without a
  packet.  Across hosts the source still holds its own socket and resumes
  it; on one host it could not keep it (one 4-tuple cannot exist twice in a
  namespace), and that client is lost, as it would have been before
  connections could move.

Nothing here ever fails the commit: a connection that cannot be rebuilt is
that client's loss alone.  The counts of the last handoff are the export's
``connections_moved`` and ``connections_aborted``.
"""

from __future__ import annotations

import contextlib
import socket

from twisted.internet.interfaces import IReactorSocket
from twisted.logger import Logger

from ferry.chartnames import RoleState
from ferry.faults import pause_point
from ferry.handoff import tcp_repair
from ferry.handoff.carried import CarriedConnection, CarriedFormatError
from ferry.handoff.errors import HandoffError
from ferry.migrate.carry import Carrier
from ferry.nbd.constants import Errno, OptionReply
from ferry.nbd.events import ConnectionLanding, Refusal
from ferry.nbd.server import ServerConnection
from ferry.nbd.session import SnapshotError
from ferry.serve.connection import (
    Arrival,
    CommitAnswer,
    ConnectionHost,
    Given,
    NBDServerProtocol,
)
from ferry.serve.export import RECEIVING_STATES, Export
from ferry.serve.stats import HandoffCounts

__all__ = ["Arrivals"]

_log = Logger()


class Arrivals:
    """Client connections carried to this node's listening exports; see the module doc.

    ``carrier`` says what this host can do and who it is (the same one the
    node's sources use).
    """

    def __init__(self, reactor: IReactorSocket, carrier: Carrier) -> None:
        self._reactor = reactor
        self._landing = carrier.landing()
        self._why_not = carrier.why_not or "this node does not take client connections"
        self._service = carrier.service
        self._waiting: dict[str, list[NBDServerProtocol]] = {}
        self._watched: set[str] = set()

    def landing(self) -> ConnectionLanding | Refusal:
        if self._landing is None:
            return Refusal(OptionReply.ERR_UNSUP, self._why_not)
        return self._landing

    # -- one connection ----------------------------------------------------------------

    def carried(
        self, host: ConnectionHost, export: Export, state: bytes, answer: CommitAnswer
    ) -> None:
        """Rebuild one client connection of ``export``'s sender and answer whether it was."""
        if self._landing is None:
            answer(Errno.ENOTSUP, self._why_not)
            return
        counts = self._watch(export)
        try:
            carried = CarriedConnection.from_bytes(state)
        except CarriedFormatError as error:
            self._lost(export, counts, answer, Errno.EINVAL, f"cannot read the connection: {error}")
            return
        peer = carried.socket.peer[0]
        if not host.acl.allows(peer):
            why = f"{peer} is not admitted by this node's ACL"
            self._lost(export, counts, answer, Errno.EPERM, why)
            return
        if not export.acl.allows(peer):
            why = f"{peer} is not admitted by the ACL of export {export.name!r}"
            self._lost(export, counts, answer, Errno.EPERM, why)
            return
        try:
            session, requests = ServerConnection.restore(carried.session, host)
        except SnapshotError as error:
            self._lost(export, counts, answer, Errno.EINVAL, f"cannot rebuild the session: {error}")
            return
        try:
            sock = tcp_repair.restore(carried.socket, freebind=True)
        except HandoffError as error:
            self._lost(export, counts, answer, Errno.EIO, f"cannot rebuild the socket: {error}")
            return
        context_id = next((i for i, _ in carried.session.meta_contexts), 0)
        protocol = NBDServerProtocol(
            host, arrival=Arrival(session, requests, context_id, carried.replies)
        )
        try:
            sock.setblocking(False)
            # Twisted takes a duplicate of the descriptor; ours goes.  The
            # socket lives on in the duplicate, so closing ours sends nothing.
            self._reactor.adoptStreamConnection(sock.fileno(), sock.family, Given(protocol))
        except OSError as error:
            _release(sock)
            why = f"cannot adopt the socket: {error.strerror}"
            self._lost(export, counts, answer, Errno.EIO, why)
            return
        finally:
            if sock.fileno() != -1:
                sock.close()
        self._waiting.setdefault(export.name, []).append(protocol)
        pause_point("restored")
        local, remote = carried.socket.local, carried.socket.peer
        _log.info(
            "{name}: rebuilt the connection {local[0]}:{local[1]} <- {peer[0]}:{peer[1]}; "
            "it waits for the commit",
            name=export.name,
            local=local,
            peer=remote,
        )
        answer(Errno.OK, "")

    def _lost(
        self, export: Export, counts: HandoffCounts, answer: CommitAnswer, error: Errno, why: str
    ) -> None:
        _log.warn("{name}: a carried connection is lost: {why}", name=export.name, why=why)
        counts.aborted += 1
        answer(error, why)

    # -- the commit decides ------------------------------------------------------------

    def _watch(self, export: Export) -> HandoffCounts:
        """The counts of this handoff; the first connection of one starts watching the role."""
        if export.name in self._watched and export.last_handoff is not None:
            return export.last_handoff
        self._watched.add(export.name)
        counts = export.last_handoff = HandoffCounts()

        def role_changed(trigger: str, source: str, dest: str) -> None:
            if source not in RECEIVING_STATES or dest in RECEIVING_STATES:
                return
            self._watched.discard(export.name)
            unobserve()
            waiting = self._waiting.pop(export.name, [])
            if dest == RoleState.SERVING:
                self._join(export, waiting, counts)
            else:
                self._send_back(waiting, counts, f"the image stays where it was ({dest})")

        unobserve = export.observe_role(role_changed)
        return counts

    def _join(
        self, export: Export, waiting: list[NBDServerProtocol], counts: HandoffCounts
    ) -> None:
        if self._service is not None:
            self._service.take()
        for protocol in waiting:
            protocol.join(export)
            if protocol.export_name is not None:
                counts.moved += 1
            else:
                counts.aborted += 1  # closed by its client while it waited
        if waiting:
            _log.info(
                "{name}: {n} moved client connection(s) joined the export",
                name=export.name,
                n=counts.moved,
            )

    def _send_back(self, waiting: list[NBDServerProtocol], counts: HandoffCounts, why: str) -> None:
        for protocol in waiting:
            with contextlib.suppress(OSError, HandoffError):
                tcp_repair.enter_repair(protocol.tcp_socket, "give back")
            protocol.moved(f"back: {why}")
            counts.aborted += 1


def _release(sock: socket.socket) -> None:
    with contextlib.suppress(OSError, HandoffError):
        tcp_repair.enter_repair(sock, "give back")
    tcp_repair.release(sock)
