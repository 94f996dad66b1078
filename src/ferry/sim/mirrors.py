"""A process's :class:`~ferry.migrate.manager.MirrorManager`, telling the simulator of each job.

``mirror`` may start its job later than it returns (it asks the lockspace
first who else holds the lease), so the simulator learns of a migration
when the manager starts one: :attr:`WatchedMirrors.on_start` is called with
each new :class:`~ferry.migrate.source.MirrorSource`.  Nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred

from ferry.migrate.manager import MirrorManager
from ferry.migrate.options import Destination, MirrorOptions, StartOutcome
from ferry.migrate.source import MirrorSource

__all__ = ["WatchedMirrors"]


class WatchedMirrors(MirrorManager):
    """A MirrorManager that calls :attr:`on_start` with each job it starts."""

    on_start: Callable[[MirrorSource], None] = staticmethod(lambda source: None)

    def _start(self, destination: Destination, options: MirrorOptions) -> Deferred[StartOutcome]:
        started = super()._start(destination, options)
        assert self.current is not None
        self.on_start(self.current)
        return started
