"""One client connection as it travels with the commit: its socket and its NBD session.

The source checkpoints a client's socket (:mod:`ferry.handoff.tcp_repair`)
and its NBD session (:class:`ferry.nbd.session.SessionSnapshot`); the two
travel together in one ``FERRY_CMD_CONNECTION`` and the destination rebuilds
both or neither.  A third part, ``replies``, is what the source's server had
written but its transport had not yet handed to the kernel: the destination
writes it first, through its own transport (never blocking on a client that
is still frozen), then everything else.  The format keeps the rules of the two it wraps:

* **versioned**: a magic and a version first, refused by name if unknown;
* **bounded**: each part's length is checked against its own limit before
  it is read, and the parts' own readers bound what they hold;
* **exact**: the lengths must add up to the blob, with nothing after.

A blob that breaks any rule is a :class:`CarriedFormatError`: that one
client is lost (as it would have been before connections could move), the
migration goes on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ferry.handoff.errors import HandoffError
from ferry.handoff.tcp_state import MAX_QUEUE_BYTES, SocketState, StateFormatError
from ferry.nbd.constants import FERRY_MAX_CONNECTION
from ferry.nbd.session import SessionSnapshot, SnapshotError

__all__ = ["CARRIED_VERSION", "CarriedConnection", "CarriedFormatError"]

#: The wire format this node writes, and the only one it reads.
CARRIED_VERSION: Final = 1

_MAGIC: Final = b"FCON"
# magic, version, socket state length, session length, replies length
_HEADER: Final = struct.Struct(">4sHIII")
# A socket state is two queues and a fixed header.
_MAX_SOCKET_STATE: Final = 2 * MAX_QUEUE_BYTES + 4096


class CarriedFormatError(HandoffError, ValueError):
    """A blob that is not a carried connection this node reads."""


@dataclass(frozen=True, slots=True)
class CarriedConnection:
    """A client connection between its two sockets: the TCP state and the NBD session."""

    socket: SocketState
    session: SessionSnapshot
    replies: bytes = b""

    def to_bytes(self) -> bytes:
        socket_state = self.socket.to_bytes()
        session = self.session.to_bytes()
        header = _HEADER.pack(
            _MAGIC, CARRIED_VERSION, len(socket_state), len(session), len(self.replies)
        )
        blob = b"".join((header, socket_state, session, self.replies))
        if len(blob) > FERRY_MAX_CONNECTION:
            raise CarriedFormatError(
                f"the connection's state is {len(blob)} bytes, over the limit of "
                f"{FERRY_MAX_CONNECTION}"
            )
        return blob

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> CarriedConnection:
        view = memoryview(blob)
        if len(view) < _HEADER.size:
            raise CarriedFormatError(
                f"{len(view)} bytes is shorter than a carried connection's header"
            )
        magic, version, socket_length, session_length, replies_length = _HEADER.unpack_from(view)
        if magic != _MAGIC:
            raise CarriedFormatError(
                f"not a carried connection (magic {bytes(magic)!r}, not {_MAGIC!r})"
            )
        if version != CARRIED_VERSION:
            raise CarriedFormatError(
                f"carried connection format {version} is not read here "
                f"(this node reads {CARRIED_VERSION})"
            )
        if socket_length > _MAX_SOCKET_STATE:
            raise CarriedFormatError(f"a socket state of {socket_length} bytes is over the limit")
        if _HEADER.size + socket_length + session_length + replies_length != len(view):
            raise CarriedFormatError(
                f"the parts' lengths ({socket_length} + {session_length} + {replies_length}) "
                "do not add up to the blob's"
            )
        start = _HEADER.size
        replies_start = start + socket_length + session_length
        try:
            socket_state = SocketState.from_bytes(view[start : start + socket_length])
            session = SessionSnapshot.from_bytes(
                view[start + socket_length : replies_start], max_in_flight=FERRY_MAX_CONNECTION
            )
        except (StateFormatError, SnapshotError) as error:
            raise CarriedFormatError(str(error)) from None
        return cls(socket_state, session, bytes(view[replies_start:]))
