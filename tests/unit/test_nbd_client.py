"""The sans-IO NBD client against server byte streams built by hand.

The frames here are built with ``struct`` and literal magic numbers straight
from the protocol document, not with ferry's own constants, so a mistake in
``constants.py`` cannot hide in both the code and its test.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.nbd.client import ClientConnection, handle_from_bytes
from ferry.nbd.constants import BlockState, Command, CommandFlag, Errno, OptionReply
from ferry.nbd.events import (
    Event,
    Extent,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    OptionData,
    ProtocolError,
    Reply,
)

# -- frames, from doc/proto.md ------------------------------------------------

OPT_EXPORT_NAME, OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 1, 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN = (
    2**31 + 1,
    2**31 + 2,
    2**31 + 6,
    2**31 + 7,
)
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS = 0, 1, 2, 5
TYPE_ERROR, TYPE_ERROR_OFFSET = 2**15 + 1, 2**15 + 2
DONE = 1
SIZE = 64 * 1024 * 1024
TFLAGS = 0b1111_0110_1101  # HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES, DF, MULTI_CONN, CACHE...
CONTEXT_ID = 7


def greeting(hflags: int = 3) -> bytes:
    return b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", hflags)


def oldstyle(size: int, flags: int) -> bytes:
    return b"NBDMAGIC" + struct.pack(">QQI", 0x00420281861253, size, flags) + bytes(124)


def opt(option: int, payload: bytes = b"") -> bytes:
    """What the client sends for one option."""
    return b"IHAVEOPT" + struct.pack(">II", option, len(payload)) + payload


def rep(option: int, rtype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QIII", 0x3E889045565A9, option, rtype, len(payload)) + payload


def go_payload(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">HHH", 2, 1, 3)


def set_meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def go_success(size: int = SIZE, tflags: int = TFLAGS, name: bytes | None = None) -> bytes:
    out = rep(OPT_GO, REP_INFO, struct.pack(">HQH", 0, size, tflags))
    if name is not None:
        out += rep(OPT_GO, REP_INFO, struct.pack(">H", 1) + name)
    out += rep(OPT_GO, REP_INFO, struct.pack(">HIII", 3, 1, 4096, 32 * 1024 * 1024))
    return out + rep(OPT_GO, REP_ACK)


def full_handshake(name: bytes = b"disk") -> bytes:
    """A modern server: NO_ZEROES, structured replies, base:allocation, GO."""
    return (
        greeting(3)
        + rep(OPT_STRUCTURED_REPLY, REP_ACK)
        + rep(
            OPT_SET_META_CONTEXT,
            REP_META_CONTEXT,
            struct.pack(">I", CONTEXT_ID) + b"base:allocation",
        )
        + rep(OPT_SET_META_CONTEXT, REP_ACK)
        + go_success(name=name)
    )


def request_bytes(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length)


def simple(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", 0x67446698, error, handle) + data


def chunk(handle: int, rtype: int, payload: bytes = b"", *, done: bool = True) -> bytes:
    head = struct.pack(">IHHQI", 0x668E33EF, DONE if done else 0, rtype, handle, len(payload))
    return head + payload


def data_chunk(handle: int, offset: int, data: bytes, *, done: bool = False) -> bytes:
    return chunk(handle, TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data, done=done)


def hole_chunk(handle: int, offset: int, length: int, *, done: bool = False) -> bytes:
    return chunk(handle, TYPE_OFFSET_HOLE, struct.pack(">QI", offset, length), done=done)


def error_chunk(handle: int, error: int, message: bytes, *, done: bool = True) -> bytes:
    return chunk(handle, TYPE_ERROR, struct.pack(">IH", error, len(message)) + message, done=done)


def negotiated(name: str = "disk") -> ClientConnection:
    conn = ClientConnection(name)
    events = conn.receive_data(full_handshake(name.encode()))
    assert isinstance(events[-1], Negotiated)
    conn.data_to_send()
    return conn


def negotiated_simple() -> ClientConnection:
    """A connection where structured replies were refused."""
    conn = ClientConnection("")
    stream = greeting(3) + rep(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP) + go_success()
    (event,) = conn.receive_data(stream)
    assert isinstance(event, Negotiated)
    assert not event.structured_replies
    conn.data_to_send()
    return conn


# -- handshake ----------------------------------------------------------------


def test_oldstyle_greeting_negotiates_at_once() -> None:
    conn = ClientConnection("ignored")
    assert conn.receive_data(oldstyle(1 << 30, 0b1101)[:100]) == []
    events = conn.receive_data(oldstyle(1 << 30, 0b1101)[100:])
    assert events == [Negotiated("", 1 << 30, 0b1101, False, {}, oldstyle=True)]
    assert conn.data_to_send() == b""
    assert conn.negotiated == events[0]


def test_newstyle_handshake_sends_each_option_after_the_previous_reply() -> None:
    conn = ClientConnection("disk")
    assert conn.receive_data(greeting(3)) == []
    assert conn.data_to_send() == struct.pack(">I", 3) + opt(OPT_STRUCTURED_REPLY)
    assert conn.receive_data(rep(OPT_STRUCTURED_REPLY, REP_ACK)) == []
    assert conn.data_to_send() == opt(
        OPT_SET_META_CONTEXT, set_meta_payload(b"disk", [b"base:allocation"])
    )
    meta = rep(OPT_SET_META_CONTEXT, REP_META_CONTEXT, struct.pack(">I", 9) + b"base:allocation")
    assert conn.receive_data(meta) == []
    assert conn.data_to_send() == b""  # no option before the final reply
    assert conn.receive_data(rep(OPT_SET_META_CONTEXT, REP_ACK)) == []
    assert conn.data_to_send() == opt(OPT_GO, go_payload(b"disk"))
    events = conn.receive_data(go_success(size=12345, tflags=0x4D, name=b"canonical"))
    assert events == [
        Negotiated(
            "canonical",
            12345,
            0x4D,
            True,
            {"base:allocation": 9},
            min_block_size=1,
            preferred_block_size=4096,
            max_block_size=32 * 1024 * 1024,
        )
    ]
    assert conn.data_to_send() == b""


OPT_FERRY_MIGRATE = 0x46455201  # b"FER\x01", ferry's migration option


@pytest.mark.parametrize(
    ("rtype", "message", "expected"),
    [
        (REP_ACK, b"", OptionAnswered(OPT_FERRY_MIGRATE, OptionReply.ACK)),
        (REP_ERR_UNSUP, b"", OptionAnswered(OPT_FERRY_MIGRATE, OptionReply.ERR_UNSUP)),
        (
            REP_ERR_POLICY,
            b"already has a sender",
            OptionAnswered(OPT_FERRY_MIGRATE, OptionReply.ERR_POLICY, "already has a sender"),
        ),
        (
            2**31 + 99,
            b"odd",
            OptionAnswered(
                OPT_FERRY_MIGRATE, OptionReply.ERR_INVALID, "unknown option error 0x80000063: odd"
            ),
        ),
    ],
)
def test_extra_options_go_first_and_every_answer_is_reported(
    rtype: int, message: bytes, expected: OptionAnswered
) -> None:
    conn = ClientConnection("disk", extra_options=[(OPT_FERRY_MIGRATE, b"payload")])
    assert conn.receive_data(greeting(3)) == []
    assert conn.data_to_send() == struct.pack(">I", 3) + opt(OPT_FERRY_MIGRATE, b"payload")
    assert conn.receive_data(rep(OPT_FERRY_MIGRATE, rtype, message)) == [expected]
    # Whatever the answer, the usual handshake goes on.
    assert conn.data_to_send() == opt(OPT_STRUCTURED_REPLY)
    events = conn.receive_data(rep(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP) + go_success(name=b"disk"))
    assert [type(e) for e in events] == [Negotiated]


def test_two_extra_options_one_at_a_time() -> None:
    conn = ClientConnection(
        "", structured_replies=False, extra_options=[(0x1000, b""), (0x1001, b"x")]
    )
    conn.receive_data(greeting(3))
    assert conn.data_to_send() == struct.pack(">I", 3) + opt(0x1000)
    assert conn.receive_data(rep(0x1000, REP_ACK)) == [OptionAnswered(0x1000, OptionReply.ACK)]
    assert conn.data_to_send() == opt(0x1001, b"x")
    assert conn.receive_data(rep(0x1001, REP_ERR_UNSUP)) == [
        OptionAnswered(0x1001, OptionReply.ERR_UNSUP)
    ]
    assert conn.data_to_send() == opt(OPT_GO, go_payload(b""))


def test_extra_option_shutdown_fails_the_negotiation() -> None:
    # Any other reply to an extra option is the caller's (OptionData, below).
    conn = ClientConnection("", extra_options=[(0x1000, b"")])
    conn.receive_data(greeting(3))
    events = conn.receive_data(rep(0x1000, REP_ERR_SHUTDOWN))
    assert events == [NegotiationFailed(OptionReply.ERR_SHUTDOWN, "ERR_SHUTDOWN")]


def test_an_ack_with_data_to_an_extra_option_is_a_protocol_error() -> None:
    # An answer's data comes in replies of its own before the ACK (OptionData, below).
    conn = ClientConnection("", extra_options=[(0x1000, b"")])
    conn.receive_data(greeting(3))
    with pytest.raises(ProtocolError, match="ACK to option 0x1000 with 1 bytes of data"):
        conn.receive_data(rep(0x1000, REP_ACK, b"x"))


def test_replies_with_data_to_an_extra_option_come_before_its_answer() -> None:
    # An extension answers with its own reply types (ferry's LOCATION is
    # 0x46455201), then ACK; the handshake goes on only after the ACK.
    conn = ClientConnection("", structured_replies=False, extra_options=[(0x1000, b"")])
    conn.receive_data(greeting(3))
    conn.data_to_send()
    events = conn.receive_data(rep(0x1000, 0x46455201, b"where") + rep(0x1000, REP_INFO, b"\0\0"))
    assert events == [
        OptionData(0x1000, 0x46455201, b"where"),
        OptionData(0x1000, REP_INFO, b"\0\0"),
    ]
    assert conn.data_to_send() == b""  # still waiting for the option's end
    assert conn.receive_data(rep(0x1000, REP_ACK)) == [OptionAnswered(0x1000, OptionReply.ACK)]
    assert conn.data_to_send() == opt(OPT_GO, go_payload(b""))


def test_extra_options_must_be_non_standard() -> None:
    with pytest.raises(ValueError, match="standard option"):
        ClientConnection("", extra_options=[(OPT_GO, b"")])


def test_oldstyle_server_answers_no_extra_option() -> None:
    conn = ClientConnection("", extra_options=[(0x1000, b"")])
    events = conn.receive_data(oldstyle(4096, 1))
    assert [type(e) for e in events] == [Negotiated]
    assert conn.data_to_send() == b""


def test_client_flags_omit_no_zeroes_unless_offered() -> None:
    conn = ClientConnection("", structured_replies=False)
    conn.receive_data(greeting(1))
    assert conn.data_to_send() == struct.pack(">I", 1) + opt(OPT_GO, go_payload(b""))


def test_block_size_info_is_reported() -> None:
    conn = ClientConnection("", structured_replies=False)
    conn.receive_data(greeting(3))
    stream = (
        rep(OPT_GO, REP_INFO, struct.pack(">HQH", 0, 4096, 1))
        + rep(OPT_GO, REP_INFO, struct.pack(">HIII", 3, 512, 65536, 1 << 20))
        + rep(OPT_GO, REP_INFO, struct.pack(">H", 2) + b"a description, ignored")
        + rep(OPT_GO, REP_ACK)
    )
    (event,) = conn.receive_data(stream)
    assert isinstance(event, Negotiated)
    assert (event.min_block_size, event.preferred_block_size, event.max_block_size) == (
        512,
        65536,
        1 << 20,
    )
    assert event.export_name == ""


def test_go_refused_reports_the_server_message_and_aborts() -> None:
    conn = ClientConnection("nope")
    conn.receive_data(greeting(3) + rep(OPT_STRUCTURED_REPLY, REP_ACK))
    conn.receive_data(rep(OPT_SET_META_CONTEXT, REP_ACK))
    conn.data_to_send()
    events = conn.receive_data(rep(OPT_GO, REP_ERR_UNKNOWN, b"export 'nope' not found"))
    assert events == [NegotiationFailed(OptionReply.ERR_UNKNOWN, "export 'nope' not found")]
    assert conn.data_to_send() == opt(OPT_ABORT)
    assert conn.negotiated is None
    assert conn.receive_data(rep(OPT_ABORT, REP_ACK)) == []  # ignored from now on
    with pytest.raises(RuntimeError):
        conn.request(Command.READ, 0, 512)


def test_go_unsupported_falls_back_to_export_name_with_zero_padding() -> None:
    conn = ClientConnection("old")
    conn.receive_data(greeting(1) + rep(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP))
    assert conn.data_to_send() == struct.pack(">I", 1) + opt(OPT_STRUCTURED_REPLY) + opt(
        OPT_GO, go_payload(b"old")
    )
    assert conn.receive_data(rep(OPT_GO, REP_ERR_UNSUP)) == []
    assert conn.data_to_send() == opt(OPT_EXPORT_NAME, b"old")
    reply = struct.pack(">QH", 999, 3) + bytes(124)
    assert conn.receive_data(reply[:-1]) == []  # the padding is awaited
    assert conn.receive_data(reply[-1:]) == [Negotiated("old", 999, 3, False, {})]


def test_export_name_reply_without_padding_when_no_zeroes_agreed() -> None:
    conn = ClientConnection("old", structured_replies=False)
    conn.receive_data(greeting(3) + rep(OPT_GO, REP_ERR_UNSUP))
    events = conn.receive_data(struct.pack(">QH", 999, 1))
    assert events == [Negotiated("old", 999, 1, False, {})]


def test_hang_up_after_export_name_is_a_refusal() -> None:
    conn = ClientConnection("missing", structured_replies=False)
    conn.receive_data(greeting(3) + rep(OPT_GO, REP_ERR_UNSUP))
    (event,) = conn.receive_data(b"")
    assert isinstance(event, NegotiationFailed)
    assert event.error == OptionReply.ERR_UNKNOWN
    assert "missing" in event.message


def test_structured_reply_refused_skips_meta_contexts() -> None:
    conn = ClientConnection("x")
    conn.receive_data(greeting(3))
    conn.data_to_send()
    conn.receive_data(rep(OPT_STRUCTURED_REPLY, REP_ERR_POLICY, b"no"))
    assert conn.data_to_send() == opt(OPT_GO, go_payload(b"x"))


def test_meta_context_refused_goes_on_without_contexts() -> None:
    conn = ClientConnection("x")
    stream = (
        greeting(3)
        + rep(OPT_STRUCTURED_REPLY, REP_ACK)
        + rep(OPT_SET_META_CONTEXT, REP_ERR_UNSUP)
        + go_success()
    )
    (event,) = conn.receive_data(stream)
    assert isinstance(event, Negotiated)
    assert event.structured_replies
    assert event.meta_contexts == {}


def test_shutdown_during_negotiation_fails() -> None:
    conn = ClientConnection("x")
    events = conn.receive_data(greeting(3) + rep(OPT_STRUCTURED_REPLY, REP_ERR_SHUTDOWN))
    assert events == [NegotiationFailed(OptionReply.ERR_SHUTDOWN, "ERR_SHUTDOWN")]
    assert conn.data_to_send().endswith(opt(OPT_ABORT))


def test_unknown_option_error_is_reported_with_its_number() -> None:
    conn = ClientConnection("x", structured_replies=False)
    (event,) = conn.receive_data(greeting(3) + rep(OPT_GO, 2**31 + 77, b"odd"))
    assert isinstance(event, NegotiationFailed)
    assert "0x8000004d" in event.message
    assert "odd" in event.message


def test_newstyle_without_fixed_newstyle_is_refused() -> None:
    conn = ClientConnection("x")
    events = conn.receive_data(greeting(0))
    assert len(events) == 1
    assert isinstance(events[0], NegotiationFailed)
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"NBDMAGIX" + b"IHAVEOPT" + b"\0\3", id="bad-magic"),
        pytest.param(b"NBDMAGIC" + b"IHAVEOPX" + b"\0\3", id="bad-second-magic"),
        pytest.param(greeting() + rep(OPT_GO, REP_ACK), id="reply-to-another-option"),
        pytest.param(greeting() + b"\0" * 20, id="bad-option-reply-magic"),
        pytest.param(
            greeting() + struct.pack(">QIII", 0x3E889045565A9, 8, 1, 1 << 20),
            id="oversized-option-reply",
        ),
        pytest.param(
            greeting() + rep(OPT_STRUCTURED_REPLY, REP_ACK) + rep(OPT_SET_META_CONTEXT, REP_INFO),
            id="unexpected-reply-type",
        ),
        pytest.param(
            greeting()
            + rep(OPT_STRUCTURED_REPLY, REP_ACK)
            + rep(OPT_SET_META_CONTEXT, REP_ACK)
            + rep(OPT_GO, REP_ACK),
            id="go-without-export-info",
        ),
        pytest.param(
            greeting()
            + rep(OPT_STRUCTURED_REPLY, REP_ACK)
            + rep(OPT_SET_META_CONTEXT, REP_META_CONTEXT, b"\0\0\0\1\xff\xfe"),
            id="meta-context-name-not-utf8",
        ),
    ],
)
def test_broken_handshakes_raise_protocol_error(stream: bytes) -> None:
    conn = ClientConnection("disk")
    with pytest.raises(ProtocolError):
        conn.receive_data(stream)
    with pytest.raises(ProtocolError):  # and the connection stays broken
        conn.receive_data(b"anything")


def test_hang_up_during_handshake_is_a_protocol_error() -> None:
    conn = ClientConnection("disk")
    conn.receive_data(greeting()[:5])
    with pytest.raises(ProtocolError, match="handshake"):
        conn.receive_data(b"")


# -- requests -----------------------------------------------------------------


def test_requests_are_framed_and_handles_count_up() -> None:
    conn = negotiated()
    assert conn.request(Command.READ, 4096, 512) == 1
    assert conn.request(Command.WRITE, 0, data=b"abc", flags=CommandFlag.FUA) == 2
    assert conn.request(Command.FLUSH) == 3
    assert conn.in_flight() == 3
    assert conn.data_to_send() == (
        request_bytes(0, 1, 4096, 512)
        + request_bytes(1, 2, 0, 3, flags=1)
        + b"abc"
        + request_bytes(3, 3, 0, 0)
    )
    assert conn.data_to_send() == b""


def test_caller_chosen_handle_such_as_flexnbd_mirror() -> None:
    conn = negotiated()
    mirror = handle_from_bytes(b".MIRROR.")
    assert conn.request(Command.WRITE, 512, data=b"x" * 512, handle=mirror) == mirror
    sent = conn.data_to_send()
    assert sent[8:16] == b".MIRROR."
    with pytest.raises(ValueError, match="in flight"):
        conn.request(Command.FLUSH, handle=mirror)
    assert conn.receive_data(simple(mirror)) == [Reply(mirror, Errno.OK)]
    assert conn.in_flight() == 0


def test_ferry_commit_carries_the_token_in_the_offset() -> None:
    conn = negotiated()
    handle = conn.commit(0x1234)
    assert conn.data_to_send() == request_bytes(0xF001, handle, 0x1234, 0)
    assert conn.receive_data(simple(handle)) == [Reply(handle, Errno.OK)]
    handle = conn.commit(7)
    conn.data_to_send()
    assert conn.receive_data(error_chunk(handle, 1, b"no lease")) == [
        Reply(handle, Errno.EPERM, message="no lease")
    ]
    with pytest.raises(ValueError, match="not a u64"):
        conn.commit(-1)
    conn.request(Command.DISC)
    with pytest.raises(RuntimeError, match="DISC"):
        conn.commit(1)
    with pytest.raises(RuntimeError, match="GREETING"):
        ClientConnection("").commit(1)


def test_automatic_handles_skip_those_in_flight() -> None:
    conn = negotiated()
    conn.request(Command.FLUSH, handle=1)
    conn.request(Command.FLUSH, handle=2)
    assert conn.request(Command.FLUSH) == 3


def test_disc_expects_no_reply_and_ends_requests() -> None:
    conn = negotiated()
    conn.request(Command.DISC)
    assert conn.in_flight() == 0
    assert conn.data_to_send() == request_bytes(2, 1, 0, 0)
    with pytest.raises(RuntimeError):
        conn.request(Command.FLUSH)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((Command.WRITE, 0, 10), {"data": b"abc"}),
        ((Command.READ, 0, 10), {"data": b"abc"}),
        ((Command.READ, -1, 10), {}),
        ((Command.READ, 0, 1 << 32), {}),
        ((Command.READ, 0, 64 * 1024 * 1024), {}),
        ((Command.FLUSH,), {"handle": 1 << 64}),
    ],
)
def test_bad_requests_are_refused_locally(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    conn = negotiated()
    with pytest.raises(ValueError):
        conn.request(*args, **kwargs)  # type: ignore[arg-type]
    assert conn.data_to_send() == b""


def test_no_request_before_negotiation() -> None:
    with pytest.raises(RuntimeError):
        ClientConnection().request(Command.FLUSH)


# -- replies ------------------------------------------------------------------


def test_simple_replies_out_of_order_with_read_data() -> None:
    conn = negotiated_simple()
    read = conn.request(Command.READ, 0, 8)
    write = conn.request(Command.WRITE, 0, data=b"12345678")
    failed_read = conn.request(Command.READ, 8, 4)
    stream = simple(write) + simple(failed_read, 5) + simple(read, 0, b"ABCDEFGH")
    assert conn.receive_data(stream[:-3]) == [Reply(write, Errno.OK), Reply(failed_read, Errno.EIO)]
    assert conn.receive_data(stream[-3:]) == [Reply(read, Errno.OK, b"ABCDEFGH")]
    assert conn.in_flight() == 0


def test_unknown_error_numbers_become_einval() -> None:
    conn = negotiated()
    h = conn.request(Command.FLUSH)
    assert conn.receive_data(simple(h, 4242)) == [Reply(h, Errno.EINVAL)]


def test_structured_read_with_data_and_hole_chunks_in_any_order() -> None:
    conn = negotiated()
    h = conn.request(Command.READ, 1000, 300)
    stream = (
        data_chunk(h, 1200, b"c" * 100)
        + hole_chunk(h, 1100, 100)
        + data_chunk(h, 1000, b"a" * 100)
        + chunk(h, TYPE_NONE)
    )
    assert conn.receive_data(stream) == [Reply(h, Errno.OK, b"a" * 100 + bytes(100) + b"c" * 100)]


def test_structured_read_may_end_on_a_content_chunk() -> None:
    conn = negotiated()
    h = conn.request(Command.READ, 0, 4)
    assert conn.receive_data(data_chunk(h, 0, b"wxyz", done=True)) == [Reply(h, Errno.OK, b"wxyz")]


def test_scattered_read_chunks_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ferry.nbd.client.MAX_READ_FRAGMENTS", 2)
    conn = negotiated()
    h = conn.request(Command.READ, 0, 10)
    # [0,1) and [2,3), then [1,2) joins them into one piece: room for [4,5).
    stream = b"".join(data_chunk(h, o, b"%d" % o) for o in (0, 2, 1, 4))
    assert conn.receive_data(stream) == []
    with pytest.raises(ProtocolError, match="too many pieces"):
        conn.receive_data(data_chunk(h, 6, b"6"))


def test_read_of_only_holes_is_zeroes() -> None:
    conn = negotiated()
    h = conn.request(Command.READ, 0, 4096)
    assert conn.receive_data(hole_chunk(h, 0, 4096, done=True)) == [Reply(h, Errno.OK, bytes(4096))]


def test_error_chunks_carry_errno_and_message() -> None:
    conn = negotiated()
    read = conn.request(Command.READ, 0, 1024)
    trim = conn.request(Command.TRIM, 0, 1024)
    write = conn.request(Command.WRITE, 0, data=b"z")
    offset_error = chunk(
        read,
        TYPE_ERROR_OFFSET,
        struct.pack(">IH", 5, 4) + b"bad!" + struct.pack(">Q", 512),
        done=False,
    )
    stream = (
        data_chunk(read, 0, b"q" * 512)
        + offset_error
        + error_chunk(trim, 28, b"disk full")
        + chunk(write, TYPE_ERROR, struct.pack(">IH", 999, 0))
        + error_chunk(read, 28, b"the first error wins", done=False)
        + chunk(read, TYPE_NONE)
    )
    assert conn.receive_data(stream) == [
        Reply(trim, Errno.ENOSPC, message="disk full"),
        Reply(write, Errno.EINVAL),
        Reply(read, Errno.EIO, message="bad!"),
    ]


def test_unknown_error_chunk_type_fails_the_reply() -> None:
    conn = negotiated()
    h = conn.request(Command.FLUSH)
    payload = struct.pack(">IH", 1, 2) + b"no" + b"extra fields"
    assert conn.receive_data(chunk(h, 2**15 + 99, payload)) == [Reply(h, Errno.EPERM, message="no")]


def test_block_status_extents_by_context() -> None:
    conn = negotiated()
    h = conn.request(Command.BLOCK_STATUS, 0, 1 << 20)
    descriptors = struct.pack(">IIIIII", 65536, 0, 65536, 3, 4096, 2)
    stream = chunk(h, TYPE_BLOCK_STATUS, struct.pack(">I", CONTEXT_ID) + descriptors, done=False)
    stream += chunk(h, TYPE_NONE)
    expected = (
        Extent(65536, BlockState.DATA),
        Extent(65536, BlockState.HOLE | BlockState.ZERO),
        Extent(4096, BlockState.ZERO),
    )
    assert conn.receive_data(stream) == [Reply(h, Errno.OK, extents={CONTEXT_ID: expected})]


def test_simple_reply_to_non_read_allowed_with_structured_replies() -> None:
    conn = negotiated()
    h = conn.request(Command.WRITE, 0, data=b"a")
    r = conn.request(Command.READ, 0, 1)
    assert conn.receive_data(simple(h) + simple(r, 22)) == [
        Reply(h, Errno.OK),
        Reply(r, Errno.EINVAL),
    ]


def test_clean_end_of_stream() -> None:
    conn = negotiated()
    assert conn.receive_data(b"") == []


def test_end_of_stream_with_requests_in_flight() -> None:
    conn = negotiated()
    conn.request(Command.FLUSH)
    with pytest.raises(ProtocolError, match="1 request"):
        conn.receive_data(b"")


def _read_pending() -> tuple[ClientConnection, int]:
    conn = negotiated()
    return conn, conn.request(Command.READ, 4096, 1024)


@pytest.mark.parametrize(
    "make_stream",
    [
        pytest.param(lambda h: simple(h + 1), id="unknown-handle-simple"),
        pytest.param(lambda h: chunk(h + 1, TYPE_NONE), id="unknown-handle-structured"),
        pytest.param(lambda h: b"\x12\x34\x56\x78" + bytes(12), id="bad-reply-magic"),
        pytest.param(lambda h: data_chunk(h, 4096 + 1000, b"x" * 25), id="data-past-the-end"),
        pytest.param(lambda h: data_chunk(h, 4095, b"x"), id="data-before-the-start"),
        pytest.param(lambda h: hole_chunk(h, 4096, 1025), id="hole-past-the-end"),
        pytest.param(lambda h: hole_chunk(h, 4096, 0), id="empty-hole"),
        pytest.param(
            lambda h: data_chunk(h, 4096, b"x" * 100) + hole_chunk(h, 4150, 100), id="overlap"
        ),
        pytest.param(
            lambda h: data_chunk(h, 4096, b"x" * 100) + chunk(h, TYPE_NONE), id="short-read-done"
        ),
        pytest.param(lambda h: chunk(h, TYPE_NONE, done=False), id="none-without-done"),
        pytest.param(lambda h: chunk(h, TYPE_NONE, b"x"), id="none-with-payload"),
        pytest.param(lambda h: chunk(h, 77, b""), id="unknown-chunk-type"),
        pytest.param(lambda h: simple(h), id="simple-read-after-structured"),
        pytest.param(lambda h: hole_chunk(h, 4096, 10) + simple(h, 5), id="simple-in-the-middle"),
        pytest.param(
            lambda h: chunk(h, TYPE_BLOCK_STATUS, struct.pack(">III", CONTEXT_ID, 1, 0)),
            id="block-status-to-read",
        ),
        pytest.param(
            lambda h: chunk(h, TYPE_ERROR, struct.pack(">IH", 5, 10) + b"short"),
            id="error-message-too-long",
        ),
        pytest.param(
            lambda h: chunk(h, TYPE_ERROR_OFFSET, struct.pack(">IHQ", 5, 0, 0)),
            id="error-offset-outside",
        ),
        pytest.param(
            lambda h: struct.pack(">IHHQI", 0x668E33EF, 1, 1, h, 64 * 1024 * 1024),
            id="chunk-over-max-reply-size",
        ),
    ],
)
def test_broken_replies_raise_protocol_error(make_stream: object) -> None:
    conn, h = _read_pending()
    with pytest.raises(ProtocolError):
        conn.receive_data(make_stream(h))  # type: ignore[operator]
    with pytest.raises(ProtocolError):
        conn.receive_data(b"")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(struct.pack(">I", CONTEXT_ID), id="no-descriptors"),
        pytest.param(struct.pack(">IIII", 99, 512, 0, 0)[:12], id="unknown-context"),
        pytest.param(struct.pack(">III", CONTEXT_ID, 0, 0), id="empty-extent"),
        pytest.param(struct.pack(">IIIII", CONTEXT_ID, 4096, 0, 512, 1), id="past-the-request"),
        pytest.param(struct.pack(">IIIB", CONTEXT_ID, 512, 0, 0), id="ragged"),
    ],
)
def test_broken_block_status_raises_protocol_error(payload: bytes) -> None:
    conn = negotiated()
    h = conn.request(Command.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError):
        conn.receive_data(chunk(h, TYPE_BLOCK_STATUS, payload))


def test_a_successful_block_status_in_a_simple_reply_is_a_protocol_error() -> None:
    # Found by fuzz/nbd_client: it was a success without extents.  The spec
    # wants BLOCK_STATUS answered by a structured reply; an error may be simple.
    conn = negotiated()
    failed = conn.request(Command.BLOCK_STATUS, 0, 4096)
    assert conn.receive_data(simple(failed, 22)) == [Reply(failed, Errno.EINVAL)]
    h = conn.request(Command.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError, match="BLOCK_STATUS"):
        conn.receive_data(simple(h))


def test_block_status_final_extent_is_clipped_to_the_request() -> None:
    conn = negotiated()
    h = conn.request(Command.BLOCK_STATUS, 0, 4096)
    payload = struct.pack(">IIIII", CONTEXT_ID, 1024, 0, 1 << 20, 3)
    (reply,) = conn.receive_data(chunk(h, TYPE_BLOCK_STATUS, payload))
    assert reply == Reply(
        h,
        Errno.OK,
        extents={
            CONTEXT_ID: (
                Extent(1024, BlockState.DATA),
                Extent(3072, BlockState.HOLE | BlockState.ZERO),
            )
        },
    )


def test_block_status_context_twice_is_refused() -> None:
    conn = negotiated()
    h = conn.request(Command.BLOCK_STATUS, 0, 4096)
    once = chunk(h, TYPE_BLOCK_STATUS, struct.pack(">III", CONTEXT_ID, 512, 0), done=False)
    with pytest.raises(ProtocolError, match="second"):
        conn.receive_data(once + once)


def test_structured_chunk_without_structured_replies() -> None:
    conn = negotiated_simple()
    h = conn.request(Command.FLUSH)
    with pytest.raises(ProtocolError):
        conn.receive_data(chunk(h, TYPE_NONE))


def test_oversized_chunk_is_refused_before_its_payload_arrives() -> None:
    conn = ClientConnection("disk", max_reply_size=8192)
    conn.receive_data(full_handshake())
    h = conn.request(Command.READ, 0, 4096)
    header = struct.pack(">IHHQI", 0x668E33EF, 1, 1, h, 8193)
    with pytest.raises(ProtocolError, match="max_reply_size"):
        conn.receive_data(header)


# -- any split, any garbage -----------------------------------------------------


def _transmission_script() -> tuple[list[tuple[Command, int, int, bytes]], bytes]:
    """Requests (handles 1..n) and a server's answer to them, out of order."""
    requests = [
        (Command.READ, 0, 300, b""),
        (Command.WRITE, 300, 0, b"w" * 10),
        (Command.BLOCK_STATUS, 0, 8192, b""),
        (Command.READ, 600, 50, b""),
        (Command.TRIM, 0, 4096, b""),
    ]
    replies = (
        data_chunk(1, 200, b"z" * 100)
        + simple(2)
        + hole_chunk(1, 0, 200)
        + chunk(
            3, TYPE_BLOCK_STATUS, struct.pack(">IIIII", CONTEXT_ID, 4096, 0, 4096, 3), done=False
        )
        + error_chunk(4, 5, b"media error", done=False)
        + chunk(1, TYPE_NONE)
        + chunk(3, TYPE_NONE)
        + error_chunk(5, 1, b"read-only")
        + chunk(4, TYPE_NONE)
    )
    return requests, replies


SCENARIOS = {
    "modern": (full_handshake(), True),
    "export-name": (
        greeting(1)
        + rep(OPT_STRUCTURED_REPLY, REP_ACK)
        + rep(
            OPT_SET_META_CONTEXT,
            REP_META_CONTEXT,
            struct.pack(">I", CONTEXT_ID) + b"base:allocation",
        )
        + rep(OPT_SET_META_CONTEXT, REP_ACK)
        + rep(OPT_GO, REP_ERR_UNSUP, b"what is GO?")
        + struct.pack(">QH", SIZE, 1)
        + bytes(124),
        True,
    ),
    "oldstyle": (oldstyle(SIZE, 1), False),
}


def _feed(conn: ClientConnection, stream: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    bounds = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    for a, b in itertools.pairwise(bounds):
        events += conn.receive_data(stream[a:b]) if b > a else []
    return events


def _run_scenario(name: str, handshake_cuts: list[int], reply_cuts: list[int]) -> list[Event]:
    handshake, structured = SCENARIOS[name]
    conn = ClientConnection("disk")
    events = _feed(conn, handshake, handshake_cuts)
    if structured:
        requests, replies = _transmission_script()
    else:
        requests = [(Command.READ, 0, 6, b""), (Command.FLUSH, 0, 0, b"")]
        replies = simple(2, 5) + simple(1, 0, b"sixsix")
    for command, offset, length, data in requests:
        conn.request(command, offset, length, data=data)
    events += _feed(conn, replies, reply_cuts)
    assert conn.in_flight() == 0
    return events


@given(
    name=st.sampled_from(sorted(SCENARIOS)),
    handshake_cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    reply_cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_split_gives_the_same_events(
    name: str, handshake_cuts: list[int], reply_cuts: list[int]
) -> None:
    assert _run_scenario(name, handshake_cuts, reply_cuts) == _run_scenario(name, [], [])


def test_byte_at_a_time_gives_the_same_events() -> None:
    handshake, _ = SCENARIOS["modern"]
    _, replies = _transmission_script()
    every = list(range(max(len(handshake), len(replies))))
    whole = _run_scenario("modern", [], [])
    assert _run_scenario("modern", every, every) == whole
    assert len(whole) == 6  # Negotiated and five replies
    read = whole[-1 - 3]
    assert read == Reply(1, Errno.OK, bytes(200) + b"z" * 100)


@settings(max_examples=300)
@given(garbage=st.binary(max_size=300), after_handshake=st.booleans())
def test_garbage_raises_only_protocol_error(garbage: bytes, after_handshake: bool) -> None:
    conn = ClientConnection("disk")
    if after_handshake:
        conn.receive_data(full_handshake())
        conn.request(Command.READ, 0, 64)
        conn.request(Command.BLOCK_STATUS, 0, 64)
        conn.request(Command.FLUSH, handle=0x67446698)
    try:
        conn.receive_data(garbage)
        conn.receive_data(b"")
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(
    position=st.integers(min_value=0),
    value=st.integers(min_value=0, max_value=255),
    extra=st.binary(max_size=40),
)
def test_corrupted_streams_raise_only_protocol_error(
    position: int, value: int, extra: bytes
) -> None:
    requests, replies = _transmission_script()
    stream = bytearray(full_handshake() + replies)
    stream[position % len(stream)] = value
    conn = ClientConnection("disk")
    try:
        events = conn.receive_data(bytes(stream[: len(full_handshake())]))
        if any(isinstance(e, Negotiated) for e in events):
            for command, offset, length, data in requests:
                conn.request(command, offset, length, data=data)
        conn.receive_data(bytes(stream[len(full_handshake()) :]) + extra)
    except ProtocolError:
        pass
