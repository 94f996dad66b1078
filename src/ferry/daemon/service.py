"""The running daemon: a node with the exports of its file, reloaded on SIGHUP, told to systemd.

:class:`Daemon` owns one :class:`~ferry.node.Node` and the file it was
started from.  It adds ``config.reload`` to the node's control commands;
SIGHUP does the same.  A reload (:mod:`ferry.daemon.reload` decides what it
does) is all or nothing where it can be: the file is read and checked
whole, exports that migrate are not stopped, and every export it starts
must start, or those it started are stopped again and nothing else is
touched.  Only then are the exports it stops taken off (their clients
drained) and the changes it can make applied.  At most one reload runs at a
time.  The exports a reload does not name, and their clients, never notice.

systemd hears about all of it (:mod:`ferry.daemon.notify`): ``READY=1``
once every export serves, ``RELOADING=1`` and ``READY=1`` around a reload,
``STOPPING=1`` at shutdown, and ``STATUS=`` with one line of summary.
"""

from __future__ import annotations

import dataclasses
import signal
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ferry.control.commands import Params, Reply
from ferry.daemon.config import ConfigError, DaemonConfig, load_config
from ferry.daemon.notify import Notifier
from ferry.daemon.reload import ExportChange, ReloadPlan, plan_reload
from ferry.exports import ExportError
from ferry.node import Node, NodeConfig
from ferry.serve.acl import Acl

__all__ = ["Daemon", "ReloadRefused"]

log = Logger()


class ReloadRefused(Exception):
    """The file was not applied, and nothing changed; ``str`` says why, in one line."""


class Daemon:
    """A node serving the exports of a daemon's file; see the module doc."""

    def __init__(
        self,
        reactor: Any,
        config: DaemonConfig,
        *,
        notifier: Notifier | None = None,
        node: NodeConfig | None = None,
    ):
        """``node``: a takeover's (:meth:`Node.take_over`), the old process's node with no
        export yet; it must agree with the file's, which later reloads are read against."""
        self.reactor = reactor
        self.running_node = config  # the file the node started with: its keys are fixed
        self.last_read = config  # the file as the last reload (or the start) read it
        self.notifier = notifier or Notifier()
        self.node = Node(
            reactor,
            config.node if node is None else node,
            config.exports if node is None else (),
            commands={"config.reload": self._reload_command},
        )
        self.node.exports_changed.append(self._tell_status)
        self._reloading = False
        self._ready = False

    @property
    def path(self) -> str:
        return self.running_node.path

    # -- starting and stopping ----------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the node with every export of the file; ``READY=1`` once all serve."""
        return self.node.start().addCallback(lambda _: self.reactor.callWhenRunning(self.up))

    def up(self) -> None:
        """Every export serves (started, or taken over): ``READY=1``."""
        self._ready = True
        log.info("ready: {summary}", summary=self.summary())
        self.notifier.ready(self.summary())

    def listen_for_hangup(self) -> None:
        """SIGHUP reloads the file (on the reactor, after the signal handler returns)."""
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.hangup))

    @defer.inlineCallbacks
    def shutdown(self) -> Any:
        """``STOPPING=1``, then the node's shutdown (every export drained)."""
        self.notifier.stopping(f"stopping {len(self.node.exports)} exports")
        yield self.node.shutdown()

    # -- what it serves ------------------------------------------------------------------

    def summary(self) -> str:
        """One line: how many exports, in which states, how many clients, where."""
        units = list(self.node.exports)
        states = Counter(unit.export.state for unit in units)
        clients = sum(unit.export.num_clients for unit in units)
        where = f"{self.node.config.addr}:{self.node.port}"
        text = f"{len(units)} export{'s' if len(units) != 1 else ''} on {where}"
        if states:
            text += " (" + ", ".join(f"{n} {state}" for state, n in sorted(states.items())) + ")"
        return f"{text}, {clients} client{'s' if clients != 1 else ''}"

    def _tell_status(self) -> None:
        if self._ready and not self._reloading:
            self.notifier.status(self.summary())

    # -- reload ------------------------------------------------------------------------

    def hangup(self) -> None:
        """SIGHUP: reload, and say in the log how it went."""
        d = self.reload()

        def done(plan: ReloadPlan) -> None:
            log.info("reloaded {path}: {summary}", path=self.path, summary=plan.summary())

        def refused(failure: Any) -> None:
            if isinstance(failure.value, ConfigError | ReloadRefused):
                log.error("reload refused: {why}", why=str(failure.value))
            else:
                log.failure("reload failed", failure)

        d.addCallbacks(done, refused)

    def _reload_command(self, args: Sequence[str], params: Params) -> Deferred[Reply]:
        """``config.reload``: re-read the file; the answer says what was done."""

        def done(plan: ReloadPlan) -> Reply:
            value = {
                "summary": f"reloaded {self.path}: {plan.summary()}",
                "started": [config.export_name for config in plan.start],
                "stopped": list(plan.stop),
                "changed": {change.name: list(change.applied) for change in plan.change},
                "not_applied": [f"{c.name}.{key}" for c in plan.change for key in c.not_applied]
                + list(plan.node_keys),
            }
            return Reply(0, f"reloaded {self.path}: {plan.summary()}", value)

        def refused(failure: Any) -> Reply | Any:
            if isinstance(failure.value, ConfigError | ReloadRefused):
                return Reply(1, str(failure.value))
            return failure

        return self.reload().addCallbacks(done, refused)

    def reload(self) -> Deferred[ReloadPlan]:
        """Re-read the file and apply it (see the module doc); fails with ConfigError or
        ReloadRefused, having changed nothing."""
        if self._reloading:
            return defer.fail(ReloadRefused("a reload is already running"))
        self._reloading = True
        self.notifier.reloading(f"reloading {self.path}")
        d = defer.maybeDeferred(self._reload)

        def settled(result: Any) -> Any:
            self._reloading = False
            self.notifier.ready(self.summary())
            return result

        return d.addBoth(settled)

    @defer.inlineCallbacks
    def _reload(self) -> Any:
        new = load_config(self.path)
        running = {unit.name: unit.config for unit in self.node.exports}
        plan = plan_reload(self.running_node, self.last_read, new, running)
        busy = self._busy(plan)
        if busy is not None:
            raise ReloadRefused(busy)
        started = yield self._start_all(plan)
        # Checked again, and stopped in the same turn of the reactor: no
        # migration can begin between the check and the stop.
        busy = self._busy(plan)
        if busy is not None:
            yield defer.DeferredList(
                [self.node.remove_export(name, force=True) for name in started]
            )
            raise ReloadRefused(busy)
        names = self.node.exports.names()
        stopping = [self.node.remove_export(name) for name in plan.stop if name in names]
        for change in plan.change:
            self._apply(change)
        self.last_read = new
        yield defer.DeferredList(stopping)
        return plan

    def _busy(self, plan: ReloadPlan) -> str | None:
        """Why the plan may not stop its exports now (one of them migrates), or None."""
        for unit in self.node.exports:
            if unit.name in plan.stop and unit.migrating is not None:
                return (
                    f"{self.path}: export {unit.name!r} is migrating {unit.migrating}: the file "
                    "was not applied; break the migration (or remove the export with force) first"
                )
        return None

    @defer.inlineCallbacks
    def _start_all(self, plan: ReloadPlan) -> Any:
        """Start every export the plan starts, or none: those started go again on a failure.

        Fires with the names started.
        """
        started: list[str] = []
        for config in plan.start:
            try:
                unit = yield self.node.add_export(config)
            except ExportError as error:
                for name in reversed(started):
                    yield self.node.remove_export(name, force=True)
                raise ReloadRefused(
                    f"{self.path}: export {config.export_name!r}: {error}: the file was not applied"
                ) from None
            started.append(unit.name)
        return started

    def _apply(self, change: ExportChange) -> None:
        """The settings of a running export that a reload may change, changed."""
        if not change.applied:
            return
        unit = self.node.exports.get(change.name)
        applied = {key: getattr(change.config, key) for key in change.applied}
        unit.config = dataclasses.replace(unit.config, **applied)
        if "acl" in applied or "default_deny" in applied:
            acl = Acl.parse(unit.config.acl, default_deny=unit.config.default_deny)
            assert self.node.server is not None
            dropped = self.node.server.replace_export_acl(unit.name, acl)
            if dropped:
                log.info(
                    "{name}: {n} clients the new ACL refuses were disconnected",
                    name=unit.name,
                    n=dropped,
                )
