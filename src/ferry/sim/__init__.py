"""A deterministic simulator: ferry's real objects on one simulated clock, every fault injected.

The unit and integration tests prove the faults someone thought of.  The
simulator runs the real code -- the NBD server and client, the migration
source and the destination's commit, the lease manager, the role,
migration and lease charts -- with everything around it simulated: time is
one ``twisted.internet.task.Clock``, the network is in-memory transports,
disks are byte arrays with a synced and an unsynced layer, and the lease
manager's backend is ferry's own -- the local one on real lock files, or
the etcd one talking HTTP across the simulated network to a simulated etcd
member.  One seed drives every choice (latencies,
faults, what the clients write, what the operators do), so a seed that
breaks an invariant runs again exactly, trace and all (the model is
TigerBeetle's VOPR and FoundationDB's simulation).

The parts, one job each:

* :mod:`~ferry.sim.world`: the seed, its random streams, the clock, the
  trace, and the loop that runs events and checks invariants after each;
* :mod:`~ferry.sim.process`: a process's view of time (paused, killed, a
  clock that jumps);
* :mod:`~ferry.sim.network`, :mod:`~ferry.sim.disk`,
  :mod:`~ferry.sim.lockspace`: what the code cannot tell from the real
  thing, and the faults each can inject; :mod:`~ferry.sim.locallock`: the
  real local lockspace, and what a process's death does to its locks;
  :mod:`~ferry.sim.etcd`: an etcd member; :mod:`~ferry.sim.reactor`: the
  TCP a Twisted client needs of a process's reactor;
* :mod:`~ferry.sim.node`: a host (its disk outlives processes) and the
  ferry process on it, built from the same parts as ``ferry serve`` and
  ``ferry listen``; :mod:`~ferry.sim.mirrors`: its mirror manager, which
  tells the simulator of each migration it starts;
* :mod:`~ferry.sim.pattern`, :mod:`~ferry.sim.clients`: NBD clients writing
  blocks a reader can date, and the ledger of what was acknowledged;
* :mod:`~ferry.sim.operators`: ``mirror``, ``break``, ``mirror_max_bps``, a
  second ``mirror``, and restarting what stopped;
* :mod:`~ferry.sim.faults`: which faults a run injects, and when;
* :mod:`~ferry.sim.invariants`: what must always hold, and at the end;
* :mod:`~ferry.sim.bugs`: bugs planted in the simulator's own doubles, to
  prove the invariants still bite;
* :mod:`~ferry.sim.runner` and ``python -m ferry.sim``: a seed, many seeds.

Nothing in ferry imports this package (an import-linter contract says so).
"""
