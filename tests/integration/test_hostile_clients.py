"""Hostile clients against a real ``ferry serve``: bounded memory, nobody locked out.

Each test replays an attack that once worked (the numbers in the docstrings
were measured on the release before these limits), from loopback addresses
of the test's own, and then checks the promise: the server's memory stays
within its budgets plus a stated slack, and an ordinary client is still
served, correctly.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.nbd.constants import Command
from ferry.remote import NegotiationError, RemoteExport
from ferry.serve.limits import MAX_CONNECTIONS_PER_ADDRESS, RECEIVE_BUDGET, REPLY_BUDGET
from support import FERRY, Deadline, FerryProcess, run, serve, sparse_file

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 64 * MiB
REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, from Python 3.10 on Linux
#: What the process may hold beyond its budgets: the interpreter, Twisted,
#: the pieces of requests in flight, the kernel's view of the heap.
SLACK = 160 * MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FerryProcess]:
    image = sparse_file(tmp_path / "disk.img", SIZE, data_at=[(0, MiB)])
    proc = serve(image, "--lockspace", "none")
    yield proc
    proc.stop()


def rss(proc: FerryProcess) -> int:
    with open(f"/proc/{proc.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(port: int, host: str) -> RemoteExport:
    return RemoteExport.connect("127.0.0.1", port, bind=host, timeout=30)


def send_what_it_takes(sock: socket.socket, data: bytes) -> int:
    """Send until the kernel takes no more (the server stopped reading); how much went."""
    sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < len(data):
            sent += sock.send(data[sent : sent + MiB])
    return sent


def still_served(port: int, host: str) -> None:
    with connect(port, host) as client:
        client.pwrite(b"fine", 4096)
        assert client.pread(4096, 4) == b"fine"


def test_idle_connections_from_one_address_lock_nobody_else_out(server: FerryProcess) -> None:
    """256 idle connections from one address once refused every other client."""
    held: list[RemoteExport] = []
    refused = 0
    try:
        for _ in range(256):
            try:
                held.append(connect(server.port, "127.0.0.3"))
            except NegotiationError as error:
                assert "too many connections from 127.0.0.3" in str(error)
                refused += 1
        assert len(held) == MAX_CONNECTIONS_PER_ADDRESS
        assert refused == 256 - MAX_CONNECTIONS_PER_ADDRESS
        still_served(server.port, "127.0.0.4")
    finally:
        for client in held:
            client.close()


def test_a_hypervisor_s_address_may_be_given_more_connections(tmp_path: Path) -> None:
    """One address running many guests: --max-connections-per-address raises its share."""
    image = sparse_file(tmp_path / "many.img", SIZE)
    raised = MAX_CONNECTIONS_PER_ADDRESS + 8
    proc = serve(image, "--lockspace", "none", "--max-connections-per-address", str(raised))
    held: list[RemoteExport] = []
    try:
        for _ in range(raised):
            held.append(connect(proc.port, "127.0.0.5"))
        with pytest.raises(
            NegotiationError, match=f"too many connections from 127.0.0.5: {raised} at most"
        ):
            connect(proc.port, "127.0.0.5")
        held[-1].pwrite(b"guest", 0)
        assert held[0].pread(0, 5) == b"guest"
        still_served(proc.port, "127.0.0.6")
    finally:
        for client in held:
            client.close()
        proc.stop()


def test_a_limit_of_no_connections_is_a_usage_error(tmp_path: Path) -> None:
    image = sparse_file(tmp_path / "none.img", MiB)
    for option in ("--max-clients", "--max-connections-per-address"):
        result = run(
            [*FERRY, "serve", "-l", "127.0.0.1", "-p", "0", "-f", str(image), option, "0"],
            check=False,
        )
        assert result.returncode == 2
        assert f"argument {option}: must be 1 or more, not 0" in result.stderr.decode()


def test_garbage_into_a_log_nobody_reads_stalls_nobody(tmp_path: Path) -> None:
    """Each client that sends garbage is a warning in --log; with the log's reader
    stuck (a pipe of one page nobody reads), the fifth once froze the whole server."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo, 0o600)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)
        image = sparse_file(tmp_path / "disk.img", SIZE, data_at=[(0, MiB)])
        proc = serve(image, "--lockspace", "none", "--log", str(fifo))
        for _ in range(40):  # about 550 bytes of warning each: the pipe is full after 8
            with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as garbage:
                garbage.recv(18)
                garbage.sendall(b"\0\0\0\0 not NBD at all")
                with contextlib.suppress(ConnectionResetError):  # closed for it, either way
                    assert garbage.recv(1) == b""
        still_served(proc.port, "127.0.0.7")
        available = array.array("i", [0])
        fcntl.ioctl(reader, termios.FIONREAD, available)
        assert available[0] > 3000  # the log was written, up to what the pipe holds
        proc.stop()
    finally:
        os.close(reader)


def test_half_sent_writes_cost_no_more_than_the_receive_budget(server: FerryProcess) -> None:
    """100 connections each halfway through a 32 MiB WRITE once took 3.3 GB."""
    before = rss(server)
    header = REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, 1, 0, 32 * MiB)
    half = header + bytes(16 * MiB)
    clients = []
    try:
        for n in range(100):
            client = connect(server.port, f"127.0.1.{n % 4 + 1}")
            clients.append(client)
            send_what_it_takes(client.socket, half)
        peak = rss(server)
        assert peak - before < RECEIVE_BUDGET + SLACK, (before, peak)
        still_served(server.port, "127.0.0.5")
    finally:
        for client in clients:
            client.close()


def test_unread_reads_cost_no_more_than_the_reply_budget(server: FerryProcess) -> None:
    """40 connections that did not read a 32 MiB READ once took 1.2 GB."""
    before = rss(server)
    clients = []
    try:
        for n in range(40):
            client = connect(server.port, f"127.0.2.{n % 4 + 1}")
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            clients.append(client)
            read = REQUEST.pack(REQUEST_MAGIC, 0, Command.READ, 1, 0, 32 * MiB)
            client.socket.sendall(read)
        deadline = Deadline(30)
        peak = rss(server)
        while not deadline.expired():  # the server reads and replies as far as it may
            now = rss(server)
            if now <= peak and now - before > REPLY_BUDGET // 2:
                break
            peak = max(peak, now)
        assert max(peak, rss(server)) - before < REPLY_BUDGET + SLACK, (before, peak)
        still_served(server.port, "127.0.0.6")
    finally:
        for client in clients:
            client.close()
