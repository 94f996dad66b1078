"""An NBD session in transmission, as a value that can move with its TCP connection.

When a client's connection moves to another process or host, the socket's
state (``ferry.handoff.tcp_repair``) is only half of it: the server on the
other side must also know what the handshake settled and where in the
client's byte stream it is.  :class:`SessionSnapshot` is that half.
``ServerConnection.snapshot`` takes one; ``ServerConnection.restore``
builds a connection from one that answers every later byte exactly as the
original would have (the property test in ``tests/unit/test_nbd_session.py``
checks it at every byte boundary of client streams).

What it holds:

* the handshake's outcome: the export (as the client was told it), whether
  structured replies were negotiated, the metadata contexts and their ids,
  and the connection's request size cap (which decides what is rejected);
* ``in_flight``: requests already parsed but not yet answered, as the raw
  request bytes the caller supplies (:func:`encode_request` turns a
  ``Request`` back into them).  They belong to the caller -- the Twisted
  connection holds them at the gate -- so the snapshot only carries them;
  ``restore`` parses them again and returns them as events, first, so the
  destination performs and answers them, never the source;
* the request received only in part: ``partial``, the bytes of it that
  arrived (less than a header, or a WRITE's header and the part of its
  payload that came), or, for a WRITE being rejected while its payload
  streams past unread, ``rejected`` and how many payload bytes are still to
  be counted off.

Only a client's session in transmission moves: not one mid-handshake, not
a closed or broken one, not a migration sender's or a flexnbd mirror's, and
not one of an export whose flags are capped (``ExportInfo.advertise``, a
``ferry proxy``'s: the format does not carry the cap, and a restored
connection without it would accept flags the server behind it lacks).
``ServerConnection.snapshot`` refuses those with :class:`SnapshotError`.

The wire format is versioned (a magic, then a version refused by name if
unknown), bounded (every string by the protocol's limit, the partial
request by the size cap, ``in_flight`` by :data:`MAX_IN_FLIGHT_BYTES`
unless the reader says otherwise) and exact (no trailing bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from ferry.nbd.constants import (
    MAX_STRING_LENGTH,
    REQUEST,
    REQUEST_MAGIC,
    Command,
    Errno,
)
from ferry.nbd.events import ExportInfo, RejectedRequest, Request

__all__ = [
    "MAX_IN_FLIGHT_BYTES",
    "SESSION_VERSION",
    "SessionSnapshot",
    "SnapshotError",
    "encode_request",
]

#: The wire format this node writes, and the only one it reads.
SESSION_VERSION: Final = 1
#: The default cap on the unanswered requests a snapshot may carry: 16 of
#: the largest WRITEs ferry accepts.  ``from_bytes(max_in_flight=...)``
#: changes it for a caller that holds more.
MAX_IN_FLIGHT_BYTES: Final = 16 * 32 * 1024 * 1024 + 16 * REQUEST.size
#: ferry offers one metadata context; a handful is room for more.
MAX_META_CONTEXTS: Final = 16

_MAGIC: Final = b"FNBS"
_PREAMBLE: Final = struct.Struct(">4sH")  # magic, version
_EXPORT: Final = struct.Struct(">QBIII")  # size, read-only, min, preferred, max block size
_SESSION: Final = struct.Struct(">BBI")  # structured, meta context count, max request size
_CONTEXT_ID: Final = struct.Struct(">I")
_STRING_LENGTH: Final = struct.Struct(">H")
_IN_FLIGHT_LENGTH: Final = struct.Struct(">Q")
_PARTIAL_LENGTH: Final = struct.Struct(">I")
_PRESENT: Final = struct.Struct(">B")
# handle, command, offset, length, error, payload bytes still to skip
_REJECTED: Final = struct.Struct(">QHQIII")
_MAX_BLOCK: Final = 1 << 32


class SnapshotError(ValueError):
    """A session that cannot be snapshotted or restored, or a blob that is not one."""


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """One client's NBD session in transmission: see the module docstring for each part."""

    export: ExportInfo
    structured_replies: bool
    meta_contexts: tuple[tuple[int, str], ...]
    max_request_size: int
    in_flight: bytes = b""
    partial: bytes = b""
    rejected: RejectedRequest | None = None
    rejected_remaining: int = 0

    def __post_init__(self) -> None:
        export = self.export
        for label, text in (("export name", export.name), ("description", export.description)):
            if len(text.encode()) > MAX_STRING_LENGTH:
                raise SnapshotError(f"{label} is over {MAX_STRING_LENGTH} bytes")
        if not 0 <= export.size < 1 << 64:
            raise SnapshotError(f"export size {export.size} is not a u64")
        if export.advertise is not None:
            raise SnapshotError("an export with capped flags (a proxy's) does not move")
        for label, value in (
            ("minimum block size", export.min_block_size),
            ("preferred block size", export.preferred_block_size),
            ("maximum block size", export.max_block_size),
        ):
            if not 0 < value < _MAX_BLOCK:
                raise SnapshotError(f"{label} {value} is not in 1..2**32-1")
        if not 0 < self.max_request_size < 1 << 32:
            raise SnapshotError(f"max_request_size {self.max_request_size} is not in 1..2**32-1")
        if len(self.meta_contexts) > MAX_META_CONTEXTS:
            raise SnapshotError(f"{len(self.meta_contexts)} metadata contexts is too many")
        for context_id, name in self.meta_contexts:
            if not 0 <= context_id < 1 << 32 or len(name.encode()) > MAX_STRING_LENGTH:
                raise SnapshotError(f"metadata context {context_id}:{name[:40]!r} is invalid")
        if self.meta_contexts and not self.structured_replies:
            raise SnapshotError("metadata contexts without structured replies")
        if len(self.partial) >= REQUEST.size + self.max_request_size:
            raise SnapshotError(
                f"a partial request of {len(self.partial)} bytes is more than one request"
            )
        if self.rejected is None:
            if self.rejected_remaining:
                raise SnapshotError("rejected_remaining without a rejected request")
        else:
            if self.partial:
                raise SnapshotError("both a partial request and a rejected one in progress")
            if not 0 < self.rejected_remaining <= self.rejected.length:
                raise SnapshotError(
                    f"{self.rejected_remaining} bytes left of a {self.rejected.length}-byte "
                    "payload being skipped"
                )

    # -- the wire format -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The snapshot as a self-describing blob :meth:`from_bytes` reads back exactly."""
        export = self.export
        parts = [
            _PREAMBLE.pack(_MAGIC, SESSION_VERSION),
            _string(export.name),
            _string(export.description),
            _EXPORT.pack(
                export.size,
                int(export.read_only),
                export.min_block_size,
                export.preferred_block_size,
                export.max_block_size,
            ),
            _SESSION.pack(
                int(self.structured_replies), len(self.meta_contexts), self.max_request_size
            ),
        ]
        for context_id, name in self.meta_contexts:
            parts += [_CONTEXT_ID.pack(context_id), _string(name)]
        parts += [
            _IN_FLIGHT_LENGTH.pack(len(self.in_flight)),
            self.in_flight,
            _PARTIAL_LENGTH.pack(len(self.partial)),
            self.partial,
        ]
        rejected = self.rejected
        if rejected is None:
            parts.append(_PRESENT.pack(0))
        else:
            parts += [
                _PRESENT.pack(1),
                _REJECTED.pack(
                    rejected.handle,
                    int(rejected.command),
                    rejected.offset,
                    rejected.length,
                    int(rejected.error),
                    self.rejected_remaining,
                ),
                _string(rejected.reason),
            ]
        return b"".join(parts)

    @classmethod
    def from_bytes(
        cls, blob: bytes | bytearray | memoryview, *, max_in_flight: int = MAX_IN_FLIGHT_BYTES
    ) -> SessionSnapshot:
        """Decode and validate; :class:`SnapshotError` for anything that is not a snapshot.

        The magic and version are checked before anything else is parsed.
        """
        reader = _Reader(bytes(blob))
        magic, version = reader.take(_PREAMBLE)
        if magic != _MAGIC:
            raise SnapshotError(f"not an NBD session snapshot (magic {magic!r}, not {_MAGIC!r})")
        if version != SESSION_VERSION:
            raise SnapshotError(
                f"NBD session format version {version} is not supported "
                f"(this node reads version {SESSION_VERSION})"
            )
        name = reader.string("export name")
        description = reader.string("description")
        size, read_only, minimum, preferred, maximum = reader.take(_EXPORT)
        structured, contexts, max_request_size = reader.take(_SESSION)
        if contexts > MAX_META_CONTEXTS:
            raise SnapshotError(f"{contexts} metadata contexts is too many")
        meta = []
        for _ in range(contexts):
            (context_id,) = reader.take(_CONTEXT_ID)
            meta.append((context_id, reader.string("metadata context")))
        (in_flight_length,) = reader.take(_IN_FLIGHT_LENGTH)
        if in_flight_length > max_in_flight:
            raise SnapshotError(
                f"{in_flight_length} bytes of requests in flight is over the limit "
                f"of {max_in_flight}"
            )
        in_flight = reader.bytes(in_flight_length, "requests in flight")
        (partial_length,) = reader.take(_PARTIAL_LENGTH)
        partial = reader.bytes(partial_length, "partial request")
        (present,) = reader.take(_PRESENT)
        rejected = None
        remaining = 0
        if present == 1:
            handle, command, offset, length, error, remaining = reader.take(_REJECTED)
            reason = reader.string("rejection reason")
            try:
                errno = Errno(error)
            except ValueError:
                raise SnapshotError(f"error {error} is not an NBD errno") from None
            rejected = RejectedRequest(handle, _command(command), offset, length, errno, reason)
        elif present != 0:
            raise SnapshotError(f"rejected-request marker {present} is neither 0 nor 1")
        reader.end()
        for flag, label in ((read_only, "read-only"), (structured, "structured replies")):
            if flag not in (0, 1):
                raise SnapshotError(f"{label} flag {flag} is not a boolean")
        return cls(
            export=ExportInfo(
                name,
                size,
                read_only=bool(read_only),
                description=description,
                min_block_size=minimum,
                preferred_block_size=preferred,
                max_block_size=maximum,
            ),
            structured_replies=bool(structured),
            meta_contexts=tuple(meta),
            max_request_size=max_request_size,
            in_flight=in_flight,
            partial=partial,
            rejected=rejected,
            rejected_remaining=remaining,
        )


def encode_request(request: Request) -> bytes:
    """The bytes a client sent for ``request``: what ``SessionSnapshot.in_flight`` holds."""
    header = REQUEST.pack(
        REQUEST_MAGIC,
        int(request.flags),
        int(request.command),
        request.handle,
        request.offset,
        request.length,
    )
    return header + request.data if request.data else header


def _command(value: int) -> Command | int:
    try:
        return Command(value)
    except ValueError:
        return value


def _string(text: str) -> bytes:
    raw = text.encode()
    return _STRING_LENGTH.pack(len(raw)) + raw


class _Reader:
    """Reads fields off a snapshot blob, failing with :class:`SnapshotError`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, layout: struct.Struct) -> tuple[Any, ...]:
        if self._pos + layout.size > len(self._data):
            raise SnapshotError(f"NBD session snapshot truncated at byte {self._pos}")
        values = layout.unpack_from(self._data, self._pos)
        self._pos += layout.size
        return tuple(values)

    def bytes(self, length: int, what: str) -> bytes:
        end = self._pos + length
        if end > len(self._data):
            raise SnapshotError(f"NBD session snapshot truncated in its {what}")
        raw = self._data[self._pos : end]
        self._pos = end
        return raw

    def string(self, what: str) -> str:
        (length,) = self.take(_STRING_LENGTH)
        if length > MAX_STRING_LENGTH:
            raise SnapshotError(f"{what} of {length} bytes is over {MAX_STRING_LENGTH}")
        try:
            return self.bytes(length, what).decode()
        except UnicodeDecodeError:
            raise SnapshotError(f"{what} is not UTF-8") from None

    def end(self) -> None:
        if self._pos != len(self._data):
            raise SnapshotError(
                f"{len(self._data) - self._pos} bytes after the end of the NBD session snapshot"
            )
