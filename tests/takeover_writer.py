"""A libnbd writer with DEPTH writes in flight, for the takeover tests.

Run under Debian's Python (``/usr/bin/python3 tests/takeover_writer.py URI
CLIENT BLOCKS DEPTH``): libnbd's bindings, not ferry's client.  It writes
the checkable blocks of ``tests/workload.py`` (client CLIENT owns every
block; each write carries its block's offset and a counter) and keeps
DEPTH of them in flight, all the time, on one connection.

It talks one JSON object per line on stdout and takes one command per line
on stdin, so the test waits on events, never on a sleep:

* ``{"event": "started", "local": [ADDR, PORT]}`` once 200 writes are in;
* ``after N`` -> ``{"event": "after", "writes": W}`` once N more writes
  than at the command have been acknowledged;
* ``stop`` -> stops issuing, waits for every write in flight, and prints
  ``{"event": "done", ...}``: the workload's report (``acked``,
  ``unanswered``, ``client``), how it ended (``ended``, ``error``), its
  socket's local address when it started and now (the same connection or
  not), and the longest times between two completions (``gaps``: the five
  longest, each ``[seconds, from, to]`` on ``time.monotonic()``, the same
  clock as the test's, so the test can pick the one a takeover made).
"""

from __future__ import annotations

import heapq
import json
import os
import select
import socket
import sys
import time

from workload import BLOCK, block_bytes

WARMUP = 200
GAPS = 5


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def local_address(handle: object) -> list[object]:
    fd = handle.aio_get_fd()  # type: ignore[attr-defined]
    with socket.socket(fileno=os.dup(fd)) as sock:
        return list(sock.getsockname()[:2])


def main() -> int:
    uri, client, blocks, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import nbd  # Debian's libnbd bindings

    handle = nbd.NBD()
    handle.connect_uri(uri)
    local = local_address(handle)
    counter = 0
    writes = 0
    acked: dict[int, int] = {}
    in_flight: dict[int, tuple[int, int]] = {}  # cookie -> (offset, counter)
    unanswered: dict[int, int] = {}
    last_done = time.monotonic()
    gaps: list[tuple[float, float, float]] = []  # the longest: (seconds, from, to), a min-heap
    started = False
    waiting_for: int | None = None
    stopping = False
    ended, error = "stopped", ""
    stdin = sys.stdin.fileno()
    pending_input = b""
    while True:
        if not stopping:
            try:
                while len(in_flight) < depth:
                    counter += 1
                    offset = (counter * 7919 % blocks) * BLOCK
                    buffer = nbd.Buffer.from_bytearray(
                        bytearray(block_bytes(offset, client, counter))
                    )
                    cookie = handle.aio_pwrite(buffer, offset)
                    in_flight[cookie] = (offset, counter)
                    unanswered[offset] = counter
            except nbd.Error as exc:
                ended, error = "error", f"{exc}"
                break
        elif not in_flight:
            break
        try:
            handle.poll(50)
            now = time.monotonic()
            done = [cookie for cookie in in_flight if handle.aio_command_completed(cookie)]
        except nbd.Error as exc:
            ended, error = "error", f"{exc}"
            break
        if done:
            gap = (now - last_done, last_done, now)
            if len(gaps) < GAPS:
                heapq.heappush(gaps, gap)
            elif gap > gaps[0]:
                heapq.heapreplace(gaps, gap)
            last_done = now
        for cookie in done:
            offset, count = in_flight.pop(cookie)
            writes += 1
            if acked.get(offset, 0) < count:
                acked[offset] = count
            if unanswered.get(offset) == count:
                del unanswered[offset]
        if not started and writes >= WARMUP:
            started = True
            say("started", local=local)
        if waiting_for is not None and writes >= waiting_for:
            say("after", writes=writes)
            waiting_for = None
        if select.select([stdin], [], [], 0)[0]:
            chunk = os.read(stdin, 4096)
            if not chunk:
                stopping = True
            pending_input += chunk
            while b"\n" in pending_input:
                line, pending_input = pending_input.split(b"\n", 1)
                words = line.decode().split()
                if words[:1] == ["after"]:
                    waiting_for = writes + int(words[1])
                elif words[:1] == ["stop"]:
                    stopping = True
    try:
        now_local = local_address(handle)
    except Exception as exc:  # the connection is gone: say so, the test fails on it
        now_local = [f"gone: {exc}"]
    say(
        "done",
        client=client,
        writes=writes,
        ended=ended,
        error=error,
        acked={str(k): v for k, v in acked.items()},
        unanswered={str(k): v for k, v in unanswered.items()},
        local_at_start=local,
        local_at_end=now_local,
        gaps=sorted(gaps, reverse=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
