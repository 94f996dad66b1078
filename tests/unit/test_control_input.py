"""Malformed input on the control socket: every request gets its error answer, nothing escapes.

The protocol runs on Twisted's test doubles (``Node`` of test_control_events),
so an exception escaping ``dataReceived`` fails the test where it happens;
``logged_errors`` catches what would only have reached the log.  The same
inputs against a real ``ferry serve`` are in
tests/integration/test_serve_control.py; the fuzz targets control_json and
control_lines (fuzz/) look for more.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from ferry.control.commands import Commands, Reply
from ferry.control.server import MAX_COMMAND_BYTES
from ferry.exports import ExportConfig, ExportError, ExportRegistry, ExportUnit
from ferry.migrate.manager import MirrorManager
from ferry.migrate.options import Destination
from ferry.serve.server import NBDServer
from serve_doubles import Blocking

from .test_control_events import Node


class MirroringNode(Node):
    """A Node whose commands can mirror; every connection is refused at once."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.destinations: list[Destination] = []
        self.mirrors = MirrorManager(
            self.export,
            gate=self.export,
            clock=self.clock,
            connector=self.refuse,
            tracer=self.tracer,
            stop_process=lambda: None,
        )
        server = NBDServer([self.export], clock=self.clock, run_blocking=Blocking())
        exports = ExportRegistry()
        exports.add(ExportUnit(ExportConfig(str(tmp_path / "disk.img")), self.export, self.mirrors))
        self.added: list[ExportConfig] = []
        self.commands = Commands(server, exports, host=self, default_deny=False)

    def refuse(self, destination: Destination, factory: Any, timeout: float) -> Any:
        self.destinations.append(destination)
        return defer.fail(ConnectionRefusedError("refused"))

    # -- ExportHost: what export.add hands the node, which refuses it ----------------------

    def add_export(self, config: ExportConfig) -> defer.Deferred[ExportUnit]:
        self.added.append(config)
        return defer.fail(ExportError("not added here"))

    def remove_export(self, name: str, *, force: bool = False) -> defer.Deferred[None]:
        return defer.fail(ExportError("not removed here"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return MirroringNode(tmp_path)


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


# -- JSON that is not a request ---------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ([1, 2], "expected an object with a method"),
        ("status", "expected an object with a method"),
        ({"id": 1}, "expected an object with a method"),
        ({"id": 1, "method": 7}, "expected an object with a method"),
        ({"id": True, "method": "status"}, "the id must be a string, a number or null"),
        ({"id": [1], "method": "status"}, "the id must be a string, a number or null"),
        ({"id": {"n": 1}, "method": "status"}, "the id must be a string, a number or null"),
    ],
    ids=["array", "string", "no method", "method 7", "id true", "id [1]", "id object"],
)
def test_what_is_not_a_request_is_answered_minus_32600(
    node: Node, request_: Any, message: str
) -> None:
    answer_id, code, text = only_error(json_answers(node, json.dumps(request_).encode() + b"\n"))
    assert (answer_id, code, text) == (None, -32600, message)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("10.0.0.0/8", "params must be an object or an array"),
        (7, "params must be an object or an array"),
        (True, "params must be an object or an array"),
        ([1], "args must be strings"),
        ({"args": "10.0.0.0/8"}, "args must be strings"),
        ({"args": [None]}, "args must be strings"),
    ],
)
def test_params_of_the_wrong_type_are_answered_minus_32602(
    node: Node, params: Any, message: str
) -> None:
    request_ = {"id": 7, "method": "acl", "params": params}
    answer_id, code, text = only_error(json_answers(node, json.dumps(request_).encode() + b"\n"))
    assert (answer_id, code, text) == (7, -32602, message)


@pytest.mark.parametrize("request_id", [None, 0, -1, 2.5, "x", "", 10**30])
def test_every_id_json_rpc_allows_comes_back(node: Node, request_id: Any) -> None:
    (answer,) = json_answers(
        node, json.dumps({"id": request_id, "method": "status", "params": None}).encode() + b"\n"
    )
    assert answer["id"] == request_id and answer["result"]["state"] == "serving"


# -- mirror's parameters ----------------------------------------------------------------

MIRROR_ARGS = ["127.0.0.1", "10809"]
SECONDS = "must be a number of seconds greater than 0"
WHOLE = "must be a whole number greater than 0"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_downtime", "NaN", SECONDS),
        ("max_downtime", "inf", SECONDS),
        ("max_downtime", "0.3", SECONDS),
        ("max_downtime", 0, SECONDS),
        ("max_downtime", -0.5, SECONDS),
        ("max_downtime", True, SECONDS),
        ("max_downtime", None, SECONDS),
        ("max_downtime", [0.3], SECONDS),
        ("max_downtime", {"s": 1}, SECONDS),
        ("max_downtime", 10**400, SECONDS),
        ("reply_timeout", "nan", SECONDS),
        ("reply_timeout", -1, SECONDS),
        ("reply_timeout", 1e-400, SECONDS),
        ("max_passes", 1.5, WHOLE),
        ("max_passes", 3.0, WHOLE),
        ("max_passes", "3", WHOLE),
        ("max_passes", True, WHOLE),
        ("max_passes", 0, WHOLE),
        ("max_passes", -3, WHOLE),
        ("flexnbd", "yes", "must be true or false"),
        ("flexnbd", 1, "must be true or false"),
    ],
)
def test_bad_mirror_parameters_are_refused_before_a_mirror_starts(
    node: MirroringNode, key: str, value: Any, message: str
) -> None:
    request_ = {"id": 1, "method": "mirror", "params": {"args": MIRROR_ARGS, key: value}}
    answer_id, code, text = only_error(json_answers(node, json.dumps(request_).encode() + b"\n"))
    assert (answer_id, code, text) == (1, 1, f"bad {key}: {message}")
    assert node.destinations == [] and node.mirrors.current is None


def test_good_mirror_parameters_start_a_mirror(node: MirroringNode) -> None:
    params = {"args": MIRROR_ARGS, "max_downtime": 2, "max_passes": 10**30, "reply_timeout": 0.5}
    request_ = {"id": 1, "method": "mirror", "params": params}
    answer_id, code, text = only_error(json_answers(node, json.dumps(request_).encode() + b"\n"))
    assert (answer_id, code, text) == (1, 1, "Mirror failed to connect: refused")
    assert node.destinations == [Destination("127.0.0.1", 10809)]
    assert node.mirrors.current is not None
    options = node.mirrors.current.options
    assert (options.max_downtime, options.max_passes, options.reply_timeout) == (2.0, 10**30, 0.5)


@pytest.mark.parametrize(
    ("dest_export", "message"),
    [
        ("\ud800", "not UTF-8 text (a lone surrogate)"),
        ("vm\x00", "contains a NUL character"),
        ("x" * 4097, "longer than NBD's 4096 bytes"),
        (7, "must be an export's name"),
    ],
    ids=["lone surrogate", "NUL", "too long", "a number"],
)
def test_a_destination_export_nbd_cannot_carry_is_refused_before_a_mirror_starts(
    node: MirroringNode, dest_export: Any, message: str
) -> None:
    request_ = {
        "id": 1,
        "method": "mirror",
        "params": {"args": MIRROR_ARGS, "dest_export": dest_export},
    }
    answer_id, code, text = only_error(json_answers(node, json.dumps(request_).encode() + b"\n"))
    assert (answer_id, code, text) == (1, 1, f"bad dest_export: {message}")
    assert node.destinations == [] and node.mirrors.current is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "\ud800", "file": "/a"}, "name: not UTF-8 text (a lone surrogate)"),
        ({"name": "x" * 4097, "file": "/a"}, "name: longer than NBD's 4096 bytes"),
        ({"name": "vm\x00", "file": "/a"}, "name: contains a NUL character"),
        ({"name": "vm", "file": "/a\x00b"}, "file: contains a NUL character"),
        ({"name": "vm", "file": "/a", "resource": "\udfff"}, "resource: not UTF-8 text"),
        ({"name": "vm", "file": "/a", "max_downtime": 10**400}, "max_downtime: must be a "),
    ],
    ids=["surrogate name", "long name", "NUL name", "NUL file", "surrogate resource", "10**400"],
)
def test_export_settings_no_file_or_nbd_can_take_are_refused_before_the_node_sees_them(
    node: MirroringNode, settings: dict[str, Any], message: str
) -> None:
    request_ = {"id": 1, "method": "export.add", "params": settings}
    answer_id, code, text = only_error(json_answers(node, json.dumps(request_).encode() + b"\n"))
    assert (answer_id, code) == (1, 1)
    assert text.startswith(f"export.add: {message}"), text
    assert node.added == []


def test_good_export_settings_reach_the_node(node: MirroringNode) -> None:
    settings = {"name": "vm", "file": "/a", "mode": "listen", "acl": ["192.0.2.1"]}
    request_ = {"id": 1, "method": "export.add", "params": {**settings, "max_downtime": 10**3}}
    answer_id, code, text = only_error(json_answers(node, json.dumps(request_).encode() + b"\n"))
    assert (answer_id, code, text) == (1, 1, "not added here")
    [config] = node.added
    assert (config.export_name, config.listen, config.acl) == ("vm", True, ("192.0.2.1",))
    assert config.max_downtime == 1000.0 and isinstance(config.max_downtime, float)


# -- how long a request may be ----------------------------------------------------------


def padded(request_: dict[str, Any], length: int) -> bytes:
    """``request_`` as JSON, with spaces before its closing brace to make ``length`` bytes."""
    text = json.dumps(request_).encode()
    return text[:-1] + b" " * (length - len(text)) + b"}"


def test_a_json_line_at_the_limit_is_a_request(node: Node) -> None:
    line = padded({"id": 1, "method": "status"}, MAX_COMMAND_BYTES)
    (answer,) = json_answers(node, line + b"\n")
    assert answer["id"] == 1 and answer["result"]["state"] == "serving"


@pytest.mark.parametrize("read_size", [None, 1000, 1], ids=["one read", "1000 bytes", "bytewise"])
def test_a_json_line_over_the_limit_gets_one_error_and_the_connection_goes_on(
    node: Node, read_size: int | None
) -> None:
    line = padded({"id": 1, "method": "status"}, MAX_COMMAND_BYTES + 1) + b"\n"
    size = read_size or len(line)
    reads = [line[i : i + size] for i in range(0, len(line), size)]
    answer_id, code, text = only_error(json_answers(node, *reads))
    assert (answer_id, code, text) == (None, -32600, "a request longer than 65536 bytes")


def test_an_unterminated_line_over_the_limit_is_answered_at_once(node: Node) -> None:
    client = node.connect()
    client.protocol.dataReceived(b"{" + b" " * MAX_COMMAND_BYTES)
    assert only_error(client.received()) == (None, -32600, "a request longer than 65536 bytes")
    client.protocol.dataReceived(b" " * MAX_COMMAND_BYTES)  # still the same line: skipped
    assert client.received() == []


def test_many_short_requests_in_one_read_longer_than_the_limit_are_all_answered(
    node: Node,
) -> None:
    requests = b"".join(
        json.dumps({"id": n, "method": "status"}).encode() + b"\n" for n in range(3000)
    )
    assert len(requests) > MAX_COMMAND_BYTES
    answers = json_answers(node, requests)
    assert [a["id"] for a in answers] == list(range(3000))


# -- the client's half-close ------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "answered"),
    [
        (b'{"id": 9, "method": "status"}', [9]),
        (b'{"id": 9, "method": "status"}\r', [9]),
        (b"{not json", [None]),
        (b"  \r", []),
        (b"", []),
    ],
    ids=["request", "with a CR", "not JSON", "blank", "nothing"],
)
def test_a_last_json_line_without_its_newline_is_answered_at_the_half_close(
    node: Node, last: bytes, answered: list[Any]
) -> None:
    client = node.connect()
    client.protocol.dataReceived(b'{"id": 1, "method": "status"}\n' + last)
    client.protocol.readConnectionLost()
    first, *answers = client.received()
    assert first["id"] == 1
    assert [a["id"] for a in answers] == answered
    client.protocol.readConnectionLost()  # a second half-close answers nothing twice
    assert client.received() == []


# -- flexnbd's lines ----------------------------------------------------------------------


def line_reply(node: Node, *reads: bytes, half_close: bool = False) -> bytes:
    """The one line a flexnbd-form connection answers to ``reads``; it is then closed."""
    client = node.connect()
    for data in reads:
        client.protocol.dataReceived(data)
    if half_close:
        client.protocol.readConnectionLost()
    assert client.transport.disconnecting
    reply = client.transport.value()
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
    return reply


def in_reads(data: bytes, size: int | None) -> list[bytes]:
    size = size or len(data)
    return [data[i : i + size] for i in range(0, len(data), size)]


TOO_LONG = b"1: command longer than 65536 bytes\n"


@pytest.mark.parametrize("read_size", [None, 1000, 1], ids=["one read", "1000 bytes", "bytewise"])
@pytest.mark.parametrize(
    ("sent", "reply"),
    [
        (b"x" * (MAX_COMMAND_BYTES - 1) + b"\n\n", b"10: unknown command\n"),
        (b"x" * (MAX_COMMAND_BYTES - 2) + b"\r\n\r\n", b"10: unknown command\n"),
        (b"x" * MAX_COMMAND_BYTES + b"\n\n", TOO_LONG),
        (b"status\n\n" + b"x" * MAX_COMMAND_BYTES, b"0: pid="),
        (b"status\r\n\r\n" + b"\n" * MAX_COMMAND_BYTES, b"0: pid="),
        (b"x" * (MAX_COMMAND_BYTES + 2), TOO_LONG),
    ],
    ids=["at the limit", "CRLF at the limit", "over", "junk after", "CRLF junk after", "no end"],
)
def test_a_command_is_judged_by_what_precedes_its_blank_line(
    node: Node, sent: bytes, reply: bytes, read_size: int | None
) -> None:
    assert line_reply(node, *in_reads(sent, read_size)).startswith(reply)


@pytest.mark.parametrize(
    ("sent", "reply"),
    [
        (b"\n", b"9: missing command\n"),
        (b"\r\n", b"9: missing command\n"),
        (b"frobnicate\n\n", b"10: unknown command\n"),
        (b"status\xff\n\n", b"1: command is not UTF-8\n"),
        (b"acl\n" + b"10.0.0.1\n" * 256 + b"\n", b"1: more than 256 lines\n"),
        (b"acl\nnot-an-ip\n\n", b"1: bad spec: not-an-ip\n"),
        (b"mirror\n127.0.0.1\n\n", b"1: mirror takes at least two parameters\n"),
        (b"mirror\n127.0.0.1\nport\n\n", b"1: bad IP port number\n"),
        (b"mirror\n127.0.0.1\n99999999999999999999\n\n", b"1: bad IP port number\n"),
        (b"mirror\nnowhere\n10809\n\n", b"1: bad IP address\n"),
        (b"mirror\n127.0.0.1\n10809\nnever\n\n", b"1: action must be"),
        (b"mirror\n127.0.0.1\n10809\nexit\n::1%\n\n", b"1: bad bind address\n"),
        (b"mirror\n127.0.0.1\n10809\nexit\n127.0.0.1\n-5\n\n", b"1: max_bps couldn't be parsed\n"),
        (b"mirror\n1\n2\n3\n4\n5\n6\n\n", b"1: unrecognised parameters to mirror\n"),
        (b"mirror\ntcp:x\n\n", b"1: bad destination 'tcp:x': tcp: needs HOST:PORT, PORT in"),
        (b"mirror\nunix:\n\n", b"1: bad destination 'unix:': unix: needs a socket path\n"),
        (b"mirror\nexec:\n\n", b"1: bad destination 'exec:': exec: needs a command\n"),
        (b"mirror\nunix:/x\nexit\n127.0.0.1\n\n", b"1: a bind address is for TCP, not unix:\n"),
        (b"mirror\nunix:/x\nnever\n\n", b"1: action must be"),
        (b"mirror\nunix:/x\n1\n2\n3\n4\n\n", b"1: unrecognised parameters to mirror\n"),
        (b"mirror_max_bps\nlots\n\n", b"1: Not currently mirroring\n"),
        (b"break\nnow\n\n", b"1: not mirroring\n"),
    ],
)
def test_bad_commands_get_their_documented_answer(node: Node, sent: bytes, reply: bytes) -> None:
    assert line_reply(node, sent).startswith(reply)


@pytest.mark.parametrize("sent", [b"status", b"status\n", b"status\r\n", b"status\r"])
def test_a_half_close_ends_a_command_without_its_blank_line(node: Node, sent: bytes) -> None:
    assert line_reply(node, sent, half_close=True).startswith(b"0: pid=")


def test_nothing_then_a_half_close_is_a_missing_command(node: Node) -> None:
    assert line_reply(node, half_close=True) == b"9: missing command\n"


# -- a command that fails is an answer too -----------------------------------------------


def boom(args: Any, params: Any) -> Any:
    raise RuntimeError("boom")


def not_json(args: Any, params: Any) -> Any:
    return Reply(0, "odd", {"speed": float("nan")})


def failing_later(args: Any, params: Any) -> Any:
    return defer.fail(RuntimeError("later"))


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (boom, "internal error: boom"),
        (failing_later, "internal error: later"),
        (not_json, "internal error: the answer cannot be written as JSON"),
    ],
)
def test_a_command_that_fails_is_answered_and_logged(
    node: Node, logged_errors: list[dict[str, Any]], command: Any, message: str
) -> None:
    node.commands.table["status"] = command
    client = node.connect()
    client.send({"id": 4, "method": "status"})
    client.send({"id": 5, "method": "migration"})
    answer, after = client.received()
    assert answer == {"id": 4, "error": {"code": 1, "message": message}}
    assert after["id"] == 5 and "result" in after
    assert len(logged_errors) == 1 and "log_failure" in logged_errors[0]
    logged_errors.clear()  # expected here


@pytest.mark.parametrize(("command", "line"), [(boom, b"boom"), (failing_later, b"later")])
def test_a_flexnbd_command_that_fails_is_answered_and_logged(
    node: Node, logged_errors: list[dict[str, Any]], command: Any, line: bytes
) -> None:
    node.commands.table["status"] = command
    assert line_reply(node, b"status\n\n") == b"1: internal error: " + line + b"\n"
    assert len(logged_errors) == 1
    logged_errors.clear()


@pytest.mark.parametrize(
    "request_",
    [
        {"id": 3, "method": "nope"},
        {"id": 3, "method": "nope", "params": "10.0.0.0/8"},
        {"id": 3, "method": "nope", "params": {"args": [1]}},
        {"id": 3, "method": ""},
        {"id": 3, "method": "Status"},
    ],
)
def test_an_unknown_method_is_minus_32601_whatever_its_params(
    node: Node, request_: dict[str, Any]
) -> None:
    answer = json_answers(node, json.dumps(request_).encode() + b"\n")
    assert only_error(answer) == (3, -32601, "unknown command")
