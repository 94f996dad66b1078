"""Replies on their way to one client's socket, without Twisted's copies.

Twisted's ``FileDescriptor`` buffers every ``write`` in a list, joins the
list into one ``bytes`` (a copy of every byte sent) when the socket becomes
writable, and sends at most ``SEND_LIMIT`` (128 KiB) per reactor iteration;
past ``bufferSize`` (64 KiB) buffered it pauses its producer, and resumes it
only once everything is sent.  Profiling ``ferry serve`` under ``nbdcopy
nbd://... null:`` (256 KiB reads) put 36 % of the process's time in that
join and concatenation, against 18 % for the ``pread`` and 19 % for the
``send`` themselves, and every reply cost a pause, a resume and two epoll
changes.  For small replies (4 KiB random reads) every batch of replies
waited one more reactor iteration (``epoll_wait``, ``doWrite``, two
``epoll_ctl``) before it was sent.

An ``Outbox`` collects the replies that one batch of requests produces and
hands them to the kernel in one ``sendmsg`` (scatter-gather: the READ data
is never copied in user space), straight from the caller, while the
transport's own buffer is empty.  Whatever the socket does not take -- and
everything, while the transport still holds unsent bytes, so that order is
kept -- goes to the transport as usual, which then buffers it, pauses its
producer past ``bufferSize`` and finishes the job on its own schedule.  So
backpressure is Twisted's, unchanged: the connection is paused exactly when
bytes are waiting in user space.

The shortcut needs a plain TCP transport (``twisted.internet.tcp``) and reads
its state before each batch: ``dataBuffer``, ``offset`` and ``_tempDataLen``
("is anything waiting to be sent?"), ``disconnecting``,
``_writeDisconnected`` and ``TLS`` (once TLS has started, bytes must go
through it).  Any other transport (a test's ``StringTransport``, one missing
an attribute after a Twisted upgrade) gets ``writeSequence`` and nothing
else, which is always correct, only slower.

Invariants:

* (The caller's part.)  The connection flushes before it returns to the
  reactor, so the outbox is empty whenever the reactor runs: nothing waits in
  it for an event that will not come, and a connection handed elsewhere has
  no bytes here.
* Bytes reach the socket in the order they were added, whichever path each
  batch takes.
* At most ``MAX_BATCH_BYTES`` (plus one reply) and ``MAX_BATCH_BUFFERS``
  wait in the outbox: past either, ``add`` flushes, so a flood of replies
  reaches the transport -- and its pause -- in bounded pieces.
* ``flush`` never blocks and never raises for a socket error: an error on the
  direct path hands the bytes to the transport, which meets the same error in
  its own ``doWrite`` and closes the connection the usual way.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence
from typing import Any, Final

from twisted.internet import tcp

#: What a reply is made of: a READ's data may be the bytearray it was read into.
Buffer = bytes | bytearray

#: Flush the batch once it holds this many bytes: large enough for a batch of
#: 256 KiB reads to go in one system call, small enough to be no memory worry.
MAX_BATCH_BYTES: Final = 1024 * 1024
#: ... or this many buffers: well under Linux's IOV_MAX (1024) for ``sendmsg``.
MAX_BATCH_BUFFERS: Final = 512

#: Per-connection transport settings (instance attributes; the class defaults
#: are 64 KiB and 128 KiB).  ``bufferSize`` is both how much one ``doRead``
#: receives -- a 256 KiB WRITE arrives in one reactor iteration, not four --
#: and how much may wait in the transport before it pauses us.  ``SEND_LIMIT``
#: is how much the transport sends per iteration once it has taken over.
READ_SIZE: Final = 1024 * 1024
SEND_LIMIT: Final = 4 * 1024 * 1024

_RETRY: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})


def _direct_socket(transport: Any) -> socket.socket | None:
    """The socket we may ``sendmsg`` on directly, or None to always use the transport."""
    if not isinstance(transport, tcp.Connection):
        return None
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket) or not hasattr(sock, "sendmsg"):
        return None
    for name in ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "TLS"):
        if not hasattr(transport, name):
            return None
    return sock


def tune(transport: Any) -> None:
    """Set TCP_NODELAY and the larger read and send sizes on a TCP transport.

    Replies are written whole and at once, so Nagle's algorithm can only
    delay them (a 4 KiB read reply waiting for the ACK of the previous one).
    Anything that is not a TCP transport is left alone.
    """
    if not isinstance(transport, tcp.Connection):
        return
    with contextlib.suppress(OSError):  # a socket that is not TCP after all
        transport.setTcpNoDelay(True)
    transport.bufferSize = READ_SIZE
    transport.SEND_LIMIT = SEND_LIMIT


class Outbox:
    """What one connection has to send, batched into as few system calls as possible."""

    __slots__ = ("_buffers", "_bytes", "_socket", "_transport", "direct_bytes")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._socket = _direct_socket(transport)
        self._buffers: list[Buffer] = []
        self._bytes = 0
        #: Bytes that went straight to the socket (observed by tests, never used).
        self.direct_bytes = 0

    @property
    def direct(self) -> bool:
        """True if this outbox may send without going through the transport's buffer."""
        return self._socket is not None

    @property
    def pending(self) -> int:
        """Bytes added and not yet flushed."""
        return self._bytes

    def held(self) -> int:
        """Bytes flushed that the transport still holds, unsent, in this process.

        What a client that does not read its replies costs us.  Read from a
        TCP transport's own buffer; any other transport is taken to hold
        nothing (a test's ``StringTransport`` keeps what is written for the
        test to read, not for a client).
        """
        transport = self._transport
        if self._socket is None:
            return 0
        return int(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)

    def unsent(self) -> bytes:
        """The bytes :meth:`held` counts, in order: what a connection moving away still owes.

        Taken while the transport is stopped for a move
        (``ferry.handoff.tcp_state.SocketState.with_unsent`` carries them);
        the transport keeps its copy, for the move that fails.
        """
        transport = self._transport
        if self._socket is None:
            return b""
        waiting = bytes(transport.dataBuffer[transport.offset :])
        return waiting + b"".join(transport._tempDataBuffer)

    def add(self, data: bytes) -> None:
        if not data:
            return
        self._buffers.append(data)
        self._bytes += len(data)
        if self._bytes >= MAX_BATCH_BYTES or len(self._buffers) >= MAX_BATCH_BUFFERS:
            self.flush()

    def add_all(self, parts: Sequence[Buffer]) -> None:
        buffers = self._buffers
        for data in parts:
            if data:
                buffers.append(data)
                self._bytes += len(data)
        if self._bytes >= MAX_BATCH_BYTES or len(buffers) >= MAX_BATCH_BUFFERS:
            self.flush()

    def discard(self) -> None:
        """Forget what was not flushed (the connection is gone)."""
        self._buffers = []
        self._bytes = 0

    def flush(self) -> None:
        """Send the batch: straight to the socket if nothing is queued before it."""
        buffers = self._buffers
        if not buffers:
            return
        total = self._bytes
        self._buffers = []
        self._bytes = 0
        transport = self._transport
        if self._socket is not None and self._idle(transport):
            try:
                sent = self._socket.sendmsg(buffers)
            except OSError as error:
                if error.errno not in _RETRY:
                    # Let the transport meet this error in doWrite and close
                    # the connection the usual way.
                    transport.writeSequence([bytes(b) for b in buffers])
                    return
                sent = 0
            self.direct_bytes += sent
            if sent == total:
                return
            buffers = _rest(buffers, sent)
        # Twisted takes bytes only: a READ's bytearray is copied on this path.
        transport.writeSequence([b if type(b) is bytes else bytes(b) for b in buffers])

    @staticmethod
    def _idle(transport: Any) -> bool:
        """True if the transport is open for writing, holds nothing unsent, and is not TLS."""
        return bool(
            transport.connected
            and not transport.TLS
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
        )


def _rest(buffers: list[Buffer], sent: int) -> list[Buffer]:
    """What is left of ``buffers`` after the first ``sent`` bytes went out."""
    for index, data in enumerate(buffers):
        size = len(data)
        if sent < size:
            rest = buffers[index:]
            if sent:
                rest[0] = data[sent:]
            return rest
        sent -= size
    return []
