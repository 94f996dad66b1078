"""A rate-limited random writer for benchmarks/migrate.py, run as a real libnbd client.

Run under Debian's Python (``/usr/bin/python3 benchmarks/writer.py URI RATE SECONDS
STOP_FILE``): it uses libnbd's bindings, not ferry's client.  It writes 4 KiB blocks of
random bytes at random aligned offsets, one every ``4096 / RATE`` seconds on a fixed
schedule (so a stalled write does not lower the rate afterwards: the backlog goes out at
once, up to ``QUEUE_DEPTH`` requests in flight), until the stop file appears, the run
has lasted SECONDS, or the server goes away.

An optional fifth argument, BIND, is the client's own address: any of loopback's
127.0.0.0/8 will do, so that more clients than ferry admits from one address
(``MAX_CONNECTIONS_PER_ADDRESS``) can run on one host (``benchmarks/takeover.py``).

Every write's latency is measured from the moment it was due (not from when it could be
issued), so a server that holds requests shows up as a long latency even when the queue is
full.  It prints one JSON object: writes, bytes, the longest, the median and the
99th-percentile latency, when the longest one started, and the first error with its
wall-clock time; and the ``service_`` latencies, from when each write was sent (what the
server took, without the schedule's backlog).

With ``WRITER_RECORD=PATH`` in its environment it also records what it wrote, for a check
of the image afterwards (``benchmarks/migrate.py``): once stopped it waits for the writes in
flight to be answered, then writes the blocks it wrote from to ``PATH.pool`` and one JSON
line per write, in the order they were issued, to ``PATH``: offset, block of the pool, and
the wall-clock times it was issued and answered (null: never answered).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time

BLOCK = 4096
QUEUE_DEPTH = 16  # requests in flight at most; the schedule's backlog waits behind them


def main() -> int:
    uri, rate, seconds, stop_file = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    import nbd  # Debian's libnbd bindings

    handle = nbd.NBD()
    if len(sys.argv) > 5:
        connect_from(handle, uri, sys.argv[5])
    else:
        handle.connect_uri(uri)
    blocks = handle.get_size() // BLOCK
    rng = random.Random(2026)
    pool = [nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK))) for _ in range(64)]
    interval = BLOCK / rate
    started = time.monotonic()
    due_next = started
    in_flight: dict[int, float] = {}  # cookie -> when the write was due
    issued_at: dict[int, float] = {}  # cookie -> when it was sent
    record_path = os.environ.get("WRITER_RECORD")
    written: dict[int, list[object]] = {}  # cookie -> [offset, pool block, issued, answered]
    record: list[list[object]] = []
    latencies: list[float] = []
    service: list[float] = []  # sent to answered: what the server (and a mirror) took
    longest = 0.0
    longest_at = 0.0
    error = ""
    error_at = None
    issued = 0
    ended = "stopped"
    last_stop_check = 0.0
    while True:
        now = time.monotonic()
        if now - last_stop_check > 0.05:
            last_stop_check = now
            if os.path.exists(stop_file) or now - started > seconds:
                break
        while due_next <= now and len(in_flight) < QUEUE_DEPTH:
            offset = rng.randrange(blocks) * BLOCK
            try:
                cookie = handle.aio_pwrite(pool[issued % len(pool)], offset)
            except nbd.Error as exc:
                error, error_at = str(exc), time.time()
                break
            in_flight[cookie] = due_next
            issued_at[cookie] = time.monotonic()
            if record_path:
                written[cookie] = [offset, issued % len(pool), time.time(), None]
                record.append(written[cookie])
            issued += 1
            due_next += interval
        if error:
            ended = "error"
            break
        if len(in_flight) >= QUEUE_DEPTH:
            wait_ms = 50  # a reply wakes us up
        else:
            wait_ms = max(0, min(50, int((due_next - time.monotonic()) * 1000)))
        try:
            handle.poll(wait_ms)
        except nbd.Error as exc:
            error, error_at, ended = str(exc), time.time(), "error"
            break
        done_at = time.monotonic()
        for cookie in list(in_flight):
            try:
                finished = handle.aio_command_completed(cookie)
            except nbd.Error as exc:
                error, error_at, ended = str(exc), time.time(), "error"
                break
            if finished:
                if record_path:
                    written.pop(cookie)[3] = time.time()
                latency = done_at - in_flight.pop(cookie)
                latencies.append(latency)
                service.append(done_at - issued_at.pop(cookie))
                if latency > longest:
                    longest, longest_at = latency, time.time() - latency
        if error:
            break
    elapsed = time.monotonic() - started
    if record_path:
        if not error:
            with contextlib.suppress(nbd.Error):  # what is unanswered is recorded so
                settle(handle, in_flight, written)
        save_record(record_path, pool, record)
    # Writes still unanswered when the connection dropped (the source holds requests during
    # the switchover and disconnects its clients after the handoff) stalled at least this long.
    held = (time.monotonic() - min(in_flight.values())) if error and in_flight else 0.0
    latencies.sort()
    service.sort()
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else None
    print(
        json.dumps(
            {
                "writes": len(latencies),
                "bytes": len(latencies) * BLOCK,
                "seconds": round(elapsed, 3),
                "rate_mb_s": round(len(latencies) * BLOCK / elapsed / 1e6, 2) if elapsed else 0,
                "longest_stall_ms": round(max(longest, held) * 1000, 1),
                "longest_answered_ms": round(longest * 1000, 1),
                "held_at_error_ms": round(held * 1000, 1),
                "longest_stall_started_at": longest_at,
                "p99_ms": None if p99 is None else round(p99 * 1000, 2),
                "p50_ms": quantile_ms(latencies, 0.5),
                "service_p50_ms": quantile_ms(service, 0.5),
                "service_p99_ms": quantile_ms(service, 0.99),
                "service_max_ms": quantile_ms(service, 1.0),
                "unanswered": len(in_flight),
                "ended": ended,
                "error": error,
                "error_at": error_at,
            }
        )
    )
    return 0


def quantile_ms(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted seconds, in milliseconds (None: no sample)."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 2)


def settle(handle: object, in_flight: dict[int, float], written: dict[int, list[object]]) -> None:
    """Wait (30 s at most) for the writes in flight: each is then known to have landed."""
    deadline = time.monotonic() + 30
    while in_flight and time.monotonic() < deadline:
        handle.poll(50)  # type: ignore[attr-defined]
        for cookie in list(in_flight):
            if handle.aio_command_completed(cookie):  # type: ignore[attr-defined]
                in_flight.pop(cookie)
                written.pop(cookie)[3] = time.time()


def save_record(path: str, pool: list[object], record: list[list[object]]) -> None:
    with open(path + ".pool", "wb") as blocks:
        for buffer in pool:
            blocks.write(buffer.to_bytearray())  # type: ignore[attr-defined]
    with open(path, "w") as lines:
        for offset, block, issued, answered in record:
            line = {"offset": offset, "block": block, "issued": issued, "answered": answered}
            lines.write(json.dumps(line) + "\n")


def connect_from(handle: object, uri: str, bind: str) -> None:
    """Connect ``handle`` to the nbd:// ``uri`` from the local address ``bind``."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    sock = socket.create_connection((parts.hostname, parts.port or 10809), source_address=(bind, 0))
    handle.set_export_name(urllib.parse.unquote(parts.path[1:]))  # type: ignore[attr-defined]
    handle.connect_socket(sock.detach())  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
