"""Malformed input on a real ``ferry serve --sock``: each gets its exact answer, nothing escapes.

Every input goes to the same running server over its own control
connection.  After each the test checks the exact answer, that a JSON
connection still answers on the same connection, that the control socket
and the NBD port still serve, and that the server logged no error: its
``--log`` file (every event, as JSON) has nothing at error level and no
failure, and its stderr no traceback.  The same inputs on Twisted's test
doubles are in tests/unit/test_control_input.py; the fuzz targets
control_json and control_lines look for more.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.remote import RemoteExport
from support import serve, sparse_file

pytestmark = pytest.mark.integration

MiB = 1 << 20
MAX = 64 * 1024
MIRROR = ["127.0.0.1", "9"]  # a port nothing listens on
SECONDS = "must be a number of seconds greater than 0"


class Server:
    """One ``ferry serve --sock --log`` for the module, and what it has said since last asked."""

    def __init__(self, tmp: Path) -> None:
        self.sock = tmp / "ctl.sock"
        self.log = tmp / "events.jsonl"
        image = sparse_file(tmp / "disk.img", 4 * MiB, data_at=[(0, MiB)])
        self.proc = serve(image, "--sock", str(self.sock), "--log", str(self.log))
        self._log_seen = 0

    def errors_since_last_asked(self) -> list[str]:
        """Events logged at error level or with a failure, and stderr lines with a traceback."""
        found = []
        with self.log.open() as f:
            f.seek(self._log_seen)
            for line in f:
                event = json.loads(line)
                level = (event.get("log_level") or {}).get("name")
                failure = "log_failure" in event or "failure" in event or event.get("isError")
                if level in ("error", "critical") or failure:
                    found.append(line.strip()[:400])
            self._log_seen = f.tell()
        found += [line for line in self._stderr_lines() if "Traceback" in line]
        return found

    def _stderr_lines(self) -> list[str]:
        assert self.proc.proc.stderr is not None
        fd = self.proc.proc.stderr.fileno()
        data = b""
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        lines = data.decode(errors="replace").splitlines()
        self.proc.log.extend(lines)
        return lines


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("control"))
    yield server
    assert server.proc.stop() == 0, "\n".join(server.proc.log)


@pytest.fixture(autouse=True)
def still_serving(server: Server) -> Iterator[None]:
    """After each test: no error logged, and both sockets still serve."""
    yield
    assert server.errors_since_last_asked() == []
    status = json_session(server, [{"id": "s", "method": "status"}])
    assert status == [{"id": "s", "result": status[0]["result"]}]
    assert status[0]["result"]["state"] == "serving"
    with RemoteExport.connect("127.0.0.1", server.proc.port) as remote:
        assert remote.pread(0, 4) == b"\xa5" * 4


def connect(server: Server) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(str(server.sock))
    return conn


def json_session(server: Server, requests: list[Any], *, raw: bytes = b"") -> list[dict[str, Any]]:
    """Send ``raw`` then each request (a line each) on one connection; one answer each.

    ``raw`` holds lines after an opening status request (so the connection
    speaks JSON whatever ``raw`` starts with); its answers come first.
    """
    with connect(server) as conn:
        opening = b'{"id": "open", "method": "status"}\n' if raw else b""
        lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in requests]
        conn.sendall(opening + raw + b"".join(line + b"\n" for line in lines))
        stream = conn.makefile("rb")
        expected = raw.count(b"\n") + len(lines) + (1 if raw else 0)
        answers = [json.loads(stream.readline()) for _ in range(expected)]
    if raw:
        assert answers[0]["id"] == "open"
        return answers[1:]
    return answers


def line_session(server: Server, data: bytes) -> bytes:
    """flexnbd's form: send ``data``, half-close, read the reply until the server closes.

    The server reads nothing after the command's end (or its limit), and a
    Unix socket closed with bytes unread resets: the rest of ``data`` may not
    go, and the reset may come after the reply instead of the end of stream.
    """
    chunks = []
    with connect(server) as conn:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code, "message": message}}


# -- JSON lines -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        (b"[" * 60_000 + b"\n", error(None, -32700, "not JSON: nested too deeply")),
        (
            b'{"id": 1e999999, "method": "status"}\n',
            error(None, -32700, "not JSON: 1e999999 is out of range"),
        ),
        (b'{"id": 1e999999}\n', error(None, -32700, "not JSON: 1e999999 is out of range")),
        (
            b'{"id": NaN, "method": "status"}\n',
            error(None, -32700, "not JSON: NaN is not a JSON number"),
        ),
        (
            b'{"id": 1, "method": "mirror", "params": {"args": ["127.0.0.1", "9"], '
            b'"max_downtime": NaN}}\n',
            error(None, -32700, "not JSON: NaN is not a JSON number"),
        ),
        (
            b'{"id": 1, "method": "mirror", "params": {"args": ["127.0.0.1", "9"], '
            b'"max_downtime": Infinity}}\n',
            error(None, -32700, "not JSON: Infinity is not a JSON number"),
        ),
        (
            b'{"id": 1, "method": "mirror", "params": {"args": ["127.0.0.1", "9"], '
            b'"max_downtime": -Infinity}}\n',
            error(None, -32700, "not JSON: -Infinity is not a JSON number"),
        ),
        (
            b'{"id": 1, "method": "st\xffatus"}\n',
            error(
                None,
                -32700,
                "not JSON: 'utf-8' codec can't decode byte 0xff in position 23: invalid start byte",
            ),
        ),
        (
            b"\xfe\xff\x00{\n",
            error(
                None,
                -32700,
                "not JSON: 'utf-8' codec can't decode byte 0xfe in position 0: invalid start byte",
            ),
        ),
        (
            b"{not json}\n",
            error(
                None,
                -32700,
                "not JSON: Expecting property name enclosed in double quotes: line 1 "
                + "column 2 (char 1)",
            ),
        ),
        (b"[1, 2]\n", error(None, -32600, "expected an object with a method")),
        (b'{"id": 1}\n', error(None, -32600, "expected an object with a method")),
        (b'{"id": 1, "method": 5}\n', error(None, -32600, "expected an object with a method")),
        (
            b'{"id": {"a": 1}, "method": "status"}\n',
            error(None, -32600, "the id must be a string, a number or null"),
        ),
        (b'{"id": 1, "method": "frobnicate"}\n', error(1, -32601, "unknown command")),
        (b'{"id": 1, "method": ""}\n', error(1, -32601, "unknown command")),
        (
            b"{" + b" " * MAX + b"}\n",
            error(None, -32600, f"a request longer than {MAX} bytes"),
        ),
    ],
    ids=[
        "60000 [",
        "id 1e999999",
        "id 1e999999 alone",
        "id NaN",
        "max_downtime NaN",
        "max_downtime Infinity",
        "max_downtime -Infinity",
        "not UTF-8",
        "UTF-16 BOM",
        "not JSON",
        "array",
        "no method",
        "method 5",
        "id object",
        "unknown method",
        "empty method",
        "over-long line",
    ],
)
def test_malformed_json_gets_its_error_and_the_connection_goes_on(
    server: Server, raw: bytes, answer: dict[str, Any]
) -> None:
    got = json_session(server, [{"id": "next", "method": "status"}], raw=raw)
    assert got[0] == answer
    assert got[1]["id"] == "next" and got[1]["result"]["state"] == "serving"


def mirror(**params: Any) -> dict[str, Any]:
    return {"id": 7, "method": "mirror", "params": {"args": MIRROR, **params}}


@pytest.mark.parametrize(
    ("request_", "answer"),
    [
        (mirror(max_downtime="NaN"), error(7, 1, f"bad max_downtime: {SECONDS}")),
        (mirror(max_downtime="inf"), error(7, 1, f"bad max_downtime: {SECONDS}")),
        (mirror(max_downtime=-1), error(7, 1, f"bad max_downtime: {SECONDS}")),
        (mirror(max_downtime=0), error(7, 1, f"bad max_downtime: {SECONDS}")),
        (mirror(max_downtime=True), error(7, 1, f"bad max_downtime: {SECONDS}")),
        (mirror(max_downtime=[1]), error(7, 1, f"bad max_downtime: {SECONDS}")),
        (mirror(reply_timeout="1"), error(7, 1, f"bad reply_timeout: {SECONDS}")),
        (mirror(reply_timeout=None), error(7, 1, f"bad reply_timeout: {SECONDS}")),
        (
            mirror(max_passes=2.5),
            error(7, 1, "bad max_passes: must be a whole number greater than 0"),
        ),
        (
            mirror(max_passes="3"),
            error(7, 1, "bad max_passes: must be a whole number greater than 0"),
        ),
        (mirror(flexnbd="yes"), error(7, 1, "bad flexnbd: must be true or false")),
        (
            {"id": 7, "method": "mirror", "params": {"args": ["127.0.0.1", 9]}},
            error(7, -32602, "args must be strings"),
        ),
        (
            {"id": 7, "method": "mirror", "params": {"args": "127.0.0.1 9"}},
            error(7, -32602, "args must be strings"),
        ),
        (
            {"id": 7, "method": "mirror", "params": "127.0.0.1"},
            error(7, -32602, "params must be an object or an array"),
        ),
        ({"id": 7, "method": "mirror"}, error(7, 1, "mirror takes at least two parameters")),
        (
            {"id": 7, "method": "mirror", "params": {"args": ["nowhere", "9"]}},
            error(7, 1, "bad IP address"),
        ),
        (
            {"id": 7, "method": "mirror", "params": {"args": ["127.0.0.1", "99999"]}},
            error(7, 1, "bad IP port number"),
        ),
        (
            {"id": 7, "method": "acl", "params": {"args": ["10.0.0.0/8", "not-an-ip"]}},
            error(7, 1, "bad spec: not-an-ip"),
        ),
        ({"id": 7, "method": "acl", "params": [None]}, error(7, -32602, "args must be strings")),
        (
            {"id": 7, "method": "mirror_max_bps", "params": ["lots"]},
            error(7, 1, "Not currently mirroring"),
        ),
        (
            {"id": 7, "method": "break", "params": 3},
            error(7, -32602, "params must be an object or an array"),
        ),
        (
            {"id": 7, "method": "subscribe", "params": {"current": "yes"}},
            error(7, -32602, "subscribe: current must be true or false"),
        ),
        (
            {"id": 7, "method": "subscribe", "params": ["x"]},
            error(7, -32602, "subscribe: params must be an object"),
        ),
        (
            {"id": 7, "method": "unsubscribe", "params": {"x": 1}},
            error(7, -32602, "unsubscribe takes no params"),
        ),
    ],
)
def test_wrong_parameters_get_their_error(
    server: Server, request_: dict[str, Any], answer: dict[str, Any]
) -> None:
    (got,) = json_session(server, [request_])
    assert got == answer


def test_a_mirror_with_good_parameters_runs_and_fails_cleanly(server: Server) -> None:
    request_ = mirror(max_downtime=0.5, max_passes=3, reply_timeout=2)
    (got,) = json_session(server, [request_])
    assert got["id"] == 7 and got["error"]["code"] == 1
    assert got["error"]["message"].startswith("Mirror failed to connect: ")
    assert "refused" in got["error"]["message"]


def test_a_last_request_without_its_newline_is_answered_at_the_half_close(
    server: Server,
) -> None:
    with connect(server) as conn:
        conn.sendall(b'{"id": 1, "method": "status"}\n{"id": 2, "method": "nope"}')
        conn.shutdown(socket.SHUT_WR)
        stream = conn.makefile("rb")
        answers = [json.loads(stream.readline()) for _ in range(2)]
    assert answers[0]["id"] == 1 and "result" in answers[0]
    assert answers[1] == error(2, -32601, "unknown command")


def test_more_than_the_limit_of_short_requests_in_one_write_are_all_answered(
    server: Server,
) -> None:
    # Long requests with short answers: what waits to be read stays far
    # below the cap of a connection that does not read (see jsonlines.py).
    requests = [{"id": n, "method": "status", "params": {"pad": "x" * 500}} for n in range(150)]
    assert sum(len(json.dumps(r)) + 1 for r in requests) > MAX
    answers = json_session(server, requests)
    assert [a["id"] for a in answers] == list(range(150))


# -- flexnbd's lines -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "reply"),
    [
        (b"\n", b"9: missing command\n"),
        (b"", b"9: missing command\n"),
        (b"frobnicate\n\n", b"10: unknown command\n"),
        (b"status\xff\n\n", b"1: command is not UTF-8\n"),
        (b"x" * (MAX + 10), f"1: command longer than {MAX} bytes\n".encode()),
        (b"acl\n" + b"10.0.0.1\n" * 300 + b"\n", b"1: more than 256 lines\n"),
        (b"acl\nnot-an-ip\n\n", b"1: bad spec: not-an-ip\n"),
        (b"mirror\n127.0.0.1\n\n", b"1: mirror takes at least two parameters\n"),
        (b"mirror\n127.0.0.1\nport\n\n", b"1: bad IP port number\n"),
        (b"mirror\nnowhere\n10809\n\n", b"1: bad IP address\n"),
        (
            b"mirror\n127.0.0.1\n10809\nnever\n\n",
            b"1: action must be 'exit', 'unlink' or 'nothing'\n",
        ),
        (b"mirror\n127.0.0.1\n10809\nexit\nbad\n\n", b"1: bad bind address\n"),
        (b"mirror\n127.0.0.1\n10809\nexit\n127.0.0.1\n-5\n\n", b"1: max_bps couldn't be parsed\n"),
        (b"mirror\n1\n2\n3\n4\n5\n6\n\n", b"1: unrecognised parameters to mirror\n"),
        (b"mirror_max_bps\nlots\n\n", b"1: Not currently mirroring\n"),
        (b"break\n\n", b"1: not mirroring\n"),
        (b"status\n\n" + b"junk" * 20_000, b"0: pid="),
    ],
    ids=[
        "blank",
        "nothing",
        "unknown",
        "not UTF-8",
        "over-long",
        "300 lines",
        "bad acl",
        "mirror short",
        "mirror port",
        "mirror address",
        "mirror action",
        "mirror bind",
        "mirror max_bps",
        "mirror too many",
        "mirror_max_bps",
        "break",
        "junk after",
    ],
)
def test_a_bad_command_gets_its_documented_answer(
    server: Server, sent: bytes, reply: bytes
) -> None:
    got = line_session(server, sent)
    assert got.startswith(reply) and got.endswith(b"\n") and got.count(b"\n") == 1, got
