"""The control plane's handle on an export's migrations: at most one at a time.

The control commands (``mirror``, ``break``, ``mirror_max_bps``), the status
snapshot and ``ferry mirror --wait`` all go through one
:class:`MirrorManager` per export, so "is a mirror running" has one answer.
The last finished job is kept: its ``last_downtime_ms`` stays in the status
after the migration, and a waiter that asks late still learns how it ended.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from ferry.clock import Clock
from ferry.migrate.carry import Carrier
from ferry.migrate.core.stats import MigrationStats
from ferry.migrate.gate import ClientGate
from ferry.migrate.lease import OutgoingLease
from ferry.migrate.options import (
    CannotBreak,
    Destination,
    MirrorError,
    MirrorOptions,
    MirrorResult,
    NotMirroring,
    StartOutcome,
)
from ferry.migrate.source import ImageReader, MirrorSource
from ferry.migrate.wire import Connector
from ferry.serve.export import Export
from ferry.status import StatusSnapshot
from ferry.trace import Tracer


class MirrorBusy(MirrorError):
    """A mirror is already running for this export (flexnbd: "mirror already running")."""


class MirrorManager:
    def __init__(
        self,
        export: Export,
        *,
        gate: ClientGate,
        clock: Clock,
        connector: Connector,
        tracer: Tracer | None = None,
        stop_process: Callable[[], None] | None = None,
        carrier: Carrier | None = None,
        read: ImageReader | None = None,
    ) -> None:
        self.export = export
        self._read = read
        self._carrier = carrier
        self._gate = gate
        self._clock = clock
        self._connector = connector
        self._tracer = tracer
        self._stop_process = stop_process
        self.current: MirrorSource | None = None
        # The export's lease, once it holds one: a migration hands it over.
        self.lease: OutgoingLease | None = None
        # Retries, failures and completions of every job of this export.
        self.stats = MigrationStats()

    @property
    def running(self) -> bool:
        return self.current is not None and not self.current.job.final

    def mirror(self, destination: Destination, options: MirrorOptions) -> Deferred[StartOutcome]:
        """Start a mirror; fires with the outcome of the first negotiation."""
        if self.running:
            raise MirrorBusy("mirror already running")
        source = MirrorSource(
            self.export,
            destination,
            gate=self._gate,
            clock=self._clock,
            connector=self._connector,
            options=options,
            tracer=self._tracer,
            stop_process=self._stop_process,
            lease=self.lease,
            stats=self.stats,
            carrier=self._carrier,
            read=self._read,
        )
        self.current = source
        return source.start()

    def cancel(self) -> None:
        """``break``: raises NotMirroring or CannotBreak with flexnbd-style reasons."""
        if self.current is None:
            raise NotMirroring("not mirroring")
        self.current.cancel()

    def stop(self, reason: str) -> Deferred[MirrorResult | None]:
        """The node shuts down (or the export goes): a running job stops; fires when it has."""
        if self.running:
            assert self.current is not None
            self.current.stop(reason)
        return self.finished()

    def lease_lost(self, reason: str) -> None:
        """The export was fenced: a running job ends (see ``MirrorSource.lease_lost``)."""
        if self.current is not None:
            self.current.lease_lost(reason)

    def set_max_bps(self, limit: int | None) -> None:
        if self.current is None:
            raise NotMirroring("Not currently mirroring")
        self.current.set_max_bps(limit)

    def finished(self) -> Deferred[MirrorResult | None]:
        """Fires when the current job ends (at once if none runs)."""
        if self.current is None:
            return succeed(None)
        done: Deferred[MirrorResult | None] = Deferred()

        def relay(result: Any) -> Any:
            done.callback(self.current.result if self.current is not None else None)
            return result

        self.current.finished.addBoth(relay)
        return done

    def snapshot(self) -> StatusSnapshot:
        """The export's status with the migration's fields filled in."""
        snapshot = self.export.snapshot()
        if self.current is None:
            return snapshot
        fields = self.current.progress().status_fields()
        return dataclasses.replace(snapshot, **fields)

    def progress(self) -> dict[str, Any]:
        """What ``ferry mirror --wait`` shows, and how the job ended once it has."""
        if self.current is None:
            return {"running": False, "phase": None, "line": "not migrating"}
        progress = self.current.progress()
        answer: dict[str, Any] = {
            "running": self.running,
            "phase": self.current.state,
            "line": progress.render(),
            **progress.status_fields(),
        }
        result = self.current.result
        if result is not None:
            answer["result"] = dataclasses.asdict(result)
        return answer


__all__ = ["CannotBreak", "MirrorBusy", "MirrorManager", "NotMirroring"]
