"""The proxy's status: one snapshot, rendered as the status line, as JSON and on /metrics.

As with a server's :class:`~ferry.status.StatusSnapshot`, each field
is defined once, in :class:`ProxyStatus`, with the Prometheus series that
carries it (:class:`~ferry.status.FieldSpec`); the control socket's
``status`` and the collector both render the same snapshot.  The line::

    pid=4242 upstream=10.0.0.7:10809 num_clients=2 clients_waiting=0 clients_failed=0
    reconnects=3 requests_replayed=41 requests_expired=0 longest_pause_ms=412

``upstream`` is where the last server a client reached was (a string, on
/metrics the label of ``ferry_proxy_upstream_info``; absent until a client
has reached one); counters are totals
since the proxy started, and end ``_total`` on /metrics.  Beside the fields,
/metrics has ``ferry_proxy_clients{state}`` (client connections in each
state of ``statecharts/proxy.yaml``), and the requests answered, by errno.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred

from ferry import statecharts
from ferry.chartnames import ProxyState
from ferry.control.commands import Command, Params, Reply, Upgrade, dispatch
from ferry.proxy.listener import ProxyServer
from ferry.status import FieldSpec, render_value

__all__ = ["PREFIX", "ProxyCollector", "ProxyCommands", "ProxyStatus", "make_registry", "snapshot"]

PREFIX: Final = "ferry_proxy_"

#: Client states whose requests wait for a server, and those whose requests fail.
_WAITING: Final = frozenset(statecharts.load("proxy").states_where("requests", "hold"))
_FAILING: Final = frozenset({ProxyState.FAILED, ProxyState.RETRYING})


def _spec(metric: str, help: str, *, kind: str = "gauge", scale: float = 1.0) -> Any:
    return field(default=None, metadata={"spec": FieldSpec(metric, help, scale, kind)})


@dataclass(frozen=True, slots=True)
class ProxyStatus:
    """Every status field of one proxy at one instant (None: left out)."""

    export: str = field(metadata={"label": True})
    pid: int | None = _spec("pid", "Process id of the proxy")
    upstream: str | None = _spec(
        "upstream_info", "Where the last server a client reached is (address label)", kind="info"
    )
    num_clients: int | None = _spec("num_clients", "Client connections open")
    clients_waiting: int | None = _spec(
        "clients_waiting", "Clients whose requests wait for a server that went away"
    )
    clients_failed: int | None = _spec(
        "clients_failed", "Clients that waited longer than max-wait: their requests get EIO"
    )
    reconnects: int | None = _spec(
        "reconnects", "Servers reached again after one was lost", kind="counter"
    )
    requests_replayed: int | None = _spec(
        "requests_replayed", "Requests sent again to a new server", kind="counter"
    )
    requests_expired: int | None = _spec(
        "requests_expired",
        "Requests answered EIO: no server within max-wait, or one with another image",
        kind="counter",
    )
    longest_pause_ms: int | None = _spec(
        "longest_pause_seconds", "The longest a request waited for a server", scale=0.001
    )

    def fields(self) -> Iterator[tuple[str, Any, FieldSpec]]:
        """The present fields in line order, with their export specs."""
        for f in dataclasses.fields(self):
            spec = f.metadata.get("spec")
            value = getattr(self, f.name)
            if spec is not None and value is not None:
                yield f.name, value, spec

    def to_line(self) -> str:
        return " ".join(f"{name}={render_value(value)}" for name, value, _ in self.fields())

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"export": self.export}
        result.update((name, value) for name, value, _ in self.fields())
        return result


def snapshot(server: ProxyServer) -> ProxyStatus:
    states = server.states()
    stats = server.stats
    return ProxyStatus(
        export=server.export_name,
        pid=os.getpid(),
        upstream=stats.upstream or None,  # none reached yet
        num_clients=len(server.sessions),
        clients_waiting=sum(n for state, n in states.items() if state in _WAITING),
        clients_failed=sum(n for state, n in states.items() if state in _FAILING),
        reconnects=stats.reconnects,
        requests_replayed=stats.requests_replayed,
        requests_expired=stats.requests_expired,
        longest_pause_ms=round(stats.longest_pause * 1000),
    )


class ProxyCollector(Collector):
    """The snapshot's fields, the clients by state, and the requests by errno."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        status = snapshot(server)
        export = status.export
        for _, value, spec in status.fields():
            name, text = PREFIX + spec.metric, spec.help
            if spec.kind == "info":
                info = GaugeMetricFamily(name, text, labels=["export", "address"])
                info.add_metric([export, str(value)], 1.0)
                yield info
            elif spec.kind == "counter":
                counter = CounterMetricFamily(name, text, labels=["export"])
                counter.add_metric([export], float(value))
                yield counter
            else:
                gauge = GaugeMetricFamily(name, text, labels=["export"])
                gauge.add_metric([export], float(value) * spec.scale)
                yield gauge
        clients = GaugeMetricFamily(
            PREFIX + "clients", "Client connections in each state", labels=["export", "state"]
        )
        states = server.states()
        for state in statecharts.load("proxy").state_names():
            clients.add_metric([export, state], float(states.get(state, 0)))
        yield clients
        requests = CounterMetricFamily(
            PREFIX + "requests", "Client requests answered", labels=["export"]
        )
        requests.add_metric([export], float(server.stats.requests))
        yield requests
        errors = CounterMetricFamily(
            PREFIX + "request_errors",
            "Client requests answered with an error, by NBD errno",
            labels=["export", "errno"],
        )
        for errno, count in sorted(server.stats.errors.items()):
            errors.add_metric([export, errno], float(count))
        yield errors


def make_registry(server: ProxyServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(server))
    return registry


class ProxyCommands:
    """The proxy's control commands: ``status`` (the line, or JSON)."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self.table: dict[str, Command] = {"status": self.status}
        self.upgrades: dict[str, Upgrade] = {}  # none: a proxy is not taken over

    def run(
        self, name: str, args: Sequence[str], params: Params | None = None
    ) -> Reply | Deferred[Reply]:
        return dispatch(self.table, name, args, params)

    def status(self, args: Sequence[str], params: Params) -> Reply:
        status = snapshot(self._server)
        return Reply(0, status.to_line(), status.to_dict())
