"""A running ferry node: the composition root that wires the parts together.

Everything that needs a reactor, a clock or a file on disk is made here and
handed to the parts, which never reach for globals: the tests build the
same parts with a fake clock and an in-memory transport.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from ferry.clock import ReactorClock
from ferry.control.commands import Commands
from ferry.control.events import EventHub
from ferry.control.server import listen_control
from ferry.control.status import StatusSnapshot
from ferry.lease.backend import LeaseBackend, LeaseConflict, LeaseError, LeaseMode
from ferry.lease.incoming import IncomingLease
from ferry.lease.manager import LeaseManager
from ferry.lease.spec import (
    default_lockspace,
    default_resource,
    open_lockspace,
    parse_lockspace,
)
from ferry.metrics import make_registry, metrics_root
from ferry.migrate.manager import MirrorManager
from ferry.migrate.source import tcp_connector
from ferry.migrate.stats import MigrationStats
from ferry.serve.acl import Acl
from ferry.serve.export import Export
from ferry.serve.server import NBDServer
from ferry.serve.stats import RequestStats
from ferry.storage import Image
from ferry.trace import TraceFile, Tracer, log_transitions

log = Logger()


class ObservedExport:
    """An export as the metrics see it: its status includes the migration's fields."""

    def __init__(self, export: Export, mirrors: MirrorManager) -> None:
        self._export = export
        self._mirrors = mirrors

    @property
    def name(self) -> str:
        return self._export.name

    @property
    def stats(self) -> RequestStats:
        return self._export.stats

    @property
    def migration_stats(self) -> MigrationStats:
        return self._mirrors.stats

    def snapshot(self) -> StatusSnapshot:
        return self._mirrors.snapshot()


#: ``--lockspace none``: serve without a lease (nothing fences this node).
NO_LOCKSPACE = "none"


class StartupError(Exception):
    """A problem the operator must fix before the node can run; one clear line."""


@dataclass(frozen=True)
class ServeConfig:
    file: str
    addr: str = "0.0.0.0"
    port: int = 10809
    name: str = ""
    sock: str | None = None
    acl: tuple[str, ...] = ()
    default_deny: bool = False
    oldstyle: bool = False
    read_only: bool = False
    metrics: tuple[str, int] | None = None
    trace: str | None = None
    description: str = field(default="")
    listen: bool = False  # wait for a migration instead of serving at once
    # --lockspace SPEC: where the image's lease is held; None is the embedded
    # default (a local directory), NO_LOCKSPACE is no lease at all.
    lockspace: str | None = None
    resource: str | None = None  # the lease's name (default: the image's real path)

    @property
    def export_name(self) -> str:
        """The export's name: ``--name``, or the file's name (also what logs and traces call it)."""
        return self.name or os.path.basename(self.file)


class Node:
    """One export served on one port, with its control socket and metrics."""

    def __init__(self, reactor: Any, config: ServeConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.clock = ReactorClock(reactor)
        self.tracer = Tracer()
        # Both see every machine from its first record: the hub knows where
        # each stands for a late subscriber, the log carries each transition.
        self.events = EventHub(self.tracer, self.clock)
        self.tracer.subscribe(log_transitions(config.export_name))
        self._trace_file: TraceFile | None = None
        self._ports: list[IListeningPort] = []
        self.image: Image | None = None
        self.export: Export | None = None
        self.server: NBDServer | None = None
        self.nbd_port: IListeningPort | None = None
        self.mirrors: MirrorManager | None = None
        self.metrics_port: IListeningPort | None = None
        self.lease: LeaseManager | None = None
        self._lockspace: LeaseBackend | None = None
        self._stopped = False

    def run_blocking(self, work: Callable[[], object]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work)

    def start(self) -> defer.Deferred[None]:
        """Open everything, in an order that leaves nothing half-open on failure.

        The answer fires once the export serves (or listens); it fails with
        :class:`StartupError`.  With a lockspace the lease is taken before
        the NBD port opens, so no client is ever served without it; without
        one (or with a local lockspace, whose answers are immediate) the
        answer has fired when this returns.
        """
        try:
            self._start(self.config)
        except Exception:
            self._close_now()
            return defer.fail()
        d = self._take_lease()
        d.addCallback(lambda _: self._open_nbd(self.config))
        d.addErrback(self._failed_start)
        return d

    def _failed_start(self, failure: Any) -> Any:
        # Everything is closed here; the reactor's shutdown (a refusal that
        # came after it started, from etcd) must not flush a closed image.
        self._stopped = True
        if self.lease is not None:
            self.lease.shutdown()  # taken, then the port was in use: give it back
        self.clock.cancel_all()
        for port in self._ports:
            port.stopListening()
        self._ports.clear()
        self._close_now()
        return failure

    def _start(self, config: ServeConfig) -> None:
        from ferry.serve.acl import AclError
        from ferry.storage import ImageError

        try:
            acl = Acl.parse(config.acl, default_deny=config.default_deny)
        except AclError as error:
            raise StartupError(str(error)) from None
        if config.trace:
            try:
                self._trace_file = TraceFile(config.trace)
            except OSError as error:
                raise StartupError(f"trace file {config.trace}: {error.strerror}") from None
            self.tracer.subscribe(self._trace_file.write)
        try:
            self.image = Image.open(config.file, read_only=config.read_only)
        except ImageError as error:
            raise StartupError(str(error)) from None
        name = config.export_name
        self.export = Export(
            name, self.image, clock=self.clock, tracer=self.tracer, description=config.description
        )
        self.server = NBDServer(
            [self.export],
            clock=self.clock,
            run_blocking=self.run_blocking,
            acl=acl,
            oldstyle=config.oldstyle,
        )
        self.mirrors = MirrorManager(
            self.export,
            gate=self.export,
            clock=self.clock,
            connector=tcp_connector(self.reactor),
            tracer=self.tracer,
            stop_process=self._stop_after_handoff,
        )
        if config.sock:
            from ferry.control.server import ControlSocketError

            try:
                self._ports.append(
                    listen_control(
                        self.reactor,
                        config.sock,
                        Commands(
                            self.server, default_deny=config.default_deny, mirrors=self.mirrors
                        ),
                        self.events,
                    )
                )
            except ControlSocketError as error:
                raise StartupError(str(error)) from None
        if config.metrics:
            host, port = config.metrics
            registry = make_registry(self._observed)
            site = Site(metrics_root(registry))  # type: ignore[no-untyped-call]
            self.metrics_port = self._listen_tcp(port, site, host, "metrics")
            log.info(
                "metrics at http://{host}:{port}/metrics",
                host=host,
                port=self.metrics_port.getHost().port,  # type: ignore[attr-defined]
            )

    def _take_lease(self) -> defer.Deferred[None]:
        """Acquire the image's lease before serving; a refusal is a StartupError.

        ``listen`` takes none now: its lease comes with the migration's
        commit (:class:`~ferry.lease.incoming.IncomingLease`).
        """
        config = self.config
        assert self.export is not None and self.mirrors is not None
        if config.lockspace == NO_LOCKSPACE:
            return defer.succeed(None)
        try:
            spec = (
                default_lockspace()
                if config.lockspace is None
                else parse_lockspace(config.lockspace)
            )
            self._lockspace = open_lockspace(spec, reactor=self.reactor)
        except (ValueError, LeaseError) as error:
            return defer.fail(StartupError(f"--lockspace {config.lockspace or ''}: {error}"))
        own = config.resource or default_resource(config.file)
        if config.listen:
            self.export.incoming_lease = IncomingLease(
                self._make_lease, resource=config.resource, fallback=own, on_taken=self._taken
            )
            return defer.succeed(None)
        lease = self._make_lease(own)
        lease.register()

        def held(_: object) -> None:
            self._taken(lease)
            assert self.export is not None
            self.export.lease = lease

        def refused(failure: Any) -> None:
            error = failure.value
            if isinstance(error, LeaseConflict):
                raise StartupError(str(error)) from None
            if isinstance(error, LeaseError):
                raise StartupError(f"cannot take the lease on {own}: {error}") from None
            failure.raiseException()

        return lease.acquire().addCallbacks(held, refused)

    def _make_lease(self, resource: str) -> LeaseManager:
        """The one way this node builds a lease: its lockspace, its identity, its clock."""
        assert self._lockspace is not None and self.export is not None
        read_only = self.image is not None and self.image.read_only
        lease = LeaseManager(
            self._lockspace,
            resource=resource,
            owner=f"{socket.gethostname()}:{os.getpid()}:{self.export.name}",
            mode=LeaseMode.READONLY if read_only else LeaseMode.EXCLUSIVE,
            clock=self.clock,
            tracer=self.tracer,
            on_fenced=self._fenced,
        )
        # A listener's lease comes with the commit, its port open already.
        lease.serving_address = self._serving_address()
        return lease

    def _serving_address(self) -> str | None:
        """HOST:PORT where this node's NBD port is, once open: what a ferry proxy is told.

        A wildcard address (all interfaces) is published as the host's name.
        """
        if self.nbd_port is None:
            return None
        host = self.config.addr
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        port = self.nbd_port.getHost().port  # type: ignore[attr-defined]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _taken(self, lease: LeaseManager) -> None:
        """This node holds ``lease`` now: released at shutdown, handed on by a migration out."""
        assert self.mirrors is not None and self._lockspace is not None
        self.lease = lease
        self.mirrors.lease = lease
        log.info(
            "holding the lease on {resource} (token {token}) in {space}",
            resource=lease.resource,
            token=lease.token,
            space=self._lockspace.spec,
        )

    def _fenced(self, reason: str) -> None:
        """The lease is gone: this node must not touch the image again.

        The data plane already refuses every request (``Export.lease``); the
        role goes ``fenced`` so status, metrics and the handshake say so.
        """
        export = self.export
        log.error("lease lost: {reason}; fenced, no further I/O", reason=reason)
        # lease_lost leaves exactly the states with control (role.yaml).
        if export is not None and export.has_control:
            export.trigger("lease_lost")
        if self.mirrors is not None:
            self.mirrors.lease_lost(reason)

    def _open_nbd(self, config: ServeConfig) -> None:
        assert self.export is not None and self.image is not None and self.server is not None
        self.nbd_port = self._listen_tcp(config.port, self.server, config.addr, "NBD")
        self.export.trigger("listen" if config.listen else "serve")
        # Where a ferry proxy looking for the image finds it: published with
        # the lease held now, and with the one a listener takes at its commit.
        address = self._serving_address()
        incoming = self.export.incoming_lease
        waiting = incoming.manager if isinstance(incoming, IncomingLease) else None
        for lease in (self.lease, waiting):
            if lease is not None and address is not None:
                lease.publish(address)
        log.info(
            "{doing} {file} ({size} bytes) as {name!r} on {addr}:{port}",
            doing="listening for a migration of" if config.listen else "serving",
            file=config.file,
            size=self.image.size,
            name=self.export.name,
            addr=config.addr,
            port=self.nbd_port.getHost().port,  # type: ignore[attr-defined]
        )

    def _observed(self) -> list[ObservedExport]:
        if self.export is None or self.mirrors is None:
            return []
        return [ObservedExport(self.export, self.mirrors)]

    def _stop_after_handoff(self) -> None:
        """The ``exit`` action: stop once the mirror's end has been reported.

        Called inside the handoff; the process stops on a later turn of the
        reactor, after waiters on the control socket have had their answer.
        """
        assert self.mirrors is not None
        self.mirrors.finished().addBoth(lambda _: self.reactor.callLater(0, self.reactor.stop))

    def _listen_tcp(self, port: int, factory: Any, host: str, what: str) -> IListeningPort:
        try:
            listening: IListeningPort = self.reactor.listenTCP(port, factory, interface=host)
        except CannotListenError as error:
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            raise StartupError(f"cannot listen for {what} on {host}:{port}: {reason}") from None
        self._ports.append(listening)
        return listening

    @defer.inlineCallbacks
    def shutdown(self) -> Any:
        """Stop accepting, finish requests in flight, flush, and close.

        Registered as a 'before shutdown' trigger, so SIGINT and SIGTERM
        (which Twisted turns into ``reactor.stop()``) wait for it.
        """
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting down: finishing requests in flight")
        if self.server is not None:
            self.server.accepting = False
        for port in self._ports:
            yield port.stopListening()
        if self.server is not None:
            yield self.server.drain()
        if self.image is not None:
            image = self.image
            yield self.run_blocking(image.flush)
        if self.export is not None:
            self.export.trigger("shutdown")
        if self.lease is not None:
            yield self.lease.shutdown()
        # After the last transition, so subscribers have seen every one.
        yield self.events.close("the server is shutting down")
        self.clock.cancel_all()
        self._close_now()
        log.info("stopped")

    def _close_now(self) -> None:
        if self.image is not None:
            self.image.close()
        if self._trace_file is not None:
            self._trace_file.close()
            self._trace_file = None
