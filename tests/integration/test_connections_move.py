"""Clients survive the move: their live TCP connections go with the image.

Real ferry processes in network namespaces the tests create (two hosts on a
bridge and a third for the clients, ``handoff_support.Lan``), real clients:
libnbd (Debian's python3-libnbd, ``tests/workload.py``) with 16 writes in
flight, and ``qemu-io`` writing and reading back over one connection.  The
image moves from the ferry on one host to the ferry on the other, with the
service address (``--service-address``); every client's TCP connection is
the same before and after (same local port, never closed, no reconnect),
no request fails, every acknowledged write is on the destination byte for
byte, and the writes after the handoff land there.

On one host (a restart beside the old process, and the case the source
must close its socket before the destination can rebuild it): a client
whose request is only half sent when its connection moves finishes it on
the destination.

Faults: the destination SIGKILLed once it has rebuilt the first connection
(``FERRY_PAUSE_AT=restored`` stops it at exactly that moment), and a
destination without CAP_NET_ADMIN, which cannot rebuild sockets at all.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.nbd.constants import Command
from ferry.remote import RemoteExport
from ferry.status import parse_line
from handoff_support import Lan
from moving_support import URI, start_hosts, written_since
from support import (
    FERRY,
    Deadline,
    FerryProcess,
    QemuIo,
    mirror_command,
    random_file,
    run,
    sparse_file,
    wait_until,
)
from workload import lost_writes

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def lan() -> Iterator[Lan]:
    lan = Lan.make(["source", "destination", "client"])
    try:
        yield lan
    finally:
        lan.close()


def check_acked(image: Path, reports: list[dict[str, object]]) -> None:
    data = image.read_bytes()
    for report in reports:
        assert report["acked"], report
        assert lost_writes(data, report) == [], report


def test_clients_move_to_another_host_with_the_image(lan: Lan, tmp_path: Path) -> None:
    hosts = start_hosts(lan, tmp_path)
    stop = tmp_path / "stop"
    qemu = None
    try:
        # qemu-io works beyond the blocks the writer owns: the last 8 MiB.
        hosts.writer(0, 1, stop, span=SIZE - 8 * MiB)
        qemu = QemuIo(hosts.in_client_host(), URI, SIZE - 8 * MiB)
        wait_until(
            "the clients write", lambda: hosts.status(hosts.source_sock)["num_clients"] == "2"
        )
        wait_until("a write landed", lambda: written_since(hosts.source_image, hosts.dest_image))
        mirror = hosts.mirror()
        assert mirror.returncode == 0, mirror.stderr.decode()
        pairs_at_handoff = qemu.pairs
        # The moved clients write on, now to the destination.
        wait_until(
            "a write after the handoff",
            lambda: written_since(hosts.dest_image, hosts.source_image),
        )
        wait_until("qemu-io goes on", lambda: qemu.pairs > pairs_at_handoff + 20)
        source_status = hosts.status(hosts.source_sock)
        dest_status = hosts.status(hosts.dest_sock)
    finally:
        try:
            output = qemu.finish() if qemu is not None else ""
        finally:
            reports = hosts.finish(stop)

    assert source_status["state"] == "handed_off"
    assert dest_status["state"] == "serving"
    for side in (source_status, dest_status):
        assert side["can_move_connections"] == "true"
        assert (side["connections_moved"], side["connections_aborted"]) == ("2", "0"), side
    (report,) = reports
    assert report["ended"] == "stopped", report  # no request failed, never disconnected
    assert report["local_start"] == report["local_end"], report  # the same TCP connection
    check_acked(hosts.dest_image, reports)
    # qemu-io verified every read-back on one connection; none failed.
    assert "Pattern verification failed" not in output and "error" not in output.lower(), output
    assert output.count("wrote 65536/65536") == output.count("read 65536/65536") >= 40, output


def test_sixteen_clients_move_at_once(lan: Lan, tmp_path: Path) -> None:
    hosts = start_hosts(lan, tmp_path)
    stop = tmp_path / "stop"
    try:
        for k in range(16):
            hosts.writer(k, 16, stop, depth=2)
        wait_until(
            "sixteen clients", lambda: hosts.status(hosts.source_sock)["num_clients"] == "16"
        )
        mirror = hosts.mirror()
        assert mirror.returncode == 0, mirror.stderr.decode()
        wait_until(
            "a write after the handoff",
            lambda: written_since(hosts.dest_image, hosts.source_image),
        )
        dest_status = hosts.status(hosts.dest_sock)
    finally:
        reports = hosts.finish(stop)
    assert (dest_status["connections_moved"], dest_status["connections_aborted"]) == ("16", "0")
    for report in reports:
        assert report["ended"] == "stopped", report
        assert report["local_start"] == report["local_end"], report
    check_acked(hosts.dest_image, reports)


def test_a_destination_killed_while_restoring_loses_no_acknowledged_write(
    lan: Lan, tmp_path: Path
) -> None:
    env = dict(os.environ, FERRY_PAUSE_AT="restored")
    hosts = start_hosts(lan, tmp_path, env=env)
    stop = tmp_path / "stop"
    try:
        hosts.writer(0, 1, stop)
        wait_until(
            "the client writes", lambda: hosts.status(hosts.source_sock)["num_clients"] == "1"
        )
        mirror = subprocess.Popen(
            hosts.mirror_command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        hosts.dest.wait_for_log("paused at restored")
        hosts.dest.proc.send_signal(signal.SIGKILL)
        hosts.dest.proc.wait(30)
        mirror.communicate(timeout=60)
        assert mirror.returncode != 0  # the migration did not complete
        # The source settles it with the lease (nobody took it) and serves again.
        wait_until(
            "the source serves again",
            lambda: hosts.status(hosts.source_sock)["state"] == "serving",
            Deadline(60),
        )
    finally:
        reports = hosts.finish(stop)
    (report,) = reports
    # Its socket on the destination died with the process: the client was told.
    assert report["ended"] == "error", report
    check_acked(hosts.source_image, reports)


def test_a_destination_without_cap_net_admin_takes_the_image_and_drops_the_clients(
    lan: Lan, tmp_path: Path
) -> None:
    hosts = start_hosts(lan, tmp_path, dest_wrap=("setpriv", "--bounding-set", "-net_admin", "--"))
    stop = tmp_path / "stop"
    try:
        hosts.writer(0, 1, stop)
        wait_until(
            "the client writes", lambda: hosts.status(hosts.source_sock)["num_clients"] == "1"
        )
        dest_status = hosts.status(hosts.dest_sock)
        assert dest_status["can_move_connections"] == "false"
        mirror = hosts.mirror()
        assert mirror.returncode == 0, mirror.stderr.decode()
        source_status = hosts.status(hosts.source_sock)
    finally:
        reports = hosts.finish(stop)
    assert source_status["state"] == "handed_off"
    assert (source_status["connections_moved"], source_status["connections_aborted"]) == ("0", "1")
    (report,) = reports
    assert report["ended"] == "error", report  # disconnected, as before connections could move
    check_acked(hosts.dest_image, reports)


REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
# The client negotiated structured replies: a WRITE's answer is one NONE chunk with DONE.
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, length


def test_a_request_half_sent_at_the_freeze_is_finished_on_the_destination(tmp_path: Path) -> None:
    source_image = random_file(tmp_path / "source.img", SIZE, seed=5)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    source_sock = tmp_path / "source.sock"
    local = ["--addr", "127.0.0.1", "--port", "0", "--lockspace", "none"]
    source = FerryProcess(
        ["serve", *local, "--file", str(source_image), "--sock", str(source_sock)]
    ).wait_serving()
    dest = FerryProcess(
        ["listen", *local, "--file", str(dest_image), "--sock", str(tmp_path / "dest.sock")]
    ).wait_serving()
    try:
        client = RemoteExport.connect("127.0.0.1", source.port, timeout=30)
        sock = client.socket
        before = sock.getsockname()
        payload = bytes(range(256)) * 32  # 8 KiB
        header = REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, 77, 4096, len(payload))
        sock.sendall(header + payload[:3000])  # the rest waits until the image has moved
        mirror = run(mirror_command(dest.port, source_sock, "--action", "nothing", "--wait"))
        assert b"has control of the image" in mirror.stdout
        sock.sendall(payload[3000:])
        reply = STRUCTURED_REPLY.unpack(recv_exactly(sock, STRUCTURED_REPLY.size))
        assert reply == (0x668E33EF, 1, 0, 77, 0)  # DONE, NBD_REPLY_TYPE_NONE: written
        assert client.pread(4096, len(payload)) == payload  # the same connection reads it back
        assert sock.getsockname() == before
        client.close()
        dest_status = parse_line(
            run([*FERRY, "status", "--sock", str(tmp_path / "dest.sock")]).stdout.decode()
        )
        assert dest_status["connections_moved"] == "1"
        assert dest_image.read_bytes()[4096 : 4096 + len(payload)] == payload
    finally:
        dest.stop()
        source.stop()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the connection closed"
        data += chunk
    return data


def kernel_nbd_unavailable() -> str | None:
    """Why the kernel's own NBD client cannot be used here (None: it can)."""
    if not Path("/sys/module/nbd").exists():
        loaded = (
            subprocess.run(["modprobe", "nbd"], capture_output=True, text=True, check=False)
            if shutil.which("modprobe")
            else None
        )
        if loaded is None:
            return "modprobe is not installed, and the kernel's nbd module is not loaded"
        if loaded.returncode != 0:
            return f"the kernel's nbd module cannot be loaded: {loaded.stderr.strip()}"
    if shutil.which("nbd-client") is None:
        return "nbd-client (Debian's nbd-client) is not installed"
    return None


def test_the_kernels_nbd_client_keeps_its_device_across_a_handoff(tmp_path: Path) -> None:
    why = kernel_nbd_unavailable()
    if why is not None:
        pytest.skip(why)  # the only skip in the suite: a kernel without the nbd module
    source_image = random_file(tmp_path / "source.img", SIZE, seed=9)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    source_sock = tmp_path / "source.sock"
    local = ["--addr", "127.0.0.1", "--port", "0", "--lockspace", "none"]
    source = FerryProcess(
        ["serve", *local, "--file", str(source_image), "--sock", str(source_sock)]
    ).wait_serving()
    dest = FerryProcess(["listen", *local, "--file", str(dest_image)]).wait_serving()
    device = "/dev/nbd7"
    try:
        run(["nbd-client", "127.0.0.1", str(source.port), device, "-N", "", "-b", "4096"])
        pattern = bytes(range(256)) * 16 * 256  # 1 MiB
        with open(device, "r+b", buffering=0) as disk:
            disk.write(pattern)
            os.fsync(disk.fileno())
            run(mirror_command(dest.port, source_sock, "--action", "nothing", "--wait"))
            disk.seek(MiB)
            disk.write(pattern)  # to the destination, through the same device
            os.fsync(disk.fileno())
            disk.seek(0)
            assert disk.read(2 * MiB) == pattern * 2
        assert dest_image.read_bytes()[: 2 * MiB] == pattern * 2
    finally:
        subprocess.run(["nbd-client", "-d", device], capture_output=True, check=False)
        dest.stop()
        source.stop()
