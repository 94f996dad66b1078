"""ferry's NBD client against real servers: nbdkit, qemu-nbd and nbd-server.

Each server runs as a child process on a free loopback port, started by a
fixture and terminated (then waited for) at teardown.  Readiness is polled
with a deadline, never slept on.  Every byte read back is compared with a
model of what the export must hold.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ferry.nbd.client import ClientConnection, handle_from_bytes
from ferry.nbd.constants import BlockState, Command, Errno, OptionReply, TransmissionFlag
from ferry.nbd.events import Extent, Negotiated, Reply
from ferry.remote import NegotiationError, RemoteError, RemoteExport, UnsupportedCommand
from support import accepts, free_port, listening, start_peer

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SIZE = 64 * MiB
HOST = "127.0.0.1"
START_DEADLINE = 20.0


@functools.cache
def _noise() -> bytes:
    return hashlib.shake_256(b"ferry remote peers").digest(SIZE)


def _pattern(offset: int, length: int) -> bytes:
    """What the test writes at ``offset``: pseudo-random, so a byte out of place shows.

    (A pattern of counters has zero bytes in most words, and a lost or
    shifted zero byte reads back as the zero that was there before.)
    """
    return _noise()[offset : offset + length]


@dataclass
class Server:
    """One server process and how to reach its export.

    ``command`` gives the argv for a port (and may write a config file).
    """

    name: str
    command: Callable[[int], list[str]]
    export_name: str
    log: Path
    probe: Callable[[int], bool] = accepts
    single_connection: bool = False  # nbd-server -d serves one client, then exits
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    connections: list[RemoteExport] = field(default_factory=list)

    def start(self) -> None:
        """Start on a free port; on another if someone took this one meanwhile."""
        self.proc, self.port = start_peer(
            self.command, self.log, probe=self.probe, deadline=START_DEADLINE
        )

    def connect(self, export_name: str | None = None) -> RemoteExport:
        if self.single_connection:
            self.stop()
            self.start()
        name = self.export_name if export_name is None else export_name
        remote = RemoteExport.connect(HOST, self.port, export_name=name, timeout=20)
        self.connections.append(remote)
        return remote

    def stop(self) -> None:
        for remote in self.connections:
            remote.close()
        self.connections.clear()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed: run scripts/install-deps.sh --test")


def _image(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


def _nbdkit(tmp_path: Path, *options: str, plugin: tuple[str, ...] = ("memory", "64M")) -> Server:
    _need("nbdkit")

    def command(port: int) -> list[str]:
        base = ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), "-i", HOST]
        return [*base, *options, *plugin]

    return Server("nbdkit", command, "", tmp_path / "nbdkit.log")


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Server]:
    server = _nbdkit(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Server]:
    _need("qemu-nbd")
    image = _image(tmp_path / "qemu.img")

    def command(port: int) -> list[str]:
        # -t: keep serving after a client leaves; -e 4: the readiness probe
        # and the test may overlap.
        argv = ["qemu-nbd", "-f", "raw", "-x", "ferry", "-t", "-e", "4"]
        return [*argv, "-p", str(port), "-b", HOST, str(image)]

    server = Server("qemu-nbd", command, "ferry", tmp_path / "qemu-nbd.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[Server]:
    _need("nbd-server")
    image = _image(tmp_path / "nbd-server.img")
    conf = tmp_path / "nbd-server.conf"

    def command(port: int) -> list[str]:
        conf.write_text(
            f"[generic]\nport = {port}\nlistenaddr = {HOST}\n"
            f"[ferry]\nexportname = {image}\ntrim = true\nflush = true\nfua = true\n"
        )
        return ["nbd-server", "-C", str(conf), "-d"]

    # With -d it serves exactly one client and exits, so probing by connecting
    # would use up the connection the test needs: ask the kernel instead, and
    # start a fresh process for every connection.
    server = Server(
        "nbd-server",
        command,
        "ferry",
        tmp_path / "nbd-server.log",
        probe=listening,
        single_connection=True,
    )
    yield server
    server.stop()


SERVERS = ["nbdkit", "qemu_nbd", "nbd_server"]


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> Server:
    fixture: Server = request.getfixturevalue(request.param)
    return fixture


class Model:
    """What the export must hold.  Bytes after a TRIM are unknown until rewritten."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.unknown: list[tuple[int, int]] = []

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.unknown = [
            piece
            for a, b in self.unknown
            for piece in ((a, min(b, offset)), (max(a, offset + len(data)), b))
            if piece[0] < piece[1]
        ]

    def trim(self, offset: int, length: int) -> None:
        self.unknown.append((offset, offset + length))

    def check(self, remote: RemoteExport, offset: int = 0, length: int = SIZE) -> None:
        actual = remote.pread(offset, length)
        expected = bytearray(self.data[offset : offset + length])
        for a, b in self.unknown:
            a, b = max(a, offset), min(b, offset + length)
            if a < b:
                expected[a - offset : b - offset] = actual[a - offset : b - offset]
        if actual != expected:
            first = next(i for i in range(length) if actual[i] != expected[i])
            pytest.fail(
                f"byte {offset + first:#x} reads {actual[first]:#04x}, "
                f"expected {expected[first]:#04x}"
            )


def _write(remote: RemoteExport, model: Model, offset: int, length: int, **kw: bool) -> None:
    data = _pattern(offset, length)
    remote.pwrite(data, offset, **kw)
    model.write(offset, data)


# Unaligned, tiny, crossing a MiB, spanning two 32 MiB requests, at the very end.
WRITES = [(0, 4096), (3 * 4096 + 123, 1000), (MiB - 7, 70_000), (20 * MiB + 5, 34 * MiB)]
WRITES += [(SIZE - 512, 512)]


def test_written_patterns_read_back_exactly(server: Server) -> None:
    remote = server.connect()
    assert remote.size == SIZE
    model = Model()
    for offset, length in WRITES:
        _write(remote, model, offset, length)
    for offset, length in WRITES:
        assert remote.pread(offset, length) == _pattern(offset, length)
    model.check(remote, 3 * 4096, 8192)  # written and unwritten bytes together
    if remote.flags & TransmissionFlag.SEND_FUA:
        _write(remote, model, 12 * MiB, 5000, fua=True)
    remote.flush()
    model.check(remote)

    # Another connection sees the same bytes (nbd-server gets a new process).
    remote.close()
    model.check(server.connect())


def test_trim_and_write_zeroes(server: Server) -> None:
    remote = server.connect()
    model = Model()
    _write(remote, model, MiB, 8 * MiB)
    remote.trim(2 * MiB, MiB)
    model.trim(2 * MiB, MiB)
    remote.write_zeroes(4 * MiB + 100, 2 * MiB)
    model.write(4 * MiB + 100, bytes(2 * MiB))
    remote.write_zeroes(7 * MiB, 4096, no_hole=True)
    model.write(7 * MiB, bytes(4096))
    if remote.flags & TransmissionFlag.SEND_FAST_ZERO:
        try:
            remote.write_zeroes(8 * MiB, 4096, fast_zero=True)
            model.write(8 * MiB, bytes(4096))
        except RemoteError as exc:  # allowed: "not fast here"
            assert exc.errno == Errno.ENOTSUP
    else:
        with pytest.raises(UnsupportedCommand):
            remote.write_zeroes(8 * MiB, 4096, fast_zero=True)
    remote.flush()
    model.check(remote, 0, 10 * MiB)
    _write(remote, model, 2 * MiB, MiB)  # what was trimmed is ours again
    assert model.unknown == []
    model.check(remote)


def test_block_status_of_sparse_and_written_areas(server: Server) -> None:
    remote = server.connect()
    if BASE := remote.negotiated.meta_contexts.get("base:allocation") is None:
        assert not remote.negotiated.structured_replies, BASE
        with pytest.raises(UnsupportedCommand):
            remote.block_status(0, MiB)
        return
    data_start, data_end = 8 * MiB, 8 * MiB + 64 * 1024
    remote.pwrite(_pattern(data_start, data_end - data_start), data_start)
    extents = remote.block_status(0, SIZE)
    assert sum(e.length for e in extents) == SIZE
    position = 0
    for extent in extents:
        end = position + extent.length
        if position < data_end and end > data_start:
            assert not extent.flags & BlockState.ZERO, (position, extent)
        position = end

    sparse = remote.block_status(32 * MiB, 32 * MiB)
    assert sum(e.length for e in sparse) == 32 * MiB
    # Both servers here know an unwritten area is a hole that reads as zero.
    assert all(e.flags == BlockState.HOLE | BlockState.ZERO for e in sparse), sparse

    edge = remote.block_status(data_start - 100, 200)
    assert sum(e.length for e in edge) == 200
    assert not edge[-1].flags & BlockState.ZERO


def test_cache_where_advertised(server: Server) -> None:
    remote = server.connect()
    if remote.flags & TransmissionFlag.SEND_CACHE:
        remote.cache(0, 4 * MiB)
    else:
        with pytest.raises(UnsupportedCommand):
            remote.cache(0, 4 * MiB)


def test_out_of_range_read_is_an_error_and_the_connection_goes_on(server: Server) -> None:
    remote = server.connect()
    with pytest.raises(RemoteError) as caught:
        remote.pread(SIZE - 10, 20)
    assert caught.value.errno == Errno.EINVAL
    assert remote.pread(SIZE - 10, 10) == bytes(10)


def test_flexnbd_mirror_handle_round_trips(server: Server) -> None:
    """The sans-IO client straight on a socket, with flexnbd's handle."""
    server.connect().close()  # make sure an nbd-server process is up for us
    if server.single_connection:
        server.stop()
        server.start()
    conn = ClientConnection(server.export_name)
    mirror = handle_from_bytes(b".MIRROR.")
    with socket.create_connection((HOST, server.port), timeout=20) as sock:
        negotiated = None
        while negotiated is None:
            for event in conn.receive_data(sock.recv(65536)):
                assert isinstance(event, Negotiated), event
                negotiated = event
            sock.sendall(conn.data_to_send())
        conn.request(Command.WRITE, 4096, data=b"m" * 512, handle=mirror)
        conn.request(Command.READ, 4096, 512, handle=7)
        sock.sendall(conn.data_to_send())
        replies: list[Reply] = []
        while len(replies) < 2:
            replies += [e for e in conn.receive_data(sock.recv(65536)) if isinstance(e, Reply)]
        assert sorted((r.handle, r.error) for r in replies) == [(7, 0), (mirror, 0)]
        conn.request(Command.DISC)
        sock.sendall(conn.data_to_send())
        assert sock.recv(1) == b""  # the server hangs up after DISC
    assert conn.receive_data(b"") == []


# -- server-specific behaviour ----------------------------------------------------


def test_missing_export_is_refused_with_the_server_message(qemu_nbd: Server) -> None:
    with pytest.raises(NegotiationError) as caught:
        qemu_nbd.connect("no-such-export")
    assert caught.value.error == OptionReply.ERR_UNKNOWN
    assert "no-such-export" in caught.value.message


def test_read_errors_are_reported_and_the_connection_survives(tmp_path: Path) -> None:
    options = ("--filter=error",)
    plugin = ("memory", "64M", "error-pread=EIO", "error-pread-rate=100%")
    server = _nbdkit(tmp_path, *options, plugin=plugin)
    server.start()
    try:
        remote = server.connect()
        with pytest.raises(RemoteError) as caught:
            remote.pread(0, 40 * MiB)  # two pipelined requests, both fail
        assert caught.value.errno == Errno.EIO
        remote.pwrite(b"still here", 0)
        remote.flush()
    finally:
        server.stop()


def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    server = _nbdkit(tmp_path, "-r")
    server.start()
    try:
        remote = server.connect()
        assert remote.flags & TransmissionFlag.READ_ONLY
        with pytest.raises(RemoteError) as caught:
            remote.pwrite(b"x", 0)
        assert caught.value.errno == Errno.EPERM
        assert remote.pread(0, 4) == bytes(4)
    finally:
        server.stop()


@pytest.mark.parametrize("option", ["--oldstyle", "--no-sr"])
def test_nbdkit_without_structured_replies(tmp_path: Path, option: str) -> None:
    server = _nbdkit(tmp_path, option)
    server.start()
    try:
        remote = server.connect()
        assert remote.negotiated.oldstyle == (option == "--oldstyle")
        assert not remote.negotiated.structured_replies
        model = Model()
        _write(remote, model, 100, 33 * MiB)
        model.check(remote, 0, 40 * MiB)
        with pytest.raises(RemoteError):
            remote.pread(SIZE, 1)
        model.check(remote, 0, 4096)  # simple replies stay in step after an error
        with pytest.raises(UnsupportedCommand):
            remote.block_status(0, 4096)
    finally:
        server.stop()


def test_connection_refused_is_a_clear_connection_error() -> None:
    port = free_port()  # nothing listens there now
    with pytest.raises(ConnectionError, match=f"cannot connect to NBD server {HOST}:{port}"):
        RemoteExport.connect(HOST, port, timeout=5)


# -- a scripted server, for what real ones will not do on demand ----------------
#
# It speaks just enough fixed newstyle to agree structured replies and
# base:allocation, then hands each batch of requests to the test's script.
# Frames are built here from the protocol document, not from ferry's code.

FAKE_CONTEXT = 5


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            raise EOFError(f"client hung up {len(out)} bytes into {n}")
        out += piece
    return out


@dataclass
class FakeRequest:
    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes


@dataclass
class FakeServer:
    """Serve one client on one end of a socketpair, from a thread."""

    script: Callable[[FakeServer, socket.socket], None]
    max_block_size: int = 32 * MiB
    tflags: int = 0b1111_0110_1101
    seen: list[FakeRequest] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def join(self) -> None:
        """Wait for the script to end (the client must have hung up) and re-raise its failure."""
        if self.thread is not None:
            self.thread.join(timeout=20)
            assert not self.thread.is_alive(), "the fake server is still running"
        if self.error is not None:
            raise self.error

    def run(self, sock: socket.socket) -> None:
        try:
            with sock:
                self._handshake(sock)
                self.script(self, sock)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def _handshake(self, sock: socket.socket) -> None:
        sock.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 1))
        assert _recv_exactly(sock, 4) == struct.pack(">I", 1)
        while True:
            magic, option, length = struct.unpack(">QII", _recv_exactly(sock, 16))
            assert magic == 0x49484156454F5054
            _recv_exactly(sock, length)
            if option == 8:
                sock.sendall(self._rep(8, 1))
            elif option == 10:
                name = struct.pack(">I", FAKE_CONTEXT) + b"base:allocation"
                sock.sendall(self._rep(10, 4, name) + self._rep(10, 1))
            elif option == 7:
                export = struct.pack(">HQH", 0, SIZE, self.tflags)
                sizes = struct.pack(">HIII", 3, 1, 4096, self.max_block_size)
                sock.sendall(self._rep(7, 3, export) + self._rep(7, 3, sizes) + self._rep(7, 1))
                return
            else:
                raise AssertionError(f"unexpected option {option}")

    @staticmethod
    def _rep(option: int, rtype: int, payload: bytes = b"") -> bytes:
        return struct.pack(">QIII", 0x3E889045565A9, option, rtype, len(payload)) + payload

    def next_request(self, sock: socket.socket) -> FakeRequest:
        magic, flags, command, handle, offset, length = struct.unpack(
            ">IHHQQI", _recv_exactly(sock, 28)
        )
        assert magic == 0x25609513
        data = _recv_exactly(sock, length) if command == 1 else b""
        request = FakeRequest(command, flags, handle, offset, length, data)
        self.seen.append(request)
        return request


def _chunk(handle: int, rtype: int, payload: bytes = b"", done: bool = True) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, int(done), rtype, handle, len(payload)) + payload


def _simple(handle: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", 0x67446698, error, handle)


@pytest.fixture
def fake() -> Iterator[Callable[..., tuple[RemoteExport, FakeServer]]]:
    started: list[tuple[FakeServer, RemoteExport]] = []

    def start(
        script: Callable[[FakeServer, socket.socket], None], max_block_size: int = 32 * MiB
    ) -> tuple[RemoteExport, FakeServer]:
        ours, theirs = socket.socketpair()
        theirs.settimeout(20)
        server = FakeServer(script, max_block_size)
        server.thread = threading.Thread(target=server.run, args=(theirs,), daemon=True)
        server.thread.start()
        remote = RemoteExport.from_socket(ours, timeout=20, peer="fake")
        started.append((server, remote))
        return remote, server

    yield start
    for server, remote in started:
        remote.close()
        server.join()


def test_large_reads_are_split_and_pipelined(
    fake: Callable[..., tuple[RemoteExport, FakeServer]],
) -> None:
    def script(server: FakeServer, sock: socket.socket) -> None:
        # All four requests must arrive before any answer: they are pipelined.
        batch = [server.next_request(sock) for _ in range(4)]
        for request in reversed(batch):  # and answers may come in any order
            body = struct.pack(">Q", request.offset) + _pattern(request.offset, request.length)
            sock.sendall(_chunk(request.handle, 1, body))
        assert server.next_request(sock).command == Command.DISC

    remote, server = fake(script, max_block_size=65536)
    assert remote.pread(1000, 200_000) == _pattern(1000, 200_000)
    remote.close()
    server.join()
    assert [(r.offset, r.length) for r in server.seen[:4]] == [
        (1000, 65536),
        (1000 + 65536, 65536),
        (1000 + 2 * 65536, 65536),
        (1000 + 3 * 65536, 200_000 - 3 * 65536),
    ]


def test_large_writes_are_split_and_land_in_place(
    fake: Callable[..., tuple[RemoteExport, FakeServer]],
) -> None:
    image = bytearray(SIZE)

    def script(server: FakeServer, sock: socket.socket) -> None:
        while (request := server.next_request(sock)).command == Command.WRITE:
            assert request.length <= 4096
            image[request.offset : request.offset + request.length] = request.data
            sock.sendall(_simple(request.handle))

    remote, server = fake(script, max_block_size=4096)
    remote.pwrite(_pattern(123, 50_000), 123)
    remote.close()
    server.join()
    assert image[123 : 123 + 50_000] == _pattern(123, 50_000)
    assert image[:123] == bytes(123)
    assert len(server.seen) == 50_000 // 4096 + 1 + 1  # the writes and DISC


def test_after_an_error_nothing_more_is_sent(
    fake: Callable[..., tuple[RemoteExport, FakeServer]],
) -> None:
    def script(server: FakeServer, sock: socket.socket) -> None:
        window = [server.next_request(sock) for _ in range(16)]
        sock.sendall(_chunk(window[0].handle, 2**15 + 1, struct.pack(">IH", 28, 4) + b"full"))
        for request in window[1:]:
            sock.sendall(_simple(request.handle))
        assert server.next_request(sock).command == Command.DISC

    remote, server = fake(script, max_block_size=4096)
    with pytest.raises(RemoteError) as caught:
        remote.pwrite(bytes(4096 * 40), 0)
    assert (caught.value.errno, caught.value.message) == (Errno.ENOSPC, "full")
    remote.close()
    server.join()
    assert len(server.seen) == 17  # one window of writes, then DISC


def test_block_status_asks_again_and_merges(
    fake: Callable[..., tuple[RemoteExport, FakeServer]],
) -> None:
    def script(server: FakeServer, sock: socket.socket) -> None:
        while (request := server.next_request(sock)).command == Command.BLOCK_STATUS:
            flags = 0 if request.offset < 8192 else 3  # data, then a hole
            # One 4 KiB extent per answer, whatever was asked.
            body = struct.pack(">III", FAKE_CONTEXT, 4096, flags)
            sock.sendall(_chunk(request.handle, 5, body))

    remote, server = fake(script)
    assert remote.block_status(0, 16384) == [
        Extent(8192, BlockState.DATA),
        Extent(8192, BlockState.HOLE | BlockState.ZERO),
    ]
    remote.close()
    server.join()
    asked = [(r.offset, r.length) for r in server.seen if r.command == Command.BLOCK_STATUS]
    assert asked == [(0, 16384), (4096, 12288), (8192, 8192), (12288, 4096)]


def test_server_hanging_up_mid_request_is_a_connection_error(
    fake: Callable[..., tuple[RemoteExport, FakeServer]],
) -> None:
    def script(server: FakeServer, sock: socket.socket) -> None:
        server.next_request(sock)

    remote, _ = fake(script)
    with pytest.raises(ConnectionError, match="1 request"):
        remote.flush()
    with pytest.raises(ConnectionError, match="closed"):
        remote.flush()


def test_eshutdown_makes_the_client_disconnect(
    fake: Callable[..., tuple[RemoteExport, FakeServer]],
) -> None:
    def script(server: FakeServer, sock: socket.socket) -> None:
        sock.sendall(_simple(server.next_request(sock).handle, 108))
        assert server.next_request(sock).command == Command.DISC

    remote, _ = fake(script)
    with pytest.raises(RemoteError) as caught:
        remote.flush()
    assert caught.value.errno == Errno.ESHUTDOWN
    with pytest.raises(ConnectionError):
        remote.pread(0, 1)
