"""The control socket: a Unix socket speaking flexnbd's protocol, and JSON-RPC.

flexnbd form: one command per connection: the command and its arguments one
per line, a blank line, then the reply line ``N: text`` and the server
closes.  A connection whose first byte is ``{`` speaks JSON lines instead:
``{"id": 1, "method": "status", "params": {...}}`` in, one JSON object out
per request, and the connection stays open.  On it, ``subscribe`` streams
every transition of every machine (:mod:`ferry.control.events`), and what
the server sends waits within a cap while the client is slow
(:mod:`ferry.control.jsonlines`).

The socket file is created with mode 0600 (the umask is narrowed around
``bind`` so there is no window in which it is wider).  A socket file left by
a dead process is replaced; one that a live server answers on is not stolen.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ferry.control.commands import CommandTable, Reply
from ferry.control.events import STREAM_METHODS, EventHub, EventStream
from ferry.control.jsonlines import JsonLines

log = Logger()

# What one control client may make us buffer, and how many argument lines
# (flexnbd reads at most 256).
MAX_COMMAND_BYTES: Final = 64 * 1024
MAX_LINES: Final = 256


class ControlSocketError(Exception):
    """The socket path cannot be used; the message says why, in one line."""


@implementer(IHalfCloseableProtocol)
class ControlProtocol(Protocol):
    def __init__(self, commands: CommandTable, events: EventHub) -> None:
        self._commands = commands
        self._events = events
        self._buffer = b""
        self._json: bool | None = None
        self._answered = False
        self._lost = False
        self._out: JsonLines | None = None  # a JSON connection's outgoing lines
        self._stream: EventStream | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        if self._json is None and self._buffer:
            self._json = self._buffer.startswith(b"{")
            if self._json and self.transport is not None:
                self._out = JsonLines(self.transport, self._events.clock)
                self._stream = EventStream(self._events, self._out)
        if len(self._buffer) > MAX_COMMAND_BYTES:
            if self._out is not None:
                self._answered = True  # read nothing more
                self._out.end(f"a request longer than {MAX_COMMAND_BYTES} bytes")
            else:
                self._reply_line(f"1: command longer than {MAX_COMMAND_BYTES} bytes\n")
            return
        if self._json:
            self._json_requests()
        else:
            self._flexnbd_command(at_eof=False)

    def readConnectionLost(self) -> None:
        # A client that half-closes after its last line has said all it will.
        if not self._json and not self._answered:
            self._flexnbd_command(at_eof=True)

    def writeConnectionLost(self) -> None:
        pass

    # -- flexnbd lines ----------------------------------------------------------

    def _flexnbd_command(self, *, at_eof: bool) -> None:
        text = self._buffer.replace(b"\r\n", b"\n")
        if text.startswith(b"\n"):
            lines: list[bytes] = []
        elif b"\n\n" in text:
            lines = text.split(b"\n\n", 1)[0].split(b"\n")
        elif at_eof:
            lines = [line for line in text.split(b"\n") if line]
        else:
            return
        if len(lines) > MAX_LINES:
            self._reply_line(f"1: more than {MAX_LINES} lines\n")
            return
        try:
            words = [line.decode("utf-8") for line in lines]
        except UnicodeDecodeError:
            self._reply_line("1: command is not UTF-8\n")
            return
        name, args = (words[0], words[1:]) if words else ("", [])
        self._answered = True  # read nothing more; the reply may come later
        _settle(self._commands.run(name, args), lambda reply: self._reply_line(reply.line()))

    def _reply_line(self, line: str) -> None:
        self._answered = True
        if self.transport is None or self._lost:
            return
        self.transport.write(line.encode("utf-8"))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._stream is not None:
            self._stream.stop()
        if self._out is not None:
            self._out.connection_lost()

    # -- JSON lines ---------------------------------------------------------------

    def _json_requests(self) -> None:
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            if raw.strip():
                self._json_request(raw)

    def _json_request(self, raw: bytes) -> None:
        try:
            request = json.loads(raw)
        except ValueError as error:
            self._send_json(
                {"id": None, "error": {"code": -32700, "message": f"not JSON: {error}"}}
            )
            return
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            self._send_json(
                {
                    "id": None,
                    "error": {"code": -32600, "message": "expected an object with a method"},
                }
            )
            return
        request_id = request.get("id")
        params = request.get("params", {})
        if request["method"] in STREAM_METHODS and self._stream is not None:
            self._send_json(self._stream.request(request_id, request["method"], params))
            return
        args = params.get("args", []) if isinstance(params, dict) else params
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            self._send_json(
                {"id": request_id, "error": {"code": -32602, "message": "args must be strings"}}
            )
            return
        options = params if isinstance(params, dict) else {}
        _settle(
            self._commands.run(request["method"], args, options),
            lambda reply: self._send_json(_json_answer(request_id, reply)),
        )

    def _send_json(self, answer: dict[str, Any]) -> None:
        if self._out is None or self._lost:
            return
        self._out.send(answer)


def _settle(reply: Reply | Deferred[Reply], deliver: Callable[[Reply], None]) -> None:
    """Deliver a reply now, or when its Deferred fires; a failure is a reply too."""
    if isinstance(reply, Reply):
        deliver(reply)
        return

    def failed(failure: Failure) -> None:
        log.failure("control command failed", failure)
        deliver(Reply(1, f"internal error: {failure.getErrorMessage()}"))

    reply.addCallbacks(deliver, failed)


def _json_answer(request_id: Any, reply: Reply) -> dict[str, Any]:
    if reply.status == 10:
        return {"id": request_id, "error": {"code": -32601, "message": reply.text}}
    if reply.status != 0:
        return {"id": request_id, "error": {"code": reply.status, "message": reply.text}}
    value = reply.value if reply.value is not None else reply.text
    return {"id": request_id, "result": value}


class ControlFactory(Factory):
    def __init__(self, commands: CommandTable, events: EventHub) -> None:
        self.commands = commands
        self.events = events

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.commands, self.events)


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a new control socket, or say why it cannot be.

    A leftover socket that refuses connections belonged to a dead process
    and is removed; one that accepts them belongs to a live server.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(f"control socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as error:
        raise ControlSocketError(f"control socket {path}: {error.strerror}") from None
    finally:
        probe.close()
    raise ControlSocketError(f"control socket {path}: in use by a running server")


def listen_control(
    reactor: IReactorUNIX, path: str, commands: CommandTable, events: EventHub
) -> IListeningPort:
    claim_socket_path(path)
    old_umask = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, ControlFactory(commands, events), mode=0o600)
    except Exception as error:
        raise ControlSocketError(f"control socket {path}: {error}") from None
    finally:
        os.umask(old_umask)
