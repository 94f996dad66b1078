"""A running ferry node: the composition root that wires the parts together.

Everything that needs a reactor, a clock or a file on disk is made here and
handed to the parts, which never reach for globals: the tests build the
same parts with a fake clock and an in-memory transport.

A node has one NBD port, one control socket, one /metrics, one trace and
one lockspace, and its exports in an :class:`~ferry.exports.ExportRegistry`:
:meth:`Node.add_export` takes an export's lease and puts it on the port,
:meth:`Node.remove_export` takes it off.  ``ferry serve`` and ``ferry
listen`` run a node with one export; ``ferry daemon`` (:mod:`ferry.daemon`)
runs one with the exports of its file, and the control socket's
``export.add`` and ``export.remove`` change them while it runs.

What a node's settings (:class:`NodeConfig`) choose is fixed while it runs;
what belongs to one export (:class:`~ferry.exports.ExportConfig`) comes and
goes with it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from ferry.chartnames import RoleState, RoleTrigger
from ferry.clock import ReactorClock
from ferry.control.commands import Command, Commands
from ferry.control.events import EventHub
from ferry.control.server import listen_control
from ferry.exports import (
    ExportBusy,
    ExportConfig,
    ExportError,
    ExportRegistry,
    ExportUnit,
    export_of,
)
from ferry.handoff.address import AddressError, ServiceAddress, listen_freebind
from ferry.hooks import NO_HOOKS, HookConfig, HookContext, Hooks
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
from ferry.migrate.arrivals import Arrivals
from ferry.migrate.carry import Carrier
from ferry.migrate.destination import Receiver
from ferry.migrate.manager import MirrorManager
from ferry.migrate.service import ServiceAddressHolder
from ferry.migrate.transport import connector
from ferry.safepath import UnsafePath
from ferry.serve.acl import Acl, AclError, is_loopback
from ferry.serve.export import Export
from ferry.serve.lanes import JOBS_PER_EXPORT
from ferry.serve.server import NBDServer
from ferry.storage import Image
from ferry.trace import TraceFile, Tracer, TraceRecord, log_transitions

__all__ = ["NO_LOCKSPACE", "Node", "NodeConfig", "ServeConfig", "StartupError"]

log = Logger()

#: ``--lockspace none``: serve without a lease (nothing fences this node).
NO_LOCKSPACE = "none"

#: The worker threads every export's fdatasync shares: room for three
#: exports whose disks hang, each holding its lane's share
#: (:mod:`ferry.serve.lanes`), and a lane's worth for all the others.
WORKER_THREADS: Final = 4 * JOBS_PER_EXPORT


class StartupError(ExportError):
    """A problem the operator must fix before the node (or an export) can run; one clear line."""


@dataclass(frozen=True)
class NodeConfig:
    """What a node is, whatever it serves: fixed while it runs."""

    addr: str = "0.0.0.0"
    port: int = 10809
    sock: str | None = None
    # The listener's ACL, checked at connect (each export may have its own).
    acl: tuple[str, ...] = ()
    default_deny: bool = False
    oldstyle: bool = False
    metrics: tuple[str, int] | None = None
    trace: str | None = None
    # --lockspace SPEC: where the images' leases are held; None is the
    # embedded default (a local directory), NO_LOCKSPACE is no lease at all.
    lockspace: str | None = None
    # What a migration's ``exit`` action ends once the image is handed over:
    # the process (``ferry serve``), or only the export (a daemon).
    exit_stops_node: bool = True
    # --service-address IP/PREFIX@DEV: the address clients use, which moves
    # with the image (``ferry serve`` and ``listen``; a daemon has none).
    service_address: str | None = None
    # A daemon's hooks (ferry.hooks): every export's, under its own.
    hooks: HookConfig | None = None
    # --nbd-sock PATH: NBD on a Unix socket too (0600: this user's peers only).
    nbd_sock: str | None = None
    # --stdio (listen): one connection, the migration's, over stdin and stdout.
    stdio: bool = False


@dataclass(frozen=True)
class ServeConfig:
    """``ferry serve`` / ``ferry listen``: the node's settings and its one export's."""

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
    # --service-address IP/PREFIX@DEV: the address clients use, which moves with the image.
    service_address: str | None = None
    hooks: HookConfig = NO_HOOKS  # --hook STAGE=PATH, --hook-timeout
    nbd_sock: str | None = None  # --nbd-sock PATH
    stdio: bool = False  # --stdio (listen)

    @property
    def export_name(self) -> str:
        """The export's name: ``--name``, or the file's name (also what logs and traces call it)."""
        return self.export().export_name

    def export(self) -> ExportConfig:
        """The one export this command serves."""
        return ExportConfig(
            file=self.file,
            name=self.name,
            read_only=self.read_only,
            listen=self.listen,
            resource=self.resource,
            description=self.description,
            hooks=self.hooks,
        )

    def node(self) -> NodeConfig:
        """The node this command runs."""
        return NodeConfig(
            addr=self.addr,
            port=self.port,
            sock=self.sock,
            acl=self.acl,
            default_deny=self.default_deny,
            oldstyle=self.oldstyle,
            metrics=self.metrics,
            trace=self.trace,
            lockspace=self.lockspace,
            service_address=self.service_address,
            nbd_sock=self.nbd_sock,
            stdio=self.stdio,
        )


class Node:
    """Exports served on one port, with a control socket, metrics, a trace and a lockspace."""

    def __init__(
        self,
        reactor: Any,
        config: NodeConfig,
        exports: Sequence[ExportConfig] = (),
        *,
        commands: Mapping[str, Command] | None = None,
        open_image: Callable[..., Image] = Image.open,
    ) -> None:
        """``exports`` are served from the start, the first as the default export;
        ``commands`` are control commands beside the node's own (a daemon's reload);
        ``open_image`` opens an export's file (``Image.open``; a test's disk double)."""
        self.reactor = reactor
        self._open_image = open_image
        self.config = config
        self._initial = tuple(exports)
        self._extra_commands = dict(commands or {})
        self.clock = ReactorClock(reactor)
        self.tracer = Tracer()
        # Both see every machine from its first record: the hub knows where
        # each stands for a late subscriber, the log carries each transition.
        self.events = EventHub(self.tracer, self.clock, scope=self._scope)
        self.tracer.subscribe(log_transitions(self._export_of))
        self.exports = ExportRegistry()
        self._trace_file: TraceFile | None = None
        self._ports: list[IListeningPort] = []
        self.server: NBDServer | None = None
        self.nbd_port: IListeningPort | None = None
        self.metrics_port: IListeningPort | None = None
        self._lockspace: LeaseBackend | None = None
        # Exports whose lease is being taken: not served yet, but their
        # machines already run (and are logged under their name).
        self._adding: dict[str, ExportUnit] = {}
        # Called after an export was added or removed (a daemon's STATUS).
        self.exports_changed: list[Callable[[], None]] = []
        self._running = False  # every export of the start serves
        # How client connections move at a handoff (opened with the node).
        self.carrier: Carrier | None = None
        self._stopped = False
        # Why ``listen --stdio`` stopped without the image (None: it did not).
        self.stdio_failure: str | None = None

    def run_blocking(self, work: Callable[[], object]) -> Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work)

    def _export_of(self, record: TraceRecord) -> str:
        """The name of the export a transition belongs to ("" for none), for the log."""
        name = export_of(record)
        if name is not None:
            return name
        units: list[ExportUnit] = [*self.exports, *self._adding.values()]
        return next((unit.name for unit in units if unit.owns(record)), "")

    def _scope(self, name: str) -> Callable[[TraceRecord], bool]:
        """Which records belong to export ``name`` (``subscribe``'s ``export``)."""
        unit = self.exports.get(name)  # UnknownExport, a LookupError, says which
        return unit.owns

    # -- starting ---------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Open everything, in an order that leaves nothing half-open on failure.

        The answer fires once every export serves (or listens); it fails
        with :class:`StartupError`.  Every address and port is bound first,
        so a port in use is said before anything else is tried; each export's
        lease is taken before the export is put on the port, so no client is
        ever served without one (one that comes sooner is told there is no
        such export).  Without a lockspace (or with a local one, whose
        answers are immediate) the answer has fired when this returns.
        """
        self.reactor.suggestThreadPoolSize(WORKER_THREADS)
        try:
            self._open(self.config)
            self._open_nbd(self.config)
        except Exception:
            self._failed_start(None)
            return defer.fail()
        started = self._add_all(self._initial)
        started.addCallback(self._started)
        return started.addErrback(self._failed_start)

    def _started(self, _: object) -> None:
        """Every export of the start serves: say so, one line each (later ones as they come)."""
        self._running = True
        for unit in self.exports:
            self._announce(unit)
        if self.config.stdio:
            self._serve_stdio()

    @defer.inlineCallbacks
    def _add_all(self, configs: Sequence[ExportConfig]) -> Any:
        """Add the exports one after the other, so the first is the default one.

        With more than one, a refusal names the export it is about.
        """
        for config in configs:
            try:
                yield self.add_export(config)
            except StartupError as error:
                if len(configs) == 1:
                    raise
                raise StartupError(f"export {config.export_name!r}: {error}") from None

    def _failed_start(self, failure: Any) -> Any:
        """Undo a start that failed (``failure`` is passed on; None: raised in ``start``)."""
        # Everything is closed here; the reactor's shutdown (a refusal that
        # came after it started, from etcd) must not flush a closed image.
        self._stopped = True
        for unit in self.exports:
            if unit.lease is not None:
                unit.lease.shutdown()  # taken, then another export was refused: give it back
        self.clock.cancel_all()
        for port in self._ports:
            port.stopListening()
        self._ports.clear()
        self._close_now()
        return failure

    def _open(self, config: NodeConfig) -> None:
        try:
            acl = Acl.parse(config.acl, default_deny=config.default_deny)
        except AclError as error:
            raise StartupError(str(error)) from None
        if config.trace:
            try:
                self._trace_file = TraceFile(config.trace)
            except UnsafePath as unsafe:
                raise StartupError(str(unsafe)) from None
            except OSError as error:
                raise StartupError(f"trace file {config.trace}: {error.strerror}") from None
            self.tracer.subscribe(self._trace_file.write)
        self.carrier = Carrier.open(_service_address(config))
        self.server = NBDServer(
            [],
            clock=self.clock,
            run_blocking=self.run_blocking,
            acl=acl,
            oldstyle=config.oldstyle,
            receiver=Receiver(
                run_blocking=self.run_blocking,
                clock=self.clock,
                arrivals=Arrivals(self.reactor, self.carrier),
            ),
        )
        if config.sock:
            from ferry.control.server import ControlSocketError

            commands = Commands(
                self.server, self.exports, host=self, default_deny=config.default_deny
            )
            for name, command in self._extra_commands.items():
                commands.table[name] = command
            try:
                self._ports.append(listen_control(self.reactor, config.sock, commands, self.events))
            except ControlSocketError as error:
                raise StartupError(str(error)) from None
        if config.metrics:
            host, port = config.metrics
            registry = make_registry(lambda: list(self.exports))
            site = Site(metrics_root(registry))  # type: ignore[no-untyped-call]
            self.metrics_port = self._listen_tcp(port, site, host, "metrics")
            log.info(
                "metrics at http://{host}:{port}/metrics",
                host=host,
                port=self.metrics_port.getHost().port,  # type: ignore[attr-defined]
            )
        if config.lockspace != NO_LOCKSPACE:
            try:
                spec = (
                    default_lockspace()
                    if config.lockspace is None
                    else parse_lockspace(config.lockspace)
                )
                self._lockspace = open_lockspace(spec, reactor=self.reactor, clock=self.clock)
            except (ValueError, LeaseError) as error:
                if config.lockspace is None:
                    raise StartupError(
                        f"the default lockspace: {error}; name one with --lockspace local:DIR, "
                        "or serve without a lease with --lockspace none"
                    ) from None
                raise StartupError(f"--lockspace {config.lockspace}: {error}") from None

    # -- exports ------------------------------------------------------------------------

    def add_export(self, config: ExportConfig) -> Deferred[ExportUnit]:
        """Open ``config``'s image, take its lease (or get ready for one), and serve it.

        Fails with :class:`StartupError`: a missing or unreadable file, a
        name in use, a bad ACL, a lease someone else holds.  On failure
        nothing of the export is left open.
        """
        from ferry.storage import ImageError

        assert self.server is not None
        if config.export_name in self.exports.names() or config.export_name in self._adding:
            return defer.fail(StartupError(f"an export named {config.export_name!r} exists"))
        try:
            acl = Acl.parse(config.acl, default_deny=config.default_deny)
        except AclError as error:
            return defer.fail(StartupError(f"export {config.export_name!r}: {error}"))
        if config.listen:
            try:
                self._check_senders_are_named(acl)
            except StartupError as error:
                return defer.fail(error)
        try:
            image = self._open_image(config.file, read_only=config.read_only)
        except ImageError as error:
            return defer.fail(StartupError(str(error)))
        mode = os.stat(config.file).st_mode
        if not config.read_only and not mode & 0o222:
            # Root opens it for writing all the same: say so, once.
            log.warn(
                "{file} has no write permission (mode {mode:04o}), but this user may write "
                "it: serving it writable; use --read-only to serve it read-only",
                file=config.file,
                mode=mode & 0o7777,
            )
        export = Export(
            config.export_name,
            image,
            clock=self.clock,
            tracer=self.tracer,
            description=config.description,
        )
        export.acl = acl
        name = export.name
        hooks = self._hooks_of(config, lambda: None if unit.lease is None else unit.lease.token)
        mirrors = MirrorManager(
            export,
            gate=export,
            clock=self.clock,
            connector=connector(self.reactor),
            tracer=self.tracer,
            stop_process=lambda: self._after_handoff(name),
            carrier=self.carrier,
            hooks=hooks,
        )
        unit = ExportUnit(config, export, mirrors)
        unit.can_move_connections = self.carrier is not None and self.carrier.can_move
        self._adding[name] = unit
        d = self._take_lease(unit)

        def serve(_: object) -> ExportUnit:
            assert self.server is not None
            if self.nbd_address is not None:
                host, port = self.nbd_address
                unit.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.exports.add(unit)
            self.server.add_export(export)
            export.trigger(RoleTrigger.LISTEN if config.listen else RoleTrigger.SERVE)
            if self._running:
                self._announce(unit)
                self._changed()
            return unit

        def failed(failure: Any) -> Any:
            image.close()
            return failure

        def settled(result: Any) -> Any:
            self._adding.pop(name, None)
            return result

        return d.addCallback(serve).addErrback(failed).addBoth(settled)

    def _hooks_of(self, config: ExportConfig, token: Callable[[], int | None]) -> Hooks | None:
        """The export's hooks over the node's; None if it has none at all."""
        merged = config.hooks.under(self.config.hooks)
        if not merged.scripts:
            return None
        context = HookContext(config.export_name, config.file, lease_token=token)
        return Hooks(merged, context, reactor=self.reactor, clock=self.clock)

    def remove_export(self, name: str, *, force: bool = False) -> Deferred[None]:
        """Take an export off the port: its migration broken, its clients drained, its lease
        released, its image flushed and closed.

        Refused with :class:`ExportBusy` while the export migrates (out, or
        a migration coming in), unless ``force``: then the migration is
        broken as at shutdown.  :class:`~ferry.exports.UnknownExport` if
        there is no such export.
        """
        unit = self.exports.get(name)
        direction = unit.migrating
        if direction is not None and not force:
            return defer.fail(
                ExportBusy(
                    f"export {unit.name!r} is migrating {direction}: "
                    "break the migration first, or remove it with force"
                )
            )
        self.exports.remove(unit.name)
        assert self.server is not None
        self.server.remove_export(unit.name)
        log.info("removing export {name!r}: draining its clients", name=unit.name)
        stopped: Deferred[None] = self._stop_unit(unit)
        return stopped.addCallback(lambda _: self._changed())

    def _changed(self) -> None:
        for callback in list(self.exports_changed):
            callback()

    def _take_lease(self, unit: ExportUnit) -> Deferred[None]:
        """Acquire the export's lease; a refusal is a StartupError.

        ``listen`` takes none now: its lease comes with the migration's
        commit (:class:`~ferry.lease.incoming.IncomingLease`).
        """
        config = unit.config
        if self._lockspace is None:
            return defer.succeed(None)
        own = config.resource or default_resource(config.file)
        unit.resource = config.resource if config.listen else own
        if config.listen:
            incoming = IncomingLease(
                lambda name: self._make_lease(unit, name),
                resource=config.resource,
                fallback=own,
                on_taken=lambda lease: self._took(unit, lease),
            )
            unit.incoming = unit.export.incoming_lease = incoming
            return defer.succeed(None)
        lease = self._make_lease(unit, own)
        lease.register()

        def held(_: object) -> None:
            self._took(unit, lease)

        def refused(failure: Any) -> None:
            error = failure.value
            if isinstance(error, LeaseConflict):
                raise StartupError(str(error)) from None
            if isinstance(error, LeaseError):
                raise StartupError(f"cannot take the lease on {own}: {error}") from None
            failure.raiseException()

        return lease.acquire().addCallbacks(held, refused)

    def _make_lease(self, unit: ExportUnit, resource: str) -> LeaseManager:
        """The one way this node builds a lease: its lockspace, its identity, its clock."""
        assert self._lockspace is not None
        lease = LeaseManager(
            self._lockspace,
            resource=resource,
            owner=f"{socket.gethostname()}:{os.getpid()}:{unit.name}",
            mode=LeaseMode.READONLY if unit.image.read_only else LeaseMode.EXCLUSIVE,
            clock=self.clock,
            tracer=self.tracer,
            on_fenced=unit.fenced,
        )
        # Published with every grant it holds, for a ferry proxy looking for
        # the image (the port is open before any export is added: ``start``).
        lease.serving_address = self._serving_address()
        return lease

    def _serving_address(self) -> str | None:
        """HOST:PORT where this node's NBD port is, once open: what a ferry proxy is told.

        A wildcard address (all interfaces) is published as the host's name.
        """
        if self.nbd_address is None:
            return None
        host, port = self.nbd_address
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _took(self, unit: ExportUnit, lease: LeaseManager) -> None:
        """``unit`` holds ``lease`` now: released at shutdown, handed on by a migration out."""
        assert self._lockspace is not None
        unit.holds(lease)
        log.info(
            "holding the lease on {resource} (token {token}) in {space}",
            resource=lease.resource,
            token=lease.token,
            space=self._lockspace.spec,
        )

    def _check_senders_are_named(self, export_acl: Acl) -> None:
        """A listening export must say who may hand it an image (``Acl.admits_sender``).

        A sender must be named by the listener's ACL or the export's own; with
        neither naming anyone, senders are admitted only from loopback: on
        any other address that would be no sender at all, which is a mistake
        worth one line now rather than a refused migration later.  flexnbd's
        stream (``--oldstyle``) cannot be told apart from a client's, so it
        needs an ACL whatever the address.
        """
        assert self.server is not None
        if self.server.acl.networks or export_acl.networks:
            return
        # ``ferry listen`` names senders as ACL entries; a daemon in its export's acl.
        hint = (
            "name the source hosts as ACL entries (ferry listen ... ADDRESS ...)"
            if self.config.exit_stops_node
            else "name the source hosts in the export's acl"
        )
        if self.config.oldstyle:
            raise StartupError(
                f"listen --oldstyle takes flexnbd's migration, which cannot authenticate: {hint}"
            )
        if not is_loopback(self.config.addr):
            raise StartupError(
                f"listen on {self.config.addr} admits migration senders only from the addresses "
                f"its ACL names: {hint}"
            )

    # -- the port ----------------------------------------------------------------------

    def _open_nbd(self, config: NodeConfig) -> None:
        assert self.server is not None and self.carrier is not None
        self.nbd_port = self._listen_tcp(config.port, self.server, config.addr, "NBD")
        if config.nbd_sock:
            self._listen_unix(config.nbd_sock)
        service = self.carrier.service
        if service is None:
            return
        # Held now if an image is served from the start; a listener takes it at the commit.
        if any(not export.listen for export in self._initial):
            try:
                if service.hold():
                    log.info("added the service address {address}", address=str(service.address))
            except AddressError as error:
                raise StartupError(f"--service-address: {error}") from None
        if ipaddress.ip_address(config.addr or "0.0.0.0").is_unspecified:
            return  # the port on every address covers the service address too
        # A destination listens there before the address is its own (IP_FREEBIND).
        try:
            listening = listen_freebind(service.address.ip, config.port)
        except OSError as error:
            raise StartupError(
                f"cannot listen for NBD on {service.address.ip}:{config.port}: {error.strerror}"
            ) from None
        with listening:
            port = self.reactor.adoptStreamPort(listening.fileno(), listening.family, self.server)
        self._ports.append(port)

    @property
    def nbd_address(self) -> tuple[str, int] | None:
        """Where clients reach this node: the NBD port's address and number (None: not open)."""
        if self.nbd_port is None:
            return None
        host = self.nbd_port.getHost()
        return str(host.host), int(host.port)  # type: ignore[attr-defined]

    @property
    def port(self) -> int:
        """The NBD port the node listens on (0 before it does)."""
        address = self.nbd_address
        return 0 if address is None else address[1]

    def _announce(self, unit: ExportUnit) -> None:
        """Log that ``unit`` is on the port.

        Said once the reactor runs, and so once SIGTERM is ferry's to handle:
        whoever waits for this line may stop the node at once.
        """
        self.reactor.callWhenRunning(
            log.info,
            "{doing} {file} ({size} bytes) as {name!r} on {addr}:{port}",
            doing="listening for a migration of" if unit.config.listen else "serving",
            file=unit.config.file,
            size=unit.image.size,
            name=unit.name,
            addr=self.config.addr,
            port=self.port,
        )

    def _after_handoff(self, name: str) -> None:
        """The ``exit`` action of export ``name``'s migration: it is handed over.

        Called inside the handoff; once the mirror's end has been reported
        (so waiters on the control socket have had their answer) the process
        stops on a later turn of the reactor, or, in a daemon, the export is
        removed and the others go on.
        """

        def done(_: object) -> None:
            if self.config.exit_stops_node:
                self.reactor.callLater(0, self.reactor.stop)
            elif name in self.exports.names():
                self.reactor.callLater(0, self.remove_export, name)

        if name in self.exports.names():
            self.exports.get(name).mirrors.finished().addBoth(done)
        else:  # removed with force meanwhile
            done(None)

    def _listen_tcp(self, port: int, factory: Any, host: str, what: str) -> IListeningPort:
        try:
            listening: IListeningPort = self.reactor.listenTCP(port, factory, interface=host)
        except CannotListenError as error:
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            raise StartupError(f"cannot listen for {what} on {host}:{port}: {reason}") from None
        self._ports.append(listening)
        return listening

    def _listen_unix(self, path: str) -> None:
        """NBD on the Unix socket ``path`` too, mode 0600: only this user's processes connect
        (and so the ACL does not apply to them: ``ferry.serve.acl.LOCAL_PEER``)."""
        from ferry.control.server import ControlSocketError, claim_socket_path

        assert self.server is not None
        old_umask = os.umask(0o177)
        try:
            claim_socket_path(path, "NBD socket")
            self._ports.append(self.reactor.listenUNIX(path, self.server, mode=0o600))
        except ControlSocketError as error:
            raise StartupError(str(error)) from None
        except CannotListenError as error:
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            raise StartupError(f"cannot listen for NBD on {path}: {reason}") from None
        finally:
            os.umask(old_umask)

    # -- the stream of listen --stdio ----------------------------------------------------

    def _serve_stdio(self) -> None:
        """Take the one migration of ``listen --stdio`` on stdin and stdout."""
        from ferry.serve.stdio import serve_stdio

        assert self.server is not None
        serve_stdio(self.server, self._stdio_ended, self.reactor)

    def _stdio_ended(self) -> None:
        """stdin closed: with the image received, serve on; without it, there is nothing to
        serve and no one can send it again (a new ``exec:`` starts a new listener): stop."""
        unfinished = (RoleState.LISTENING, RoleState.RECEIVING)
        if self._stopped or not any(unit.export.state in unfinished for unit in self.exports):
            return
        self.stdio_failure = "the migration over stdin and stdout ended before it completed"
        log.error("{why}: stopping", why=self.stdio_failure)
        if self.reactor.running:
            self.reactor.stop()

    # -- stopping ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def shutdown(self) -> Any:
        """Stop accepting, end migrations, finish requests in flight, flush, and close.

        Registered as a 'before shutdown' trigger, so SIGINT and SIGTERM
        (which Twisted turns into ``reactor.stop()``) wait for it.  A
        migration that is running is stopped first, as ``break`` would (or
        abandoned once its commit may have landed: the lease settles that):
        its destination sees the connection go and listens again.
        """
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting down: finishing requests in flight")
        if self.server is not None:
            self.server.accepting = False
        for port in self._ports:
            yield port.stopListening()
        yield defer.DeferredList([unit.mirrors.stop("shut down") for unit in self.exports])
        if self.server is not None:
            yield self.server.drain()
        for unit in self.exports:
            yield self._stop_unit(unit)
        # After the last transition, so subscribers have seen every one.
        yield self.events.close("the server is shutting down")
        self.clock.cancel_all()
        if self._lockspace is not None:
            yield self._lockspace.close()
        self._close_now()
        log.info("stopped")

    @defer.inlineCallbacks
    def _stop_unit(self, unit: ExportUnit) -> Any:
        """One export's end: migration stopped, clients drained, image flushed, role stopped."""
        yield unit.mirrors.stop("the export is removed")
        if self.server is not None:
            yield self.server.drain_export(unit.name)
        image = unit.image
        if not image.closed:
            yield self.run_blocking(image.flush)
        yield unit.stop()
        image.close()
        if self.server is not None:
            self.server.forget_lane(unit.name)

    def _close_now(self) -> None:
        if self.carrier is not None:
            self.carrier.close()
            self.carrier = None
        for unit in self.exports:
            unit.image.close()
        if self._trace_file is not None:
            self._trace_file.close()
            self._trace_file = None


def _service_address(config: NodeConfig) -> ServiceAddressHolder | None:
    if not config.service_address:
        return None
    try:
        return ServiceAddressHolder(ServiceAddress.parse(config.service_address))
    except AddressError as error:
        raise StartupError(f"--service-address {config.service_address}: {error}") from None
