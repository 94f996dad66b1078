"""An export: one image served under one name, and the role it plays.

The export owns the role machine (``statecharts/role.yaml``).  Whether the
export has control of the image, and whether it admits new clients, are
properties of the role state written in that YAML, never flags kept beside
it, so the status line, the handshake and the trace cannot disagree.

The data plane asks the role too: while the role's state has
``clients_held`` (a switchover), client requests are queued, not performed,
and their connections stop reading; the export lets them go on whatever
transition leaves such a state (served again, EIO from a fenced node, or
the clients handed on with the image).  No flag beside the chart says so.

On the listening side (``trigger("listen")``) the export also knows its one
migration *sender*: the connection whose handshake made it ``receiving``.
Only that connection moves it on (``commit``, ``committed``), and only its
end (lost, refused, a failed fsync) sends it back to ``listening`` --
a stale callback of an earlier sender finds it is no longer the sender and
changes nothing.  Once a commit is past the point where the sender's
socket matters (the image synced, the lease being taken; flexnbd's DISC at
once), the commit itself takes the sender's place (:meth:`Export.detach_commit`):
the connection's end no longer touches the role, and only the commit's
owner may finish it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from twisted.internet import defer

from ferry import statecharts
from ferry.chartnames import RoleState, RoleTrigger
from ferry.clock import Clock
from ferry.nbd.constants import MAX_REQUEST_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE
from ferry.nbd.events import ExportInfo
from ferry.nbd.locate import Location
from ferry.nbd.session import SessionSnapshot
from ferry.ratelimit import RateLimiter
from ferry.serve.acl import Acl
from ferry.serve.ordering import RequestOrder
from ferry.serve.stats import HandoffCounts, RequestStats
from ferry.status import StatusSnapshot
from ferry.storage import Image

if TYPE_CHECKING:
    from ferry.nbd.events import Request
    from ferry.trace import Tracer

WriteObserver = Callable[[int, int], None]
WriteGate = Callable[[int, int, "Request | None"], "defer.Deferred[None] | None"]
"""Called with ``(offset, length, request)`` once a client write has landed (``request``
None: it failed, and may have changed part of its range).  A Deferred holds the
write's reply until it fires (a write-blocking migration's mirrored write);
None lets the reply go at once."""
RoleObserver = Callable[[str, str, str], None]
"""Called with ``(trigger, source, dest)`` after every role transition."""


class Attached(Protocol):
    """A client connection in transmission with this export."""

    def disconnect(self, reason: str) -> None: ...

    @property
    def held_since(self) -> float | None:
        """When this client's first request was queued behind a hold (None: none is)."""
        ...

    def resume_dispatch(self) -> None:
        """Dispatch what was queued while the export held client requests."""
        ...

    def hold_reading(self) -> None:
        """Stop reading from the socket while the export holds client requests."""
        ...

    # Moving to another node with the image (``ferry.migrate.carry``; see
    # ``ferry.serve.connection`` for what each does).

    @property
    def peer_host(self) -> str: ...

    @property
    def tcp_socket(self) -> socket.socket: ...

    def why_not_movable(self) -> str | None: ...

    def suspend(self) -> None: ...

    def session_snapshot(self) -> SessionSnapshot: ...

    def unsent(self) -> bytes: ...

    def resume_after_move(self) -> None: ...

    def moved(self, where: str) -> None: ...

    # Passing to a new process on this host (``ferry.takeover``).

    def settled(self) -> defer.Deferred[None]: ...

    def handed_on(self, where: str) -> None: ...


class LeaseView(Protocol):
    """What an export needs of the lease on its image (``ferry.lease.LeaseManager`` is one)."""

    @property
    def state(self) -> str: ...

    @property
    def token(self) -> int | None: ...

    def may_write(self) -> bool:
        """False once the lease is lost or past its local deadline: touch nothing."""
        ...


class IncomingLease(LeaseView, Protocol):
    """A listening export's lease-to-be (``ferry.lease.incoming.IncomingLease`` is one)."""

    def refusal(self, source_resource: str) -> str | None:
        """Why a source holding ``source_resource`` may not migrate here (None: it may)."""
        ...

    def take_over(self, source_resource: str, token: int) -> defer.Deferred[Any]:
        """Take the source's lease by the commit's token; fires with the lease now held."""
        ...

    def give_back(self) -> None:
        """A commit that took the lease was refused after all: let it go (the next takes it)."""
        ...


#: The role states in which a migration sender is writing the image here.
RECEIVING_STATES: Final = frozenset({RoleState.RECEIVING, RoleState.COMMITTING})


class DetachedCommit:
    """Stands in the sender's place for a commit that no longer depends on its socket."""

    def __repr__(self) -> str:
        return "<DetachedCommit>"


class Role:
    """The model the role machine drives; ``transitions`` adds ``state`` and the triggers."""

    state: str


class Export:
    def __init__(
        self,
        name: str,
        image: Image,
        *,
        clock: Clock,
        tracer: Tracer | None = None,
        description: str = "",
    ) -> None:
        self.name = name
        self.image = image
        self.description = description
        self.stats = RequestStats()
        self.role = Role()
        self._chart = statecharts.load("role")
        self._role_observers: list[RoleObserver] = []
        statecharts.build(
            self._chart,
            self.role,
            instance=name,
            tracer=tracer,
            clock=clock,
            on_change=self._role_changed,
        )
        self._clients: dict[Attached, None] = {}  # in the order they came: see NBDServer
        # The requests in flight on worker threads, over every connection,
        # and the order they must keep (``ferry.serve.ordering``).
        self.order = RequestOrder()
        self._write_observers: list[WriteObserver] = []
        self._write_gate: WriteGate | None = None
        self._clock = clock
        self._longest_hold = 0.0
        self.write_limiter: RateLimiter | None = None
        # The migration sender (a connection), or the commit that took its
        # place (DetachedCommit); None while listening or serving.
        self._sender: object | None = None
        # The lease this export's I/O runs under, once it holds one: the data
        # plane asks ``may_write`` before every request it performs, so a
        # node whose lease lapsed (a process paused past its TTL, say) stops
        # at its very next request, before any timer has run.
        self.lease: LeaseView | None = None
        # A listening export's lease (``listen --lockspace``): a commit takes
        # it over by the source's token before it is acknowledged.
        self.incoming_lease: IncomingLease | None = None
        # Where the image went, once handed off: FERRY_OPT_LOCATE answers it.
        self.handed_to: Location | None = None
        # Who may reach this export by name, beside the listener's own ACL
        # (which decides who may connect at all): a daemon's exports each
        # have one; ``ferry serve``'s admits everyone its listener admits.
        self.acl = Acl()
        # The client connections of the last handoff, either way (None: none yet).
        self.last_handoff: HandoffCounts | None = None

    # -- role ---------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.role.state

    def trigger(self, event: RoleTrigger) -> None:
        """Fire a role event; an illegal one raises ``transitions.MachineError``."""
        machine_model: Any = self.role
        machine_model.trigger(event)

    def can(self, event: RoleTrigger) -> bool:
        """Whether ``event`` is legal in the role's state now."""
        return self._chart.next_state(self.state, event) is not None

    @property
    def has_control(self) -> bool:
        return bool(self._chart.property(self.state, "has_control"))

    @property
    def clients_allowed(self) -> bool:
        return bool(self._chart.property(self.state, "clients_allowed"))

    @property
    def role_chart(self) -> statecharts.Statechart:
        """The role's chart, for what a state means (``has_control``, ``clients_held``...)."""
        return self._chart

    @property
    def clients_held(self) -> bool:
        """A switchover holds client requests: queue them, perform nothing, read nothing."""
        return bool(self._chart.property(self.state, "clients_held"))

    def observe_role(self, observer: RoleObserver) -> Callable[[], None]:
        """Call ``observer(trigger, source, dest)`` after each role transition; returns the undo."""
        self._role_observers.append(observer)
        return lambda: self._role_observers.remove(observer)

    def _role_changed(self, trigger: str, source: str, dest: str) -> None:
        held = self._chart.property(source, "clients_held")
        holds = self._chart.property(dest, "clients_held")
        if holds and not held:
            for client in list(self._clients):
                client.hold_reading()
        elif held and not holds:
            for client in list(self._clients):
                client.resume_dispatch()
        for observer in list(self._role_observers):
            observer(trigger, source, dest)

    # -- what the handshake tells clients -------------------------------------

    @property
    def read_only(self) -> bool:
        return self.image.read_only

    def info(self) -> ExportInfo:
        return ExportInfo(
            name=self.name,
            size=self.image.size,
            read_only=self.image.read_only,
            description=self.description,
            min_block_size=MIN_BLOCK_SIZE,
            preferred_block_size=PREFERRED_BLOCK_SIZE,
            max_block_size=MAX_REQUEST_SIZE,
        )

    # -- clients --------------------------------------------------------------

    def attach(self, client: Attached) -> None:
        self._clients[client] = None
        self.stats.connections += 1

    def detach(self, client: Attached) -> None:
        """``client``'s connection is gone; if it was the sender, its migration is over."""
        self._clients.pop(client, None)
        if client is self._sender:
            self.sender_lost(client)

    @property
    def num_clients(self) -> int:
        return len(self._clients)

    @property
    def clients(self) -> list[Attached]:
        """The client connections in transmission, in no particular order."""
        return list(self._clients)

    def disconnect_all(self, reason: str) -> None:
        for client in list(self._clients):
            client.disconnect(reason)

    # -- the listening side: one migration sender ------------------------------------

    @property
    def sender(self) -> object | None:
        """The connection sending the image here, or the commit that took its place."""
        return self._sender

    def sender_connected(self, sender: Attached) -> None:
        """``sender`` finished its handshake as the migration source: listening -> receiving.

        Raises ``transitions.MachineError`` unless the export is listening.
        The sender writes the whole image before it may commit, so a flush
        that failed for an earlier sender no longer says anything.
        """
        self.trigger(RoleTrigger.SENDER_CONNECTED)
        self._sender = sender
        self.image.clear_flush_failure()

    def begin_commit(self, sender: object) -> None:
        """The sender's commit: receiving -> committing."""
        if sender is not self._sender:
            raise ValueError("only the migration sender may commit")
        self.trigger(RoleTrigger.COMMIT)

    def detach_commit(self, sender: object) -> DetachedCommit | None:
        """The commit no longer depends on ``sender``'s socket: it becomes the sender.

        Returns the commit's new identity (to finish it with), or None if
        ``sender``'s attempt ended meanwhile.
        """
        if sender is not self._sender or self.state != RoleState.COMMITTING:
            return None
        commit = DetachedCommit()
        self._sender = commit
        return commit

    def committed(self, sender: object) -> bool:
        """The image is durable: committing -> serving, with control.  False if too late.

        False when ``sender``'s attempt ended meanwhile (its connection was
        lost during the fsync, and the export is listening again or has a
        new sender): the commit did not happen and must not be acknowledged.
        """
        if sender is not self._sender or self.state != RoleState.COMMITTING:
            return False
        self._sender = None
        self.trigger(RoleTrigger.COMMITTED)
        return True

    def take_lease(self, token: int, source_resource: str) -> defer.Deferred[None]:
        """The commit's other half: take the source's lease over by ``token``.

        Nothing to take without a lockspace.  Once taken, the data plane's
        requests run under it (:attr:`lease`).  A refusal (the token moved
        on: the source took it back, or another node holds it) fails the
        Deferred and the commit must be refused.
        """
        incoming = self.incoming_lease
        if incoming is None:
            return defer.succeed(None)

        def taken(lease: LeaseView) -> None:
            self.lease = lease

        return incoming.take_over(source_resource, token).addCallback(taken)

    def sender_lost(self, sender: object) -> None:
        """``sender``'s attempt ended without a commit: back to listening, for a new one.

        A commit refused after it had taken the lease (its answer came past
        the lease's deadline, say) gives the lease back: a listening export
        runs under no lease, and must not keep the image from its source.
        """
        if sender is not self._sender:
            return
        self._sender = None
        if self.state in RECEIVING_STATES:
            self.trigger(RoleTrigger.SENDER_LOST)
            if self.lease is not None and self.incoming_lease is not None:
                self.lease = None
                self.incoming_lease.give_back()

    # -- what a migration needs of the clients (its ClientGate) ---------------------

    def writes_landed(self) -> defer.Deferred[None]:
        """Fires once every client write dispatched so far has landed in the image.

        The role holds new requests from the moment it is ``quiescing``, but
        writes dispatched before may still be running on worker threads (or
        waiting in the export's order): this fires once the last of them
        has landed and been reported to the write observers (the dirty
        map).  A write whose FUA fsync still runs has reached the page
        cache, which is what the last pass reads: that is enough.
        """
        d: defer.Deferred[None] = defer.Deferred()
        self.order.when_writes_done(lambda: d.callback(None))
        return d

    def note_hold(self, seconds: float) -> None:
        """A client request waited ``seconds`` behind a hold: keep the longest."""
        self._longest_hold = max(self._longest_hold, seconds)

    @property
    def longest_hold(self) -> float:
        """The longest any client request has waited behind a hold, so far.

        Requests still held count up to now: at a handoff their clients are
        disconnected without ever being released, and their wait is exactly
        the stall the migration caused.
        """
        now = self._clock.seconds()
        waiting = [now - c.held_since for c in self._clients if c.held_since is not None]
        return max([self._longest_hold, *waiting])

    def set_write_cap(self, bytes_per_second: int | None) -> None:
        """Throttle client writes (auto-converge); None lifts the cap."""
        if bytes_per_second is None:
            self.write_limiter = None
        elif self.write_limiter is None:
            self.write_limiter = RateLimiter(self._clock, bytes_per_second)
        else:
            self.write_limiter.set_limit(bytes_per_second)

    @property
    def clock(self) -> Clock:
        return self._clock

    # -- writes ---------------------------------------------------------------

    def observe_writes(self, observer: WriteObserver) -> Callable[[], None]:
        """Call ``observer(offset, length)`` after every write; returns the undo.

        A migration registers its dirty map here, so every byte a client
        changes while a pass runs is copied again by the next one.
        """
        self._write_observers.append(observer)
        return lambda: self._write_observers.remove(observer)

    def gate_writes(self, gate: WriteGate) -> Callable[[], None]:
        """Let ``gate`` see every client write once it has landed, and hold its reply.

        A write-blocking migration (:mod:`ferry.migrate.mirroring`) takes the
        dirty map's place here: it mirrors a write to what it has already
        copied, and the reply waits for the destination's; anything else it
        marks dirty.  One gate at a time; returns the undo.
        """
        if self._write_gate is not None:
            raise RuntimeError(f"export {self.name}'s writes are gated already")
        self._write_gate = gate

        def undo() -> None:
            if self._write_gate is gate:
                self._write_gate = None

        return undo

    def note_write(
        self, offset: int, length: int, request: Request | None = None
    ) -> defer.Deferred[None] | None:
        """A client write to ``[offset, offset + length)`` has landed (``request``:
        the write, if it succeeded).  Returns what its reply must wait for (None:
        nothing), see :meth:`gate_writes`."""
        for observer in self._write_observers:
            observer(offset, length)
        gate = self._write_gate
        return None if gate is None else gate(offset, length, request)

    # -- status -----------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        lease = self.lease or self.incoming_lease
        return StatusSnapshot(
            export=self.name,
            pid=os.getpid(),
            size=self.image.size,
            is_mirroring=False,
            clients_allowed=self.clients_allowed,
            num_clients=self.num_clients,
            has_control=self.has_control,
            is_migrating=False,
            state=self.state,
            lease_state=None if lease is None else lease.state,
            lease_token=None if lease is None else lease.token,
            connections_moved=None if self.last_handoff is None else self.last_handoff.moved,
            connections_aborted=None if self.last_handoff is None else self.last_handoff.aborted,
        )
