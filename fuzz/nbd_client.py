#!/usr/bin/env python3
"""Fuzz target: the NBD client's parser (``ferry.nbd.client.ClientConnection``).

The client is fed what a server could send: first the handshake (its
greeting and the replies to the client's options), then -- once it has
negotiated -- the replies to a script of requests of every kind (READ, READ
with DF, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS with and
without REQ_ONE, ferry's FERRY_CMD_COMMIT, DISC), and finally the end of
the stream.  The module docstring's promises are checked:

1. ``receive_data`` raises nothing but ``ProtocolError``; after it has, every
   later call raises it again.
2. Every ``Reply`` answers exactly one request in flight, once: a successful
   READ carries exactly its length of data; a BLOCK_STATUS carries, for
   negotiated contexts only, extents of non-zero length that describe at
   most the range asked (one with REQ_ONE); an error is an ``Errno``.
   ``Negotiated`` comes once, before any reply; ``OptionAnswered`` only for
   the option the caller added, and ``OptionData`` only for the one being
   answered, before its ``OptionAnswered``, neither an ACK nor an error, its
   payload within ``MAX_OPTION_REPLY_LENGTH``; nothing follows
   ``NegotiationFailed``.
3. What the client holds after a call is less than one frame it accepts:
   the oldstyle greeting, an option reply of ``MAX_OPTION_REPLY_LENGTH``, a
   structured chunk of ``max_reply_size``.
4. The end of the stream with requests unanswered is a ``ProtocolError``.
5. The same bytes split differently give the same events and the same
   bytes sent to the server.
6. A client that insists on TLS (``tls=True``) never negotiates without
   it: ``StartTLS`` comes once, before any ``OptionAnswered``, and before
   ``Negotiated`` (never an oldstyle one); without ``tls`` it never comes.

Input: ``[config][split seed][u16 n][n handshake bytes][u8 k][k script bytes][reply bytes]``.
Config bits: 0 ask for structured replies, 1 ask for ``base:allocation``,
2 send ``FERRY_OPT_MIGRATE`` first, 3 a 4096-byte ``max_reply_size``, 4 the
export name "disk" (else ""), 5 send ``FERRY_OPT_LOCATE`` (after the
migration option, if both), as ``ferry proxy`` does, 6 insist on TLS.  Each
script byte is one request: the low
nibble its kind, the high nibble its length (from ``LENGTHS``); the offset
is 512 times its place in the script.

With TLS the harness plays the caller's part: once ``StartTLS`` comes it
calls ``tls_started`` and feeds the rest of the handshake as what TLS
decrypted.  A real server sends nothing after its ACK to STARTTLS until
the client's TLS hello, so every split of the handshake is also cut where
the server's first option reply ends (``tls_boundary``).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from typing import Final

from ferry.nbd.client import MAX_OPTION_REPLY_LENGTH, ClientConnection
from ferry.nbd.constants import (
    BASE_ALLOCATION,
    FERRY_MIGRATE_REQUEST,
    FERRY_OPT_MIGRATE,
    FLEXNBD_MIRROR_HANDLE,
    GREETING_NEWSTYLE,
    MAX_REQUEST_SIZE,
    Command,
    CommandFlag,
    Errno,
    OptionReply,
)
from ferry.nbd.events import (
    Event,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    OptionData,
    ProtocolError,
    Reply,
    StartTLS,
)
from ferry.nbd.locate import locate_option
from fuzzing import Violation, chunks, expect, run, same_session, stays_broken

LENGTHS: Final = (0, 1, 2, 7, 8, 511, 512, 513, 1024, 4088, 4096, 4097, 65536, 1 << 20, 3, 9)
MAX_WRITE: Final = 65536  # longer WRITEs are left out of the script: they test nothing more
SMALL_REPLY: Final = 4096

_STRUCTURED_HEADER: Final = 20
_OLDSTYLE_GREETING: Final = 152
_EXPORT_NAME_REPLY: Final = 134
_OPTION_REPLY_HEADER: Final = 20
_OPTION_REPLY: Final = struct.Struct(">QIII")  # magic, option, reply type, length


@dataclass(frozen=True)
class Setup:
    structured: bool
    contexts: tuple[str, ...]
    extra: tuple[tuple[int, bytes], ...]
    max_reply_size: int
    export_name: str
    tls: bool = False

    @classmethod
    def from_byte(cls, config: int) -> Setup:
        migrate = FERRY_MIGRATE_REQUEST.pack(1, 1 << 20) + b"vm1"
        export_name = "disk" if config & 16 else ""
        extra = ((FERRY_OPT_MIGRATE, migrate),) if config & 4 else ()
        if config & 32:
            extra += (locate_option(export_name),)
        return cls(
            structured=bool(config & 1),
            contexts=(BASE_ALLOCATION,) if config & 2 else (),
            extra=extra,
            max_reply_size=SMALL_REPLY if config & 8 else MAX_REQUEST_SIZE + 4096,
            export_name=export_name,
            tls=bool(config & 64),
        )

    def connect(self) -> ClientConnection:
        return ClientConnection(
            self.export_name,
            structured_replies=self.structured,
            meta_contexts=self.contexts,
            max_reply_size=self.max_reply_size,
            extra_options=self.extra,
            tls=self.tls,
        )


@dataclass(frozen=True)
class Sent:
    """A request the script made, as the oracle remembers it."""

    command: int
    flags: CommandFlag
    offset: int
    length: int


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    output: bytes = b""  # what the client sent
    error: str | None = None
    requests: dict[int, Sent] = field(default_factory=dict)
    contexts: dict[str, int] = field(default_factory=dict)


def parse(data: bytes) -> tuple[Setup, int, bytes, bytes, bytes] | None:
    if len(data) < 4:
        return None
    (count,) = struct.unpack_from(">H", data, 2)
    handshake = data[4 : 4 + count]
    rest = data[4 + count :]
    script = rest[1 : 1 + rest[0]] if rest else b""
    replies = rest[1 + len(script) :]
    return Setup.from_byte(data[0]), data[1], handshake, script, replies


def issue(conn: ClientConnection, setup: Setup, script: bytes) -> dict[int, Sent]:
    """Make the script's requests; the handles the server must answer."""
    sent: dict[int, Sent] = {}
    for i, byte in enumerate(script):
        kind, length, offset = byte & 15, LENGTHS[byte >> 4], 512 * i
        flags = CommandFlag(0)
        handle: int | None = None
        if kind in (0, 1, 12):
            command = Command.READ
            flags = CommandFlag.DF if kind == 1 else flags
            if length + 8 > setup.max_reply_size:
                continue
        elif kind in (2, 3, 15):
            command = Command.WRITE
            flags = CommandFlag.FUA if kind == 3 else flags
            handle = FLEXNBD_MIRROR_HANDLE if kind == 15 else None
            if length > MAX_WRITE or (handle is not None and handle in sent):
                continue
        elif kind == 4:
            command, offset, length = Command.FLUSH, 0, 0
        elif kind == 5:
            command = Command.TRIM
        elif kind == 6:
            command = Command.CACHE
        elif kind in (7, 14):
            command = Command.WRITE_ZEROES
            flags = CommandFlag.NO_HOLE if kind == 14 else flags
        elif kind in (8, 9, 13):
            command = Command.BLOCK_STATUS
            flags = CommandFlag.REQ_ONE if kind == 9 else flags
        elif kind == 10:
            handle = conn.commit(i)
            sent[handle] = Sent(0xF001, CommandFlag(0), i, 0)
            continue
        else:  # 11
            conn.request(Command.DISC)
            break
        data = bytes([i & 255]) * length if command is Command.WRITE else b""
        handle = conn.request(command, offset, length, flags=flags, data=data, handle=handle)
        sent[handle] = Sent(int(command), flags, offset, length)
    return sent


def feed(conn: ClientConnection, setup: Setup, outcome: Outcome, pieces: list[bytes]) -> None:
    """Feed each piece (b"" is the end of the stream), checking bounds after every call."""
    for piece in pieces:
        try:
            got = conn.receive_data(piece)
        except ProtocolError as broken:
            outcome.error = str(broken)
            stays_broken(conn.receive_data)
            outcome.output += conn.data_to_send()
            return
        outcome.output += conn.data_to_send()
        outcome.events += got
        for event in got:
            if isinstance(event, Negotiated):
                outcome.contexts = dict(event.meta_contexts)
        check_held(conn, setup)
        if any(type(event) is StartTLS for event in got):
            expect(type(got[-1]) is StartTLS, "events after StartTLS in the same call")
            # The caller's part: TLS is up, and the rest is what it decrypts.
            conn.tls_started()
            outcome.output += conn.data_to_send()


def check_held(conn: ClientConnection, setup: Setup) -> None:
    """Invariant 3, read from the connection's private buffer on purpose."""
    held = len(conn._buf) - conn._pos
    state = conn._state.name
    limits = {
        "GREETING": _OLDSTYLE_GREETING,
        "OPTION": _OPTION_REPLY_HEADER + MAX_OPTION_REPLY_LENGTH,
        "EXPORT_NAME": _EXPORT_NAME_REPLY,
        "TRANSMISSION": _STRUCTURED_HEADER + setup.max_reply_size,
    }
    # FAILED keeps what an unfinished frame had when the stream ended (the
    # EXPORT_NAME answer cut short) and reads nothing more: that frame's bound.
    limits["FAILED"] = max(limits.values())
    limit = limits.get(state, 1)
    expect(held < limit, f"{held} bytes held in {state} (limit {limit})")


def session(setup: Setup, handshake: list[bytes], script: bytes, replies: list[bytes]) -> Outcome:
    conn = setup.connect()
    outcome = Outcome(output=conn.data_to_send())
    feed(conn, setup, outcome, handshake)
    if outcome.error is None and conn.negotiated is not None:
        outcome.requests = issue(conn, setup, script)
        outcome.output += conn.data_to_send()
    if outcome.error is None:
        feed(conn, setup, outcome, [*replies, b""])
        if outcome.error is None and conn.negotiated is not None:
            unanswered = conn.in_flight()
            expect(unanswered == 0, f"the end of the stream with {unanswered} requests unanswered")
    return outcome


def check_events(outcome: Outcome, setup: Setup) -> None:
    """Invariant 2."""
    negotiated = failed = tls = False
    answered = 0
    waiting = dict(outcome.requests)
    context_ids = set(outcome.contexts.values())
    for event in outcome.events:
        expect(not failed, f"{event!r:.200} after NegotiationFailed")
        if isinstance(event, StartTLS):
            expect(setup.tls, "StartTLS from a client that did not ask for TLS")
            expect(not tls, "a second StartTLS")
            expect(not negotiated and not answered, "StartTLS after another option's answer")
            tls = True
        elif isinstance(event, OptionAnswered):
            expect(not negotiated, "OptionAnswered after Negotiated")
            expect(event.option in [o for o, _ in setup.extra], f"answer to {event.option:#x}")
            answered += 1
            expect(answered <= len(setup.extra), "an option answered twice")
        elif isinstance(event, OptionData):
            expect(not negotiated, "OptionData after Negotiated")
            expect(answered < len(setup.extra), f"data for {event.option:#x}, not asked")
            expect(event.option == setup.extra[answered][0], f"data for {event.option:#x}")
            expect(
                event.reply != OptionReply.ACK and event.reply < 1 << 31,
                f"OptionData of reply type {event.reply:#x}",
            )
            expect(type(event.payload) is bytes, "OptionData's payload is not bytes")
            expect(len(event.payload) <= MAX_OPTION_REPLY_LENGTH, "OptionData past the limit")
        elif isinstance(event, NegotiationFailed):
            expect(not negotiated, "NegotiationFailed after Negotiated")
            failed = True
        elif isinstance(event, Negotiated):
            expect(not negotiated, "a second Negotiated")
            negotiated = True
            expect(tls or not setup.tls, "negotiated without TLS, which the client insists on")
            check_negotiated(event, setup)
        elif isinstance(event, Reply):
            expect(negotiated, "a Reply before Negotiated")
            sent = waiting.pop(event.handle, None)
            expect(sent is not None, f"a Reply for {event.handle:#x}, which is not waiting")
            assert sent is not None
            check_reply(event, sent, context_ids)
        else:
            raise Violation(f"unexpected event {event!r:.200}")


def check_negotiated(event: Negotiated, setup: Setup) -> None:
    expect(0 <= event.size < 1 << 64, f"size {event.size}")
    expect(
        1 <= event.min_block_size <= event.preferred_block_size
        and event.min_block_size <= event.max_block_size,
        f"block sizes {event.min_block_size}/{event.preferred_block_size}/{event.max_block_size}",
    )
    expect(event.structured_replies <= setup.structured, "structured replies nobody asked for")
    expect(
        not event.meta_contexts or (event.structured_replies and bool(setup.contexts)),
        f"meta contexts {event.meta_contexts} without asking or structured replies",
    )


def check_reply(reply: Reply, sent: Sent, context_ids: set[int]) -> None:
    what = f"{reply!r:.200} to {sent}"
    expect(isinstance(reply.error, Errno), f"error of {what}")
    expect(isinstance(reply.message, str), f"message of {what}")
    if reply.error != Errno.OK:
        expect(reply.data == b"" and not reply.extents, f"a failed reply with content: {what}")
        return
    if sent.command == Command.READ:
        expect(len(reply.data) == sent.length, f"READ of {sent.length} answered {what}")
        expect(type(reply.data) is bytes, f"READ data is a {type(reply.data).__name__}")
        expect(not reply.extents, f"READ with extents: {what}")
        return
    expect(reply.data == b"", f"data for a {sent.command}: {what}")
    if sent.command != Command.BLOCK_STATUS:
        expect(not reply.extents, f"extents for a {sent.command}: {what}")
        return
    expect(bool(reply.extents), f"BLOCK_STATUS answered without extents: {what}")
    for context, extents in reply.extents.items():
        expect(context in context_ids, f"extents for context {context}: {what}")
        expect(len(extents) >= 1, f"an empty extent list: {what}")
        expect(all(e.length > 0 for e in extents), f"an empty extent: {what}")
        expect(sum(e.length for e in extents) <= sent.length, f"extents past the request: {what}")
        if sent.flags & CommandFlag.REQ_ONE:
            expect(len(extents) == 1, f"{len(extents)} extents for REQ_ONE: {what}")


def tls_boundary(handshake: bytes) -> int | None:
    """Where the server's answer to STARTTLS, its first option reply, ends (None: no cut)."""
    pos = GREETING_NEWSTYLE.size
    if len(handshake) < pos + _OPTION_REPLY.size or handshake[8:16] != b"IHAVEOPT":
        return None  # too short for the cut to matter, or an oldstyle hello (no options)
    *_, length = _OPTION_REPLY.unpack_from(handshake, pos)
    end = pos + _OPTION_REPLY.size + length
    return end if end < len(handshake) else None


def check(data: bytes) -> None:
    parsed = parse(data)
    if parsed is None:
        return
    setup, seed, handshake, script, replies = parsed
    boundary = tls_boundary(handshake) if setup.tls else None
    parts = [handshake] if boundary is None else [handshake[:boundary], handshake[boundary:]]
    whole = session(setup, parts, script, [replies] if replies else [])
    pieces = chunks(replies, seed) if replies else []
    split = session(setup, [p for part in parts for p in chunks(part, seed)], script, pieces)
    for outcome in (whole, split):
        check_events(outcome, setup)
    same_session(whole, split, f"whole vs split {seed}")


if __name__ == "__main__":
    run(check, sys.argv)
