"""The source side of a live migration, as pure logic on the injected clock.

One module per job: :mod:`~ferry.migrate.ratelimit` (the bandwidth limit),
:mod:`~ferry.migrate.speed` (the rate over a recent window),
:mod:`~ferry.migrate.convergence` (when to switch over; auto-converge),
:mod:`~ferry.migrate.backoff` (retry delays), :mod:`~ferry.migrate.passes`
(what each pass sends), :mod:`~ferry.migrate.progress` (the status fields
and the ``--wait`` line), and :mod:`~ferry.migrate.job`, which ties them to
the ``migration`` statechart.  No sockets here: the Twisted side drives
:class:`MigrationJob` and moves the bytes.
"""

from ferry.migrate.backoff import Backoff
from ferry.migrate.convergence import Action, ConvergencePolicy, Decision, expected_downtime
from ferry.migrate.job import MigrationJob
from ferry.migrate.passes import CopyOp, OpKind, PassPlan, PassPlanner
from ferry.migrate.progress import MigrationProgress
from ferry.migrate.ratelimit import RateLimiter
from ferry.migrate.speed import SpeedMeter

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
    "RateLimiter",
    "SpeedMeter",
    "expected_downtime",
]
