"""A carried connection's wire format: what the source sends, the destination reads or refuses."""

from __future__ import annotations

import struct

import pytest

from ferry.handoff.carried import CarriedConnection, CarriedFormatError
from ferry.nbd.events import ConnectionLanding, ExportInfo
from ferry.nbd.session import SessionSnapshot

from .test_handoff_state import a_state

SESSION = SessionSnapshot(
    export=ExportInfo("disk", 1 << 20, False),
    structured_replies=True,
    meta_contexts=((1, "base:allocation"),),
    max_request_size=32 << 20,
)


def test_a_carried_connection_round_trips_with_its_replies() -> None:
    carried = CarriedConnection(a_state(), SESSION, b"reply bytes")
    assert CarriedConnection.from_bytes(carried.to_bytes()) == carried


def test_an_unknown_version_is_refused_by_name() -> None:
    blob = bytearray(CarriedConnection(a_state(), SESSION).to_bytes())
    blob[4:6] = struct.pack(">H", 9)
    with pytest.raises(CarriedFormatError, match="format 9 is not read here"):
        CarriedConnection.from_bytes(bytes(blob))


@pytest.mark.parametrize("damage", ["magic", "short", "trailing", "lengths", "socket part"])
def test_a_damaged_blob_is_refused(damage: str) -> None:
    blob = bytearray(CarriedConnection(a_state(), SESSION).to_bytes())
    if damage == "magic":
        blob[:4] = b"XXXX"
    elif damage == "short":
        del blob[10:]
    elif damage == "trailing":
        blob += b"!"
    elif damage == "lengths":
        blob[6:10] = struct.pack(">I", 1 << 30)
    else:
        blob[18:22] = b"XXXX"  # the socket state's own magic
    with pytest.raises(CarriedFormatError):
        CarriedConnection.from_bytes(bytes(blob))


def test_what_a_destination_says_about_itself_round_trips() -> None:
    landing = ConnectionLanding("b0a7/net:4026531840", "10.0.0.5/24@eth0")
    assert ConnectionLanding.from_bytes(landing.to_bytes()) == landing
    assert ConnectionLanding.from_bytes(ConnectionLanding("h").to_bytes()) == ConnectionLanding("h")


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00", b"\x00\x05ab", b"\x00\x01a\x00\x00!", b"\x00\x01\xff\x00\x00", b"\xff\xff"],
)
def test_a_broken_answer_about_the_destination_is_refused(blob: bytes) -> None:
    with pytest.raises(ValueError):
        ConnectionLanding.from_bytes(blob)
