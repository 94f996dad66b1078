"""``ferry proxy`` between real clients and real servers, across migrations and crashes.

The clients are libnbd's (the checkable workload of ``tests/workload.py``
with 16 writes in flight, nbdsh scripts, nbdcopy, nbdinfo) and qemu's
(qemu-img); the servers are ferry (serve, listen, mirror) and qemu-nbd.
Every test checks the data byte for byte: each acknowledged write is where
it belongs, and nothing else changed.  Waits are on events with deadlines
(a log line, a status field, a socket's queue), never sleeps.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from etcd_support import EtcdServer, etcd_fixture
from ferry.status import parse_line
from support import (
    FERRY,
    Deadline,
    FerryProcess,
    ProxyProcess,
    free_port,
    listening,
    mirror_command,
    nbdsh,
    random_file,
    read_line,
    run,
    serve,
    serve_args,
    sha256,
    sparse_file,
    start_peer,
    stop_peer,
    wait_until,
)
from workload import BLOCK, decode

pytestmark = pytest.mark.integration

__all__ = ["etcd_fixture"]  # the module's etcd fixture: pytest finds it by its name

MiB = 1 << 20
SIZE = 64 * MiB
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with the libnbd bindings
WORKLOAD = Path(__file__).resolve().parents[1] / "workload.py"
DEPTH = 16


def proxy(
    tmp_path: Path, port: int, *extra: str, name: str = "disk", metrics: bool = False
) -> tuple[ProxyProcess, Path]:
    sock = tmp_path / "proxy.sock"
    args = [
        "proxy",
        "--addr",
        "127.0.0.1",
        "--port",
        "0",
        "--conn-addr",
        "127.0.0.1",
        "--conn-port",
        str(port),
        "--name",
        name,
        "--control-sock",
        str(sock),
        "--trace",
        str(tmp_path / "proxy.jsonl"),
        *(["--metrics", "127.0.0.1:0"] if metrics else []),
        *extra,
    ]
    return ProxyProcess(args).wait_serving(), sock


@pytest.fixture
def stopping() -> Iterator[Callable[[Any], Any]]:
    """Registers processes (FerryProcess or Popen) to stop at the end, whatever happens."""
    started: list[Any] = []

    def stop_later(proc: Any) -> Any:
        started.append(proc)
        return proc

    yield stop_later
    for proc in reversed(started):
        if isinstance(proc, FerryProcess):
            if proc.proc.poll() is None:
                proc.stop(signal.SIGKILL)
        else:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            stop_peer(proc)


def writer(
    uri: str, stop_file: Path, blocks: int = SIZE // BLOCK, *, client: int = 0, clients: int = 1
) -> subprocess.Popen[bytes]:
    """The checkable workload, 16 writes in flight: client ``client`` of ``clients``, each
    writing only its own blocks."""
    return subprocess.Popen(
        [
            SYSTEM_PYTHON,
            str(WORKLOAD),
            uri,
            str(client),
            str(clients),
            str(blocks),
            str(stop_file),
            str(DEPTH),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def report_of(client: subprocess.Popen[bytes], stop_file: Path) -> dict[str, Any]:
    stop_file.touch()
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr.decode()
    report: dict[str, Any] = json.loads(stdout)
    return report


def check_writes(report: dict[str, Any], image: bytes, original: bytes) -> None:
    """Every acknowledged write is in ``image`` (its counter, or a later one still
    unanswered), and every block the client never wrote is as it was in ``original``."""
    assert report["ended"] == "stopped" and not report["error"], report
    assert report["writes"] > 0
    for offset_text, counter in report["acked"].items():
        offset = int(offset_text)
        found = decode(image[offset : offset + BLOCK])
        assert found is not None, f"block {offset} lost its write"
        ceiling = max(counter, report["unanswered"].get(offset_text, counter))
        assert counter <= found[2] <= ceiling, (offset, counter, found)
    written = {int(offset) for offset in (*report["acked"], *report["unanswered"])}
    assert len(image) == len(original)
    for offset in range(0, len(image), BLOCK):
        if offset not in written:
            assert image[offset : offset + BLOCK] == original[offset : offset + BLOCK], offset


def requests_answered(proxy_process: ProxyProcess) -> int:
    """``ferry_proxy_requests_total`` from the proxy's /metrics."""
    with urllib.request.urlopen(proxy_process.metrics_url(), timeout=10) as answer:
        text = answer.read().decode()
    match = re.search(r"^ferry_proxy_requests_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return int(float(match.group(1)))


def wait_for_requests(proxy_process: ProxyProcess, more_than: int, deadline: float = 60) -> int:
    until = Deadline(deadline)
    while (answered := requests_answered(proxy_process)) <= more_than:
        if until.expired():
            raise TimeoutError(f"the proxy answered only {answered} requests")
        try:
            proxy_process.proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError("the proxy exited")
    return answered


def replay(trace: Path) -> list[str]:
    return run([*FERRY, "trace", "replay", str(trace)]).stdout.decode().splitlines()


# -- qemu-nbd, killed and restarted ----------------------------------------------------------


class QemuNbd:
    """qemu-nbd serving an image on a port it keeps across restarts."""

    def __init__(self, image: Path, log: Path) -> None:
        self.image = image
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> QemuNbd:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    "qemu-nbd",
                    "--format=raw",
                    "--persistent",
                    "--shared=16",
                    "--export-name=disk",
                    "--bind=127.0.0.1",
                    f"--port={self.port}",
                    str(self.image),
                ],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        until = Deadline()
        while not listening(self.port):
            if until.expired() or self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd did not listen: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.02)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def peers(self) -> list[str]:
        """The address of each client connected to qemu-nbd (``ss``'s peer column)."""
        out = run(["ss", "-Htn", "state", "established", f"( sport = :{self.port} )"])
        return sorted(
            line.split()[3].rpartition(":")[0] for line in out.stdout.decode().splitlines()
        )

    def receive_queue(self) -> int:
        """Bytes waiting, unread, in qemu-nbd's accepted sockets (``ss``'s Recv-Q)."""
        out = run(["ss", "-Htn", "state", "established", f"( sport = :{self.port} )"])
        return sum(int(line.split()[0]) for line in out.stdout.decode().splitlines())


@pytest.fixture
def qemu(tmp_path: Path, stopping: Callable[[Any], Any]) -> Iterator[QemuNbd]:
    server = QemuNbd(sparse_file(tmp_path / "qemu.img", SIZE), tmp_path / "qemu-nbd.log")
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
        stop_peer(server.proc)


def test_qemu_nbd_killed_and_restarted_the_writes_in_flight_are_replayed(
    tmp_path: Path, qemu: QemuNbd, stopping: Callable[[Any], Any]
) -> None:
    front, sock = proxy(tmp_path, qemu.port, metrics=True)
    stopping(front)
    stop_file = tmp_path / "stop"
    client = writer(front.uri("disk"), stop_file)
    try:
        before = wait_for_requests(front, 2000)
        qemu.kill()  # SIGKILL: whatever it had in flight is never answered
        qemu.start()  # the same port
        status = front.wait_status(sock, lambda s: s["reconnects"] == "1")
        wait_for_requests(front, before + 2000)  # and it goes on writing
    finally:
        report = report_of(client, stop_file)
    assert int(status["requests_replayed"]) >= 1, status
    check_writes(report, qemu.image.read_bytes(), bytes(SIZE))
    final = front.status(sock)
    assert final["requests_expired"] == "0" and final["upstream"] == f"127.0.0.1:{qemu.port}"
    events = [json.loads(line)["event"] for line in (tmp_path / "proxy.jsonl").open()]
    assert events.count("lost") == 1 and "replayed" in events
    assert front.stop() == 0
    assert replay(tmp_path / "proxy.jsonl") == ["proxy client-1 closed"]


def test_each_client_has_its_own_server_connection_from_bind_and_each_is_replayed(
    tmp_path: Path, qemu: QemuNbd, stopping: Callable[[Any], Any]
) -> None:
    front, sock = proxy(tmp_path, qemu.port, "--bind", "127.0.0.2", metrics=True)
    stopping(front)
    stop_file = tmp_path / "stop"
    clients = [
        stopping(writer(front.uri("disk"), stop_file, client=n, clients=2)) for n in range(2)
    ]
    try:
        # One server connection per client, both from --bind's address.
        wait_until("two server connections", lambda: len(qemu.peers()) == 2)
        assert qemu.peers() == ["127.0.0.2", "127.0.0.2"]
        before = wait_for_requests(front, 2000)
        qemu.kill()
        qemu.start()
        status = front.wait_status(sock, lambda s: s["reconnects"] == "2")  # each found it again
        wait_for_requests(front, before + 2000)
        assert qemu.peers() == ["127.0.0.2", "127.0.0.2"]
    finally:
        reports = [report_of(client, stop_file) for client in clients]
    assert status["num_clients"] == "2" and status["requests_expired"] == "0", status
    image = qemu.image.read_bytes()
    both = {
        "ended": "stopped",
        "error": "; ".join(r["error"] for r in reports if r["error"]),
        "writes": min(r["writes"] for r in reports),  # each wrote
        "acked": {k: v for r in reports for k, v in r["acked"].items()},
        "unanswered": {k: v for r in reports for k, v in r["unanswered"].items()},
    }
    assert all(r["ended"] == "stopped" for r in reports), reports
    check_writes(both, image, bytes(SIZE))  # the clients' blocks are disjoint
    assert front.stop() == 0
    assert replay(tmp_path / "proxy.jsonl") == ["proxy client-1 closed", "proxy client-2 closed"]


OVERLAPPING = """
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
writes = [(0, 65536, 0x11), (4096, 4096, 0x22), (0, 4096, 0x33), (61440, 8192, 0x44)]
errors = []
def done(n, error):
    if error.value:
        errors.append((n, error.value))
    return 1
for n, (offset, length, byte) in enumerate(writes):
    buf = nbd.Buffer.from_bytearray(bytearray([byte]) * length)
    h.aio_pwrite(buf, offset, completion=lambda error, n=n: done(n, error))
print("sent", flush=True)
while h.aio_in_flight():
    h.poll(1000)
print(json.dumps({"errors": errors}), flush=True)
"""


def test_overlapping_writes_in_flight_when_the_server_dies_land_in_their_order(
    tmp_path: Path, qemu: QemuNbd, stopping: Callable[[Any], Any]
) -> None:
    front, sock = proxy(tmp_path, qemu.port)
    stopping(front)
    client = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", OVERLAPPING, front.uri("disk")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        assert read_line(client.stdout, Deadline()) == b"connected\n"
        assert qemu.proc is not None
        qemu.proc.send_signal(signal.SIGSTOP)  # it takes the bytes, and answers nothing
        client.stdin.write(b"go\n")
        client.stdin.flush()
        assert read_line(client.stdout, Deadline()) == b"sent\n"
        # The first write reaches qemu-nbd's socket; the other three overlap it
        # (the last one, the second) and wait in the proxy.
        until = Deadline()
        while qemu.receive_queue() < 65536:
            assert not until.expired(), "the first write never reached qemu-nbd"
            try:
                client.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
        qemu.kill()
        qemu.start()
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err.decode()
    assert json.loads(out) == {"errors": []}
    expected = bytearray(SIZE)
    for offset, length, byte in [
        (0, 65536, 0x11),
        (4096, 4096, 0x22),
        (0, 4096, 0x33),
        (61440, 8192, 0x44),
    ]:
        expected[offset : offset + length] = bytes([byte]) * length
    # The replayed first write landed before the ones sent after it, once.
    assert qemu.image.read_bytes() == bytes(expected)
    status = front.status(sock)
    assert status["reconnects"] == "1" and int(status["requests_replayed"]) >= 1, status


MAX_WAIT_CLIENT = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
def step(name, offset, byte):
    try:
        h.pwrite(bytes([byte]) * 4096, offset)
        print(name, "ok", flush=True)
    except nbd.Error as error:
        print(name, "error", error.errno, flush=True)
step("before", 0, 0xa1)
sys.stdin.readline()
step("during", 4096, 0xa2)
sys.stdin.readline()
step("after", 8192, 0xa3)
print("read", h.pread(4096, 8192)[0], flush=True)
"""


def test_past_max_wait_requests_get_eio_and_the_connection_works_once_the_server_is_back(
    tmp_path: Path, qemu: QemuNbd, stopping: Callable[[Any], Any]
) -> None:
    front, sock = proxy(tmp_path, qemu.port, "--max-wait", "1")
    stopping(front)
    client = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", MAX_WAIT_CLIENT, front.uri("disk")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stopping(client)
    assert client.stdin is not None and client.stdout is not None
    deadline = Deadline()
    assert read_line(client.stdout, deadline) == b"before ok\n"
    qemu.kill()
    client.stdin.write(b"go\n")
    client.stdin.flush()
    assert read_line(client.stdout, deadline) == b"during error EIO\n"
    front.wait_status(sock, lambda s: s["clients_failed"] == "1")
    qemu.start()
    # The proxy finds it again by itself (its retries go on after max-wait) ...
    front.wait_status(sock, lambda s: s["clients_failed"] == "0")
    client.stdin.write(b"go\n")
    client.stdin.flush()
    # ... and the same client connection works.
    assert read_line(client.stdout, deadline) == b"after ok\n"
    assert read_line(client.stdout, deadline) == f"read {0xA3}\n".encode()
    client.stdin.close()
    assert client.wait(timeout=30) == 0
    image = qemu.image.read_bytes()
    assert image[:4096] == b"\xa1" * 4096
    assert image[4096:8192] == bytes(4096)  # the write that got EIO never landed
    assert image[8192:12288] == b"\xa3" * 4096
    status = front.status(sock)
    assert status["requests_expired"] == "1" and status["clients_failed"] == "0", status
    events = [json.loads(line)["event"] for line in (tmp_path / "proxy.jsonl").open()]
    assert "give_up" in events and "retry" in events


# -- real clients, byte for byte ------------------------------------------------------------


def test_nbdcopy_and_qemu_img_through_the_proxy_are_byte_identical(
    tmp_path: Path, stopping: Callable[[Any], Any]
) -> None:
    served = sparse_file(tmp_path / "served.img", SIZE)
    source = random_file(tmp_path / "source.bin", SIZE, seed=7)
    server = stopping(serve(served, "--name", "disk", "--lockspace", "none"))
    front, _ = proxy(tmp_path, server.port)
    stopping(front)
    uri = front.uri("disk")
    run(["nbdcopy", "--", str(source), uri])
    assert sha256(served) == sha256(source)
    run(["nbdcopy", "--", uri, str(tmp_path / "copy.bin")])
    assert sha256(tmp_path / "copy.bin") == sha256(source)
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "qemu.raw")])
    assert sha256(tmp_path / "qemu.raw") == sha256(source)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(source)])
    # Holes come through too: BLOCK_STATUS goes to the server and back.
    nbdsh(uri, "h.zero(32 * 1024 * 1024, 8 * 1024 * 1024)")  # a hole, punched
    direct = run(["nbdinfo", "--map", server.uri("disk")]).stdout
    assert b"hole" in direct
    assert run(["nbdinfo", "--map", uri]).stdout == direct
    # The same through a proxy on a Unix socket (--sock).
    path = tmp_path / "nbd.sock"
    unix = stopping(
        ProxyProcess(
            [
                "proxy",
                "--sock",
                str(path),
                "--conn-addr",
                "127.0.0.1",
                "--conn-port",
                str(server.port),
                "--name",
                "disk",
            ]
        )
    )
    unix.wait_for_log(f"proxying 'disk' on {path} to ")
    unix_uri = f"nbd+unix:///disk?socket={path}"
    run(["nbdcopy", "--", unix_uri, str(tmp_path / "unix.bin")])
    assert sha256(tmp_path / "unix.bin") == sha256(served)
    assert unix.stop() == 0 and not path.exists()
    assert front.stop() == 0 and server.stop() == 0


BLOCK_STATUS_CLIENT = """
h.pwrite(b"\\x5a" * 65536, 0)
assert h.pread(65536, 0) == b"\\x5a" * 65536
seen = []
h.block_status(1 << 20, 0, lambda context, offset, entries, error: seen.append(entries))
print(seen)
"""


def test_a_server_without_structured_replies_still_gets_block_status_answered(
    tmp_path: Path, stopping: Callable[[Any], Any]
) -> None:
    # nbd-server 3.24 has no structured replies, so no base:allocation: the
    # proxy offers both to its client and answers BLOCK_STATUS itself, as data.
    image = sparse_file(tmp_path / "nbd-server.img", SIZE)
    conf = tmp_path / "nbd-server.conf"

    def command(port: int) -> list[str]:
        conf.write_text(
            f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\n"
            f"[disk]\nexportname = {image}\nflush = true\nfua = true\n"
        )
        return ["nbd-server", "-C", str(conf), "-d"]  # one client, in the foreground

    peer, port = start_peer(command, tmp_path / "nbd-server.log")
    stopping(peer)
    front, _ = proxy(tmp_path, port)
    stopping(front)
    out = nbdsh(front.uri("disk"), BLOCK_STATUS_CLIENT, base_allocation=True).stdout
    assert out.strip() == b"[[1048576, 0]]"  # one extent, data
    assert image.read_bytes()[:65536] == b"\x5a" * 65536


def test_bad_command_lines_are_one_line_and_exit_2(tmp_path: Path) -> None:
    port = ["--conn-addr", "127.0.0.1", "--conn-port", "1"]
    for argv, words in [
        (["proxy", "--addr", "127.0.0.1", "--port", "0", "--sock", "x", *port], "not both"),
        (["proxy", "--addr", "127.0.0.1", *port], "are required"),
        (["proxy", "--addr", "127.0.0.1", "--port", "0", "--conn-addr", "h"], "--conn-port"),
        (["proxy", "--sock", "x", "--max-wait", "0", *port], "must be positive"),
        (["proxy", "--sock", "x", "--lockspace", "etcd:http://h:1", *port], "go together"),
    ]:
        result = run([*FERRY, *argv], check=False)
        assert result.returncode == 2, result
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and words in lines[0], lines


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            [
                *FERRY,
                "proxy",
                "--addr",
                "127.0.0.1",
                "--port",
                str(port),
                "--conn-addr",
                "127.0.0.1",
                "--conn-port",
                "1",
            ],
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1].startswith("ferry: cannot listen for clients")


# -- across a ferry -> ferry migration ---------------------------------------------------------


#: Runs a source that cannot move its clients' connections (no CAP_NET_ADMIN, so
#: no TCP_REPAIR): it disconnects them at the handoff, and the proxy must follow.
NO_MOVING: Final = ("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin")


def ferry_pair(
    tmp_path: Path, *extra: str, moving: bool = False
) -> tuple[FerryProcess, FerryProcess, Path, Path, Path]:
    """A source serving a random image and a listener, both named disk; their images and socket.

    Unless ``moving``, the source cannot move client connections (NO_MOVING).
    """
    source_image = random_file(tmp_path / "source.img", SIZE, seed=31)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    source_sock = tmp_path / "source.sock"
    common = ["--name", "disk", *extra]
    source = FerryProcess(
        serve_args(source_image, *common, "--sock", str(source_sock)),
        wrap=() if moving else NO_MOVING,
    ).wait_serving()
    status = parse_line(run([*FERRY, "status", "--sock", str(source_sock)]).stdout.decode())
    assert status["can_move_connections"] == ("true" if moving else "false"), status
    dest = serve(dest_image, *common, "--sock", str(tmp_path / "dest.sock"), mode="listen")
    return source, dest, source_image, dest_image, source_sock


def migrate_under_the_writer(
    tmp_path: Path,
    front: ProxyProcess,
    dest: FerryProcess,
    source_sock: Path,
    *mirror_extra: str,
    follows: bool = True,
) -> dict[str, Any]:
    """A writer through ``front`` while the image moves; the proxy ``follows`` it to ``dest``
    (False: its server connection moved with the image, and it never noticed)."""
    stop_file = tmp_path / "stop"
    client = writer(front.uri("disk"), stop_file)
    try:
        wait_for_requests(front, 2000)
        done = run(mirror_command(dest.port, source_sock, "--wait", *mirror_extra), timeout=300)
        assert done.stdout.decode().rstrip().endswith("has control of the image"), done
        if follows:
            sock = tmp_path / "proxy.sock"
            front.wait_status(sock, lambda s: s["upstream"] == f"127.0.0.1:{dest.port}")
        wait_for_requests(front, requests_answered(front) + 2000)  # writing to the destination
    finally:
        report = report_of(client, stop_file)
    return report


def test_a_writer_with_16_in_flight_follows_a_ferry_migration_through_the_proxy(
    tmp_path: Path, stopping: Callable[[Any], Any]
) -> None:
    source, dest, source_image, dest_image, source_sock = ferry_pair(tmp_path)
    original = source_image.read_bytes()
    stopping(source)
    stopping(dest)
    # The proxy knows only the source; the source, handed off, says where the image went.
    front, sock = proxy(tmp_path, source.port, metrics=True)
    stopping(front)
    report = migrate_under_the_writer(tmp_path, front, dest, source_sock, "--action", "nothing")
    check_writes(report, dest_image.read_bytes(), original)
    status = front.status(sock)
    assert status["reconnects"] == "1" and status["requests_expired"] == "0", status
    events = [json.loads(line)["event"] for line in (tmp_path / "proxy.jsonl").open()]
    assert "redirected" in events and events.count("lost") == 1
    assert int(status["longest_pause_ms"]) > 0
    with urllib.request.urlopen(front.metrics_url(), timeout=10) as answer:
        text = answer.read()
    assert b"ferry_proxy_reconnects_total" in text
    check = run(["promtool", "check", "metrics"], input=text)
    assert check.stdout == b"" and check.stderr == b"", check
    assert front.stop() == 0
    assert replay(tmp_path / "proxy.jsonl") == ["proxy client-1 closed"]


def test_when_ferry_moves_the_proxys_server_connection_the_proxy_goes_on_unaware(
    tmp_path: Path, stopping: Callable[[Any], Any]
) -> None:
    # A source that can move its clients' connections moves the proxy's with the
    # image: the proxy loses nothing, waits for nothing and replays nothing.
    source, dest, source_image, dest_image, source_sock = ferry_pair(tmp_path, moving=True)
    original = source_image.read_bytes()
    stopping(source)
    stopping(dest)
    front, sock = proxy(tmp_path, source.port, metrics=True)
    stopping(front)
    report = migrate_under_the_writer(
        tmp_path, front, dest, source_sock, "--action", "nothing", follows=False
    )
    check_writes(report, dest_image.read_bytes(), original)
    status = front.status(sock)
    assert (status["reconnects"], status["requests_replayed"]) == ("0", "0"), status
    assert status["upstream"] == f"127.0.0.1:{source.port}"  # the same socket, now the dest's
    moved = parse_line(run([*FERRY, "status", "--sock", str(source_sock)]).stdout.decode())
    assert moved["connections_moved"] == "1", moved
    events = [json.loads(line)["event"] for line in (tmp_path / "proxy.jsonl").open()]
    assert "lost" not in events
    assert front.stop() == 0


def test_the_proxy_finds_the_image_through_an_etcd_lockspace(
    tmp_path: Path, etcd: EtcdServer, stopping: Callable[[Any], Any]
) -> None:
    space, resource = f"etcd:{etcd.url}", f"vm-{tmp_path.name}"
    source, dest, source_image, dest_image, source_sock = ferry_pair(
        tmp_path, "--lockspace", space, "--resource", resource
    )
    original = source_image.read_bytes()
    stopping(source)
    stopping(dest)
    front, sock = proxy(
        tmp_path, source.port, "--lockspace", space, "--resource", resource, metrics=True
    )
    stopping(front)
    # exit: the source is gone after the handoff; only the lockspace knows.
    report = migrate_under_the_writer(tmp_path, front, dest, source_sock, "--action", "exit")
    assert source.proc.wait(timeout=30) == 0
    check_writes(report, dest_image.read_bytes(), original)
    status = front.status(sock)
    assert status["reconnects"] == "1" and status["requests_expired"] == "0", status
    assert front.stop() == 0
