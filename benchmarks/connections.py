#!/usr/bin/env python3
"""Connections carried at the handoff: what moving them adds to the switchover, what clients feel.

Two ferry nodes on two hosts (network namespaces on a bridge, as in
``tests/integration/test_connections_move.py``), the service address on
both, and N libnbd clients (``benchmarks/writer.py``: 4 KiB writes on a
fixed schedule, latency measured from when each was due) in a third host
(and a fourth past 32, what one client address may open:
``ferry.serve.limits.MAX_CONNECTIONS_PER_ADDRESS``).  For N in 1, 16 and
64 (``--counts``), ``ferry mirror --wait`` moves a 64 MiB image twice:

- ``moved``: both nodes can move connections; every client keeps its
  connection and writes on to the destination;
- ``dropped``: the destination runs without CAP_NET_ADMIN, so it takes no
  connections and the clients are disconnected at the handoff, as before
  connections could move (the baseline).

Figures, from the source's own log line of the switchover: the hold (from
clients held to the commit's ack) and its commit step (where the
connections are frozen, checkpointed and carried, and the destination
rebuilds them); ``added`` is the moved run's hold less the baseline's.  From
the clients: the longest stall any write saw (``moved`` only: the baseline's
clients are cut off).  Needs root, nftables and ``ip``.

    python benchmarks/connections.py [--counts 1,16,64] [--rate 65536] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ferry.serve.limits import MAX_CONNECTIONS_PER_ADDRESS
from handoff_support import Lan
from moving_support import URI, start_hosts
from support import Deadline, wait_until

WRITER = Path(__file__).resolve().parent / "writer.py"
HOLD = re.compile(r"held clients (?P<total>[0-9.]+) s .* commit (?P<commit>[0-9.]+) s")
DROP_NET_ADMIN = ("setpriv", "--bounding-set", "-net_admin", "--")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_run(count: int, rate: int, moved: bool) -> dict[str, Any]:
    """One handoff of ``count`` clients; the source's hold and the clients' longest stall."""
    # One client address may open MAX_CONNECTIONS_PER_ADDRESS connections: more
    # clients come from more hosts.
    client_hosts = [f"client{n}" for n in range(-(-count // MAX_CONNECTIONS_PER_ADDRESS))]
    lan = Lan.make(["source", "destination", *client_hosts])
    try:
        with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
            hosts = start_hosts(lan, Path(tmp), dest_wrap=() if moved else DROP_NET_ADMIN)
            stop = Path(tmp) / "stop"
            try:
                for k in range(count):
                    host = client_hosts[k % len(client_hosts)]
                    hosts.client([str(WRITER), URI, str(rate), "120", str(stop)], host)
                wait_until(
                    f"{count} clients",
                    lambda: hosts.status(hosts.source_sock)["num_clients"] == str(count),
                    Deadline(120),
                )
                time.sleep(1.0)  # a second of writes before the handoff, for a steady rate
                mirror = hosts.mirror()
                if mirror.returncode != 0:
                    raise RuntimeError(f"the migration failed: {mirror.stderr.decode()}")
                line = hosts.source.wait_for_log("the switchover held clients")
                time.sleep(1.0)  # a second of writes after it, to the destination
            finally:
                reports = hosts.finish(stop)
    finally:
        lan.close()
    found = HOLD.search(line)
    if found is None:
        raise RuntimeError(f"no hold in {line!r}")
    figures: dict[str, Any] = {
        "hold_ms": float(found["total"]) * 1000,
        "commit_ms": float(found["commit"]) * 1000,
    }
    if moved:
        broken = [r for r in reports if r["ended"] != "stopped"]
        if broken:
            raise RuntimeError(f"{len(broken)} client(s) did not survive the move: {broken[0]}")
        figures["stall_ms"] = max(float(r["longest_stall_ms"]) for r in reports)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,16,64")
    parser.add_argument("--rate", type=int, default=65536, help="bytes/s each client writes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = []
    for count in (int(c) for c in args.counts.split(",")):
        log(f"{count} connection(s): baseline (dropped)")
        dropped = one_run(count, args.rate, moved=False)
        log(f"{count} connection(s): moved")
        moved = one_run(count, args.rate, moved=True)
        results.append(
            {
                "connections": count,
                "dropped": dropped,
                "moved": moved,
                "added_ms": moved["hold_ms"] - dropped["hold_ms"],
            }
        )
    print(
        f"{'connections':>11}  {'hold dropped':>12}  {'hold moved':>10}  {'added':>8}  "
        f"{'commit moved':>12}  {'longest stall':>13}"
    )
    for r in results:
        print(
            f"{r['connections']:>11}  {r['dropped']['hold_ms']:>10.1f}ms  "
            f"{r['moved']['hold_ms']:>8.1f}ms  {r['added_ms']:>6.1f}ms  "
            f"{r['moved']['commit_ms']:>10.1f}ms  {r['moved']['stall_ms']:>11.1f}ms"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"host": platform.node(), "results": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
