"""An etcd call's deadline is on the monotonic clock: a wall clock stepped back waits no longer.

ferry's etcd backend runs here against the simulator's etcd member, over
its network (``ferry.sim``): the first endpoint refuses the connection, and
while it does the process's wall clock steps back a minute; the second,
etcd, takes the connection but is stopped (SIGSTOP), so only the call's
deadline can end it.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from ferry.clock import ReactorClock
from ferry.lease.backend import LockspaceUnavailable
from ferry.lease.etcd import EtcdLockspace
from ferry.sim.etcd import ETCD_ADDRESS, ETCD_PORT, EtcdServer
from ferry.sim.network import Network
from ferry.sim.process import ProcessTime
from ferry.sim.reactor import SimReactor
from ferry.sim.world import World

HOST = "10.0.0.1"
NOBODY = "10.0.0.60"  # reachable, nothing listens: connection refused
TIMEOUT = 5.0


def test_a_wall_clock_stepped_back_does_not_stretch_a_call_s_deadline() -> None:
    world = World(0)
    network = Network(world)
    EtcdServer(world, network).process.pause()  # the second endpoint never answers
    time = ProcessTime(world, "ferry")
    clock = ReactorClock(time, monotonic=time.monotonic)
    lockspace = EtcdLockspace(
        [f"http://{NOBODY}:{ETCD_PORT}", f"http://{ETCD_ADDRESS}:{ETCD_PORT}"],
        reactor=SimReactor(time, network, HOST),
        request_timeout=TIMEOUT,
        clock=clock,
    )
    failures: list[Failure] = []
    lockspace.inquire("/images/disk.img").addErrback(failures.append)
    time.jump(-60.0)  # before the refusal comes back from the first endpoint
    world.run(TIMEOUT + 0.5)
    assert world.violation is None
    assert len(failures) == 1, "the call outlived its deadline"
    assert failures[0].check(LockspaceUnavailable)
    assert "did not answer /v3/kv/range within 5 s" in failures[0].getErrorMessage()
