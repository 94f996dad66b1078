#!/usr/bin/env python3
"""A takeover on one host: how long clients are held while a new process takes the node over.

One ``ferry serve`` on loopback (a 64 MiB image, a local lockspace of its
own) and N libnbd clients (``benchmarks/writer.py``: 4 KiB writes on a
fixed schedule, latency measured from when each was due, up to 16 in
flight; from 127.0.0.2, .3, ... since ferry admits
``MAX_CONNECTIONS_PER_ADDRESS`` connections from one address), then
``ferry serve --takeover SOCK``.  For N in 1, 16 and 64 (``--counts``),
``--runs`` takeovers each (a fresh server every time); every client must
keep its connection and write on, or the benchmark aborts.  Figures, the
median of the runs (and the worst):

- ``held``: the old process's own figure, from the takeover request (client
  requests held from then on) to the new process's "serving" (its log line
  ``clients held X ms``);
- ``taken``: the new process's, from asking to every client adopted (``X ms
  after asking``); the clients wait from a little before this starts to a
  little after it ends;
- ``stall``: the longest any client's write waited, from when it was due
  (what a client feels, its queue and the host's scheduling included), and
  ``baseline``, the same from a run of as many clients as long with no
  takeover: on a small shared host N Python writers and the server compete
  for the cores, which makes stalls of their own;
- ``start``: from starting the new process to its ``serving`` line (Python,
  imports, the image opened, the lockspace...): no client waits for that part.

    python benchmarks/takeover.py [--counts 1,16,64] [--runs 3] [--rate 65536] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ferry.serve.limits import MAX_CONNECTIONS_PER_ADDRESS
from ferry.status import parse_line
from support import FERRY, Deadline, FerryProcess, run, sparse_file, wait_until

WRITER = Path(__file__).resolve().parent / "writer.py"
SIZE = 64 << 20
HELD = re.compile(r"clients held (?P<ms>[0-9.]+) ms here")
TAKEN = re.compile(r"(?P<ms>[0-9.]+) ms after asking")
#: A baseline run's writes between the first second and the last, without a takeover.
BASELINE_SECONDS = 2.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_run(count: int, rate: int, *, takeover: bool = True) -> dict[str, float]:
    """One takeover of a server with ``count`` clients; its figures (see the module doc).

    Without ``takeover``, the clients write as long and only the stall is measured.
    """
    with tempfile.TemporaryDirectory(prefix="ferry-bench-takeover-") as tmp:
        root = Path(tmp)
        (root / "locks").mkdir(mode=0o700)
        image = sparse_file(root / "disk.img", SIZE)
        sock = root / "ctl.sock"
        stop = root / "stop"
        old = FerryProcess(
            [
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                "0",
                "--file",
                str(image),
                "--sock",
                str(sock),
                "--lockspace",
                f"local:{root / 'locks'}",
            ]
        ).wait_serving()
        new = None
        clients = []
        try:
            for k in range(count):
                bind = f"127.0.0.{2 + k // MAX_CONNECTIONS_PER_ADDRESS}"
                clients.append(
                    subprocess.Popen(
                        [
                            "/usr/bin/python3",
                            str(WRITER),
                            old.uri(),
                            str(rate),
                            "300",
                            str(stop),
                            bind,
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                )

            def status() -> dict[str, str]:
                return parse_line(run([*FERRY, "status", "--sock", str(sock)]).stdout.decode())

            wait_until(
                f"{count} clients", lambda: status()["num_clients"] == str(count), Deadline(120)
            )
            time.sleep(1.0)  # a second of writes before the takeover, for a steady rate
            began = time.monotonic()
            if takeover:
                new = FerryProcess(["serve", "--takeover", str(sock)]).wait_serving(Deadline(120))
                start_ms = (time.monotonic() - began) * 1000
                if old.proc.wait(timeout=60) != 0:
                    raise RuntimeError(f"the old process exited {old.proc.returncode}")
            else:
                time.sleep(BASELINE_SECONDS)  # about as long as a takeover run writes
            time.sleep(1.0)  # a second of writes after it, to the new process
            moved = status()
        finally:
            stop.touch()
            reports = []
            for client in clients:
                out, err = client.communicate(timeout=60)
                reports.append(json.loads(out) if out else {"ended": "crashed", "error": err})
            for process in (old, new):
                if process is not None and process.proc.poll() is None:
                    process.stop()
    broken = [r for r in reports if r["ended"] != "stopped"]
    if broken:
        raise RuntimeError(f"{len(broken)} client(s) did not survive the takeover: {broken[0]}")
    stall_ms = max(float(r["longest_stall_ms"]) for r in reports)
    if new is None:
        return {"stall_ms": stall_ms}
    if moved.get("connections_moved") != str(count):
        raise RuntimeError(f"{moved.get('connections_moved')} of {count} connections moved")
    held = HELD.search(old.stderr_text())
    taken = TAKEN.search("".join(new.log))
    if held is None or taken is None:
        raise RuntimeError(f"no figures in the logs: {old.stderr_text()} {''.join(new.log)}")
    return {
        "held_ms": float(held["ms"]),
        "taken_ms": float(taken["ms"]),
        "stall_ms": stall_ms,
        "start_ms": start_ms,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,16,64")
    parser.add_argument("--runs", type=int, default=3, help="takeovers per count")
    parser.add_argument("--rate", type=int, default=65536, help="bytes/s each client writes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for count in (int(c) for c in args.counts.split(",")):
        runs = []
        for n in range(args.runs):
            log(f"{count} connection(s): takeover {n + 1} of {args.runs}")
            runs.append(one_run(count, args.rate))
        log(f"{count} connection(s): baseline, no takeover")
        baseline = one_run(count, args.rate, takeover=False)
        results.append(
            {
                "connections": count,
                "runs": runs,
                "baseline_stall_ms": baseline["stall_ms"],
                "median": {key: statistics.median(r[key] for r in runs) for key in runs[0]},
                "worst": {key: max(r[key] for r in runs) for key in runs[0]},
            }
        )
    print(
        f"{'connections':>11}  {'held (old)':>16}  {'taken (new)':>16}  "
        f"{'longest stall':>16}  {'baseline':>9}  {'start to serving':>16}"
    )
    for r in results:
        cells = [
            f"{r['median'][key]:>6.1f} ({r['worst'][key]:>6.1f}) ms"
            for key in ("held_ms", "taken_ms", "stall_ms")
        ]
        cells.append(f"{r['baseline_stall_ms']:>7.1f}ms")
        cells.append(f"{r['median']['start_ms']:>6.1f} ({r['worst']['start_ms']:>6.1f}) ms")
        print(f"{r['connections']:>11}  " + "  ".join(f"{cell:>16}" for cell in cells))
    print("median of the runs (worst in brackets)")
    if args.json:
        args.json.write_text(
            json.dumps({"host": platform.node(), "results": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
