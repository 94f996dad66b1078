"""flexnbd's migration stream, scripted from both ends, in raw bytes.

What flexnbd does (``src/server/mirror.c``, ``client.c``, ``readwrite.c``):

* the listener greets with the 152-byte oldstyle hello (NBDMAGIC,
  CLISERV_MAGIC, size, flags ``HAS_FLAGS | SEND_FLUSH | SEND_FUA``, 124 zero
  bytes); the sender reads it and compares the size with its own;
* the sender writes one WRITE at a time, every one with the handle
  ``.MIRROR.`` (at most 8 MiB each), and waits for its simple reply, checking
  magic, error 0 and the handle;
* after the last write it sends NBD_CMD_DISC (with a random handle) and
  closes.  The listener
  answers nothing to DISC: "control arrived", and it takes the image over.

:class:`FlexnbdSender` is the sender over a blocking socket (for a real
``ferry listen --oldstyle`` process); :class:`FakeFlexnbdListener` is a
Twisted listener that records what a source sends it, scripted per
connection like ``fakes.destination``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ferry.nbd.constants import (
    CLISERV_MAGIC,
    GREETING_OLDSTYLE,
    NBDMAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Command,
    Errno,
    TransmissionFlag,
)

MIRROR = b".MIRROR."
#: What flexnbd's listener advertises.
FLEXNBD_FLAGS = int(
    TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
)
#: flexnbd's longest mirror write.
LONGEST_WRITE = 8 << 20
_EINVAL = int(Errno.EINVAL)


def _header(command: int, offset: int, length: int, handle: bytes = MIRROR) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, 0, command, int.from_bytes(handle, "big"), offset, length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class FlexnbdSender:
    """flexnbd's mirror sender on a blocking socket: hello, writes, DISC."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.size = 0
        self.flags = 0

    def __enter__(self) -> FlexnbdSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_hello(self) -> tuple[int, int]:
        """The listener's oldstyle hello: (size, flags); AssertionError if it is not one."""
        raw = _recv_exactly(self.sock, GREETING_OLDSTYLE.size)
        magic, cliserv, size, flags = GREETING_OLDSTYLE.unpack(raw)
        assert magic == NBDMAGIC and cliserv == CLISERV_MAGIC, raw[:16]
        assert raw[28:] == bytes(124)
        self.size, self.flags = size, flags
        return size, flags

    def request(
        self, command: int, offset: int, length: int, data: bytes = b"", handle: bytes = MIRROR
    ) -> int:
        """Send one request and wait for its simple reply; returns the error (0: OK)."""
        self.sock.sendall(_header(command, offset, length, handle) + data)
        magic, error, got = SIMPLE_REPLY.unpack(_recv_exactly(self.sock, SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert got.to_bytes(8, "big") == handle, got
        return int(error)

    def write(self, offset: int, data: bytes, handle: bytes = MIRROR) -> int:
        return self.request(Command.WRITE, offset, len(data), data, handle)

    def mirror(self, image: bytes, *, chunk: int = LONGEST_WRITE) -> None:
        """Every byte of ``image`` in writes of at most ``chunk``, each answered OK."""
        for offset in range(0, len(image), chunk):
            error = self.write(offset, image[offset : offset + chunk])
            assert error == 0, f"write at {offset}: error {error}"

    def disconnect(self) -> None:
        """flexnbd's handoff: NBD_CMD_DISC, then close (nothing is read back).

        flexnbd's ``socket_nbd_disconnect`` fills the handle with ``rand()``,
        not ``.MIRROR.``: the listener must not care.
        """
        self.sock.sendall(_header(Command.DISC, 0, 0, os.urandom(8)))
        self.close()

    def close(self) -> None:
        self.sock.close()


# -- the listener ------------------------------------------------------------------


@dataclass
class ListenerScript:
    """What one connection does; ``close_on_write`` counts WRITEs (1 is the first)."""

    size: int | None = None  # None: the listener's own size
    close_on_write: int | None = None  # close when this write's header arrives


@dataclass
class ListenerSession:
    script: ListenerScript
    commands: list[str] = field(default_factory=list)
    handles: set[bytes] = field(default_factory=set)
    writes: list[tuple[int, int]] = field(default_factory=list)
    disc: bool = False
    lost: Deferred[None] = field(default_factory=Deferred)


class _ListenerProtocol(Protocol):
    def __init__(self, fake: FakeFlexnbdListener, session: ListenerSession) -> None:
        self.fake = fake
        self.session = session
        self.buf = b""
        self.done = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        size = self.session.script.size
        size = self.fake.size if size is None else size
        self.transport.write(GREETING_OLDSTYLE.pack(NBDMAGIC, CLISERV_MAGIC, size, FLEXNBD_FLAGS))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while not self.done and len(self.buf) >= REQUEST.size:
            magic, _flags, command, handle, offset, length = REQUEST.unpack_from(self.buf)
            if magic != REQUEST_MAGIC:
                self._close()
                return
            raw_handle = handle.to_bytes(8, "big")
            session = self.session
            if command == Command.WRITE:
                if len(session.writes) + 1 == session.script.close_on_write:
                    self._close()
                    return
                if len(self.buf) < REQUEST.size + length:
                    return
                payload = self.buf[REQUEST.size : REQUEST.size + length]
                self.buf = self.buf[REQUEST.size + length :]
                session.handles.add(raw_handle)
                session.commands.append("WRITE")
                session.writes.append((offset, length))
                self.fake.disk[offset : offset + length] = payload
                self._reply(0, handle)
                continue
            self.buf = self.buf[REQUEST.size :]
            session.handles.add(raw_handle)
            if command == Command.DISC:
                # "Control arrived": no reply.
                session.commands.append("DISC")
                session.disc = True
                self.fake.control_arrived = True
                self._close()
                return
            if command == Command.FLUSH:
                session.commands.append("FLUSH")
                self._reply(0, handle)
            else:  # flexnbd answers any other command EINVAL
                session.commands.append(f"command {command}")
                self._reply(_EINVAL, handle)

    def _reply(self, error: int, handle: int) -> None:
        assert self.transport is not None
        self.transport.write(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))

    def _close(self) -> None:
        self.done = True
        assert self.transport is not None
        self.transport.loseConnection()


class FakeFlexnbdListener(Factory):
    """A ``flexnbd listen`` that records every write into :attr:`disk`."""

    def __init__(self, size: int, scripts: Sequence[ListenerScript] = (ListenerScript(),)) -> None:
        if not scripts:
            raise ValueError("at least one script")
        self.size = size
        self.scripts = list(scripts)
        self.disk = bytearray(size)
        self.sessions: list[ListenerSession] = []
        self.control_arrived = False

    def buildProtocol(self, addr: object) -> _ListenerProtocol:
        index = min(len(self.sessions), len(self.scripts) - 1)
        session = ListenerSession(self.scripts[index])
        self.sessions.append(session)
        return _ListenerProtocol(self, session)
