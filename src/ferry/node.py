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

``ferry serve --takeover SOCK`` (and ``ferry daemon --takeover SOCK``)
starts a node from another one on this host (:meth:`Node.take_over`,
:mod:`ferry.takeover`): its listening sockets, and every export's image,
lease and clients, are adopted rather than opened, and any node can hand
its own on the same way (its control socket's ``takeover``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from ferry.chartnames import RoleState, RoleTrigger
from ferry.clock import ReactorClock
from ferry.control.commands import Command, Commands
from ferry.control.events import EventHub
from ferry.control.server import ControlFactory, listen_control
from ferry.exports import (
    ExportBusy,
    ExportConfig,
    ExportError,
    ExportRegistry,
    ExportUnit,
    export_of,
)
from ferry.handoff.address import AddressError, ServiceAddress, listen_freebind
from ferry.hooks import NO_HOOKS, HookConfig, HookContext, Hooks, parse_hooks
from ferry.lease.backend import (
    Grant,
    LeaseBackend,
    LeaseConflict,
    LeaseError,
    LeaseMode,
    PassingBackend,
)
from ferry.lease.incoming import IncomingLease
from ferry.lease.manager import LeaseManager
from ferry.lease.spec import (
    default_lockspace,
    default_resource,
    open_lockspace,
    parse_lockspace,
)
from ferry.letgo import let_go
from ferry.metrics import make_registry, metrics_root
from ferry.migrate.arrivals import Arrivals
from ferry.migrate.carry import Carrier
from ferry.migrate.destination import Receiver
from ferry.migrate.manager import MirrorManager
from ferry.migrate.service import ServiceAddressHolder
from ferry.migrate.transport import connector
from ferry.nbd.events import Event
from ferry.nbd.server import ServerConnection
from ferry.nbd.session import SnapshotError
from ferry.safepath import UnsafePath
from ferry.serve.acl import Acl, AclError, is_loopback
from ferry.serve.connection import Arrival, Given, NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.lanes import JOBS_PER_EXPORT
from ferry.serve.limits import MAX_CLIENTS, MAX_CONNECTIONS_PER_ADDRESS
from ferry.serve.server import NBDServer
from ferry.serve.stats import HandoffCounts
from ferry.storage import Image
from ferry.takeover import notes
from ferry.takeover.give import Giver
from ferry.takeover.options import served_exports
from ferry.takeover.state import ExportDescriptors, ExportState, TakeoverStateError
from ferry.takeover.take import Taken, TakeoverError, ask
from ferry.tls import Credentials, ServerTLS, TLSError, TLSMode, load_credentials, read_subjects
from ferry.trace import TraceFile, Tracer, TraceRecord, log_transitions
from ferry.workers import WorkerPool

__all__ = ["NO_LOCKSPACE", "Node", "NodeConfig", "ServeConfig", "StartupError"]

log = Logger()

#: ``--lockspace none``: serve without a lease (nothing fences this node).
NO_LOCKSPACE = "none"

#: The worker threads every export's disk calls share: room for three
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
    # --tls, --tls-certificates, --tls-verify-peer, --tls-allowed-subjects (see ferry.tls).
    # With certificates, this node's migrations go out over TLS too.
    tls: TLSMode = TLSMode.OFF
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    tls_allowed_subjects: str | None = None
    # --service-address IP/PREFIX@DEV: the address clients use, which moves
    # with the image (``ferry serve`` and ``listen``; a daemon has none).
    service_address: str | None = None
    # A daemon's hooks (ferry.hooks): every export's, under its own.
    hooks: HookConfig | None = None
    # --nbd-sock PATH: NBD on a Unix socket too (0600: this user's peers only).
    nbd_sock: str | None = None
    # --stdio (listen): one connection, the migration's, over stdin and stdout.
    stdio: bool = False
    # --max-clients, --max-connections-per-address (ferry.serve.limits): a
    # hypervisor that runs many guests from one address needs more than 32.
    max_clients: int = MAX_CLIENTS
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS

    @classmethod
    def from_served(
        cls, served: Mapping[str, Any], *, trace: str | None, exit_stops_node: bool
    ) -> NodeConfig:
        """The node an old process runs (its ``served`` answer's ``node``), for a takeover.

        ``trace`` and ``exit_stops_node`` are this process's own.  A value of
        the wrong kind is a :class:`StartupError`: the old process is not a
        ferry this one understands.
        """
        try:
            node = served["node"]
            metrics = node.get("metrics")
            hooks = node.get("hooks")
            return cls(
                addr=_typed(node, "addr", str),
                port=_typed(node, "port", int),
                sock=_typed(node, "sock", str, optional=True),
                acl=tuple(_of_kind(entry, "an ACL entry", str) for entry in node["acl"]),
                default_deny=_typed(node, "default_deny", bool),
                oldstyle=_typed(node, "oldstyle", bool),
                metrics=None if metrics is None else (str(metrics[0]), int(metrics[1])),
                trace=trace,
                lockspace=_typed(node, "lockspace", str),
                exit_stops_node=exit_stops_node,
                service_address=_typed(node, "service_address", str, optional=True),
                tls=TLSMode(node["tls"]),
                tls_certificates=_typed(node, "tls_certificates", str, optional=True),
                tls_verify_peer=_typed(node, "tls_verify_peer", bool),
                tls_allowed_subjects=_typed(node, "tls_allowed_subjects", str, optional=True),
                hooks=None if hooks is None else parse_hooks(hooks, node["hook_timeout"]),
                # A giver from before these options served the defaults.
                max_clients=_count(node, "max_clients", MAX_CLIENTS),
                max_connections_per_address=_count(
                    node, "max_connections_per_address", MAX_CONNECTIONS_PER_ADDRESS
                ),
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise StartupError(f"the old process's options cannot be read: {error}") from None


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
    # --tls, --tls-certificates, --tls-verify-peer, --tls-allowed-subjects (see ferry.tls).
    # With certificates, this node's migrations go out over TLS too.
    tls: TLSMode = TLSMode.OFF
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    tls_allowed_subjects: str | None = None
    # --service-address IP/PREFIX@DEV: the address clients use, which moves with the image.
    service_address: str | None = None
    hooks: HookConfig = NO_HOOKS  # --hook STAGE=PATH, --hook-timeout
    nbd_sock: str | None = None  # --nbd-sock PATH
    stdio: bool = False  # --stdio (listen)
    max_clients: int = MAX_CLIENTS  # --max-clients
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS

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
            tls=self.tls,
            tls_certificates=self.tls_certificates,
            tls_verify_peer=self.tls_verify_peer,
            tls_allowed_subjects=self.tls_allowed_subjects,
            service_address=self.service_address,
            nbd_sock=self.nbd_sock,
            stdio=self.stdio,
            max_clients=self.max_clients,
            max_connections_per_address=self.max_connections_per_address,
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
        self.clock = ReactorClock(reactor, monotonic=time.monotonic)
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
        # The --tls-certificates directory, checked: the client side of migrations.
        self.credentials: Credentials | None = None
        # Exports whose lease is being taken: not served yet, but their
        # machines already run (and are logged under their name).
        self._adding: dict[str, ExportUnit] = {}
        # Called after an export was added or removed (a daemon's STATUS).
        self.exports_changed: list[Callable[[], None]] = []
        self._running = False  # every export of the start serves
        # How client connections move at a handoff (opened with the node).
        self.carrier: Carrier | None = None
        self._stopped = False
        self._workers = WorkerPool(reactor, WORKER_THREADS)
        self._not_accepting: list[IListeningPort] = []  # NBD ports held until the start is done
        # The listening sockets a takeover hands on, by kind (ferry.takeover.state).
        self._handed: list[tuple[str, IListeningPort]] = []
        self._metrics_site: Site | None = None
        self._commands: Commands | None = None
        self._giver = Giver(self)
        # Why ``listen --stdio`` stopped without the image (None: it did not).
        self.stdio_failure: str | None = None

    def run_blocking(self, work: Callable[[], object]) -> Deferred[Any]:
        """Run ``work`` on one of the node's worker threads (every export's disk calls)."""
        return self._workers(work)

    def _image_call(self, export: Export, work: Callable[[], Any]) -> Deferred[Any]:
        """A migration's call on ``export``'s image (a read, an extent scan), in its lane."""
        assert self.server is not None
        return self.server.run_blocking_for(export, work)

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
        ever served without one (one that comes sooner waits in the listen
        backlog until every export of the start serves).  Without a
        lockspace the answer has fired when this returns (a local lockspace
        answers from its own thread, etcd over the network).
        """
        try:
            self._open(self.config)
            self._open_nbd(self.config)
            # Bound (a port in use is said at once) but not accepting until every
            # export of the start serves: a client that comes sooner waits in the
            # listen backlog rather than being told there is no such export.
            for port in self._not_accepting:
                port.stopReading()  # type: ignore[attr-defined]
        except Exception:
            self._failed_start(None)
            return defer.fail()
        started = self._add_all(self._initial)
        started.addCallback(self._started)
        return started.addErrback(self._failed_start)

    def _started(self, _: object) -> None:
        """Every export of the start serves: say so, one line each (later ones as they come)."""
        self._running = True
        ports, self._not_accepting = self._not_accepting, []
        for port in ports:
            port.startReading()  # type: ignore[attr-defined]
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

    def _open(self, config: NodeConfig, *, adopting: bool = False) -> None:
        """Everything but the NBD port and the exports; ``adopting``: no socket is
        listened on either (a takeover adopts the old process's)."""
        try:
            acl = Acl.parse(config.acl, default_deny=config.default_deny)
        except AclError as error:
            raise StartupError(str(error)) from None
        tls = self._open_tls(config)
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
            max_clients=config.max_clients,
            max_per_address=config.max_connections_per_address,
            receiver=Receiver(
                run_blocking=self.run_blocking,
                clock=self.clock,
                arrivals=Arrivals(self.reactor, self.carrier),
            ),
            tls=tls,
        )
        if config.sock:
            from ferry.control.server import ControlSocketError

            commands = Commands(
                self.server, self.exports, host=self, default_deny=config.default_deny
            )
            for name, command in self._extra_commands.items():
                commands.table[name] = command
            commands.table[notes.DESCRIBE] = self._giver.describe
            commands.upgrades[notes.REQUEST] = self._giver.request
            self._commands = commands
            if not adopting:
                try:
                    control = listen_control(self.reactor, config.sock, commands, self.events)
                except ControlSocketError as error:
                    raise StartupError(str(error)) from None
                self._ports.append(control)
                self._handed.append(("control", control))
        if config.metrics:
            registry = make_registry(lambda: list(self.exports))
            self._metrics_site = Site(metrics_root(registry))  # type: ignore[no-untyped-call]
            if not adopting:
                host, port = config.metrics
                self.metrics_port = self._listen_tcp(port, self._metrics_site, host, "metrics")
                self._handed.append(("metrics", self.metrics_port))
                self._log_metrics()
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

    def _log_metrics(self) -> None:
        assert self.metrics_port is not None
        host = self.metrics_port.getHost()
        log.info("metrics at http://{host}:{port}/metrics", host=host.host, port=host.port)  # type: ignore[attr-defined]

    def _open_tls(self, config: NodeConfig) -> ServerTLS:
        """Check the TLS options and read the certificates, before anything opens."""
        mode = config.tls
        if config.oldstyle and mode is not TLSMode.OFF:
            raise StartupError(
                f"--oldstyle cannot be combined with --tls {mode.value}: "
                "oldstyle negotiation has no NBD_OPT_STARTTLS"
            )
        if mode is not TLSMode.OFF and config.tls_certificates is None:
            raise StartupError(
                f"--tls {mode.value} needs --tls-certificates DIR "
                "(with ca-cert.pem, server-cert.pem and server-key.pem)"
            )
        if config.tls_verify_peer and mode is TLSMode.OFF:
            raise StartupError("--tls-verify-peer needs --tls on or --tls require")
        if config.tls_allowed_subjects is not None and not config.tls_verify_peer:
            raise StartupError(
                "--tls-allowed-subjects needs --tls-verify-peer: without it no subject is verified"
            )
        if config.tls_certificates is None:
            return ServerTLS(TLSMode.OFF)
        try:
            self.credentials = load_credentials(
                config.tls_certificates, server=mode is not TLSMode.OFF
            )
            allowed = None
            if config.tls_allowed_subjects is not None:
                allowed = read_subjects(config.tls_allowed_subjects)
        except TLSError as error:
            raise StartupError(str(error)) from None
        if mode is TLSMode.OFF:
            return ServerTLS(TLSMode.OFF)
        return ServerTLS(
            mode,
            self.credentials.server_options(verify_peer=config.tls_verify_peer),
            verify_peer=config.tls_verify_peer,
            allowed_senders=allowed,
        )

    # -- exports ------------------------------------------------------------------------

    def add_export(self, config: ExportConfig) -> Deferred[ExportUnit]:
        """Open ``config``'s image, take its lease (or get ready for one), and serve it.

        Fails with :class:`StartupError`: a missing or unreadable file, a
        name in use, a bad ACL, a lease someone else holds.  On failure
        nothing of the export is left open.
        """
        from ferry.storage import ImageError

        assert self.server is not None
        if self._giver.running:
            return defer.fail(
                StartupError("a takeover of this node is under way: add it to the new process")
            )
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
        unit = self._unit(config, image, acl)
        export, name = unit.export, unit.name
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

    def _unit(self, config: ExportConfig, image: Image, acl: Acl) -> ExportUnit:
        """An export of ``image``, with its migrations and hooks; not served yet, no lease yet."""
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
            tls=None if self.credentials is None else self.credentials.client_creator,
            carrier=self.carrier,
            hooks=hooks,
            image_calls=lambda work: self._image_call(export, work),
        )
        unit = ExportUnit(config, export, mirrors)
        unit.can_move_connections = self.carrier is not None and self.carrier.can_move
        return unit

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
        if self._giver.running:
            return defer.fail(
                ExportBusy("a takeover of this node is under way: remove it from the new process")
            )
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

    def _make_lease(
        self, unit: ExportUnit, resource: str, *, owner: str | None = None
    ) -> LeaseManager:
        """The one way this node builds a lease: its lockspace, its identity, its clock.

        ``owner``: a grant taken over from another process on this host keeps
        the name it was granted under.
        """
        assert self._lockspace is not None
        lease = LeaseManager(
            self._lockspace,
            resource=resource,
            owner=owner or f"{socket.gethostname()}:{os.getpid()}:{unit.name}",
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
        worth one line now rather than a refused migration later -- unless
        senders can prove who they are with a certificate
        (``--tls-verify-peer``), which needs no address.  flexnbd's stream
        (``--oldstyle``) cannot be told apart from a client's, so it needs an
        ACL whatever the address.
        """
        assert self.server is not None
        if self.server.acl.networks or export_acl.networks or self.server.tls.verify_peer:
            return
        # ``ferry listen`` names senders as ACL entries; a daemon in its export's acl.
        # Each asks for certificates in its own words.
        if self.config.exit_stops_node:
            hint = "name the source hosts as ACL entries (ferry listen ... ADDRESS ...)"
            by_certificate = "--tls require --tls-verify-peer"
        else:
            hint = "name the source hosts in the export's acl"
            by_certificate = 'tls = "require" and tls_verify_peer = true'
        if self.config.oldstyle:
            raise StartupError(
                f"listen --oldstyle takes flexnbd's migration, which cannot authenticate: {hint}"
            )
        if not is_loopback(self.config.addr):
            raise StartupError(
                f"listen on {self.config.addr} admits migration senders only from the addresses "
                f"its ACL names: {hint}, or authenticate them by certificate ({by_certificate})"
            )

    # -- the port ----------------------------------------------------------------------

    def _open_nbd(self, config: NodeConfig) -> None:
        assert self.server is not None and self.carrier is not None
        self.nbd_port = self._listen_tcp(config.port, self.server, config.addr, "NBD")
        self._not_accepting.append(self.nbd_port)
        self._handed.append(("nbd", self.nbd_port))
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
        self._not_accepting.append(port)
        self._handed.append(("nbd", port))

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

    # -- handing the node on to a new process (ferry.takeover.give) --------------------

    def served(self) -> dict[str, Any]:
        """What this node serves now, and how, as a takeover's taker takes it
        (:mod:`ferry.takeover.options`; the ACLs as they are now)."""
        config = self.config
        assert self.server is not None and self.nbd_address is not None
        metrics = None
        if self.metrics_port is not None:
            host = self.metrics_port.getHost()
            metrics = [str(host.host), int(host.port)]  # type: ignore[attr-defined]
        node = {
            "addr": config.addr,
            "port": self.nbd_address[1],
            "sock": None if config.sock is None else os.path.abspath(config.sock),
            "acl": self.server.acl.entries(),
            "default_deny": self.server.acl.default_deny,
            "oldstyle": config.oldstyle,
            "metrics": metrics,
            "lockspace": NO_LOCKSPACE if self._lockspace is None else self._lockspace.spec,
            "service_address": config.service_address,
            "tls": config.tls.value,
            "tls_certificates": _absolute(config.tls_certificates),
            "tls_verify_peer": config.tls_verify_peer,
            "tls_allowed_subjects": _absolute(config.tls_allowed_subjects),
            "hooks": None if config.hooks is None else _hook_settings(config.hooks),
            "hook_timeout": None if config.hooks is None else config.hooks.timeout,
            "max_clients": config.max_clients,
            "max_connections_per_address": config.max_connections_per_address,
        }
        exports = []
        for unit in self.exports:
            lease = unit.lease
            exports.append(
                {
                    "name": unit.name,
                    "file": os.path.abspath(unit.config.file),
                    "description": unit.export.description,
                    "read_only": unit.image.read_only,
                    "acl": unit.export.acl.entries(),
                    "default_deny": unit.export.acl.default_deny,
                    "resource": unit.config.resource if lease is None else lease.resource,
                    "max_downtime": unit.config.max_downtime,
                    "hooks": _hook_settings(unit.config.hooks),
                    "hook_timeout": unit.config.hooks.timeout,
                    "lease_owner": None if lease is None else lease.owner,
                }
            )
        return {"node": node, "exports": exports}

    def handed_ports(self) -> list[tuple[str, IListeningPort]]:
        return list(self._handed)

    def let_go_ports(self) -> None:
        """The new process listens on them now: drop ours without closing them."""
        for _, port in self._handed:
            let_go(port)
            if port in self._ports:
                self._ports.remove(port)
        self._handed.clear()

    def stop_after_takeover(self) -> None:
        """Stop on a later turn (unless a shutdown is under way already: it waited for this)."""
        if not self._stopped:
            self.reactor.callLater(0, self.reactor.stop)

    # -- taking a node over from another process (ferry.takeover.take) -----------------

    def take_over(
        self,
        path: str,
        *,
        served: Mapping[str, Any],
        given: Mapping[str, Any] | None = None,
        formats: frozenset[int],
    ) -> None:
        """Take every export of the ferry at control socket ``path`` over, with its clients.

        Blocking, before the reactor runs.  ``self.config`` is the node the
        old process said it runs (its ``served`` answer, checked against
        ``given``, the options the operator wrote); its exports are those of
        ``served``.  Everything that needs no socket of the old process's --
        the images, opened by their paths; the exports' and the leases'
        machines; the trace, the freeze table -- is made before the old
        process is asked, so its clients wait only for the exchange itself.
        Raises :class:`StartupError` (the old process serves on) unless this
        node serves every export when it returns.
        """
        self.reactor.suggestThreadPoolSize(WORKER_THREADS)
        try:
            self._open(self.config, adopting=True)
            prepared = self._prepare_takeover(served)
        except Exception:
            self._failed_start(None)
            raise
        try:
            taken = ask(path, now=self.clock.seconds, formats=formats)
        except TakeoverError as error:
            prepared.undo(self._lockspace)
            self._failed_start(None)
            raise StartupError(str(error)) from None
        try:
            self._check_takeover(taken, prepared, given or {})
        except (StartupError, LeaseError, SnapshotError, TakeoverStateError, OSError) as error:
            why = str(error) or type(error).__name__
            taken.refuse(why)
            prepared.undo(self._lockspace)
            self._failed_start(None)
            raise StartupError(f"cannot take the node over: {why}") from None
        try:
            taken.commit()
        except TakeoverError as error:
            prepared.undo(self._lockspace)
            taken.close()
            self._failed_start(None)
            raise StartupError(str(error)) from None
        try:
            self._adopt(taken, prepared)
        finally:
            taken.close()

    def _prepare_takeover(self, served: Mapping[str, Any]) -> _Prepared:
        """The exports as the old process says it serves them, not serving; no lease held."""
        from ferry.storage import ImageError

        try:
            configs = served_exports(served)
            owners = [entry.get("lease_owner") for entry in served["exports"]]
        except (ValueError, KeyError, TypeError) as error:
            raise StartupError(f"the old process's exports cannot be read: {error}") from None
        prepared = _Prepared()
        try:
            for config, owner in zip(configs, owners, strict=True):
                try:
                    image = self._open_image(config.file, read_only=config.read_only)
                except ImageError as error:
                    raise StartupError(f"export {config.export_name!r}: {error}") from None
                try:
                    acl = Acl.parse(config.acl, default_deny=config.default_deny)
                    one = _PreparedExport(image, self._unit(config, image, acl))
                except BaseException:
                    image.close()
                    raise
                prepared.exports.append(one)
                if self._lockspace is not None and owner is not None:
                    resource = config.resource or default_resource(config.file)
                    one.lease = self._make_lease(one.unit, resource, owner=str(owner))
                    one.lease.register()
                    one.unit.resource = resource
        except BaseException:
            prepared.undo(self._lockspace)
            raise
        return prepared

    def _check_takeover(self, taken: Taken, prepared: _Prepared, given: Mapping[str, Any]) -> None:
        """Check what arrived and rebuild the sessions; touch no socket and no lockspace."""
        from ferry.takeover.options import differences

        state = taken.state
        wrong = differences(given, state.served)
        if wrong:
            raise StartupError("; ".join(wrong))
        names = [export.name for export in state.exports]
        if names != [one.unit.name for one in prepared.exports]:
            raise StartupError(f"the old process serves {names} now, not what it described")
        assert self.server is not None
        # The ACLs as they are now in the old process (`ferry acl` may have changed them).
        node = NodeConfig.from_served(state.served, trace=None, exit_stops_node=True)
        self.server.acl = Acl.parse(node.acl, default_deny=node.default_deny)
        try:
            configs = served_exports(state.served)
        except (ValueError, KeyError, TypeError) as error:
            raise StartupError(f"the old process's exports cannot be read: {error}") from None
        for config, one, export, fds in zip(
            configs, prepared.exports, state.exports, taken.fds.exports, strict=True
        ):
            one.unit.config = config
            one.unit.export.acl = Acl.parse(config.acl, default_deny=config.default_deny)
            self._check_export(one, export, fds)
            if one.lease is not None and export.lease is not None:
                one.grant = self._adopt_grant(export, fds)

    def _check_export(
        self, one: _PreparedExport, export: ExportState, fds: ExportDescriptors
    ) -> None:
        """One export: the very file, its sessions rebuilt, the lease it described."""
        assert self.server is not None
        # This process opened the image by its path: it must be the very file.
        mine, theirs = os.fstat(one.image.fileno()), os.fstat(fds.image)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            raise StartupError(
                f"{export.image.path} is not the file the old process serves (replaced since?)"
            )
        one.sessions = [
            ServerConnection.restore(client.session, self.server) for client in export.clients
        ]
        lease, passed = one.lease, export.lease
        if (lease is None) != (passed is None):
            raise StartupError(f"export {export.name!r}: its lease is not the one described")
        if (
            lease is not None
            and passed is not None
            and (passed.grant.resource, passed.grant.holder.owner) != (lease.resource, lease.owner)
        ):
            raise StartupError(
                f"the old process holds the lease on {passed.grant.resource} as "
                f"{passed.grant.holder.owner}, not on {lease.resource} as {lease.owner}"
            )

    def _adopt_grant(self, export: ExportState, fds: ExportDescriptors) -> Grant:
        passed = export.lease
        assert passed is not None
        backend = self._lockspace
        if not isinstance(backend, PassingBackend):
            spec = "no lockspace" if backend is None else backend.spec
            raise StartupError(f"the old process holds a lease, and {spec} cannot keep it")
        lock = None if fds.lock is None else os.dup(fds.lock)
        try:
            return backend.adopt(dataclasses.replace(passed, fd=lock))
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise

    def _adopt(self, taken: Taken, prepared: _Prepared) -> None:
        """The old process let go: adopt its sockets, hold its leases, serve its clients."""
        state = taken.state
        assert self.server is not None and self._commands is not None
        factories = {
            "nbd": self.server,
            "control": ControlFactory(self._commands, self.events),
            "metrics": self._metrics_site,
        }
        for port_state, fd in zip(state.ports, taken.fds.ports, strict=True):
            port = self.reactor.adoptStreamPort(fd, port_state.family, factories[port_state.kind])
            self._ports.append(port)
            self._handed.append((port_state.kind, port))
            if port_state.kind == "nbd" and self.nbd_port is None:
                self.nbd_port = port
            elif port_state.kind == "metrics":
                self.metrics_port = port
                self._log_metrics()
        moved = 0
        for one, export, fds in zip(
            prepared.exports, state.exports, taken.fds.exports, strict=True
        ):
            moved += self._adopt_export(one, export, fds, taken.asked_at).moved
        log.info(
            "took {what} over from process {pid}: {moved} client connection(s), "
            "{ports} listening socket(s), {leases} lease(s), {ms:.1f} ms after asking",
            what=f"{len(state.exports)} exports"
            if len(state.exports) != 1
            else state.exports[0].name,
            pid=state.pid,
            moved=moved,
            ports=len(state.ports),
            leases=sum(one.unit.lease is not None for one in prepared.exports),
            ms=(self.clock.seconds() - taken.asked_at) * 1000,
        )
        self._running = True
        for one in prepared.exports:
            self._announce(one.unit)

    def _adopt_export(
        self, one: _PreparedExport, export: ExportState, fds: ExportDescriptors, asked_at: float
    ) -> HandoffCounts:
        """One export: its lease held, served, its clients joined and answered."""
        assert self.server is not None
        unit = one.unit
        if self.nbd_address is not None:
            host, port_number = self.nbd_address
            unit.address = f"[{host}]:{port_number}" if ":" in host else f"{host}:{port_number}"
        lease, passed = one.lease, export.lease
        if lease is not None and passed is not None and one.grant is not None:
            valid_until = None
            if passed.valid_for is not None:
                valid_until = asked_at + passed.valid_for
            lease.adopt(one.grant, valid_until=valid_until)
            one.grant = None
            self._took(unit, lease)
        self.exports.add(unit)
        self.server.add_export(unit.export)
        unit.export.trigger(RoleTrigger.TAKEN_OVER)
        counts = unit.export.last_handoff = HandoffCounts()
        for client, fd, (session, requests) in zip(
            export.clients, fds.clients, one.sessions, strict=True
        ):
            context_id = next((i for i, _ in client.session.meta_contexts), 0)
            protocol = NBDServerProtocol(
                self.server, arrival=Arrival(session, requests, context_id, client.replies)
            )
            try:
                self.reactor.adoptStreamConnection(fd, client.family, Given(protocol))
            except OSError as error:
                log.warn("a client connection cannot be adopted: {error}", error=error)
                counts.aborted += 1
                continue
            protocol.join(unit.export)
            counts.moved += 1
        return counts

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
            port = self.reactor.listenUNIX(path, self.server, mode=0o600)
            self._ports.append(port)
            self._not_accepting.append(port)  # (see start: accepting once the start is done)
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
        # A takeover under way ends first, one way or the other.
        yield self._giver.ended()
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
        self._workers.stop()
        if self.carrier is not None:
            self.carrier.close()
            self.carrier = None
        for unit in self.exports:
            unit.image.close()
        if self._trace_file is not None:
            self._trace_file.close()
            self._trace_file = None


@dataclass
class _PreparedExport:
    """One export a takeover built before the old process let go."""

    image: Image
    unit: ExportUnit
    lease: LeaseManager | None = None  # registered: nothing asked of the lockspace
    sessions: list[tuple[ServerConnection, list[Event]]] = field(default_factory=list)
    grant: Grant | None = None  # kept by the backend, not held by the manager yet


@dataclass
class _Prepared:
    """What a takeover built before the old process let go; ``undo`` if it never does."""

    exports: list[_PreparedExport] = field(default_factory=list)

    def undo(self, lockspace: LeaseBackend | None) -> None:
        """Close this process's copies; the old process holds (and serves) it all."""
        for one in self.exports:
            if one.grant is not None and isinstance(lockspace, PassingBackend):
                lockspace.let_go(one.grant)
            one.grant = None
            if one.lease is not None:
                one.lease.shutdown()  # registered -> stopped: no lockspace call
            if one.unit.export.can(RoleTrigger.SHUTDOWN):
                one.unit.export.trigger(RoleTrigger.SHUTDOWN)
            one.image.close()


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def _hook_settings(hooks: HookConfig) -> dict[str, str]:
    """A node's or an export's hooks, their paths absolute (the taker's directory is its own)."""
    return {stage: os.path.abspath(path) for stage, path in hooks.settings().items()}


def _typed(served: Mapping[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    """``served[key]`` if it is a ``kind`` (or None, if ``optional``); TypeError if not."""
    value = served[key]
    return None if value is None and optional else _of_kind(value, key, kind)


def _count(served: Mapping[str, Any], key: str, default: int) -> int:
    """``served[key]``, a count of at least one; ``default`` if missing (an older giver)."""
    value: int = _of_kind(served.get(key, default), key, int)
    if value < 1:
        raise ValueError(f"{key} is {value}, not 1 or more")
    return value


def _of_kind(value: Any, what: str, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{what} is {value!r}, not a {kind.__name__}")
    return value


def _service_address(config: NodeConfig) -> ServiceAddressHolder | None:
    if not config.service_address:
        return None
    try:
        return ServiceAddressHolder(ServiceAddress.parse(config.service_address))
    except AddressError as error:
        raise StartupError(f"--service-address {config.service_address}: {error}") from None
