"""The mirror manager: a mirror refused while it was being judged leaves nothing running.

Found by the simulator (``python -m ferry.sim``, seed 9): a source paused
past its lease's TTL resumed to an operator's ``mirror``, which asked the
lockspace who else holds the lease; before the answer came, the lease's
deadline fenced the export, so the job's ``start`` was refused -- but the
manager kept the job that never started as its current one, in
``connecting`` for good.  ``running`` stayed true: every later ``mirror``
was "already running", and the node was never restarted by whoever waits
for its migration to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import task

from fakes.lockspace import FakeLockspace
from ferry.chartnames import RoleTrigger
from ferry.clock import ReactorClock
from ferry.lease.manager import LeaseManager
from ferry.migrate.manager import MirrorBusy, MirrorManager
from ferry.migrate.options import Destination, FinishAction, MirrorOptions, StartOutcome
from ferry.serve.export import Export
from ferry.storage import Image
from support import sparse_file

SIZE = 1 << 20


def _no_connection(destination: Destination, factory: object, timeout: float) -> object:
    raise AssertionError("a refused mirror connects nowhere")


def test_a_mirror_refused_while_judged_leaves_nothing_running(tmp_path: Path) -> None:
    reactor = task.Clock()
    clock = ReactorClock(reactor)
    lockspace = FakeLockspace(clock)
    image = Image.open(sparse_file(tmp_path / "disk.img", SIZE))
    export = Export("disk", image, clock=clock)
    export.trigger(RoleTrigger.SERVE)
    lease = LeaseManager(lockspace, resource="disk", owner="src", clock=clock)
    lease.register()
    lease.acquire()
    manager = MirrorManager(export, gate=export, clock=clock, connector=_no_connection)
    manager.lease = lease
    lockspace.delayed = {"inquire"}
    answers: list[StartOutcome] = []
    options = MirrorOptions(action=FinishAction.NOTHING)
    manager.mirror(Destination("192.0.2.1", 10809), options).addCallback(answers.append)
    with pytest.raises(MirrorBusy):  # being judged: a second one is refused
        manager.mirror(Destination("192.0.2.1", 10809), options)
    export.trigger(RoleTrigger.LEASE_LOST)  # fenced while the lockspace answers
    lockspace.deliver()
    assert [a.ok for a in answers] == [False]
    assert answers[0].reply.endswith("export disk is fenced, not serving")
    assert not manager.running and manager.current is None
    image.close()
