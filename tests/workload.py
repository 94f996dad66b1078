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


def main() -> int:
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
