"""Prometheus exposition: every status field, the request and migration counters, /metrics.

The collector renders the same :class:`~ferry.status.StatusSnapshot`
as the status line, so a field exists in one place only.  Scrapes are
answered by a Twisted resource on the reactor thread (prometheus_client's
own ``MetricsResource`` renders in a thread pool, where it would race the
live state it reads; Synapse's ``_twisted_exposition.py`` makes the same
choice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from ferry import statecharts
from ferry.hooks import OUTCOMES, HookStats, Stage
from ferry.migrate.core.stats import FailureReason, MigrationStats
from ferry.serve.stats import LATENCY_BUCKETS, Histogram, RequestStats
from ferry.status import StatusSnapshot

PREFIX: Final = "ferry_"


class Observable(Protocol):
    """What the collector needs of an export (``ferry.node.ObservedExport`` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> RequestStats: ...

    @property
    def migration_stats(self) -> MigrationStats: ...

    @property
    def hook_stats(self) -> HookStats | None:
        """Its hooks' runs (None: it has no hooks)."""
        ...

    def snapshot(self) -> StatusSnapshot: ...


class FerryCollector(Collector):
    def __init__(self, exports: Callable[[], Iterable[Observable]]) -> None:
        self._exports = exports

    def collect(self) -> Iterator[Metric]:
        exports = list(self._exports())
        yield from _status_metrics([e.snapshot() for e in exports])
        yield from _request_metrics(exports)
        yield from _migration_metrics(exports)
        yield from _hook_metrics(exports)


def _status_metrics(snapshots: list[StatusSnapshot]) -> Iterator[Metric]:
    gauges: dict[str, GaugeMetricFamily] = {}
    states = GaugeMetricFamily(
        PREFIX + "state",
        "State machines by state: 1 for the current state, 0 for the others",
        labels=["export", "machine", "state"],
    )
    for snapshot in snapshots:
        for name, value, spec in snapshot.fields():
            if spec.kind == "info":
                info = gauges.get(name)
                if info is None:
                    info = gauges[name] = GaugeMetricFamily(
                        PREFIX + spec.metric + "_info", spec.help, labels=["export", name]
                    )
                info.add_metric([snapshot.export, str(value)], 1.0)
                continue
            if spec.kind == "state":
                for state in _states_of(spec.metric, str(value)):
                    states.add_metric(
                        [snapshot.export, spec.metric, state], 1.0 if state == value else 0.0
                    )
                continue
            family = gauges.get(name)
            if family is None:
                family = gauges[name] = GaugeMetricFamily(
                    PREFIX + spec.metric, spec.help, labels=["export"]
                )
            count = len(value) if spec.kind == "list" else value
            family.add_metric([snapshot.export], float(count) * spec.scale)
    yield from gauges.values()
    yield states


def _states_of(machine: str, current: str) -> list[str]:
    """Every state of a machine, so a state set has a series per state."""
    try:
        names = [state.name for state in statecharts.load(machine).states]
    except statecharts.StatechartError:
        names = []
    return names if current in names else [*names, current]


def _request_metrics(exports: list[Observable]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        PREFIX + "requests", "NBD requests answered, by command", labels=["export", "command"]
    )
    at_once = CounterMetricFamily(
        PREFIX + "requests_at_once",
        "NBD requests performed on the event loop, with no worker thread: "
        "reads the page cache answered, writes the kernel took without waiting",
        labels=["export", "command"],
    )
    errors = CounterMetricFamily(
        PREFIX + "request_errors",
        "NBD requests answered with an error, by NBD errno",
        labels=["export", "errno"],
    )
    read = CounterMetricFamily(PREFIX + "read_bytes", "Bytes read by clients", labels=["export"])
    written = CounterMetricFamily(
        PREFIX + "written_bytes", "Bytes written by clients", labels=["export"]
    )
    connections = CounterMetricFamily(
        PREFIX + "connections", "Client connections that completed the handshake", labels=["export"]
    )
    protocol_errors = CounterMetricFamily(
        PREFIX + "protocol_errors",
        "Connections closed because the client broke the protocol",
        labels=["export"],
    )
    latency = HistogramMetricFamily(
        PREFIX + "request_duration_seconds",
        "Time from dispatching a request to queueing its reply",
        labels=["export", "command"],
    )
    for export in exports:
        stats = export.stats
        for command, count in sorted(stats.requests.items()):
            requests.add_metric([export.name, command], count)
            # Zero too: "none of them", where ext4 takes no write at once.
            at_once.add_metric([export.name, command], stats.at_once[command])
        for errno, count in sorted(stats.errors.items()):
            errors.add_metric([export.name, errno], count)
        read.add_metric([export.name], stats.bytes_read)
        written.add_metric([export.name], stats.bytes_written)
        connections.add_metric([export.name], stats.connections)
        protocol_errors.add_metric([export.name], stats.protocol_errors)
        for command, histogram in sorted(stats.latency.items()):
            latency.add_metric([export.name, command], _buckets(histogram), histogram.total)
    yield from (requests, at_once, errors, read, written, connections, protocol_errors, latency)


def _migration_metrics(exports: list[Observable]) -> Iterator[Metric]:
    """Every reason of the fixed set, at 0 until it happens: ``increase()`` sees the first."""
    retries = CounterMetricFamily(
        PREFIX + "migration_retries",
        "Migration attempts lost after a good negotiation and retried, by reason",
        labels=["export", "reason"],
    )
    failures = CounterMetricFamily(
        PREFIX + "migration_failures",
        "Migrations that ended without handing the image over, by reason",
        labels=["export", "reason"],
    )
    completed = CounterMetricFamily(
        PREFIX + "migrations_completed",
        "Migrations that completed: handed over, or mirrored to a plain NBD server",
        labels=["export"],
    )
    mirrored = CounterMetricFamily(
        PREFIX + "mirrored_writes",
        "Client writes a write-blocking migration sent to the destination and had answered",
        labels=["export"],
    )
    mirrored_bytes = CounterMetricFamily(
        PREFIX + "mirrored_bytes",
        "Bytes of the client writes a write-blocking migration sent to the destination",
        labels=["export"],
    )
    mirrored_latency = HistogramMetricFamily(
        PREFIX + "mirrored_write_duration_seconds",
        "Round trip of a mirrored client write to the destination (what write-blocking adds)",
        labels=["export"],
    )
    for export in exports:
        stats = export.migration_stats
        for reason in FailureReason:
            retries.add_metric([export.name, reason.value], stats.retries[reason])
            failures.add_metric([export.name, reason.value], stats.failures[reason])
        completed.add_metric([export.name], stats.completed)
        mirrored.add_metric([export.name], stats.mirrored_writes)
        mirrored_bytes.add_metric([export.name], stats.mirrored_bytes)
        histogram = stats.mirrored_latency
        mirrored_latency.add_metric([export.name], _buckets(histogram), histogram.total)
    yield from (retries, failures, completed, mirrored, mirrored_bytes, mirrored_latency)


def _hook_metrics(exports: list[Observable]) -> Iterator[Metric]:
    """Runs of the exports that have hooks, every stage and outcome from 0."""
    runs = CounterMetricFamily(
        PREFIX + "hook_runs",
        "Hook runs by stage and outcome (ok, failed: a non-zero exit, timeout: killed)",
        labels=["export", "stage", "outcome"],
    )
    for export in exports:
        stats = export.hook_stats
        if stats is None:
            continue
        for stage in Stage:
            for outcome in OUTCOMES:
                runs.add_metric([export.name, stage.value, outcome], stats.runs[stage, outcome])
    yield runs


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """A histogram's buckets as Prometheus wants them: cumulative, labelled by bound."""
    cumulative = 0
    buckets = []
    for bound, count in zip([*LATENCY_BUCKETS, float("inf")], histogram.counts, strict=True):
        cumulative += count
        buckets.append((_bucket_label(bound), float(cumulative)))
    return buckets


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def make_registry(exports: Callable[[], Iterable[Observable]]) -> CollectorRegistry:
    """A registry of ferry's own metrics only (never the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FerryCollector(exports))
    return registry


class MetricsResource(Resource):
    """``GET /metrics`` rendered synchronously on the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(  # type: ignore[no-untyped-call]
            b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii")
        )
        return generate_latest(self._registry)


def metrics_root(registry: CollectorRegistry) -> Resource:
    root = Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", MetricsResource(registry))
    return root
