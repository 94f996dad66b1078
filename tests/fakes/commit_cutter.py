"""A TCP relay between a migration source and a real listener that loses the commit on cue.

The two-phase commit has one moment nobody can see from either end: the
connection dies after the source sent ``FERRY_CMD_COMMIT``.  Did the
destination get it?  The source cannot know, so it goes ``in_doubt`` and
asks the lease.  To put real ``ferry`` processes in that moment, the relay
forwards a migration stream byte for byte while it follows the source's
side of it (the handshake's options up to ``NBD_OPT_GO``, then each
request header and its payload), and cuts both connections:

* :attr:`Cut.BEFORE_COMMIT`: when the commit request arrives, before any
  of it is forwarded, so the destination never commits;
* :attr:`Cut.AFTER_COMMIT`: when the destination's answer to the forwarded
  commit arrives (its acknowledgement, sent once it serves), before any of
  it is forwarded, so the destination has committed and the source never
  hears it.

It cuts once; later connections are refused (closed at once), so a source
that decides to retry finds nobody and the test sees what the lease alone
settled.  With :attr:`Cut.NEVER` it cuts nothing: ``on_commit`` runs when the
commit arrives, before it is forwarded (a test does something to the world
at that instant), and the relay goes on forwarding.

It runs on a thread of its own with blocking sockets, as a real network in
between would: the processes under test own the reactors.
"""

from __future__ import annotations

import enum
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Final

from ferry.nbd.constants import (
    CLIENT_FLAGS,
    FERRY_CMD_COMMIT,
    OPTION_HEADER,
    REQUEST,
    Command,
    Option,
)

__all__ = ["CommitCutter", "Cut"]

_CHUNK: Final = 256 * 1024


class Cut(enum.Enum):
    BEFORE_COMMIT = "before the commit reaches the destination"
    AFTER_COMMIT = "after the destination answered the commit"
    NEVER = "never: the relay only calls its on_commit hook, then forwards the commit"


class _SourceStream:
    """Follows the bytes a source sends: where the options end, where each request starts.

    ``feed`` returns how many of the bytes given come before the commit
    request's first byte (all of them until it arrives).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._stage = "flags"
        self._skip = 0  # payload bytes still to pass before the next header
        self.commit_seen = False

    def feed(self, data: bytes) -> int:
        self._buffer += data
        forwarded = len(data)
        consumed_before = len(self._buffer) - len(data)  # bytes of the buffer already forwarded
        position = 0
        while True:
            if self._skip:
                step = min(self._skip, len(self._buffer) - position)
                self._skip -= step
                position += step
                if self._skip:
                    break
            need = {"flags": CLIENT_FLAGS.size, "options": OPTION_HEADER.size}.get(
                self._stage, REQUEST.size
            )
            if len(self._buffer) - position < need:
                break
            header = self._buffer[position : position + need]
            if self._stage == "flags":
                self._stage = "options"
            elif self._stage == "options":
                _, option, length = OPTION_HEADER.unpack(header)
                self._skip = length
                if option == Option.GO:
                    self._stage = "requests"
            else:
                _, _, kind, _, _, length = REQUEST.unpack(header)
                if kind == FERRY_CMD_COMMIT:
                    self.commit_seen = True
                    forwarded = max(0, position - consumed_before)
                    self._buffer = b""
                    return forwarded
                if kind == Command.WRITE:
                    self._skip = length
            position += need
        self._buffer = self._buffer[position:]
        return forwarded


class CommitCutter:
    """``127.0.0.1:port`` relays to ``target_port`` and cuts the migration at ``cut``."""

    def __init__(
        self, target_port: int, cut: Cut, on_commit: Callable[[], object] | None = None
    ) -> None:
        self.cut = cut
        self.on_commit = on_commit
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.done = threading.Event()  # set once the cut was made
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="commit-cutter", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=10)

    def __enter__(self) -> CommitCutter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if not ready:
                    continue
                source, _ = self._listener.accept()
                if self.done.is_set() and self.cut is not Cut.NEVER:
                    source.close()  # cut once: a retry finds nobody
                    continue
                self._relay(source)
        except OSError:
            if not self._stop.is_set():
                raise
        except BaseException as error:  # surfaced by the test through .error
            self.error = error

    def _relay(self, source: socket.socket) -> None:
        destination = socket.create_connection(("127.0.0.1", self.target_port))
        stream = _SourceStream()
        try:
            self._forward(source, destination, stream)
        except ConnectionError:
            pass  # either end went away: the relay ends with it
        finally:
            # No FIN from either side carries anything: just gone, as a dead link is.
            for sock in (source, destination):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

    def _forward(
        self, source: socket.socket, destination: socket.socket, stream: _SourceStream
    ) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([source, destination], [], [], 0.1)
            if source in ready:
                data = source.recv(_CHUNK)
                if not data:
                    return
                seen_before = stream.commit_seen
                forward = stream.feed(data) if not stream.commit_seen else len(data)
                if stream.commit_seen and not seen_before and self.on_commit is not None:
                    destination.sendall(data[:forward])
                    data, forward = data[forward:], 0
                    self.on_commit()
                if stream.commit_seen and self.cut is Cut.NEVER:
                    self.done.set()
                if stream.commit_seen and self.cut is Cut.BEFORE_COMMIT:
                    destination.sendall(data[:forward])
                    self.done.set()
                    return
                destination.sendall(data)
            if destination in ready:
                data = destination.recv(_CHUNK)
                if not data:
                    return
                if stream.commit_seen and self.cut is Cut.AFTER_COMMIT:
                    self.done.set()  # the acknowledgement: dropped
                    return
                source.sendall(data)
