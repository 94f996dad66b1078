"""A real Prometheus scrapes a real migration, and every dashboard query and alert has data.

One migration for the module: a ``ferry serve`` and a ``ferry listen``,
both with ``--metrics``, a libnbd client writing to the source (over a
2 MiB region, so a dirty pass lasts about half a second), and ``ferry
mirror`` slowed to 4 MiB/s with a 50 ms downtime limit and no auto-converge,
so that passes keep coming while the client writes and Prometheus (scraping
every second) sees every migration field.  Then the client stops, the next pass finds nothing
dirty, the destination takes control, and Prometheus sees the end too.

Everything waits on Prometheus having the data (its API, polled until a
deadline) or on the source's ``wait`` answer; nothing sleeps.  At the end
the destination holds the source's image byte for byte, and every write
the client had acknowledged.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.control.client import JsonControl
from ferry.migrate.core.progress import MigrationProgress
from ferry.remote import RemoteError, RemoteExport
from ferry.status import STATUS_FIELDS, FieldSpec, StatusSnapshot, parse_line
from prometheus_support import (
    RULES,
    PrometheusServer,
    PromQLError,
    metric_names,
    panel_expressions,
    rule_expressions,
)
from support import FERRY, FerryProcess, mirror_command, random_file, run, serve, sparse_file
from workload import BLOCK, decode

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 16 * MiB
HOT = 2 * MiB  # the region the client writes to
WORKLOAD = Path(__file__).resolve().parents[1] / "workload.py"
SPECS: dict[str, FieldSpec] = {
    f.name: f.metadata["spec"] for f in dataclasses.fields(StatusSnapshot) if "spec" in f.metadata
}
# The fields a running migration adds to the status line.
MIGRATION_FIELDS = {f.name for f in dataclasses.fields(MigrationProgress) if f.name in SPECS} - {
    "is_migrating",
    "last_downtime_ms",
}


def selector(name: str, instance: str) -> str:
    """The series of status field ``name`` on ``instance``."""
    spec = SPECS[name]
    if spec.kind == "state":
        return f'ferry_state{{instance="{instance}", machine="{spec.metric}"}}'
    if spec.kind == "info":
        return f'ferry_{spec.metric}_info{{instance="{instance}"}}'
    return f'ferry_{spec.metric}{{instance="{instance}"}}'


@dataclass
class Run:
    prometheus: PrometheusServer
    start: float
    source: str  # the source's instance label
    dest: str
    source_pid: int
    dest_pid: int
    source_fields: set[str] = field(default_factory=set)  # seen on its status line
    dest_fields: set[str] = field(default_factory=set)
    # Sample names on the live /metrics of both, during the migration and after it.
    metrics: set[str] = field(default_factory=set)
    migrating_text: str = ""  # the source's /metrics during the migration
    source_image: Path = Path()
    dest_image: Path = Path()
    report: dict[str, Any] = field(default_factory=dict)
    source_state: str = ""
    dest_state: str = ""

    def has(self, expr: str) -> bool:
        return bool(self.prometheus.query_range(expr, self.start, time.time()))


def _ferry(mode: str, image: Path, sock: Path) -> tuple[FerryProcess, str]:
    extra = ["--name", "disk", "--sock", str(sock), "--metrics", "127.0.0.1:0"]
    proc = serve(image, *extra, mode=mode)
    return proc, proc.metrics_url()


def _status(sock: Path) -> dict[str, str]:
    return parse_line(run([*FERRY, "status", "--sock", str(sock)]).stdout.decode())


def _scrape(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def _sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def migration(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("prometheus-migration")
    source_image = random_file(root / "source.img", SIZE, seed=5)
    dest_image = sparse_file(root / "dest.img", SIZE)
    source_sock, dest_sock = root / "source.sock", root / "dest.sock"
    stop_file = root / "stop"
    started: list[FerryProcess] = []
    prometheus: PrometheusServer | None = None
    writer: subprocess.Popen[bytes] | None = None
    try:
        source, source_url = _ferry("serve", source_image, source_sock)
        started.append(source)
        dest, dest_url = _ferry("listen", dest_image, dest_sock)
        started.append(dest)
        instances = [url.split("/")[2] for url in (source_url, dest_url)]
        start = time.time()
        prometheus = PrometheusServer(root / "prometheus", instances, [RULES]).start()
        result = Run(
            prometheus,
            start,
            *instances,
            source.proc.pid,
            dest.proc.pid,
            source_image=source_image,
            dest_image=dest_image,
        )
        prometheus.wait_for(
            "both ferry targets up",
            lambda: True if len(prometheus.query('up{job="ferry"} == 1')) == 2 else None,
        )
        writer = subprocess.Popen(
            [
                "/usr/bin/python3",
                str(WORKLOAD),
                source.uri("disk"),
                "0",
                "1",
                str(HOT // BLOCK),
                str(stop_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # One request answered with an error, for the errno panel.
        with RemoteExport.connect("127.0.0.1", source.port) as remote, pytest.raises(RemoteError):
            remote.pread(SIZE, BLOCK)
        mirror = run(
            [
                *mirror_command(dest.port, source_sock),
                "--max-bps",
                "4M",
                "--max-downtime",
                "0.05",
                "--max-passes",
                "1000",  # no auto-converge: passes go on until the client stops
                "--action",
                "nothing",
            ]
        )
        assert mirror.stdout.decode().strip() == "Mirror started"

        def migrating_seen() -> bool | None:
            # Each poll also reads the status line and /metrics: both are checked below.
            result.source_fields |= set(_status(source_sock))
            result.migrating_text = _scrape(source_url)
            result.metrics |= _sample_names(result.migrating_text)
            missing = [
                name
                for name in MIGRATION_FIELDS
                if name not in result.source_fields or not result.has(selector(name, result.source))
            ]
            return True if not missing else None

        prometheus.wait_for("every migration field of the source", migrating_seen, 60)
        stop_file.touch()
        stdout, stderr = writer.communicate(timeout=60)
        assert writer.returncode == 0, stderr.decode()
        result.report = json.loads(stdout)
        with JsonControl(str(source_sock), timeout=120) as control:
            ended = control.call("wait")["result"]
        assert ended["result"]["state"] == "completed", ended

        source_status, dest_status = _status(source_sock), _status(dest_sock)
        result.source_fields |= set(source_status)
        result.dest_fields = set(dest_status)
        result.source_state, result.dest_state = source_status["state"], dest_status["state"]
        after = [
            f'ferry_last_downtime_seconds{{instance="{result.source}"}}',
            f'ferry_migrations_completed_total{{instance="{result.source}"}} == 1',
            f'ferry_has_control{{instance="{result.dest}"}} == 1',
        ]
        prometheus.wait_for(
            "the end of the migration",
            lambda: True if all(prometheus.query(expr) for expr in after) else None,
        )
        result.metrics |= _sample_names(_scrape(source_url)) | _sample_names(_scrape(dest_url))
        yield result
    finally:
        stop_file.touch()
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.communicate()
        if prometheus is not None:
            prometheus.stop()
        for proc in started:
            proc.stop()


def test_the_migration_moved_every_byte(migration: Run) -> None:
    assert migration.source_state == "handed_off" and migration.dest_state == "serving"
    assert migration.report["writes"] > 0
    dest_bytes = migration.dest_image.read_bytes()
    assert dest_bytes == migration.source_image.read_bytes()
    for offset_text, counter in migration.report["acked"].items():
        offset = int(offset_text)
        found = decode(dest_bytes[offset : offset + BLOCK])
        assert found is not None, f"block {offset} lost its write"
        assert found[2] >= counter, (offset, counter, found)


def test_every_dashboard_query_returns_series(migration: Run) -> None:
    prometheus = migration.prometheus
    empty = [
        f"{e.where}: {e.expr}"
        for e in panel_expressions()
        if not prometheus.query_range(e.promql(), migration.start, time.time())
    ]
    assert not empty, "\n".join(empty)
    # The export variable's query, label_values(ferry_size_bytes, export):
    exports = prometheus.api("label/export/values", **{"match[]": "ferry_size_bytes"})
    assert exports == ["disk"]
    # The errno panel shows the error the fixture caused, not only zeros.
    errors = f'ferry_request_errors_total{{instance="{migration.source}", errno="EINVAL"}}'
    assert float(prometheus.query(errors)[0]["value"][1]) >= 1


def test_every_status_field_has_its_series(migration: Run) -> None:
    assert migration.source_fields == set(STATUS_FIELDS)  # the source showed every field
    for instance, fields in (
        (migration.source, migration.source_fields),
        (migration.dest, migration.dest_fields),
    ):
        missing = [name for name in sorted(fields) if not migration.has(selector(name, instance))]
        assert not missing, f"{instance}: no series for {missing}"
    prometheus = migration.prometheus
    for instance, pid in (
        (migration.source, migration.source_pid),
        (migration.dest, migration.dest_pid),
    ):
        assert float(prometheus.query(selector("pid", instance))[0]["value"][1]) == pid
        assert float(prometheus.query(selector("size", instance))[0]["value"][1]) == SIZE


def test_every_expression_parses_and_names_only_exported_metrics(migration: Run) -> None:
    prometheus = migration.prometheus
    with pytest.raises(PromQLError, match="parse error"):
        prometheus.query("rate(ferry_requests_total[5m]")  # the check can fail
    expressions = [*panel_expressions(), *rule_expressions()]
    assert len(expressions) > 30
    unknown = {}
    for expression in expressions:
        prometheus.query(expression.promql())  # PromQLError if it does not parse
        names = metric_names(expression.expr)
        assert names, expression.where
        if names - migration.metrics:
            unknown[expression.where] = names - migration.metrics
    assert not unknown, unknown


def test_metrics_during_a_migration_pass_promtool(migration: Run) -> None:
    assert "ferry_migration_pass{" in migration.migrating_text
    check = run(["promtool", "check", "metrics"], input=migration.migrating_text.encode())
    assert check.stdout == b"" and check.stderr == b"", check


def test_the_alert_rules_evaluate_on_the_real_series_and_stay_quiet(migration: Run) -> None:
    groups = migration.prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 8
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        assert not rule["lastEvaluation"].startswith("0001-"), rule  # it was evaluated
        # A healthy migration fires nothing.  (Pending is possible: a handover
        # scraped between the two servers' scrapes can look like nobody in
        # control for a second, which is why that alert waits a minute.)
        assert rule["state"] != "firing", rule
