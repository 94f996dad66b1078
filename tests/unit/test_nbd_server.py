"""The sans-IO NBD server: handshake answers byte for byte, request validation, framing.

No sockets and no reactor: bytes go in, events and bytes come out.  The
frames on the client's side and the layouts of the server's answers come from
``nbd_frames``, which is written from the protocol document and shares no code
with ``ferry.nbd``.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ferry.nbd.constants import (
    MAX_HANDSHAKE_OPTIONS,
    MAX_OPTION_LENGTH,
    BlockState,
    Command,
    CommandFlag,
    Errno,
    OptionReply,
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
)
from ferry.nbd.locate import Location
from ferry.nbd.server import ServerConnection, transmission_flags

from . import nbd_frames as f

SIZE = 1 << 20
MIB = 1 << 20

WRITABLE_FLAGS = (
    f.HAS_FLAGS
    | f.SEND_FLUSH
    | f.SEND_FUA
    | f.SEND_TRIM
    | f.SEND_WRITE_ZEROES
    | f.CAN_MULTI_CONN
    | f.SEND_CACHE
    | f.SEND_FAST_ZERO
)
READ_ONLY_FLAGS = f.HAS_FLAGS | f.READ_ONLY | f.SEND_FLUSH | f.CAN_MULTI_CONN | f.SEND_CACHE


@dataclass
class Catalog:
    """An ExportCatalog over a dict; "" finds the export named "disk"."""

    exports: dict[str, ExportInfo] = field(
        default_factory=lambda: {
            "disk": ExportInfo("disk", SIZE, description="the test disk"),
            "ro": ExportInfo("ro", SIZE, read_only=True),
        }
    )
    refusals: dict[str, Refusal] = field(default_factory=dict)

    def lookup(self, name: str) -> ExportInfo | Refusal:
        if name in self.refusals:
            return self.refusals[name]
        found = self.exports.get(name or "disk")
        if found is None:
            return Refusal(OptionReply.ERR_UNKNOWN, f"no export {name!r}")
        return found

    def listing(self) -> Sequence[ExportInfo]:
        return list(self.exports.values())


def connect(catalog: Catalog | None = None, **kwargs: int) -> ServerConnection:
    """A newstyle connection with its greeting checked and drained."""
    conn = ServerConnection(catalog or Catalog(), **kwargs)  # type: ignore[arg-type]
    assert conn.data_to_send() == f.newstyle_greeting()
    return conn


def negotiate(conn: ServerConnection, *frames: bytes, flags: bytes | None = None) -> list[Event]:
    return conn.receive_data((f.client_flags() if flags is None else flags) + b"".join(frames))


def replies(conn: ServerConnection) -> list[f.OptionReply]:
    return f.option_replies(conn.data_to_send())


def rep(opt: int, kind: int, data: bytes = b"") -> f.OptionReply:
    return f.OptionReply(opt, kind, data)


def transmitting(
    export: str = "disk",
    *,
    structured: bool = False,
    meta: bool = False,
    catalog: Catalog | None = None,
    **kwargs: int,
) -> ServerConnection:
    """A connection past NBD_OPT_GO, with its handshake output drained."""
    conn = connect(catalog, **kwargs)
    frames = []
    if structured:
        frames.append(f.option(f.OPT_STRUCTURED_REPLY))
    if meta:
        frames.append(f.option(f.OPT_SET_META_CONTEXT, f.meta_data(export, "base:allocation")))
    frames.append(f.option(f.OPT_GO, f.info_data(export)))
    events = negotiate(conn, *frames)
    assert [type(e) for e in events] == [HandshakeComplete]
    conn.data_to_send()
    return conn


def only(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


# -- greeting and client flags ----------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = ServerConnection(Catalog())
    out = conn.data_to_send()
    assert out == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.data_to_send() == b""
    assert not conn.handshake_done and not conn.closed and conn.export is None


@pytest.mark.parametrize(
    "flags",
    [0, f.FLAG_C_NO_ZEROES, f.FLAG_C_FIXED_NEWSTYLE | 4, 1 << 31, 0xFFFFFFFF],
    ids=["none", "no-zeroes-only", "unknown-bit-2", "unknown-bit-31", "all"],
)
def test_client_flags_unknown_or_not_fixed_newstyle_break_the_connection(flags: int) -> None:
    conn = connect()
    with pytest.raises(ProtocolError):
        conn.receive_data(struct.pack(">I", flags))
    assert conn.closed
    with pytest.raises(ProtocolError):
        conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.receive_data(f.option(f.OPT_LIST))


def test_client_flags_may_arrive_a_byte_at_a_time() -> None:
    conn = connect()
    for byte in f.client_flags(f.FLAG_C_FIXED_NEWSTYLE):
        assert conn.receive_data(bytes([byte])) == []
    conn.receive_data(f.option(f.OPT_LIST))
    assert replies(conn)[-1] == rep(f.OPT_LIST, f.REP_ACK)


def test_bad_option_magic_breaks_the_connection() -> None:
    conn = connect()
    with pytest.raises(ProtocolError):
        negotiate(conn, b"IHAVEOPX" + struct.pack(">II", f.OPT_LIST, 0))
    with pytest.raises(ProtocolError):
        conn.receive_data(f.option(f.OPT_LIST))


def test_option_longer_than_the_cap_breaks_at_its_header() -> None:
    conn = connect()
    with pytest.raises(ProtocolError):
        negotiate(conn, b"IHAVEOPT" + struct.pack(">II", f.OPT_LIST, MAX_OPTION_LENGTH + 1))


def test_option_at_the_cap_is_buffered_and_answered() -> None:
    conn = connect()
    negotiate(conn, f.option(999, bytes(MAX_OPTION_LENGTH)))
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (999, f.REP_ERR_UNSUP)


def test_a_handshake_may_send_only_so_many_options() -> None:
    conn = connect()
    negotiate(conn, *[f.option(f.OPT_LIST)] * MAX_HANDSHAKE_OPTIONS)
    assert len(replies(conn)) > MAX_HANDSHAKE_OPTIONS  # every LIST answered
    with pytest.raises(ProtocolError, match=f"more than {MAX_HANDSHAKE_OPTIONS} options"):
        conn.receive_data(f.option(f.OPT_LIST))


# -- NBD_OPT_EXPORT_NAME -------------------------------------------------------------------


def test_export_name_with_no_zeroes_sends_size_and_flags_only() -> None:
    conn = connect()
    events = negotiate(conn, f.option(f.OPT_EXPORT_NAME, b"disk"))
    assert conn.data_to_send() == struct.pack(">QH", SIZE, WRITABLE_FLAGS)
    assert events == [HandshakeComplete(Catalog().exports["disk"], False, {})]
    assert conn.handshake_done and conn.export == Catalog().exports["disk"]
    assert not conn.structured_replies


def test_export_name_without_no_zeroes_pads_124_zero_bytes() -> None:
    conn = connect()
    negotiate(conn, f.option(f.OPT_EXPORT_NAME, b""), flags=f.client_flags(f.FLAG_C_FIXED_NEWSTYLE))
    assert conn.data_to_send() == struct.pack(">QH", SIZE, WRITABLE_FLAGS) + bytes(124)


def test_export_name_read_only_export() -> None:
    conn = connect()
    negotiate(conn, f.option(f.OPT_EXPORT_NAME, b"ro"))
    assert conn.data_to_send() == struct.pack(">QH", SIZE, READ_ONLY_FLAGS)


def test_export_name_after_structured_reply_advertises_df() -> None:
    conn = connect()
    events = negotiate(conn, f.option(f.OPT_STRUCTURED_REPLY), f.option(f.OPT_EXPORT_NAME, b"disk"))
    out = conn.data_to_send()
    assert f.option_replies(out[:20]) == [rep(f.OPT_STRUCTURED_REPLY, f.REP_ACK)]
    assert out[20:] == struct.pack(">QH", SIZE, WRITABLE_FLAGS | f.SEND_DF)
    assert events == [HandshakeComplete(Catalog().exports["disk"], True, {})]


@pytest.mark.parametrize(
    "name", [b"nosuch", b"\xff\xfe", b"x" * 4097], ids=["unknown", "not-utf8", "too-long"]
)
def test_export_name_that_cannot_be_served_aborts_without_a_reply(name: bytes) -> None:
    conn = connect()
    events = negotiate(conn, f.option(f.OPT_EXPORT_NAME, name), f.option(f.OPT_LIST))
    assert [type(e) for e in events] == [HandshakeAborted]
    assert conn.data_to_send() == b""
    assert conn.closed and not conn.handshake_done
    assert conn.receive_data(f.option(f.OPT_LIST)) == []  # ignored, not an error
    assert conn.data_to_send() == b""


def test_export_name_refused_by_the_catalog_aborts() -> None:
    catalog = Catalog(refusals={"disk": Refusal(OptionReply.ERR_POLICY, "not in control")})
    conn = connect(catalog)
    [event] = negotiate(conn, f.option(f.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(event, HandshakeAborted) and "not in control" in event.reason


# -- NBD_OPT_ABORT, NBD_OPT_LIST, unsupported options -----------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_is_acked_and_ends_the_session(data: bytes) -> None:
    conn = connect()
    events = negotiate(conn, f.option(f.OPT_ABORT, data), f.option(f.OPT_LIST))
    assert [type(e) for e in events] == [HandshakeAborted]
    assert replies(conn) == [rep(f.OPT_ABORT, f.REP_ACK)]
    assert conn.closed
    assert conn.receive_data(b"anything at all") == []


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    conn = connect()
    assert negotiate(conn, f.option(f.OPT_LIST)) == []
    assert replies(conn) == [
        rep(f.OPT_LIST, f.REP_SERVER, struct.pack(">I", 4) + b"disk"),
        rep(f.OPT_LIST, f.REP_SERVER, struct.pack(">I", 2) + b"ro"),
        rep(f.OPT_LIST, f.REP_ACK),
    ]


def test_list_with_data_is_invalid_and_negotiation_goes_on() -> None:
    conn = connect()
    events = negotiate(conn, f.option(f.OPT_LIST, b"x"), f.option(f.OPT_GO, f.info_data("disk")))
    out = replies(conn)
    assert (out[0].option, out[0].type) == (f.OPT_LIST, f.REP_ERR_INVALID)
    assert out[-1] == rep(f.OPT_GO, f.REP_ACK)
    assert [type(e) for e in events] == [HandshakeComplete]


@pytest.mark.parametrize(
    "opt",
    [f.OPT_EXTENDED_HEADERS, 4, 12, 0x7FFFFFFF, 0xFFFFFFFF],
    ids=["extended-headers", "peek-export", "12", "big", "max"],
)
def test_unsupported_options_are_answered_err_unsup(opt: int) -> None:
    conn = connect()
    events = negotiate(conn, f.option(opt, b"some data"), f.option(f.OPT_GO, f.info_data("")))
    out = replies(conn)
    assert (out[0].option, out[0].type) == (opt, f.REP_ERR_UNSUP)
    assert out[0].data  # a message for the human
    assert [type(e) for e in events] == [HandshakeComplete]


# -- NBD_OPT_INFO and NBD_OPT_GO ------------------------------------------------------------


def test_info_replies_export_and_block_size_then_ack_and_stays_in_negotiation() -> None:
    conn = connect()
    assert negotiate(conn, f.option(f.OPT_INFO, f.info_data("disk"))) == []
    assert replies(conn) == [
        rep(f.OPT_INFO, f.REP_INFO, f.info_export(SIZE, WRITABLE_FLAGS)),
        rep(f.OPT_INFO, f.REP_INFO, f.info_block_size(1, 4096, 32 * MIB)),
        rep(f.OPT_INFO, f.REP_ACK),
    ]
    assert not conn.handshake_done and not conn.closed


def test_info_sends_name_and_description_when_asked() -> None:
    conn = connect()
    negotiate(conn, f.option(f.OPT_INFO, f.info_data("", f.INFO_NAME, f.INFO_DESCRIPTION, 77)))
    assert replies(conn) == [
        rep(f.OPT_INFO, f.REP_INFO, f.info_export(SIZE, WRITABLE_FLAGS)),
        rep(f.OPT_INFO, f.REP_INFO, struct.pack(">H", f.INFO_NAME) + b"disk"),
        rep(f.OPT_INFO, f.REP_INFO, struct.pack(">H", f.INFO_DESCRIPTION) + b"the test disk"),
        rep(f.OPT_INFO, f.REP_INFO, f.info_block_size(1, 4096, 32 * MIB)),
        rep(f.OPT_INFO, f.REP_ACK),
    ]


def test_go_answers_like_info_then_starts_transmission() -> None:
    conn = connect()
    events = negotiate(
        conn, f.option(f.OPT_STRUCTURED_REPLY), f.option(f.OPT_GO, f.info_data("ro"))
    )
    assert replies(conn) == [
        rep(f.OPT_STRUCTURED_REPLY, f.REP_ACK),
        rep(f.OPT_GO, f.REP_INFO, f.info_export(SIZE, READ_ONLY_FLAGS | f.SEND_DF)),
        rep(f.OPT_GO, f.REP_INFO, f.info_block_size(1, 4096, 32 * MIB)),
        rep(f.OPT_GO, f.REP_ACK),
    ]
    assert events == [HandshakeComplete(Catalog().exports["ro"], True, {})]
    assert conn.handshake_done and conn.structured_replies


def test_go_advertises_the_connections_request_cap() -> None:
    conn = connect(max_request_size=65536)
    negotiate(conn, f.option(f.OPT_GO, f.info_data("disk")))
    assert rep(f.OPT_GO, f.REP_INFO, f.info_block_size(1, 4096, 65536)) in replies(conn)


@pytest.mark.parametrize("opt", [f.OPT_INFO, f.OPT_GO])
def test_info_and_go_of_an_unknown_export_are_err_unknown(opt: int) -> None:
    conn = connect()
    assert negotiate(conn, f.option(opt, f.info_data("nosuch"))) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (opt, f.REP_ERR_UNKNOWN)
    assert b"nosuch" in reply.data
    assert not conn.handshake_done and not conn.closed


def test_go_refused_by_the_catalog_carries_its_error_and_message() -> None:
    catalog = Catalog(refusals={"disk": Refusal(OptionReply.ERR_SHUTDOWN, "going away")})
    conn = connect(catalog)
    negotiate(conn, f.option(f.OPT_GO, f.info_data("disk")))
    assert replies(conn) == [rep(f.OPT_GO, f.REP_ERR_SHUTDOWN, b"going away")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        struct.pack(">I", 10) + b"disk" + struct.pack(">H", 0),  # name runs past the end
        f.string("disk") + struct.pack(">H", 2) + struct.pack(">H", 1),  # fewer infos than said
        f.string("disk") + struct.pack(">H", 0) + b"\x00",  # a byte left over
        f.string("disk") + b"\x00",  # count cut short
        struct.pack(">I", 4097) + b"x" * 4097 + struct.pack(">H", 0),  # name too long
        struct.pack(">I", 2) + b"\xc3\x28" + struct.pack(">H", 0),  # not UTF-8
        struct.pack(">I", 0xFFFFFFFF) + struct.pack(">H", 0),
    ],
    ids=[
        "empty",
        "short-length",
        "name-past-end",
        "fewer-infos",
        "left-over",
        "no-count",
        "name-too-long",
        "not-utf8",
        "huge-length",
    ],
)
@pytest.mark.parametrize("opt", [f.OPT_INFO, f.OPT_GO])
def test_malformed_info_and_go_are_err_invalid_and_negotiation_goes_on(
    opt: int, data: bytes
) -> None:
    conn = connect()
    events = negotiate(conn, f.option(opt, data), f.option(f.OPT_GO, f.info_data("disk")))
    out = replies(conn)
    assert (out[0].option, out[0].type) == (opt, f.REP_ERR_INVALID)
    assert [type(e) for e in events] == [HandshakeComplete]


def test_go_then_requests_in_the_same_chunk() -> None:
    conn = connect()
    events = negotiate(
        conn, f.option(f.OPT_GO, f.info_data("disk")), f.read(7, 0, 512), f.write(8, 512, b"ab")
    )
    assert [type(e) for e in events] == [HandshakeComplete, Request, Request]
    assert events[1] == Request(7, Command.READ, CommandFlag(0), 0, 512)
    assert events[2] == Request(8, Command.WRITE, CommandFlag(0), 512, 2, b"ab")


# -- NBD_OPT_STRUCTURED_REPLY --------------------------------------------------------------


def test_structured_reply_acked_once_then_invalid() -> None:
    conn = connect()
    negotiate(conn, f.option(f.OPT_STRUCTURED_REPLY), f.option(f.OPT_STRUCTURED_REPLY))
    out = replies(conn)
    assert out[0] == rep(f.OPT_STRUCTURED_REPLY, f.REP_ACK)
    assert (out[1].option, out[1].type) == (f.OPT_STRUCTURED_REPLY, f.REP_ERR_INVALID)
    assert conn.structured_replies


def test_structured_reply_with_data_is_invalid_and_not_negotiated() -> None:
    conn = connect()
    negotiate(conn, f.option(f.OPT_STRUCTURED_REPLY, b"\x00"))
    [reply] = replies(conn)
    assert reply.type == f.REP_ERR_INVALID
    assert not conn.structured_replies


# -- metadata contexts ------------------------------------------------------------------------

ALLOCATION = b"base:allocation"


@pytest.mark.parametrize(
    "queries",
    [(), ("base:",), ("base:allocation",), ("qemu:dirty-bitmap:a", "base:")],
    ids=["all", "base-wildcard", "exact", "with-unknown-namespace"],
)
def test_list_meta_context_finds_base_allocation(queries: tuple[str, ...]) -> None:
    conn = connect()
    negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_LIST_META_CONTEXT, f.meta_data("disk", *queries)),
    )
    assert replies(conn)[1:] == [
        rep(f.OPT_LIST_META_CONTEXT, f.REP_META_CONTEXT, struct.pack(">I", 0) + ALLOCATION),
        rep(f.OPT_LIST_META_CONTEXT, f.REP_ACK),
    ]


@pytest.mark.parametrize("queries", [("qemu:dirty-bitmap:a",), ("base:nosuch",), ("nocolon",)])
def test_list_meta_context_matching_nothing_is_a_bare_ack(queries: tuple[str, ...]) -> None:
    conn = connect()
    negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_LIST_META_CONTEXT, f.meta_data("disk", *queries)),
    )
    assert replies(conn)[1:] == [rep(f.OPT_LIST_META_CONTEXT, f.REP_ACK)]


def test_set_meta_context_selects_base_allocation_for_go() -> None:
    conn = connect()
    events = negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation", "x-foo:bar")),
        f.option(f.OPT_GO, f.info_data("disk")),
    )
    assert replies(conn)[1:3] == [
        rep(f.OPT_SET_META_CONTEXT, f.REP_META_CONTEXT, struct.pack(">I", 1) + ALLOCATION),
        rep(f.OPT_SET_META_CONTEXT, f.REP_ACK),
    ]
    [event] = events
    assert isinstance(event, HandshakeComplete)
    assert event.meta_contexts == {1: "base:allocation"}


def test_set_meta_context_default_name_matches_the_canonical_name() -> None:
    conn = connect()
    [event] = negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("", "base:allocation")),
        f.option(f.OPT_EXPORT_NAME, b"disk"),
    )
    assert isinstance(event, HandshakeComplete) and event.meta_contexts == {1: "base:allocation"}


def test_set_meta_context_needs_structured_replies() -> None:
    conn = connect()
    [event] = negotiate(
        conn,
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation")),
        f.option(f.OPT_GO, f.info_data("disk")),
    )
    first = replies(conn)[0]
    assert (first.option, first.type) == (f.OPT_SET_META_CONTEXT, f.REP_ERR_INVALID)
    assert isinstance(event, HandshakeComplete) and event.meta_contexts == {}


def test_set_meta_context_of_an_unknown_export_is_err_unknown() -> None:
    conn = connect()
    negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("nosuch", "base:allocation")),
    )
    reply = replies(conn)[1]
    assert (reply.option, reply.type) == (f.OPT_SET_META_CONTEXT, f.REP_ERR_UNKNOWN)


@pytest.mark.parametrize(
    "second",
    [
        f.meta_data("disk"),  # no queries selects nothing
        f.meta_data("disk", "base:"),  # the wildcard is ignored by SET
        f.meta_data("nosuch", "base:allocation"),  # a failed SET still replaces
        b"\x00\x00\x00\x09disk",  # so does a malformed one
    ],
    ids=["no-queries", "wildcard", "failed", "malformed"],
)
def test_set_meta_context_replaces_the_earlier_selection(second: bytes) -> None:
    conn = connect()
    [event] = negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation")),
        f.option(f.OPT_SET_META_CONTEXT, second),
        f.option(f.OPT_GO, f.info_data("disk")),
    )
    assert isinstance(event, HandshakeComplete) and event.meta_contexts == {}


def test_set_meta_context_for_another_export_does_not_carry_over() -> None:
    conn = connect()
    [event] = negotiate(
        conn,
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("ro", "base:allocation")),
        f.option(f.OPT_GO, f.info_data("disk")),
    )
    assert isinstance(event, HandshakeComplete) and event.meta_contexts == {}


@pytest.mark.parametrize("opt", [f.OPT_LIST_META_CONTEXT, f.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        f.string("disk"),  # no query count
        f.string("disk") + struct.pack(">I", 2) + f.string("base:"),  # fewer queries than said
        f.string("disk") + struct.pack(">I", 1) + struct.pack(">I", 99) + b"base:",
        f.string("disk") + struct.pack(">I", 0) + b"\x00",
        f.string("disk") + struct.pack(">I", 1) + f.string("q" * 4097),
    ],
    ids=["empty", "no-count", "fewer-queries", "query-past-end", "left-over", "query-too-long"],
)
def test_malformed_meta_context_options_are_err_invalid(opt: int, data: bytes) -> None:
    conn = connect()
    negotiate(conn, f.option(f.OPT_STRUCTURED_REPLY), f.option(opt, data))
    reply = replies(conn)[1]
    assert (reply.option, reply.type) == (opt, f.REP_ERR_INVALID)


# -- transmission flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("read_only", "structured", "expected"),
    [
        (False, False, WRITABLE_FLAGS),
        (False, True, WRITABLE_FLAGS | f.SEND_DF),
        (True, False, READ_ONLY_FLAGS),
        (True, True, READ_ONLY_FLAGS | f.SEND_DF),
    ],
)
def test_transmission_flags(read_only: bool, structured: bool, expected: int) -> None:
    flags = transmission_flags(ExportInfo("x", 1, read_only=read_only), structured)
    assert isinstance(flags, TransmissionFlag)
    assert flags == expected


def test_advertise_caps_the_flags_and_the_command_flags_accepted() -> None:
    # A proxy's export: the server behind it has no FUA, no FAST_ZERO, no CACHE.
    behind = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_TRIM | f.SEND_WRITE_ZEROES | 1 << 4  # ROTATIONAL
    info = ExportInfo("disk", SIZE, advertise=TransmissionFlag(behind))
    flags = transmission_flags(info, structured=True)
    assert flags == f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_TRIM | f.SEND_WRITE_ZEROES
    conn = transmitting(catalog=Catalog(exports={"disk": info}))
    fua, fast_zero = 1, 16
    events = conn.receive_data(
        f.request(W, 1, 0, 4, fua, b"data") + f.request(WZ, 2, 0, 4096, fast_zero)
    )
    assert [(type(e), e.handle) for e in events] == [(RejectedRequest, 1), (RejectedRequest, 2)]
    # ... and a read-only one advertises READ_ONLY whatever the cap says.
    read_only = ExportInfo("ro", SIZE, read_only=True, advertise=TransmissionFlag(f.HAS_FLAGS))
    assert transmission_flags(read_only, structured=False) == f.HAS_FLAGS | f.READ_ONLY


# -- oldstyle ---------------------------------------------------------------------------------


def test_oldstyle_greeting_layout_and_handshake_available_at_once() -> None:
    conn = ServerConnection(Catalog(), oldstyle=True)
    out = conn.data_to_send()
    assert len(out) == 152
    assert out == f.oldstyle_greeting(SIZE, WRITABLE_FLAGS)
    assert out[:8] == b"NBDMAGIC" and out[8:16] == bytes.fromhex("0000420281861253")
    assert conn.handshake_done and conn.export == Catalog().exports["disk"]
    assert conn.receive_data(b"") == [HandshakeComplete(Catalog().exports["disk"], False, {})]
    assert conn.receive_data(b"") == []
    assert conn.receive_data(f.read(3, 0, 512)) == [
        Request(3, Command.READ, CommandFlag(0), 0, 512)
    ]


def test_oldstyle_handshake_is_returned_before_the_first_requests() -> None:
    conn = ServerConnection(Catalog(), oldstyle=True)
    events = conn.receive_data(f.read(3, 0, 512))
    assert [type(e) for e in events] == [HandshakeComplete, Request]


def test_oldstyle_refused_default_export_aborts_on_the_first_call() -> None:
    catalog = Catalog(refusals={"": Refusal(OptionReply.ERR_POLICY, "no control yet")})
    conn = ServerConnection(catalog, oldstyle=True)
    assert conn.data_to_send() == b""
    assert conn.closed and not conn.handshake_done
    [event] = conn.receive_data(b"")
    assert isinstance(event, HandshakeAborted) and "no control yet" in event.reason
    assert conn.receive_data(f.read(1, 0, 1)) == []


def test_oldstyle_read_only_flags_in_32_bits() -> None:
    catalog = Catalog(exports={"disk": ExportInfo("disk", 4096, read_only=True)})
    out = ServerConnection(catalog, oldstyle=True).data_to_send()
    assert struct.unpack_from(">QI", out, 16) == (4096, READ_ONLY_FLAGS)


# -- requests -------------------------------------------------------------------------------------


def test_request_fields_and_types() -> None:
    conn = transmitting()
    [event] = conn.receive_data(f.request(f.CMD_WRITE_ZEROES, 2**64 - 1, 4096, 8192, 3))
    assert event == Request(
        2**64 - 1, Command.WRITE_ZEROES, CommandFlag.FUA | CommandFlag.NO_HOLE, 4096, 8192
    )
    assert isinstance(event, Request)
    assert type(event.command) is Command and type(event.flags) is CommandFlag


def test_many_requests_from_one_chunk_in_order() -> None:
    conn = transmitting()
    stream = b"".join(
        f.write(h, h * 16, bytes([h]) * 16) if h % 2 else f.read(h, h * 16, 16) for h in range(100)
    )
    events = conn.receive_data(stream)
    assert [e.handle for e in events] == list(range(100))  # type: ignore[union-attr]
    for e in events:
        assert isinstance(e, Request)
        if e.command is Command.WRITE:
            assert type(e.data) is bytes and e.data == bytes([e.handle]) * 16
        else:
            assert e.data == b""


def test_buffered_counts_what_a_request_received_in_part_holds() -> None:
    conn = transmitting()
    frame = f.request(f.CMD_WRITE, 1, 0, 8192, data=b"x" * 8192)
    assert conn.buffered == 0
    conn.receive_data(frame[:10])  # part of a header
    assert conn.buffered == 10
    conn.receive_data(frame[10:1000])  # the header, and part of the payload
    assert conn.buffered == 1000 - 28
    conn.receive_data(frame[1000:5000])
    assert conn.buffered == 5000 - 28
    assert [type(e) for e in conn.receive_data(frame[5000:])] == [Request]
    assert conn.buffered == 0


def test_write_payload_split_anywhere() -> None:
    payload = bytes(range(256)) * 64
    stream = f.write(5, 0, payload) + f.read(6, 0, 1)
    for cut in (1, 27, 28, 29, 100, len(stream) - 29, len(stream) - 28, len(stream) - 1):
        conn = transmitting()
        events = conn.receive_data(stream[:cut]) + conn.receive_data(stream[cut:])
        assert events == [
            Request(5, Command.WRITE, CommandFlag(0), 0, len(payload), payload),
            Request(6, Command.READ, CommandFlag(0), 0, 1),
        ]


def test_large_write_in_network_sized_chunks() -> None:
    conn = transmitting(catalog=Catalog(exports={"disk": ExportInfo("disk", 64 * MIB)}))
    payload = bytes(32 * MIB)
    stream = f.write(1, 0, payload) + f.request(f.CMD_FLUSH, 2)
    events: list[Event] = []
    for start in range(0, len(stream), 65536):
        events += conn.receive_data(stream[start : start + 65536])
    assert [type(e) for e in events] == [Request, Request]
    assert isinstance(events[0], Request) and events[0].data == payload
    assert type(events[0].data) is bytes


def test_zero_length_write_takes_no_payload() -> None:
    conn = transmitting()
    events = conn.receive_data(f.write(1, SIZE, b"") + f.read(2, 0, 1))
    assert events == [
        Request(1, Command.WRITE, CommandFlag(0), SIZE, 0, b""),
        Request(2, Command.READ, CommandFlag(0), 0, 1),
    ]


def test_bad_request_magic_breaks_the_connection() -> None:
    conn = transmitting()
    with pytest.raises(ProtocolError):
        conn.receive_data(f.read(1, 0, 1) + f.request(f.CMD_READ, magic=0x25609514))
    assert conn.closed
    with pytest.raises(ProtocolError):
        conn.receive_data(f.read(1, 0, 1))


def test_disconnect_ends_parsing_and_everything_after_is_ignored() -> None:
    conn = transmitting()
    events = conn.receive_data(f.read(1, 0, 1) + f.request(f.CMD_DISC, 2) + b"garbage" * 10)
    assert events == [Request(1, Command.READ, CommandFlag(0), 0, 1), Disconnect()]
    assert conn.closed and conn.handshake_done
    assert conn.receive_data(f.request(f.CMD_READ, magic=0)) == []


def test_disconnect_with_odd_fields_is_still_a_disconnect() -> None:
    conn = transmitting()
    assert conn.receive_data(f.request(f.CMD_DISC, 1, 5, 5, 0xFFFF)) == [Disconnect()]


def test_oversized_write_payload_is_skipped_and_the_next_request_parses() -> None:
    conn = transmitting(max_request_size=4096)
    payload = b"\xaa" * 5000
    stream = f.write(1, 0, payload) + f.read(2, 0, 4096)
    events: list[Event] = []
    for start in range(0, len(stream), 100):
        chunk_events = conn.receive_data(stream[start : start + 100])
        if start + 100 < 28 + len(payload):
            assert chunk_events == []  # nothing until the payload has gone by
        events += chunk_events
    assert events == [
        RejectedRequest(1, Command.WRITE, 0, 5000, Errno.EINVAL, events[0].reason),  # type: ignore[union-attr]
        Request(2, Command.READ, CommandFlag(0), 0, 4096),
    ]


def test_oversized_write_is_not_buffered() -> None:
    conn = transmitting(catalog=Catalog(exports={"disk": ExportInfo("disk", 1 << 40)}))
    length = 0xFFFFFFFF
    chunk = bytes(1 << 20)
    conn.receive_data(f.request(f.CMD_WRITE, 1, 0, length))
    sent = 0
    tracemalloc.start()
    try:
        while sent + len(chunk) < length:
            assert conn.receive_data(chunk) == []
            sent += len(chunk)
            if sent >= 64 * MIB:
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
    rest = length - sent
    while rest > len(chunk):
        conn.receive_data(chunk)
        rest -= len(chunk)
    events = conn.receive_data(chunk[:rest] + f.read(2, 0, 1))
    assert [type(e) for e in events] == [RejectedRequest, Request]
    assert isinstance(events[0], RejectedRequest) and events[0].error is Errno.EINVAL


def test_rejected_write_payload_in_the_same_chunk_is_skipped() -> None:
    conn = transmitting("ro")
    events = conn.receive_data(f.write(1, 0, b"x" * 100) + f.read(2, 0, 1))
    assert [type(e) for e in events] == [RejectedRequest, Request]
    assert isinstance(events[0], RejectedRequest) and events[0].error is Errno.EPERM


# -- validation --------------------------------------------------------------------------------

R, W, D, FL, T, C, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


@pytest.mark.parametrize(
    ("conn_kind", "cmd", "flags", "offset", "length", "expected"),
    [
        # unknown commands and flags
        ("rw", 8, 0, 0, 1, Errno.EINVAL),
        ("rw", 0xFFFF, 0, 0, 1, Errno.EINVAL),
        ("rw", R, 1 << 5, 0, 1, Errno.EINVAL),
        ("rw", R, 1 << 15, 0, 1, Errno.EINVAL),
        ("rw", W, NO_HOLE, 0, 1, Errno.EINVAL),
        ("rw", W, FAST_ZERO, 0, 1, Errno.EINVAL),
        ("rw", T, NO_HOLE, 0, 1, Errno.EINVAL),
        ("rw", R, REQ_ONE, 0, 1, Errno.EINVAL),
        ("rw", R, DF, 0, 1, Errno.EINVAL),  # DF without structured replies
        ("sr", R, DF, 0, 1, None),
        ("sr", W, DF, 0, 1, Errno.EINVAL),
        ("meta", BS, REQ_ONE, 0, 1, None),
        ("meta", BS, DF, 0, 1, Errno.EINVAL),
        ("rw", WZ, FUA | NO_HOLE | FAST_ZERO, 0, 1, None),
        # FUA is valid on every command once advertised
        ("rw", W, FUA, 0, 1, None),
        ("rw", T, FUA, 0, 1, None),
        ("rw", R, FUA, 0, 1, None),
        ("rw", FL, FUA, 0, 0, None),
        ("rw", C, FUA, 0, 1, None),
        ("ro", R, FUA, 0, 1, Errno.EINVAL),  # not advertised on a read-only export
        # read-only
        ("ro", W, 0, 0, 1, Errno.EPERM),
        ("ro", T, 0, 0, 1, Errno.EPERM),
        ("ro", WZ, 0, 0, 1, Errno.EPERM),
        ("ro", WZ, FUA, SIZE, 1, Errno.EPERM),
        ("ro", R, 0, 0, 1, None),
        ("ro", C, 0, 0, 1, None),
        ("ro", FL, 0, 0, 0, None),
        # range
        ("rw", R, 0, SIZE - 1, 1, None),
        ("rw", R, 0, SIZE - 1, 2, Errno.EINVAL),
        ("rw", R, 0, 2**64 - 1, 1, Errno.EINVAL),
        ("rw", W, 0, SIZE, 1, Errno.ENOSPC),
        ("rw", WZ, 0, SIZE - 1, 2, Errno.ENOSPC),
        ("rw", T, 0, SIZE - 1, 2, Errno.EINVAL),
        ("rw", C, 0, SIZE, 1, Errno.EINVAL),
        ("meta", BS, 0, SIZE, 1, Errno.EINVAL),
        # zero lengths
        ("rw", R, 0, SIZE, 0, None),
        ("rw", W, 0, SIZE, 0, None),
        ("rw", T, 0, SIZE, 0, None),
        ("rw", WZ, 0, SIZE, 0, None),
        ("rw", C, 0, SIZE, 0, None),
        ("rw", R, 0, SIZE + 1, 0, Errno.EINVAL),
        ("rw", W, 0, SIZE + 1, 0, Errno.ENOSPC),
        ("meta", BS, 0, 0, 0, Errno.EINVAL),
        # size caps: READ and WRITE only
        ("small", R, 0, 0, 4096, None),
        ("small", R, 0, 0, 4097, Errno.EINVAL),
        ("small-sr", R, 0, 0, 4097, Errno.EOVERFLOW),
        ("small", W, 0, 0, 4097, Errno.EINVAL),
        ("small-sr", W, 0, 0, 4097, Errno.EINVAL),
        ("small", T, 0, 0, 8192, None),
        ("small", WZ, 0, 0, 8192, None),
        ("small", C, 0, 0, 8192, None),
        # FLUSH
        ("rw", FL, 0, 0, 0, None),
        ("rw", FL, 0, 1, 0, Errno.EINVAL),
        ("rw", FL, 0, 0, 1, Errno.EINVAL),
        # BLOCK_STATUS needs a metadata context
        ("rw", BS, 0, 0, 1, Errno.EINVAL),
        ("sr", BS, 0, 0, 1, Errno.EINVAL),
        ("meta", BS, 0, 0, SIZE, None),
        # alignment to the minimum block size
        ("aligned", R, 0, 512, 512, None),
        ("aligned", R, 0, 512, 511, Errno.EINVAL),
        ("aligned", T, 0, 1, 512, Errno.EINVAL),
        ("aligned", W, 0, 0, 0, None),
    ],
)
def test_validation(
    conn_kind: str, cmd: int, flags: int, offset: int, length: int, expected: Errno | None
) -> None:
    conn = _conn(conn_kind)
    data = bytes(length) if cmd == W and length <= 8192 else b""
    # a follow-up request shows the framing held, whatever happened to the first
    events = conn.receive_data(f.request(cmd, 42, offset, length, flags, data) + f.read(43, 0, 0))
    assert events[-1] == Request(43, Command.READ, CommandFlag(0), 0, 0)
    event = events[0]
    if expected is None:
        assert event == Request(42, Command(cmd), CommandFlag(flags), offset, length, data)
    else:
        assert isinstance(event, RejectedRequest)
        assert (event.handle, event.command, event.offset, event.length) == (
            42,
            cmd,
            offset,
            length,
        )
        assert event.error is expected and event.reason


def _conn(kind: str) -> ServerConnection:
    if kind == "aligned":
        catalog = Catalog(exports={"disk": ExportInfo("disk", SIZE, min_block_size=512)})
        return transmitting(catalog=catalog)
    return {
        "rw": lambda: transmitting(),
        "ro": lambda: transmitting("ro"),
        "sr": lambda: transmitting(structured=True),
        "meta": lambda: transmitting(structured=True, meta=True),
        "small": lambda: transmitting(max_request_size=4096),
        "small-sr": lambda: transmitting(structured=True, max_request_size=4096),
    }[kind]()


def test_rejected_unknown_command_keeps_its_number() -> None:
    conn = transmitting()
    [event] = conn.receive_data(f.request(99, 1, 0, 1))
    assert isinstance(event, RejectedRequest) and event.command == 99


# -- replies -----------------------------------------------------------------------------------


def test_simple_replies() -> None:
    conn = transmitting()
    assert conn.reply_ok(7) == f.simple_reply(7)
    assert conn.reply_error(7, Errno.EIO, "ignored") == f.simple_reply(7, 5)
    assert conn.reply_read(2**64 - 1, 4096, b"data") == [f.simple_reply(2**64 - 1), b"data"]


def test_structured_replies() -> None:
    conn = transmitting(structured=True)
    assert conn.reply_ok(7) == f.structured_chunk(7, f.REPLY_TYPE_NONE)
    assert conn.reply_error(7, Errno.ENOSPC, "full") == f.structured_chunk(
        7, f.REPLY_TYPE_ERROR, struct.pack(">IH", 28, 4) + b"full"
    )
    assert conn.reply_error(7, Errno.EIO) == f.structured_chunk(
        7, f.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 0)
    )
    header, data = conn.reply_read(9, 4096, b"abc")
    assert data == b"abc"
    assert header + data == f.structured_chunk(
        9, f.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 4096) + b"abc"
    )


def test_structured_zero_length_read_is_a_none_chunk() -> None:
    conn = transmitting(structured=True)
    assert b"".join(conn.reply_read(9, 0, b"")) == f.structured_chunk(9, f.REPLY_TYPE_NONE)


def test_structured_error_message_is_cut_to_4096_bytes_on_a_character() -> None:
    conn = transmitting(structured=True)
    reply = conn.reply_error(1, Errno.EINVAL, "é" * 3000)
    (length,) = struct.unpack_from(">H", reply, 20 + 4)
    assert length == 4096
    assert reply[26:].decode() == "é" * 2048


def test_error_reply_needs_an_error() -> None:
    with pytest.raises(ValueError):
        transmitting().reply_error(1, Errno.OK)


def test_block_status_reply() -> None:
    conn = transmitting(structured=True, meta=True)
    extents = [Extent(4096, BlockState.DATA), Extent(8192, BlockState.HOLE | BlockState.ZERO)]
    assert conn.reply_block_status(3, 1, extents) == f.structured_chunk(
        3, f.REPLY_TYPE_BLOCK_STATUS, struct.pack(">IIIII", 1, 4096, 0, 8192, 3)
    )
    with pytest.raises(ValueError):
        conn.reply_block_status(3, 1, [])
    with pytest.raises(ValueError):
        transmitting().reply_block_status(3, 1, extents)


# -- properties: chunking, garbage, invariants ----------------------------------------------------


def _preamble() -> bytes:
    return f.client_flags() + b"".join(
        [
            f.option(f.OPT_LIST),
            f.option(f.OPT_STARTTLS),
            f.option(f.OPT_STRUCTURED_REPLY),
            f.option(f.OPT_INFO, f.info_data("disk", f.INFO_NAME)),
            f.option(f.OPT_LIST_META_CONTEXT, f.meta_data("disk")),
            f.option(f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation")),
            f.option(f.OPT_GO, f.info_data("disk", f.INFO_BLOCK_SIZE)),
        ]
    )


requests_strategy = st.lists(
    st.one_of(
        st.builds(
            lambda h, o, d, fl: f.write(h, o, d, fl),
            st.integers(0, 2**64 - 1),
            st.integers(0, SIZE + 10),
            st.binary(max_size=300),
            st.sampled_from([0, FUA, NO_HOLE]),
        ),
        st.builds(
            lambda c, h, o, n, fl: f.request(c, h, o, n, fl),
            st.sampled_from([R, FL, T, C, WZ, BS, 8]),
            st.integers(0, 2**64 - 1),
            st.integers(0, SIZE + 10),
            st.integers(0, 8192),
            st.sampled_from([0, FUA, DF, REQ_ONE, NO_HOLE | FAST_ZERO, 0x8000]),
        ),
        # a write rejected for its size: its payload must be skipped
        st.builds(
            lambda h, n: f.request(W, h, 0, n, 0, b"\x55" * n),
            st.integers(0, 100),
            st.integers(4097, 6000),
        ),
    ),
    max_size=12,
)


def _run(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    conn = ServerConnection(Catalog(), max_request_size=4096)
    out = conn.data_to_send()
    events: list[Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
        out += conn.data_to_send()
    return events, out


def _stream(requests: list[bytes], disc: bool) -> bytes:
    return _preamble() + b"".join(requests) + (f.request(D, 0) + b"trailing" if disc else b"")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_strategy, st.booleans(), st.data())
def test_any_chunking_gives_the_same_events(
    requests: list[bytes], disc: bool, data: st.DataObject
) -> None:
    stream = _stream(requests, disc)
    whole = _run([stream])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert _run(chunks) == whole


def test_every_split_point_gives_the_same_events() -> None:
    requests = [
        f.write(1, 0, b"hello world"),
        f.read(2, 512, 1024, DF),
        f.request(W, 3, 0, 5000, 0, b"\x01" * 5000),
        f.request(BS, 4, 0, 4096, REQ_ONE),
        f.request(WZ, 5, 4096, 4096, FUA | NO_HOLE),
        f.write(6, SIZE - 1, b"xy"),
        f.request(FL, 7),
    ]
    stream = _stream(requests, disc=True)
    whole = _run([stream])
    assert [type(e) for e in whole[0]] == [
        HandshakeComplete,
        Request,
        Request,
        RejectedRequest,
        Request,
        Request,
        RejectedRequest,
        Request,
        Disconnect,
    ]
    for cut in range(len(stream) + 1):
        assert _run([stream[:cut], stream[cut:]]) == whole, cut
    small = _stream(requests[:2] + requests[3:], disc=True)
    assert _run([bytes([b]) for b in small]) == _run([small])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_after_the_greeting_only_raises_protocol_error(garbage: bytes, flags: bool) -> None:
    conn = ServerConnection(Catalog())
    try:
        conn.receive_data((f.client_flags() if flags else b"") + garbage)
        conn.data_to_send()
    except ProtocolError:
        assert conn.closed


garbage_options = st.builds(
    lambda opt, data: f.option(opt, data),
    st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda name, n, rest: struct.pack(">I", n) + name + rest,
            st.binary(max_size=8),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=16),
        ),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(garbage_options, max_size=6), st.binary(max_size=64))
def test_garbage_options_only_raise_protocol_error(options: list[bytes], tail: bytes) -> None:
    conn = ServerConnection(Catalog())
    try:
        events = conn.receive_data(f.client_flags() + b"".join(options) + tail)
    except ProtocolError:
        assert conn.closed
        return
    for event in events:
        assert isinstance(event, HandshakeComplete | HandshakeAborted | Request | RejectedRequest)
    if not conn.handshake_done:  # then everything sent was option replies
        f.option_replies(conn.data_to_send()[18:])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_in_transmission_only_raises_protocol_error(garbage: bytes, magic: bool) -> None:
    conn = transmitting(structured=True, meta=True)
    if magic:  # start with a real magic so the rest of the header is random
        garbage = struct.pack(">I", f.REQUEST_MAGIC) + garbage
    try:
        for event in conn.receive_data(garbage):
            _check_invariants(event, SIZE, 32 * MIB)
    except ProtocolError:
        assert conn.closed


def _check_invariants(event: Event, size: int, cap: int) -> None:
    if isinstance(event, Request):
        assert event.offset + event.length <= size
        assert type(event.command) is Command and event.command is not Command.DISC
        assert type(event.data) is bytes
        if event.command is Command.WRITE:
            assert len(event.data) == event.length
        else:
            assert event.data == b""
        if event.command in (Command.READ, Command.WRITE):
            assert event.length <= cap
    else:
        assert isinstance(event, RejectedRequest | Disconnect)


def _oracle(
    cmd: int, flags: int, offset: int, length: int, *, read_only: bool, structured: bool, cap: int
) -> Errno | None:
    """What the request must get, written from the rules, not from the code."""
    if cmd > BS:
        return Errno.EINVAL
    if read_only and cmd in (W, T, WZ):
        return Errno.EPERM
    fua = 0 if read_only else FUA
    allowed = {
        R: fua | (DF if structured else 0),
        W: fua,
        FL: fua,
        T: fua,
        C: fua,
        WZ: fua | NO_HOLE | FAST_ZERO,
        BS: fua | REQ_ONE,
    }[cmd]
    if flags & ~allowed:
        return Errno.EINVAL
    if cmd == FL:
        return Errno.EINVAL if offset or length else None
    if cmd == BS and (not structured or length == 0):
        return Errno.EINVAL
    if cmd in (R, W) and length > cap:
        return Errno.EOVERFLOW if cmd == R and structured else Errno.EINVAL
    if offset + length > SIZE:
        return Errno.ENOSPC if cmd in (W, WZ) else Errno.EINVAL
    return None


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["disk", "ro"]),
    st.booleans(),
    st.lists(
        st.tuples(
            st.integers(0, 9).filter(lambda c: c != D),
            st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF)),
            st.one_of(
                st.integers(0, SIZE + 1),
                st.integers(SIZE - 5000, SIZE + 5000),
                st.integers(0, 2**64 - 1),
            ),
            st.one_of(st.integers(0, 5000), st.integers(0, 2**32 - 1)),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_requests_obey_the_rules_and_never_exceed_the_export(
    export: str, structured: bool, requests: list[tuple[int, int, int, int]]
) -> None:
    cap = 4096
    conn = transmitting(export, structured=structured, meta=structured, max_request_size=cap)
    for handle, (cmd, flags, offset, length) in enumerate(requests):
        # keep payloads small: a long WRITE is only sent when it will be rejected
        assume(cmd != W or length <= 6000)
        data = b"\x5a" * length if cmd == W else b""
        events = conn.receive_data(f.request(cmd, handle, offset, length, flags, data))
        event = only(events)
        _check_invariants(event, SIZE, cap)
        expected = _oracle(
            cmd, flags, offset, length, read_only=export == "ro", structured=structured, cap=cap
        )
        if expected is None:
            assert event == Request(handle, Command(cmd), CommandFlag(flags), offset, length, data)
        else:
            assert isinstance(event, RejectedRequest) and event.error is expected, (event, expected)


# -- the shortcut that builds Request events -------------------------------------------------


def test_request_shortcut_builds_the_same_event() -> None:
    from ferry.nbd import server

    assert server._build_request is not Request  # the shortcut is in use for today's Request
    built = server._build_request(1, Command.WRITE, CommandFlag.FUA, 2, 3, b"abc")
    assert type(built) is Request
    assert built == Request(1, Command.WRITE, CommandFlag.FUA, 2, 3, b"abc")
    assert hash(built) == hash(Request(1, Command.WRITE, CommandFlag.FUA, 2, 3, b"abc"))
    with pytest.raises(AttributeError):
        built.length = 4  # type: ignore[misc]  # still frozen


def test_request_shortcut_steps_aside_for_a_validating_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ferry.nbd import server

    @dataclass(frozen=True, slots=True)
    class Checked:
        handle: int
        command: Command
        flags: CommandFlag
        offset: int
        length: int
        data: bytes = b""

        def __post_init__(self) -> None:
            if self.length < 0:
                raise ValueError("negative length")

    monkeypatch.setattr(server, "Request", Checked)
    assert server._request_builder() is Checked  # type: ignore[comparison-overlap]


def test_list_meta_context_is_answered_even_before_structured_replies() -> None:
    # The spec says a server MAY refuse it; listing changes nothing, so ferry answers.
    conn = connect()
    negotiate(conn, f.option(f.OPT_LIST_META_CONTEXT, f.meta_data("disk")))
    assert replies(conn) == [
        rep(f.OPT_LIST_META_CONTEXT, f.REP_META_CONTEXT, struct.pack(">I", 0) + ALLOCATION),
        rep(f.OPT_LIST_META_CONTEXT, f.REP_ACK),
    ]


# -- ferry's migration extension: FERRY_OPT_MIGRATE and FERRY_CMD_COMMIT ---------------------
#
# Numbers spelled out as constants.py documents them (the wire contract), not
# imported: a test that builds frames with the code under test cannot catch it
# getting a number wrong.

OPT_MIGRATE = 0x46455201  # b"FER\x01"
CMD_COMMIT = 0xF001


def migrate_data(version: int = 1, size: int = SIZE) -> bytes:
    return struct.pack(">IQ", version, size)


@dataclass
class Listener(Catalog):
    """A catalog whose "disk" refuses ordinary clients (it is listening) but admits a sender."""

    refusals: dict[str, Refusal] = field(
        default_factory=lambda: {
            "disk": Refusal(OptionReply.ERR_POLICY, "export 'disk' is listening for a migration")
        }
    )
    refuse_sender: Refusal | None = None
    landing: ConnectionLanding | Refusal = field(
        default_factory=lambda: ConnectionLanding("boot/net:7", "10.0.0.5/24@eth0")
    )
    admitted: list[MigrationRequest] = field(default_factory=list)
    sender_lookups: list[str] = field(default_factory=list)

    def admit_migration(self, request: MigrationRequest) -> Refusal | None:
        self.admitted.append(request)
        return self.refuse_sender

    def connection_landing(self) -> ConnectionLanding | Refusal:
        return self.landing

    def lookup_sender(self, name: str) -> ExportInfo | Refusal:
        self.sender_lookups.append(name)
        return self.exports.get(name or "disk") or Refusal(OptionReply.ERR_UNKNOWN, "no such")


def sender(listener: Listener | None = None, **kwargs: int) -> ServerConnection:
    listener = listener or Listener()
    conn = ServerConnection(listener, migration=listener, **kwargs)  # type: ignore[arg-type]
    assert conn.data_to_send() == f.newstyle_greeting()
    return conn


def sending(listener: Listener | None = None, *, structured: bool = False) -> ServerConnection:
    """A sender past GO, its handshake output drained."""
    conn = sender(listener)
    frames = [f.option(OPT_MIGRATE, migrate_data())]
    if structured:
        frames.append(f.option(f.OPT_STRUCTURED_REPLY))
    frames.append(f.option(f.OPT_GO, f.info_data("disk")))
    events = negotiate(conn, *frames)
    assert [type(e) for e in events] == [HandshakeComplete], events
    conn.data_to_send()
    return conn


def test_migrate_is_acked_and_the_sender_finds_the_listening_export() -> None:
    listener = Listener()
    conn = sender(listener)
    events = negotiate(
        conn,
        f.option(OPT_MIGRATE, migrate_data(1, SIZE)),
        f.option(f.OPT_GO, f.info_data("disk")),
    )
    out = replies(conn)
    assert out[0] == rep(OPT_MIGRATE, f.REP_ACK)
    assert out[1:] == [
        rep(f.OPT_GO, f.REP_INFO, f.info_export(SIZE, WRITABLE_FLAGS)),
        rep(f.OPT_GO, f.REP_INFO, f.info_block_size(1, 4096, 32 * MIB)),
        rep(f.OPT_GO, f.REP_ACK),
    ]
    assert listener.admitted == [MigrationRequest(1, SIZE)]
    assert listener.sender_lookups == ["disk"]
    event = only(events)
    assert isinstance(event, HandshakeComplete)
    assert event.migration == MigrationRequest(1, SIZE)
    assert conn.migration == MigrationRequest(1, SIZE)


def test_without_migrate_a_listening_export_refuses_go_with_its_message() -> None:
    conn = sender()
    assert negotiate(conn, f.option(f.OPT_GO, f.info_data("disk"))) == []
    assert replies(conn) == [
        rep(f.OPT_GO, f.REP_ERR_POLICY, b"export 'disk' is listening for a migration")
    ]
    assert conn.migration is None and not conn.handshake_done


def test_the_sender_uses_lookup_sender_for_info_and_meta_contexts_too() -> None:
    listener = Listener()
    conn = sender(listener)
    negotiate(
        conn,
        f.option(OPT_MIGRATE, migrate_data()),
        f.option(f.OPT_STRUCTURED_REPLY),
        f.option(f.OPT_INFO, f.info_data("disk")),
        f.option(f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation")),
        f.option(f.OPT_EXPORT_NAME, b"disk"),
    )
    assert listener.sender_lookups == ["disk", "disk", "disk"]
    assert conn.handshake_done and conn.migration is not None


def test_export_name_carries_the_migration_too() -> None:
    conn = sender()
    events = negotiate(conn, f.option(OPT_MIGRATE, migrate_data()), f.option(f.OPT_EXPORT_NAME))
    event = only(events)
    assert isinstance(event, HandshakeComplete) and event.migration == MigrationRequest(1, SIZE)


def test_a_refused_migration_carries_the_catalogs_error_and_message() -> None:
    listener = Listener(
        refuse_sender=Refusal(OptionReply.ERR_POLICY, "a migration is already being received")
    )
    conn = sender(listener)
    events = negotiate(
        conn, f.option(OPT_MIGRATE, migrate_data()), f.option(f.OPT_GO, f.info_data("disk"))
    )
    assert events == []
    assert replies(conn) == [
        rep(OPT_MIGRATE, f.REP_ERR_POLICY, b"a migration is already being received"),
        rep(f.OPT_GO, f.REP_ERR_POLICY, b"export 'disk' is listening for a migration"),
    ]
    assert listener.sender_lookups == [] and conn.migration is None


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, migrate_data() + b"x" * 4097])
def test_a_migrate_payload_of_the_wrong_length_is_invalid(data: bytes) -> None:
    listener = Listener()
    conn = sender(listener)
    assert negotiate(conn, f.option(OPT_MIGRATE, data)) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (OPT_MIGRATE, f.REP_ERR_INVALID)
    assert b"FERRY_OPT_MIGRATE" in reply.data and b"12" in reply.data and b"4096" in reply.data
    assert listener.admitted == [] and conn.migration is None


def test_the_migrate_payload_names_the_sources_lease() -> None:
    listener = Listener()
    conn = sender(listener)
    name = "/srv/images/vm \u00e9.img"
    assert negotiate(conn, f.option(OPT_MIGRATE, migrate_data() + name.encode())) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (OPT_MIGRATE, f.REP_ACK)
    assert listener.admitted == [MigrationRequest(1, SIZE, name)]


def test_a_lease_name_that_is_not_utf8_is_invalid() -> None:
    listener = Listener()
    conn = sender(listener)
    assert negotiate(conn, f.option(OPT_MIGRATE, migrate_data() + b"\xff\xfe")) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (OPT_MIGRATE, f.REP_ERR_INVALID)
    assert b"UTF-8" in reply.data
    assert listener.admitted == []


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_an_unknown_migrate_version_is_unsupported_with_a_message(version: int) -> None:
    listener = Listener()
    conn = sender(listener)
    assert negotiate(conn, f.option(OPT_MIGRATE, migrate_data(version))) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (OPT_MIGRATE, f.REP_ERR_UNSUP)
    assert f"version {version} is not supported".encode() in reply.data
    assert listener.admitted == [] and conn.migration is None


def test_a_second_migrate_is_invalid_and_the_first_still_holds() -> None:
    listener = Listener()
    conn = sender(listener)
    events = negotiate(
        conn,
        f.option(OPT_MIGRATE, migrate_data()),
        f.option(OPT_MIGRATE, migrate_data()),
        f.option(f.OPT_GO, f.info_data("disk")),
    )
    out = replies(conn)
    assert out[0] == rep(OPT_MIGRATE, f.REP_ACK)
    assert (out[1].option, out[1].type) == (OPT_MIGRATE, f.REP_ERR_INVALID)
    assert len(listener.admitted) == 1
    event = only(events)
    assert isinstance(event, HandshakeComplete) and event.migration is not None


def test_without_a_migration_catalog_migrate_is_unsupported() -> None:
    conn = connect(Listener())
    assert negotiate(conn, f.option(OPT_MIGRATE, migrate_data())) == []
    [reply] = replies(conn)
    assert (reply.option, reply.type) == (OPT_MIGRATE, f.REP_ERR_UNSUP)


def test_a_plain_client_has_no_migration() -> None:
    conn = sender(Listener(refusals={}))
    event = only(negotiate(conn, f.option(f.OPT_GO, f.info_data("disk"))))
    assert isinstance(event, HandshakeComplete) and event.migration is None


@pytest.mark.parametrize("structured", [False, True])
def test_the_commit_is_an_event_on_the_senders_connection(structured: bool) -> None:
    conn = sending(structured=structured)
    events = conn.receive_data(
        f.write(1, 0, b"abc")
        + f.request(CMD_COMMIT, 2, 0xDEADBEEF12345678)
        + f.request(f.CMD_FLUSH, 3)
    )
    assert events == [
        Request(1, Command.WRITE, CommandFlag(0), 0, 3, b"abc"),
        Commit(2, 0xDEADBEEF12345678),
        Request(3, Command.FLUSH, CommandFlag(0), 0, 0),
    ]
    # The ack is an ordinary reply to the commit's handle.
    expected = f.structured_chunk(2, f.REPLY_TYPE_NONE) if structured else f.simple_reply(2)
    assert conn.reply_ok(2) == expected


def test_a_commit_with_fua_is_still_a_commit() -> None:
    conn = sending()
    assert conn.receive_data(f.request(CMD_COMMIT, 5, 7, flags=FUA)) == [Commit(5, 7)]


@pytest.mark.parametrize(
    ("length", "flags", "why"),
    [(4, 0, "carries no data"), (0, NO_HOLE, "not allowed"), (0, 0x8000, "not allowed")],
)
def test_a_malformed_commit_is_rejected_and_the_stream_goes_on(
    length: int, flags: int, why: str
) -> None:
    conn = sending()
    events = conn.receive_data(f.request(CMD_COMMIT, 9, 1, length, flags) + f.read(10, 0, 1))
    rejected, read = events
    assert isinstance(rejected, RejectedRequest)
    assert (rejected.handle, rejected.command, rejected.error) == (9, CMD_COMMIT, Errno.EINVAL)
    assert why in rejected.reason
    assert read == Request(10, Command.READ, CommandFlag(0), 0, 1)


@pytest.mark.parametrize("with_catalog", [False, True])
def test_a_commit_elsewhere_is_einval(with_catalog: bool) -> None:
    conn = transmitting() if not with_catalog else sender(Listener(refusals={}))
    if with_catalog:
        negotiate(conn, f.option(f.OPT_GO, f.info_data("disk")))
        conn.data_to_send()
    rejected = only(conn.receive_data(f.request(CMD_COMMIT, 4, 99)))
    assert isinstance(rejected, RejectedRequest)
    assert (rejected.handle, rejected.command, rejected.error) == (4, CMD_COMMIT, Errno.EINVAL)
    assert "migration sender" in rejected.reason
    assert conn.reply_error(4, rejected.error) == f.simple_reply(4, f.EINVAL)


def _sender_run(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    listener = Listener()
    conn = ServerConnection(listener, migration=listener, max_request_size=4096)  # type: ignore[arg-type]
    out = conn.data_to_send()
    events: list[Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
        out += conn.data_to_send()
    return events, out


def _sender_stream(requests: list[bytes], disc: bool) -> bytes:
    preamble = f.client_flags() + b"".join(
        [
            f.option(OPT_MIGRATE, b"\x00" * 5),  # invalid, answered, the session goes on
            f.option(OPT_MIGRATE, migrate_data(2)),  # unsupported version
            f.option(OPT_MIGRATE, migrate_data()),
            f.option(f.OPT_STRUCTURED_REPLY),
            f.option(f.OPT_GO, f.info_data("disk", f.INFO_BLOCK_SIZE)),
        ]
    )
    return preamble + b"".join(requests) + (f.request(D, 0) + b"trailing" if disc else b"")


commits = st.builds(
    lambda h, token, n, fl: f.request(CMD_COMMIT, h, token, n, fl),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 0, 8]),
    st.sampled_from([0, FUA, NO_HOLE]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_strategy, st.lists(commits, max_size=3), st.booleans(), st.data())
def test_a_senders_stream_gives_the_same_events_however_it_is_split(
    requests: list[bytes], commit_frames: list[bytes], disc: bool, data: st.DataObject
) -> None:
    mixed = data.draw(st.permutations(requests + commit_frames))
    stream = _sender_stream(list(mixed), disc)
    whole = _sender_run([stream])
    assert isinstance(whole[0][0], HandshakeComplete) and whole[0][0].migration is not None
    assert sum(isinstance(e, Commit) for e in whole[0]) == sum(
        1
        for c in commit_frames
        if struct.unpack(">I", c[24:28])[0] == 0 and struct.unpack(">H", c[4:6])[0] in (0, FUA)
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert _sender_run(chunks) == whole


def test_a_senders_stream_split_at_every_byte() -> None:
    requests = [
        f.write(1, 0, b"hello"),
        f.request(CMD_COMMIT, 2, 12345),
        f.request(W, 3, 0, 5000, 0, b"\x01" * 5000),
        f.request(CMD_COMMIT, 4, 1, 3),
        f.request(FL, 5),
    ]
    stream = _sender_stream(requests, disc=True)
    whole = _sender_run([stream])
    assert [type(e) for e in whole[0]] == [
        HandshakeComplete,
        Request,
        Commit,
        RejectedRequest,
        RejectedRequest,
        Request,
        Disconnect,
    ]
    for cut in range(len(stream) + 1):
        assert _sender_run([stream[:cut], stream[cut:]]) == whole, cut


# -- flexnbd: an oldstyle connection to a listening export is mirror-only ------------------

MIRROR_HANDLE = int.from_bytes(b".MIRROR.", "big")
LISTENING = {"": Refusal(OptionReply.ERR_POLICY, "export 'disk' is listening for a migration")}


def test_an_oldstyle_connection_to_a_listening_export_is_mirror_only() -> None:
    listener = Listener(refusals=dict(LISTENING))
    conn = ServerConnection(listener, migration=listener, oldstyle=True)  # type: ignore[arg-type]
    # The hello carries the size, which a flexnbd sender checks.
    assert conn.data_to_send() == f.oldstyle_greeting(SIZE, WRITABLE_FLAGS)
    assert listener.sender_lookups == [""] and listener.admitted == []
    assert conn.mirror_only
    [complete] = conn.receive_data(b"")
    assert complete == HandshakeComplete(listener.exports["disk"], False, {}, flexnbd=True)
    events = conn.receive_data(
        f.write(MIRROR_HANDLE, 4096, b"abcd")
        + f.request(f.CMD_WRITE_ZEROES, MIRROR_HANDLE, 8192, 4096)
        + f.request(f.CMD_FLUSH, 7)
        + f.write(5, 0, b"nope")  # an ordinary write: its payload is skipped
        + f.read(MIRROR_HANDLE, 0, 512)
        + f.request(f.CMD_TRIM, 6, 0, 4096)
        + f.write(MIRROR_HANDLE, SIZE - 2, b"over")
        + f.request(f.CMD_DISC, MIRROR_HANDLE)
    )
    assert events[:3] == [
        Request(MIRROR_HANDLE, Command.WRITE, CommandFlag(0), 4096, 4, b"abcd"),
        Request(MIRROR_HANDLE, Command.WRITE_ZEROES, CommandFlag(0), 8192, 4096),
        Request(7, Command.FLUSH, CommandFlag(0), 0, 0),
    ]
    rejected = events[3:6]
    assert [(type(e), e.handle, e.error) for e in rejected] == [  # type: ignore[union-attr]
        (RejectedRequest, 5, Errno.EPERM),
        (RejectedRequest, MIRROR_HANDLE, Errno.EPERM),
        (RejectedRequest, 6, Errno.EPERM),
    ]
    assert ".MIRROR." in rejected[0].reason  # type: ignore[union-attr]
    # A mirror write is still checked like any other.
    assert isinstance(events[6], RejectedRequest) and events[6].error == Errno.ENOSPC
    assert events[7:] == [Disconnect()] and conn.closed


def test_an_oldstyle_connection_to_a_serving_export_is_an_ordinary_client() -> None:
    listener = Listener(refusals={})
    conn = ServerConnection(listener, migration=listener, oldstyle=True)  # type: ignore[arg-type]
    assert not conn.mirror_only and listener.sender_lookups == []
    [complete] = conn.receive_data(b"")
    assert isinstance(complete, HandshakeComplete) and not complete.flexnbd
    assert conn.receive_data(f.write(5, 0, b"ok")) == [
        Request(5, Command.WRITE, CommandFlag(0), 0, 2, b"ok")
    ]


def test_an_oldstyle_connection_refused_as_a_sender_too_is_aborted() -> None:
    listener = Listener(refusals=dict(LISTENING))
    listener.exports = {}  # lookup_sender refuses: no such export
    conn = ServerConnection(listener, migration=listener, oldstyle=True)  # type: ignore[arg-type]
    assert conn.data_to_send() == b"" and conn.closed
    [event] = conn.receive_data(b"")
    assert isinstance(event, HandshakeAborted)


def test_a_mirror_write_split_across_chunks_is_joined() -> None:
    listener = Listener(refusals=dict(LISTENING))
    conn = ServerConnection(listener, migration=listener, oldstyle=True)  # type: ignore[arg-type]
    conn.receive_data(b"")
    frame = f.write(MIRROR_HANDLE, 0, b"0123456789") + f.write(9, 0, b"ab")
    events: list[Event] = []
    for i in range(len(frame)):
        events += conn.receive_data(frame[i : i + 1])
    assert events[0] == Request(MIRROR_HANDLE, Command.WRITE, CommandFlag(0), 0, 10, b"0123456789")
    assert isinstance(events[1], RejectedRequest) and events[1].error == Errno.EPERM
    assert len(events) == 2


# -- ferry's FERRY_OPT_LOCATE: where a handed-off export went --------------------------------

OPT_LOCATE = 0x46455203  # b"FER\x03", spelled out: see ferry.nbd.constants
REP_LOCATION = 0x46455201


def locate_data(name: str) -> bytes:
    return f.string(name)


def location_data(host: str, port: int, name: str = "") -> bytes:
    return struct.pack(">HH", port, len(host)) + host.encode() + name.encode()


@dataclass
class Locator:
    moved: dict[str, list[Location]] = field(default_factory=dict)

    def locate(self, name: str) -> Sequence[Location] | Refusal:
        if name not in ("", "disk"):
            return Refusal(OptionReply.ERR_UNKNOWN, f"no export {name!r}")
        return self.moved.get(name or "disk", [])


def test_locate_names_each_place_the_export_went_then_acks() -> None:
    locator = Locator({"disk": [Location("10.0.0.2", 10809), Location("fe80::1", 20, "d2")]})
    conn = ServerConnection(Catalog(), locator=locator)
    conn.data_to_send()
    events = negotiate(conn, f.option(OPT_LOCATE, locate_data("disk")))
    assert events == []
    assert replies(conn) == [
        rep(OPT_LOCATE, REP_LOCATION, location_data("10.0.0.2", 10809)),
        rep(OPT_LOCATE, REP_LOCATION, location_data("fe80::1", 20, "d2")),
        rep(OPT_LOCATE, f.REP_ACK),
    ]


def test_locate_of_an_export_still_here_is_a_bare_ack_and_negotiation_goes_on() -> None:
    conn = ServerConnection(Catalog(), locator=Locator())
    conn.data_to_send()
    events = negotiate(
        conn, f.option(OPT_LOCATE, locate_data("")), f.option(f.OPT_GO, f.info_data(""))
    )
    out = replies(conn)
    assert out[0] == rep(OPT_LOCATE, f.REP_ACK)
    assert [type(e) for e in events] == [HandshakeComplete]


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (locate_data("nope"), f.REP_ERR_UNKNOWN),
        (b"\x00\x00", f.REP_ERR_INVALID),
        (struct.pack(">I", 10) + b"disk", f.REP_ERR_INVALID),
        (locate_data("disk") + b"x", f.REP_ERR_INVALID),
        (struct.pack(">I", 2) + b"\xff\xfe", f.REP_ERR_INVALID),
    ],
    ids=["unknown", "short", "name-runs-past", "trailing", "not-utf8"],
)
def test_locate_refusals_and_bad_requests_are_errors_and_negotiation_goes_on(
    data: bytes, kind: int
) -> None:
    conn = ServerConnection(Catalog(), locator=Locator())
    conn.data_to_send()
    events = negotiate(conn, f.option(OPT_LOCATE, data), f.option(f.OPT_GO, f.info_data("")))
    out = replies(conn)
    assert (out[0].option, out[0].type) == (OPT_LOCATE, kind) and out[0].data
    assert [type(e) for e in events] == [HandshakeComplete]


def test_without_a_locator_locate_is_unsupported() -> None:
    conn = connect()
    negotiate(conn, f.option(OPT_LOCATE, locate_data("disk")))
    (out,) = replies(conn)
    assert (out.option, out.type) == (OPT_LOCATE, f.REP_ERR_UNSUP)


# -- client connections carried with the commit: FERRY_OPT_CONNECTIONS, FERRY_CMD_CONNECTION ----

OPT_CONNECTIONS = 0x46455202  # b"FER\x02"
REP_LANDING = 0x46455202  # b"FER\x02", a reply type
CMD_CONNECTION = 0xF002
MAX_CONNECTION = 128 * 1024 * 1024


def carrying(listener: Listener | None = None) -> ServerConnection:
    """A sender past GO whose FERRY_OPT_CONNECTIONS was acknowledged."""
    conn = sender(listener)
    events = negotiate(
        conn,
        f.option(OPT_MIGRATE, migrate_data()),
        f.option(OPT_CONNECTIONS),
        f.option(f.OPT_GO, f.info_data("disk")),
    )
    assert [type(e) for e in events] == [HandshakeComplete], events
    conn.data_to_send()
    return conn


def landing_bytes(host: str, service: str) -> bytes:
    return b"".join(
        struct.pack(">H", len(text.encode())) + text.encode() for text in (host, service)
    )


def test_connections_are_answered_with_who_the_destination_is_then_acked() -> None:
    # As NBD_OPT_GO's NBD_REP_INFO: the data in a reply of its own, then a plain ACK.
    conn = sender()
    negotiate(conn, f.option(OPT_MIGRATE, migrate_data()), f.option(OPT_CONNECTIONS))
    assert replies(conn) == [
        rep(OPT_MIGRATE, f.REP_ACK),
        rep(OPT_CONNECTIONS, REP_LANDING, landing_bytes("boot/net:7", "10.0.0.5/24@eth0")),
        rep(OPT_CONNECTIONS, f.REP_ACK),
    ]
    landing = ConnectionLanding.from_bytes(landing_bytes("boot/net:7", "10.0.0.5/24@eth0"))
    assert landing == ConnectionLanding("boot/net:7", "10.0.0.5/24@eth0")


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([f.option(OPT_CONNECTIONS)], "only after FERRY_OPT_MIGRATE"),
        ([f.option(OPT_MIGRATE, migrate_data()), f.option(OPT_CONNECTIONS, b"x")], "bytes of data"),
        (
            [f.option(OPT_MIGRATE, migrate_data()), f.option(OPT_CONNECTIONS)] * 1
            + [f.option(OPT_CONNECTIONS)],
            "already acknowledged",
        ),
    ],
)
def test_a_wrong_connections_option_is_invalid(frames: list[bytes], why: str) -> None:
    conn = sender()
    negotiate(conn, *frames)
    last = replies(conn)[-1]
    assert last.type == f.REP_ERR_INVALID and why.encode() in last.data


def test_a_node_that_cannot_take_connections_says_why() -> None:
    listener = Listener(landing=Refusal(OptionReply.ERR_UNSUP, "no CAP_NET_ADMIN"))
    conn = sender(listener)
    negotiate(conn, f.option(OPT_MIGRATE, migrate_data()), f.option(OPT_CONNECTIONS))
    assert replies(conn)[-1] == rep(OPT_CONNECTIONS, f.REP_ERR_UNSUP, b"no CAP_NET_ADMIN")


@pytest.mark.parametrize("cut", [0, 1, 23, 28, 29, 40])
def test_a_carried_connection_is_its_payload_however_it_arrives(cut: int) -> None:
    conn = carrying()
    state = bytes(range(40)) * 3
    stream = f.request(CMD_CONNECTION, 4, 0, len(state)) + state + f.read(5, 0, 1)
    events = conn.receive_data(stream[:cut]) + conn.receive_data(stream[cut:])
    assert events == [CarriedConnection(4, state), Request(5, Command.READ, CommandFlag(0), 0, 1)]
    assert conn.buffered == 0


@pytest.mark.parametrize(
    ("offset", "length", "flags", "why"),
    [
        (0, 0, 0, "not in 1.."),
        (0, MAX_CONNECTION + 1, 0, "not in 1.."),
        (8, 4, 0, "offset 0"),
        (0, 4, FUA, "no flags"),
    ],
)
def test_a_malformed_carried_connection_is_rejected_its_payload_counted_off(
    offset: int, length: int, flags: int, why: str
) -> None:
    conn = carrying()
    payload = b"z" * min(length, 8)
    events = conn.receive_data(f.request(CMD_CONNECTION, 9, offset, length, flags) + payload)
    if length > len(payload):
        assert events == []
        assert conn.buffered == 0  # counted off, never kept
        return
    (rejected,) = events
    assert isinstance(rejected, RejectedRequest)
    assert (rejected.handle, rejected.error) == (9, Errno.EINVAL) and why in rejected.reason


def test_a_connection_from_a_sender_that_was_not_told_yes_is_rejected() -> None:
    conn = sending()  # FERRY_OPT_MIGRATE only
    events = conn.receive_data(f.request(CMD_CONNECTION, 3, 0, 2) + b"ab" + f.read(4, 0, 1))
    rejected, read = events
    assert isinstance(rejected, RejectedRequest) and rejected.error == Errno.EINVAL
    assert "FERRY_OPT_CONNECTIONS" in rejected.reason
    assert read == Request(4, Command.READ, CommandFlag(0), 0, 1)
