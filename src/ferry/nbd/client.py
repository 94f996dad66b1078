"""The client side of NBD as a pure state machine: server bytes in, events out.

Nothing here touches a socket.  The caller feeds what the server sent to
``receive_data``, writes whatever ``data_to_send`` returns, and calls
``request`` once a ``Negotiated`` event has arrived.  ``ferry.remote`` wraps
this in a blocking socket client; the migration source drives it from the
reactor.

Invariants kept by ``ClientConnection`` (checked by the unit tests):

* Bytes are consumed only in whole frames.  A frame whose header announces
  more than we accept (``max_reply_size``, ``MAX_OPTION_REPLY_LENGTH``) is
  refused as soon as the header is complete, so an untrusted server cannot
  make us buffer more than one frame of that size, plus what the caller fed.
* Every ``Reply`` answers exactly one request made with ``request`` and is
  emitted exactly once: a simple reply, or the structured chunk carrying
  ``DONE``.  A reply for a handle we are not waiting on is a ``ProtocolError``.
* Content chunks of a READ never reach outside the request, never overlap,
  and a successful READ is covered completely; anything else is a
  ``ProtocolError`` rather than a silent hole in the data.
* Once ``receive_data`` has raised ``ProtocolError`` the connection is broken
  and every later call raises it again: framing is lost and cannot be found.

The handshake, one option in flight at a time (the spec forbids more):

=================  ==============================  ===========================
state              on                              next
=================  ==============================  ===========================
GREETING           oldstyle greeting               TRANSMISSION (Negotiated)
GREETING           oldstyle greeting, with tls     FAILED (NegotiationFailed)
GREETING           fixed newstyle greeting         OPTION (STRUCTURED_REPLY,
                                                   else GO)
GREETING           fixed newstyle, with tls        OPTION (STARTTLS)
GREETING           newstyle without FIXED          FAILED (NegotiationFailed)
OPTION STARTTLS    ACK                             STARTING_TLS (StartTLS)
OPTION STARTTLS    any error                       FAILED (NegotiationFailed)
STARTING_TLS       the caller's ``tls_started()``  OPTION (as after the greeting)
STARTING_TLS       any byte                        BROKEN (ProtocolError)
OPTION SR          ACK / any error                 OPTION (SET_META_CONTEXT if
                                                   acked and wanted, else GO)
OPTION SET_META    META_CONTEXT                    same (remember the id)
OPTION SET_META    ACK / any error                 OPTION (GO)
OPTION GO          INFO                            same (remember the info)
OPTION GO          ACK                             TRANSMISSION (Negotiated)
OPTION GO          ERR_UNSUP                       EXPORT_NAME
OPTION GO          other error                     FAILED (NegotiationFailed)
OPTION extra       ACK / any other error           OPTION (next extra, else as
                                                   after the greeting)
                                                   (OptionAnswered)
OPTION extra       any other reply (with data)     same (OptionData)
OPTION extra       ACK with data                   ProtocolError (data has
                                                   replies of its own)
OPTION any         ERR_SHUTDOWN / ERR_TLS_REQD     FAILED (NegotiationFailed)
EXPORT_NAME        size + flags                    TRANSMISSION (Negotiated)
EXPORT_NAME        end of stream                   FAILED (NegotiationFailed)
TRANSMISSION       end of stream, nothing pending  CLOSED
=================  ==============================  ===========================

``extra_options`` are sent first, after the client flags, one at a time;
each answer (ACK or error) becomes an ``OptionAnswered`` event, after an
``OptionData`` for each reply with data that came before it, and the
handshake goes on either way: the caller decides what a refusal means
(ferry's migration source sends ``FERRY_OPT_MIGRATE`` this way; ERR_UNSUP
says the server is a plain NBD server).  An oldstyle server cannot be asked
anything, so then no ``OptionAnswered`` comes before ``Negotiated``.

With ``tls=True`` the client insists on TLS, as the spec advises a client
that only wants TLS: STARTTLS is its first option, and a server that refuses
it (or cannot be asked: an oldstyle hello) ends the handshake, so a man in
the middle cannot talk it down to plaintext.  ``StartTLS`` tells the caller
to start TLS on its transport (as the TLS client) and then call
``tls_started``; the server may send nothing in between.

Entering FAILED from an option queues ``NBD_OPT_ABORT`` (the soft disconnect
the spec asks of a client that gives up); whatever the server sends after
that is ignored.
"""

from __future__ import annotations

import bisect
import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

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
    GREETING_NEWSTYLE,
    GREETING_OLDSTYLE,
    IHAVEOPT,
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
    BlockState,
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
)
from ferry.nbd.events import (
    Event,
    Extent,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    OptionData,
    ProtocolError,
    Reply,
    StartTLS,
)

__all__ = [
    "MAX_OPTION_REPLY_LENGTH",
    "MAX_READ_FRAGMENTS",
    "ClientConnection",
    "handle_from_bytes",
]

# Option replies carry names, messages and a few numbers; strings are at most
# 4096 bytes, so anything near this size is a broken or hostile server.
MAX_OPTION_REPLY_LENGTH: Final = 64 * 1024

# How many disjoint pieces of one READ we track while its chunks arrive out of
# order.  In-order servers keep this at 1; the cap bounds the bookkeeping a
# server can make us keep by scattering one-byte chunks.
MAX_READ_FRAGMENTS: Final = 1 << 16

_U32_MAX: Final = (1 << 32) - 1
_U64_MAX: Final = (1 << 64) - 1
_GREETING_PREFIX: Final = struct.Struct(">QQ")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_INFO_EXPORT: Final = struct.Struct(">HQH")  # info type, size, transmission flags
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # info type, min, preferred, max
_OFFSET_HOLE: Final = struct.Struct(">QI")  # offset, hole size
_ERROR_HEAD: Final = struct.Struct(">IH")  # error, message length
_ERROR_TYPE_BIT: Final = 1 << 15
_OPTION_ERROR_BIT: Final = 1 << 31
_KNOWN_ERRNOS: Final = frozenset(e.value for e in Errno)
_KNOWN_OPTION_REPLIES: Final = frozenset(r.value for r in OptionReply)
_NO_FLAGS: Final = CommandFlag(0)
# Plain ints for the reply path: ``int & IntFlag`` goes through enum's operators.
_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
_READ: Final = int(Command.READ)


def handle_from_bytes(raw: bytes) -> int:
    """The u64 handle whose wire form is ``raw``.

    flexnbd marks its mirror writes with the eight bytes ``b".MIRROR."``;
    handles are opaque on the wire, so it is the same number either way.
    """
    if len(raw) != 8:
        raise ValueError(f"a handle is 8 bytes, not {len(raw)}")
    return int.from_bytes(raw, "big")


def _errno(value: int) -> Errno:
    # The spec: a client treats an error value it does not know as EINVAL.
    return Errno(value) if value in _KNOWN_ERRNOS and value != 0 else Errno.EINVAL


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _string(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


class _State(enum.Enum):
    GREETING = enum.auto()
    OPTION = enum.auto()
    STARTING_TLS = enum.auto()
    EXPORT_NAME = enum.auto()
    TRANSMISSION = enum.auto()
    FAILED = enum.auto()
    CLOSED = enum.auto()
    BROKEN = enum.auto()


class _Coverage:
    """The disjoint byte ranges of a READ already filled, kept merged."""

    __slots__ = ("ends", "starts", "total")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.total = 0

    def add(self, start: int, end: int) -> None:
        starts, ends = self.starts, self.ends
        i = bisect.bisect_right(starts, start)
        if (i > 0 and ends[i - 1] > start) or (i < len(starts) and starts[i] < end):
            raise ProtocolError(f"read chunk [{start}, {end}) overlaps an earlier chunk")
        merge_left = i > 0 and ends[i - 1] == start
        merge_right = i < len(starts) and starts[i] == end
        if merge_left and merge_right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif merge_left:
            ends[i - 1] = end
        elif merge_right:
            starts[i] = start
        else:
            if len(starts) >= MAX_READ_FRAGMENTS:
                raise ProtocolError("read reply scattered over too many pieces")
            starts.insert(i, start)
            ends.insert(i, end)
        self.total += end - start


@dataclass(slots=True)
class _Pending:
    """A request sent and not yet answered, with what its chunks built so far."""

    command: int
    flags: CommandFlag
    offset: int
    length: int
    chunked: bool = False  # a structured chunk without DONE has arrived
    buffer: bytearray | None = None
    coverage: _Coverage | None = None  # made for the first chunk that needs it
    error: Errno = Errno.OK
    message: str = ""
    extents: dict[int, tuple[Extent, ...]] = field(default_factory=dict)


class ClientConnection:
    """One NBD client connection, from the server's greeting to the last reply.

    ``export_name`` is asked for with ``NBD_OPT_GO`` (or ``EXPORT_NAME`` when
    the server does not know GO).  ``meta_contexts`` are selected only when
    structured replies were agreed, because the spec forbids it otherwise.
    ``max_reply_size`` caps one structured chunk, and so what a server can
    make us hold; READ requests that could not be answered within it are
    refused locally.

    ``receive_data(b"")`` means the server closed the stream (as in h11).

    ``tls``: ask for TLS first and give up without it (see the module doc).
    """

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
        max_reply_size: int = MAX_REQUEST_SIZE + 4096,
        extra_options: Sequence[tuple[int, bytes]] = (),
        tls: bool = False,
    ) -> None:
        if isinstance(meta_contexts, str):
            raise TypeError("meta_contexts is a sequence of names, not one name")
        self._name = export_name.encode("utf-8")
        if len(self._name) > MAX_STRING_LENGTH:
            raise ValueError(f"export name longer than {MAX_STRING_LENGTH} bytes")
        self._queries = [q.encode("utf-8") for q in meta_contexts]
        if any(not q or len(q) > MAX_STRING_LENGTH for q in self._queries):
            raise ValueError("a meta context query is empty or too long")
        if max_reply_size < 4096:
            raise ValueError("max_reply_size below 4096 cannot carry an error message")
        known = {int(o) for o in Option}
        for option, payload in extra_options:
            if option in known or not 0 <= option <= _U32_MAX:
                raise ValueError(f"extra option {option:#x} is a standard option or not a u32")
            if len(payload) > MAX_OPTION_REPLY_LENGTH:
                raise ValueError(f"extra option {option:#x} payload of {len(payload)} bytes")
        self._extra = [(int(o), bytes(p)) for o, p in extra_options]
        self.export_name = export_name
        self.want_structured_replies = structured_replies
        self.max_reply_size = max_reply_size
        self.want_tls = tls
        self._tls = False  # TLS is on: the caller said so with tls_started()

        self._state = _State.GREETING
        self._buf = bytearray()
        self._pos = 0
        self._out: list[bytes] = []
        self._broken_reason = ""

        # Handshake results.
        self._no_zeroes = False
        self._option: int | None = None  # the option awaiting its reply
        self._extra_next = 0  # index in self._extra of the next one to send
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._context_ids: set[int] = set()
        self._info_name: str | None = None
        self._info_export: tuple[int, int] | None = None
        self._info_block: tuple[int, int, int] | None = None
        self._negotiated: Negotiated | None = None

        # Transmission.
        self._pending: dict[int, _Pending] = {}
        self._next_handle = 1
        self._disc_sent = False

    # -- public -------------------------------------------------------------

    @property
    def negotiated(self) -> Negotiated | None:
        return self._negotiated

    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def tls(self) -> bool:
        """True once the caller has started TLS (``tls_started``) after ``StartTLS``."""
        return self._tls

    def tls_started(self) -> None:
        """The caller has started TLS on its transport: the handshake goes on, encrypted."""
        if self._state is not _State.STARTING_TLS:
            raise RuntimeError(f"no TLS upgrade is pending (state: {self._state.name})")
        self._tls = True
        self._next_option()

    def data_to_send(self) -> bytes:
        """Everything queued for the server so far; the caller must write all of it."""
        return b"".join(self.buffers_to_send())

    def buffers_to_send(self) -> list[bytes]:
        """The same, as the separate buffers it was queued in.

        A WRITE's payload stays its own buffer, so a caller with a
        scatter-gather send (``sendmsg``) puts 4 MiB on the wire without
        copying it once more in user space.
        """
        out = self._out
        self._out = []
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse what the server sent; the events it completes, in stream order.

        Handshake replies may queue bytes for ``data_to_send`` without an
        event, so callers send after every call, not only after events.
        """
        if self._state is _State.BROKEN:
            raise ProtocolError(f"connection already broken: {self._broken_reason}")
        if self._state is _State.FAILED:
            return []  # the reply to our ABORT, or whatever a refusing server says
        events: list[Event] = []
        if not data:
            self._end_of_stream(events)
            return events
        if self._state is _State.CLOSED:
            raise self._break("data after the end of the stream")
        self._buf += data
        try:
            while self._step(events):
                pass
        except ProtocolError as exc:
            self._state = _State.BROKEN
            self._broken_reason = str(exc)
            self._buf.clear()
            self._pos = 0
            raise
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return events

    def request(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        flags: CommandFlag = _NO_FLAGS,
        data: bytes = b"",
        handle: int | None = None,
    ) -> int:
        """Queue one request; its reply will carry the returned handle.

        The connection checks framing, not policy: a flag the server did not
        advertise, or a range past the end, is sent as asked (tests use that
        to probe servers).  For a WRITE, ``length`` may be left at 0.
        """
        if self._state is not _State.TRANSMISSION:
            raise RuntimeError(f"cannot send a request in state {self._state.name}")
        if self._disc_sent:
            raise RuntimeError("NBD_CMD_DISC was sent; nothing may follow it")
        if command == Command.WRITE:
            if length == 0:
                length = len(data)
            elif length != len(data):
                raise ValueError(f"WRITE of {len(data)} bytes with length {length}")
        elif data:
            raise ValueError("only WRITE carries data")
        if not 0 <= offset <= _U64_MAX or not 0 <= length <= _U32_MAX:
            raise ValueError(f"offset {offset} / length {length} do not fit the request")
        if command == Command.READ and length + 8 > self.max_reply_size:
            raise ValueError(f"READ of {length} bytes exceeds max_reply_size")
        if handle is None:
            handle = self._allocate_handle()
        elif not 0 <= handle <= _U64_MAX:
            raise ValueError(f"handle {handle} is not a u64")
        elif handle in self._pending:
            raise ValueError(f"handle {handle:#x} is already in flight")
        self._out.append(REQUEST.pack(REQUEST_MAGIC, int(flags), command, handle, offset, length))
        if data:
            self._out.append(bytes(data))
        if command == Command.DISC:
            self._disc_sent = True  # no reply will come
        else:
            if type(flags) is not CommandFlag:
                flags = CommandFlag(flags)
            self._pending[handle] = _Pending(int(command), flags, offset, length)
        return handle

    def commit(self, token: int) -> int:
        """Queue ferry's ``FERRY_CMD_COMMIT`` carrying the fencing ``token``; its handle.

        Only a ferry listener that ACKed ``FERRY_OPT_MIGRATE`` knows it: the
        reply is the destination's acknowledgement of the two-phase commit
        (see ``constants.py``).  The token travels in the offset field.
        """
        if self._state is not _State.TRANSMISSION:
            raise RuntimeError(f"cannot send a request in state {self._state.name}")
        if self._disc_sent:
            raise RuntimeError("NBD_CMD_DISC was sent; nothing may follow it")
        if not 0 <= token <= _U64_MAX:
            raise ValueError(f"fencing token {token} is not a u64")
        handle = self._allocate_handle()
        self._out.append(REQUEST.pack(REQUEST_MAGIC, 0, FERRY_CMD_COMMIT, handle, token, 0))
        self._pending[handle] = _Pending(FERRY_CMD_COMMIT, _NO_FLAGS, token, 0)
        return handle

    def carry(self, state: bytes) -> int:
        """Queue ferry's ``FERRY_CMD_CONNECTION`` carrying one client connection; its handle.

        Only after the listener ACKed ``FERRY_OPT_CONNECTIONS``; ``state`` is
        the checkpoint ``ferry.handoff.carried`` wrote.  The reply says whether
        the listener rebuilt the connection.
        """
        if self._state is not _State.TRANSMISSION:
            raise RuntimeError(f"cannot send a request in state {self._state.name}")
        if self._disc_sent:
            raise RuntimeError("NBD_CMD_DISC was sent; nothing may follow it")
        if not 0 < len(state) <= FERRY_MAX_CONNECTION:
            raise ValueError(f"a connection's state of {len(state)} bytes is out of range")
        handle = self._allocate_handle()
        header = REQUEST.pack(REQUEST_MAGIC, 0, FERRY_CMD_CONNECTION, handle, 0, len(state))
        self._out += [header, state]
        self._pending[handle] = _Pending(FERRY_CMD_CONNECTION, _NO_FLAGS, 0, 0)
        return handle

    # -- plumbing ------------------------------------------------------------

    def _allocate_handle(self) -> int:
        handle = self._next_handle
        while handle in self._pending:
            handle = (handle + 1) & _U64_MAX
        self._next_handle = (handle + 1) & _U64_MAX
        return handle

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        start = self._pos
        self._pos += n
        with memoryview(self._buf) as view:
            return bytes(view[start : self._pos])

    def _break(self, reason: str) -> ProtocolError:
        self._state = _State.BROKEN
        self._broken_reason = reason
        return ProtocolError(reason)

    def _end_of_stream(self, events: list[Event]) -> None:
        state = self._state
        if state is _State.CLOSED:
            return
        if state is _State.EXPORT_NAME:
            # The only way a server can say no to EXPORT_NAME is to hang up.
            self._state = _State.FAILED
            events.append(
                NegotiationFailed(
                    OptionReply.ERR_UNKNOWN,
                    "server closed the connection after NBD_OPT_EXPORT_NAME "
                    f"(no export named {self.export_name!r}, or refused)",
                )
            )
            return
        if state is _State.TRANSMISSION and not self._pending and not self._available():
            self._state = _State.CLOSED
            return
        if state is _State.TRANSMISSION:
            raise self._break(
                f"server closed the connection with {len(self._pending)} request(s) "
                f"unanswered and {self._available()} byte(s) of an unfinished reply"
            )
        raise self._break(f"server closed the connection during the handshake ({state.name})")

    def _step(self, events: list[Event]) -> bool:
        state = self._state
        if state is _State.TRANSMISSION:
            return self._step_reply(events)
        if state is _State.OPTION:
            return self._step_option_reply(events)
        if state is _State.GREETING:
            return self._step_greeting(events)
        if state is _State.EXPORT_NAME:
            return self._step_export_name(events)
        if state is _State.FAILED:
            self._pos = len(self._buf)
            return False
        if state is _State.STARTING_TLS:
            if not self._available():
                return False
            raise self._break(
                f"server sent {self._available()} bytes in the clear after acknowledging "
                "NBD_OPT_STARTTLS"
            )
        raise self._break(f"server sent data in state {state.name}")

    # -- handshake -------------------------------------------------------------

    def _step_greeting(self, events: list[Event]) -> bool:
        if self._available() < _GREETING_PREFIX.size:
            return False
        magic, second = _GREETING_PREFIX.unpack_from(self._buf, self._pos)
        if magic != NBDMAGIC:
            raise ProtocolError(f"bad greeting magic {magic:#x}")
        if second == CLISERV_MAGIC:
            if self._available() < GREETING_OLDSTYLE.size:
                return False
            _, _, size, flags = GREETING_OLDSTYLE.unpack_from(self._buf, self._pos)
            self._pos += GREETING_OLDSTYLE.size
            if self.want_tls:
                self._state = _State.FAILED
                events.append(
                    NegotiationFailed(
                        OptionReply.ERR_UNSUP,
                        "the server's hello is oldstyle, which cannot start TLS; TLS is required",
                    )
                )
                return True
            # The 32-bit oldstyle field is handshake flags (high half, always
            # zero) and transmission flags (low half).
            self._finish(events, Negotiated("", size, flags & 0xFFFF, False, {}, oldstyle=True))
            return True
        if second != IHAVEOPT:
            raise ProtocolError(f"bad greeting second magic {second:#x}")
        if self._available() < GREETING_NEWSTYLE.size:
            return False
        _, _, hflags = GREETING_NEWSTYLE.unpack_from(self._buf, self._pos)
        self._pos += GREETING_NEWSTYLE.size
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            # Without fixed newstyle we could not be told why an export is
            # refused nor fall back safely; ferry needs GO and its errors.
            self._state = _State.FAILED
            events.append(
                NegotiationFailed(
                    OptionReply.ERR_UNSUP, "server does not offer fixed newstyle negotiation"
                )
            )
            return True
        client_flags = ClientFlag.FIXED_NEWSTYLE
        if hflags & HandshakeFlag.NO_ZEROES:
            client_flags |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        self._out.append(CLIENT_FLAGS.pack(client_flags))
        if self.want_tls:
            self._send_option(Option.STARTTLS)
        else:
            self._next_option()
        return True

    def _next_option(self) -> None:
        """After the greeting or an extra option's answer: the next extra, else the usual."""
        if self._extra_next < len(self._extra):
            option, payload = self._extra[self._extra_next]
            self._extra_next += 1
            self._send_option(option, payload)
        elif self.want_structured_replies:
            self._send_option(Option.STRUCTURED_REPLY)
        else:
            self._send_go()

    def _is_extra(self, option: int) -> bool:
        return any(option == o for o, _ in self._extra[: self._extra_next])

    def _send_option(self, option: int, payload: bytes = b"") -> None:
        self._out.append(OPTION_HEADER.pack(IHAVEOPT, option, len(payload)))
        if payload:
            self._out.append(payload)
        self._option = option
        self._state = _State.OPTION

    def _send_go(self) -> None:
        self._info_name = None
        self._info_export = None
        self._info_block = None
        payload = b"".join(
            (
                _U32.pack(len(self._name)),
                self._name,
                _U16.pack(2),
                _U16.pack(Info.NAME),
                _U16.pack(Info.BLOCK_SIZE),
            )
        )
        self._send_option(Option.GO, payload)

    def _send_set_meta_context(self) -> None:
        parts = [_U32.pack(len(self._name)), self._name, _U32.pack(len(self._queries))]
        for query in self._queries:
            parts += [_U32.pack(len(query)), query]
        self._send_option(Option.SET_META_CONTEXT, b"".join(parts))

    def _fail(self, events: list[Event], error: OptionReply, message: str) -> None:
        self._state = _State.FAILED
        self._out.append(OPTION_HEADER.pack(IHAVEOPT, Option.ABORT, 0))
        events.append(NegotiationFailed(error, message))

    def _finish(self, events: list[Event], negotiated: Negotiated) -> None:
        self._negotiated = negotiated
        self._option = None
        self._state = _State.TRANSMISSION
        events.append(negotiated)

    def _step_option_reply(self, events: list[Event]) -> bool:
        header = OPTION_REPLY_HEADER
        if self._available() < header.size:
            return False
        magic, option, rtype, length = header.unpack_from(self._buf, self._pos)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if option != self._option:
            raise ProtocolError(f"reply for option {option} while waiting on {self._option!r}")
        if length > MAX_OPTION_REPLY_LENGTH:
            raise ProtocolError(f"option reply of {length} bytes is over the cap")
        if self._available() < header.size + length:
            return False
        self._pos += header.size
        payload = self._take(length)
        if option == Option.STARTTLS:
            self._starttls_reply(events, rtype, payload)
        elif self._is_extra(option):
            self._extra_reply(events, option, rtype, payload)
        elif rtype & _OPTION_ERROR_BIT:
            self._option_error(events, option, rtype, payload)
        elif option == Option.STRUCTURED_REPLY:
            if rtype != OptionReply.ACK or length:
                raise ProtocolError(f"unexpected reply {rtype:#x} to STRUCTURED_REPLY")
            self._structured = True
            self._after_structured_reply()
        elif option == Option.SET_META_CONTEXT:
            self._meta_context_reply(rtype, payload)
        else:
            self._go_reply(events, rtype, payload)
        return True

    def _extra_reply(self, events: list[Event], option: int, rtype: int, payload: bytes) -> None:
        if rtype == OptionReply.ACK:
            # An answer's data comes in replies of its own, before the ACK.
            if payload:
                raise ProtocolError(f"ACK to option {option:#x} with {len(payload)} bytes of data")
            events.append(OptionAnswered(option, OptionReply.ACK))
        elif rtype & _OPTION_ERROR_BIT:
            message = _text(payload)
            if rtype in _KNOWN_OPTION_REPLIES:
                error = OptionReply(rtype)
            else:
                error = OptionReply.ERR_INVALID
                message = f"unknown option error {rtype:#x}" + (f": {message}" if message else "")
            if error in (OptionReply.ERR_SHUTDOWN, OptionReply.ERR_TLS_REQD):
                self._fail(events, error, message or error.name)
                return
            events.append(OptionAnswered(option, error, message))
        else:
            # An extension's reply with data (a ferry LOCATION or LANDING,
            # say): the option goes on until its ACK or error.
            events.append(OptionData(option, rtype, bytes(payload)))
            return
        self._next_option()

    def _starttls_reply(self, events: list[Event], rtype: int, payload: bytes) -> None:
        if rtype == OptionReply.ACK:
            if payload:
                raise ProtocolError("ACK to NBD_OPT_STARTTLS with a payload")
            self._option = None
            self._state = _State.STARTING_TLS
            events.append(StartTLS())
            return
        if not rtype & _OPTION_ERROR_BIT:
            raise ProtocolError(f"unexpected reply {rtype:#x} to STARTTLS")
        error = OptionReply(rtype) if rtype in _KNOWN_OPTION_REPLIES else OptionReply.ERR_INVALID
        said = _text(payload) or error.name
        self._fail(events, error, f"the server refused TLS, which is required: {said}")

    def _after_structured_reply(self) -> None:
        if self._structured and self._queries:
            self._send_set_meta_context()
        else:
            self._send_go()

    def _option_error(self, events: list[Event], option: int, rtype: int, payload: bytes) -> None:
        message = _text(payload)
        if rtype in _KNOWN_OPTION_REPLIES:
            error = OptionReply(rtype)
        else:
            # NegotiationFailed needs a member; keep the number in the text.
            error = OptionReply.ERR_INVALID
            message = f"unknown option error {rtype:#x}" + (f": {message}" if message else "")
        if error in (OptionReply.ERR_SHUTDOWN, OptionReply.ERR_TLS_REQD):
            self._fail(events, error, message or error.name)
        elif option == Option.STRUCTURED_REPLY:
            self._structured = False  # an older server: go on with simple replies
            self._after_structured_reply()
        elif option == Option.SET_META_CONTEXT:
            self._contexts.clear()  # no contexts: BLOCK_STATUS is off, the rest works
            self._context_ids.clear()
            self._send_go()
        elif error == OptionReply.ERR_UNSUP:
            # A server from before GO: EXPORT_NAME cannot report errors, but works.
            self._out.append(OPTION_HEADER.pack(IHAVEOPT, Option.EXPORT_NAME, len(self._name)))
            if self._name:
                self._out.append(self._name)
            self._option = Option.EXPORT_NAME
            self._state = _State.EXPORT_NAME
        else:
            self._fail(events, error, message or error.name)

    def _meta_context_reply(self, rtype: int, payload: bytes) -> None:
        if rtype == OptionReply.META_CONTEXT:
            if len(payload) <= _U32.size:
                raise ProtocolError("META_CONTEXT reply without a name")
            (context_id,) = _U32.unpack_from(payload)
            name = _string(payload[_U32.size :], "meta context name")
            self._contexts[name] = context_id
            self._context_ids.add(context_id)
        elif rtype == OptionReply.ACK:
            self._send_go()
        else:
            raise ProtocolError(f"unexpected reply {rtype:#x} to SET_META_CONTEXT")

    def _go_reply(self, events: list[Event], rtype: int, payload: bytes) -> None:
        if rtype == OptionReply.INFO:
            self._info(payload)
            return
        if rtype != OptionReply.ACK:
            raise ProtocolError(f"unexpected reply {rtype:#x} to GO")
        if self._info_export is None:
            raise ProtocolError("GO acknowledged without NBD_INFO_EXPORT")
        size, tflags = self._info_export
        minimum, preferred, maximum = self._info_block or (1, 4096, MAX_REQUEST_SIZE)
        name = self.export_name if self._info_name is None else self._info_name
        negotiated = Negotiated(
            name,
            size,
            tflags,
            self._structured,
            dict(self._contexts),
            oldstyle=False,
            min_block_size=minimum,
            preferred_block_size=preferred,
            max_block_size=maximum,
        )
        self._finish(events, negotiated)

    def _info(self, payload: bytes) -> None:
        if len(payload) < _U16.size:
            raise ProtocolError("INFO reply without a type")
        (kind,) = _U16.unpack_from(payload)
        if kind == Info.EXPORT:
            if len(payload) != _INFO_EXPORT.size:
                raise ProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes")
            _, size, tflags = _INFO_EXPORT.unpack(payload)
            self._info_export = (size, tflags)
        elif kind == Info.NAME:
            self._info_name = _string(payload[_U16.size :], "export name")
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != _INFO_BLOCK_SIZE.size:
                raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
            _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(payload)
            if not 1 <= minimum <= preferred or maximum < minimum:
                raise ProtocolError(f"nonsensical block sizes {minimum}/{preferred}/{maximum}")
            self._info_block = (minimum, preferred, maximum)
        # Other kinds (DESCRIPTION, later additions) are hints we may ignore.

    def _step_export_name(self, events: list[Event]) -> bool:
        size = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else EXPORT_NAME_PADDING)
        if self._available() < size:
            return False
        export_size, tflags = EXPORT_NAME_REPLY.unpack_from(self._buf, self._pos)
        self._pos += size
        negotiated = Negotiated(
            self.export_name, export_size, tflags, self._structured, dict(self._contexts)
        )
        self._finish(events, negotiated)
        return True

    # -- transmission ------------------------------------------------------------

    def _step_reply(self, events: list[Event]) -> bool:
        if self._available() < 4:
            return False
        (magic,) = _U32.unpack_from(self._buf, self._pos)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple_reply(events)
        if magic == STRUCTURED_REPLY_MAGIC:
            return self._structured_chunk(events)
        raise ProtocolError(f"bad reply magic {magic:#x}")

    def _lookup(self, handle: int) -> _Pending:
        pending = self._pending.get(handle)
        if pending is None:
            raise ProtocolError(f"reply for handle {handle:#x}, which is not in flight")
        return pending

    def _simple_reply(self, events: list[Event]) -> bool:
        if self._available() < SIMPLE_REPLY.size:
            return False
        _, error, handle = SIMPLE_REPLY.unpack_from(self._buf, self._pos)
        pending = self._lookup(handle)
        if pending.chunked:
            raise ProtocolError(f"simple reply in the middle of structured reply {handle:#x}")
        payload = 0
        if pending.command == Command.READ and error == 0:
            if self._structured:
                raise ProtocolError("simple reply with data to a READ after structured replies")
            payload = pending.length
        elif pending.command == Command.BLOCK_STATUS and error == 0:
            # Its extents come only in a structured chunk: a simple success says nothing.
            raise ProtocolError("successful BLOCK_STATUS in a simple reply")
        if self._available() < SIMPLE_REPLY.size + payload:
            return False
        self._pos += SIMPLE_REPLY.size
        data = self._take(payload) if payload else b""
        del self._pending[handle]
        events.append(Reply(handle, Errno.OK if error == 0 else _errno(error), data))
        return True

    def _structured_chunk(self, events: list[Event]) -> bool:
        header = STRUCTURED_REPLY
        if self._available() < header.size:
            return False
        _, flags, kind, handle, length = header.unpack_from(self._buf, self._pos)
        if not self._structured:
            raise ProtocolError("structured reply chunk without structured replies agreed")
        pending = self._lookup(handle)
        if length > self.max_reply_size:
            raise ProtocolError(f"reply chunk of {length} bytes is over max_reply_size")
        if self._available() < header.size + length:
            return False
        self._pos += header.size
        start = self._pos
        self._pos += length
        if (
            flags & _DONE
            and kind == _OFFSET_DATA
            and pending.command == _READ
            and not pending.chunked
            and length == pending.length + 8
            and pending.length
            and _U64.unpack_from(self._buf, start)[0] == pending.offset
        ):
            # The usual answer to a READ: all of it in one chunk, nothing to gather.
            del self._pending[handle]
            with memoryview(self._buf) as view:
                events.append(Reply(handle, Errno.OK, bytes(view[start + 8 : start + length])))
            return True
        self._chunk(pending, kind, start, length)
        if flags & _DONE:
            del self._pending[handle]
            events.append(self._complete(handle, pending))
        else:
            if kind == ReplyType.NONE:
                raise ProtocolError("NBD_REPLY_TYPE_NONE without the DONE flag")
            pending.chunked = True
        return True

    def _chunk(self, pending: _Pending, kind: int, start: int, length: int) -> None:
        """Fold one chunk's payload (``self._buf[start:start+length]``) into ``pending``."""
        buf = self._buf
        if kind == ReplyType.NONE:
            if length:
                raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload")
        elif kind == ReplyType.OFFSET_DATA:
            if pending.command != Command.READ or length <= 8:
                raise ProtocolError("bad OFFSET_DATA chunk")
            (offset,) = _U64.unpack_from(buf, start)
            rel = self._cover(pending, offset, length - 8)
            if pending.buffer is None:
                pending.buffer = bytearray(pending.length)
            with memoryview(buf) as view:
                pending.buffer[rel : rel + length - 8] = view[start + 8 : start + length]
        elif kind == ReplyType.OFFSET_HOLE:
            if pending.command != Command.READ or length != _OFFSET_HOLE.size:
                raise ProtocolError("bad OFFSET_HOLE chunk")
            offset, hole = _OFFSET_HOLE.unpack_from(buf, start)
            if hole == 0:
                raise ProtocolError("OFFSET_HOLE of zero bytes")
            self._cover(pending, offset, hole)
            if pending.buffer is None:
                pending.buffer = bytearray(pending.length)  # already zero
        elif kind == ReplyType.BLOCK_STATUS:
            self._block_status(pending, bytes(buf[start : start + length]))
        elif kind & _ERROR_TYPE_BIT:
            self._error_chunk(pending, kind, bytes(buf[start : start + length]))
        else:
            raise ProtocolError(f"unknown structured reply type {kind}")

    def _cover(self, pending: _Pending, offset: int, count: int) -> int:
        rel = offset - pending.offset
        if rel < 0 or rel + count > pending.length:
            raise ProtocolError(
                f"chunk [{offset}, {offset + count}) outside the request "
                f"[{pending.offset}, {pending.offset + pending.length})"
            )
        if pending.coverage is None:
            pending.coverage = _Coverage()
        pending.coverage.add(rel, rel + count)
        return rel

    def _block_status(self, pending: _Pending, payload: bytes) -> None:
        if pending.command != Command.BLOCK_STATUS:
            raise ProtocolError("BLOCK_STATUS chunk for another command")
        size = len(payload) - _U32.size
        if size <= 0 or size % BLOCK_DESCRIPTOR.size:
            raise ProtocolError(f"BLOCK_STATUS chunk of {len(payload)} bytes")
        (context_id,) = _U32.unpack_from(payload)
        if context_id not in self._context_ids:
            raise ProtocolError(f"BLOCK_STATUS for unknown meta context {context_id}")
        if context_id in pending.extents:
            raise ProtocolError(f"second BLOCK_STATUS chunk for meta context {context_id}")
        extents = []
        total = 0
        for length, flags in BLOCK_DESCRIPTOR.iter_unpack(payload[_U32.size :]):
            if length == 0:
                raise ProtocolError("block status extent of zero bytes")
            if total >= pending.length:
                raise ProtocolError(f"block status goes on past the {pending.length} bytes asked")
            # The final extent may run past the request (nbdkit does so: the
            # spec allows it to save a round trip); we report only what was
            # asked, so every reply describes at most its request's range.
            length = min(length, pending.length - total)
            total += length
            extents.append(Extent(length, BlockState(flags)))
        if pending.flags & CommandFlag.REQ_ONE and len(extents) > 1:
            raise ProtocolError("several extents in answer to REQ_ONE")
        pending.extents[context_id] = tuple(extents)

    def _error_chunk(self, pending: _Pending, kind: int, payload: bytes) -> None:
        if len(payload) < _ERROR_HEAD.size:
            raise ProtocolError("error chunk too short")
        error, count = _ERROR_HEAD.unpack_from(payload)
        end = _ERROR_HEAD.size + count
        if end > len(payload):
            raise ProtocolError("error chunk message longer than the chunk")
        if kind == ReplyType.ERROR_OFFSET:
            if len(payload) < end + _U64.size:
                raise ProtocolError("ERROR_OFFSET chunk too short for its offset")
            (offset,) = _U64.unpack_from(payload, end)
            if not pending.offset <= offset < pending.offset + max(pending.length, 1):
                raise ProtocolError(f"error offset {offset} outside the request")
        # Unknown kinds with the error bit: the spec says treat the reply as failed.
        if pending.error == Errno.OK:
            pending.error = _errno(error)
            pending.message = _text(payload[_ERROR_HEAD.size : end])

    def _complete(self, handle: int, pending: _Pending) -> Reply:
        if pending.error != Errno.OK:
            return Reply(handle, pending.error, message=pending.message)
        if pending.command == Command.READ:
            covered = 0 if pending.coverage is None else pending.coverage.total
            if covered != pending.length:
                raise ProtocolError(
                    f"READ claimed done with {covered} of {pending.length} bytes sent"
                )
            data = bytes(pending.buffer) if pending.buffer is not None else b""
            return Reply(handle, Errno.OK, data)
        if pending.command == Command.BLOCK_STATUS and not pending.extents:
            raise ProtocolError("BLOCK_STATUS answered without any extents")
        return Reply(handle, Errno.OK, extents=pending.extents)
