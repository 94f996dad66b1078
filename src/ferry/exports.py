"""A node's exports, by name: each image with its role, its migrations and its lease.

``ferry serve`` has one export; a daemon has many, added and removed while it
runs.  Whatever serves, controls, observes or moves an export finds it here
by name, never through a field of the node that assumes there is only one:
the NBD catalog (the handshake), the control commands, the metrics, the
migration manager, the shutdown.

An :class:`ExportUnit` is everything that belongs to one export: the image
and its role (:class:`~ferry.serve.export.Export`), its migrations
(:class:`~ferry.migrate.manager.MirrorManager`, at most one at a time), and
its lease once it holds one (or, listening, its lease-to-be).  A lease that
is lost fences the unit: the role goes ``fenced`` and a running migration
ends.  The :class:`ExportRegistry` holds the units by name; the empty name
is the first export added (NBD's default export).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ferry.chartnames import RoleTrigger
from ferry.lease.incoming import IncomingLease
from ferry.lease.manager import LeaseManager
from ferry.migrate.core.stats import MigrationStats
from ferry.migrate.manager import MirrorManager
from ferry.serve.export import Export
from ferry.serve.stats import RequestStats
from ferry.status import StatusSnapshot
from ferry.storage import Image

__all__ = ["ExportConfig", "ExportRegistry", "ExportUnit", "UnknownExport"]

log = Logger()


@dataclass(frozen=True)
class ExportConfig:
    """One export: which file, under which name, serving or waiting for a migration."""

    file: str
    name: str = ""
    read_only: bool = False
    listen: bool = False  # wait for a migration instead of serving at once
    resource: str | None = None  # the lease's name (default: the image's real path)
    description: str = ""

    @property
    def export_name(self) -> str:
        """``--name``, or the file's name (also what logs and traces call it)."""
        return self.name or os.path.basename(self.file)


class UnknownExport(LookupError):
    """No export of that name; ``str`` says so, in one line."""


class ExportUnit:
    """One export and what belongs to it; see the module doc."""

    def __init__(self, config: ExportConfig, export: Export, mirrors: MirrorManager) -> None:
        self.config = config
        self.export = export
        self.mirrors = mirrors
        self.lease: LeaseManager | None = None
        self.incoming: IncomingLease | None = None
        #: Where clients reach it, ``HOST:PORT`` (None until the node's port is open).
        self.address: str | None = None
        #: Whether its clients can move with it at a handoff (this host's capability).
        self.can_move_connections: bool | None = None

    @property
    def name(self) -> str:
        return self.export.name

    @property
    def image(self) -> Image:
        return self.export.image

    # -- what the metrics see (ferry.metrics.Observable) ------------------------------

    @property
    def stats(self) -> RequestStats:
        return self.export.stats

    @property
    def migration_stats(self) -> MigrationStats:
        return self.mirrors.stats

    def snapshot(self) -> StatusSnapshot:
        """The export's status, with the migration's fields while one runs or after it."""
        return dataclasses.replace(
            self.mirrors.snapshot(),
            address=self.address,
            can_move_connections=self.can_move_connections,
        )

    # -- the lease ---------------------------------------------------------------------

    def holds(self, lease: LeaseManager) -> None:
        """This export's I/O runs under ``lease`` from now on, and a migration hands it on."""
        self.lease = lease
        self.export.lease = lease
        self.mirrors.lease = lease

    def fenced(self, reason: str) -> None:
        """The lease is gone: this export must not touch its image again.

        The data plane already refuses every request (``Export.lease``); the
        role goes ``fenced`` so status, metrics and the handshake say so,
        and a running migration ends.
        """
        log.error(
            "{name}: lease lost: {reason}; fenced, no further I/O", name=self.name, reason=reason
        )
        # lease_lost leaves exactly the states with control (role.yaml).
        if self.export.has_control:
            self.export.trigger(RoleTrigger.LEASE_LOST)
        self.mirrors.lease_lost(reason)

    # -- the end -------------------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """The role stopped, the lease given back: after its clients have been drained."""
        self.export.trigger(RoleTrigger.SHUTDOWN)
        lease = self.lease
        incoming = self.incoming
        if lease is None and incoming is not None and incoming.manager is not None:
            lease = incoming.manager
        if lease is None:
            return defer.succeed(None)
        return lease.shutdown()


class ExportRegistry:
    """The node's exports by name, in the order they were added."""

    def __init__(self) -> None:
        self._units: dict[str, ExportUnit] = {}

    def add(self, unit: ExportUnit) -> None:
        if unit.name in self._units:
            raise ValueError(f"an export named {unit.name!r} exists already")
        self._units[unit.name] = unit

    def remove(self, name: str) -> ExportUnit:
        unit = self.get(name)
        del self._units[unit.name]
        return unit

    def get(self, name: str | None = None) -> ExportUnit:
        """The export called ``name``; None or "" is the default (the first) export."""
        if not name:
            for unit in self._units.values():
                return unit
            raise UnknownExport("this node has no export")
        try:
            return self._units[name]
        except KeyError:
            raise UnknownExport(f"no export named {name!r}") from None

    def __iter__(self) -> Iterator[ExportUnit]:
        return iter(list(self._units.values()))

    def __len__(self) -> int:
        return len(self._units)

    def names(self) -> list[str]:
        return list(self._units)
