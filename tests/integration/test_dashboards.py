"""The dashboards and alert rules in dashboards/, checked without a running ferry.

The JSON is what the generator makes, and what Grafana's file provisioning
can load as it is; the alert rules pass ``promtool check rules`` and their
unit tests (``promtool test rules``).  ``test_prometheus.py`` runs every
expression against a real Prometheus scraping a real migration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from prometheus_support import DASHBOARDS, RULES, dashboards, metric_names, panel_expressions
from support import run

pytestmark = pytest.mark.integration

GENERATE = DASHBOARDS / "generate.py"
UIDS = {"exports.json": "ferry-exports", "migrations.json": "ferry-migrations"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What the issue asks each dashboard to show, as the series that show it.
SHOWS = {
    "exports.json": {
        'ferry_state{machine="role"}',
        "ferry_has_control",
        "ferry_num_clients",
        "ferry_clients_allowed",
        "ferry_requests_total",
        "ferry_requests_at_once_total",
        "ferry_request_duration_seconds_bucket",
        "ferry_read_bytes_total",
        "ferry_written_bytes_total",
        "ferry_request_errors_total",
    },
    "migrations.json": {
        "ferry_migration_pass",
        "ferry_pass_dirty_bytes",
        "ferry_pass_clean_bytes",
        "ferry_migration_speed_bytes_per_second",
        "ferry_migration_speed_limit_bytes_per_second",
        "ferry_migration_bytes_left_bytes",
        "ferry_migration_seconds_left",
        "ferry_expected_downtime_seconds",
        "ferry_last_downtime_seconds",
        "ferry_migration_retries_total",
        "ferry_migration_failures_total",
        'ferry_state{machine="lease"}',
        "ferry_lease_token",
        # Issue 17: the copy mode, and what write-blocking costs.
        "ferry_copy_mode_info",
        "ferry_mirrored_writes_total",
        "ferry_mirrored_write_duration_seconds_bucket",
        "ferry_connections_moved",
        "ferry_connections_aborted",
        "ferry_can_move_connections",
    },
}


def test_the_json_is_what_the_generator_makes(tmp_path: Path) -> None:
    assert run([sys.executable, str(GENERATE), "--check"]).stdout == b""
    # --check can fail: against an empty directory, everything is stale.
    stale = run([sys.executable, str(GENERATE), "--check", "--dir", str(tmp_path)], check=False)
    assert stale.returncode == 1
    assert sorted(stale.stdout.decode().split()) == sorted(
        ["stale:", "stale:", str(tmp_path / "exports.json"), str(tmp_path / "migrations.json")]
    )
    run([sys.executable, str(GENERATE), "--dir", str(tmp_path)])
    for name in UIDS:
        assert (tmp_path / name).read_text() == (DASHBOARDS / name).read_text()


@pytest.mark.parametrize("name", sorted(UIDS))
def test_a_dashboard_loads_by_file_provisioning(name: str) -> None:
    dashboard = dashboards()[name]
    assert dashboard["id"] is None
    assert dashboard["uid"] == UIDS[name]
    assert "__inputs" not in dashboard  # file provisioning does not resolve them
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    export = variables["export"]
    assert export["type"] == "query" and export["datasource"] == DATASOURCE
    assert export["query"]["query"] == "label_values(ferry_size_bytes, export)"
    assert export["includeAll"] and export["multi"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        where = f"{name}: {panel['title']}"
        assert panel["datasource"] == DATASOURCE, where
        assert panel["description"], where
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, where
            assert 'export=~"$export"' in target["expr"], where


@pytest.mark.parametrize("name", sorted(SHOWS))
def test_a_dashboard_shows_what_the_issue_asks(name: str) -> None:
    shown: set[str] = set()
    for expression in panel_expressions():
        if not expression.where.startswith(name):
            continue
        for metric in metric_names(expression.expr):
            shown.add(metric)
            if metric == "ferry_state":
                machine = expression.expr.split('machine="')[1].split('"')[0]
                shown.add(f'ferry_state{{machine="{machine}"}}')
    assert SHOWS[name] <= shown, SHOWS[name] - shown


def test_the_provisioning_files_point_grafana_at_the_dashboards() -> None:
    root = DASHBOARDS / "provisioning"
    providers: list[dict[str, Any]] = yaml.safe_load(
        (root / "dashboards" / "ferry.yaml").read_text()
    )["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path == "${FERRY_DASHBOARDS}"  # Grafana expands it, as the README says to set it
    folder = Path(path.replace("${FERRY_DASHBOARDS}", str(DASHBOARDS)))
    loaded = {p.name: json.loads(p.read_text())["uid"] for p in folder.rglob("*.json")}
    assert loaded == UIDS  # everything the provider would load, and nothing else
    (datasource,) = yaml.safe_load((root / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "${FERRY_PROMETHEUS_URL}"


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = run(["promtool", "check", "rules", str(RULES)]).stdout.decode()
    assert "SUCCESS: 8 rules found" in checked
    tested = run(["promtool", "test", "rules", str(RULES.with_name("ferry.test.yml"))])
    assert b"SUCCESS" in tested.stdout
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # Every alert has a firing case in the unit tests (and a silent one beside it).
    tests = yaml.safe_load(RULES.with_name("ferry.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in rules:
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never silent"
