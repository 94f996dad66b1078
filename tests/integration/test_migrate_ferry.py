"""A live migration between two ferry exports, both real NBD servers on loopback.

The source serves a 64 MiB sparse image with random data in a few regions;
the destination is a listening export on an empty sparse file (what
``ferry listen`` runs, built in-process until the CLI has it).  While
:class:`MirrorSource` moves the image, a real NBD client (``RemoteExport``,
in a thread) writes a checkable pattern to the source: every 4 KiB block it
writes carries its own offset and a counter that grows with every write.

Afterwards the destination file equals the source file byte for byte, it
holds every acknowledged write (a block's counter is at least the last one
acknowledged for it), the source is ``handed_off`` and the destination
``serving`` with control, both traces replay, and real clients (``nbdinfo``,
``qemu-io``) read the destination on the very port the migration came in on.
Every wait is a Deferred with a deadline; nothing sleeps.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred

from ferry import statecharts
from ferry.clock import ReactorClock
from ferry.migrate.destination import Receiver
from ferry.migrate.options import Destination, FinishAction, MirrorOptions
from ferry.migrate.source import MirrorSource
from ferry.migrate.wire import tcp_connector
from ferry.remote import RemoteExport
from ferry.replay import replay
from ferry.serve.export import Export
from ferry.serve.server import NBDServer
from ferry.storage import Image
from ferry.trace import CREATED, Tracer, TraceRecord

pytestmark = pytest.mark.integration

reactor: Any = _reactor
MiB = 1024 * 1024
SIZE = 64 * MiB
BLOCK = 4096
HOST = "127.0.0.1"
DEADLINE = 60.0
# Random data regions of the source image (offset, length); the rest is holes.
REGIONS = [(0, 8 * MiB), (20 * MiB + 4096, MiB), (40 * MiB, 5 * MiB), (SIZE - 4096, 4096)]
_STAMP = struct.Struct(">QQ")  # offset, counter: repeated to fill a block
_HEXDUMP = re.compile(r"^[0-9a-f]{8}:  ((?:[0-9a-f]{2} )+)", re.MULTILINE)  # qemu-io read -v


def within(d: Deferred[Any]) -> Deferred[Any]:
    return d.addTimeout(DEADLINE, reactor)


def run_blocking(work: Callable[[], object]) -> Deferred[Any]:
    return threads.deferToThread(work)


def block(offset: int, counter: int) -> bytes:
    return _STAMP.pack(offset, counter) * (BLOCK // _STAMP.size)


def _sparse(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@dataclass
class Node:
    """One export behind an NBDServer on a loopback port, with its own trace."""

    export: Export
    server: NBDServer
    port: int
    tracer: Tracer
    records: list[TraceRecord] = field(default_factory=list)
    listening: Any = None

    def roles(self) -> list[str]:
        return [r.dest for r in self.records if r.machine == "role" and r.ok and r.event != CREATED]

    def replays(self) -> None:
        result = replay([r.to_json() for r in self.records], statecharts.load_all())
        assert result.final_states[("role", "disk")] == self.export.state


@pytest.fixture
def start_node() -> Iterator[Callable[[Path, str, ReactorClock], Node]]:
    """Starts nodes; stops their ports and closes their images after the test."""
    nodes: list[Node] = []

    def start(path: Path, role: str, clock: ReactorClock) -> Node:
        records: list[TraceRecord] = []
        tracer = Tracer(records.append)
        export = Export("disk", Image.open(path), clock=clock, tracer=tracer)
        export.trigger(role)
        server = NBDServer(
            [export],
            clock=clock,
            run_blocking=run_blocking,
            receiver=Receiver(run_blocking=run_blocking, clock=clock),
        )
        listening = reactor.listenTCP(0, server, interface=HOST)
        node = Node(export, server, listening.getHost().port, tracer, records, listening)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.listening.stopListening()
        for connection in list(node.server.connections):
            connection.disconnect("the test is over")
        node.export.image.close()


class Writer:
    """A real NBD client of the source writing stamped blocks until it is cut off.

    ``sent`` and ``acked`` hold, per block offset, the counter of the last
    write sent and the last one acknowledged.  ``warm`` fires (on the
    reactor) once ``warm_after`` writes have been acknowledged.
    """

    def __init__(self, port: int, warm_after: int = 50) -> None:
        self.port = port
        self.sent: dict[int, int] = {}
        self.acked: dict[int, int] = {}
        self.count = 0
        self.warm: Deferred[None] = Deferred()
        self._warm_after = warm_after
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> str:
        rng = random.Random(1234)
        counter = 0
        remote = RemoteExport.connect(HOST, self.port, timeout=DEADLINE)
        try:
            while not self._stop.is_set():
                counter += 1
                offset = rng.randrange(SIZE // BLOCK) * BLOCK
                self.sent[offset] = counter
                remote.pwrite(block(offset, counter), offset)
                self.acked[offset] = counter
                self.count += 1
                if self.count == self._warm_after:
                    reactor.callFromThread(self.warm.callback, None)
        except ConnectionError as exc:  # the handoff disconnects the source's clients
            return f"disconnected: {exc}"
        finally:
            remote.close()
        return "stopped"


def _source_image(path: Path) -> Image:
    _sparse(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in REGIONS:
            os.pwrite(fd, os.urandom(length), offset)
    finally:
        os.close(fd)
    return Image.open(path)


def _run(argv: list[str]) -> Deferred[subprocess.CompletedProcess[str]]:
    # In a thread: the reactor must go on serving the client it starts.
    return threads.deferToThread(
        subprocess.run, argv, capture_output=True, text=True, timeout=DEADLINE
    )


@pytest_twisted.ensureDeferred
async def test_a_live_migration_to_a_ferry_listener(
    tmp_path: Path, start_node: Callable[[Path, str, ReactorClock], Node]
) -> None:
    clock = ReactorClock(reactor)
    src_path = tmp_path / "source.img"
    _source_image(src_path).close()
    dst_path = _sparse(tmp_path / "dest.img")
    source = start_node(src_path, "serve", clock)
    dest = start_node(dst_path, "listen", clock)
    writer = Writer(source.port)
    writing = threads.deferToThread(writer.run)
    try:
        await within(writer.warm)
        assert dest.export.state == "listening" and not dest.export.has_control

        mirror = MirrorSource(
            source.export,
            Destination(HOST, dest.port),
            gate=source.export,
            clock=clock,
            connector=tcp_connector(reactor),
            options=MirrorOptions(action=FinishAction.NOTHING),
            tracer=source.tracer,
        )
        written_at_start = writer.count
        outcome = await within(mirror.start())
        assert outcome.reply == "0: Mirror started" and not outcome.plain_target
        assert dest.export.state == "receiving"
        result = await within(mirror.finished)
        assert (result.state, result.handed_off) == ("completed", True), result
        ended = await within(writing)
    finally:
        writer.stop()
    assert ended.startswith("disconnected"), ended
    assert writer.count > written_at_start  # it really wrote while the image moved

    # Roles: the source handed the image over; the destination took it.
    assert source.export.state == "handed_off" and not source.export.has_control
    assert dest.export.state == "serving" and dest.export.has_control
    assert dest.export.clients_allowed
    assert dest.roles() == ["listening", "receiving", "committing", "serving"]
    assert source.roles() == ["serving", "migrating", "quiescing", "handing_off", "handed_off"]
    source.replays()
    dest.replays()

    # The data: byte for byte, every acknowledged write there, holes kept.
    dest.export.image.flush()
    dst = dst_path.read_bytes()
    assert dst == src_path.read_bytes()
    for offset, acked in writer.acked.items():
        stamp_offset, counter = _STAMP.unpack_from(dst, offset)
        assert dst[offset : offset + BLOCK] == block(stamp_offset, counter)
        assert stamp_offset == offset and acked <= counter <= writer.sent[offset]
    assert _allocated(dst_path) <= _allocated(src_path) + 2 * MiB

    # Real clients on the port the migration came in on, same process.
    for tool in ("nbdinfo", "nbdcopy", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/install-deps.sh --test")
    uri = f"nbd://{HOST}:{dest.port}/"
    info = await within(_run(["nbdinfo", "--size", uri]))
    assert info.returncode == 0, info.stderr
    assert int(info.stdout) == SIZE
    copy = tmp_path / "copy.img"
    copied = await within(_run(["nbdcopy", uri, str(copy)]))
    assert copied.returncode == 0, copied.stderr
    assert copy.read_bytes() == dst
    offset, counter = max(writer.acked.items(), key=lambda item: item[1])
    read = await within(_run(["qemu-io", "-r", "-f", "raw", uri, "-c", f"read -v {offset} 32"]))
    assert read.returncode == 0, read.stderr
    dumped = bytes.fromhex("".join(m.group(1) for m in _HEXDUMP.finditer(read.stdout)))
    assert dumped == dst[offset : offset + 32]
    stamp_offset, stamp_counter = _STAMP.unpack_from(dumped)
    assert stamp_offset == offset and stamp_counter >= counter
    assert dest.export.stats.connections >= 3  # all three, served after the commit


def _role_reached(node: Node, state: str) -> Deferred[None]:
    """Fires (on the next reactor turn) once ``node``'s role enters ``state``."""
    d: Deferred[None] = Deferred()
    if node.export.state == state:
        d.callback(None)
        return within(d)

    def sink(record: TraceRecord) -> None:
        if record.machine == "role" and record.dest == state and record.ok and not d.called:
            unsubscribe()
            reactor.callLater(0, d.callback, None)

    unsubscribe = node.tracer.subscribe(sink)
    return within(d)


@pytest_twisted.ensureDeferred
async def test_a_broken_migration_leaves_the_listener_listening_for_the_next(
    tmp_path: Path, start_node: Callable[[Path, str, ReactorClock], Node]
) -> None:
    clock = ReactorClock(reactor)
    src_path = tmp_path / "source.img"
    _source_image(src_path).close()
    dst_path = _sparse(tmp_path / "dest.img")
    source = start_node(src_path, "serve", clock)
    dest = start_node(dst_path, "listen", clock)
    tracer = source.tracer

    def mirror(**options: Any) -> MirrorSource:
        return MirrorSource(
            source.export,
            Destination(HOST, dest.port),
            gate=source.export,
            clock=clock,
            connector=tcp_connector(reactor),
            options=MirrorOptions(action=FinishAction.NOTHING, **options),
            tracer=tracer,
        )

    # A slow first attempt, broken in the middle of its bulk pass.
    first = mirror(max_bps=4 * MiB)
    assert (await within(first.start())).ok
    assert first.state == "bulk_pass" and dest.export.state == "receiving"
    first.cancel()
    assert source.export.state == "serving"
    await within(first.finished)
    await _role_reached(dest, "listening")
    assert not dest.export.has_control and dest.export.sender is None
    assert dst_path.read_bytes() != src_path.read_bytes()  # it had only part of the image

    # The next sender starts over and completes.
    second = mirror()
    assert (await within(second.start())).ok
    result = await within(second.finished)
    assert (result.state, result.handed_off) == ("completed", True)
    assert dest.export.state == "serving" and dest.export.has_control
    assert dst_path.read_bytes() == src_path.read_bytes()
    assert dest.roles() == [
        "listening",
        "receiving",
        "listening",
        "receiving",
        "committing",
        "serving",
    ]
    dest.replays()
    source.replays()
