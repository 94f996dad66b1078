"""Malformed input on the control socket: every request gets its error answer, nothing escapes.

The protocol runs on Twisted's test doubles (``Node`` of test_control_events),
so an exception escaping ``dataReceived`` fails the test where it happens;
``logged_errors`` catches what would only have reached the log.  The same
inputs against a real ``ferry serve`` are in
tests/integration/test_serve_control.py; the fuzz targets control_json and
control_lines (fuzz/) look for more.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from .test_control_events import Node


@pytest.fixture
def node(tmp_path: Any) -> Node:
    return Node(tmp_path)


@pytest.fixture(autouse=True)
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Every error or failure logged during the test; none may be."""
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    yield errors
    globalLogPublisher.removeObserver(observe)
    assert errors == []


def json_answers(node: Node, *chunks: bytes) -> list[dict[str, Any]]:
    """What one JSON connection answers to ``chunks``, each read as it comes.

    A status request before them makes the connection a JSON one (its first
    byte is ``{``); one after them checks that it still serves.
    """
    client = node.connect()
    client.send({"id": "before", "method": "status"})
    for chunk in chunks:
        client.protocol.dataReceived(chunk)
    client.send({"id": "after", "method": "status"})
    before, *answers, after = client.received()
    assert before["id"] == "before" and before["result"]["state"] == "serving", before
    assert after["id"] == "after" and after["result"]["state"] == "serving", after
    assert not client.transport.disconnecting
    return answers


def only_error(answers: list[dict[str, Any]]) -> tuple[Any, int, str]:
    (answer,) = answers
    assert set(answer) == {"id", "error"}, answer
    return answer["id"], answer["error"]["code"], answer["error"]["message"]


# -- what is not JSON ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[" * 60_000, "not JSON: nested too deeply"),
        (b'{"id": 1, "method": "status", "params": ' + b"[" * 5_000, "nested too deeply"),
        (b'{"id": 1e999999, "method": "status"}', "not JSON: 1e999999 is out of range"),
        (b'{"id": -1e400, "method": "status"}', "not JSON: -1e400 is out of range"),
        (b'{"id": NaN, "method": "status"}', "not JSON: NaN is not a JSON number"),
        (b'{"id": 1, "method": "status", "x": Infinity}', "Infinity is not a JSON number"),
        (b'{"id": 1, "method": "status", "x": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"id": 1, "method": "st\xffatus"}', "not JSON: 'utf-8' codec can't decode byte 0xff"),
        (b'{"id": 1, "method": "status"', "not JSON: Expecting ',' delimiter"),
        (b'{"id": 1, "method": "' + b"9" * 5000 + b'"', "not JSON"),
    ],
    ids=[
        "60000 [",
        "deep params",
        "1e999999",
        "-1e400",
        "NaN",
        "Infinity",
        "-Infinity",
        "not UTF-8",
        "unfinished",
        "unterminated string",
    ],
)
def test_what_is_not_json_is_answered_minus_32700(node: Node, line: bytes, message: str) -> None:
    answer_id, code, text = only_error(json_answers(node, line + b"\n"))
    assert (answer_id, code) == (None, -32700)
    assert text.startswith(message) or message in text, text
