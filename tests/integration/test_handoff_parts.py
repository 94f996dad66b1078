"""Each building block of the handoff on its own, as root: freeze, address, capability, refusals.

What a connection that cannot move gets is a clean error naming the reason
(and, for the switchover, a :class:`HandoffError` to fall back on), with the
socket left as it was: these tests check both.  Capabilities are taken away
the two ways a deployment loses them: the bounding set without
CAP_NET_ADMIN (``setpriv``), and a user namespace that does not own the
network namespace (``unshare -Ur``).
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from ferry.handoff import address, tcp_repair
from ferry.handoff.capability import can_move_connections
from ferry.handoff.errors import HandoffError
from ferry.handoff.freeze import Flow, FreezeError, Freezer
from ferry.handoff.tcp_repair import NotEstablished, RepairError, RestoreFailed
from handoff_support import ip, netns_exists, unique
from support import Deadline, read_line

pytestmark = pytest.mark.integration

NO_NET_ADMIN = {
    "bounding set": ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"],
    "user namespace": ["unshare", "-Ur"],
}


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback connection: (server side, client side)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield server, client
    server.close()
    client.close()


def readable(sock: socket.socket, deadline: Deadline | None = None) -> bool:
    ready, _, _ = select.select([sock], [], [], (deadline or Deadline()).left())
    return bool(ready)


def round_trip(server: socket.socket, client: socket.socket) -> None:
    """Bytes both ways: the connection works."""
    client.sendall(b"ping")
    assert readable(server) and server.recv(4) == b"ping"
    server.sendall(b"pong")
    assert readable(client) and client.recv(4) == b"pong"


def python(code: str, *, wrapper: Sequence[str] = (), netns: str | None = None) -> Any:
    """Run ``code`` in a child Python (under ``wrapper``, in ``netns``); its last line as JSON."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run(
        [*prefix, *wrapper, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def tables() -> str:
    return subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True, timeout=30
    ).stdout


# -- freeze --------------------------------------------------------------------------------


def test_a_frozen_flow_drops_the_peers_packets_until_it_is_unfrozen(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    with Freezer(unique("frz")) as freezer:
        flow = Flow.of_socket(server)
        freezer.freeze(flow)
        client.sendall(b"held")
        deadline = Deadline()
        while freezer.dropped_packets() == 0:  # the client's segment reached the freeze
            assert not deadline.expired(), "the freeze never saw the client's packet"
            select.select([], [], [], 0.001)
        assert not readable(server, Deadline(0))  # dropped, not delivered
        freezer.unfreeze(flow)
        assert readable(server)  # the client's retransmission gets through
        assert server.recv(4) == b"held"
    round_trip(server, client)


def test_freeze_and_unfreeze_are_idempotent_and_close_removes_the_table(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    name = unique("frz")
    freezer = Freezer(name)
    flow = Flow.of_socket(server)
    freezer.freeze(flow, flow)
    freezer.freeze(flow)
    assert freezer.frozen == {flow}
    other = Flow(("127.0.0.1", 1), ("127.0.0.1", 2))
    freezer.unfreeze(flow, other)  # `other` was never frozen: ignored
    freezer.unfreeze(flow)
    assert freezer.frozen == frozenset()
    freezer.freeze(flow)
    assert f"inet {name}" in tables()
    freezer.close()
    freezer.close()
    assert f"inet {name}" not in tables()
    round_trip(server, client)  # closing unfroze it
    with pytest.raises(FreezeError, match="closed"):
        freezer.freeze(flow)


def test_a_freeze_dies_with_its_process_even_by_sigkill() -> None:
    name = unique("frz")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from ferry.handoff.freeze import Freezer, Flow\n"
            f"f = Freezer({name!r})\n"
            "f.freeze(Flow(('127.0.0.1', 7), ('127.0.0.1', 8)))\n"
            "print('frozen', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert read_line(child.stdout, Deadline()) == b"frozen\n"
        assert f"inet {name}" in tables()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    deadline = Deadline()
    while f"inet {name}" in tables():  # the kernel deletes an owner table with its socket
        assert not deadline.expired(), f"table {name} outlived its process"
        select.select([], [], [], 0.01)


def test_a_freezer_without_cap_net_admin_says_so() -> None:
    result = python(
        """
        import json
        from ferry.handoff import freeze
        print(json.dumps({"probe": freeze.probe()}))
        """,
        wrapper=NO_NET_ADMIN["bounding set"],
    )
    assert "Operation not permitted" in str(result["probe"])


# -- capability -------------------------------------------------------------------------------


def test_this_host_can_move_connections() -> None:
    assert can_move_connections() == (True, "")


@pytest.mark.parametrize("how", sorted(NO_NET_ADMIN))
def test_without_cap_net_admin_the_host_cannot_and_says_why(how: str) -> None:
    result = python(
        """
        import json
        from ferry.handoff.capability import can_move_connections
        print(json.dumps(can_move_connections()))
        """,
        wrapper=NO_NET_ADMIN[how],
    )
    ok, reason = result
    assert ok is False
    assert reason == (
        "TCP_REPAIR refused: this process lacks CAP_NET_ADMIN in the user namespace "
        "that owns its network namespace"
    )


def test_a_user_namespace_that_owns_its_network_namespace_can() -> None:
    result = python(
        """
        import json
        from ferry.handoff.capability import can_move_connections
        print(json.dumps(can_move_connections()))
        """,
        wrapper=["unshare", "-Urn"],
    )
    assert result == [True, ""]


# -- refusals: what does not move -----------------------------------------------------------------


def test_a_listening_or_unconnected_socket_is_refused_early() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        pytest.raises(NotEstablished, match="LISTEN, not ESTABLISHED"),
    ):
        tcp_repair.checkpoint(listener)
    with socket.socket() as fresh, pytest.raises(NotEstablished, match="CLOSE, not ESTABLISHED"):
        tcp_repair.checkpoint(fresh)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        pytest.raises(RepairError, match="not a TCP socket"),
    ):
        tcp_repair.checkpoint(udp)


def test_a_connection_the_peer_half_closed_is_refused_and_still_works(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    client.shutdown(socket.SHUT_WR)
    assert readable(server) and server.recv(1) == b""  # the FIN arrived
    with pytest.raises(NotEstablished, match="CLOSE_WAIT") as refused:
        tcp_repair.checkpoint(server)
    assert isinstance(refused.value, HandoffError)
    server.sendall(b"still here")
    assert readable(client) and client.recv(10) == b"still here"


def test_a_connection_we_half_closed_is_refused(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    server.shutdown(socket.SHUT_WR)
    assert readable(client) and client.recv(1) == b""
    with pytest.raises(NotEstablished, match="FIN_WAIT"):
        tcp_repair.checkpoint(server)
    client.sendall(b"late")
    assert readable(server) and server.recv(4) == b"late"


def test_a_restore_while_the_old_socket_lives_here_fails_cleanly_and_the_old_resumes(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    with Freezer(unique("frz")) as freezer:
        freezer.freeze(Flow.of_socket(server))
        state = tcp_repair.checkpoint(server)
        with pytest.raises(RestoreFailed, match="connect: Cannot assign requested address") as e:
            tcp_repair.restore(state)
        assert e.value.step == "connect"
        tcp_repair.resume(server)  # the move is off: the old socket carries on
    round_trip(server, client)


def test_a_restore_to_an_address_this_host_lacks_fails_at_bind_without_freebind(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    with Freezer(unique("frz")) as freezer:
        freezer.freeze(Flow.of_socket(server))
        state = tcp_repair.checkpoint(server)
        tcp_repair.resume(server)
    elsewhere = type(state).from_bytes(
        state.to_bytes().replace(b"\x7f\x00\x00\x01", b"\xc0\x00\x02\x63", 1)
    )
    assert elsewhere.local[0] == "192.0.2.99"
    with pytest.raises(RestoreFailed, match="bind: Cannot assign requested address"):
        tcp_repair.restore(elsewhere)
    round_trip(server, client)


@pytest.mark.parametrize("how", sorted(NO_NET_ADMIN))
def test_without_cap_net_admin_checkpoint_and_restore_are_refused_and_nothing_breaks(
    connection: tuple[socket.socket, socket.socket], how: str
) -> None:
    server, client = connection
    with Freezer(unique("frz")) as freezer:
        freezer.freeze(Flow.of_socket(server))
        blob = tcp_repair.checkpoint(server).to_bytes()
        tcp_repair.resume(server)
    result = python(
        f"""
        import json, socket
        from ferry.handoff import tcp_repair
        from ferry.handoff.tcp_state import SocketState
        errors = {{}}
        try:
            tcp_repair.restore(SocketState.from_bytes(bytes.fromhex({blob.hex()!r})))
        except tcp_repair.RepairError as error:
            errors["restore"] = [type(error).__name__, str(error)]
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        try:
            tcp_repair.checkpoint(server)
        except tcp_repair.RepairError as error:
            errors["checkpoint"] = [type(error).__name__, str(error)]
        client.sendall(b"ok")
        errors["still works"] = server.recv(2).decode()
        print(json.dumps(errors))
        """,
        wrapper=NO_NET_ADMIN[how],
    )
    message = (
        "TCP_REPAIR refused: this process lacks CAP_NET_ADMIN in the user namespace "
        "that owns its network namespace"
    )
    assert result["restore"] == ["RepairNotPermitted", message]
    assert result["checkpoint"] == ["RepairNotPermitted", message]
    assert result["still works"] == "ok"
    round_trip(server, client)


# -- the service address ---------------------------------------------------------------------------


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair (``eth0``), each with a spare ``eth1``."""
    a, b = unique("addr"), unique("addr")
    ip("netns", "add", a)
    try:
        ip("netns", "add", b)
        ip("-n", a, "link", "add", "eth0", "type", "veth", "peer", "eth0", "netns", b)
        for netns in (a, b):
            ip("-n", netns, "link", "set", "eth0", "up")
            ip("-n", netns, "link", "add", "eth1", "type", "bridge")  # no dummy module here
        yield a, b
    finally:
        for netns in (a, b):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
    assert not netns_exists(a) and not netns_exists(b)


def test_a_service_address_is_added_once_found_and_removed_once(two_hosts: tuple[str, str]) -> None:
    netns, _ = two_hosts
    result = python(
        """
        import json
        from ferry.handoff import address
        a = address.ServiceAddress.parse("10.88.0.100/24@eth0")
        steps = [address.is_present(a), address.add(a), address.is_present(a), address.add(a)]
        try:
            address.add(address.ServiceAddress.parse("10.88.0.100/24@eth1"))
        except address.AddressError as error:
            steps.append(str(error))
        steps += [address.remove(a), address.is_present(a), address.remove(a)]
        try:
            address.add(address.ServiceAddress.parse("10.88.0.100/24@eth9"))
        except address.AddressError as error:
            steps.append(str(error))
        six = address.ServiceAddress.parse("fd00::100/64@eth0")
        steps += [address.add(six), address.is_present(six), address.remove(six)]
        print(json.dumps(steps))
        """,
        netns=netns,
    )
    assert result == [
        False,
        True,
        True,
        False,
        "10.88.0.100 is already on eth0, not on eth1",
        True,
        False,
        False,
        "there is no network device 'eth9' here",
        True,
        True,
        True,
    ]


def test_adding_an_address_without_cap_net_admin_says_so(two_hosts: tuple[str, str]) -> None:
    netns, _ = two_hosts
    result = python(
        """
        import json
        from ferry.handoff import address
        try:
            address.add(address.ServiceAddress.parse("10.88.0.100/24@eth0"))
        except address.AddressError as error:
            print(json.dumps({"error": str(error)}))
        """,
        wrapper=NO_NET_ADMIN["bounding set"],
        netns=netns,
    )
    assert result == {
        "error": "adding 10.88.0.100/24@eth0: Operation not permitted "
        "(needs CAP_NET_ADMIN in this network namespace)"
    }


ARP_LISTENER = """
import json, select, socket, struct, sys
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
sock.bind(("eth0", 0))
print("ready", flush=True)
ready, _, _ = select.select([sock], [], [], 30)
frame = sock.recv(100)
dst, src, kind, htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack(
    "!6s6sHHHBBH6s4s6s4s", frame[:42])
print(json.dumps({"dst": dst.hex(), "src": src.hex(), "op": op, "sha": sha.hex(),
                  "spa": socket.inet_ntoa(spa), "tpa": socket.inet_ntoa(tpa), "tha": tha.hex()}))
"""


def test_an_announcement_is_a_gratuitous_arp_from_this_device(two_hosts: tuple[str, str]) -> None:
    announcer_ns, listener_ns = two_hosts
    listener = subprocess.Popen(
        ["ip", "netns", "exec", listener_ns, sys.executable, "-c", ARP_LISTENER],
        stdout=subprocess.PIPE,
    )
    try:
        assert listener.stdout is not None
        assert read_line(listener.stdout, Deadline()) == b"ready\n"
        result = python(
            """
            import json, socket
            from ferry.handoff import address
            a = address.ServiceAddress.parse("10.88.0.100/24@eth0")
            with address.Announcer(a) as announcer:
                announcer.announce()
            with open("/sys/class/net/eth0/address") as mac:
                print(json.dumps({"mac": mac.read().strip().replace(":", "")}))
            """,
            netns=announcer_ns,
        )
        frame = json.loads(read_line(listener.stdout, Deadline()))
    finally:
        listener.kill()
        listener.wait(30)
    assert frame == {
        "dst": "ffffffffffff",
        "src": result["mac"],
        "op": 1,  # a request whose sender and target are both the address
        "sha": result["mac"],
        "spa": "10.88.0.100",
        "tpa": "10.88.0.100",
        "tha": "000000000000",
    }


def test_an_announcement_needs_ipv4_on_an_ethernet_device() -> None:
    with pytest.raises(address.AddressError, match="only IPv4 service addresses"):
        address.Announcer(address.ServiceAddress.parse("fd00::1/64@lo"))
    with pytest.raises(address.AddressError, match="lo is not an Ethernet device"):
        address.Announcer(address.ServiceAddress.parse("127.0.0.2/8@lo"))
    with pytest.raises(address.AddressError, match="no network device 'fh-missing0'"):
        address.Announcer(address.ServiceAddress.parse("10.0.0.1/8@fh-missing0"))
