"""A checkable NBD write workload, run as a real libnbd client.

Run under Debian's Python (``/usr/bin/python3 tests/workload.py URI ...``):
it uses libnbd's bindings, not ferry's client, so the migration tests are
checked by a client ferry did not write.

Client K of N owns the blocks whose index is K mod N.  Every write fills a
whole block with a record (magic, block offset, client, counter) repeated,
so a reader can tell, for each block, which write it holds.  The client
writes until the stop file appears or the server goes away, then prints one
JSON object: the last acknowledged counter of each block it wrote, the
counters it sent without an answer, and how it ended.

An optional sixth argument, DEPTH, keeps that many writes in flight at once
(libnbd's aio calls), never two to the same block, so a block still holds
the last acknowledged write or a later unanswered one.  The report then
also has ``max_latency``: the longest any write took, in seconds.

Both reports carry ``local_start`` and ``local_end``, the client socket's own
address when it connected and when it stopped: equal, the writes went over
one TCP connection from start to end (a connection carried at a handoff
keeps its address; a reconnect would not).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
import time
from typing import Any

RECORD = struct.Struct(">8sQII")  # magic, offset, client, counter (24 bytes)
MAGIC = b"FERRYWL1"
BLOCK = 4096


def block_bytes(offset: int, client: int, counter: int) -> bytes:
    record = RECORD.pack(MAGIC, offset, client, counter)
    return (record * (BLOCK // len(record) + 1))[:BLOCK]


def decode(data: bytes) -> tuple[int, int, int] | None:
    """(offset, client, counter) of a block written by this workload, else None."""
    magic, offset, client, counter = RECORD.unpack_from(data)
    if magic != MAGIC or data != block_bytes(offset, client, counter):
        return None
    return offset, client, counter


def lost_writes(image: bytes, report: dict[str, object]) -> list[str]:
    """Every acknowledged write of ``report`` that ``image`` does not hold, said in words.

    A block must hold the last counter the client got acknowledged, or a
    later one it sent without an answer (written, its reply lost with the
    connection).
    """
    acked = report["acked"]
    unanswered = report["unanswered"]
    assert isinstance(acked, dict) and isinstance(unanswered, dict)
    lost = []
    for offset_text, counter in acked.items():
        offset = int(offset_text)
        found = decode(image[offset : offset + BLOCK])
        if found is None:
            lost.append(f"block {offset}: the acknowledged write {counter} is gone")
            continue
        _, client, held = found
        ceiling = max(counter, unanswered.get(offset_text, counter))
        if client != report["client"] or not counter <= held <= ceiling:
            lost.append(f"block {offset}: holds write {held} of client {client}, not {counter}")
    return lost


def check(image_path: str, report_path: str, original_path: str | None = None) -> int:
    """``workload.py check IMAGE REPORT [ORIGINAL]``: every acknowledged write is in IMAGE,
    and every block the client never wrote is ORIGINAL's, byte for byte (exit 0)."""
    with open(report_path) as file:
        report = json.load(file)
    with open(image_path, "rb") as file:
        image = file.read()
    lost = lost_writes(image, report)
    for line in lost:
        print(line, file=sys.stderr)
    acked = len(report["acked"])
    print(f"{acked - len(lost)} of {acked} acknowledged blocks hold their last write")
    if original_path is None:
        return 1 if lost else 0
    with open(original_path, "rb") as file:
        original = file.read()
    written = {int(offset) for part in ("acked", "unanswered") for offset in report[part]}
    others = [o for o in range(0, len(image), BLOCK) if o not in written]
    differ = [o for o in others if image[o : o + BLOCK] != original[o : o + BLOCK]]
    for offset in differ[:10]:
        print(f"block {offset}: not written by the client, yet not the original", file=sys.stderr)
    same = len(others) - len(differ)
    print(f"{same} of {len(others)} blocks the client never wrote are byte for byte the same")
    return 1 if lost or differ or len(image) != len(original) else 0


def local_address(handle: Any) -> str | None:
    """The client socket's own address (host:port), None once libnbd has no socket."""
    try:
        with socket.socket(fileno=os.dup(handle.aio_get_fd())) as sock:
            host, port = sock.getsockname()[:2]
    except Exception:  # libnbd's error once closed, or an OSError
        return None
    return f"{host}:{port}"


def main() -> int:
    if sys.argv[1] == "check":
        return check(*sys.argv[2:5])
    uri, client, clients, blocks, stop_file = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    depth = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    import nbd  # Debian's libnbd bindings: imported here so the checker side needs none

    if depth > 1:
        return pipelined(nbd, uri, client, clients, blocks, stop_file, depth)
    rng = random.Random(client)
    mine = list(range(client, blocks, clients))
    handle = nbd.NBD()
    handle.set_uri_allow_local_file(True)  # nbds://...?tls-certificates=DIR reads DIR
    handle.connect_uri(uri)
    local_start = local_address(handle)
    acked: dict[int, int] = {}
    unanswered: dict[int, int] = {}
    counter = 0
    ended = "stopped"
    error = ""
    writes = 0
    while not os.path.exists(stop_file):
        index = rng.choice(mine)
        offset = index * BLOCK
        counter += 1
        unanswered[offset] = counter
        try:
            handle.pwrite(block_bytes(offset, client, counter), offset)
        except nbd.Error as exc:
            ended, error = "error", f"{exc} at {time.time():.6f}"
            break
        del unanswered[offset]
        acked[offset] = counter
        writes += 1
    print(
        json.dumps(
            {
                "client": client,
                "writes": writes,
                "ended": ended,
                "error": error,
                "ended_at": time.time(),
                "acked": acked,
                "unanswered": unanswered,
                "local_start": local_start,
                "local_end": local_address(handle),
            }
        )
    )
    return 0


def pipelined(
    nbd: Any, uri: str, client: int, clients: int, blocks: int, stop_file: str, depth: int
) -> int:
    """The same writes, ``depth`` of them in flight, each to a block no other in flight has."""
    rng = random.Random(client)
    mine = list(range(client, blocks, clients))
    handle = nbd.NBD()
    handle.connect_uri(uri)
    local_start = local_address(handle)
    acked: dict[int, int] = {}
    unanswered: dict[int, int] = {}  # block offset -> counter in flight
    started: dict[int, float] = {}
    failures: list[str] = []
    counter = 0
    writes = 0
    max_latency = 0.0

    def done(offset: int, sent: int, error: Any) -> int:
        nonlocal writes, max_latency
        max_latency = max(max_latency, time.monotonic() - started.pop(offset))
        if error.value:
            # Failed with the connection, it may still have been written: it
            # stays unanswered, and the block may hold it.
            failures.append(f"write of counter {sent} at {offset}: errno {error.value}")
        else:
            del unanswered[offset]
            acked[offset] = sent
            writes += 1
        return 1  # retire the command

    ended = "stopped"
    while not os.path.exists(stop_file) and not failures:
        while handle.aio_in_flight() < depth and len(unanswered) < len(mine):
            offset = rng.choice(mine) * BLOCK
            if offset in unanswered:
                continue
            counter += 1
            unanswered[offset] = counter
            started[offset] = time.monotonic()
            buffer = nbd.Buffer.from_bytearray(bytearray(block_bytes(offset, client, counter)))
            handle.aio_pwrite(
                buffer, offset, completion=lambda error, o=offset, c=counter: done(o, c, error)
            )
        try:
            handle.poll(1000)
        except nbd.Error as exc:
            failures.append(str(exc))
    while handle.aio_in_flight() and not failures:
        try:
            handle.poll(1000)
        except nbd.Error as exc:
            failures.append(str(exc))
    if failures:
        ended = "error"
    print(
        json.dumps(
            {
                "client": client,
                "writes": writes,
                "ended": ended,
                "error": "; ".join(failures[:5]),
                "ended_at": time.time(),
                "acked": acked,
                "unanswered": unanswered,
                "max_latency": max_latency,
                "local_start": local_start,
                "local_end": local_address(handle),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
