"""A simulated process's reactor, as Twisted's own clients use it: its time, and TCP.

ferry's etcd lockspace talks HTTP with Twisted's ``Agent``, which reaches
etcd through ``TCP4ClientEndpoint(reactor, ...)``: it needs ``callLater``
and ``seconds`` (the pool's idle connections, ``addTimeout``) and
``connectTCP``.  :class:`SimReactor` gives it the process's
:class:`~ferry.sim.process.ProcessTime` and a ``connectTCP`` over the
simulated network, so the real client code runs unchanged -- its
connection pool, its HTTP/1.1 parser, its failures -- against a simulated
server.

``connectTCP`` behaves as the reactor's: it tells the factory it started
connecting, and then either builds the protocol on a connected transport
or reports ``clientConnectionFailed`` (refused, timed out).  A connector
stopped while connecting (the endpoint's Deferred cancelled) builds
nothing, and its failure is not reported: the endpoint has said so already.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory, Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from ferry.sim.network import Network, SimTransport
from ferry.sim.process import ProcessTime

__all__ = ["SimReactor"]


@implementer(IConnector)
class _Connector:
    """One ``connectTCP`` attempt (``IConnector``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.stopped = False
        self.transport: SimTransport | None = None

    def stopConnecting(self) -> None:
        self.stopped = True

    def disconnect(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
        else:
            self.stopConnecting()

    def connect(self) -> None:
        raise NotImplementedError("a simulated connector connects once")

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)


class _Unless(Factory):
    """``factory``, unless its connector was stopped meanwhile (then no protocol)."""

    def __init__(self, factory: ClientFactory, connector: _Connector) -> None:
        self._factory = factory
        self._connector = connector

    def buildProtocol(self, addr: Any) -> Any:
        if self._connector.stopped:
            return None
        return self._factory.buildProtocol(addr)


class SimReactor:
    """``IReactorTime`` and ``IReactorTCP.connectTCP`` of one simulated process."""

    def __init__(self, time: ProcessTime, network: Network, host: str) -> None:
        self._time = time
        self._network = network
        self._host = host

    def seconds(self) -> float:
        return self._time.seconds()

    def callLater(self, delay: float, fn: Any, *args: Any) -> Any:
        return self._time.callLater(delay, fn, *args)

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> _Connector:
        connector = _Connector(host, port)
        factory.startedConnecting(connector)
        connecting = self._network.connect(
            self._time, self._host, host, _Unless(factory, connector), timeout
        )

        def connected(protocol: Any) -> None:
            connector.transport = protocol.transport

        def failed(failure: Failure) -> None:
            if not connector.stopped:
                factory.clientConnectionFailed(connector, failure)

        connecting.addCallbacks(connected, failed)
        return connector
