#!/usr/bin/env python3
"""Connection handoff benchmark: how long moving N live connections takes, and what clients feel.

For 1, 16 and 64 connections (``--counts``), a sequence-numbered echo
client (``tests/handoff_worker.py``) talks to an echo server on every
connection, one 16-byte message per connection every ``--interval``
seconds, and the connections are moved mid-stream:

- ``same-host``: the server freezes, checkpoints and releases every
  connection, restores each on a new socket in the same process and
  unfreezes (the TCP_REPAIR path of a restart on one host).  Figure: freeze
  to unfreeze, as the server measures it.
- ``namespaces``: three network namespaces as hosts on a bridge.  The
  source freezes, checkpoints, releases and removes the service address;
  the states go (through this script) to the destination, which freezes the
  flows, adds the address, restores, unfreezes and sends a gratuitous ARP.
  Figures: the source's part, the destination's part, and their sum (what
  the switchover's hold would gain, without carrying the states, which ride
  on the migration connection the commit already uses).

For both: the longest gap between two echoes any client connection saw
(``stall``), which includes the retransmission timeout of a segment the
freeze dropped -- a connection without a dropped segment sees no more than
the move itself.  Every run also checks the client's verdict: no error (a
reset would be one), every message echoed once and in order, the same
connection at the same addresses; a run that fails it is an error, not a
figure.  Needs root, nftables, and ``ip`` (network namespaces, veth,
bridge).

    python benchmarks/handoff.py [--counts 1,16,64] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from handoff_support import (
    SERVICE_IP,
    SERVICE_PORT,
    Lan,
    Worker,
    start_client,
    start_source_and_destination,
    unique,
)
from support import Deadline, free_port


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check(done: dict[str, Any], count: int) -> float:
    """The client's verdict (raises if the move broke anything) and its longest stall."""
    conns = done["connections"]
    if len(conns) != count:
        raise RuntimeError(f"{len(conns)} connections reported, {count} expected")
    for conn in conns:
        if conn["errors"] or conn["echoed"] != conn["sent"] or not conn["same_connection"]:
            raise RuntimeError(f"a connection did not survive the move: {conn}")
    return max(float(conn["longest_gap"]) for conn in conns)


def same_host(count: int, interval: float) -> dict[str, float]:
    port = free_port()
    server = Worker(
        [
            "server",
            "--listen",
            f"127.0.0.1:{port}",
            "--clients",
            str(count),
            "--freeze-table",
            unique("frz"),
        ]
    )
    client = None
    try:
        server.expect("ready")
        client = Worker(
            [
                "client",
                "--connect",
                f"127.0.0.1:{port}",
                "--clients",
                str(count),
                "--interval",
                str(interval),
            ]
        )
        client.expect("started", Deadline(60))
        server.send("move")
        moved = server.expect("moved")
        server.expect("serving-moved", Deadline(60))
        client.send("stop")
        stall = check(client.expect("done", Deadline(60)), count)
        return {
            "handoff": moved["total"],
            "checkpoint": moved["checkpoint"],
            "restore": moved["restore"],
            "stall": stall,
        }
    finally:
        for worker in (client, server):
            if worker is not None:
                worker.finish()


def namespaces(count: int, interval: float) -> dict[str, float]:
    lan = Lan.make(["source", "destination", "client"])
    workers: list[Worker] = []
    try:
        source, destination = start_source_and_destination(lan, count)
        workers += [source, destination]
        client = start_client(
            f"{SERVICE_IP}:{SERVICE_PORT}", count, interval=interval, netns=lan["client"].netns
        )
        workers.insert(0, client)
        client.expect("started", Deadline(60))
        start = time.perf_counter()
        source.send("handoff")
        states = source.expect("states")
        destination.send("restore " + json.dumps(states["states"]))
        restored = destination.expect("restored")
        wall = time.perf_counter() - start
        destination.expect("serving-moved", Deadline(60))
        client.send("stop")
        stall = check(client.expect("done", Deadline(60)), count)
        return {
            "handoff": states["total"] + restored["total"],
            "source": states["total"],
            "destination": restored["total"],
            "wall": wall,
            "stall": stall,
        }
    finally:
        for worker in workers:
            worker.finish()
        lan.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,16,64", help="connection counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="runs per count and mode")
    parser.add_argument("--modes", default="same-host,namespaces")
    parser.add_argument(
        "--interval", type=float, default=0.005, help="seconds between messages per connection"
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    modes = {"same-host": same_host, "namespaces": namespaces}
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    for mode in args.modes.split(","):
        for count in (int(c) for c in args.counts.split(",")):
            for repeat in range(args.repeats):
                log(f"{mode}: {count} connections, run {repeat + 1}/{args.repeats}")
                run = modes[mode](count, args.interval)
                log("  " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in run.items()))
                results.setdefault(mode, {}).setdefault(count, []).append(run)
    print(
        f"\nkernel {platform.release()}, python {platform.python_version()}, "
        f"{args.repeats} runs each, a message per connection every {args.interval * 1000:g} ms"
    )
    print(
        f"{'mode':<11} {'conns':>5}  {'handoff median':>14}  {'max':>7}  "
        f"{'stall median':>12}  {'max':>7}"
    )
    for mode, by_count in results.items():
        for count, runs in by_count.items():
            handoff = [r["handoff"] * 1000 for r in runs]
            stall = [r["stall"] * 1000 for r in runs]
            print(
                f"{mode:<11} {count:>5}  {statistics.median(handoff):>11.1f} ms  "
                f"{max(handoff):>4.1f} ms  {statistics.median(stall):>9.1f} ms  "
                f"{max(stall):>4.1f} ms"
            )
    if args.json:
        args.json.write_text(json.dumps({"interval": args.interval, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
