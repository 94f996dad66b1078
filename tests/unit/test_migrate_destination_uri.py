"""A ``mirror``'s destination as a URI (QEMU's names): what each form becomes, what is refused."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress

from ferry.migrate.options import Destination, parse_destination
from ferry.serve.acl import LOCAL_PEER, Acl, peer_host_of


@pytest.mark.parametrize(
    ("text", "destination", "shown"),
    [
        ("tcp:127.0.0.1:10809", Destination("127.0.0.1", 10809), "127.0.0.1:10809"),
        ("tcp:storage2:1", Destination("storage2", 1), "storage2:1"),
        ("tcp:[::1]:10809", Destination("::1", 10809), "::1:10809"),
        ("unix:/run/ferry/b.nbd", Destination(path="/run/ferry/b.nbd"), "unix:/run/ferry/b.nbd"),
        ("unix:rel.nbd", Destination(path="rel.nbd"), "unix:rel.nbd"),
        (
            "exec:ssh storage2 'ferry listen --stdio'",
            Destination(command=("ssh", "storage2", "ferry listen --stdio")),
            "exec:ssh storage2 'ferry listen --stdio'",
        ),
    ],
)
def test_each_form_names_its_transport(text: str, destination: Destination, shown: str) -> None:
    parsed = parse_destination(text)
    assert parsed == destination
    assert str(parsed) == shown
    assert parsed.transport == text.partition(":")[0]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10.0.0.1:10809", "expected tcp:HOST:PORT, unix:PATH or exec:COMMAND"),
        ("udp:x:1", "expected tcp:HOST:PORT, unix:PATH or exec:COMMAND"),
        ("", "expected tcp:HOST:PORT, unix:PATH or exec:COMMAND"),
        ("tcp:host", "tcp: needs HOST:PORT, PORT in 1..65535"),
        ("tcp::10809", "tcp: needs HOST:PORT, PORT in 1..65535"),
        ("tcp:host:65536", "tcp: needs HOST:PORT, PORT in 1..65535"),
        ("tcp:host:-1", "tcp: needs HOST:PORT, PORT in 1..65535"),
        ("unix:", "unix: needs a socket path"),
        ("unix:a\0b", "unix: needs a socket path"),
        ("unix:/" + "x" * 107, "a Unix socket path has at most 107 bytes"),
        ("exec:", "exec: needs a command"),
        ("exec:   ", "exec: needs a command"),
        ("exec:ssh 'host", "No closing quotation"),
    ],
)
def test_a_bad_destination_says_what_is_wrong_in_one_line(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"^bad destination ") as raised:
        parse_destination(text)
    assert why in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_peer_without_an_ip_address_is_local_and_passes_any_acl() -> None:
    assert peer_host_of(UNIXAddress(None)) == LOCAL_PEER
    assert peer_host_of(IPv4Address("TCP", "192.0.2.7", 5)) == "192.0.2.7"
    named = Acl.parse(["192.0.2.0/24"], default_deny=True)
    assert named.allows(LOCAL_PEER) and named.admits_sender(LOCAL_PEER, Acl.parse(["10.0.0.1"]))
    assert not named.allows("198.51.100.1") and not Acl().admits_sender("198.51.100.1")
