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
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time

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
    import nbd  # Debian's libnbd bindings: imported here so the checker side needs none

    rng = random.Random(client)
    mine = list(range(client, blocks, clients))
    handle = nbd.NBD()
    handle.set_uri_allow_local_file(True)  # nbds://...?tls-certificates=DIR reads DIR
    handle.connect_uri(uri)
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
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
