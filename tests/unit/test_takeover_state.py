"""The state a takeover carries beside its descriptors: written, read back, or refused."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from typing import Any

import pytest

from ferry.lease.backend import Grant, Holder, LeaseMode, PassedGrant
from ferry.nbd.constants import REQUEST, REQUEST_MAGIC, Command
from ferry.nbd.events import ExportInfo
from ferry.nbd.session import SessionSnapshot
from ferry.takeover.state import (
    TAKEOVER_FORMAT,
    ClientState,
    ExportState,
    ImageState,
    PortState,
    TakeoverState,
    TakeoverStateError,
)

SESSION = SessionSnapshot(
    export=ExportInfo("disk", 1 << 20, False),
    structured_replies=True,
    meta_contexts=((1, "base:allocation"),),
    max_request_size=32 << 20,
    in_flight=REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, 7, 4096, 3) + b"abc",
    partial=b"\x25\x60",
)
LOCAL_LEASE = PassedGrant(
    Grant("/srv/vm.img", Holder("host:1:disk", LeaseMode.EXCLUSIVE, 4), None, 3),
    {"grant_id": "ab" * 8, "slot": 0, "holds_byte": True},
    fd=-1,
)
ETCD_LEASE = PassedGrant(
    Grant("/srv/vm.img", Holder("host:1:disk", LeaseMode.EXCLUSIVE, 90), 10.0, 7587),
    valid_for=6.5,
)


SERVED = {
    "node": {"port": 10809, "acl": ["10.0.0.0/8"], "metrics": None},
    "exports": [{"name": "disk", "file": "/srv/vm.img"}],
}


def an_export(
    lease: PassedGrant | None = LOCAL_LEASE, clients: int = 2, name: str = "disk"
) -> ExportState:
    return ExportState(
        name,
        ImageState(f"/srv/{name}.img", 1 << 20, False),
        lease,
        tuple(ClientState(socket.AF_INET, SESSION, b"reply %d" % n) for n in range(clients)),
    )


def a_state(lease: PassedGrant | None = LOCAL_LEASE, clients: int = 2) -> TakeoverState:
    """A node of one export (``ferry serve``'s)."""
    return a_node(an_export(lease, clients))


def a_node(*exports: ExportState) -> TakeoverState:
    return TakeoverState(
        pid=4242,
        served=SERVED,
        exports=exports,
        ports=(
            PortState("nbd", socket.AF_INET),
            PortState("control", socket.AF_UNIX),
            PortState("metrics", socket.AF_INET6),
        ),
    )


@pytest.mark.parametrize("lease", [LOCAL_LEASE, ETCD_LEASE, None], ids=["local", "etcd", "none"])
def test_a_state_round_trips(lease: PassedGrant | None) -> None:
    state = a_state(lease)
    assert TakeoverState.from_bytes(state.to_bytes()) == state


def test_a_node_of_many_exports_round_trips() -> None:
    state = a_node(
        an_export(LOCAL_LEASE, 2, "vm1"), an_export(ETCD_LEASE, 1, "vm2"), an_export(None, 0, "vm3")
    )
    assert TakeoverState.from_bytes(state.to_bytes()) == state
    assert state.client_count == 3


def test_the_descriptors_come_in_the_states_order() -> None:
    state = a_state(LOCAL_LEASE)
    sent = state.descriptors([(10, [30, 31])], [20, 21, 22])
    assert sent == [10, -1, 20, 21, 22, 30, 31]  # the lock's is the lease's own
    assert len(sent) == state.fd_count
    split = state.split([1, 2, 3, 4, 5, 6, 7])
    (export,) = split.exports
    assert (export.image, export.lock, split.ports, export.clients) == (1, 2, [3, 4, 5], [6, 7])
    assert split.all() == [1, 2, 6, 7, 3, 4, 5]
    etcd = a_state(ETCD_LEASE, clients=0)
    assert etcd.fd_count == 4 and etcd.split([1, 2, 3, 4]).exports[0].lock is None
    with pytest.raises(TakeoverStateError, match="3 descriptors came with a state that describes"):
        state.split([1, 2, 3])
    with pytest.raises(ValueError, match="one descriptor per client of export 'disk'"):
        state.descriptors([(10, [30])], [20, 21, 22])


def test_every_export_s_image_and_lock_come_first_then_the_ports_then_each_export_s_clients() -> (
    None
):
    state = a_node(an_export(LOCAL_LEASE, 2, "vm1"), an_export(ETCD_LEASE, 1, "vm2"))
    sent = state.descriptors([(10, [30, 31]), (11, [32])], [20, 21, 22])
    assert sent == [10, -1, 11, 20, 21, 22, 30, 31, 32]
    split = state.split(list(range(1, 10)))
    vm1, vm2 = split.exports
    assert (vm1.image, vm1.lock, vm1.clients) == (1, 2, [7, 8])
    assert (vm2.image, vm2.lock, vm2.clients) == (3, None, [9])
    assert split.ports == [4, 5, 6]


def test_another_version_is_refused_by_name() -> None:
    blob = bytearray(a_state().to_bytes())
    blob[4:6] = struct.pack(">H", TAKEOVER_FORMAT + 1)
    with pytest.raises(TakeoverStateError, match=f"format {TAKEOVER_FORMAT + 1} is not read"):
        TakeoverState.from_bytes(bytes(blob))


def test_every_truncation_and_any_trailing_byte_is_refused() -> None:
    blob = a_state().to_bytes()
    for cut in range(len(blob)):
        with pytest.raises(TakeoverStateError):
            TakeoverState.from_bytes(blob[:cut])
    with pytest.raises(TakeoverStateError, match="1 bytes after the end"):
        TakeoverState.from_bytes(blob + b"!")


def with_header(change: Any) -> bytes:
    """A valid state's blob with its JSON header changed by ``change(header)``."""
    blob = a_state().to_bytes()
    (size,) = struct.unpack_from(">I", blob, 6)
    header = json.loads(blob[10 : 10 + size])
    change(header)
    raw = json.dumps(header).encode()
    return blob[:6] + struct.pack(">I", len(raw)) + raw + blob[10 + size :]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda h: h.pop("exports"), "exports"),
        (lambda h: h["exports"][0].pop("image"), "image"),
        (lambda h: h.update(pid=-1), "pid is not a whole number"),
        (lambda h: h.update(pid=True), "pid is not a whole number"),
        (lambda h: h["exports"][0]["image"].update(size=0), "an image of 0 bytes"),
        (lambda h: h["exports"].append(h["exports"][0]), "two exports of one name"),
        (lambda h: h["ports"].append({"kind": "ssh", "family": 2}), "'ssh' port"),
        (lambda h: h["exports"][0]["clients"][0].update(family=1), "address family 1"),
        (lambda h: h["exports"][0]["lease"].update(mode="borrowed"), "borrowed"),
        (lambda h: h["exports"][0]["lease"].update(ttl=-1), "TTL of -1"),
        (lambda h: h["served"].update(node=[1]), "served node options is not an object"),
        (lambda h: h["served"].pop("exports"), "exports"),
        (lambda h: h["exports"][0]["clients"].pop(), "after the end"),  # parts left over
        (lambda h: h["exports"][0]["clients"].append({"family": 2}), "cut short"),
    ],
)
def test_a_header_that_does_not_hold_is_refused(change: Any, why: str) -> None:
    with pytest.raises(TakeoverStateError, match=why):
        TakeoverState.from_bytes(with_header(change))


def test_not_json_and_not_a_number_are_refused() -> None:
    blob = a_state(ETCD_LEASE).to_bytes()
    (size,) = struct.unpack_from(">I", blob, 6)
    header = blob[10 : 10 + size].replace(b'"ttl": 10.0', b'"ttl": NaN')
    assert header != blob[10 : 10 + size]
    with pytest.raises(TakeoverStateError, match="NaN is not a JSON number"):
        TakeoverState.from_bytes(blob[:10] + header + blob[10 + size :])
    with pytest.raises(TakeoverStateError, match="not a takeover state"):
        TakeoverState.from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(TakeoverStateError, match="header"):
        TakeoverState.from_bytes(blob[:10] + b"\xff" * size + blob[10 + size :])


def test_a_broken_session_names_its_client() -> None:
    state = a_state(clients=1)
    blob = state.to_bytes()
    session = SESSION.to_bytes()
    at = blob.index(session)
    broken = blob[:at] + b"XXXX" + blob[at + 4 :]
    with pytest.raises(TakeoverStateError, match="client 0: not an NBD session snapshot"):
        TakeoverState.from_bytes(broken)


def test_the_lease_descriptor_placeholder_travels_as_a_flag() -> None:
    read = TakeoverState.from_bytes(a_state(dataclasses.replace(LOCAL_LEASE, fd=17)).to_bytes())
    (export,) = read.exports
    assert export.lease is not None and export.lease.fd == -1 and export.has_lock
