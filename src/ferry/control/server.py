"""The control socket: a Unix socket speaking flexnbd's protocol, and JSON-RPC.

flexnbd form: one command per connection: the command and its arguments one
per line, a blank line, then the reply line ``N: text`` and the server
closes.  A connection whose first byte is ``{`` speaks JSON lines instead:
``{"id": 1, "method": "status", "params": {...}}`` in, one JSON object out
per request, and the connection stays open.  On it, ``subscribe`` streams
every transition of every machine (:mod:`ferry.control.events`), and what
the server sends waits within a cap while the client is slow
(:mod:`ferry.control.jsonlines`).

A JSON method in :attr:`Commands.upgrades` (``takeover``) takes the
connection itself, if it is the first request on it: the server hands a
duplicate of the socket to the method and forgets the connection.  Such a
method hands out the node's descriptors, so only a client running as this
server's user or as root may call it (the kernel says who, SO_PEERCRED),
whatever the socket file's mode has been changed to.

A request -- a flexnbd command up to its blank line, or one JSON line --
may be at most ``MAX_COMMAND_BYTES``.  A longer command is answered ``1:
command longer than ...``; a longer JSON line gets the error -32600 and is
skipped, and the connection goes on.  Nothing a client sends is answered
with a traceback: malformed requests get their error answer, and an
exception inside a command is an internal error answer (and a log entry).

The socket file is created with mode 0600 (the umask is narrowed around
``bind`` so there is no window in which it is wider).  A socket file left by
a dead process is replaced; one that a live server answers on is not stolen.
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any, Final, NoReturn

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ferry.control.approvals import APPROVAL_METHODS, Approvals
from ferry.control.commands import CommandTable, Reply
from ferry.control.events import STREAM_METHODS, EventHub, EventStream
from ferry.control.jsonlines import JsonLines
from ferry.safepath import UnsafePath, check_parent_directory

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
        self._lines: list[bytes] = []  # a flexnbd command's lines so far
        self._command_bytes = 0  # ... and their length, each with its newline
        self._buffer = bytearray()  # ... and its unfinished line
        self._json: bool | None = None
        self._partial = bytearray()  # a JSON connection's unfinished line
        self._skipping = False  # ... or the rest of one too long to read, already answered
        self._answered = False
        self._lost = False
        self._out: JsonLines | None = None  # a JSON connection's outgoing lines
        self._stream: EventStream | None = None
        self._requests = 0  # JSON requests read on this connection
        self._upgraded = False  # the connection was given away (Commands.upgrades)
        self._approvals: Approvals | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        if self._json is None:
            self._json = data.startswith(b"{")
            if self._json and self.transport is not None:
                self._out = JsonLines(self.transport, self._events.clock)
                self._stream = EventStream(self._events, self._out)
                find = getattr(self._commands, "mirrors_of", None)
                if find is not None:
                    self._approvals = Approvals(self._out, self._events.clock, find)
        if self._json:
            self._json_lines(data)
        else:
            self._flexnbd_lines(data)

    def readConnectionLost(self) -> None:
        # A client that half-closes after its last line has said all it will,
        # whether or not it ended that line.
        if self._json:
            if not self._skipping and self._partial.strip():
                line = bytes(self._partial)
                self._partial.clear()
                self._json_request(line)
        elif not self._answered:
            last = bytes(self._buffer.removesuffix(b"\r"))
            self._buffer.clear()
            if last:
                self._lines.append(last)
                self._command_bytes += len(last)
            self._flexnbd_command()

    def writeConnectionLost(self) -> None:
        pass

    # -- flexnbd lines ----------------------------------------------------------

    def _flexnbd_lines(self, data: bytes) -> None:
        """Collect the command's lines until the blank line ends it, then answer it.

        A line ends with "\n" or "\r\n".  The command -- what precedes the
        blank line -- may be at most ``MAX_COMMAND_BYTES``; once it cannot be
        (the blank line could start at the earliest on the last byte, a
        "\r"), it is answered as too long without waiting for the rest.
        """
        *complete, rest = data.split(b"\n")
        for piece in complete:
            self._buffer += piece
            raw = bytes(self._buffer)
            self._buffer.clear()
            line = raw.removesuffix(b"\r")
            if not line:
                self._flexnbd_command()
                return
            self._lines.append(line)
            self._command_bytes += len(raw) + 1
        self._buffer += rest
        if self._command_bytes + len(self._buffer) - 1 > MAX_COMMAND_BYTES:
            self._reply_line(f"1: command longer than {MAX_COMMAND_BYTES} bytes\n")

    def _flexnbd_command(self) -> None:
        lines = self._lines
        if self._command_bytes > MAX_COMMAND_BYTES:
            self._reply_line(f"1: command longer than {MAX_COMMAND_BYTES} bytes\n")
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
        _settle(
            lambda: self._commands.run(name, args), lambda reply: self._reply_line(reply.line())
        )

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
        if self._approvals is not None:
            self._approvals.stop()
        if self._out is not None:
            self._out.connection_lost()

    # -- JSON lines ---------------------------------------------------------------

    def _json_lines(self, data: bytes) -> None:
        """Answer each line ``data`` completes; keep the unfinished one, up to the limit.

        A line longer than ``MAX_COMMAND_BYTES`` is answered with an error as
        soon as it is, and the rest of it is skipped: however the lines were
        split into reads, each gets one answer and no more than the limit of
        one is held.
        """
        *complete, rest = data.split(b"\n")
        for piece in complete:
            if self._upgraded:
                return  # the connection is someone else's now
            if self._skipping:
                self._skipping = False  # the end of a line already answered
                continue
            line = bytes(self._partial + piece) if self._partial else piece
            self._partial.clear()
            if len(line) > MAX_COMMAND_BYTES:
                self._json_too_long()
            elif line.strip():
                self._json_request(line)
        if not self._skipping and not self._upgraded:
            self._partial += rest
            if len(self._partial) > MAX_COMMAND_BYTES:
                self._partial.clear()
                self._skipping = True
                self._json_too_long()

    def _json_too_long(self) -> None:
        self._send_json(_error(None, -32600, f"a request longer than {MAX_COMMAND_BYTES} bytes"))

    def _json_request(self, raw: bytes) -> None:
        try:
            request = _strict_json(raw)
        except ValueError as error:
            self._send_json(
                {"id": None, "error": {"code": -32700, "message": f"not JSON: {error}"}}
            )
            return
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            self._send_json(_error(None, -32600, "expected an object with a method"))
            return
        request_id = request.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, str | int | float | None):
            self._send_json(_error(None, -32600, "the id must be a string, a number or null"))
            return
        method = request["method"]
        self._requests += 1
        if method in self._commands.upgrades:
            self._upgrade(request_id, method, request.get("params"))
            return
        if method in APPROVAL_METHODS:
            if self._approvals is None:
                self._send_json(_error(request_id, 1, "this server has no exports to approve"))
            else:
                self._send_json(self._approvals.request(request_id, method, request.get("params")))
            return
        if method not in self._commands.table and method not in STREAM_METHODS:
            self._send_json(_error(request_id, -32601, "unknown command"))
            return
        params = request.get("params")
        if method in STREAM_METHODS and self._stream is not None:
            self._send_json(self._stream.request(request_id, method, params))
            return
        if params is None:
            args, options = [], {}
        elif isinstance(params, dict):
            args, options = params.get("args", []), params
        elif isinstance(params, list):
            args, options = params, {}
        else:
            self._send_json(_error(request_id, -32602, "params must be an object or an array"))
            return
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            self._send_json(_error(request_id, -32602, "args must be strings"))
            return
        _settle(
            lambda: self._commands.run(method, args, options),
            lambda reply: self._send_json(_json_answer(request_id, reply)),
        )

    def _upgrade(self, request_id: Any, method: str, params: Any) -> None:
        """Give the connection to ``method`` (see :data:`ferry.control.commands.Upgrade`)."""
        if params is not None and not isinstance(params, dict):
            self._send_json(_error(request_id, -32602, "params must be an object"))
            return
        if self._requests != 1:
            why = f"{method} must be the first request on its connection"
            self._send_json(_error(request_id, 1, why))
            return
        transport = self.transport
        assert transport is not None
        uid = _peer_uid(transport.socket)  # type: ignore[attr-defined]
        if uid not in (os.geteuid(), 0):
            log.warn("refused {method} to a client running as uid {uid}", method=method, uid=uid)
            why = f"{method}: uid {uid} may not; only this server's user or root"
            self._send_json(_error(request_id, 1, why))
            return
        try:
            outcome = self._commands.upgrades[method](params or {})
        except Exception:
            log.failure("control command {method} failed", method=method)
            self._send_json(_error(request_id, 1, f"internal error in {method}"))
            return
        if isinstance(outcome, str):
            self._send_json(_error(request_id, 1, outcome))
            return
        # Our own descriptor of the connection for the method; Twisted's goes
        # with an abort (a Unix socket's close sends nothing while ours lives).
        sock = transport.socket.dup()  # type: ignore[attr-defined]
        sock.setblocking(True)
        self._upgraded = self._answered = True
        self._partial.clear()
        if self._out is not None:
            self._out.stopProducing()
        transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.abortConnection()  # type: ignore[attr-defined]
        try:
            outcome(sock)
        except Exception:
            log.failure("control command {method} failed with the connection", method=method)
            sock.close()

    def _send_json(self, answer: dict[str, Any]) -> None:
        if self._out is None or self._lost:
            return
        try:
            self._out.send(answer)
        except (TypeError, ValueError):  # a value JSON cannot carry (NaN, a set, ...)
            log.failure("control answer {answer!r:.200} is not JSON", answer=answer)
            error = "internal error: the answer cannot be written as JSON"
            self._out.send(_error(answer.get("id"), 1, error))


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (None: not one)."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(raw)[1])


_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _strict_json(raw: bytes) -> Any:
    """``raw`` as JSON (RFC 8259) in UTF-8, or ValueError saying why not.

    Python's own extensions are refused, since no answer could carry them
    back (the answers are strict JSON): ``NaN``, ``Infinity``, and numbers
    too large for a double, which it would read as infinite.  Nesting
    deeper than the parser's recursion limit is a ValueError too.
    """
    try:
        return json.loads(
            raw.decode("utf-8"), parse_constant=_not_a_number, parse_float=_finite_float
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _not_a_number(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _settle(run: Callable[[], Reply | Deferred[Reply]], deliver: Callable[[Reply], None]) -> None:
    """Run a command; deliver its reply now, or when its Deferred fires.

    A failure is a reply too, whether the Deferred fails or the command
    raises at once: ``internal error: ...`` for the client, the traceback
    for the log -- never an exception out of the protocol.
    """
    try:
        reply = run()
    except Exception:
        reply = fail()
    if isinstance(reply, Reply):
        deliver(reply)
        return

    def failed(failure: Failure) -> None:
        log.failure("control command failed", failure)
        deliver(Reply(1, f"internal error: {failure.getErrorMessage()}"))

    reply.addCallbacks(deliver, failed)


def _json_answer(request_id: Any, reply: Reply) -> dict[str, Any]:
    if reply.status == 10:
        return _error(request_id, -32601, reply.text)
    if reply.status != 0:
        return _error(request_id, reply.status, reply.text)
    value = reply.value if reply.value is not None else reply.text
    return {"id": request_id, "result": value}


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code, "message": message}}


class ControlFactory(Factory):
    def __init__(self, commands: CommandTable, events: EventHub) -> None:
        self.commands = commands
        self.events = events

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.commands, self.events)


def claim_socket_path(path: str, what: str = "control socket") -> None:
    """Make ``path`` free for a new socket (``what``: a control socket), or say why it cannot be.

    A leftover socket that refuses connections belonged to a dead process
    and is removed; one that accepts them belongs to a live server.
    """
    try:
        check_parent_directory(path, what)
    except UnsafePath as unsafe:
        raise ControlSocketError(str(unsafe)) from None
    except OSError as error:
        raise ControlSocketError(f"{what} {path}: {error.strerror or error}") from None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(f"{what} {path}: exists and is not a socket")
    if info.st_uid != os.geteuid():
        raise ControlSocketError(
            f"{what} {path}: belongs to uid {info.st_uid}, not to this user: "
            "refusing to replace or use it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as error:
        raise ControlSocketError(f"{what} {path}: {error.strerror}") from None
    finally:
        probe.close()
    raise ControlSocketError(f"{what} {path}: in use by a running server")


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
