"""The control plane's handle on an export's migrations: at most one at a time.

The control commands (``mirror``, ``break``, ``mirror_max_bps``), the status
snapshot and ``ferry mirror --wait`` all go through one
:class:`MirrorManager` per export, so "is a mirror running" has one answer.
The last finished job is kept: its ``last_downtime_ms`` stays in the status
after the migration, and a waiter that asks late still learns how it ended.
It also keeps the export's blockers (:mod:`ferry.migrate.blockers`): a
``mirror`` is refused while there is one, and the lockspace is asked first
whether anyone shares the lease.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.chartnames import MigrationState
from ferry.clock import Clock
from ferry.hooks import Approver, Hooks
from ferry.migrate.blockers import Blockers, MigrationBlocked, blocked_message, lease_blockers
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
from ferry.migrate.source import ImageCalls, MirrorSource
from ferry.migrate.wire import Connector, TLSForHost
from ferry.serve.export import Export
from ferry.status import StatusSnapshot
from ferry.trace import Tracer

_log = Logger()

#: How often (at most) the status asks the lockspace who shares the lease, in seconds.
HOLDERS_REFRESH: Final = 5.0


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
        tls: TLSForHost | None = None,
        carrier: Carrier | None = None,
        hooks: Hooks | None = None,
        image_calls: ImageCalls | None = None,
    ) -> None:
        self.export = export
        self.hooks = hooks
        self._image_calls = image_calls
        # This node's client TLS (--tls-certificates): every migration uses it.
        self._tls = tls
        # A control connection that approves this export's veto-able steps (or None).
        self.approver: Approver | None = None
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
        # Reasons set by hand not to migrate the export (``block``).
        self.blockers = Blockers()
        self._holders_asked = float("-inf")  # when the status last asked the lockspace
        self._judging = False  # a ``mirror`` is asking the lockspace before it starts

    @property
    def running(self) -> bool:
        return self.current is not None and not self.current.job.final

    def blocked_by(self) -> list[str]:
        """Every reason the export may not migrate now: the blockers set by hand, then
        every other holder of its lease the lockspace named last."""
        reasons = list(self.blockers.reasons)
        lease = self.lease
        if lease is not None and lease.holds:
            reasons.extend(lease_blockers(lease.holders, lease.owner))
        return reasons

    def mirror(self, destination: Destination, options: MirrorOptions) -> Deferred[StartOutcome]:
        """Start a mirror; fires with the outcome of the first negotiation.

        Raises :class:`MirrorBusy` while one runs, :class:`MigrationBlocked`
        while a blocker is set by hand.  With a lease, the lockspace is asked
        first who else holds it: a holder sharing it makes the answer a
        refusal, ``migration blocked: ...``, and nothing starts.  A lockspace
        that cannot answer blocks nothing (the commit needs it anyway).
        """
        if self.running or self._judging:
            raise MirrorBusy("mirror already running")
        if self.blockers.reasons:
            raise MigrationBlocked(blocked_message(self.blockers.reasons))
        lease = self.lease
        if lease is None or not lease.holds:
            return self._start(destination, options)
        self._judging = True

        def judged(_: object) -> Deferred[StartOutcome]:
            self._judging = False
            reasons = self.blocked_by()
            if reasons:
                return succeed(StartOutcome(False, blocked_message(reasons)))
            try:
                return self._start(destination, options)
            except MirrorError as error:
                return succeed(StartOutcome(False, str(error)))

        def unknown(failure: Failure) -> None:
            _log.warn(
                "{export}: cannot ask the lockspace who shares the lease: {why}",
                export=self.export.name,
                why=failure.getErrorMessage(),
            )

        asked: Deferred[Any] = maybeDeferred(lease.inquire)
        return asked.addErrback(unknown).addCallback(judged)

    def _start(self, destination: Destination, options: MirrorOptions) -> Deferred[StartOutcome]:
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
            tls=self._tls,
            carrier=self._carrier,
            hooks=self.hooks,
            image_calls=self._image_calls,
            approver=lambda: self.approver,
        )
        previous, self.current = self.current, source
        try:
            return source.start()
        except MirrorError:
            # Refused before it began (the export is no longer serving: say,
            # fenced while the lockspace was asked who shares the lease). A
            # job that never started must not stay current: it would be
            # "running" for good, and every later mirror refused.
            self.current = previous
            raise

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
        """The export's status with the migration's fields (and the blockers) filled in."""
        self._refresh_holders()
        snapshot = dataclasses.replace(self.export.snapshot(), blockers=tuple(self.blocked_by()))
        if self.current is None:
            return snapshot
        fields = self.current.progress().status_fields()
        failure = self.current.last_failure
        return dataclasses.replace(
            snapshot,
            **fields,
            migration_last_failure="none" if failure is None else failure,
            copy_mode=self.current.options.copy_mode.value,
        )

    def _refresh_holders(self) -> None:
        """Ask the lockspace who holds the lease, at most every HOLDERS_REFRESH seconds;
        the answer shows in the next status (at once, from a local lockspace)."""
        lease = self.lease
        now = self._clock.seconds()
        if lease is None or not lease.holds or now - self._holders_asked < HOLDERS_REFRESH:
            return
        self._holders_asked = now
        maybeDeferred(lease.inquire).addErrback(lambda _: None)

    def progress(self) -> dict[str, Any]:
        """What ``ferry mirror --wait`` shows, and how the job ended once it has."""
        if self.current is None:
            return {"running": False, "phase": None, "line": "not migrating"}
        current = self.current
        progress = current.progress()
        line = progress.render() if current.result is None else current.summary()
        if current.state == MigrationState.RETRY_WAIT and current.last_error:
            line = f"{line} (retrying: {current.last_error})"
        answer: dict[str, Any] = {
            "running": self.running,
            "phase": current.state,
            "line": line,
            **progress.status_fields(),
            "last_failure": current.last_failure,
            "last_error": current.last_error or None,
        }
        result = self.current.result
        if result is not None:
            answer["result"] = dataclasses.asdict(result)
        return answer


__all__ = ["CannotBreak", "MigrationBlocked", "MirrorBusy", "MirrorManager", "NotMirroring"]
