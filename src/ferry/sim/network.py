"""The simulated network: TCP connections as pairs of in-memory transports.

A :class:`SimTransport` is what a Twisted protocol sees: ``write``,
``writeSequence``, ``loseConnection``, ``abortConnection``, a push
producer registered on it, ``pauseProducing`` to stop reading.  Bytes
written at one end arrive at the other after the connection's latency plus
their size over its bandwidth, in order, sometimes split at an arbitrary
byte (so the parsers see every boundary), and are delivered through the
receiving process's gate (:meth:`ferry.sim.process.ProcessTime.run`): a
paused process receives nothing until it resumes, a dead one never.

What the network can do wrong, each on the seed's say:

* **delay**: every connection draws its own latency and bandwidth;
* **reset at any byte**: :meth:`Link.reset` lets a chosen number of bytes
  more through in one direction, then both ends see the connection lost;
* **a peer that stops reading**: :meth:`SimTransport.stall` holds what
  arrives; the sender's unread bytes grow past :data:`HIGH_WATER` and its
  producer is paused, as a full socket buffer would;
* **hosts**: a host that lost power, or is partitioned off, answers
  nothing (a connect times out, bytes sent to it or by it vanish) until it
  is back, when its old connections are reset; a host whose process died
  refuses connections, and the kernel resets the dead process's
  connections;
* **between two hosts**: the path cut (:meth:`Network.cut`: as a partition,
  for those two only) or slow (:meth:`Network.slow`).

Bytes unread by a protocol (``pauseProducing``) stay in the receiving end's
inbox and count against the sender, so backpressure is end to end.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from ferry.migrate.options import Destination
from ferry.sim.process import ProcessTime
from ferry.sim.world import World

__all__ = ["HIGH_WATER", "Link", "Network", "SimTransport"]


def _lost(error: Exception) -> Failure:
    """Why a connection ended, as ``connectionLost`` wants it (the constructor is untyped)."""
    return Failure(error)  # type: ignore[no-untyped-call]


#: Unread bytes in flight at which a sender's producer is paused (a full socket buffer)...
HIGH_WATER: Final = 256 * 1024
#: ... and below which it is resumed.
LOW_WATER: Final = 64 * 1024
PORT: Final = 10809


class SimTransport:
    """One end of a simulated TCP connection (see the module doc)."""

    def __init__(self, link: Link, process: ProcessTime, host: str, peer_host: str) -> None:
        self.link = link
        self.process = process
        self.host = host
        self.peer_host = peer_host
        self.protocol: IProtocol | None = None
        self.peer: SimTransport | None = None
        self.connected = True
        self.disconnecting = False
        self.closed = False
        self._producer: Any = None
        self._producer_paused = False
        self._reading = True
        self._stalled = False
        self._inbox: deque[bytes] = deque()
        self._unread = 0  # bytes this end wrote that the peer's protocol has not taken yet
        self._next_arrival = 0.0

    # -- ITransport --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or self.disconnecting or not data:
            return
        self.link.send(self, bytes(data))
        if self._producer is not None and not self._producer_paused and self._unread > HIGH_WATER:
            self._producer_paused = True
            self._producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.closed or self.disconnecting:
            return
        self.disconnecting = True
        self.link.close(self)

    def abortConnection(self) -> None:
        if self.closed:
            return
        self.link.abort(self)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", self.peer_host, PORT)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, PORT)

    # -- IConsumer ---------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer if streaming else None

    def unregisterProducer(self) -> None:
        self._producer = None

    # -- IPushProducer (the protocol stops and starts reading) -------------------------

    def pauseProducing(self) -> None:
        self._reading = False

    def resumeProducing(self) -> None:
        self._reading = True
        self._drain()

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- what the link does to this end --------------------------------------------------

    def stall(self) -> None:
        """Stop reading until :meth:`unstall` (the peer's writes pile up): a fault."""
        self._stalled = True

    def unstall(self) -> None:
        self._stalled = False
        self.process.run(self._drain)

    def _receive(self, data: bytes) -> None:
        """Bytes arrived (in this end's process)."""
        if self.closed:
            return
        self._inbox.append(data)
        self._drain()

    def _drain(self) -> None:
        """Hand what arrived to the protocol while it reads (none yet: still connecting)."""
        while self._inbox and self._reading and not self._stalled and not self.closed:
            protocol = self.protocol
            if protocol is None:
                return
            data = self._inbox.popleft()
            peer = self.peer
            protocol.dataReceived(data)
            if peer is not None:
                peer._taken(len(data))

    def _taken(self, count: int) -> None:
        """The peer's protocol read ``count`` of our bytes: maybe resume our producer."""
        self._unread -= count
        if self._producer_paused and self._unread < LOW_WATER and not self.closed:
            self._producer_paused = False
            self.process.run(self._resume_producer)

    def _resume_producer(self) -> None:
        if self._producer is not None and not self.closed:
            self._producer.resumeProducing()

    def _lost(self, reason: Failure) -> None:
        """The connection is gone for this end (in this end's process)."""
        if self.closed:
            return
        self.closed = True
        self.connected = False
        self.disconnecting = True
        self._inbox.clear()
        protocol = self.protocol
        if protocol is not None:
            protocol.connectionLost(reason)


class Link:
    """One TCP connection between two processes: latency, order, and its faults."""

    def __init__(
        self,
        network: Network,
        rng: random.Random,
        client: tuple[ProcessTime, str],
        server: tuple[ProcessTime, str],
    ) -> None:
        self.network = network
        self.rng = rng
        (client_process, client_host), (server_process, server_host) = client, server
        self.client = SimTransport(self, client_process, client_host, server_host)
        self.server = SimTransport(self, server_process, server_host, client_host)
        self.ends = (self.client, self.server)
        self.hosts = (client_host, server_host)
        self.client.peer, self.server.peer = self.server, self.client
        self.latency = rng.uniform(0.0001, 0.005)
        self.bandwidth = rng.uniform(20e6, 500e6)  # bytes per second
        self.broken = False
        self._cut: dict[SimTransport, int] = {}  # bytes a reset still lets through
        self.name = f"{client_host}->{server_host}#{network.count}"

    def _other(self, end: SimTransport) -> SimTransport:
        return self.ends[1] if end is self.ends[0] else self.ends[0]

    def delay(self) -> float:
        jitter = self.rng.expovariate(1 / self.latency) if self.rng.random() < 0.1 else 0.0
        network = self.network
        return self.latency + jitter + network.extra_latency + network.slowness(*self.hosts)

    # -- bytes ---------------------------------------------------------------------------

    def send(self, sender: SimTransport, data: bytes) -> None:
        world = self.network.world
        sender._unread += len(data)
        arrival = max(sender._next_arrival, world.now() + self.delay() + len(data) / self.bandwidth)
        sender._next_arrival = arrival
        pieces = [data]
        if len(data) > 1 and self.rng.random() < 0.25:
            cut = self.rng.randrange(1, len(data))
            pieces = [data[:cut], data[cut:]]
        for piece in pieces:
            world.clock.callLater(arrival - world.now(), self._arrive, sender, piece)

    def _arrive(self, sender: SimTransport, data: bytes) -> None:
        receiver = self._other(sender)
        if self.broken or receiver.closed:
            return
        budget = self._cut.get(sender)
        if budget is not None:
            if len(data) >= budget:
                data = data[:budget]
                if data:
                    receiver.process.run(receiver._receive, data)
                self.reset_now("reset")
                return
            self._cut[sender] = budget - len(data)
        if not self.network.reaches(sender.host, receiver.host):
            return  # a host without power, or cut off: the bytes vanish
        receiver.process.run(receiver._receive, data)

    # -- ends ----------------------------------------------------------------------------

    def close(self, closer: SimTransport) -> None:
        """A clean close: once the closer's bytes are out, both ends see it done."""
        world = self.network.world
        at = max(closer._next_arrival, world.now()) - world.now()
        world.clock.callLater(at, self._closed, closer)

    def _closed(self, closer: SimTransport) -> None:
        if self.broken:  # gone already, unknown to this end until now
            closer.process.run(closer._lost, _lost(ConnectionDone("closed")))
            return
        self.broken = True
        peer = self._other(closer)
        closer.process.run(closer._lost, _lost(ConnectionDone("closed")))
        self._tell_later(peer, _lost(ConnectionDone("the peer closed the connection")))

    def abort(self, aborter: SimTransport) -> None:
        """An abort: this end at once; the peer after the bytes already on the wire."""
        if self.broken:  # gone already, unknown to this end until now
            aborter.process.run(aborter._lost, _lost(ConnectionAborted("aborted")))
            return
        self.broken = True
        world = self.network.world
        peer = self._other(aborter)
        aborter.process.run(aborter._lost, _lost(ConnectionAborted("aborted")))
        at = max(aborter._next_arrival, world.now() + self.delay()) - world.now()
        world.clock.callLater(at, self._tell, peer, _lost(ConnectionLost("reset by peer")))

    def reset(self, direction: int, after: int) -> None:
        """The fault: ``after`` more bytes from end ``direction``, then a reset both ways."""
        if self.broken:
            return
        self._cut[self.ends[direction]] = after
        self.network.world.call_later(self.rng.uniform(0.0, 2.0), "net", self.reset_now, "reset")

    def reset_now(self, why: str) -> None:
        if self.broken:
            return
        self.broken = True
        self.network.world.log("net", f"{why} {self.name}")
        for end in self.ends:
            self._tell_later(end, _lost(ConnectionLost(f"connection {why}")))

    def _tell_later(self, end: SimTransport, reason: Failure) -> None:
        self.network.world.clock.callLater(self.delay(), self._tell, end, reason)

    def _tell(self, end: SimTransport, reason: Failure) -> None:
        if self.network.up(end.host):
            end.process.run(end._lost, reason)
        else:
            self.network.untold(end, reason)


class Network:
    """Who listens where, the live connections, and connecting."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._rng = world.stream("network")
        self._listeners: dict[str, tuple[ProcessTime, Factory]] = {}
        self._down: set[str] = set()
        self._cuts: set[frozenset[str]] = set()  # pairs of hosts that cannot reach each other
        self._slow: dict[frozenset[str], float] = {}  # extra seconds between two hosts
        self._untold: list[tuple[SimTransport, Failure]] = []  # for hosts cut off now
        self.links: list[Link] = []
        self.count = 0
        self.extra_latency = 0.0  # a fault: every connection slower for a while

    def up(self, host: str) -> bool:
        return host not in self._down

    def reaches(self, host: str, other: str) -> bool:
        """Whether bytes from ``host`` get to ``other`` now."""
        down = self._down
        return host not in down and other not in down and frozenset((host, other)) not in self._cuts

    def slowness(self, host: str, other: str) -> float:
        return self._slow.get(frozenset((host, other)), 0.0)

    # -- hosts ----------------------------------------------------------------------------

    def listen(self, host: str, process: ProcessTime, factory: Factory) -> None:
        self._listeners[host] = (process, factory)

    def stop_listening(self, host: str, process: ProcessTime) -> None:
        listener = self._listeners.get(host)
        if listener is not None and listener[0] is process:
            del self._listeners[host]

    def process_died(self, process: ProcessTime, host: str, *, power_cut: bool) -> None:
        """A process is gone: its host went dark, or its kernel resets its connections."""
        self.stop_listening(host, process)
        if power_cut:
            self._down.add(host)  # its connections go quiet; answered once it is back
            return
        for link in self.links_of(process):
            link.reset_now("reset (process died)")

    def power_off(self, host: str) -> None:
        self._down.add(host)

    def power_on(self, host: str) -> None:
        """Back up: connections from before the power cut are answered with a reset."""
        self._down.discard(host)
        self._tell_the_untold(host)
        for link in self._live():
            if any(end.host == host and end.process.dead for end in link.ends):
                link.reset_now("reset (host came back)")

    def untold(self, end: SimTransport, reason: Failure) -> None:
        """``end``'s connection is gone while its host is cut off: it hears when it is back."""
        self._untold.append((end, reason))

    def _tell_the_untold(self, host: str) -> None:
        untold, self._untold = self._untold, []
        for end, reason in untold:
            if end.host == host:
                end.link._tell_later(end, reason)
            else:
                self._untold.append((end, reason))

    def partition(self, host: str) -> None:
        """Cut ``host`` off: nothing gets in or out (its processes run on)."""
        self._down.add(host)

    def rejoin(self, host: str) -> None:
        """The partition heals: connections that lost bytes meanwhile are reset."""
        self._down.discard(host)
        self._tell_the_untold(host)
        for link in self._live():
            if any(end.host == host for end in link.ends):
                link.reset_now("reset (partition healed)")

    def cut(self, host: str, other: str) -> None:
        """Nothing gets from ``host`` to ``other`` or back (both go on with everyone else)."""
        self._cuts.add(frozenset((host, other)))

    def mend(self, host: str, other: str) -> None:
        """The cut heals: connections between the two that lost bytes meanwhile are reset."""
        pair = frozenset((host, other))
        if pair not in self._cuts:
            return
        self._cuts.discard(pair)
        for link in self._live():
            if frozenset(link.hosts) == pair:
                link.reset_now("reset (path mended)")

    def slow(self, host: str, other: str, seconds: float) -> None:
        """Every byte between the two takes ``seconds`` more (0: no more)."""
        pair = frozenset((host, other))
        if seconds:
            self._slow[pair] = seconds
        else:
            self._slow.pop(pair, None)

    def _live(self) -> list[Link]:
        self.links = [link for link in self.links if not link.broken]
        return list(self.links)

    def links_of(self, process: ProcessTime) -> list[Link]:
        return [link for link in self._live() if any(e.process is process for e in link.ends)]

    # -- connecting -----------------------------------------------------------------------

    def connect(
        self,
        process: ProcessTime,
        host: str,
        target: str,
        factory: Factory,
        timeout: float,
    ) -> Deferred[Any]:
        """Connect ``factory``'s protocol at ``host`` to whoever listens at ``target``."""
        d: Deferred[Any] = Deferred()
        latency = (
            self._rng.uniform(0.0002, 0.005) + self.extra_latency + self.slowness(host, target)
        )

        def settle(result: Any) -> None:
            if not d.called:
                if isinstance(result, Exception):
                    d.errback(result)
                else:
                    d.callback(result)

        def arrive() -> None:
            if not self.reaches(host, target):
                return  # no answer: the time-out says so
            listener = self._listeners.get(target)
            if listener is None:
                refused = ConnectionRefusedError(target)  # type: ignore[no-untyped-call]
                process.later(latency, settle, refused)
                return
            self._accept(process, host, target, factory, listener, settle, latency)

        def time_out() -> None:
            why = f"connect timed out after {timeout} s"
            settle(TimeoutError(target, why))  # type: ignore[no-untyped-call]

        self.world.call_later(latency, f"net {host}", arrive)
        process.later(timeout, time_out)
        return d

    def _accept(
        self,
        process: ProcessTime,
        host: str,
        target: str,
        factory: Factory,
        listener: tuple[ProcessTime, Factory],
        settle: Callable[[Any], None],
        latency: float,
    ) -> None:
        server_process, server_factory = listener
        self.count += 1
        rng = self.world.stream(f"link {host}->{target}")
        link = Link(self, rng, (process, host), (server_process, target))
        client_end, server_end = link.client, link.server
        self.links.append(link)
        self.world.log("net", f"connect {link.name}")

        def client_side() -> None:
            if link.broken:
                return
            protocol = factory.buildProtocol(server_end.getHost())
            if protocol is None:
                link.abort(client_end)
                return
            client_end.protocol = protocol
            protocol.makeConnection(client_end)  # type: ignore[arg-type]
            settle(protocol)
            client_end._drain()  # what the server said before we were told we are connected

        def server_side() -> None:
            if link.broken:
                return
            built = server_factory.buildProtocol(client_end.getHost())
            if built is None:
                link.abort(server_end)
                return
            server_end.protocol = built
            protocol = built
            protocol.makeConnection(server_end)  # type: ignore[arg-type]

        server_process.run(server_side)
        process.later(latency, client_side)

    def connector(self, process: ProcessTime, host: str) -> Callable[..., Deferred[Any]]:
        """A migration source's :data:`~ferry.migrate.wire.Connector` from ``host``."""

        def connect(destination: Destination, factory: Factory, timeout: float) -> Deferred[Any]:
            return self.connect(process, host, destination.host, factory, timeout)

        return connect
