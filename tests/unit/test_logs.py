"""Transitions as log events, and the JSON log's own fields: joinable with the trace."""

from __future__ import annotations

import io
from typing import Any

from twisted.logger import capturedLogs, eventsFromJSONLogFile, jsonFileLogObserver

from ferry.logs import with_fields
from ferry.trace import TraceRecord, log_transitions


def test_every_transition_is_logged_with_the_records_fields_and_the_export() -> None:
    ok = TraceRecord(3.5, "lease", "/images/a.img", "acquired", "acquiring", "held", True)
    failed = TraceRecord(4.0, "role", "disk", "migrate", "listening", "listening", False, "E: no")
    with capturedLogs() as events:
        sink = log_transitions("disk")
        sink(ok)
        sink(failed)
    mine = [e for e in events if e.get("log_namespace") == "ferry.trace"]
    assert [e["log_level"].name for e in mine] == ["debug", "warn"]
    for event, rec in zip(mine, (ok, failed), strict=True):
        assert event["export"] == "disk"
        assert {key: event[key] for key in rec.to_dict()} == rec.to_dict()


def test_the_json_log_adds_the_process_fields_without_touching_the_shared_event() -> None:
    out = io.StringIO()
    observer = with_fields(jsonFileLogObserver(out, ""), {"export": "disk"})
    shared: dict[str, Any] = {"log_format": "hello {who}", "who": "you", "log_time": 1.0}
    observer(shared)
    observer({"log_format": "mine", "export": "other", "log_time": 2.0})
    assert "export" not in shared  # other observers (stderr) see the event as it was
    out.seek(0)
    events = list(eventsFromJSONLogFile(out))
    assert [(e["log_format"], e["export"]) for e in events] == [
        ("hello {who}", "disk"),
        ("mine", "other"),
    ]
    assert out.getvalue().startswith("{")  # plain JSON lines, no record separator
