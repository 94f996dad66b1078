"""The handoff's values: a TCP socket's state and its wire format, a flow, a service address."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.handoff.address import AddressError, ServiceAddress
from ferry.handoff.errors import HandoffError
from ferry.handoff.freeze import Flow
from ferry.handoff.tcp_state import (
    MAX_QUEUE_BYTES,
    STATE_VERSION,
    RepairWindow,
    SocketState,
    StateFormatError,
)

WINDOW = RepairWindow(1000, 65535, 65535, 43690, 2000)


def a_state(**changes: object) -> SocketState:
    state = SocketState(
        family=socket.AF_INET,
        local=("10.0.0.100", 10809),
        peer=("10.0.0.3", 51234),
        send_seq=0xFFFFFFF0,  # near the wrap: restore subtracts the queue length mod 2**32
        recv_seq=12345,
        send_queue=b"sent and unsent",
        unsent=6,
        recv_queue=b"\x00\xff received",
        mss=1448,
        options=7,
        snd_wscale=7,
        rcv_wscale=9,
        timestamp=0xDEADBEEF,
        window=WINDOW,
        nodelay=True,
    )
    return replace(state, **changes)  # type: ignore[arg-type]


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
u32 = st.integers(0, 2**32 - 1)
ports = st.integers(1, 65535)


@st.composite
def states(draw: st.DrawFn) -> SocketState:
    family, hosts = draw(st.sampled_from([(socket.AF_INET, ipv4), (socket.AF_INET6, ipv6)]))
    send_queue = draw(st.binary(max_size=300))
    return SocketState(
        family=family,
        local=(draw(hosts), draw(ports)),
        peer=(draw(hosts), draw(ports)),
        send_seq=draw(u32),
        recv_seq=draw(u32),
        send_queue=send_queue,
        unsent=draw(st.integers(0, len(send_queue))),
        recv_queue=draw(st.binary(max_size=300)),
        mss=draw(st.integers(1, 65535)),
        options=draw(st.integers(0, 255)),
        snd_wscale=draw(st.integers(0, 14)),
        rcv_wscale=draw(st.integers(0, 14)),
        timestamp=draw(u32),
        window=RepairWindow(draw(u32), draw(u32), draw(u32), draw(u32), draw(u32)),
        nodelay=draw(st.booleans()),
    )


@given(states())
def test_every_state_round_trips_through_its_blob(state: SocketState) -> None:
    assert SocketState.from_bytes(state.to_bytes()) == state


def test_bytes_the_application_still_held_go_after_the_send_queue_as_unsent() -> None:
    state = a_state()
    more = state.with_unsent(b" and more, and more")
    assert more.send_queue == b"sent and unsent and more, and more"
    assert more.unsent == state.unsent + len(b" and more, and more")
    assert more.send_queue[len(more.send_queue) - more.unsent :] == b"unsent and more, and more"
    # The queue still starts at the same sequence number (send_seq wraps past 2**32).
    start = (state.send_seq - len(state.send_queue)) % 2**32
    assert (more.send_seq - len(more.send_queue)) % 2**32 == start
    assert more.send_seq < state.send_seq
    with pytest.raises(StateFormatError, match="over the limit"):
        state.with_unsent(bytes(MAX_QUEUE_BYTES))


def test_an_unknown_version_is_refused_by_name_before_anything_else() -> None:
    blob = bytearray(a_state().to_bytes())
    blob[4:6] = (STATE_VERSION + 1).to_bytes(2, "big")
    with pytest.raises(StateFormatError, match=f"version {STATE_VERSION + 1} is not supported"):
        SocketState.from_bytes(bytes(blob[:6]))
    with pytest.raises(HandoffError):  # the switchover needs only the base class
        SocketState.from_bytes(bytes(blob))


def test_not_a_state_truncated_or_with_trailing_bytes_is_refused() -> None:
    blob = a_state().to_bytes()
    with pytest.raises(StateFormatError, match="not a ferry TCP state"):
        SocketState.from_bytes(b"FNBS" + blob[4:])
    for end in range(len(blob)):
        with pytest.raises(StateFormatError):
            SocketState.from_bytes(blob[:end])
    with pytest.raises(StateFormatError, match="header says"):
        SocketState.from_bytes(blob + b"x")


def test_a_queue_length_over_the_limit_is_refused_before_anything_is_allocated() -> None:
    blob = bytearray(a_state(send_queue=b"", unsent=0, recv_queue=b"").to_bytes())
    # the send queue's length field: the last 8 bytes are the two lengths
    blob[-8:-4] = (MAX_QUEUE_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(StateFormatError, match="over the limit"):
        SocketState.from_bytes(bytes(blob))


@given(st.binary(max_size=80), st.integers(0, 150), st.integers(0, 255))
def test_a_damaged_blob_is_a_format_error_or_a_valid_state(
    tail: bytes, where: int, value: int
) -> None:
    blob = bytearray(a_state().to_bytes() + tail)
    if where < len(blob):
        blob[where] = value
    try:
        state = SocketState.from_bytes(bytes(blob))
    except StateFormatError:
        return
    assert SocketState.from_bytes(state.to_bytes()) == state


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"family": socket.AF_UNIX}, "neither AF_INET nor AF_INET6"),
        ({"local": ("::1", 80)}, "not an IPv4 address"),
        ({"peer": ("nonsense", 80)}, "not an IP address"),
        ({"local": ("10.0.0.1", 0)}, "port 0"),
        ({"send_seq": 2**32}, "not a u32"),
        ({"unsent": 100}, "not within the send queue"),
        ({"mss": 0}, "mss=0"),
        ({"snd_wscale": 15}, "snd_wscale=15"),
        ({"options": 256}, "u8 mask"),
    ],
)
def test_out_of_range_fields_are_refused_where_the_state_is_built(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(StateFormatError, match=message):
        a_state(**changes)


def test_a_window_field_out_of_range_is_refused() -> None:
    with pytest.raises(StateFormatError, match="rcv_wnd"):
        RepairWindow(0, 0, 0, -1, 0)


# -- flows ---------------------------------------------------------------------------


def test_a_flow_names_the_peer_first_as_the_freeze_rule_matches() -> None:
    flow = Flow(("10.0.0.100", 10809), ("10.0.0.3", 51234))
    assert flow.element() == "10.0.0.3 . 51234 . 10.0.0.100 . 10809"
    assert flow.version == 4


def test_an_ipv4_mapped_flow_is_the_ipv4_flow_it_is_on_the_wire() -> None:
    mapped = Flow(("::ffff:10.0.0.100", 10809), ("::ffff:10.0.0.3", 51234))
    assert mapped == Flow(("10.0.0.100", 10809), ("10.0.0.3", 51234))
    assert Flow(("fe80::1%eth0", 1), ("fe80::2", 2)).version == 6


def test_a_flow_of_mixed_versions_or_port_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="different IP versions"):
        Flow(("10.0.0.1", 1), ("::2", 2))
    with pytest.raises(ValueError, match="port 0"):
        Flow(("10.0.0.1", 0), ("10.0.0.2", 2))


# -- the service address ------------------------------------------------------------------


def test_a_service_address_parses_and_prints_back() -> None:
    address = ServiceAddress.parse("10.77.0.100/24@eth0")
    assert str(address.ip) == "10.77.0.100"
    assert address.interface.network.prefixlen == 24
    assert address.device == "eth0"
    assert str(address) == "10.77.0.100/24@eth0"
    assert str(ServiceAddress.parse("fd00::5/64@br-lan")) == "fd00::5/64@br-lan"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/24", "not IP/PREFIX@DEV"),
        ("10.0.0.1@eth0", "no /PREFIX"),
        ("10.0.0.1/24@", "not IP/PREFIX@DEV"),
        ("10.0.0.1/33@eth0", "10.0.0.1/33"),
        ("host/24@eth0", "host/24"),
        ("0.0.0.0/0@eth0", "not a unicast host address"),
        ("224.0.0.1/4@eth0", "not a unicast host address"),
        ("10.0.0.1/24@a-device-name-too-long", "not a network device name"),
    ],
)
def test_a_bad_service_address_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=message):
        ServiceAddress.parse(text)
