"""Which faults a run injects, and when: now and then, and right where it matters.

The kinds (``--faults`` takes a comma-separated list of them; all by default):

======================  ===================================================
``delay``               every connection slower for a while
``reset``               a connection reset after some more bytes, any byte
``stall``               one end of a connection stops reading for a while
``partition``           a host cut off for a while: its connections go quiet
                        (reset when it is back), the lockspace out of reach
``kill``                a ferry process killed (SIGKILL): its page cache stays
``power``               a host loses power: its unsynced pages may be gone,
                        it answers nothing until it is back
``pause``               a process stopped for a while, sometimes past its TTL
``jump``                a process's clock steps forward or back
``eio``, ``enospc``     a disk whose writes and syncs fail for a while
``slow-disk``           a disk whose syncs take up to a second
``unreachable``         a process cannot reach the lockspace for a while
``slow``                a process's lockspace requests are slow (etcd)
``lost-answers``        the lockspace applies requests and the answers get lost
                        (etcd; see :mod:`ferry.sim.lockspace`)
======================  ===================================================

Faults come two ways.  *Timed*: at random moments (a rate drawn per seed),
a random kind against a random target.  *Triggered*: when a process takes
an interesting transition -- a migration quiescing, offering, committing,
its commit acknowledged; a lease being offered or taken over -- a fault
may be injected moments later, at that process or its peer, because the
windows that matter are milliseconds wide and a fault at a random time
would almost never land in one (FoundationDB's "buggify" spirit).

:meth:`Faults.heal` stops injecting and undoes what lasts: hosts powered on,
processes resumed, disks and lockspace paths mended.  Clocks that jumped
stay where they are.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Final

from ferry.sim.cluster import Cluster
from ferry.sim.disk import DiskFaults
from ferry.sim.node import FerryProcess, Host
from ferry.trace import TraceRecord

__all__ = ["FAULTS", "Faults", "parse_faults"]

FAULTS: Final = (
    "delay",
    "reset",
    "stall",
    "partition",
    "kill",
    "power",
    "pause",
    "jump",
    "eio",
    "enospc",
    "slow-disk",
    "unreachable",
    "slow",
    "lost-answers",
)

#: Transitions after which a fault is most likely to find a bug, and the faults
#: that matter most there: (machine, event) -> kinds.
_WINDOWS: Final = {
    ("migration", "quiesce"): ("reset", "stall", "slow-disk", "eio", "kill", "pause", "power"),
    ("migration", "offer"): ("slow", "lost-answers", "unreachable", "pause", "jump", "reset"),
    ("migration", "commit"): (
        "reset",
        "stall",
        "partition",
        "pause",
        "kill",
        "power",
        "slow",
        "lost-answers",
    ),
    ("migration", "committed"): ("kill", "power", "reset", "pause"),
    ("migration", "fail"): ("slow", "lost-answers", "unreachable", "pause", "kill"),
    ("migration", "reclaim"): ("slow", "lost-answers", "unreachable", "pause", "reset"),
    ("migration", "next_pass"): ("reset", "stall", "eio", "slow-disk", "delay"),
    ("role", "sender_connected"): ("reset", "stall", "kill", "eio", "slow-disk"),
    ("role", "commit"): (
        "partition",
        "slow",
        "unreachable",
        "lost-answers",
        "pause",
        "kill",
        "power",
        "reset",
        "slow-disk",
        "eio",
    ),
    ("role", "committed"): ("kill", "power", "reset", "pause"),
    ("lease", "prepare_migrate"): ("slow", "lost-answers", "unreachable", "pause", "jump"),
    ("lease", "take_over"): (
        "partition",
        "slow",
        "lost-answers",
        "unreachable",
        "pause",
        "reset",
        "kill",
    ),
    ("lease", "renewal_failed"): ("pause", "jump", "unreachable"),
}


def parse_faults(text: str) -> frozenset[str]:
    """``all``, ``none``, or a comma-separated list of kinds; ValueError names a bad one."""
    text = text.strip()
    if text == "all":
        return frozenset(FAULTS)
    if text in ("none", ""):
        return frozenset()
    kinds = frozenset(k.strip() for k in text.split(","))
    unknown = sorted(kinds - set(FAULTS))
    if unknown:
        raise ValueError(
            f"unknown fault {', '.join(unknown)}; known: all, none, {', '.join(FAULTS)}"
        )
    return kinds


class Faults:
    """The injector of one run; see the module doc."""

    def __init__(self, cluster: Cluster, enabled: frozenset[str]) -> None:
        self.cluster = cluster
        self.world = cluster.world
        self.rng = cluster.world.stream("faults")
        self.kinds = [kind for kind in FAULTS if kind in enabled]
        self.active = bool(self.kinds)
        self.rate = self.rng.uniform(0.05, 0.4)  # timed faults per second
        self.trigger_chance = self.rng.uniform(0.02, 0.5)
        self._heals: dict[int, Callable[[], None]] = {}
        self._next_heal = 0
        self.injected = 0
        cluster.watch(self._transition)

    def start(self) -> None:
        if self.active:
            self.world.call_later(self.rng.expovariate(self.rate), "faults", self._timed)

    def heal(self) -> None:
        """No more faults; undo the lasting ones."""
        self.active = False
        for undo in list(self._heals.values()):
            undo()

    # -- when ----------------------------------------------------------------------------

    def _timed(self) -> None:
        if not self.active:
            return
        self.inject(self.rng.choice(self.kinds), None)
        self.world.call_later(self.rng.expovariate(self.rate), "faults", self._timed)

    def _transition(self, process: FerryProcess, record: TraceRecord) -> None:
        if not self.active or not record.ok:
            return
        window = _WINDOWS.get((record.machine, record.event))
        if window is None or self.rng.random() >= self.trigger_chance:
            return
        rng = self.rng
        kinds = [kind for kind in window if kind in self.kinds] or self.kinds
        for _ in range(rng.choice((1, 1, 2))):
            target = process
            if rng.random() < 0.4:
                peer = self.cluster.other(process.host).running
                target = peer if peer is not None else process
            delay = rng.choice((0.0, rng.uniform(0.0, 0.005), rng.uniform(0.0, 0.05)))
            self.world.call_later(delay, "faults", self.inject, rng.choice(kinds), target)

    # -- what ----------------------------------------------------------------------------

    def inject(self, kind: str, process: FerryProcess | None) -> None:
        if not self.active:
            return
        rng = self.rng
        if process is not None and not process.alive:
            process = None
        if process is None:
            running = [h.running for h in self.cluster.hosts if h.running is not None]
            process = rng.choice(running) if running else None
        host = process.host if process is not None else rng.choice(self.cluster.hosts)
        ttl = self.cluster.lockspace.ttl or 6.0
        self.injected += 1
        network = self.cluster.network
        if kind == "delay":
            network.extra_latency = rng.uniform(0.005, 0.3)
            self._for(
                rng.uniform(0.5, 10.0), "delay", lambda: setattr(network, "extra_latency", 0.0)
            )
        elif kind in ("reset", "stall"):
            links = network.links_of(process.time) if process is not None else network.links
            links = [link for link in links if not link.broken]
            if not links:
                return
            link = rng.choice(links)
            if kind == "reset":
                after = rng.choice((0, rng.randrange(1, 64 * 1024)))
                self.world.log("fault", f"reset {link.name} after {after} bytes")
                link.reset(rng.randrange(2), after)
            else:
                end = rng.choice(link.ends)
                seconds = rng.uniform(0.1, 15.0)
                self.world.log("fault", f"stall {end.host} end of {link.name} for {seconds:.3f}s")
                end.stall()
                # Undone at heal too: a stall begun late in the chaos must not
                # outlast it into the runs that are checked "without faults".
                self._for(seconds, f"stall {end.host} end of {link.name} over", end.unstall)
        elif kind == "partition" and host.powered and network.up(host.address):
            self._partition(host, process, rng.uniform(0.5, 2.5 * ttl))
        elif kind == "kill" and process is not None:
            self.world.log("fault", f"kill {process.name}")
            process.kill()
        elif kind == "power" and host.powered:
            self.world.log("fault", f"power cut on {host.name}")
            self.cluster.power_cut(host)
            self._for(rng.uniform(0.2, 8.0), f"power {host.name}", lambda: self._power_on(host))
        elif kind == "pause" and process is not None and not process.time.paused:
            seconds = rng.choice((rng.uniform(0.05, 1.0), rng.uniform(0.5, 2.5) * ttl))
            self.world.log("fault", f"pause {process.name} for {seconds:.3f}s")
            process.time.pause()
            self._for(seconds, f"resume {process.name}", process.time.resume)
        elif kind == "jump" and process is not None:
            seconds = rng.uniform(0.2, 2.0 * ttl) * rng.choice((-1, 1))
            self.world.log("fault", f"clock of {process.name} jumps {seconds:+.3f}s")
            process.time.jump(seconds)
        elif kind in ("eio", "enospc", "slow-disk"):
            self._disk(kind, host)
        elif kind in ("unreachable", "slow", "lost-answers") and process is not None:
            self._lockspace(kind, process, ttl)

    def _disk(self, kind: str, host: Host) -> None:
        rng, disk = self.rng, host.disk
        seconds = rng.uniform(0.2, 8.0)
        if kind == "slow-disk":
            disk.faults.latency = (0.001, rng.uniform(0.05, 1.0))
        else:
            disk.faults.errno = errno.EIO if kind == "eio" else errno.ENOSPC
            disk.faults.write_error = rng.choice((0.0, rng.uniform(0.0, 0.3)))
            disk.faults.sync_error = rng.uniform(0.1, 1.0)
        self.world.log("fault", f"{kind} on {host.name}'s disk for {seconds:.3f}s")

        def mend() -> None:
            disk.faults = DiskFaults()

        self._for(seconds, f"mend {host.name}'s disk", mend)

    def _lockspace(self, kind: str, process: FerryProcess, ttl: float) -> None:
        rng = self.rng
        seconds = rng.uniform(0.2, 2.5 * ttl)
        severity = rng.uniform(0.05, 1.5) if kind == "slow" else rng.uniform(0.2, 1.0)
        self.world.log("fault", f"lockspace {kind} for {process.name} for {seconds:.3f}s")
        mend = self.cluster.lockspace.impair(process.time, kind, severity)
        self._for(seconds, f"mend {process.name}'s lockspace", mend)

    def _partition(self, host: Host, process: FerryProcess | None, seconds: float) -> None:
        network = self.cluster.network
        self.world.log("fault", f"partition {host.name} for {seconds:.3f}s")
        network.partition(host.address)
        lockspace = self.cluster.lockspace
        mend = None if process is None else lockspace.impair(process.time, "partition", 0.0)

        def heal() -> None:
            if mend is not None:
                mend()
            if host.powered:
                network.rejoin(host.address)

        self._for(seconds, f"partition of {host.name} healed", heal)

    def _power_on(self, host: Host) -> None:
        if not host.powered:
            host.power_on(self.cluster.network)

    def _for(self, seconds: float, what: str, undo: Callable[[], None]) -> None:
        """Undo a fault after ``seconds`` (or at :meth:`heal`, whichever comes first)."""
        key = self._next_heal
        self._next_heal += 1

        def run() -> None:
            if self._heals.pop(key, None) is not None:
                self.world.log("fault", what)
                undo()

        self._heals[key] = run
        self.world.call_later(seconds, "faults", run)
