"""ferry's Grafana dashboards, written as data and rendered to raw dashboard JSON.

Run ``python3 dashboards/generate.py`` after editing a panel below; it
rewrites ``dashboards/*.json``.  ``--check`` only reports stale files (a
test runs it), so the JSON that Grafana loads and this file never disagree.

Why a generator and not hand-edited JSON: every panel here is a title, a
description, a unit and a few PromQL expressions; the other ninety per cent
of a Grafana panel (grid positions, datasource references, legend and
tooltip options, value mappings) is the same everywhere and is written
once, in :func:`_panel`.  Why not grafana-foundation-sdk: two dashboards of
plain panels need no SDK, and its builders would pin the JSON to whatever
schema the pinned SDK emits; this file emits the few fields ferry needs.

The JSON is what Grafana's file provisioning loads as it is: ``id`` is
null, ``uid`` is fixed (links and bookmarks survive a reload), and the data
source is a ``datasource`` template variable, because provisioning does not
resolve the ``__inputs`` of an exported dashboard.  Every query names it as
``${datasource}``.  The ``export`` variable filters every query
(``export=~"$export"``); legends carry ``instance`` too, because an image
keeps its export name when it migrates to another host.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
EXPORT = 'export=~"$export"'
WIDTH = 24  # Grafana's grid


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "state-timeline"
    boolean: bool = False  # 0/1 values shown as false/true
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]


def series(metric: str, *matchers: str) -> str:
    """``metric{export=~"$export", ...}``."""
    return f"{metric}{{{', '.join((EXPORT, *matchers))}}}"


def rate(metric: str, by: str, *matchers: str) -> str:
    return f"sum by ({by}) (rate({series(metric, *matchers)}[$__rate_interval]))"


def increase(metric: str, by: str) -> str:
    return f"sum by ({by}) (increase({series(metric)}[$__rate_interval]))"


def quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, {rate(metric + '_bucket', by + ', le')})"


WHO = "instance, export"
WHO_LEGEND = "{{instance}} {{export}}"


def gauge(metric: str, what: str) -> Query:
    return Query(series(metric), f"{WHO_LEGEND} {what}")


def state(machine: str) -> Query:
    """The current state of a state set (its one series at 1)."""
    selector = series("ferry_state", f'machine="{machine}"')
    return Query(f"{selector} == 1", WHO_LEGEND + " {{state}}")


EXPORTS = Dashboard(
    uid="ferry-exports",
    title="ferry / Exports",
    description="Every ferry export: its role, its clients and the requests they make.",
    panels=(
        Panel(
            "Role state",
            "The export's role (statecharts/role.yaml). fenced: the lease was lost and no I/O "
            "is done; in_doubt: a migration's commit went unanswered.",
            (state("role"),),
            kind="state-timeline",
            width=24,
            height=6,
        ),
        Panel(
            "Has control",
            "Whether this server accepts writes for the image: true on exactly one server "
            "per image, except for the instant of a handover.",
            (gauge("ferry_has_control", ""),),
            kind="state-timeline",
            boolean=True,
        ),
        Panel(
            "Clients allowed",
            "Whether new clients are admitted: false while a migration holds them for the "
            "switchover, after a handover, when fenced, and on a listener until it has control.",
            (gauge("ferry_clients_allowed", ""),),
            kind="state-timeline",
            boolean=True,
        ),
        Panel(
            "Clients",
            "Client connections in transmission, and new connections per second.",
            (
                gauge("ferry_num_clients", "connected"),
                Query(rate("ferry_connections_total", WHO), f"{WHO_LEGEND} new/s"),
            ),
        ),
        Panel(
            "Image size",
            "Size of the image in bytes.",
            (gauge("ferry_size_bytes", ""),),
            unit="bytes",
        ),
        Panel(
            "Requests by command",
            "NBD requests answered per second, by command; and of those, the ones performed on "
            "the event loop with no worker thread (reads the page cache answered, writes the "
            "kernel took without waiting: XFS and btrfs do, ext4 does not).",
            (
                Query(rate("ferry_requests_total", WHO + ", command"), WHO_LEGEND + " {{command}}"),
                Query(
                    rate("ferry_requests_at_once_total", WHO + ", command"),
                    WHO_LEGEND + " {{command}} at once",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "Request latency by command",
            "Time from dispatching a request to queueing its reply: median and 99th percentile.",
            (
                Query(
                    quantile(0.5, "ferry_request_duration_seconds", WHO + ", command"),
                    WHO_LEGEND + " {{command}} p50",
                ),
                Query(
                    quantile(0.99, "ferry_request_duration_seconds", WHO + ", command"),
                    WHO_LEGEND + " {{command}} p99",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Bytes read and written",
            "What clients read and write, per second.",
            (
                Query(rate("ferry_read_bytes_total", WHO), f"{WHO_LEGEND} read"),
                Query(rate("ferry_written_bytes_total", WHO), f"{WHO_LEGEND} written"),
            ),
            unit="Bps",
        ),
        Panel(
            "Errors by errno",
            "Requests answered with an error, per second, by NBD errno; and connections "
            "closed because the client broke the protocol.",
            (
                Query(
                    rate("ferry_request_errors_total", WHO + ", errno"),
                    WHO_LEGEND + " {{errno}}",
                ),
                Query(rate("ferry_protocol_errors_total", WHO), f"{WHO_LEGEND} protocol errors"),
            ),
            unit="reqps",
        ),
    ),
)

MIGRATIONS = Dashboard(
    uid="ferry-migrations",
    title="ferry / Migrations",
    description="Live migrations from ferry sources: passes, speed, what is left, downtime, "
    "retries and failures, and the lease that moves with the image.",
    panels=(
        Panel(
            "Migrating",
            "Whether a migration job is running on this source.",
            (gauge("ferry_is_migrating", ""),),
            kind="state-timeline",
            boolean=True,
            width=24,
            height=5,
        ),
        Panel(
            "Pass",
            "Number of the current pass: 1 copies the whole image, later passes what clients "
            "wrote meanwhile. A new attempt starts again at 1.",
            (gauge("ferry_migration_pass", ""),),
        ),
        Panel(
            "Dirty and clean bytes per pass",
            "What the current pass has still to copy (dirty) and what it need not (clean).",
            (
                gauge("ferry_pass_dirty_bytes", "dirty"),
                gauge("ferry_pass_clean_bytes", "clean"),
            ),
            unit="bytes",
        ),
        Panel(
            "Speed against the limit",
            "Migration rate over the last two seconds, and the bandwidth limit "
            "(ferry mirror-max-bps changes it).",
            (
                gauge("ferry_migration_speed_bytes_per_second", "speed"),
                gauge("ferry_migration_speed_limit_bytes_per_second", "limit"),
            ),
            unit="Bps",
        ),
        Panel(
            "Bytes left",
            "What the migration has still to copy: the rest of the pass plus what clients "
            "dirtied since it began. It should fall from pass to pass.",
            (gauge("ferry_migration_bytes_left_bytes", "left"),),
            unit="bytes",
        ),
        Panel(
            "ETA and duration",
            "Estimated time to the end (absent while clients dirty as fast as the stream "
            "copies), and time since the migration started.",
            (
                gauge("ferry_migration_seconds_left", "ETA"),
                gauge("ferry_migration_duration_seconds", "duration"),
            ),
            unit="s",
        ),
        Panel(
            "Copy mode",
            "How the migration copies client writes: background (marked dirty, copied by a "
            "later pass; auto-converge throttles writers the passes cannot keep up with) or "
            "write-blocking (a write to what is copied is answered once the destination has it).",
            (
                Query(
                    f"{series('ferry_copy_mode_info')} == 1",
                    WHO_LEGEND + " {{copy_mode}}",
                ),
            ),
            kind="state-timeline",
        ),
        Panel(
            "Mirrored writes (write-blocking)",
            "Client writes a write-blocking migration sent to the destination and had "
            "answered, per second, and their bytes per second.",
            (
                Query(rate("ferry_mirrored_writes_total", WHO), f"{WHO_LEGEND} writes"),
                Query(rate("ferry_mirrored_bytes_total", WHO), f"{WHO_LEGEND} bytes"),
            ),
        ),
        Panel(
            "Mirrored write round trip",
            "What write-blocking adds to a client's write: the destination's round trip, "
            "median and 99th percentile.",
            (
                Query(
                    quantile(0.5, "ferry_mirrored_write_duration_seconds", WHO),
                    f"{WHO_LEGEND} p50",
                ),
                Query(
                    quantile(0.99, "ferry_mirrored_write_duration_seconds", WHO),
                    f"{WHO_LEGEND} p99",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Downtime: expected against last",
            "Expected client stall if the switchover happened now, and the longest stall of "
            "the last switchover.",
            (
                gauge("ferry_expected_downtime_seconds", "expected"),
                gauge("ferry_last_downtime_seconds", "last"),
            ),
            unit="s",
        ),
        Panel(
            "Client connections at the last handoff",
            "Connections that moved with the image (TCP_REPAIR; the client never reconnected) "
            "and those disconnected instead, on both sides of the last handoff.",
            (
                gauge("ferry_connections_moved", "moved"),
                gauge("ferry_connections_aborted", "disconnected"),
            ),
        ),
        Panel(
            "Can move connections",
            "Whether this host can move client connections at a handoff (TCP_REPAIR with "
            "CAP_NET_ADMIN, and nftables for the freeze); where not, clients are disconnected.",
            (gauge("ferry_can_move_connections", ""),),
            kind="state-timeline",
            boolean=True,
        ),
        Panel(
            "Migration blockers",
            "Reasons the export may not migrate now (ferry block, or another holder sharing "
            "its lease); the status line names them. A mirror is refused while there is one.",
            (gauge("ferry_migration_blockers", "blockers"),),
        ),
        Panel(
            "Retries by reason",
            "Attempts lost after a good negotiation (the job retries with backoff), by reason.",
            (
                Query(
                    increase("ferry_migration_retries_total", WHO + ", reason"),
                    WHO_LEGEND + " {{reason}}",
                ),
            ),
        ),
        Panel(
            "Failures and completions",
            "Jobs that ended without handing the image over, by reason; and jobs that completed.",
            (
                Query(
                    increase("ferry_migration_failures_total", WHO + ", reason"),
                    WHO_LEGEND + " failed: {{reason}}",
                ),
                Query(
                    increase("ferry_migrations_completed_total", WHO),
                    f"{WHO_LEGEND} completed",
                ),
            ),
        ),
        Panel(
            "Lease state",
            "The image's lease (statecharts/lease.yaml): held while serving, transferring "
            "during the handover, fenced when lost.",
            (state("lease"),),
            kind="state-timeline",
        ),
        Panel(
            "Lease token",
            "Fencing token of the held lease: it grows with every handover.",
            (gauge("ferry_lease_token", ""),),
        ),
    ),
)

DASHBOARDS = {"exports.json": EXPORTS, "migrations.json": MIGRATIONS}


def _panel(panel: Panel, number: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend.strip(),
            "range": True,
            "refId": chr(ord("A") + i),
        }
        for i, query in enumerate(panel.queries)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.boolean:
        defaults["mappings"] = [
            {
                "type": "value",
                "options": {
                    "0": {"text": "false", "color": "red", "index": 0},
                    "1": {"text": "true", "color": "green", "index": 1},
                },
            }
        ]
    if panel.kind == "timeseries":
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        }
    else:
        options = {
            "showValue": "never",
            "mergeValues": True,
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
            "tooltip": {"mode": "single", "sort": "none"},
        }
    return {
        "id": number,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }


def _layout(panels: tuple[Panel, ...]) -> list[dict[str, Any]]:
    """Left to right, a new row when the next panel does not fit."""
    out = []
    x = y = row_height = 0
    for number, panel in enumerate(panels, start=1):
        if x + panel.width > WIDTH:
            x, y, row_height = 0, y + row_height, 0
        out.append(_panel(panel, number, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return out


def _variables() -> list[dict[str, Any]]:
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "options": [],
            "refresh": 1,
            "regex": "",
        },
        {
            "name": "export",
            "label": "Export",
            "type": "query",
            "datasource": DATASOURCE,
            "definition": "label_values(ferry_size_bytes, export)",
            "query": {"query": "label_values(ferry_size_bytes, export)", "refId": "export"},
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "hide": 0,
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "options": [],
            "refresh": 2,
            "regex": "",
            "sort": 1,
        },
    ]


def render(dashboard: Dashboard) -> dict[str, Any]:
    return {
        "id": None,
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["ferry"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["ferry"],
                "title": "ferry",
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": _variables()},
        "panels": _layout(dashboard.panels),
    }


def dump(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    parser.add_argument(
        "--dir", type=Path, default=HERE, help="where the JSON goes (default: here)"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, dashboard in DASHBOARDS.items():
        path = args.dir / name
        text = dump(dashboard)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
