"""The old process's side of a takeover: hold, offer, hand everything on -- or serve on.

The control socket's ``takeover`` request (:meth:`Giver.request`) starts one
attempt, a machine of ``statecharts/takeover.yaml`` (its comments give each
step and why).  An attempt hands on the whole node: every export (one for
``ferry serve``, all of a daemon's), with the listening sockets they share;
it is refused unless every export serves, and while it runs no export is
added or removed (:attr:`Giver.running`).  The decisions run on the reactor; the waits on the new
process (the descriptor exchange, its notes) run on a worker thread with
the control connection's own socket, each with a deadline, so the reactor
goes on answering the control socket and /metrics meanwhile (it performs
no client request: the role holds them).

Only two endings exist: every descriptor let go and this process stops
(``handed_over``), or everything taken back and served as before
(``resumed``).  The lease never leaves the lockspace's idea of one holder:
:meth:`~ferry.lease.manager.LeaseManager.hand_on` stops writes,
``keep`` or ``passed_on`` ends it.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry import statecharts
from ferry.chartnames import LeaseState, RoleState, RoleTrigger, TakeoverTrigger
from ferry.clock import Clock, cancel_call
from ferry.control.commands import Params, Reply, TakeConnection
from ferry.exports import ExportRegistry, ExportUnit
from ferry.handoff import fdpass
from ferry.lease.backend import PassedGrant
from ferry.lease.manager import LeaseStateError
from ferry.nbd.session import SnapshotError
from ferry.serve.export import Attached
from ferry.takeover import notes
from ferry.takeover.state import (
    TAKEOVER_FORMAT,
    ClientState,
    ExportState,
    ImageState,
    PortState,
    TakeoverState,
)

if TYPE_CHECKING:
    from ferry.trace import Tracer

__all__ = ["Giver", "GivingNode"]

_log = Logger()
_T = TypeVar("_T")


class GivingNode(Protocol):
    """What a node lets a takeover use (``ferry.node.Node`` is one)."""

    @property
    def clock(self) -> Clock: ...

    @property
    def tracer(self) -> Tracer: ...

    @property
    def exports(self) -> ExportRegistry: ...

    def run_blocking(self, work: Callable[[], object]) -> Deferred[Any]: ...

    def served(self) -> dict[str, Any]:
        """What the node serves now, and how (the ACLs as they are now)."""
        ...

    def handed_ports(self) -> list[tuple[str, IListeningPort]]:
        """Every listening socket a successor takes, with its kind (state.PORT_KINDS)."""
        ...

    def let_go_ports(self) -> None:
        """Forget those sockets without closing them for the successor (``ferry.letgo``)."""
        ...

    def stop_after_takeover(self) -> None:
        """Everything is the successor's: stop, on a later turn of the reactor."""
        ...


class _NotTaken(Exception):
    """The takeover ends here, and this process serves on; the message says why."""


class Giver:
    """Serves the control socket's ``served`` and ``takeover``; one attempt at a time."""

    def __init__(self, node: GivingNode) -> None:
        self._node = node
        self._attempt: _Attempt | None = None
        self._attempts = itertools.count(1)
        self._ended: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        return self._attempt is not None

    def ended(self) -> Deferred[None]:
        """Fires once no attempt runs (at once if none does): shutdown waits for it."""
        d: Deferred[None] = Deferred()
        if self._attempt is None:
            d.callback(None)
        else:
            self._ended.append(d)
        return d

    # -- the control socket ------------------------------------------------------------

    def describe(self, args: Sequence[str], params: Params) -> Reply:
        """``served``: what a successor would take (JSON), before it asks for it."""
        if not len(self._node.exports):
            return Reply(1, "this node has no export")
        served = self._node.served()
        names = " ".join(repr(export["name"]) for export in served["exports"])
        node = served["node"]
        return Reply(0, f"{node['addr']}:{node['port']} exports {names}", served)

    def request(self, params: Params) -> str | TakeConnection:
        """``takeover``: why not (answered on the control socket), or the attempt to run."""
        if self._attempt is not None:
            return "a takeover is already under way"
        units = list(self._node.exports)
        if not units:
            return "this node has no export"
        for unit in units:
            why = _why_not_give(unit)
            if why is not None:
                return f"export {unit.name!r}: {why}" if len(units) > 1 else why
        # An image and a lock file for each export at most, the ports, the clients.
        fixed = 2 * len(units) + len(self._node.handed_ports())
        clients = sum(unit.export.num_clients for unit in units)
        if fixed + clients > fdpass.MAX_FDS:
            return (
                f"{clients} client connections are too many for one takeover: "
                f"{max(0, fdpass.MAX_FDS - fixed)} at most"
            )

        def take(sock: socket.socket) -> None:
            attempt = _Attempt(self._node, units, sock, next(self._attempts))
            self._attempt = attempt
            Deferred.fromCoroutine(attempt.run()).addBoth(self._finished)

        return take

    def _finished(self, result: object) -> None:
        if isinstance(result, Failure):
            _log.failure("the takeover failed unexpectedly", result)
        self._attempt = None
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)


def _why_not_give(unit: ExportUnit) -> str | None:
    """Why ``unit`` cannot be handed on now (None: it can)."""
    export = unit.export
    if export.state != RoleState.SERVING:
        return f"cannot hand the export over while it is {export.state}: only while serving"
    if unit.mirrors.running:
        return "a migration is running: wait for it to end, or break it"
    lease = unit.lease
    if lease is not None and not lease.can_pass_on:
        return f"the lease's lockspace cannot pass a grant to another process ({lease.state})"
    return None


class _Attempt:
    """One takeover attempt: the model its machine drives."""

    state: str

    def __init__(
        self, node: GivingNode, units: list[ExportUnit], sock: socket.socket, n: int
    ) -> None:
        self._node = node
        self._units = units
        self._sock = sock
        self._moving: dict[str, list[Attached]] = {unit.name: [] for unit in units}
        self._ports: list[tuple[str, IListeningPort]] = []
        self._held_at = node.clock.seconds()
        self._chart = statecharts.load("takeover")
        statecharts.build(self._chart, self, instance=str(n), tracer=node.tracer, clock=node.clock)

    def fire(self, trigger: TakeoverTrigger) -> None:
        getattr(self, trigger)()

    # -- the attempt, step by step -------------------------------------------------------

    async def run(self) -> None:
        self._held_at = self._node.clock.seconds()
        _log.info("a new process asks for {what}: holding client requests", what=self._what())
        for unit in self._units:
            unit.export.trigger(RoleTrigger.PASS_ON)
        self._pause_ports()
        try:
            await self._settle()
            blob, fds = self._offer()
            await self._blocking(
                lambda: fdpass.send_descriptors(
                    self._sock, fds, blob, format=TAKEOVER_FORMAT, timeout=notes.STEP_TIMEOUT
                )
            )
            self.fire(TakeoverTrigger.ACCEPTED)
            kind, text = await self._blocking(self._receive_note)
            if kind != notes.READY:
                raise _NotTaken(f"the new process gave up: {text or 'no reason given'}")
            why_not = self._why_not_commit()
            if why_not is not None:
                await self._blocking(lambda: self._send_note(notes.NO, why_not))
                raise _NotTaken(why_not)
            self.fire(TakeoverTrigger.COMMIT)
            await self._blocking(lambda: self._send_note(notes.YOURS))
            try:
                kind, text = await self._blocking(self._receive_note)
            except fdpass.FdPassTimeout:
                _log.warn(
                    "the new process said nothing in {s:g} s after it was told {what} "
                    "is its own: it may be serving, so this process must not",
                    what=self._what(),
                    s=notes.STEP_TIMEOUT,
                )
                self.fire(TakeoverTrigger.UNCONFIRMED)
                self._hand_over("unconfirmed")
                return
            if kind != notes.SERVING:
                raise _NotTaken(f"the new process gave up: {text or 'no reason given'}")
            self.fire(TakeoverTrigger.CONFIRMED)
            self._hand_over("confirmed")
        except (_NotTaken, fdpass.FdPassError, LeaseStateError, SnapshotError, OSError) as error:
            self._resume(str(error))
        finally:
            self._sock.close()

    def _held_ms(self) -> float:
        """How long client requests have been held, from the request on (the log's figure)."""
        return (self._node.clock.seconds() - self._held_at) * 1000

    def _what(self) -> str:
        """What is handed on, for the log: the export, or how many."""
        if len(self._units) == 1:
            return f"export {self._units[0].name!r}"
        return f"the node's {len(self._units)} exports"

    async def _settle(self) -> None:
        """Wait for the jobs on threads (FLUSH, FUA) of every client; new ones are held."""
        clients = [client for unit in self._units for client in unit.export.clients]
        waiting = defer.DeferredList([client.settled() for client in clients])
        await _within(
            self._node.clock,
            waiting,
            notes.SETTLE_TIMEOUT,
            f"a FLUSH or FUA write was still running after {notes.SETTLE_TIMEOUT:g} s",
        )

    def _offer(self) -> tuple[bytes, list[int]]:
        """Suspend every client, take the sessions and the leases: the state and its fds."""
        exports = [self._offer_export(unit) for unit in self._units]
        self._ports = self._node.handed_ports()
        state = TakeoverState(
            pid=os.getpid(),
            served=self._node.served(),
            exports=tuple(exports),
            ports=tuple(PortState(kind, port.socket.family) for kind, port in self._ports),  # type: ignore[attr-defined]
        )
        fds = state.descriptors(
            [
                (
                    unit.image.fileno(),
                    [client.tcp_socket.fileno() for client in self._moving[unit.name]],
                )
                for unit in self._units
            ],
            [port.socket.fileno() for _, port in self._ports],  # type: ignore[attr-defined]
        )
        blob = state.to_bytes()
        self.fire(TakeoverTrigger.OFFER)
        _log.info(
            "offering {what}, {ports} listening socket(s) and {n} client connection(s) "
            "({size} bytes of state)",
            what=self._what(),
            ports=len(self._ports),
            n=state.client_count,
            size=len(blob),
        )
        return blob, fds

    def _offer_export(self, unit: ExportUnit) -> ExportState:
        """One export's clients suspended and their sessions taken, its lease passing."""
        moving = self._moving[unit.name]
        clients: list[ClientState] = []
        for client in unit.export.clients:
            why = client.why_not_movable()
            if why is not None:
                _log.info("{peer} cannot move: {why}", peer=client.peer_host, why=why)
                continue
            client.suspend()
            moving.append(client)
            try:
                family = client.tcp_socket.family
                clients.append(ClientState(family, client.session_snapshot(), client.unsent()))
            except (SnapshotError, OSError) as error:
                moving.pop()
                client.resume_after_move()
                _log.warn("{peer} cannot move: {error}", peer=client.peer_host, error=error)
        image = unit.image
        passed: PassedGrant | None = None
        if unit.lease is not None:
            passed = unit.lease.hand_on()
        return ExportState(
            unit.name,
            ImageState(os.path.abspath(image.path), image.size, image.read_only),
            passed,
            tuple(clients),
        )

    def _why_not_commit(self) -> str | None:
        """Whether this process can still promise never to serve again."""
        if self._node.exports.names() != [unit.name for unit in self._units]:
            return "the old process's exports changed"
        for unit in self._units:
            export, lease = unit.export, unit.lease
            if export.state != RoleState.PASSING_ON:
                return f"the old process's export {unit.name!r} is {export.state} now"
            if lease is not None and lease.state != LeaseState.PASSING:
                return f"the old process's lease on {lease.resource} is {lease.state} now"
        return None

    # -- the two endings -------------------------------------------------------------------

    def _hand_over(self, how: str) -> None:
        """The new process has everything: let go of it all, without a packet, and stop."""
        for unit in self._units:
            if unit.lease is not None:
                unit.lease.passed_on()
            for client in self._moving[unit.name]:
                client.handed_on("to the new process")
        self._node.let_go_ports()
        for unit in self._units:
            # Any client still here could not move (closing, half-closed): it reconnects.
            unit.export.disconnect_all("the export was handed over to a new process")
            unit.export.trigger(RoleTrigger.PASSED_ON)
        _log.info(
            "handed {what} over ({how}): {n} client connection(s) and the listening "
            "sockets are the new process's; clients held {held_ms:.1f} ms here; stopping",
            what=self._what(),
            how=how,
            n=sum(len(moving) for moving in self._moving.values()),
            held_ms=self._held_ms(),
        )
        self._node.stop_after_takeover()

    def _resume(self, why: str) -> None:
        """Nothing moved for good: take everything back and serve on."""
        _log.warn(
            "no takeover of {what}: {why}; serving on (clients held {held_ms:.1f} ms)",
            what=self._what(),
            why=why,
            held_ms=self._held_ms(),
        )
        for unit in self._units:
            lease = unit.lease
            if lease is not None and lease.state == LeaseState.PASSING:
                lease.keep()
            for client in self._moving[unit.name]:
                client.resume_after_move()
            self._moving[unit.name] = []
        if self._chart.property(self.state, "may_resume"):
            self.fire(TakeoverTrigger.RESUME)
        for unit in self._units:
            if unit.export.can(RoleTrigger.KEPT):
                unit.export.trigger(RoleTrigger.KEPT)
        self._resume_ports()

    # -- helpers -------------------------------------------------------------------------------

    def _pause_ports(self) -> None:
        """Stop accepting on the NBD ports: newcomers wait in the backlog for the next holder."""
        for kind, port in self._node.handed_ports():
            if kind == "nbd":
                port.stopReading()  # type: ignore[attr-defined]

    def _resume_ports(self) -> None:
        for kind, port in self._node.handed_ports():
            if kind == "nbd":
                port.startReading()  # type: ignore[attr-defined]

    def _blocking(self, work: Callable[[], _T]) -> Deferred[_T]:
        return self._node.run_blocking(work)

    def _receive_note(self) -> tuple[bytes, str]:
        return fdpass.receive_note(self._sock, timeout=notes.STEP_TIMEOUT)

    def _send_note(self, kind: bytes, text: str = "") -> None:
        fdpass.send_note(self._sock, kind, text, timeout=notes.STEP_TIMEOUT)


def _within(clock: Clock, d: Deferred[_T], seconds: float, why: str) -> Deferred[_T]:
    """``d``, or a failure with ``_NotTaken(why)`` if it has not fired within ``seconds``."""
    out: Deferred[_T] = Deferred()

    def expired() -> None:
        if not out.called:
            out.errback(_NotTaken(why))

    timer = clock.call_later(seconds, expired)

    def done(result: Any) -> None:
        cancel_call(timer)
        if not out.called:
            out.callback(result)

    d.addBoth(done)
    return out
