"""NBD clients writing blocks a reader can date, over ferry's own sans-IO client.

Client K of N owns the blocks whose number is K mod N.  It keeps a few
requests in flight: WRITEs of a whole block (some with FUA), FLUSHes, and
READs whose answer it checks against what it was promised when it asked
(:meth:`~ferry.sim.pattern.Ledger.judge`): a read that misses a write
acknowledged before it was sent is a broken invariant on the spot.
Every acknowledgement goes to the :class:`~ferry.sim.pattern.Ledger`.

A client connects to the node that owns the image (as an orchestrator would
point it), now and then to the other one, and finds out from the handshake
whether that node takes clients.  Whatever ends its connection -- a
handoff, a fenced node, a crash, its own time-out on a request that never
came back -- it reconnects after a pause.  A write still unanswered when
the connection ended may yet be performed by the server (it may have read
it already); until the simulator knows the server's end of that connection
is closed, the block is not written again, so no old write can land over a
newer one and look like a lost write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import Command, CommandFlag, Errno
from ferry.nbd.events import Negotiated, NegotiationFailed, ProtocolError, Reply
from ferry.sim.network import Network, SimTransport
from ferry.sim.node import EXPORT, Host
from ferry.sim.pattern import BLOCK, Ledger, block_bytes
from ferry.sim.process import ProcessTime
from ferry.sim.world import World

__all__ = ["CLIENT_ADDRESS", "Client"]

CLIENT_ADDRESS: Final = "10.0.0.100"
#: A request unanswered this long makes the client give up on its connection.
REQUEST_TIMEOUT: Final = 15.0
CONNECT_TIMEOUT: Final = 5.0


@dataclass
class _Op:
    kind: str  # write, flush, read
    block: int = -1
    counter: int = 0
    fua: bool = False
    floor: int = 0  # a read: the newest write promised when it was sent
    epoch: int = 0
    snapshot: dict[int, int] = field(default_factory=dict)  # a flush: floors when sent
    sent_at: float = 0.0


class _Wire(Protocol):
    """Bytes between one connection and its sans-IO client."""

    def __init__(self, client: Client, conn: ClientConnection) -> None:
        self.client = client
        self.conn = conn

    def connectionMade(self) -> None:
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as error:
            self.client.world.violate("the server speaks NBD", f"{self.client.name}: {error}")
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.client.events(self, events)
        self.flush()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.client.lost(self)

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)


class _WireFactory(Factory):
    def __init__(self, make: Callable[[], _Wire]) -> None:
        self._make = make

    def buildProtocol(self, addr: Any) -> _Wire:
        return self._make()


class Client:
    """One client; see the module doc."""

    def __init__(
        self,
        world: World,
        index: int,
        count: int,
        ledger: Ledger,
        network: Network,
        hosts: list[Host],
        owner: Callable[[], Host],
    ) -> None:
        self.world = world
        self.index = index
        self.name = f"client{index}"
        self.ledger = ledger
        self.network = network
        self.hosts = hosts
        self._owner = owner
        self.rng = world.stream(self.name)
        self.process = ProcessTime(world, self.name)
        self.blocks = [b for b in range(ledger.blocks) if b % count == index]
        self.rate = self.rng.uniform(5.0, 40.0)  # requests per second
        self.depth = self.rng.randint(1, 4)
        self.counter = 0
        self.wire: _Wire | None = None
        self.ready = False
        self.in_flight: dict[int, _Op] = {}
        self._busy: set[int] = set()  # blocks with a write in flight
        self._orphans: list[tuple[SimTransport, set[int]]] = []
        self.running = False
        self.stats = {"writes": 0, "flushes": 0, "reads": 0, "errors": 0, "connections": 0}

    # -- the life of a client ----------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.process.callLater(self.rng.uniform(0, 0.5), self._connect)

    def stop(self) -> None:
        """Send nothing new; close once what is in flight is answered."""
        self.running = False
        if self.wire is not None and not self.in_flight:
            self._close()

    @property
    def idle(self) -> bool:
        return not self.in_flight

    def _close(self) -> None:
        wire = self.wire
        if wire is not None and wire.transport is not None:
            wire.transport.loseConnection()

    def _connect(self) -> None:
        if not self.running or self.wire is not None:
            return
        host = self._owner() if self.rng.random() < 0.8 else self.rng.choice(self.hosts)
        conn = ClientConnection(
            EXPORT, meta_contexts=(), structured_replies=self.rng.random() < 0.5
        )
        factory = _WireFactory(lambda: _Wire(self, conn))
        d = self.network.connect(
            self.process, CLIENT_ADDRESS, host.address, factory, CONNECT_TIMEOUT
        )
        d.addCallbacks(self._connected, lambda _: self._retry())

    def _connected(self, wire: _Wire) -> None:
        if self.wire is not None or not self.running:
            if wire.transport is not None:
                wire.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.wire = wire
        self.ready = False
        self.stats["connections"] += 1

    def _retry(self) -> None:
        self.process.callLater(self.rng.uniform(0.1, 1.0), self._connect)

    def lost(self, wire: _Wire) -> None:
        if wire is not self.wire:
            return
        self.wire = None
        self.ready = False
        writes = {op.block for op in self.in_flight.values() if op.kind == "write"}
        if writes and wire.transport is not None:
            transport = wire.transport
            assert isinstance(transport, SimTransport) and transport.peer is not None
            self._orphans.append((transport.peer, writes))
        self.in_flight.clear()
        self._busy.clear()
        self._retry()

    # -- the conversation ----------------------------------------------------------------

    def events(self, wire: _Wire, events: list[Any]) -> None:
        if wire is not self.wire:
            return
        for event in events:
            if isinstance(event, Negotiated):
                self.ready = True
                self._tick(wire)
            elif isinstance(event, NegotiationFailed):
                self.world.log(self.name, f"refused: {event.message}")
                self._close()
            elif isinstance(event, Reply):
                self._answered(event)
        if not self.running and not self.in_flight:
            self._close()

    def _tick(self, wire: _Wire) -> None:
        """Send the next request if there is room, and come back later."""
        if not self.running or not self.ready or wire is not self.wire:
            return
        if len(self.in_flight) < self.depth:
            self._send_one()
            wire.flush()
        self.process.callLater(self.rng.expovariate(self.rate), self._tick, wire)

    def _send_one(self) -> None:
        wire = self.wire
        assert wire is not None
        conn, ledger, rng = wire.conn, self.ledger, self.rng
        now = self.world.now()
        roll = rng.random()
        if roll < 0.12:
            op = _Op("flush", snapshot={b: ledger.floor[b] for b in self.blocks})
            self.stats["flushes"] += 1
            handle = conn.request(Command.FLUSH)
        elif roll < 0.22:
            block = rng.choice(self.blocks)
            op = _Op("read", block=block, floor=ledger.floor[block])
            self.stats["reads"] += 1
            handle = conn.request(Command.READ, block * BLOCK, BLOCK)
        else:
            free = [b for b in self.blocks if b not in self._busy and not self._tainted(b)]
            if not free:
                return
            block = rng.choice(free)
            self.counter += 1
            fua = rng.random() < 0.1
            op = _Op("write", block=block, counter=self.counter, fua=fua)
            ledger.sending(block, self.counter)
            self._busy.add(block)
            self.stats["writes"] += 1
            flags = CommandFlag.FUA if fua else CommandFlag(0)
            data = block_bytes(block, self.index, self.counter)
            handle = conn.request(Command.WRITE, block * BLOCK, data=data, flags=flags)
        op.epoch = ledger.epoch
        op.sent_at = now
        self.in_flight[handle] = op
        self.process.callLater(REQUEST_TIMEOUT, self._timed_out, wire, handle)

    def _answered(self, reply: Reply) -> None:
        op = self.in_flight.pop(reply.handle, None)
        if op is None:
            return
        ledger = self.ledger
        if op.kind == "write":
            self._busy.discard(op.block)
        what = op.kind if op.block < 0 else f"{op.kind} {op.block}"
        if op.kind == "write":
            what += f" #{op.counter}{' fua' if op.fua else ''}"
        if reply.error is not Errno.OK:
            self.stats["errors"] += 1
            self.world.log(self.name, f"{what}: {reply.error.name}")
            return
        self.world.log(self.name, f"{what}: ok")
        if op.kind == "write":
            ledger.acknowledged(op.block, op.counter, fua=op.fua, epoch=op.epoch)
        elif op.kind == "flush":
            ledger.flushed(op.snapshot, op.epoch)
        elif op.epoch == ledger.epoch:
            verdict = ledger.judge(op.block, reply.data, op.floor)
            if not verdict.ok:
                self.world.violate(
                    "reads see acknowledged writes", f"{self.name}: {verdict.detail}"
                )

    def _timed_out(self, wire: _Wire, handle: int) -> None:
        if wire is self.wire and handle in self.in_flight:
            self.world.log(self.name, "request timed out: giving up on the connection")
            if wire.transport is not None:
                wire.transport.abortConnection()  # type: ignore[attr-defined]

    def _tainted(self, block: int) -> bool:
        if not self._orphans:
            return False
        self._orphans = [
            (end, blocks)
            for end, blocks in self._orphans
            if not end.closed and not end.process.dead
        ]
        return any(block in blocks for _, blocks in self._orphans)
