"""WRITEs on the event loop: where the kernel takes a write without waiting (XFS), it is
written at once, with no worker thread, and every other promise still holds.

A real libnbd client keeps 64 writes in flight, most of them overlapping
others still in flight, while the file's times are looked at all the time
(so that many writes must wait, and go to a thread): what the image holds
must be what the writes give one after the other, byte for byte.  Every
interleaving of the two paths is drawn in tests/unit/test_serve_ordering.py;
this is the same promise kept with real sockets, threads and XFS.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import FerryProcess, serve, sparse_file

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with the libnbd bindings
BLOCK = 4096
BLOCKS = 64  # few enough that writes in flight overlap all the time
SIZE = BLOCKS * BLOCK
ROUNDS = 12

# argv: URI, then a JSON list of [offset, length, byte]; sends them all, 64 in flight.
PIPELINED = """
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
errors = []
def done(n, error):
    if error.value:
        errors.append((n, error.value))
    return 1
for n, (offset, length, byte) in enumerate(json.loads(sys.argv[2])):
    while h.aio_in_flight() >= 64:
        h.poll(1000)
    buf = nbd.Buffer.from_bytearray(bytearray([byte]) * length)
    h.aio_pwrite(buf, offset, completion=lambda error, n=n: done(n, error))
while h.aio_in_flight():
    h.poll(1000)
h.flush()
h.shutdown()
print(json.dumps({"errors": errors}), flush=True)
"""


def writes(seed: int, count: int) -> list[tuple[int, int, int]]:
    """``count`` writes of one to four blocks at random places, each of its own byte.

    Every block is written first, so that no round's end shows an earlier round's.
    """
    rng = random.Random(seed)
    out = [(0, SIZE, 255)]
    for n in range(count):
        blocks = rng.randint(1, 4)
        first = rng.randrange(BLOCKS - blocks + 1)
        out.append((first * BLOCK, blocks * BLOCK, n % 254 + 1))
    return out


def one_after_the_other(batch: list[tuple[int, int, int]]) -> bytes:
    image = bytearray(SIZE)
    for offset, length, byte in batch:
        image[offset : offset + length] = bytes([byte]) * length
    return bytes(image)


def requests(process: FerryProcess, series: str) -> float:
    """The WRITEs counted in ``series`` on ``process``'s /metrics (0 if it has none)."""
    text = urllib.request.urlopen(process.metrics_url(), timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == series and sample.labels == {"export": "disk", "command": "WRITE"}:
                return sample.value
    return 0.0


def write_all(process: FerryProcess, batch: list[tuple[int, int, int]]) -> None:
    client = subprocess.run(
        [SYSTEM_PYTHON, "-c", PIPELINED, process.uri("disk"), json.dumps(batch)],
        capture_output=True,
        timeout=120,
    )
    assert client.returncode == 0, client.stderr.decode()
    assert json.loads(client.stdout) == {"errors": []}


def test_pipelined_overlapping_writes_go_at_once_and_land_in_their_order(xfs_dir: Path) -> None:
    image = sparse_file(xfs_dir / "disk.img", SIZE)
    process = serve(image, "--name", "disk", "--metrics", "127.0.0.1:0")
    # Someone looking at the file's times makes the next write change them, which XFS
    # does not do without waiting: that write goes to a thread, and the writes after
    # it that overlap it must wait for it there.
    done = threading.Event()
    looking = threading.Thread(target=lambda: [image.stat() for _ in iter(done.is_set, True)])
    looking.start()
    sent = 0
    try:
        for seed in range(ROUNDS):  # each round's end is checked: what it shows is its last writes
            batch = writes(seed, count=1000)
            write_all(process, batch)
            sent += len(batch)
            assert image.read_bytes() == one_after_the_other(batch), f"round {seed}"
    finally:
        done.set()
        looking.join()
    at_once = requests(process, "ferry_requests_at_once_total")
    assert requests(process, "ferry_requests_total") == sent
    assert process.stop() == 0
    # Many go at once; one that overlaps a write still on a thread waits for it there.
    assert 0 < at_once < sent


def test_where_the_kernel_refuses_every_write_goes_to_a_thread(tmp_path: Path) -> None:
    """tmpfs, like ext4, refuses RWF_NOWAIT for buffered writes: nothing is written at once."""
    shm = Path("/dev/shm")
    image = sparse_file(shm / f"ferry-at-once-{tmp_path.name}.img", SIZE)
    try:
        process = serve(image, "--name", "disk", "--metrics", "127.0.0.1:0")
        batch = writes(seed=8, count=500)
        write_all(process, batch)
        assert requests(process, "ferry_requests_at_once_total") == 0
        assert requests(process, "ferry_requests_total") == len(batch)
        assert process.stop() == 0
        assert image.read_bytes() == one_after_the_other(batch)
    finally:
        image.unlink()
