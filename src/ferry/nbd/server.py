"""The server side of NBD, sans-IO: client bytes in, events and server bytes out.

The connection keeps these invariants, whatever the client sends:

1. Every ``Request`` it returns may be performed as it stands: a known
   command, only flags that were advertised and are defined for that
   command, ``offset + length <= export.size``, offset and length aligned to
   the export's minimum block size, at most ``max_request_size`` for a READ
   or WRITE, and a WRITE's ``data`` is exactly ``length`` bytes of ``bytes``.
   A well-framed request that breaks any of these becomes a
   ``RejectedRequest`` carrying the errno to answer, and the connection goes
   on.
2. What it holds from the peer is bounded: one option (``MAX_OPTION_LENGTH``,
   and at most ``MAX_HANDSHAKE_OPTIONS`` of them in one handshake),
   less than one request header, and the payload of one WRITE that will be
   performed (at most ``max_request_size``; while it arrives it is held as
   views of the chunks it came in, joined once into the ``Request``, so add
   the bytes of its first chunk that precede it).  The payload of a WRITE
   that will be rejected is counted off as it streams past, never stored, so
   a client cannot make us buffer a 4 GiB write it is not allowed to do --
   and since skipping costs no memory, no WRITE length is a framing error,
   however absurd: the spec wants the connection to survive an oversized
   request.
3. Broken framing -- a bad magic, client flags we do not know, an option too
   long to buffer -- raises ``ProtocolError``, the only exception
   ``receive_data`` raises for any input.  The connection is then broken and
   every later call raises again: after a framing error nothing in the stream
   can be trusted to be where the peer meant it.
4. Events come out in the order of the bytes that caused them, and the same
   bytes give the same events however they are split into chunks.
5. Handshake output (greeting, option replies, export information) is queued
   in order and drained by ``data_to_send``; the caller writes it before any
   reply to a request returned by the same ``receive_data`` call.
   Transmission replies are never queued: ``reply_*`` build and return them,
   so requests may be answered out of order and a READ's data is never copied
   through this object.
6. After ``HandshakeAborted`` or ``Disconnect`` the connection is closed and
   further input is ignored, not an error: the session is over (the client
   ended it, or chose an export we cannot serve and cannot be told why), and
   the caller is closing the transport, so stray bytes are nobody's concern.

States, and what moves the connection between them::

    state         on                                   -> state         event
    ------------  -----------------------------------  -- ------------  ----------------
    CLIENT_FLAGS  known flags with FIXED_NEWSTYLE      -> OPTIONS
    OPTIONS       EXPORT_NAME / GO of a served export  -> TRANSMISSION  HandshakeComplete
                  EXPORT_NAME we cannot serve, ABORT   -> CLOSED        HandshakeAborted
                  STARTTLS, acknowledged               -> STARTING_TLS  StartTLS
                  any other option (answered)          -> OPTIONS
    STARTING_TLS  the caller's ``tls_started()``       -> OPTIONS
                  any byte                             -> BROKEN        ProtocolError
    TRANSMISSION  a request, or a WRITE with payload   -> TRANSMISSION  Request|Rejected
                  FERRY_CMD_COMMIT from the sender     -> TRANSMISSION  Commit|Rejected
                  FERRY_CMD_CONNECTION, payload here   -> TRANSMISSION  CarriedConnection
                                                                        |Rejected
                  a WRITE whose payload is not here    -> PAYLOAD
                  DISC                                 -> CLOSED        Disconnect
    PAYLOAD       the last byte of that payload        -> TRANSMISSION  Request|Rejected
                                                                        |CarriedConnection
    (any)         broken framing                       -> BROKEN        ProtocolError

ferry's migration extension (``constants.py``), with a ``MigrationCatalog``:

    FERRY_OPT_MIGRATE   answer                        the connection afterwards
    ------------------  ----------------------------  -------------------------------------
    data not 12 bytes   ERR_INVALID                   as before
    a second time       ERR_INVALID                   still the sender
    unknown version     ERR_UNSUP, with a message     as before (a plain client)
    catalog refuses     its error and message         as before (a plain client)
    catalog admits      ACK                           the sender: lookups go through
                                                      ``lookup_sender``, ``HandshakeComplete``
                                                      carries ``migration``, and
                                                      FERRY_CMD_COMMIT is a ``Commit``

    FERRY_OPT_CONNECTIONS  answer                     the connection afterwards
    ---------------------  -------------------------  -------------------------------------
    before MIGRATE's ACK   ERR_INVALID                as before
    with data, or twice    ERR_INVALID                as before
    catalog refuses        its error and message      as before
    catalog can            FERRY_REP_LANDING with     FERRY_CMD_CONNECTION is a
                           its ConnectionLanding,     ``CarriedConnection``
                           then ACK

TLS (``tls``, the spec's modes as ``TLSMode``):

    option, before TLS is on      OFF            ON             REQUIRE
    ----------------------------  -------------  -------------  ---------------------
    STARTTLS (no data)            ERR_POLICY     ACK, StartTLS  ACK, StartTLS
    STARTTLS with data            ERR_INVALID    ERR_INVALID    ERR_INVALID
    ABORT                         as usual       as usual       as usual
    EXPORT_NAME                   as usual       as usual       CLOSED, HandshakeAborted
    any other                     as usual       as usual       ERR_TLS_REQD

Once TLS is on, a second STARTTLS is ERR_INVALID and every other option is
answered as usual.  The ACK forgets what was negotiated in the clear
(structured replies, metadata contexts, an acknowledged FERRY_OPT_MIGRATE
and FERRY_OPT_CONNECTIONS),
as the spec asks: a man in the middle could have chosen it.  Bytes that come
after STARTTLS and before ``tls_started()`` -- in the same chunk or a later
one -- break the connection: the caller runs TLS from the ACK on, so they
can only be plaintext the client had no right to send.  Who the peer is
(its certificate) is the caller's business; the parser only knows that TLS
is on.  Oldstyle has no options, so it cannot be combined with TLS.

Elsewhere (no catalog, or no ACK) FERRY_OPT_MIGRATE is ERR_UNSUP and
FERRY_CMD_COMMIT a ``RejectedRequest`` with EINVAL, as is
FERRY_CMD_CONNECTION (its payload counted off unread) without the
connections' ACK.  The commit never takes
the fast path of READ and WRITE: it is tested only after that path missed.

With a ``Locator`` the connection answers ``FERRY_OPT_LOCATE`` (see
``ferry.nbd.locate``): a FERRY_REP_LOCATION for each place the locator
names, then ACK; the locator's refusal as an error; ERR_INVALID for a
request that does not parse.  Without one it is ERR_UNSUP.

An oldstyle connection starts in TRANSMISSION (or, when the default export is
refused, in CLOSED) and has its ``HandshakeComplete`` (or ``HandshakeAborted``)
waiting for the first ``receive_data`` call, which may be ``receive_data(b"")``.

flexnbd's migration (``flexnbd mirror`` into an oldstyle listener) has no
option to say "I am the sender".  So an oldstyle connection with a
``MigrationCatalog``, whose default export the catalog refuses but
``lookup_sender`` admits (a listening export), is *mirror-only*: it gets the
hello (with the size, which the sender checks), ``HandshakeComplete`` has
``flexnbd=True``, and from then on the only requests it may make are WRITEs
whose handle is ``FLEXNBD_MIRROR_HANDLE`` (and, since the hello advertises
them, WRITE_ZEROES and TRIM with that handle) and FLUSH; everything else is a
``RejectedRequest`` with EPERM (a WRITE's payload counted off unread).  Which
mirror-only connection is *the* sender, and DISC as the commit, are the
caller's: the first to send a mirror WRITE, while the export is listening.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import types
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, Protocol

from ferry.nbd.constants import (
    BASE_ALLOCATION,
    BLOCK_DESCRIPTOR,
    CLIENT_FLAGS,
    CLISERV_MAGIC,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    FERRY_CMD_COMMIT,
    FERRY_CMD_CONNECTION,
    FERRY_MAX_CONNECTION,
    FERRY_MAX_RESOURCE,
    FERRY_MIGRATE_REQUEST,
    FERRY_MIGRATE_VERSION,
    FERRY_OPT_CONNECTIONS,
    FERRY_OPT_MIGRATE,
    FERRY_REP_LANDING,
    FLEXNBD_MIRROR_HANDLE,
    GREETING_NEWSTYLE,
    GREETING_OLDSTYLE,
    IHAVEOPT,
    MAX_HANDSHAKE_OPTIONS,
    MAX_OPTION_LENGTH,
    MAX_REQUEST_SIZE,
    MAX_STRING_LENGTH,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    TLSMode,
    TransmissionFlag,
)
from ferry.nbd.events import (
    CarriedConnection,
    Commit,
    ConnectionLanding,
    Disconnect,
    Event,
    ExportInfo,
    Extent,
    HandshakeAborted,
    HandshakeComplete,
    MigrationRequest,
    ProtocolError,
    Refusal,
    RejectedRequest,
    Request,
    StartTLS,
)
from ferry.nbd.locate import (
    FERRY_OPT_LOCATE,
    FERRY_REP_LOCATION,
    Location,
    decode_locate_request,
    encode_location,
)
from ferry.nbd.session import SessionSnapshot, SnapshotError

__all__ = [
    "BASE_ALLOCATION_ID",
    "ExportCatalog",
    "Locator",
    "MigrationCatalog",
    "ServerConnection",
    "transmission_flags",
]

#: The id ferry gives ``base:allocation`` when a client selects it.  Ids are
#: per connection and opaque to the client; ferry has only one context.
BASE_ALLOCATION_ID: Final = 1

_HEADER_SIZE: Final = REQUEST.size
_NO_LIMIT: Final = 1 << 64  # longer than any u32 length: "no cap but the export size"

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_INFO_EXPORT: Final = struct.Struct(">HQH")  # type, size, transmission flags
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # type, minimum, preferred, maximum
_ERROR_PAYLOAD: Final = struct.Struct(">IH")  # error, message length

_COMMANDS: Final[dict[int, Command]] = {int(c): c for c in Command}
# CommandFlag(n) builds a pseudo-member each time; a request passes its flags
# through here on the hot path, so every combination of the five defined bits
# is made once.
_FLAGS: Final = tuple(CommandFlag(n) for n in range(1 << len(CommandFlag)))
_WRITING: Final = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
# Requests followed by a payload: counted off unread when rejected.
_PAYLOAD_COMMANDS: Final = frozenset({int(Command.WRITE), FERRY_CMD_CONNECTION})
_CAPPED: Final = frozenset({Command.READ, Command.WRITE})  # their lengths are payloads
_FILLING: Final = frozenset({Command.WRITE, Command.WRITE_ZEROES})  # past the end: ENOSPC
_ZERO_PADDING: Final = bytes(EXPORT_NAME_PADDING)

# The replies built for every request, as plain ints and whole structs: an
# enum member costs ~130 ns to look up and a struct more to concatenate, and
# a 4 KiB read is answered in a few microseconds.
_SIMPLE_MAGIC: Final = int(SIMPLE_REPLY_MAGIC)
_STRUCTURED_MAGIC: Final = int(STRUCTURED_REPLY_MAGIC)
_DONE: Final = int(ReplyFlag.DONE)
_TYPE_NONE: Final = int(ReplyType.NONE)
_TYPE_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
# A structured reply header followed by the OFFSET_DATA chunk's offset.
_OFFSET_DATA_HEADER: Final = struct.Struct(STRUCTURED_REPLY.format + "Q")

# What every export offers, and what only a writable one adds.
_ALWAYS: Final = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.CAN_MULTI_CONN
)
_WRITABLE: Final = (
    TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
# The only flag a commit may carry: FUA is "valid for all commands" once
# advertised, and a commit is durable anyway.
_COMMIT_FLAGS: Final = int(CommandFlag.FUA)


class ExportCatalog(Protocol):
    """Where the handshake finds exports; the data plane's server implements it."""

    def lookup(self, name: str) -> ExportInfo | Refusal:
        """The export a client may use under ``name`` ("" is the default), or why not."""
        ...

    def listing(self) -> Sequence[ExportInfo]:
        """The exports NBD_OPT_LIST shows."""
        ...


class MigrationCatalog(Protocol):
    """What a ferry listener adds to the catalog: admitting a migration sender.

    A connection given one answers ``FERRY_OPT_MIGRATE``; without one it
    answers ERR_UNSUP, as any NBD server does.
    """

    def admit_migration(self, request: MigrationRequest) -> Refusal | None:
        """None to acknowledge ``FERRY_OPT_MIGRATE``, or why this node takes no migration now."""
        ...

    def lookup_sender(self, name: str) -> ExportInfo | Refusal:
        """The export under ``name`` as the acknowledged migration sender sees it, or why not.

        Used instead of ``ExportCatalog.lookup`` for every export lookup of
        a connection whose ``FERRY_OPT_MIGRATE`` was acknowledged, so a
        listening export, which refuses ordinary clients, admits its sender.
        """
        ...

    def connection_landing(self) -> ConnectionLanding | Refusal:
        """Whether this node can rebuild the sender's client connections (and who it is)."""
        ...


class Locator(Protocol):
    """Where an export has gone: a connection given one answers ``FERRY_OPT_LOCATE``.

    Without one the option is ERR_UNSUP, as on any NBD server.
    """

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        """Where the export under ``name`` is served now, best first; empty: here."""
        ...


def transmission_flags(export: ExportInfo, structured: bool) -> TransmissionFlag:
    """The flags that advertise exactly what ferry performs on ``export``.

    DF is only meaningful with structured replies (the spec forbids it
    otherwise); a read-only export advertises no write-ish command, so a
    well-behaved client never sends one.  An export with ``advertise`` (a
    proxy's) offers no flag outside it, and so accepts no command flag the
    server behind it would not.
    """
    flags = _ALWAYS | (TransmissionFlag.READ_ONLY if export.read_only else _WRITABLE)
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if export.advertise is not None:
        flags &= export.advertise | TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
    return flags


def _request_builder() -> Callable[[int, Command, CommandFlag, int, int, bytes], Request]:
    """A constructor for ``Request`` that skips the frozen dataclass ``__init__``.

    That ``__init__`` sets each of six fields through ``object.__setattr__``,
    and on the hot path it cost more than all the parsing around it (about
    2.5 times what storing the slots directly costs).  The shortcut is only
    taken while ``Request`` is exactly what it assumes -- these six slots, in
    this order, and no ``__post_init__`` to validate them -- so a change to
    the event falls back to the real constructor instead of skipping its checks.
    """
    names = tuple(field.name for field in dataclasses.fields(Request))
    slots = [vars(Request).get(name) for name in names]
    if (
        names != ("handle", "command", "flags", "offset", "length", "data")
        or hasattr(Request, "__post_init__")
        or not all(isinstance(slot, types.MemberDescriptorType) for slot in slots)
    ):
        return Request
    new = object.__new__
    set_handle, set_command, set_flags, set_offset, set_length, set_data = (
        slot.__set__  # type: ignore[union-attr]
        for slot in slots
    )

    def build(
        handle: int, command: Command, flags: CommandFlag, offset: int, length: int, data: bytes
    ) -> Request:
        request: Request = new(Request)
        set_handle(request, handle)
        set_command(request, command)
        set_flags(request, flags)
        set_offset(request, offset)
        set_length(request, length)
        set_data(request, data)
        return request

    return build


_build_request: Final = _request_builder()


class _State(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    STARTING_TLS = "starting TLS"
    TRANSMISSION = "transmission"
    PAYLOAD = "write payload"
    CLOSED = "closed"
    BROKEN = "broken"


class _Invalid(Exception):
    """An option payload that does not parse: answered with ERR_INVALID, not a close."""


class _Reader:
    """Reads the fields of one option payload, failing with ``_Invalid``."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def u16(self) -> int:
        return int(self._unpack(_U16))

    def u32(self) -> int:
        return int(self._unpack(_U32))

    def string(self, length: int) -> str:
        if length > MAX_STRING_LENGTH:
            raise _Invalid(f"string of {length} bytes is over the limit of {MAX_STRING_LENGTH}")
        end = self._pos + length
        if end > len(self._data):
            raise _Invalid("string runs past the end of the option")
        raw = self._data[self._pos : end]
        self._pos = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("string is not UTF-8") from None

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _Invalid(
                f"{len(self._data) - self._pos} bytes left over at the end of the option"
            )

    def _unpack(self, layout: struct.Struct) -> int:
        if self._pos + layout.size > len(self._data):
            raise _Invalid("option is shorter than its fields")
        (value,) = layout.unpack_from(self._data, self._pos)
        self._pos += layout.size
        return int(value)


def _option_name(option: int) -> str:
    if option == FERRY_OPT_MIGRATE:
        return "FERRY_OPT_MIGRATE"
    if option == FERRY_OPT_LOCATE:
        return "FERRY_OPT_LOCATE"
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return f"option {option}"


def _encode_message(message: str) -> bytes:
    """A human-readable message cut to the protocol's string limit on a character boundary."""
    raw = message.encode("utf-8", "replace")
    if len(raw) > MAX_STRING_LENGTH:
        raw = raw[:MAX_STRING_LENGTH].decode("utf-8", "ignore").encode("utf-8")
    return raw


class ServerConnection:
    """One client's NBD session, from greeting to disconnect, without any I/O.

    ``receive_data`` turns the client's bytes into events; ``data_to_send``
    drains what the handshake has to say; ``reply_*`` build transmission
    replies for the caller to write whenever each request is done.

    With ``oldstyle=True`` there is no negotiation: the default export ("") is
    looked up at once and the 152-byte oldstyle greeting queued.  The
    ``HandshakeComplete`` is then waiting for the first ``receive_data`` call
    (``receive_data(b"")`` is enough), so the caller handles it where it
    handles every other event.  If the catalog refuses the default export,
    nothing is queued to send, the connection is closed at once, and that
    first call returns ``[HandshakeAborted(reason)]``: oldstyle has no way to
    tell the client why, and raising from ``__init__`` would make the caller
    handle one refusal in two places.

    With a ``migration`` catalog the connection speaks ferry's migration
    extension: it answers ``FERRY_OPT_MIGRATE`` (ACK when the catalog admits
    the sender, its refusal otherwise), looks every export up through
    ``lookup_sender`` from then on, reports the sender in
    ``HandshakeComplete.migration``, and turns ``FERRY_CMD_COMMIT`` into a
    ``Commit`` event.  Without one, the option is ERR_UNSUP and the command
    an unknown one, as on any NBD server.

    ``tls`` is the server's TLS mode (see the module doc); after a
    ``StartTLS`` event the caller starts TLS and calls ``tls_started``.
    """

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        migration: MigrationCatalog | None = None,
        locator: Locator | None = None,
        oldstyle: bool = False,
        max_request_size: int = MAX_REQUEST_SIZE,
        tls: TLSMode = TLSMode.OFF,
    ) -> None:
        if not 0 < max_request_size < 1 << 32:
            raise ValueError(f"max_request_size must be in 1..2**32-1, not {max_request_size}")
        if oldstyle and tls is not TLSMode.OFF:
            raise ValueError("oldstyle negotiation has no NBD_OPT_STARTTLS: it cannot use TLS")
        self._tls_mode = tls
        self._tls = False  # TLS is on: STARTTLS was acknowledged and the caller started it
        self._catalog = catalog
        self._migration_catalog = migration
        self._locator = locator
        # The FERRY_OPT_MIGRATE request acknowledged on this connection: from
        # then on it is the migration sender.
        self._sender: MigrationRequest | None = None
        # FERRY_OPT_CONNECTIONS acknowledged: the sender may carry connections.
        self._carries = False
        self._max_request_size = max_request_size
        self._state = _State.CLIENT_FLAGS
        self._broken_reason = ""
        self._buffer = b""  # unparsed input: part of a header or of an option
        self._pending: list[Event] = []  # events waiting for the next receive_data
        self._out = bytearray()

        self._no_zeroes = False
        self._structured = False
        # What SET_META_CONTEXT chose, and for which export (its canonical name):
        # the contexts only hold if the client then goes to that same export.
        self._meta_contexts: dict[int, str] = {}
        self._meta_export: str | None = None

        self._export: ExportInfo | None = None
        self._options = 0  # options received in this handshake (MAX_HANDSHAKE_OPTIONS)
        self._handshake_done = False
        self._flags = TransmissionFlag(0)

        # Set when transmission starts; see _start_transmission.
        self._size = 0
        self._align_mask = 0
        self._forbidden: dict[Command, int] = {}  # flag bits each command may not carry
        self._fast: dict[int, tuple[int, int]] = {}

        # A WRITE whose payload is still arriving: either its fields and the
        # chunks so far (it will be performed), or the rejection to emit once
        # the payload has streamed past (it will not).
        self._need = 0
        self._write: tuple[int, int, int, int] | None = None
        self._payload_command = int(Command.WRITE)  # whose payload _write collects
        self._chunks: list[bytes | memoryview] = []
        self._held: RejectedRequest | None = None
        # flexnbd's migration into an oldstyle listener: see the module doc.
        self._mirror_only = False

        if oldstyle:
            self._begin_oldstyle()
        else:
            self._out += GREETING_NEWSTYLE.pack(
                NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
            )

    # -- what the caller may look at ---------------------------------------------

    @property
    def handshake_done(self) -> bool:
        """True from the moment transmission starts (and after it ends)."""
        return self._handshake_done

    @property
    def closed(self) -> bool:
        """True once nothing more will be parsed: aborted, disconnected or broken."""
        return self._state is _State.CLOSED or self._state is _State.BROKEN

    @property
    def buffered(self) -> int:
        """Bytes of the peer's held here: a request (or option) received only in part.

        What a caller counts against its budget for untrusted input; 0 when
        everything received so far has become events.
        """
        write = self._write
        partial = 0 if write is None else write[3] - self._need
        return len(self._buffer) + partial

    @property
    def export(self) -> ExportInfo | None:
        """The export chosen by the handshake; None before it completes."""
        return self._export

    @property
    def structured_replies(self) -> bool:
        return self._structured

    @property
    def migration(self) -> MigrationRequest | None:
        """The acknowledged ``FERRY_OPT_MIGRATE``: set once this connection is the sender."""
        return self._sender

    @property
    def mirror_only(self) -> bool:
        """True for an oldstyle connection admitted only as a possible flexnbd sender."""
        return self._mirror_only

    def admit_as_client(self) -> None:
        """The export this mirror-only connection waited on now serves: judge it as a client."""
        self._mirror_only = False

    @property
    def flags(self) -> TransmissionFlag:
        """The transmission flags sent to the client (0 before the handshake is done)."""
        return self._flags

    @property
    def tls(self) -> bool:
        """True once TLS is on (``tls_started`` was called after a ``StartTLS`` event)."""
        return self._tls

    def tls_started(self) -> None:
        """The caller has started TLS on its transport: option haggling goes on, encrypted."""
        if self._state is not _State.STARTING_TLS:
            raise RuntimeError(f"no TLS upgrade is pending (state: {self._state.value})")
        self._tls = True
        self._state = _State.OPTIONS

    # -- bytes in, events out --------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse ``data`` (any split of the stream) and return the events it completes.

        Raises ``ProtocolError`` on broken framing, and on every call after one.
        Events already parsed from the same call are dropped with the error:
        none of them has been answered, and the connection is going away.
        """
        state = self._state
        if state is _State.BROKEN:
            raise ProtocolError(f"connection already broken: {self._broken_reason}")
        events = self._pending
        self._pending = []
        if state is _State.CLOSED or not data:
            return events
        if type(data) is not bytes:
            data = bytes(data)
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos = 0
        end = len(data)
        while pos < end:
            if state is _State.TRANSMISSION:
                pos = self._parse_requests(data, pos, events)
                if self._state is _State.TRANSMISSION:
                    break  # less than a header left
            elif state is _State.PAYLOAD:
                pos = self._take_payload(data, pos, events)
            elif state is _State.OPTIONS:
                if end - pos < OPTION_HEADER.size:
                    break
                magic, option, length = OPTION_HEADER.unpack_from(data, pos)
                if magic != IHAVEOPT:
                    self._fail(f"option magic {magic:#x} is not IHAVEOPT")
                if length > MAX_OPTION_LENGTH:
                    self._fail(
                        f"{_option_name(option)} of {length} bytes is over {MAX_OPTION_LENGTH}"
                    )
                start = pos + OPTION_HEADER.size
                if end - start < length:
                    break
                pos = start + length
                self._option(option, data[start:pos], events)
            elif state is _State.CLIENT_FLAGS:
                if end - pos < CLIENT_FLAGS.size:
                    break
                (flags,) = CLIENT_FLAGS.unpack_from(data, pos)
                pos += CLIENT_FLAGS.size
                self._client_flags(flags)
            elif state is _State.STARTING_TLS:
                self._fail(
                    f"{end - pos} bytes in the clear after NBD_OPT_STARTTLS, before TLS started"
                )
            else:  # CLOSED: what follows an abort or a DISC is ignored
                pos = end
            state = self._state
        if pos < end:
            self._buffer = data[pos:]
        return events

    def data_to_send(self) -> bytes:
        """Drain the handshake output queued so far (empty once it is all sent)."""
        if not self._out:
            return b""  # the common case, once per receive_data in transmission
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- transmission replies: built on demand, never queued ---------------------

    def reply_ok(self, handle: int) -> bytes:
        """Success without data (with structured replies: a NONE chunk with DONE)."""
        if self._structured:
            return STRUCTURED_REPLY.pack(_STRUCTURED_MAGIC, _DONE, _TYPE_NONE, handle, 0)
        return SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, handle)

    def reply_error(self, handle: int, error: Errno, message: str = "") -> bytes:
        """A failure; with structured replies the message reaches the client's user."""
        if error == Errno.OK:
            raise ValueError("an error reply needs a non-zero error")
        if not self._structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        text = _encode_message(message)
        return (
            STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC,
                ReplyFlag.DONE,
                ReplyType.ERROR,
                handle,
                _ERROR_PAYLOAD.size + len(text),
            )
            + _ERROR_PAYLOAD.pack(error, len(text))
            + text
        )

    def reply_read(
        self, handle: int, offset: int, data: bytes | bytearray
    ) -> list[bytes | bytearray]:
        """A successful READ as ``[header, data]``, for ``writeSequence`` without a copy.

        With structured replies it is one OFFSET_DATA chunk marked DONE: the
        data is already read, so no error can follow it.  A zero-length read
        has no content chunk to send (OFFSET_DATA must carry a byte), so it
        gets a NONE chunk.
        """
        if not self._structured:
            return [SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, handle), data]
        if not data:
            return [self.reply_ok(handle), b""]
        length = _U64.size + len(data)
        if length >= 1 << 32:
            raise ValueError(f"{len(data)} bytes do not fit in one structured chunk")
        header = _OFFSET_DATA_HEADER.pack(
            _STRUCTURED_MAGIC, _DONE, _TYPE_OFFSET_DATA, handle, length, offset
        )
        return [header, data]

    def reply_block_status(self, handle: int, context_id: int, extents: Sequence[Extent]) -> bytes:
        """The BLOCK_STATUS chunk (marked DONE) for ferry's one metadata context."""
        if not self._structured:
            raise ValueError("BLOCK_STATUS needs structured replies")
        if not extents:
            raise ValueError("a block status reply needs at least one extent")
        body = b"".join([BLOCK_DESCRIPTOR.pack(e.length, e.flags) for e in extents])
        return (
            STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC,
                ReplyFlag.DONE,
                ReplyType.BLOCK_STATUS,
                handle,
                _U32.size + len(body),
            )
            + _U32.pack(context_id)
            + body
        )

    # -- handshake ----------------------------------------------------------------------

    def _fail(self, reason: str) -> NoReturn:
        self._state = _State.BROKEN
        self._broken_reason = reason
        self._buffer = b""
        self._chunks = []
        raise ProtocolError(reason)

    def _begin_oldstyle(self) -> None:
        found = self._catalog.lookup("")
        if isinstance(found, Refusal) and self._migration_catalog is not None:
            # Perhaps a flexnbd sender: admitted, but only for its mirror writes.
            as_sender = self._migration_catalog.lookup_sender("")
            if not isinstance(as_sender, Refusal):
                found = as_sender
                self._mirror_only = True
        if isinstance(found, Refusal):
            self._state = _State.CLOSED
            self._pending.append(HandshakeAborted(f"default export refused: {found.message}"))
            return
        self._out += GREETING_OLDSTYLE.pack(
            NBDMAGIC, CLISERV_MAGIC, found.size, transmission_flags(found, False)
        )
        self._start_transmission(found, self._pending)

    def _client_flags(self, flags: int) -> None:
        unknown = flags & ~_KNOWN_CLIENT_FLAGS
        if unknown:
            self._fail(f"unknown client flags {unknown:#x}")
        if not flags & ClientFlag.FIXED_NEWSTYLE:
            self._fail("client does not speak fixed newstyle")
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._state = _State.OPTIONS

    def _reply(self, option: int, reply: OptionReply | int, payload: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _error(self, option: int, reply: OptionReply, message: str) -> None:
        self._reply(option, reply, _encode_message(message))

    def _option(self, option: int, payload: bytes, events: list[Event]) -> None:
        self._options += 1
        if self._options > MAX_HANDSHAKE_OPTIONS:
            self._fail(f"more than {MAX_HANDSHAKE_OPTIONS} options in one handshake")
        if (
            self._tls_mode is TLSMode.REQUIRE
            and not self._tls
            and option != Option.STARTTLS
            and option != Option.ABORT
        ):
            if option == Option.EXPORT_NAME:
                # No error reply exists for EXPORT_NAME: the spec says close.
                self._abort_handshake("NBD_OPT_EXPORT_NAME before TLS: TLS is required", events)
            else:
                self._error(
                    option,
                    OptionReply.ERR_TLS_REQD,
                    f"{_option_name(option)}: TLS is required: send NBD_OPT_STARTTLS first",
                )
            return
        try:
            if option == Option.EXPORT_NAME:
                self._export_name(payload, events)
            elif option == Option.ABORT:
                # The spec asks servers to ignore data sent with ABORT.
                self._reply(option, OptionReply.ACK)
                self._state = _State.CLOSED
                events.append(HandshakeAborted("client sent NBD_OPT_ABORT"))
            elif option == Option.LIST:
                self._list(payload)
            elif option == Option.INFO or option == Option.GO:
                self._info(option, payload, events)
            elif option == Option.STRUCTURED_REPLY:
                self._structured_reply(payload)
            elif option == Option.LIST_META_CONTEXT or option == Option.SET_META_CONTEXT:
                self._meta_context(option, payload)
            elif option == FERRY_OPT_MIGRATE and self._migration_catalog is not None:
                self._migrate(payload)
            elif option == FERRY_OPT_CONNECTIONS and self._migration_catalog is not None:
                self._connections(payload)
            elif option == FERRY_OPT_LOCATE and self._locator is not None:
                self._locate(payload)
            elif option == Option.STARTTLS:
                self._starttls(payload, events)
            else:
                # EXTENDED_HEADERS and numbers we have never heard of.
                self._error(
                    option, OptionReply.ERR_UNSUP, f"{_option_name(option)} is not supported"
                )
        except _Invalid as invalid:
            self._error(option, OptionReply.ERR_INVALID, f"{_option_name(option)}: {invalid}")

    def _starttls(self, payload: bytes, events: list[Event]) -> None:
        if payload:
            raise _Invalid("NBD_OPT_STARTTLS takes no data")
        if self._tls_mode is TLSMode.OFF:
            self._error(Option.STARTTLS, OptionReply.ERR_POLICY, "TLS is off on this server")
            return
        if self._tls:
            raise _Invalid("TLS is already on")
        self._reply(Option.STARTTLS, OptionReply.ACK)
        # Nothing chosen in the clear survives the upgrade (the spec's rule).
        self._structured = False
        self._meta_contexts = {}
        self._meta_export = None
        self._sender = None
        self._carries = False
        self._state = _State.STARTING_TLS
        events.append(StartTLS())

    def _export_name(self, payload: bytes, events: list[Event]) -> None:
        # EXPORT_NAME has no error reply: all we can do with a bad one is close.
        try:
            name = _Reader(payload).string(len(payload))
        except _Invalid as invalid:
            self._abort_handshake(f"NBD_OPT_EXPORT_NAME: {invalid}", events)
            return
        found = self._lookup(name)
        if isinstance(found, Refusal):
            self._abort_handshake(f"export {name!r} refused: {found.message}", events)
            return
        flags = transmission_flags(found, self._structured)
        self._out += EXPORT_NAME_REPLY.pack(found.size, flags)
        if not self._no_zeroes:
            self._out += _ZERO_PADDING
        self._start_transmission(found, events)

    def _lookup(self, name: str) -> ExportInfo | Refusal:
        """The export under ``name`` as this connection may have it (as the sender, once acked)."""
        if self._sender is not None and self._migration_catalog is not None:
            return self._migration_catalog.lookup_sender(name)
        return self._catalog.lookup(name)

    def _locate(self, payload: bytes) -> None:
        """``FERRY_OPT_LOCATE``: where the export is now (see ``ferry.nbd.locate``)."""
        try:
            name = decode_locate_request(payload)
        except ValueError as error:
            raise _Invalid(str(error)) from None
        assert self._locator is not None
        found = self._locator.locate(name)
        if isinstance(found, Refusal):
            self._error(FERRY_OPT_LOCATE, found.error, found.message)
            return
        for location in found:
            self._reply(FERRY_OPT_LOCATE, FERRY_REP_LOCATION, encode_location(location))
        self._reply(FERRY_OPT_LOCATE, OptionReply.ACK)

    def _migrate(self, payload: bytes) -> None:
        """``FERRY_OPT_MIGRATE``: validate, then let the catalog admit or refuse the sender."""
        option = FERRY_OPT_MIGRATE
        fixed = FERRY_MIGRATE_REQUEST.size
        if not fixed <= len(payload) <= fixed + FERRY_MAX_RESOURCE:
            raise _Invalid(
                f"{len(payload)} bytes of data, not {fixed} plus at most "
                f"{FERRY_MAX_RESOURCE} of lease name"
            )
        if self._sender is not None:
            raise _Invalid("already acknowledged on this connection")
        version, size = FERRY_MIGRATE_REQUEST.unpack_from(payload)
        try:
            resource = payload[fixed:].decode()
        except UnicodeDecodeError:
            raise _Invalid("the lease name is not UTF-8") from None
        if version != FERRY_MIGRATE_VERSION:
            self._error(
                option,
                OptionReply.ERR_UNSUP,
                f"migration protocol version {version} is not supported "
                f"(this node speaks version {FERRY_MIGRATE_VERSION})",
            )
            return
        request = MigrationRequest(version, size, resource)
        assert self._migration_catalog is not None
        refusal = self._migration_catalog.admit_migration(request)
        if refusal is not None:
            self._error(option, refusal.error, refusal.message)
            return
        self._sender = request
        self._reply(option, OptionReply.ACK)

    def _connections(self, payload: bytes) -> None:
        """``FERRY_OPT_CONNECTIONS``: the sender asks whether its clients may come along."""
        if self._sender is None:
            raise _Invalid("only after FERRY_OPT_MIGRATE was acknowledged")
        if payload:
            raise _Invalid(f"{len(payload)} bytes of data, not none")
        if self._carries:
            raise _Invalid("already acknowledged on this connection")
        assert self._migration_catalog is not None
        landing = self._migration_catalog.connection_landing()
        if isinstance(landing, Refusal):
            self._error(FERRY_OPT_CONNECTIONS, landing.error, landing.message)
            return
        self._carries = True
        self._reply(FERRY_OPT_CONNECTIONS, FERRY_REP_LANDING, landing.to_bytes())
        self._reply(FERRY_OPT_CONNECTIONS, OptionReply.ACK)

    def _abort_handshake(self, reason: str, events: list[Event]) -> None:
        self._state = _State.CLOSED
        events.append(HandshakeAborted(reason))

    def _list(self, payload: bytes) -> None:
        if payload:
            raise _Invalid("NBD_OPT_LIST takes no data")
        for export in self._catalog.listing():
            name = export.name.encode("utf-8")
            self._reply(Option.LIST, OptionReply.SERVER, _U32.pack(len(name)) + name)
        self._reply(Option.LIST, OptionReply.ACK)

    def _info(self, option: int, payload: bytes, events: list[Event]) -> None:
        reader = _Reader(payload)
        name = reader.string(reader.u32())
        count = reader.u16()
        requests = [reader.u16() for _ in range(count)]
        reader.end()
        found = self._lookup(name)
        if isinstance(found, Refusal):
            self._error(option, found.error, found.message)
            return
        flags = transmission_flags(found, self._structured)
        self._reply(option, OptionReply.INFO, _INFO_EXPORT.pack(Info.EXPORT, found.size, flags))
        if Info.NAME in requests:
            self._reply(option, OptionReply.INFO, _U16.pack(Info.NAME) + found.name.encode())
        if Info.DESCRIPTION in requests and found.description:
            description = _encode_message(found.description)
            self._reply(option, OptionReply.INFO, _U16.pack(Info.DESCRIPTION) + description)
        # Always sent: clients that did not ask still learn our limits, and
        # the maximum is what this connection enforces, not just the export's.
        self._reply(
            option,
            OptionReply.INFO,
            _INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE,
                found.min_block_size,
                found.preferred_block_size,
                min(found.max_block_size, self._max_request_size),
            ),
        )
        self._reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._start_transmission(found, events)

    def _structured_reply(self, payload: bytes) -> None:
        if payload:
            raise _Invalid("NBD_OPT_STRUCTURED_REPLY takes no data")
        if self._structured:
            raise _Invalid("structured replies are already negotiated")
        self._structured = True
        self._reply(Option.STRUCTURED_REPLY, OptionReply.ACK)

    def _meta_context(self, option: int, payload: bytes) -> None:
        setting = option == Option.SET_META_CONTEXT
        if setting:
            # SET replaces the selection even when it fails.
            self._meta_contexts = {}
            self._meta_export = None
        reader = _Reader(payload)
        name = reader.string(reader.u32())
        count = reader.u32()
        queries = [reader.string(reader.u32()) for _ in range(count)]
        reader.end()
        if setting and not self._structured:
            raise _Invalid("metadata contexts need structured replies first")
        found = self._lookup(name)
        if isinstance(found, Refusal):
            self._error(option, found.error, found.message)
            return
        if setting:
            # "base:" is a wildcard only for LIST; SET must ignore it.
            chosen = BASE_ALLOCATION in queries
        else:
            chosen = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        if chosen:
            context_id = BASE_ALLOCATION_ID if setting else 0  # LIST ids are reserved: 0
            self._reply(
                option,
                OptionReply.META_CONTEXT,
                _U32.pack(context_id) + BASE_ALLOCATION.encode(),
            )
        if setting:
            self._meta_export = found.name
            if chosen:
                self._meta_contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION}
        self._reply(option, OptionReply.ACK)

    def _start_transmission(self, export: ExportInfo, events: list[Event]) -> None:
        meta = self._meta_contexts if self._meta_export == export.name else {}
        self._meta_contexts = dict(meta)
        self._export = export
        self._handshake_done = True
        self._flags = flags = transmission_flags(export, self._structured)
        self._size = export.size
        self._align_mask = export.min_block_size - 1 if export.min_block_size > 1 else 0

        # FUA is "valid for all commands" once advertised: the server must
        # accept it anywhere (clients are known to set it on reads and flushes).
        # Masks are plain ints: ~ on an IntFlag only complements its defined
        # bits, which would let undefined bits from the wire through.
        fua = int(CommandFlag.FUA) if flags & TransmissionFlag.SEND_FUA else 0
        zeroes = 0
        if flags & TransmissionFlag.SEND_WRITE_ZEROES:
            zeroes = int(CommandFlag.NO_HOLE)
            if flags & TransmissionFlag.SEND_FAST_ZERO:
                zeroes |= int(CommandFlag.FAST_ZERO)
        df = int(CommandFlag.DF) if flags & TransmissionFlag.SEND_DF else 0
        allowed = {
            Command.READ: fua | df,
            Command.WRITE: fua,
            Command.FLUSH: fua,
            Command.TRIM: fua,
            Command.CACHE: fua,
            Command.WRITE_ZEROES: fua | zeroes,
            Command.BLOCK_STATUS: fua | int(CommandFlag.REQ_ONE),
        }
        self._forbidden = {command: 0xFFFF & ~mask for command, mask in allowed.items()}
        # The hot path: commands whose every rule is "allowed flags, length cap,
        # in range, aligned" -- a request passing those four is accepted without
        # going through _judge.  Whatever _judge treats specially stays out.
        fast = {Command.READ: self._max_request_size, Command.CACHE: _NO_LIMIT}
        if self._mirror_only:
            fast = {}  # every request goes through the mirror-only check
        elif not export.read_only:
            fast[Command.WRITE] = self._max_request_size
            fast[Command.TRIM] = _NO_LIMIT
            fast[Command.WRITE_ZEROES] = _NO_LIMIT
        self._fast = {
            int(command): (self._forbidden[command], limit) for command, limit in fast.items()
        }
        self._state = _State.TRANSMISSION
        events.append(
            HandshakeComplete(
                export,
                self._structured,
                dict(self._meta_contexts),
                self._sender,
                flexnbd=self._mirror_only,
            )
        )

    # -- transmission ----------------------------------------------------------------

    def _judge(self, cmd: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """Every rule a request must pass, in the order they are reported; None to accept.

        DISC never reaches here.  The fast path in _parse_requests accepts a
        subset of what this accepts, for speed; this is the definition.
        """
        command = _COMMANDS.get(cmd)
        if command is None:
            if cmd == FERRY_CMD_COMMIT:
                return Errno.EINVAL, "FERRY_CMD_COMMIT is only for a migration sender's connection"
            if cmd == FERRY_CMD_CONNECTION:
                return (
                    Errno.EINVAL,
                    "FERRY_CMD_CONNECTION is only for a sender whose FERRY_OPT_CONNECTIONS "
                    "was acknowledged",
                )
            return Errno.EINVAL, f"unknown command {cmd}"
        if command in _WRITING and self._flags & TransmissionFlag.READ_ONLY:
            return Errno.EPERM, "the export is read-only"
        bad = flags & self._forbidden[command]
        if bad:
            return Errno.EINVAL, f"flags {bad:#x} are not allowed on {command.name}"
        if command is Command.FLUSH:
            if offset or length:
                return Errno.EINVAL, "FLUSH must have offset and length 0"
            return None
        if command is Command.BLOCK_STATUS:
            if not self._meta_contexts:
                return Errno.EINVAL, "no metadata context was negotiated"
            if not length:
                return Errno.EINVAL, "BLOCK_STATUS of 0 bytes"
        if length > self._max_request_size and command in _CAPPED:
            error = Errno.EINVAL
            if command is Command.READ and self._structured:
                error = Errno.EOVERFLOW
            return error, f"{length} bytes is over the limit of {self._max_request_size}"
        if offset + length > self._size:
            error = Errno.ENOSPC if command in _FILLING else Errno.EINVAL
            return error, f"{offset}+{length} is beyond the end of the export ({self._size})"
        if (offset | length) & self._align_mask:
            return Errno.EINVAL, f"not aligned to {self._align_mask + 1} bytes"
        return None

    def _parse_requests(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Parse requests from ``data[pos:]``; returns where it stopped.

        Stops with the state still TRANSMISSION when less than a header is
        left, or after a state change (PAYLOAD, CLOSED).
        """
        end = len(data)
        verdict: tuple[Errno, str] | None
        unpack = REQUEST.unpack_from
        fast = self._fast
        size = self._size
        align = self._align_mask
        append = events.append
        build = _build_request
        while end - pos >= _HEADER_SIZE:
            magic, flags, cmd, handle, offset, length = unpack(data, pos)
            if magic != REQUEST_MAGIC:
                self._fail(f"request magic {magic:#x} is not {REQUEST_MAGIC:#x}")
            pos += _HEADER_SIZE
            rule = fast.get(cmd)
            if (
                rule is not None
                and not flags & rule[0]
                and length <= rule[1]
                and offset + length <= size
                and not (offset | length) & align
            ):
                if cmd != 1:  # Command.WRITE
                    append(build(handle, _COMMANDS[cmd], _FLAGS[flags], offset, length, b""))
                    continue
                after = self._accept_payload(
                    events, data, pos, end, (handle, flags, offset, length), cmd
                )
                if after is None:
                    return end
                pos = after
                continue
            if cmd == Command.DISC:
                self._state = _State.CLOSED
                append(Disconnect())
                return end
            if cmd == FERRY_CMD_COMMIT and self._sender is not None:
                append(self._commit(handle, flags, offset, length))
                continue
            if cmd == FERRY_CMD_CONNECTION and self._carries:
                refused = self._refuse_connection(flags, offset, length)
                if refused is None:
                    after = self._accept_payload(
                        events, data, pos, end, (handle, flags, offset, length), cmd
                    )
                    if after is None:
                        return end
                    pos = after
                    continue
                verdict = refused
            elif self._mirror_only and not (
                cmd == Command.FLUSH or (cmd in _WRITING and handle == FLEXNBD_MIRROR_HANDLE)
            ):
                verdict = (
                    Errno.EPERM,
                    "the export is listening for a migration: only a flexnbd mirror's "
                    "writes (handle .MIRROR.) are accepted",
                )
            else:
                verdict = self._judge(cmd, flags, offset, length)
            if verdict is None:
                if cmd != Command.WRITE:
                    append(build(handle, _COMMANDS[cmd], _FLAGS[flags], offset, length, b""))
                    continue
                # Only a mirror-only connection's WRITE is accepted here (the
                # fast path takes every other one).
                after = self._accept_payload(
                    events, data, pos, end, (handle, flags, offset, length), cmd
                )
                if after is None:
                    return end
                pos = after
                continue
            rejection = RejectedRequest(
                handle, _COMMANDS.get(cmd, cmd), offset, length, verdict[0], verdict[1]
            )
            if cmd not in _PAYLOAD_COMMANDS or not length:
                append(rejection)
                continue
            # The payload is on the wire whatever we think of the request:
            # count it off, then answer.
            if end - pos >= length:
                pos += length
                append(rejection)
                continue
            self._held = rejection
            self._write = None
            self._need = length - (end - pos)
            self._state = _State.PAYLOAD
            return end
        return pos

    def _commit(self, handle: int, flags: int, token: int, length: int) -> Commit | RejectedRequest:
        """The sender's commit, or its rejection; it has no payload, so nothing follows."""
        if length:
            reason = f"FERRY_CMD_COMMIT carries no data, not {length} bytes"
        elif flags & ~_COMMIT_FLAGS:
            reason = f"flags {flags & ~_COMMIT_FLAGS:#x} are not allowed on FERRY_CMD_COMMIT"
        else:
            return Commit(handle, token)
        return RejectedRequest(handle, FERRY_CMD_COMMIT, token, length, Errno.EINVAL, reason)

    def _refuse_connection(self, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """Why a sender's FERRY_CMD_CONNECTION is not well formed (None: it is)."""
        if flags or offset:
            return Errno.EINVAL, "FERRY_CMD_CONNECTION carries no flags and offset 0"
        if not 0 < length <= FERRY_MAX_CONNECTION:
            limit = FERRY_MAX_CONNECTION
            return Errno.EINVAL, f"a connection's state of {length} bytes is not in 1..{limit}"
        return None

    def _accept_payload(
        self,
        events: list[Event],
        data: bytes,
        pos: int,
        end: int,
        fields: tuple[int, int, int, int],
        command: int,
    ) -> int | None:
        """A valid WRITE's (or carried connection's) header is parsed: emit it, or collect.

        Returns the position after the payload when all of it is in ``data``;
        None when the rest will come in later chunks (``data`` is used up).
        """
        length = fields[3]
        if end - pos >= length:
            stop = pos + length
            events.append(self._payload_event(fields, command, data[pos:stop]))
            return stop
        self._write = fields
        self._payload_command = command
        # Views, not slices: the payload is copied once, by the join in
        # _take_payload, however many chunks it arrives in.
        self._chunks = [memoryview(data)[pos:]] if pos < end else []
        self._need = length - (end - pos)
        self._state = _State.PAYLOAD
        return None

    @staticmethod
    def _payload_event(
        fields: tuple[int, int, int, int], command: int, payload: bytes
    ) -> Request | CarriedConnection:
        handle, flags, offset, length = fields
        if command == FERRY_CMD_CONNECTION:
            return CarriedConnection(handle, payload)
        return _build_request(handle, Command.WRITE, _FLAGS[flags], offset, length, payload)

    def _take_payload(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Feed ``data[pos:]`` to the payload in progress; returns where it stopped."""
        available = len(data) - pos
        write = self._write
        if available < self._need:
            if write is not None:
                self._chunks.append(memoryview(data)[pos:] if pos else data)
            self._need -= available
            return len(data)
        stop = pos + self._need
        self._need = 0
        self._state = _State.TRANSMISSION
        if write is None:
            held = self._held
            assert held is not None
            self._held = None
            events.append(held)
            return stop
        chunks = self._chunks
        chunks.append(memoryview(data)[pos:stop])
        self._chunks = []
        self._write = None
        events.append(self._payload_event(write, self._payload_command, b"".join(chunks)))
        return stop

    # -- moving the session (see ferry.nbd.session) ------------------------------------

    def snapshot(self, in_flight: bytes = b"") -> SessionSnapshot:
        """This client's session as a value, for a restore elsewhere to carry on from.

        ``in_flight`` is the caller's: the raw bytes (``encode_request``) of
        the requests this connection returned but the caller has not
        answered, in the order they came.  A ``RejectedRequest`` cannot be
        re-encoded (it does not keep the flags that condemned it): answer
        those before taking the snapshot; it needs no I/O but a write.
        Refuses, with :class:`SnapshotError`, a connection that is not a
        client's in transmission, one that runs TLS (its session is the
        caller's TLS layer's, not this parser's), or whose handshake output
        or events the caller has not collected yet.
        """
        if self._state is not _State.TRANSMISSION and self._state is not _State.PAYLOAD:
            raise SnapshotError(f"the connection is in {self._state.value}, not in transmission")
        if self._sender is not None or self._mirror_only:
            raise SnapshotError("a migration sender's connection does not move")
        if self._tls:
            raise SnapshotError("its TLS session cannot move")
        if self._out or self._pending:
            raise SnapshotError("handshake output or events not yet collected by the caller")
        export = self._export
        assert export is not None
        partial = self._buffer
        rejected = None
        remaining = 0
        if self._state is _State.PAYLOAD:
            if self._write is not None:
                handle, flags, offset, length = self._write
                header = REQUEST.pack(REQUEST_MAGIC, flags, Command.WRITE, handle, offset, length)
                partial = header + b"".join(self._chunks)
            else:
                rejected = self._held
                remaining = self._need
        return SessionSnapshot(
            export=export,
            structured_replies=self._structured,
            meta_contexts=tuple(sorted(self._meta_contexts.items())),
            max_request_size=self._max_request_size,
            in_flight=in_flight,
            partial=partial,
            rejected=rejected,
            rejected_remaining=remaining,
        )

    @classmethod
    def restore(
        cls,
        snapshot: SessionSnapshot,
        catalog: ExportCatalog,
        *,
        migration: MigrationCatalog | None = None,
    ) -> tuple[ServerConnection, list[Event]]:
        """A connection carrying on ``snapshot``'s session, and the events of its ``in_flight``.

        No greeting is queued and no ``HandshakeComplete`` returned: the
        client finished its handshake with the original.  The events are
        the requests in flight parsed again, in order, for the caller to
        perform and answer; after them the connection expects exactly the
        bytes the original expected next.  Raises :class:`SnapshotError`
        when ``in_flight`` is not whole requests or ``partial`` is not the
        start of one.
        """
        conn = cls(catalog, migration=migration, max_request_size=snapshot.max_request_size)
        conn._out.clear()  # the greeting went out long ago, from the original
        conn._structured = snapshot.structured_replies
        conn._meta_contexts = dict(snapshot.meta_contexts)
        conn._meta_export = snapshot.export.name
        conn._start_transmission(snapshot.export, [])
        try:
            events = conn.receive_data(snapshot.in_flight)
            if conn._state is not _State.TRANSMISSION or conn._buffer:
                raise SnapshotError("the requests in flight end in the middle of a request")
            if snapshot.partial and conn.receive_data(snapshot.partial):
                raise SnapshotError("the partial request is a whole one")
        except ProtocolError as error:
            raise SnapshotError(f"the snapshot's requests do not parse: {error}") from None
        if snapshot.rejected is not None:
            conn._held = snapshot.rejected
            conn._write = None
            conn._need = snapshot.rejected_remaining
            conn._state = _State.PAYLOAD
        return conn, events
