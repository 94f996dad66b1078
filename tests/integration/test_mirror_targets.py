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
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from fakes.gate import FakeGate
from ferry import statecharts
from ferry.clock import ReactorClock
from ferry.migrate.source import (
    Destination,
    FinishAction,
    MirrorOptions,
    MirrorSource,
    tcp_connector,
)
from ferry.serve.export import Export
from ferry.storage import Image
from ferry.trace import Tracer, TraceRecord, replay

pytestmark = pytest.mark.integration

reactor: Any = _reactor
MiB = 1024 * 1024
SIZE = 64 * MiB
HOST = "127.0.0.1"
DEADLINE = 20.0
# Data regions of the source image (offset, length); the rest is holes.
REGIONS = [(0, 8 * MiB), (20 * MiB + 4096, MiB), (40 * MiB, 5 * MiB), (SIZE - 4096, 4096)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "0A":
                return True
    return False


def _sparse(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _start(argv_for: Callable[[int], list[str]], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    for _ in range(3):
        port = _free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv_for(port), stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if _listening(port):
                return proc, port
            try:
                proc.wait(timeout=0.02)  # the pause doubles as a liveness check
            except subprocess.TimeoutExpired:
                continue
            break  # it exited: most likely the port was taken
        else:
            proc.kill()
            raise RuntimeError(f"{argv_for(port)[0]} not ready in {DEADLINE} s")
    raise RuntimeError(f"{argv_for(0)[0]} never listened: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


Target = tuple[Path, int, str]  # destination file, port, export name


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Target]:
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is not installed")
    image = _sparse(tmp_path / "qemu-dest.img")

    def argv(port: int) -> list[str]:
        # --discard=unmap: a WRITE_ZEROES without NO_HOLE may punch holes.
        return ["qemu-nbd", "-f", "raw", "-x", "ferry", "-t", "--discard=unmap",
                "-p", str(port), "-b", HOST, str(image)]  # fmt: skip

    proc, port = _start(argv, tmp_path / "qemu-nbd.log")
    yield image, port, "ferry"
    _stop(proc)


@pytest.fixture
def nbdkit_file(tmp_path: Path) -> Iterator[Target]:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    image = _sparse(tmp_path / "nbdkit-dest.img")

    def argv(port: int) -> list[str]:
        return ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), "-i", HOST,
                "file", str(image)]  # fmt: skip

    proc, port = _start(argv, tmp_path / "nbdkit.log")
    yield image, port, ""
    _stop(proc)


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
