"""The cluster of one run: two hosts, the lockspace, the network, the clients, the ledger.

It also keeps the one fact the operators and the checks need and ferry
must never confuse: which host *owns* the image -- has the newest copy and
the right to serve it.  Host ``a`` owns it at first; ownership moves to
a destination when its commit lands (its role goes ``committing ->
serving``) or when its source reports the image handed over (``completed``,
``resolve_committed``), whichever comes first.  A power cut on the owner
takes the ledger's promises back to what was durable.

Whoever watches transitions (the faults, the invariants) subscribes with
:meth:`Cluster.watch`; every process reports each of its records here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ferry.chartnames import MigrationTrigger, RoleTrigger
from ferry.migrate.source import MirrorSource
from ferry.sim.clients import Client
from ferry.sim.disk import PAGE, SimDisk
from ferry.sim.locallock import SimLocalLockspace
from ferry.sim.lockspace import KINDS, Lockspace, SimEtcdLockspace
from ferry.sim.network import Network
from ferry.sim.node import FerryProcess, Host
from ferry.sim.pattern import BLOCK, Ledger
from ferry.sim.world import World
from ferry.trace import TraceRecord

__all__ = ["Cluster"]

assert BLOCK == PAGE
TTLS: Final = (3.0, 6.0, 9.0)

Watcher = Callable[[FerryProcess, TraceRecord], None]

_HANDED_OVER: Final = frozenset({MigrationTrigger.COMMITTED, MigrationTrigger.RESOLVE_COMMITTED})


class Cluster:
    """Everything simulated in one run; see the module doc."""

    def __init__(self, world: World, *, bug: str | None) -> None:
        self.world = world
        self.bug = bug
        rng = world.stream("cluster")
        self.network = Network(world)
        kind, ttl = rng.choice(KINDS), rng.choice(TTLS)
        self.lockspace: Lockspace = (
            SimEtcdLockspace(world, self.network, ttl)
            if kind == "etcd"
            else SimLocalLockspace(world)
        )
        blocks = rng.choice((16, 32, 64))
        initial = bytearray(blocks * BLOCK)
        for block in range(blocks):
            if rng.random() < 0.5:
                initial[block * BLOCK : (block + 1) * BLOCK] = rng.randbytes(BLOCK)
        self.ledger = Ledger(blocks, bytes(initial))
        self.hosts = [
            Host(world, "a", "10.0.0.1", SimDisk(len(initial), world.stream("disk a"), initial)),
            Host(world, "b", "10.0.0.2", SimDisk(len(initial), world.stream("disk b"))),
        ]
        self.owner = self.hosts[0]
        self.processes: list[FerryProcess] = []
        self.migrations: list[tuple[FerryProcess, MirrorSource]] = []
        self._watchers: list[Watcher] = []
        count = rng.randint(1, 3)
        self.clients = [
            Client(world, i, count, self.ledger, self.network, self.hosts, lambda: self.owner)
            for i in range(count)
        ]
        world.log(
            "cluster",
            f"lockspace {self.lockspace.kind} ttl {self.lockspace.ttl} blocks {blocks}"
            f" clients {count}",
        )

    def describe(self) -> str:
        return (
            f"lockspace={self.lockspace.kind} ttl={self.lockspace.ttl} "
            f"blocks={self.ledger.blocks} clients={len(self.clients)}"
        )

    # -- processes ---------------------------------------------------------------------

    def start(self, host: Host, mode: str) -> FerryProcess:
        process = FerryProcess(
            host,
            mode,
            network=self.network,
            lockspace=self.lockspace,
            bug=self.bug,
            observe=self._observed,
            on_mirror=self.mirror_started,
        )
        self.processes.append(process)
        process.start()
        return process

    def other(self, host: Host) -> Host:
        return self.hosts[1] if host is self.hosts[0] else self.hosts[0]

    def host_at(self, address: str) -> Host:
        return next(h for h in self.hosts if h.address == address)

    def mirror_started(self, process: FerryProcess, source: MirrorSource) -> None:
        """``process`` started a migration (perhaps a while after ``mirror`` was asked)."""
        self.migrations.append((process, source))

    # -- what happens -------------------------------------------------------------------

    def watch(self, watcher: Watcher) -> None:
        self._watchers.append(watcher)

    def _observed(self, process: FerryProcess, record: TraceRecord) -> None:
        if record.ok:
            self._follow_the_image(process, record)
        for watcher in self._watchers:
            watcher(process, record)

    def _follow_the_image(self, process: FerryProcess, record: TraceRecord) -> None:
        new_owner = None
        if record.machine == "role" and record.event == RoleTrigger.COMMITTED:
            new_owner = process.host
        elif record.machine == "migration" and record.event in _HANDED_OVER:
            source = process.mirrors.current
            if source is not None:
                new_owner = self.host_at(source.destination.host)
        if new_owner is not None and new_owner is not self.owner:
            self.world.log("cluster", f"the image is {new_owner.name}'s now")
            self.owner = new_owner

    def reboot(self, host: Host) -> None:
        """Restart a host with nothing running on it: what was not synced is gone."""
        dropped = host.disk.power_cut()
        self.world.log(host.name, f"rebooted: {dropped} unsynced pages lost")
        if host is self.owner:
            self.ledger.power_cut()

    def power_cut(self, host: Host) -> None:
        """``host`` loses power (with whatever process runs on it)."""
        process = host.running
        if process is not None:
            process.power_cut()
        else:
            host.power_cut(self.network)
        if host is self.owner:
            self.ledger.power_cut()
