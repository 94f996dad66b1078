"""Mirror a live export into real NBD servers (qemu-nbd, nbdkit file) with action nothing.

The source is an in-process :class:`ferry.serve.export.Export` over a
64 MiB sparse image with data in a few places; the destination is a real
server process on a sparse file of the same size.  Afterwards the two files
are byte-identical, only the source's data went as WRITE (holes went as
WRITE_ZEROES), and the destination file is still sparse.  The servers are
polled for readiness through the kernel's socket table (no connection is
spent on it), with a deadline; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from fakes.gate import FakeGate
from ferry import statecharts
from ferry.clock import ReactorClock
from ferry.migrate.options import Destination, FinishAction, MirrorOptions
from ferry.migrate.source import MirrorSource
from ferry.migrate.wire import tcp_connector
from ferry.replay import replay
from ferry.serve.export import Export
from ferry.storage import Image
from ferry.trace import Tracer, TraceRecord
from support import start_peer, stop_peer

pytestmark = pytest.mark.integration

reactor: Any = _reactor
MiB = 1024 * 1024
SIZE = 64 * MiB
HOST = "127.0.0.1"
DEADLINE = 20.0
# Data regions of the source image (offset, length); the rest is holes.
REGIONS = [(0, 8 * MiB), (20 * MiB + 4096, MiB), (40 * MiB, 5 * MiB), (SIZE - 4096, 4096)]


def _sparse(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


Target = tuple[Path, int, str]  # destination file, port, export name


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Target]:
    image = _sparse(tmp_path / "qemu-dest.img")

    def argv(port: int) -> list[str]:
        # --discard=unmap: a WRITE_ZEROES without NO_HOLE may punch holes.
        return ["qemu-nbd", "-f", "raw", "-x", "ferry", "-t", "--discard=unmap",
                "-p", str(port), "-b", HOST, str(image)]  # fmt: skip

    proc, port = start_peer(argv, tmp_path / "qemu-nbd.log")
    yield image, port, "ferry"
    stop_peer(proc)


@pytest.fixture
def nbdkit_file(tmp_path: Path) -> Iterator[Target]:
    image = _sparse(tmp_path / "nbdkit-dest.img")

    def argv(port: int) -> list[str]:
        return ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), "-i", HOST,
                "file", str(image)]  # fmt: skip

    proc, port = start_peer(argv, tmp_path / "nbdkit.log")
    yield image, port, ""
    stop_peer(proc)


def _source_image(path: Path) -> Image:
    _sparse(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in REGIONS:
            seed = offset.to_bytes(8, "big")
            os.pwrite(fd, hashlib.shake_256(seed).digest(length), offset)
    finally:
        os.close(fd)
    return Image.open(path)


async def _mirror(tmp_path: Path, target: Target) -> None:
    dest_path, port, name = target
    image = _source_image(tmp_path / "source.img")
    clock = ReactorClock(reactor)
    records: list[TraceRecord] = []
    tracer = Tracer(records.append)
    export = Export("disk", image, clock=clock, tracer=tracer)
    export.trigger("serve")
    source = MirrorSource(
        export,
        Destination(HOST, port, export_name=name),
        gate=FakeGate(export, clock),
        clock=clock,
        connector=tcp_connector(reactor),
        options=MirrorOptions(action=FinishAction.NOTHING),
        tracer=tracer,
    )
    outcome = await source.start().addTimeout(DEADLINE, reactor)
    assert outcome.reply == "0: Mirror started" and outcome.plain_target
    result = await source.finished.addTimeout(DEADLINE, reactor)
    assert (result.state, result.handed_off) == ("completed", False)
    assert export.state == "serving" and export.has_control

    assert dest_path.read_bytes() == (tmp_path / "source.img").read_bytes()
    data = sum(e.length for e in image.extents(0, SIZE) if not e.hole)
    assert data == sum(length for _, length in REGIONS)
    # Only the data went as data; the holes as WRITE_ZEROES.
    assert source.counters.data_bytes == data
    assert source.counters.zero_bytes == SIZE - data
    # And the destination stayed sparse (a little slack for file-system rounding).
    assert _allocated(dest_path) <= data + 2 * MiB
    replay([r.to_json() for r in records], statecharts.load_all())


@pytest_twisted.ensureDeferred
async def test_mirror_into_qemu_nbd(tmp_path: Path, qemu_nbd: Target) -> None:
    await _mirror(tmp_path, qemu_nbd)


@pytest_twisted.ensureDeferred
async def test_mirror_into_nbdkit_file(tmp_path: Path, nbdkit_file: Target) -> None:
    await _mirror(tmp_path, nbdkit_file)
