#!/usr/bin/env python3
"""Fuzz target: the NBD server's parser (``ferry.nbd.server.ServerConnection``), newstyle.

Client bytes go in, from the client flags through option haggling
(including ferry's ``FERRY_OPT_MIGRATE`` with a ``MigrationCatalog`` that
admits or refuses, ``FERRY_OPT_LOCATE`` with a ``Locator``, and
``NBD_OPT_STARTTLS`` under each ``TLSMode``) into
transmission (including ``FERRY_CMD_COMMIT``).  What
is checked is what the module docstring promises, not only that nothing
crashes:

1. ``receive_data`` raises nothing but ``ProtocolError``, and once it has,
   every later call raises it again and ``closed`` is true.
2. Every ``Request`` may be performed as it stands: a command the export
   advertised, flags allowed for it, in range, aligned, within
   ``max_request_size`` for READ and WRITE, a WRITE's ``data`` exactly
   ``length`` bytes of ``bytes``; a flexnbd mirror-only connection only
   gets its mirror writes and FLUSH.  ``Commit`` and ``CarriedConnection``
   (whose state is at most ``FERRY_MAX_CONNECTION`` bytes) only on the
   connection whose ``FERRY_OPT_MIGRATE`` the catalog admitted; nothing before
   ``HandshakeComplete`` or after ``Disconnect``/``HandshakeAborted``.
   ``StartTLS`` at most once, before ``HandshakeComplete``, never with TLS
   off; with TLS required, no ``HandshakeComplete`` without it; and a sender
   admitted before it is forgotten (``HandshakeComplete.migration`` is one
   admitted after it).
3. What the connection holds between calls stays in its bounds: less than
   a client-flags word, one option header plus ``MAX_OPTION_LENGTH``, less
   than one request header, or one WRITE payload of at most
   ``max_request_size`` (a rejected WRITE's payload is counted, not kept),
   or one carried connection's state of at most ``FERRY_MAX_CONNECTION``.
4. The same bytes split differently give the same events and the same
   output, and the output is well-framed: the greeting, option replies with
   known types, UTF-8 messages within the protocol's 4096 bytes, consistent
   block sizes, and at most one EXPORT_NAME answer carrying the export's size.
   A FERRY_REP_LOCATION answers only ``FERRY_OPT_LOCATE``, only with a
   locator, and carries the place the locator named; a FERRY_REP_LANDING
   answers only ``FERRY_OPT_CONNECTIONS``, only with a migration catalog,
   and carries the catalog's landing; no flag outside an export's
   ``advertise`` cap is advertised.

Input: ``[config][split seed][client bytes]``.  The config byte picks the
export (size, minimum block size, read-only), whether there is a migration
catalog and whether it admits the sender, a small ``max_request_size``
so that limit is reachable by a fuzzer's short inputs, and ferry's
extras: a locator ("disk" has moved, "" is here) and the disk's flags
capped as a ``ferry proxy`` caps them.  The seed picks
where the stream is cut, and its two high bits the TLS mode (the config
byte has no bit left): 1 on, 2 required, else off; each input runs whole,
cut by the seed, and --
when short enough to afford it -- byte by byte.

The harness plays the caller's part in STARTTLS: once ``StartTLS`` comes
it calls ``tls_started`` and feeds the rest of the stream as what TLS
decrypted.  A real client sends nothing after STARTTLS until the ACK, so
every split is also cut where the first STARTTLS option without data ends
(``tls_boundary``): what the parser does with plaintext that follows the
option in the same call (it breaks) is a unit test's, not a split's.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from ferry.nbd.constants import (
    FERRY_CMD_CONNECTION,
    FERRY_MAX_CONNECTION,
    FERRY_OPT_CONNECTIONS,
    FERRY_REP_LANDING,
    FLEXNBD_MIRROR_HANDLE,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_REQUEST_SIZE,
    MAX_STRING_LENGTH,
    OPTION_HEADER,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    OptionReply,
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
    HandshakeAborted,
    HandshakeComplete,
    MigrationRequest,
    ProtocolError,
    Refusal,
    RejectedRequest,
    Request,
    StartTLS,
)
from ferry.nbd.locate import FERRY_OPT_LOCATE, FERRY_REP_LOCATION, Location, decode_location
from ferry.nbd.server import ServerConnection
from fuzzing import Violation, bytewise, chunks, expect, run, same_session, stays_broken

# Sizes chosen to make the range checks interesting: empty, ordinary, not a
# multiple of any block size, and the largest a u64 can say.
SIZES: Final = (0, 1 << 20, 3 * 4096 + 1, (1 << 64) - 1)
SMALL_MAX_REQUEST: Final = 4096
# Longer than the protocol's string limit and cut inside a two-byte character,
# so the truncation of a description shows.
DESCRIPTION: Final = "x" * (MAX_STRING_LENGTH - 1) + "é and more"
BYTEWISE_LIMIT: Final = 512  # inputs up to this long also run one byte per call

_OPTION_REPLY: Final = struct.Struct(">QIII")
_OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
_GREETING: Final = b"NBDMAGIC" + b"IHAVEOPT"
_SIMPLE_REPLY_MAGIC: Final = 0x67446698
_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
_KNOWN_REPLIES: Final = frozenset(int(r) for r in OptionReply)
_HEADER: Final = 28  # an NBD request header
# Where the locator says "disk" went; and the flags a capped export may offer
# (a proxy in front of a server without WRITE_ZEROES, CACHE or structured replies).
HANDED_TO: Final = Location("fe80::2", 10809, "disk")
LANDING: Final = ConnectionLanding("boot/net:1", "10.0.0.5/24@eth0")
CAP: Final = TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
_ALWAYS_ADVERTISED: Final = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
_OPTION_HEADER: Final = 16


@dataclass(frozen=True)
class Setup:
    """What one config byte chooses."""

    size: int
    min_block: int
    read_only: bool
    migration: bool  # a MigrationCatalog is given
    admits: bool  # ... and it admits the sender
    max_request_size: int
    extras: bool  # a Locator, and the disk's flags capped to CAP
    tls: TLSMode = TLSMode.OFF

    @classmethod
    def from_byte(cls, config: int, seed: int | None = None) -> Setup:
        """The setup ``config`` picks; TLS from the ``seed``'s high bits (None: off, oldstyle)."""
        tls = TLSMode.OFF
        if seed is not None:
            tls = {1: TLSMode.ON, 2: TLSMode.REQUIRE}.get(seed >> 6, TLSMode.OFF)
        return cls(
            size=SIZES[config & 3],
            min_block=512 if config & 4 else 1,
            read_only=bool(config & 8),
            migration=bool(config & 16),
            admits=bool(config & 32),
            max_request_size=SMALL_MAX_REQUEST if config & 64 else MAX_REQUEST_SIZE,
            extras=bool(config & 128),
            tls=tls,
        )

    def disk(self) -> ExportInfo:
        return ExportInfo(
            "disk",
            self.size,
            read_only=self.read_only,
            description=DESCRIPTION,
            min_block_size=self.min_block,
            advertise=CAP if self.extras else None,
        )

    def listening(self) -> ExportInfo:
        return ExportInfo("listening", self.size, min_block_size=self.min_block)


class Catalog:
    """ "" and "disk" are the disk; "listening" refuses ordinary clients, as a listener does."""

    def __init__(self, setup: Setup, *, default: bool = True) -> None:
        self.disk = setup.disk()
        self.default = default

    def lookup(self, name: str) -> ExportInfo | Refusal:
        if name == "disk" or (name == "" and self.default):
            return self.disk
        if name == "listening":
            return Refusal(OptionReply.ERR_POLICY, "listening for a migration")
        return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")

    def listing(self) -> Sequence[ExportInfo]:
        return [self.disk]


class Locations:
    """A Locator: "disk" was handed off to HANDED_TO, "" is here, other names are unknown."""

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        if name == "disk":
            return [HANDED_TO]
        if name == "":
            return []
        return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")


@dataclass
class Migrations:
    """A MigrationCatalog that admits (or refuses) every sender, and remembers whom.

    ``listening`` says whether the listening export is there for a sender.
    """

    setup: Setup
    admits: bool
    listening: bool = True
    admitted: list[MigrationRequest] = field(default_factory=list)

    def admit_migration(self, request: MigrationRequest) -> Refusal | None:
        if not self.admits:
            return Refusal(OptionReply.ERR_POLICY, "this node is not listening")
        self.admitted.append(request)
        return None

    def connection_landing(self) -> ConnectionLanding | Refusal:
        if not self.listening:
            return Refusal(OptionReply.ERR_UNSUP, "this node takes no client connections")
        return LANDING

    def lookup_sender(self, name: str) -> ExportInfo | Refusal:
        if name in ("", "listening") and self.listening:
            return self.setup.listening()
        if name == "disk":
            return self.setup.disk()
        return Refusal(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")


@dataclass
class Outcome:
    """What one session gave: every event, every byte of handshake output, the error if any."""

    events: list[Event]
    output: bytes
    error: str | None
    advertised: TransmissionFlag
    admitted: list[MigrationRequest]
    # How many senders were admitted when TLS started (None: it did not).
    admitted_before_tls: int | None = None


def newstyle(setup: Setup) -> tuple[ServerConnection, Migrations | None]:
    migrations = Migrations(setup, setup.admits) if setup.migration else None
    conn = ServerConnection(
        Catalog(setup),
        migration=migrations,
        locator=Locations() if setup.extras else None,
        max_request_size=setup.max_request_size,
        tls=setup.tls,
    )
    return conn, migrations


def session(
    conn: ServerConnection, migrations: Migrations | None, setup: Setup, pieces: list[bytes]
) -> Outcome:
    """Feed ``pieces`` one call each, checking the bounds after every call."""
    events: list[Event] = []
    output = bytearray(conn.data_to_send())
    error = None
    admitted_before_tls = None
    for piece in pieces:
        try:
            got = conn.receive_data(piece)
        except ProtocolError as broken:
            error = str(broken)
            output += conn.data_to_send()
            expect(conn.closed, "a connection that raised ProtocolError is not closed")
            stays_broken(conn.receive_data)
            break
        output += conn.data_to_send()
        events += got
        check_held(conn, setup)
        if any(type(event) is StartTLS for event in got):
            expect(type(got[-1]) is StartTLS, "events after StartTLS in the same call")
            expect(not conn.tls, "StartTLS once TLS is on")
            # The caller's part: TLS is up, and the rest is what it decrypts.
            conn.tls_started()
            admitted_before_tls = len(migrations.admitted) if migrations is not None else 0
    else:
        if conn.closed:
            # After an abort or DISC, stray bytes are ignored, not an error.
            expect(conn.receive_data(b"\0" * _HEADER) == [], "input after the end made events")
    admitted = list(migrations.admitted) if migrations is not None else []
    return Outcome(events, bytes(output), error, conn.flags, admitted, admitted_before_tls)


def check_held(conn: ServerConnection, setup: Setup) -> None:
    """Invariant 3 of the module: what the connection keeps between calls is bounded.

    Reads the connection's private fields on purpose: the bound is about
    them, and nothing public shows it.
    """
    state = conn._state.name
    held = len(conn._buffer)
    if state == "CLIENT_FLAGS":
        expect(held < 4, f"{held} bytes held while waiting for the client flags")
    elif state == "OPTIONS":
        limit = _OPTION_HEADER + MAX_OPTION_LENGTH
        expect(held < limit, f"{held} bytes held in option haggling (limit {limit})")
    elif state == "TRANSMISSION":
        expect(held < _HEADER, f"{held} bytes held between requests")
    elif state == "PAYLOAD":
        expect(held == 0, f"{held} bytes held beside a WRITE payload")
        if conn._write is not None:
            length = conn._write[3]
            limit = (
                FERRY_MAX_CONNECTION
                if conn._payload_command == FERRY_CMD_CONNECTION
                else setup.max_request_size
            )
            expect(length <= limit, f"collecting a payload of {length} bytes")
            kept = sum(len(chunk) for chunk in conn._chunks)
            expect(kept + conn._need == length, f"{kept} kept + {conn._need} to come != {length}")
        else:
            expect(not conn._chunks, "the payload of a rejected WRITE is being kept")
            expect(conn._held is not None, "counting off a payload with no rejection to send")
    else:
        expect(held == 0, f"{held} bytes held by a {state} connection")


def allowed_flags(command: Command, advertised: TransmissionFlag) -> int:
    """The flags the spec lets a client set on ``command`` after ``advertised``."""
    fua = int(CommandFlag.FUA) if advertised & TransmissionFlag.SEND_FUA else 0
    if command is Command.READ:
        return fua | (int(CommandFlag.DF) if advertised & TransmissionFlag.SEND_DF else 0)
    if command is Command.WRITE_ZEROES:
        fast = advertised & TransmissionFlag.SEND_FAST_ZERO
        return fua | int(CommandFlag.NO_HOLE) | (int(CommandFlag.FAST_ZERO) if fast else 0)
    if command is Command.BLOCK_STATUS:
        return fua | int(CommandFlag.REQ_ONE)
    return fua


_NEEDS: Final = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.CACHE: TransmissionFlag.SEND_CACHE,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}
_WRITING: Final = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})


def check_request(
    request: Request, complete: HandshakeComplete, advertised: TransmissionFlag, setup: Setup
) -> None:
    """Invariant 1 of the module: the request may be performed as it stands."""
    command = request.command
    what = f"{request!r:.200}"
    expect(isinstance(command, Command) and command is not Command.DISC, f"command of {what}")
    expect(int(request.flags) & ~allowed_flags(command, advertised) == 0, f"flags of {what}")
    need = _NEEDS.get(command)
    expect(need is None or bool(advertised & need), f"{command.name} was not advertised")
    if command in _WRITING:
        expect(not advertised & TransmissionFlag.READ_ONLY, f"{what} on a read-only export")
    if command is Command.BLOCK_STATUS:
        expect(bool(complete.meta_contexts), "BLOCK_STATUS without a meta context")
        expect(request.length > 0, "BLOCK_STATUS of 0 bytes")
    if command is Command.FLUSH:
        expect(request.offset == 0 and request.length == 0, f"FLUSH with a range: {what}")
    export = complete.export
    expect(request.offset + request.length <= export.size, f"{what} past {export.size}")
    expect((request.offset | request.length) % export.min_block_size == 0, f"{what} unaligned")
    if command in (Command.READ, Command.WRITE):
        expect(request.length <= setup.max_request_size, f"{what} over max_request_size")
    if command is Command.WRITE:
        expect(type(request.data) is bytes, f"WRITE data is a {type(request.data).__name__}")
        expect(len(request.data) == request.length, f"WRITE of {len(request.data)} bytes: {what}")
    else:
        expect(request.data == b"", f"{what} carries data")
    if complete.flexnbd:
        mirror = command in _WRITING and request.handle == FLEXNBD_MIRROR_HANDLE
        expect(mirror or command is Command.FLUSH, f"mirror-only connection performs {what}")


def check_events(outcome: Outcome, setup: Setup) -> None:
    """Invariant 2: events in a possible order, each acceptable as it stands."""
    complete: HandshakeComplete | None = None
    ended = False
    tls = False
    for event in outcome.events:
        expect(not ended, f"{event!r:.200} after the session ended")
        if isinstance(event, StartTLS):
            expect(setup.tls is not TLSMode.OFF, "StartTLS with TLS off")
            expect(not tls, "a second StartTLS")
            expect(complete is None, "StartTLS after the handshake")
            tls = True
            continue
        if isinstance(event, HandshakeComplete):
            expect(complete is None, "a second HandshakeComplete")
            complete = event
            expect(
                event.export in (setup.disk(), setup.listening()),
                f"handshake to {event.export!r}",
            )
            cap = event.export.advertise
            if cap is not None:
                over = outcome.advertised & ~(cap | _ALWAYS_ADVERTISED)
                expect(not over, f"advertised {over!r}, outside the export's cap")
            if event.export.name == "listening":
                expect(
                    event.migration is not None or event.flexnbd,
                    "a plain client reached the listening export",
                )
            expect(
                tls or setup.tls is not TLSMode.REQUIRE,
                "the handshake completed without TLS, which is required",
            )
            if event.migration is not None:
                since = (outcome.admitted_before_tls or 0) if tls else 0
                expect(
                    any(event.migration is m for m in outcome.admitted[since:]),
                    "HandshakeComplete names a sender the catalog did not admit"
                    + (" since TLS started" if tls else ""),
                )
            expect(
                set(event.meta_contexts.items()) <= {(1, "base:allocation")},
                f"meta contexts {event.meta_contexts}",
            )
            expect(
                not event.meta_contexts or event.structured_replies,
                "a meta context without structured replies",
            )
            continue
        if isinstance(event, HandshakeAborted):
            expect(complete is None, "HandshakeAborted after the handshake")
            ended = True
            continue
        expect(complete is not None, f"{event!r:.200} before the handshake completed")
        assert complete is not None
        if isinstance(event, Disconnect):
            ended = True
        elif isinstance(event, Request):
            check_request(event, complete, outcome.advertised, setup)
        elif isinstance(event, Commit):
            expect(complete.migration is not None, "Commit from a connection that is no sender")
        elif isinstance(event, CarriedConnection):
            expect(complete.migration is not None, "a connection carried by one that is no sender")
            expect(0 < len(event.state) <= FERRY_MAX_CONNECTION, "a carried state out of bounds")
        elif isinstance(event, RejectedRequest):
            expect(
                isinstance(event.error, Errno) and event.error != Errno.OK,
                f"rejection with error {event.error!r}",
            )
            if complete.flexnbd and event.command not in (*_WRITING, Command.FLUSH):
                expect(event.error == Errno.EPERM, f"mirror-only rejection {event!r:.200}")
        else:
            raise Violation(f"unexpected event {event!r:.200}")


def check_output(outcome: Outcome, setup: Setup, *, oldstyle: bool = False) -> None:
    """Invariant 4's second half: what the server said is well-framed and truthful."""
    out = outcome.output
    # Both exports have the setup's size.  (Not the HandshakeComplete's: a
    # run that failed later in the same call has its events dropped.)
    if oldstyle:
        expect(len(out) in (0, 152), f"oldstyle greeting of {len(out)} bytes")
        if out:
            (size,) = struct.unpack_from(">Q", out, 16)
            expect(size == setup.size, f"greeting's size {size}")
        return
    expect(out[:16] == _GREETING and len(out) >= 18, "no newstyle greeting")
    pos = 18
    while len(out) - pos >= _OPTION_REPLY.size:
        magic, option, reply, length = _OPTION_REPLY.unpack_from(out, pos)
        if magic != _OPTION_REPLY_MAGIC:
            break  # the EXPORT_NAME answer, checked below
        pos += _OPTION_REPLY.size
        payload = out[pos : pos + length]
        expect(len(payload) == length, "option reply cut short")
        pos += length
        check_option_reply(option, reply, payload, setup)
    rest = out[pos:]
    if rest:
        expect(len(rest) in (10, 134), f"{len(rest)} bytes after the option replies")
        (size,) = struct.unpack_from(">Q", rest)
        expect(size == setup.size, f"EXPORT_NAME's size {size}")
        expect(rest[10:] == bytes(len(rest) - 10), "EXPORT_NAME padding is not zeroes")


def check_option_reply(option: int, reply: int, payload: bytes, setup: Setup) -> None:
    if option == FERRY_OPT_LOCATE and not setup.extras:
        expect(bool(reply & (1 << 31)), f"FERRY_OPT_LOCATE without a locator answered {reply:#x}")
    if reply == FERRY_REP_LOCATION:
        expect(setup.extras and option == FERRY_OPT_LOCATE, f"a LOCATION for {option:#x}")
        try:
            location = decode_location(payload)
        except ValueError as error:
            raise Violation(f"a LOCATION that does not parse: {error}") from None
        expect(location == HANDED_TO, f"LOCATION {location}, which the locator never named")
        return
    if reply == FERRY_REP_LANDING:
        expect(setup.migration and option == FERRY_OPT_CONNECTIONS, f"a LANDING for {option:#x}")
        try:
            landing = ConnectionLanding.from_bytes(payload)
        except ValueError as error:
            raise Violation(f"a LANDING that does not parse: {error}") from None
        expect(landing == LANDING, f"LANDING {landing}, which the catalog never named")
        return
    expect(reply in _KNOWN_REPLIES, f"option reply type {reply:#x}")
    if reply & (1 << 31) or (reply == OptionReply.INFO and payload[:2] == b"\0\2"):
        text = payload if reply & (1 << 31) else payload[2:]
        expect(len(text) <= MAX_STRING_LENGTH, f"a message of {len(text)} bytes")
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            raise Violation(f"message {text[:60]!r} is not UTF-8") from None
    elif reply == OptionReply.INFO:
        expect(len(payload) >= 2, "INFO without a type")
        (kind,) = struct.unpack_from(">H", payload)
        if kind == Info.EXPORT:
            expect(len(payload) == 12, "NBD_INFO_EXPORT length")
            (size,) = struct.unpack_from(">Q", payload, 2)
            expect(size == setup.size, f"NBD_INFO_EXPORT size {size}")
        elif kind == Info.BLOCK_SIZE:
            expect(len(payload) == 14, "NBD_INFO_BLOCK_SIZE length")
            minimum, preferred, maximum = struct.unpack_from(">III", payload, 2)
            expect(
                1 <= minimum <= preferred and minimum <= maximum <= setup.max_request_size,
                f"block sizes {minimum}/{preferred}/{maximum}",
            )


Connect = Callable[[Setup], tuple[ServerConnection, "Migrations | None"]]


def check_splits(
    setup: Setup, stream: bytes, seed: int, *, connect: Connect, oldstyle: bool = False
) -> None:
    """Run ``stream`` whole, cut by ``seed`` and (short ones) bytewise; check and compare."""
    prefix = [b""] if oldstyle else []  # oldstyle: the events waiting from __init__
    boundary = tls_boundary(stream) if setup.tls is not TLSMode.OFF else None
    parts = [stream] if boundary is None else [stream[:boundary], stream[boundary:]]
    splits = [
        ("whole", parts),
        (f"split {seed}", [piece for part in parts for piece in chunks(part, seed)]),
    ]
    if len(stream) <= BYTEWISE_LIMIT:
        splits.append(("bytewise", bytewise(stream)))
    outcomes = []
    for how, pieces in splits:
        conn, migrations = connect(setup)
        outcome = session(conn, migrations, setup, prefix + pieces)
        check_events(outcome, setup)
        check_output(outcome, setup, oldstyle=oldstyle)
        outcomes.append((how, outcome))
    reference_how, reference = outcomes[-1]
    for how, outcome in outcomes[:-1]:
        same_session(reference, outcome, f"{reference_how} vs {how}")


def tls_boundary(stream: bytes) -> int | None:
    """Where the first STARTTLS option without data ends in ``stream``, if it comes at all.

    The walk reads option frames after the client flags and stops at the
    first that is not one (transmission begins with a request's magic, never
    IHAVEOPT): the cut is where a real client's plaintext would end.  A cut
    anywhere else in a stream is harmless (invariant 4), so a STARTTLS that
    turns out to be refused costs nothing.
    """
    pos = 4
    while len(stream) - pos >= OPTION_HEADER.size:
        magic, option, length = OPTION_HEADER.unpack_from(stream, pos)
        if magic != IHAVEOPT or length > MAX_OPTION_LENGTH:
            return None
        pos += OPTION_HEADER.size + length
        if option == Option.STARTTLS and length == 0:
            return pos if pos < len(stream) else None
    return None


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    setup = Setup.from_byte(data[0], data[1])
    check_splits(setup, data[2:], data[1], connect=newstyle)


if __name__ == "__main__":
    run(check, sys.argv)
