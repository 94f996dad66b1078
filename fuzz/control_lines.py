#!/usr/bin/env python3
"""Fuzz target: the control socket's flexnbd line protocol (``ferry.control.server``).

A control connection whose first byte is not ``{`` speaks flexnbd's form:
a command and its arguments one per line, a blank line (or the client's
half-close), one reply line ``N: text``, and the server closes.  The bytes
go to a real ``ControlProtocol`` over a real node's ``Commands`` (an export,
its NBD server, a ``MirrorManager`` whose connections are refused at once),
on Twisted's ``StringTransport`` and a ``task.Clock``.  Checked:

1. No exception escapes the protocol, and nothing is logged as an error
   (no ``log.failure``: a traceback in the server's log is a finding).
2. Exactly one reply line, ``N: text`` with one of the statuses the README
   documents (0, 1, 9, 10), and the connection is closed after it; until
   then no more than ``MAX_COMMAND_BYTES`` (and one) of the command is held.
3. The same bytes split differently get the same reply.
4. Options that reach the ``MirrorManager`` are ones a migration can run
   with (finite, positive numbers, an export name NBD can carry): a bad
   argument is the command's answer, not an exception somewhere below it.
5. So are the settings ``export.add`` hands the node (``CheckedHost``), and
   ``export.remove`` and a ``subscribe`` to one export reach the node's
   answers, as a daemon's do.

``MAX_COMMAND_BYTES`` is lowered to ``COMMAND_LIMIT`` while a check runs,
so the over-long answer is within reach of a fuzzer's inputs.

Input: ``[split seed][bytes the client sends]``.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from ferry.clock import ReactorClock
from ferry.control import server as control_server
from ferry.control.commands import Commands
from ferry.control.events import EventHub
from ferry.control.server import ControlProtocol
from ferry.exports import (
    MAX_NAME_BYTES,
    ExportBusy,
    ExportConfig,
    ExportError,
    ExportRegistry,
    ExportUnit,
)
from ferry.migrate.manager import MirrorManager
from ferry.migrate.options import Destination, MirrorOptions, StartOutcome
from ferry.serve.acl import Acl, AclError
from ferry.serve.export import Export
from ferry.serve.server import NBDServer
from ferry.storage import Image
from ferry.trace import Tracer
from fuzzing import Violation, chunks, expect, run

COMMAND_LIMIT: Final = 1024
REPLY: Final = re.compile(rb"\A(0|1|9|10): [^\n]*\n\Z")
IMAGE_SIZE: Final = 64 * 1024

_image: Image | None = None


def image() -> Image:
    """One small image for every node of this process (nothing writes to it).

    Its file is removed once open, so no run leaves one behind.
    """
    global _image
    if _image is None:
        path = Path(tempfile.mkdtemp(prefix="ferry-fuzz-")) / "disk.img"
        path.write_bytes(b"\xa5" * IMAGE_SIZE)
        _image = Image.open(path)
        path.unlink()
        path.parent.rmdir()
    return _image


class CheckedMirrors(MirrorManager):
    """A MirrorManager that checks what the control commands hand it (invariant 4)."""

    def mirror(
        self, destination: Destination, options: MirrorOptions
    ) -> defer.Deferred[StartOutcome]:
        for name in ("max_downtime", "reply_timeout"):
            value = getattr(options, name)
            expect(
                type(value) in (int, float) and math.isfinite(value) and value > 0,
                f"mirror was started with {name}={value!r}",
            )
        expect(
            type(options.max_passes) is int and options.max_passes >= 1,
            f"mirror was started with max_passes={options.max_passes!r}",
        )
        expect(
            options.max_bps is None or (type(options.max_bps) is int and options.max_bps > 0),
            f"mirror was started with max_bps={options.max_bps!r}",
        )
        expect(
            nbd_text(destination.export_name, empty=True),
            f"mirror was started into export {destination.export_name!r}",
        )
        return super().mirror(destination, options)


def nbd_text(value: object, *, empty: bool = False) -> bool:
    """Whether ``value`` is a name NBD, a file system and a log can all take: UTF-8 text,
    without NUL, of at most NBD's 4096 bytes (and not empty unless ``empty``)."""
    if not isinstance(value, str) or "\x00" in value or not (value or empty):
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


class CheckedHost:
    """The node's side of ``export.add`` and ``export.remove``, checking what the commands
    hand it (invariant 5).

    It opens no file a fuzzer names: every add is refused, as an image that
    cannot be opened is, and every remove as that of an export that migrates.
    """

    def __init__(self, exports: ExportRegistry) -> None:
        self._exports = exports

    def add_export(self, config: ExportConfig) -> defer.Deferred[ExportUnit]:
        for key in ("name", "file", "resource"):
            value = getattr(config, key)
            expect(
                (key == "resource" and value is None) or nbd_text(value),
                f"export.add handed the node {key}={value!r:.200}",
            )
        try:
            Acl.parse(config.acl)
        except AclError as error:
            raise Violation(f"export.add handed the node a bad acl: {error}") from None
        expect(
            config.max_downtime is None
            or (math.isfinite(config.max_downtime) and config.max_downtime > 0),
            f"export.add handed the node max_downtime={config.max_downtime!r}",
        )
        return defer.fail(ExportError(f"image {config.file}: not opened while fuzzing"))

    def remove_export(self, name: str, *, force: bool = False) -> defer.Deferred[None]:
        unit = self._exports.get(name)  # UnknownExport, as the node's
        return defer.fail(ExportBusy(f"export {unit.name!r} is not removed while fuzzing"))


def _refused(destination: Destination, factory: Any, timeout: float) -> defer.Deferred[Any]:
    return defer.fail(ConnectionRefusedError(f"{destination} refused (fuzzing)"))


class Node:
    """The control side of one ``ferry serve`` (a node of one export, which ``export.add``
    could add to, as a daemon's): a fresh one per run, so runs can be compared."""

    def __init__(self) -> None:
        self.reactor = task.Clock()
        clock = ReactorClock(self.reactor)
        tracer = Tracer()
        exports = ExportRegistry()
        self.hub = EventHub(tracer, clock, scope=lambda name: exports.get(name).owns)
        export = Export("disk", image(), clock=clock, tracer=tracer)
        export.trigger("serve")
        server = NBDServer(
            [export], clock=clock, run_blocking=lambda work: defer.maybeDeferred(work)
        )
        self.mirrors = CheckedMirrors(
            export,
            gate=export,
            clock=clock,
            connector=_refused,
            tracer=tracer,
            stop_process=lambda: None,
        )
        exports.add(ExportUnit(ExportConfig(str(export.image.path)), export, self.mirrors))
        self.commands = Commands(server, exports, host=CheckedHost(exports), default_deny=False)

    def converse(self, pieces: list[bytes]) -> StringTransport:
        """One connection: each piece as one read, then the client's half-close; its transport.

        A mirror still running afterwards is broken off, and the connection
        is then lost, as when the client goes away.
        """
        protocol = ControlProtocol(self.commands, self.hub)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for piece in pieces:
            if piece:  # a transport never delivers b""
                protocol.dataReceived(piece)
                check_held(protocol)
        if not transport.disconnecting:
            protocol.readConnectionLost()
        if self.mirrors.running:
            self.mirrors.cancel()
        self.reactor.advance(60)  # whatever waits on the clock (retries, close grace)
        protocol.connectionLost(Failure(ConnectionError("the client went away")))
        return transport


def check_held(protocol: ControlProtocol) -> None:
    """What a connection keeps of a request it has not answered stays within the limit.

    Reads the protocol's private fields on purpose: the bound is about them.
    A flexnbd command is refused once it cannot fit (its blank line could
    still start on its last byte, hence the one over); a JSON line once it
    is over.
    """
    limit = control_server.MAX_COMMAND_BYTES
    flexnbd = protocol._command_bytes + len(protocol._buffer)
    expect(flexnbd <= limit + 1 or protocol._answered, f"{flexnbd} bytes of a command held")
    expect(len(protocol._partial) <= limit, f"{len(protocol._partial)} bytes of a line held")


class ErrorLog:
    """Every event logged at error level or with a failure, while it watches."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            self.events.append(event)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        self.events.clear()
        globalLogPublisher.addObserver(self)
        try:
            yield
        finally:
            globalLogPublisher.removeObserver(self)
        if self.events:
            first = self.events[0]
            failure = first.get("log_failure")
            detail = failure.getTraceback() if failure is not None else first.get("log_format")
            raise Violation(f"{len(self.events)} error(s) logged; the first: {detail}")


@contextlib.contextmanager
def command_limit(limit: int = COMMAND_LIMIT) -> Iterator[None]:
    """``MAX_COMMAND_BYTES`` lowered to ``limit`` for the duration."""
    saved = control_server.MAX_COMMAND_BYTES
    control_server.MAX_COMMAND_BYTES = limit
    try:
        yield
    finally:
        control_server.MAX_COMMAND_BYTES = saved


ERRORS: Final = ErrorLog()


def check(data: bytes) -> None:
    if not data or data[1:2] == b"{":
        return  # a JSON connection: control_json's
    stream = data[1:]
    replies = []
    with command_limit(), ERRORS.watching():
        for pieces in ([stream], chunks(stream, data[0])):
            transport = Node().converse(pieces)
            reply = transport.value()
            expect(REPLY.match(reply) is not None, f"reply {reply[:200]!r} to {stream[:100]!r}")
            expect(transport.disconnecting, "the connection stays open after the reply")
            replies.append(reply)
    expect(replies[0] == replies[1], f"split {data[0]} changes the reply: {replies!r:.300}")
    command = stream.replace(b"\r\n", b"\n")
    if command.startswith(b"status\n\n"):
        expect(replies[0].startswith(b"0: pid="), f"status answered {replies[0]!r:.200}")


if __name__ == "__main__":
    run(check, sys.argv)
