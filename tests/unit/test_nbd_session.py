"""An NBD session moved mid-stream answers exactly as one that never moved.

The client's byte stream is cut anywhere after its handshake; the server
that read the first part is snapshotted (its unanswered requests handed in
as raw bytes, as the Twisted connection will), the snapshot goes through its
wire format, and a server restored from it reads the rest.  Every request
must come out of the pair as it came out of one server fed the whole
stream, and be answered with the same bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.nbd.constants import Command, Errno, TransmissionFlag
from ferry.nbd.events import (
    Disconnect,
    Event,
    ExportInfo,
    Extent,
    HandshakeComplete,
    RejectedRequest,
    Request,
)
from ferry.nbd.server import ServerConnection
from ferry.nbd.session import (
    MAX_IN_FLIGHT_BYTES,
    SESSION_VERSION,
    SessionSnapshot,
    SnapshotError,
    encode_request,
)

from . import nbd_frames as f
from .test_nbd_server import LISTENING, SIZE, Catalog, Listener, requests_strategy, sending

MAX_REQUEST = 4096  # requests_strategy's oversized writes are rejected at this cap
R, W, D, FL, T, C, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16

# Handshakes that settle different sessions: structured replies with a
# metadata context, plain GO, oldstyle-like EXPORT_NAME, a read-only export.
HANDSHAKES = {
    "structured+meta": f.client_flags()
    + f.option(f.OPT_STRUCTURED_REPLY)
    + f.option(f.OPT_SET_META_CONTEXT, f.meta_data("disk", "base:allocation"))
    + f.option(f.OPT_GO, f.info_data("disk", f.INFO_BLOCK_SIZE)),
    "simple": f.client_flags() + f.option(f.OPT_GO, f.info_data("")),
    "export-name": f.client_flags(f.FLAG_C_FIXED_NEWSTYLE) + f.option(f.OPT_EXPORT_NAME, b"disk"),
    "read-only": f.client_flags()
    + f.option(f.OPT_STRUCTURED_REPLY)
    + f.option(f.OPT_GO, f.info_data("ro")),
}


def answer(conn: ServerConnection, event: Event) -> bytes | None:
    """What a server would write for ``event``: deterministic, built by ``conn``."""
    if isinstance(event, RejectedRequest):
        return conn.reply_error(event.handle, event.error, event.reason)
    if not isinstance(event, Request):
        return None
    if event.command is Command.READ:
        data = bytes((event.offset + i) & 0xFF for i in range(event.length))
        return b"".join(conn.reply_read(event.handle, event.offset, data))
    if event.command is Command.BLOCK_STATUS:
        return conn.reply_block_status(event.handle, 1, [Extent(event.length, 0)])  # type: ignore[arg-type]
    return conn.reply_ok(event.handle)


@dataclass
class Answered:
    """One event as the client experiences it: what was parsed, and the bytes it got back."""

    event: Event
    reply: bytes | None


def feed(conn: ServerConnection, data: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    bounds = [0, *sorted(c for c in cuts if 0 <= c <= len(data)), len(data)]
    for a, b in itertools.pairwise(bounds):
        events += conn.receive_data(data[a:b])
        conn.data_to_send()
    return events


def never_moved(stream: bytes) -> list[Answered]:
    conn = ServerConnection(Catalog(), max_request_size=MAX_REQUEST)
    conn.data_to_send()
    return [Answered(e, answer(conn, e)) for e in feed(conn, stream, [])]


def moved(
    stream: bytes, cut: int, answered_first: int, cuts: list[int]
) -> tuple[list[Answered], ServerConnection]:
    """The stream read by a server that moves at byte ``cut``.

    Before the move the server answers its first ``answered_first``
    requests and every rejection (they need no I/O); the other requests it
    parsed are in flight and go in the snapshot as raw bytes.
    """
    source = ServerConnection(Catalog(), max_request_size=MAX_REQUEST)
    source.data_to_send()
    before = feed(source, stream[:cut], cuts)
    requests = [i for i, e in enumerate(before) if isinstance(e, Request)]
    in_flight = requests[answered_first:]
    snapshot = source.snapshot(b"".join(encode_request(before[i]) for i in in_flight))  # type: ignore[arg-type]
    travelled = SessionSnapshot.from_bytes(snapshot.to_bytes())
    assert travelled == snapshot
    destination, reparsed = ServerConnection.restore(travelled, Catalog())
    assert reparsed == [before[i] for i in in_flight]
    assert destination.data_to_send() == b""
    assert destination.flags == source.flags
    assert destination.export == source.export
    assert destination.structured_replies == source.structured_replies
    story = [
        Answered(e, answer(destination if i in in_flight else source, e))
        for i, e in enumerate(before)
    ]
    after = feed(destination, stream[cut:], [c - cut for c in cuts])
    story += [Answered(e, answer(destination, e)) for e in after]
    return story, destination


def handshake_end(preamble: bytes) -> int:
    """The first cut at which the server is in transmission."""
    return len(preamble)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(HANDSHAKES)),
    requests_strategy,
    st.booleans(),
    st.data(),
)
def test_a_session_moved_at_any_byte_answers_as_one_that_never_moved(
    handshake: str, requests: list[bytes], disc: bool, data: st.DataObject
) -> None:
    preamble = HANDSHAKES[handshake]
    stream = preamble + b"".join(requests) + (f.request(D) + b"after" if disc else b"")
    cut = data.draw(st.integers(handshake_end(preamble), len(stream)), label="cut")
    answered_first = data.draw(st.integers(0, len(requests)), label="answered before the move")
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="chunking")
    reference = never_moved(stream)
    try:
        story, destination = moved(stream, cut, answered_first, cuts)
    except SnapshotError:
        # Only a session that has ended (its DISC read before the cut) refuses.
        assert disc and cut >= len(stream) - len(b"after")
        assert isinstance(reference[-1].event, Disconnect)
        return
    assert story == reference
    assert destination.closed == disc


def test_every_byte_boundary_of_a_rich_stream() -> None:
    """The property, exhaustively, on one stream with every kind of request in it."""
    preamble = HANDSHAKES["structured+meta"]
    requests = [
        f.write(1, 0, b"hello world"),
        f.read(2, 512, 1024, DF),
        f.request(W, 3, 0, MAX_REQUEST + 100, 0, b"\x01" * (MAX_REQUEST + 100)),  # skipped
        f.request(BS, 4, 0, 4096, REQ_ONE),
        f.request(WZ, 5, 4096, 4096, FUA | NO_HOLE),
        f.write(6, SIZE - 1, b"xy"),  # past the end: ENOSPC, payload skipped
        f.write(7, 100, bytes(range(256)) * 3),
        f.request(FL, 8),
        f.request(99, 9),  # unknown command
    ]
    stream = preamble + b"".join(requests)
    reference = never_moved(stream)
    assert sum(isinstance(a.event, RejectedRequest) for a in reference) == 3
    for cut in range(handshake_end(preamble), len(stream) + 1):
        for answered_first in (0, 3, len(requests)):
            story, _ = moved(stream, cut, answered_first, [])
            assert story == reference, (cut, answered_first)


def test_a_session_can_move_twice() -> None:
    preamble = HANDSHAKES["simple"]
    stream = preamble + f.write(1, 0, b"a" * 1000) + f.read(2, 0, 10) + f.request(FL, 3)
    reference = never_moved(stream)
    first = ServerConnection(Catalog(), max_request_size=MAX_REQUEST)
    first.data_to_send()
    events = first.receive_data(stream[: len(preamble) + 500])
    first.data_to_send()
    second, _ = ServerConnection.restore(first.snapshot(), Catalog())
    events += second.receive_data(stream[len(preamble) + 500 : len(preamble) + 1040])
    third, _ = ServerConnection.restore(
        SessionSnapshot.from_bytes(second.snapshot().to_bytes()), Catalog()
    )
    events += third.receive_data(stream[len(preamble) + 1040 :])
    assert events == [a.event for a in reference]


# -- what does not move ---------------------------------------------------------------


def test_a_session_mid_handshake_is_refused_at_every_byte() -> None:
    preamble = HANDSHAKES["structured+meta"]
    for cut in range(len(preamble)):
        conn = ServerConnection(Catalog())
        conn.data_to_send()
        conn.receive_data(preamble[:cut])
        conn.data_to_send()
        with pytest.raises(SnapshotError, match="not in transmission"):
            conn.snapshot()


def test_uncollected_handshake_output_is_refused() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    events = conn.receive_data(HANDSHAKES["simple"])
    assert [type(e) for e in events] == [HandshakeComplete]
    with pytest.raises(SnapshotError, match="not yet collected"):
        conn.snapshot()
    conn.data_to_send()
    conn.snapshot()


def test_a_disconnected_or_broken_session_is_refused() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    conn.receive_data(HANDSHAKES["simple"] + f.request(D))
    conn.data_to_send()
    with pytest.raises(SnapshotError, match="closed"):
        conn.snapshot()
    broken = ServerConnection(Catalog())
    broken.data_to_send()
    broken.receive_data(HANDSHAKES["simple"])
    broken.data_to_send()
    with pytest.raises(Exception, match="magic"):
        broken.receive_data(b"\x00" * 28)
    with pytest.raises(SnapshotError, match="broken"):
        broken.snapshot()


def test_a_migration_senders_session_does_not_move() -> None:
    with pytest.raises(SnapshotError, match="sender"):
        sending(Listener()).snapshot()


def test_a_session_of_an_export_with_capped_flags_does_not_move() -> None:
    capped = ExportInfo("disk", SIZE, advertise=TransmissionFlag.SEND_FLUSH)
    conn = ServerConnection(Catalog(exports={"disk": capped}))
    conn.data_to_send()
    assert [type(e) for e in conn.receive_data(HANDSHAKES["simple"])] == [HandshakeComplete]
    conn.data_to_send()
    with pytest.raises(SnapshotError, match="capped flags"):
        conn.snapshot()


def test_a_mirror_only_connection_does_not_move() -> None:
    listener = Listener(refusals=dict(LISTENING))
    conn = ServerConnection(listener, migration=listener, oldstyle=True)  # type: ignore[arg-type]
    conn.data_to_send()
    conn.receive_data(b"")
    assert conn.mirror_only
    with pytest.raises(SnapshotError, match="sender"):
        conn.snapshot()


# -- the wire format ---------------------------------------------------------------------


def a_snapshot(**changes: object) -> SessionSnapshot:
    snapshot = SessionSnapshot(
        export=ExportInfo("disk", SIZE, description="the test disk", min_block_size=512),
        structured_replies=True,
        meta_contexts=((1, "base:allocation"),),
        max_request_size=MAX_REQUEST,
        in_flight=f.write(1, 0, b"abc") + f.read(2, 0, 512),
        partial=f.write(3, 0, b"x" * 100)[:50],
    )
    return replace(snapshot, **changes)  # type: ignore[arg-type]


def test_the_blob_round_trips_every_field() -> None:
    rejected = RejectedRequest(7, Command.WRITE, 0, 9000, Errno.EINVAL, "too big ✓")
    for snapshot in (
        a_snapshot(),
        a_snapshot(partial=b"", rejected=rejected, rejected_remaining=1234),
        a_snapshot(
            export=ExportInfo("é", 0, read_only=True), structured_replies=False, meta_contexts=()
        ),
        a_snapshot(rejected=replace(rejected, command=4242), partial=b"", rejected_remaining=1),
    ):
        assert SessionSnapshot.from_bytes(snapshot.to_bytes()) == snapshot


def test_an_unknown_version_is_refused_by_name_before_anything_else() -> None:
    blob = bytearray(a_snapshot().to_bytes())
    blob[4:6] = (SESSION_VERSION + 1).to_bytes(2, "big")
    with pytest.raises(SnapshotError, match=f"version {SESSION_VERSION + 1} is not supported"):
        SessionSnapshot.from_bytes(bytes(blob[:6]))  # nothing after the version is read


def test_not_a_snapshot_truncated_or_with_trailing_bytes_is_refused() -> None:
    blob = a_snapshot(rejected=None).to_bytes()
    with pytest.raises(SnapshotError, match="magic"):
        SessionSnapshot.from_bytes(b"FTCP" + blob[4:])
    for end in range(len(blob)):
        with pytest.raises(SnapshotError):
            SessionSnapshot.from_bytes(blob[:end])
    with pytest.raises(SnapshotError, match="after the end"):
        SessionSnapshot.from_bytes(blob + b"\0")


def test_requests_in_flight_over_the_limit_are_refused_before_they_are_read() -> None:
    blob = a_snapshot(in_flight=b"\0" * 100).to_bytes()
    with pytest.raises(SnapshotError, match="over the limit of 99"):
        SessionSnapshot.from_bytes(blob, max_in_flight=99)
    assert MAX_IN_FLIGHT_BYTES >= 16 * 32 * 1024 * 1024


@given(st.binary(max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_a_damaged_blob_is_a_snapshot_error_or_a_valid_snapshot(
    tail: bytes, where: int, value: int
) -> None:
    blob = bytearray(a_snapshot().to_bytes() + tail)
    if where < len(blob):
        blob[where] = value
    try:
        snapshot = SessionSnapshot.from_bytes(bytes(blob))
    except SnapshotError:
        return
    assert SessionSnapshot.from_bytes(snapshot.to_bytes()) == snapshot


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"in_flight": f.write(1, 0, b"abc")[:-1]}, "middle of a request"),
        ({"in_flight": b"\0" * 28}, "do not parse"),
        ({"partial": f.read(1, 0, 512)}, "whole one"),
    ],
    ids=["in-flight-cut-short", "in-flight-garbage", "partial-is-whole"],
)
def test_a_snapshot_whose_requests_do_not_fit_is_refused_on_restore(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(SnapshotError, match=message):
        ServerConnection.restore(a_snapshot(**changes), Catalog())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"meta_contexts": ((1, "base:allocation"),), "structured_replies": False}, "without"),
        ({"partial": b"\0" * (28 + MAX_REQUEST)}, "more than one request"),
        ({"rejected_remaining": 5}, "without a rejected request"),
        ({"max_request_size": 0}, "max_request_size"),
        ({"export": ExportInfo("disk", SIZE, min_block_size=0)}, "minimum block size"),
    ],
)
def test_inconsistent_fields_are_refused_where_the_snapshot_is_built(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(SnapshotError, match=message):
        a_snapshot(**changes)


def test_encode_request_gives_back_the_bytes_the_client_sent() -> None:
    frames = [f.write(1, 8, b"data", FUA), f.read(2, 0, 512, DF), f.request(FL, 3)]
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    events = conn.receive_data(HANDSHAKES["structured+meta"] + b"".join(frames))
    assert [encode_request(e) for e in events[1:]] == frames  # type: ignore[arg-type]
