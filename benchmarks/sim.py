#!/usr/bin/env python3
"""The simulator's speed: seeds per second, and a long run with every seed checked.

Runs seeds ``--from`` .. ``--from + --seeds - 1`` of ``python -m ferry.sim``
(every fault, no planted bug) on ``--jobs`` processes and reports, at the end
and every ``--every`` seeds on the way:

* seeds per second of wall time (what a CI run costs on this machine now),
* CPU seconds per seed (what it costs whatever else the machine is doing),
* simulated steps (callbacks run and checked) per CPU second,
* the failing seeds, with the invariant each broke.

    python benchmarks/sim.py --seeds 2000 --jobs 2
    python benchmarks/sim.py --seeds 100000 --jobs 2 --json /tmp/sim-1e5.json

A failing seed replays with ``python -m ferry.sim --seeds 1 --from SEED --trace``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / "src"


@dataclass
class Tally:
    below: int  # every seed from --from up to this one (excluded) has been checked
    seeds: int = 0
    steps: int = 0
    simulated: float = 0.0
    cpu: float = 0.0
    failed: list[tuple[int, str]] = field(default_factory=list)
    ahead: set[int] = field(default_factory=set)  # checked, with an unchecked seed below

    def checked(self, seed: int) -> None:
        """Seeds finish out of order (several processes): keep the unbroken run from --from.

        A run stopped on the way resumes, without a gap, from ``--from below``.
        """
        self.ahead.add(seed)
        while self.below in self.ahead:
            self.ahead.remove(self.below)
            self.below += 1


def _quiet_logs() -> None:
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)


def _one(seed: int) -> tuple[int, int, float, float, str | None]:
    from ferry.sim.runner import run_seed

    started = time.process_time()
    result = run_seed(seed)
    cpu = time.process_time() - started
    broken = None if result.violation is None else str(result.violation)
    return seed, result.steps, result.seconds, cpu, broken


def _line(tally: Tally, elapsed: float) -> str:
    rate = tally.seeds / elapsed if elapsed else 0.0
    per_seed = tally.cpu / tally.seeds if tally.seeds else 0.0
    steps = tally.steps / tally.cpu if tally.cpu else 0.0
    return (
        f"{tally.seeds} seeds, {len(tally.failed)} failed, {elapsed:.0f} s: "
        f"{rate:.1f} seeds/s, {per_seed * 1000:.0f} ms CPU per seed, "
        f"{steps:,.0f} steps per CPU second; every seed below {tally.below} checked"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--from", dest="first", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--every", type=int, default=5000, help="report every N seeds")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    _quiet_logs()
    seeds = range(args.first, args.first + args.seeds)
    tally = Tally(below=args.first)
    started = time.monotonic()
    context = multiprocessing.get_context("fork")
    # A worker lives for 32 chunks (512 seeds): a process running seeds grows slowly (tens
    # of MB a hundred seeds); forked afresh, a 10^5-seed run stays small.
    with context.Pool(args.jobs, initializer=_quiet_logs, maxtasksperchild=32) as pool:
        for seed, steps, simulated, cpu, broken in pool.imap_unordered(_one, seeds, chunksize=16):
            tally.seeds += 1
            tally.steps += steps
            tally.simulated += simulated
            tally.cpu += cpu
            tally.checked(seed)
            if broken is not None:
                tally.failed.append((seed, broken))
                print(f"seed {seed}: {broken}", file=sys.stderr, flush=True)
            if tally.seeds % args.every == 0:
                print(_line(tally, time.monotonic() - started), flush=True)
    elapsed = time.monotonic() - started
    print(_line(tally, elapsed))
    print(f"simulated {tally.simulated:,.0f} s of cluster time in {elapsed:,.0f} s")
    if args.json is not None:
        figures: dict[str, Any] = {
            "first": args.first,
            "seeds": tally.seeds,
            "every_seed_below_checked": tally.below,
            "jobs": args.jobs,
            "failed": tally.failed,
            "wall_seconds": elapsed,
            "seeds_per_second": tally.seeds / elapsed,
            "cpu_seconds_per_seed": tally.cpu / tally.seeds,
            "steps": tally.steps,
            "steps_per_cpu_second": tally.steps / tally.cpu,
            "simulated_seconds": tally.simulated,
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
