"""Live TCP connections moved while their clients keep talking: never reset, nothing lost.

Every test runs the sequence-numbered echo of ``tests/handoff_worker.py``:
a client sends a 16-byte message every 2 ms on each connection and checks
each echo byte for byte and in order.  A connection is moved mid-stream --
to a new socket in the same process, to another host with the service
address, or to another process by SCM_RIGHTS -- and the client's verdict
must be clean: no error on its socket (a reset would be one), every message
echoed exactly once, and the same connection, at the same addresses, as
when it connected.  Each move is checked to have really happened (the
socket that answers after it is the restored one) before the client stops.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.handoff import tcp_repair
from ferry.handoff.freeze import Flow, Freezer
from handoff_support import (
    SERVICE_IP,
    SERVICE_PORT,
    Lan,
    Worker,
    netns_exists,
    start_client,
    start_source_and_destination,
    unique,
)
from support import Deadline, free_port

pytestmark = pytest.mark.integration

PORT = SERVICE_PORT


def assert_clean(done: dict[str, Any], clients: int) -> None:
    """The client's verdict: every connection untouched by the move."""
    assert len(done["connections"]) == clients
    for conn in done["connections"]:
        assert conn["errors"] == [], conn
        assert conn["sent"] > 0 and conn["echoed"] == conn["sent"], conn
        assert conn["same_connection"], conn


def stop_all(*workers: Worker) -> None:
    for worker in workers:
        worker.finish()


# -- (a) a new socket, same process ------------------------------------------------------


@pytest.mark.parametrize("clients", [1, 4])
@pytest.mark.parametrize("queues", [False, True], ids=["steady", "data-in-both-queues"])
def test_a_connection_moves_to_a_new_socket_in_the_same_process(clients: int, queues: bool) -> None:
    port = free_port()
    server = Worker(
        [
            "server",
            "--listen",
            f"127.0.0.1:{port}",
            "--clients",
            str(clients),
            "--freeze-table",
            unique("frz"),
        ]
    )
    client = None
    try:
        server.expect("ready")
        client = Worker(["client", "--connect", f"127.0.0.1:{port}", "--clients", str(clients)])
        started = client.expect("started")
        server.send("move queues" if queues else "move")
        moved = server.expect("moved")
        assert moved["connections"] == clients
        assert moved["same_address"] == [True] * clients
        if queues:
            # Unread bytes, and an echo sent whose ACK the freeze dropped.
            for received, sent, unsent in moved["queues"]:
                assert received > 0 and sent > unsent, moved["queues"]
        server.expect("serving-moved")  # the restored sockets echo
        client.send("stop")
        done = client.expect("done")
        assert_clean(done, clients)
        assert [c["local"] for c in done["connections"]] == started["local"]
    finally:
        stop_all(*(w for w in (client, server) if w is not None))


def test_queues_the_peer_holds_back_move_whole() -> None:
    """Megabytes unsent behind a closed window, and an unread receive queue, arrive intact."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    server, _ = listener.accept()
    listener.close()
    to_client = bytes(range(256)) * 16384  # 4 MiB: far more than the client's window
    to_server = b"unread by the server " * 4000
    server.setblocking(False)
    queued = 0
    try:
        while queued < len(to_client):
            queued += server.send(to_client[queued : queued + 65536])
    except BlockingIOError:
        pass  # the send buffer is full: the rest is never sent
    server.setblocking(True)
    client.sendall(to_server)
    received = bytearray()
    held_by_the_app = b"written, but not yet taken by the kernel"

    def read_all() -> None:
        while len(received) < queued + len(held_by_the_app):
            chunk = client.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    with Freezer(unique("frz")) as freezer:
        readable, _, _ = select.select([server], [], [], Deadline().left())
        assert readable, "the client's bytes never arrived"
        flow = Flow.of_socket(server)
        freezer.freeze(flow)
        state = tcp_repair.checkpoint(server)
        tcp_repair.release(server)
        # Bytes in both queues, the send queue's held back by the client's window.
        assert state.recv_queue and state.unsent > 0
        # And what the application had not handed to the kernel yet.
        restored = tcp_repair.restore(state.with_unsent(held_by_the_app))
        freezer.unfreeze(flow)
    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    got = b""
    while len(got) < len(to_server):  # what was queued, then what the client resends
        chunk = restored.recv(1 << 20)
        assert chunk, "the restored socket was closed"
        got += chunk
    reader.join(Deadline().left())
    assert not reader.is_alive(), (len(received), queued + len(held_by_the_app))
    assert got == to_server
    assert bytes(received) == to_client[:queued] + held_by_the_app
    restored.sendall(b"after")
    assert client.recv(5) == b"after"
    restored.close()
    client.close()


def test_an_ipv6_connection_moves_too() -> None:
    listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    listener.close()
    client.sendall(b"before")
    assert select.select([server], [], [], Deadline().left())[0]
    with Freezer(unique("frz")) as freezer:
        flow = Flow.of_socket(server)
        assert flow.version == 6
        freezer.freeze(flow)
        state = tcp_repair.checkpoint(server)
        tcp_repair.release(server)
        restored = tcp_repair.restore(type(state).from_bytes(state.to_bytes()))
        freezer.unfreeze(flow)
    assert state.family == socket.AF_INET6 and state.recv_queue == b"before"
    assert restored.getsockname()[:2] == state.local
    assert restored.recv(6) == b"before"
    restored.sendall(b"after")
    assert client.recv(5) == b"after"
    restored.close()
    client.close()


# -- (b) another host, with the service address --------------------------------------------


@pytest.fixture
def lan() -> Iterator[Lan]:
    made = Lan.make(["source", "destination", "client"])
    namespaces = [made.switch, *(h.netns for h in made.hosts.values())]
    yield made
    made.close()
    assert not any(netns_exists(name) for name in namespaces)


def addresses(netns: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, "-4", "addr", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


@pytest.mark.parametrize("clients", [1, 3])
def test_a_connection_moves_to_another_host_with_the_service_address(
    lan: Lan, clients: int
) -> None:
    source_host, destination_host, client_host = lan["source"], lan["destination"], lan["client"]
    source, destination = start_source_and_destination(lan, clients)
    client = None
    try:
        client = start_client(f"{SERVICE_IP}:{PORT}", clients, netns=client_host.netns)
        started = client.expect("started")
        source.send("handoff")
        states = source.expect("states")["states"]
        assert len(states) == clients
        assert SERVICE_IP not in addresses(source_host.netns)
        destination.send("restore " + json.dumps(states))
        restored = destination.expect("restored")
        assert restored["address_added"] is True
        assert SERVICE_IP in addresses(destination_host.netns)
        assert sorted(restored["local"]) == [[SERVICE_IP, PORT]] * clients
        assert sorted(restored["peers"]) == sorted(started["local"])
        destination.expect("serving-moved")  # the client's packets reach the new host
        client.send("stop")
        done = client.expect("done")
        assert_clean(done, clients)
        assert all(local[0] == client_host.address for local in started["local"])
    finally:
        stop_all(*(w for w in (client, source, destination) if w is not None))


# -- (c) another process, by SCM_RIGHTS -------------------------------------------------------


def test_a_live_connection_passes_to_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "takeover.sock")
    port = free_port()
    taker = Worker(["server", "--take-from", path, "--formats", "1"])
    giver = client = None
    try:
        taker.expect("ready")
        giver = Worker(
            ["server", "--listen", f"127.0.0.1:{port}", "--clients", "2", "--pass-to", path]
        )
        giver.expect("ready")
        client = Worker(["client", "--connect", f"127.0.0.1:{port}", "--clients", "2"])
        client.expect("started")
        giver.send("pass")
        assert giver.expect("passed")["connections"] == 2
        assert taker.expect("taken")["connections"] == 2
        taker.expect("serving-moved")
        client.send("stop")
        assert_clean(client.expect("done"), 2)
        assert giver.finish() == 0
    finally:
        stop_all(*(w for w in (client, giver, taker) if w is not None))


def test_a_state_format_the_taker_does_not_read_is_refused_and_the_giver_serves_on(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "takeover.sock")
    port = free_port()
    taker = Worker(["server", "--take-from", path, "--formats", "2", "3"])
    giver = client = None
    try:
        taker.expect("ready")
        giver = Worker(
            ["server", "--listen", f"127.0.0.1:{port}", "--pass-to", path, "--fd-format", "1"]
        )
        giver.expect("ready")
        client = Worker(["client", "--connect", f"127.0.0.1:{port}"])
        client.expect("started")
        giver.send("pass")
        refused = giver.expect("refused")["reason"]
        assert "state format version 1 is not one this process reads (2, 3)" in refused
        assert "version 1" in taker.expect("refused")["reason"]
        assert taker.finish() == 0
        giver.expect("serving-moved")  # it echoed on, after the refusal
        client.send("stop")
        done = client.expect("done")
        assert_clean(done, 1)
        # Every echo came from the giver: the connection never left it.
        assert giver.expect("closed")["echoed"] == done["connections"][0]["echoed"]
    finally:
        stop_all(*(w for w in (client, giver, taker) if w is not None))
