"""What must hold at every step of a run, and at its end.

At every step (after each callback the world runs):

* **one writer**: at most one process would perform a client's write now
  (its role has control and admits clients, and its lease -- if it has one
  -- allows writes: exactly the data plane's own test);
* **a writer holds its lease**: the lockspace itself (not the process's
  belief) says that process holds the lease right now -- a process whose
  local deadline outlived its grant would write beside the next holder.

At every transition a process records:

* **no MachineError**: no record is a refused or failed transition
  (:mod:`ferry.sim.node` reports those as they come);
* **durable where control goes**: when a process gains control (``serve``,
  a commit landing, ``resolve_serving``) and when a source hears its image
  was taken (``committed``, ``resolve_committed``), the new owner's disk
  must hold every acknowledged write (what reads see) and, in its synced
  layer, every write acknowledged before an acknowledged FLUSH or with FUA
  (what a crash right now would leave);
* **reads see acknowledged writes**: checked by the clients on each reply.

At the end (:meth:`Invariants.at_end`), once the faults have healed:

* **every migration ends**: each job of a live process is final (completed,
  failed, cancelled, or in_doubt settled);
* **a migration completes**: with no faults left, a last mirror hands the
  image over (:mod:`ferry.sim.runner` starts it);
* **durable on the owner**: the owner's disk, visible and synced, as above;
* **every trace replays**: each process's records replay against the
  statecharts and end where its machines are.
"""

from __future__ import annotations

from typing import Final

from ferry import statecharts
from ferry.chartnames import MigrationTrigger, RoleState, RoleTrigger
from ferry.replay import ReplayError, replay
from ferry.sim.cluster import Cluster
from ferry.sim.node import RESOURCE, FerryProcess, Host
from ferry.trace import TraceRecord

__all__ = ["Invariants"]

_GAINS_CONTROL: Final = frozenset(
    {RoleTrigger.SERVE, RoleTrigger.COMMITTED, RoleTrigger.RESOLVE_SERVING}
)
_HANDED_OVER: Final = frozenset({MigrationTrigger.COMMITTED, MigrationTrigger.RESOLVE_COMMITTED})


class Invariants:
    """The checks of one run; see the module doc."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.world = cluster.world
        self._charts = statecharts.load_all()
        role = self._charts["role"]
        # The role states in which the data plane performs a client's write.
        self._writable = frozenset(role.states_where("has_control")) & frozenset(
            role.states_where("clients_allowed")
        )
        self.world.check_each_step(self.each_step)
        cluster.watch(self._transition)

    # -- every step ------------------------------------------------------------------------

    def each_step(self) -> None:
        writers = []
        for host in self.cluster.hosts:
            process = host.process
            if process is None or not process.alive:
                continue
            export = process.export
            if export.state in self._writable:
                lease = export.lease
                if lease is None or lease.may_write():
                    writers.append(process)
        if len(writers) > 1:
            names = ", ".join(f"{p.name} ({p.export.state})" for p in writers)
            self.world.violate("one node accepts writes", names)
        for process in writers:
            if process.lease is None:
                continue
            holder = self.cluster.lockspace.holder(RESOURCE)
            if holder is None or holder.owner != process.owner:
                held = "nobody" if holder is None else holder.describe()
                self.world.violate(
                    "a writer holds its lease",
                    f"{process.name} accepts writes (lease {process.lease.state}, deadline "
                    f"{process.lease.deadline}, monotonic clock {process.clock.monotonic():.3f})"
                    f" but the lockspace says {held}",
                )

    # -- transitions -------------------------------------------------------------------------

    def _transition(self, process: FerryProcess, record: TraceRecord) -> None:
        if not record.ok:
            return
        if record.machine == "role" and record.event in _GAINS_CONTROL:
            self.durable_on(process.host, f"{process.name} took control ({record.event})")
        elif record.machine == "migration" and record.event in _HANDED_OVER:
            source = process.mirrors.current
            if source is not None:
                target = self.cluster.host_at(source.destination.host)
                self.durable_on(target, f"{process.name} handed the image to {target.name}")

    def durable_on(self, host: Host, when: str) -> None:
        """``host`` has control now: every promise is on its disk, and the durable ones synced."""
        ledger = self.cluster.ledger
        verdict = ledger.judge_image(host.disk.visible, ledger.floor)
        if not verdict.ok:
            self.world.violate(
                "acknowledged writes are where control is", f"{when}: {verdict.detail}"
            )
            return
        verdict = ledger.judge_image(host.disk.synced, ledger.durable)
        if not verdict.ok:
            self.world.violate(
                "durable writes survive a crash where control is", f"{when}: {verdict.detail}"
            )

    # -- the end ---------------------------------------------------------------------------------

    def at_end(self) -> None:
        self._migrations_ended()
        if self.world.violation is None:
            self._owner_has_the_data()
        if self.world.violation is None:
            self._traces_replay()

    def _migrations_ended(self) -> None:
        for process, source in self.cluster.migrations:
            if process.alive and not source.job.final:
                self.world.violate("every migration ends", f"{process.name}: still {source.state}")
                return

    def _owner_has_the_data(self) -> None:
        owner = self.cluster.owner
        process = owner.running
        if process is None or process.export.state != RoleState.SERVING:
            state = "nothing" if process is None else process.export.state
            self.world.violate("the owner serves in the end", f"{owner.name} runs {state}")
            return
        self.durable_on(owner, "at the end")

    def _traces_replay(self) -> None:
        for process in self.cluster.processes:
            lines = [record.to_json() for record in process.records]
            try:
                result = replay(lines, self._charts)
            except ReplayError as error:
                self.world.violate("every trace replays", f"{process.name}: {error}")
                return
            ended = result.final_states.get(("role", process.export.name))
            if ended != process.export.state:
                self.world.violate(
                    "every trace replays",
                    f"{process.name}: the trace ends in {ended}, "
                    f"the role is {process.export.state}",
                )
                return
