"""The migration source's decisions, as pure logic on the injected clock: no sockets, no Twisted.

One module per job: :mod:`~ferry.migrate.core.speed` (the rate over a
recent window), :mod:`~ferry.migrate.core.convergence` (when to switch
over; auto-converge), :mod:`~ferry.migrate.core.backoff` (retry delays),
:mod:`~ferry.migrate.core.passes` (what each pass sends),
:mod:`~ferry.migrate.core.progress` (the status fields and the ``--wait``
line), :mod:`~ferry.migrate.core.stats` (the counters by reason),
:mod:`~ferry.migrate.core.ranges` (what is on the wire, for write-blocking), and
:mod:`~ferry.migrate.core.job`, which ties them to the ``migration``
statechart.  The bandwidth limit is :mod:`ferry.ratelimit`, shared with the
data plane's auto-converge throttle.  The Twisted side (the rest of
:mod:`ferry.migrate`) drives :class:`MigrationJob` and moves the bytes; an
import-linter contract keeps Twisted out of here.
"""

from ferry.migrate.core.backoff import Backoff
from ferry.migrate.core.convergence import Action, ConvergencePolicy, Decision, expected_downtime
from ferry.migrate.core.job import MigrationJob
from ferry.migrate.core.passes import CopyOp, OpKind, PassPlan, PassPlanner
from ferry.migrate.core.progress import MigrationProgress
from ferry.migrate.core.speed import SpeedMeter

__all__ = [
    "Action",
    "Backoff",
    "ConvergencePolicy",
    "CopyOp",
    "Decision",
    "MigrationJob",
    "MigrationProgress",
    "OpKind",
    "PassPlan",
    "PassPlanner",
    "SpeedMeter",
    "expected_downtime",
]
