#!/usr/bin/env python3
"""Fuzz target: the control socket's JSON lines (``ferry.control.server``).

A control connection whose first byte is ``{`` speaks JSON lines: one
request per line, one answer object per request, and the connection stays
open.  The bytes go to a real ``ControlProtocol`` over a real node's
``Commands`` (see ``control_lines``), on a ``StringTransport``.  Checked:

1. No exception escapes the protocol and nothing is logged as an error.
2. Every line the server sends is strict JSON (no NaN or Infinity), an
   object: an answer ``{"id", "result"}`` or ``{"id", "error": {"code":
   int, "message": str}}``, or a notification (a ``method``, no ``id``).
3. No more than ``MAX_COMMAND_BYTES`` of an unfinished line is held, and
   every request line gets exactly one answer, in order (every command of
   this node answers at once: its mirrors are refused at once): a line that
   is not blank, including an unterminated last one at the client's
   half-close, and a line longer than ``MAX_COMMAND_BYTES`` (lowered here,
   as in ``control_lines``), which gets an error.
4. The answers are the ones the README documents: -32700 for what is not
   UTF-8 JSON (NaN, Infinity and numbers out of a double's range included),
   -32600 for what is not an object with a string ``method`` and an ``id``
   that is a string, a number or null (answered with ``id`` null), -32601
   for an unknown method; otherwise the request's own ``id`` comes back.
5. The same bytes split differently get the same answers.
6. Mirror options that reach the ``MirrorManager`` are runnable
   (``control_lines``' ``CheckedMirrors``).

Input: ``[split seed][bytes the client sends]`` (inputs not starting with
``{`` are ``control_lines``').
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Final

from control_lines import COMMAND_LIMIT, ERRORS, Node, command_limit
from ferry.control.events import STREAM_METHODS
from fuzzing import Violation, chunks, expect, run

NOT_JSON: Final = -32700
INVALID_REQUEST: Final = -32600
UNKNOWN_METHOD: Final = -32601
METHODS: Final = frozenset(Node().commands.table) | STREAM_METHODS


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{text} is out of range")
    return value


def strict_json(raw: bytes) -> Any:
    """``raw`` as RFC 8259 JSON in UTF-8, or ``_NotJson``."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as error:
        raise _NotJson(str(error)) from None


def expected(raw: bytes) -> tuple[int | None, Any]:
    """The error code a request line must get (None: not an error of the protocol's), and its id."""
    if len(raw) > COMMAND_LIMIT:
        return INVALID_REQUEST, None
    try:
        request = strict_json(raw)
    except _NotJson:
        return NOT_JSON, None
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        return INVALID_REQUEST, None
    request_id = request.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int | float)
    ):
        return INVALID_REQUEST, None
    if request["method"] not in METHODS:
        return UNKNOWN_METHOD, request_id
    return None, request_id


def requests(stream: bytes) -> list[bytes]:
    """The lines of ``stream`` that must be answered, the unterminated last one included."""
    return [line for line in stream.split(b"\n") if len(line) > COMMAND_LIMIT or line.strip()]


def answers(output: bytes) -> list[dict[str, Any]]:
    """The answers among what the server sent, after checking every line's form (invariant 2)."""
    expect(output == b"" or output.endswith(b"\n"), "output ends in the middle of a line")
    found = []
    for line in output.splitlines():
        try:
            message = strict_json(line)
        except _NotJson as error:
            raise Violation(f"the server sent {line[:200]!r}: {error}") from None
        expect(isinstance(message, dict), f"the server sent {line[:200]!r}")
        if "id" not in message:
            expect(isinstance(message.get("method"), str), f"neither answer nor notice: {line!r}")
            continue
        expect(set(message) in ({"id", "result"}, {"id", "error"}), f"answer {line[:200]!r}")
        error = message.get("error")
        if error is not None:
            expect(
                isinstance(error, dict)
                and type(error.get("code")) is int
                and isinstance(error.get("message"), str),
                f"error {error!r:.200}",
            )
        found.append(message)
    return found


def check(data: bytes) -> None:
    if data[1:2] != b"{":
        return
    stream = data[1:]
    outputs = []
    with command_limit(), ERRORS.watching():
        for pieces in ([stream], chunks(stream, data[0])):
            outputs.append(Node().converse(pieces).value())
    expect(outputs[0] == outputs[1], f"split {data[0]} changes the answers")
    got = answers(outputs[0])
    lines = requests(stream)
    expect(
        len(got) == len(lines), f"{len(lines)} requests, {len(got)} answers: {outputs[0]!r:.300}"
    )
    for line, answer in zip(lines, got, strict=True):
        code, request_id = expected(line)
        what = f"{line[:100]!r} answered {answer!r:.200}"
        expect(answer["id"] == request_id, f"id: {what}")
        if code is not None:
            expect(answer.get("error", {}).get("code") == code, f"code {code}: {what}")


if __name__ == "__main__":
    run(check, sys.argv)
