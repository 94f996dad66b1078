"""One seed, start to finish; many seeds, on as many cores as asked.

A run has four phases, all on simulated time:

1. **chaos** (10 to 30 s): clients write, operators mirror, break and
   throttle, faults are injected;
2. **settle** (up to :data:`SETTLE`): faults healed, operators only restart
   what stopped, until the owner serves and the other host listens with
   no migration running, for :data:`QUIET` seconds in a row -- a cluster
   that never gets there is a broken invariant (``the cluster settles``);
3. **a last migration** (up to :data:`LAST_MIGRATION`): one clean mirror
   from the owner, which must complete (``a migration completes``);
4. **the end**: clients finish what is in flight, then
   :meth:`~ferry.sim.invariants.Invariants.at_end`.

A failure logged by ferry's code (``log.failure``: an exception a callback
caught, a Deferred whose error nobody handled) is a broken invariant too
(``no internal error``).  The garbage collector runs only at the end of a
seed, so what it finds is found at the same point every time.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, cast

from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from ferry.chartnames import MigrationState, RoleState
from ferry.migrate.options import FinishAction, MirrorOptions
from ferry.migrate.source import MirrorSource
from ferry.sim.cluster import Cluster
from ferry.sim.faults import FAULTS, Faults
from ferry.sim.invariants import Invariants
from ferry.sim.operators import Operators
from ferry.sim.world import Violation, World

__all__ = ["SeedResult", "run_seed"]

SETTLE: Final = 300.0
QUIET: Final = 5.0
LAST_MIGRATION: Final = 120.0
DRAIN: Final = 30.0


@dataclass(frozen=True)
class SeedResult:
    seed: int
    violation: Violation | None
    digest: str
    steps: int
    seconds: float  # simulated
    summary: str
    tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.violation is None


@cache
def _freeze_baseline() -> None:
    """Leave what lived before the first seed (modules, cached charts) out of every collection.

    Traversing it again at each seed cost more than a fifth of the seed.
    It is frozen once and for good; what is made later (a seed's objects,
    and whatever outlives a seed) stays collectable.  Freezing afresh at
    each seed would freeze the garbage an earlier seed left, and frozen
    garbage is never freed.
    """
    gc.collect()
    gc.freeze()


@contextmanager
def _internal_errors(world: World) -> Iterator[None]:
    """Failures ferry logs break the run, and so does an unhandled error in a Deferred.

    The latter is logged when its Deferred is collected, so the garbage
    collector runs at the end of the seed, once the seed's objects are
    unreachable, and not during it (a collection at a random moment would
    log at a random moment).  What an earlier seed left is collected before
    this seed's observer listens, so it is never blamed on this seed.
    """

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            what = f"{formatEvent(event)}: {failure.getErrorMessage()}"
            world.violate("no internal error", what)

    _freeze_baseline()
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    globalLogPublisher.addObserver(cast(ILogObserver, observe))
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observe))
        if collecting:
            gc.enable()


def run_seed(
    seed: int,
    *,
    faults: frozenset[str] = frozenset(FAULTS),
    bug: str | None = None,
    keep_trace: bool = False,
) -> SeedResult:
    """Run one seed; the result says which invariant broke first, if one did."""
    world = World(seed, keep_trace=keep_trace)
    with _internal_errors(world):
        summary = _run(world, faults, bug)
        seconds = world.now()
        world.forget()  # nothing of the run is reachable now: the collection finds it all
    return SeedResult(
        seed,
        world.violation,
        world.trace.digest(),
        world.steps,
        seconds,
        summary,
        tuple(world.trace.lines if keep_trace else world.trace.tail())
        if world.violation is not None or keep_trace
        else (),
    )


def _run(world: World, faults: frozenset[str], bug: str | None) -> str:
    """The four phases (see the module doc); a line that sums the run up."""
    cluster = Cluster(world, bug=bug)
    try:
        invariants = Invariants(cluster)
        injector = Faults(cluster, faults)
        operators = Operators(cluster)
        first, second = cluster.hosts
        cluster.start(first, "serve")
        cluster.start(second, "listen")
        for client in cluster.clients:
            client.start()
        operators.start()
        injector.start()
        chaos = world.stream("phases").uniform(10.0, 30.0)
        world.run(chaos)
        world.log("phase", "heal")
        injector.heal()
        operators.chaos = False
        _settle(world, cluster, operators)
        _last_migration(world, cluster, operators)
        _drain(world, cluster)
        if world.violation is None:
            invariants.at_end()
    finally:
        cluster.lockspace.close()  # the local one's lock directory
    return (
        f"{cluster.describe()} steps={world.steps} faults={injector.injected} "
        f"migrations={len(cluster.migrations)} owner={cluster.owner.name}"
    )


def _settled(cluster: Cluster) -> bool:
    owner = cluster.owner.running
    other = cluster.other(cluster.owner).running
    if owner is None or other is None or owner.status != "running" or other.status != "running":
        return False
    if owner.export.state != RoleState.SERVING or other.export.state != RoleState.LISTENING:
        return False
    return all(source.job.final for p, source in cluster.migrations if p.alive)


def _settle(world: World, cluster: Cluster, operators: Operators) -> None:
    """Run until the cluster has stayed settled for :data:`QUIET` seconds (or SETTLE passed).

    What a fault set going before it healed (a lockspace request still on
    its way, a stalled connection) may still act: only a settled cluster
    that stays settled shows the faults are over.
    """
    deadline = world.now() + SETTLE
    while world.violation is None and world.now() < deadline:
        world.run(deadline, stop=lambda: _settled(cluster))
        if not _settled(cluster):
            break
        world.run(min(deadline, world.now() + QUIET), stop=lambda: not _settled(cluster))
        if _settled(cluster):
            return
    if world.violation is None and not _settled(cluster):
        states = ", ".join(
            f"{h.name}: {'-' if h.running is None else h.running.export.state}"
            for h in cluster.hosts
        )
        running = [
            f"{p.name} {s.state}" for p, s in cluster.migrations if p.alive and not s.job.final
        ]
        world.violate(
            "the cluster settles", f"after {SETTLE:g} s without faults: {states}; {running}"
        )


def _last_migration(world: World, cluster: Cluster, operators: Operators) -> None:
    if world.violation is not None:
        return
    world.log("phase", "last migration")
    options = MirrorOptions(action=FinishAction.NOTHING, reply_timeout=30.0, retry_max=2.0)
    source = cluster.owner.running
    before = len(cluster.migrations)
    operators.last_reply = None
    if source is None or not operators.mirror(options):
        world.violate("a migration completes", "the last mirror could not be started")
        return

    def started() -> MirrorSource | None:
        # mirror asks the lockspace first: the job may start a moment later.
        return next((s for p, s in cluster.migrations[before:] if p is source), None)

    def ended() -> bool:
        job = started()
        return job.job.final if job is not None else operators.last_reply is not None

    world.run(world.now() + LAST_MIGRATION, stop=ended)
    job = started()
    if world.violation is None and job is None:
        world.violate(
            "a migration completes",
            f"the last mirror from {source.name} never started: {operators.last_reply}",
        )
        return
    if world.violation is None and job is not None and job.state != MigrationState.COMPLETED:
        world.violate(
            "a migration completes",
            f"without faults, the last mirror from {source.name} ended {job.state}: "
            f"{job.last_error or (job.result.reason if job.result else '')}",
        )


def _drain(world: World, cluster: Cluster) -> None:
    if world.violation is not None:
        return
    world.log("phase", "drain")
    for client in cluster.clients:
        client.stop()
    world.run(world.now() + DRAIN, stop=lambda: all(c.idle for c in cluster.clients))
