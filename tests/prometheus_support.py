"""A real Prometheus for the observability tests, and the PromQL that ferry ships.

The server is Debian's ``prometheus`` (2.42 on bookworm), started on a free
loopback port with a generated config, a 1 s scrape interval and its own
storage directory, so it never meets a system Prometheus the package may
have set up.  Readiness is its ``/-/ready`` answer; data is waited for by
polling its HTTP API until a deadline; nothing sleeps to synchronise.

Also here: every PromQL expression in ``dashboards/`` (panel targets and
alert rules), and :func:`metric_names`, which finds the metrics an
expression names, so a test can hold them against a live ``/metrics``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from support import DEADLINE, Deadline, start_peer, stop_peer

PROMETHEUS = Path("/usr/bin/prometheus")
HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
RULES = DASHBOARDS / "alerts" / "ferry.rules.yml"
SCRAPE_SECONDS = 1
SCRAPE_INTERVAL = f"{SCRAPE_SECONDS}s"
# What Grafana would put for $__rate_interval with a 1 s scrape interval
# (four scrape intervals), and for $export with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "4s", "$export": ".*"}
T = TypeVar("T")


class PromQLError(Exception):
    """Prometheus refused a query (``bad_data``: it does not parse)."""


class PrometheusServer:
    """One Prometheus in a child process, scraping ``targets`` as job ``ferry``."""

    def __init__(self, root: Path, targets: list[str], rule_files: list[Path]) -> None:
        self.root = root
        self.targets = targets
        self.rule_files = rule_files
        self.log = root / "prometheus.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "evaluation_interval": SCRAPE_INTERVAL,
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {"job_name": "ferry", "static_configs": [{"targets": self.targets}]}
            ],
        }

    def argv(self, port: int) -> list[str]:
        return [
            str(PROMETHEUS),
            f"--config.file={self.root / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address={HOST}:{port}",
            "--log.level=warn",
        ]

    def start(self) -> PrometheusServer:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        self.proc, self.port = start_peer(self.argv, self.log, probe=_ready)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_peer(self.proc)
            self.proc = None

    # -- the HTTP API ---------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """``data`` of an API answer; PromQLError for a query Prometheus refuses."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:
            body = json.load(error)
            if body.get("errorType") == "bad_data":
                raise PromQLError(body.get("error", "")) from None
            raise
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: its series."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """A range query at the scrape interval: every series it had at any step.

        Steps run from ``start`` one interval apart, and the last is not
        after ``end``; so ``start`` moves back to put the last step on
        ``end``, or a sample scraped less than an interval ago would be missed.
        """
        start = end - math.ceil((end - start) / SCRAPE_SECONDS) * SCRAPE_SECONDS
        result: list[dict[str, Any]] = self.api(
            "query_range", query=expr, start=str(start), end=str(end), step=SCRAPE_INTERVAL
        )["result"]
        return result

    def wait_for(self, what: str, check: Callable[[], T | None], seconds: float = DEADLINE) -> T:
        """Poll ``check`` until it answers something other than None, or fail naming ``what``."""
        deadline = Deadline(seconds)
        while True:
            answer = check()
            if answer is not None:
                return answer
            if deadline.expired():
                raise TimeoutError(f"Prometheus never had {what} in {seconds} s")
            assert self.proc is not None
            try:
                self.proc.wait(timeout=0.2)  # the pause between polls notices Prometheus dying
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"Prometheus exited: {self.log.read_text()[-2000:]}")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/-/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# -- the PromQL in dashboards/ --------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    where: str  # "exports.json: Role state", "ferry.rules.yml: FerryLeaseLost"
    expr: str  # as written, with Grafana's variables

    def promql(self) -> str:
        """The expression as Grafana would send it (its variables filled in)."""
        text = self.expr
        for variable, value in GRAFANA_VARIABLES.items():
            text = text.replace(variable, value)
        return text


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON in dashboards/, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_expressions() -> Iterator[Expression]:
    for name, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                yield Expression(f"{name}: {panel['title']}", target["expr"])


def rule_expressions() -> Iterator[Expression]:
    for path in sorted((DASHBOARDS / "alerts").glob("*.rules.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                yield Expression(f"{path.name}: {name}", rule["expr"])


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_CLAUSES = re.compile(
    r"\{[^}]*\}"  # label matchers
    r"|\[[^\]]*\]"  # range selectors
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"  # label lists
    r"|\boffset\s+\S+"  # offsets
)
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"(?<![\w:])[a-zA-Z_:][\w:]*+(?!\s*\()")  # not a call
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """The metrics an expression names: identifiers that are not functions or keywords.

    Label matchers, label lists, ranges, offsets, strings and numbers go
    first, so only metric names (and keywords) are left outside calls.
    """
    text = _CLAUSES.sub(" ", _STRING.sub(" ", expr))
    text = _NUMBER.sub(" ", text)
    found = {m.group(0) for m in _IDENTIFIER.finditer(text)}
    return {name for name in found if name.lower() not in _KEYWORDS}
