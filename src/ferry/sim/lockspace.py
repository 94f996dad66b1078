"""A run's lockspace: etcd or a local lock directory, with ferry's own backend for each.

Which one is drawn from the seed.  Either way the lease manager talks to
ferry's real backend:

* ``etcd``: :class:`~ferry.lease.etcd.EtcdLockspace`, built as the node
  builds it (:func:`~ferry.lease.spec.open_lockspace`), on the process's
  reactor (:mod:`ferry.sim.reactor`), over the simulated network to a
  simulated etcd member (:mod:`ferry.sim.etcd`);
* ``local``: :class:`~ferry.lease.local.LocalLockspace` on real lock files
  (:mod:`ferry.sim.locallock`).

:class:`Lockspace` is what the rest of the simulator needs of either: a
backend per process, who holds the image in the lockspace's own view (for
the invariants), and the faults between one process and the lockspace
(:meth:`Lockspace.impair`):

==================  =============================================  ==================
fault               etcd                                           local
==================  =============================================  ==================
``unreachable``     the path between the host and etcd is cut      every call fails
``slow``            that path takes longer, each way               (nothing: a local
                                                                   call is at once)
``lost-answers``    etcd applies requests, then drops the          (nothing)
                    connection instead of answering
``partition``       (the network does it)                          every call fails
==================  =============================================  ==================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from ferry.clock import ReactorClock
from ferry.lease.backend import Holder, LeaseBackend
from ferry.lease.spec import open_lockspace
from ferry.sim.etcd import ETCD_ADDRESS, ETCD_PORT, EtcdServer
from ferry.sim.network import Network
from ferry.sim.process import ProcessTime
from ferry.sim.reactor import SimReactor
from ferry.sim.world import World

__all__ = ["KINDS", "Lockspace", "SimEtcdLockspace"]

KINDS: Final = ("etcd", "local")

Undo = Callable[[], None]


class Lockspace(Protocol):
    """What the simulator needs of a run's lockspace; see the module doc."""

    @property
    def kind(self) -> str: ...

    @property
    def ttl(self) -> float | None: ...

    def client(self, process: ProcessTime, host: str, clock: ReactorClock) -> LeaseBackend:
        """``process``'s own backend (on ``host``, its timers on ``clock``)."""
        ...

    def holder(self, resource: str) -> Holder | None:
        """Who holds ``resource`` exclusively now, in the lockspace's own view."""
        ...

    def impair(self, process: ProcessTime, kind: str, severity: float) -> Undo:
        """Put fault ``kind`` between ``process`` and the lockspace; the answer undoes it.

        ``severity`` is, for ``slow``, the seconds added each way, and for
        ``lost-answers``, the chance that an answer is lost.
        """
        ...

    def close(self) -> None:
        """The run is over."""
        ...


class SimEtcdLockspace:
    """A simulated etcd member, and ferry's etcd backend in each process."""

    kind: Final = "etcd"

    def __init__(self, world: World, network: Network, ttl: float) -> None:
        self.world = world
        self.network = network
        self.ttl: float = ttl
        self.server = EtcdServer(world, network)
        self._hosts: dict[ProcessTime, str] = {}

    def client(self, process: ProcessTime, host: str, clock: ReactorClock) -> LeaseBackend:
        self._hosts[process] = host
        reactor = SimReactor(process, self.network, host)
        spec = f"etcd:http://{ETCD_ADDRESS}:{ETCD_PORT}"
        return open_lockspace(spec, reactor=reactor, ttl=self.ttl, clock=clock)

    def holder(self, resource: str) -> Holder | None:
        return self.server.holder(resource)

    def impair(self, process: ProcessTime, kind: str, severity: float) -> Undo:
        host, network, server = self._hosts[process], self.network, self.server
        if kind == "unreachable":
            network.cut(host, ETCD_ADDRESS)
            return lambda: network.mend(host, ETCD_ADDRESS)
        if kind == "slow":
            network.slow(host, ETCD_ADDRESS, severity)
            return lambda: network.slow(host, ETCD_ADDRESS, 0.0)
        if kind == "lost-answers":
            server.lost_answers[host] = severity

            def answer_again() -> None:
                server.lost_answers.pop(host, None)

            return answer_again
        return _nothing  # partition: the network cuts the host off already

    def close(self) -> None:
        """Nothing outlives the run."""


def _nothing() -> None:
    """A fault that does nothing here."""
