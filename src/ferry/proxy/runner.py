"""A running ``ferry proxy``: the composition root of the proxy, as ``ferry.node`` is a server's.

It makes the clock, the tracer (and ``--trace`` file), the finder and the
dialer, then opens, in an order that leaves nothing half-open on failure:
the control socket, ``/metrics``, and last the client-facing listener (TCP
``--addr``/``--port`` or the Unix socket ``--sock``).  Nothing connects to
the server before a client does: each client gets its own server
connection (see :mod:`ferry.proxy.session`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from ferry.clock import ReactorClock
from ferry.control.events import EventHub
from ferry.control.server import ControlSocketError, claim_socket_path, listen_control
from ferry.lease.backend import LeaseBackend, LeaseError
from ferry.lease.spec import open_lockspace, parse_lockspace
from ferry.metrics import metrics_root
from ferry.nbd.locate import Location
from ferry.proxy.finder import Finder, FixedAddress, LockspaceFinder
from ferry.proxy.listener import DEFAULT_MAX_WAIT, ProxyServer
from ferry.proxy.status import ProxyCommands, make_registry
from ferry.proxy.upstream import Dialer, tcp_connector
from ferry.trace import TraceFile, Tracer, log_transitions

__all__ = ["ProxyConfig", "ProxyNode", "StartupError"]

log = Logger()


class StartupError(Exception):
    """A problem the operator must fix before the proxy can run; one clear line."""


@dataclass(frozen=True)
class ProxyConfig:
    conn_addr: str
    conn_port: int
    addr: str | None = None  # the client-facing TCP address ...
    port: int | None = None  # ... and port, or
    sock: str | None = None  # the client-facing Unix socket
    bind: str | None = None  # where upstream connections come from
    name: str = ""  # the export asked of the server (and offered to clients)
    max_wait: float = DEFAULT_MAX_WAIT
    metrics: tuple[str, int] | None = None
    control_sock: str | None = None
    trace: str | None = None
    lockspace: str | None = None  # ask it where the image is served ...
    resource: str | None = None  # ... under this lease name

    def __post_init__(self) -> None:
        if (self.sock is None) == (self.addr is None or self.port is None):
            raise ValueError("listen on --addr and --port, or on --sock, not both")
        if (self.lockspace is None) != (self.resource is None):
            raise ValueError("--lockspace and --resource go together")
        if not self.max_wait > 0:
            raise ValueError(f"--max-wait must be positive, not {self.max_wait:g}")

    def where(self) -> str:
        return self.sock if self.sock is not None else f"{self.addr}:{self.port}"


class ProxyNode:
    """One proxy: its listener, control socket, metrics and trace."""

    def __init__(self, reactor: Any, config: ProxyConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.clock = ReactorClock(reactor)
        self.tracer = Tracer()
        self.events = EventHub(self.tracer, self.clock)
        self.tracer.subscribe(log_transitions(config.name))
        self._trace_file: TraceFile | None = None
        self._ports: list[IListeningPort] = []
        self.listening: IListeningPort | None = None
        self.metrics_port: IListeningPort | None = None
        self._lockspace: LeaseBackend | None = None
        self.finder = self._finder(config)
        self.server = ProxyServer(
            export_name=config.name,
            finder=self.finder,
            dialer=Dialer(connector=tcp_connector(reactor), clock=self.clock, bind=config.bind),
            clock=self.clock,
            tracer=self.tracer,
            max_wait=config.max_wait,
        )
        self._stopped = False

    def _finder(self, config: ProxyConfig) -> Finder:
        """Where to look for the image: the lockspace's holder first, if there is one."""
        fallback = Location(config.conn_addr, config.conn_port, config.name)
        if config.lockspace is None or config.resource is None:
            return FixedAddress(fallback)
        try:
            self._lockspace = open_lockspace(
                parse_lockspace(config.lockspace), reactor=self.reactor
            )
        except (ValueError, LeaseError) as error:
            raise StartupError(f"--lockspace {config.lockspace}: {error}") from None
        return LockspaceFinder(self._lockspace, config.resource, fallback, config.name)

    def start(self) -> None:
        """Open everything; :class:`StartupError` (everything closed again) if something fails."""
        try:
            self._start()
        except Exception:
            for port in self._ports:
                port.stopListening()
            self._ports.clear()
            self._close_trace()
            raise

    def _start(self) -> None:
        config = self.config
        if config.trace:
            try:
                self._trace_file = TraceFile(config.trace)
            except OSError as error:
                raise StartupError(f"trace file {config.trace}: {error.strerror}") from None
            self.tracer.subscribe(self._trace_file.write)
        if config.control_sock:
            try:
                self._ports.append(
                    listen_control(
                        self.reactor,
                        config.control_sock,
                        ProxyCommands(self.server),
                        self.events,
                    )
                )
            except ControlSocketError as error:
                raise StartupError(str(error)) from None
        if config.metrics:
            host, port = config.metrics
            site = Site(metrics_root(make_registry(self.server)))  # type: ignore[no-untyped-call]
            self.metrics_port = self._listen(
                lambda: self.reactor.listenTCP(port, site, interface=host),
                f"metrics on {host}:{port}",
            )
            log.info(
                "metrics at http://{host}:{port}/metrics",
                host=host,
                port=self.metrics_port.getHost().port,  # type: ignore[attr-defined]
            )
        if config.sock is not None:
            path = config.sock
            _claim_unix_path(path)
            self.listening = self._listen(
                lambda: self.reactor.listenUNIX(path, self.server, mode=0o600),
                f"clients on {path}",
            )
            where = path
        else:
            assert config.addr is not None and config.port is not None
            addr, port = config.addr, config.port
            self.listening = self._listen(
                lambda: self.reactor.listenTCP(port, self.server, interface=addr),
                f"clients on {addr}:{port}",
            )
            where = f"{addr}:{self.listening.getHost().port}"  # type: ignore[attr-defined]
        log.info(
            "proxying {name!r} on {where} to {upstream}, waiting at most {wait:g} s for it",
            name=config.name,
            where=where,
            upstream=self.finder.describe(),
            wait=config.max_wait,
        )

    def _listen(self, listen: Any, what: str) -> IListeningPort:
        try:
            port: IListeningPort = listen()
        except CannotListenError as error:
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            raise StartupError(f"cannot listen for {what}: {reason}") from None
        self._ports.append(port)
        return port

    @defer.inlineCallbacks
    def shutdown(self) -> Any:
        """Stop accepting, let every client's requests be answered, close (SIGINT, SIGTERM)."""
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting down: answering requests in flight")
        self.server.accepting = False
        for port in self._ports:
            yield port.stopListening()
        yield self.server.drain()
        yield self.events.close("the proxy is shutting down")
        if self._lockspace is not None:
            yield self._lockspace.close()
        self.clock.cancel_all()
        self._close_trace()
        if self.config.sock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.config.sock)
        log.info("stopped")

    def _close_trace(self) -> None:
        if self._trace_file is not None:
            self._trace_file.close()
            self._trace_file = None


def _claim_unix_path(path: str) -> None:
    """A socket file left by a dead proxy is replaced; a live one, or anything else, refused."""
    try:
        claim_socket_path(path)
    except ControlSocketError as error:
        raise StartupError(str(error).replace("control socket ", "--sock ", 1)) from None
