"""What the sans-IO connections report: small frozen value objects.

A server connection turns client bytes into the events in the first half of
this module; a client connection turns server bytes into those of the second
half.  Every event is immutable and validated where it is built, so the
layers above can trust its fields (h11's ``_events.py`` is the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ferry.nbd.constants import (
    FERRY_MAX_CONNECTIONS_FIELD,
    BlockState,
    Command,
    CommandFlag,
    Errno,
    OptionReply,
    TransmissionFlag,
)


class ProtocolError(Exception):
    """The peer broke the protocol's framing; the connection must be closed.

    Raised by ``receive_data``.  It is the only exception either connection
    raises for bad input, whatever the bytes.
    """


# -- the server's side --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_block_size: int = 32 * 1024 * 1024
    # At most these transmission flags are advertised (None: all that ferry
    # performs).  A proxy passes on what the server behind it offers, so a
    # client is never told of a command or a flag that server lacks.
    advertise: TransmissionFlag | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a named export cannot be had now (not there, not yet in control, ...)."""

    error: OptionReply
    message: str


@dataclass(frozen=True, slots=True)
class MigrationRequest:
    """The payload of ferry's ``FERRY_OPT_MIGRATE``: "I am the migration source"."""

    version: int
    size: int
    resource: str = ""  # the lease the source holds on the image ("": none)

    def __post_init__(self) -> None:
        if not 0 <= self.version < 1 << 32:
            raise ValueError(f"migration version {self.version} is not a u32")
        if not 0 <= self.size < 1 << 64:
            raise ValueError(f"image size {self.size} is not a u64")


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The client chose an export; transmission starts with the next byte.

    ``migration`` is set when the export was acquired as a migration sender
    (``FERRY_OPT_MIGRATE`` was acknowledged on this connection): the
    connection may then send ``Commit``.  ``flexnbd`` is set for an oldstyle
    connection to a listening export: a possible flexnbd migration sender,
    whose only accepted requests are writes with handle ``.MIRROR.`` and FLUSH.
    """

    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)
    migration: MigrationRequest | None = None
    flexnbd: bool = False


@dataclass(frozen=True, slots=True)
class HandshakeAborted:
    """The client gave up during negotiation (NBD_OPT_ABORT, or EXPORT_NAME of nothing)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed, in-range transmission request the export should perform.

    ``data`` is the payload of a WRITE and empty otherwise.
    """

    handle: int
    command: Command
    flags: CommandFlag
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    """A well-framed request that must be answered with ``error`` and not performed.

    Out of range, too large, a flag not allowed for the command, a write to a
    read-only export, an unknown command: the connection goes on.
    """

    handle: int
    command: int
    offset: int
    length: int
    error: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class Commit:
    """``FERRY_CMD_COMMIT`` from the migration sender: "you have it all; take control".

    Only a connection whose ``HandshakeComplete`` carried ``migration`` emits
    it (elsewhere the command is a ``RejectedRequest`` with EINVAL).  The
    answer -- ``reply_ok`` once the image is durable and this node has
    control, ``reply_error`` otherwise -- is the two-phase commit's ack.
    """

    handle: int
    token: int  # the lease's fencing token, from the request's offset field


@dataclass(frozen=True, slots=True)
class ConnectionLanding:
    """What a listener that can take client connections says about itself.

    The data of the ``FERRY_REP_LANDING`` reply that comes before
    ``FERRY_OPT_CONNECTIONS``' ACK (see ``constants.py``): ``host`` names
    this host and network namespace, ``service_address`` is the
    client-facing address it takes over at the commit ("" for none).
    """

    host: str
    service_address: str = ""

    def to_bytes(self) -> bytes:
        """``FERRY_CONNECTIONS_INFO``: each field as a u16 length, then UTF-8."""
        parts = []
        for text in (self.host, self.service_address):
            raw = text.encode()
            if len(raw) > FERRY_MAX_CONNECTIONS_FIELD:
                raise ValueError(f"{raw[:40]!r}... is over {FERRY_MAX_CONNECTIONS_FIELD} bytes")
            parts += [len(raw).to_bytes(2, "big"), raw]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, blob: bytes) -> ConnectionLanding:
        """The reverse of :meth:`to_bytes`; ValueError for anything else."""
        fields = []
        pos = 0
        for _ in range(2):
            if len(blob) < pos + 2:
                raise ValueError("FERRY_OPT_CONNECTIONS' answer is cut short")
            length = int.from_bytes(blob[pos : pos + 2], "big")
            if length > FERRY_MAX_CONNECTIONS_FIELD or len(blob) < pos + 2 + length:
                raise ValueError("FERRY_OPT_CONNECTIONS' answer has a field out of bounds")
            fields.append(blob[pos + 2 : pos + 2 + length].decode())
            pos += 2 + length
        if pos != len(blob):
            raise ValueError("FERRY_OPT_CONNECTIONS' answer has bytes after its fields")
        return cls(fields[0], fields[1])


@dataclass(frozen=True, slots=True)
class CarriedConnection:
    """``FERRY_CMD_CONNECTION`` from the migration sender: one client connection's checkpoint.

    ``state`` is the payload, not yet parsed (``ferry.handoff.carried``
    reads it); the answer is ``reply_ok`` once the connection is rebuilt.
    """

    handle: int
    state: bytes


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: the client will send nothing more."""


# -- both sides -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: the caller starts TLS on its transport now.

    The reply that acknowledged it is the last byte in the clear.  The
    caller starts TLS (a server as the TLS server, a client as the client),
    then calls the connection's ``tls_started``; until then the connection
    takes no more bytes: a peer that sends any is breaking the protocol (and
    may be trying to slip plaintext past the upgrade).
    """


# -- the client's side --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The server accepted our export; requests may be sent."""

    export_name: str
    size: int
    transmission_flags: int
    structured_replies: bool
    meta_contexts: dict[str, int] = field(default_factory=dict)
    oldstyle: bool = False
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_block_size: int = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class NegotiationFailed:
    """The server refused us during the handshake."""

    error: OptionReply
    message: str


@dataclass(frozen=True, slots=True)
class OptionAnswered:
    """The server's answer to one of the caller's ``extra_options`` (ACK or an error).

    ``option`` is the number as sent (ferry's own options are not in
    ``Option``); ``reply`` is ``ACK`` or an error such as ``ERR_UNSUP``, the
    answer of a server that does not know the option.
    """

    option: int
    reply: OptionReply
    message: str = ""


@dataclass(frozen=True, slots=True)
class OptionData:
    """A reply with data to one of the caller's ``extra_options``, before its ACK or error.

    ``reply`` is the reply type as sent: an extension's own types (below
    2**31, so not errors) are not members of ``OptionReply``.  More may
    follow; the option ends with its ``OptionAnswered``.
    """

    option: int
    reply: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Extent:
    length: int
    flags: BlockState


@dataclass(frozen=True, slots=True)
class Reply:
    """The complete answer to one request (all structured chunks gathered).

    ``data`` holds what a READ returned (holes filled with zeroes);
    ``extents`` what a BLOCK_STATUS returned, keyed by meta context id.
    """

    handle: int
    error: Errno
    data: bytes = b""
    extents: dict[int, tuple[Extent, ...]] = field(default_factory=dict)
    message: str = ""


Event = (
    HandshakeComplete
    | HandshakeAborted
    | Request
    | RejectedRequest
    | Commit
    | CarriedConnection
    | Disconnect
    | StartTLS
    | Negotiated
    | NegotiationFailed
    | OptionAnswered
    | OptionData
    | Reply
)
