"""``python -m ferry.sim --seeds N [--from S] [--faults LIST] [--bug NAME]``.

Runs seeds ``S`` to ``S + N - 1``.  Exit status 0 when no invariant broke, 1
otherwise; each failing seed is written to stderr with the invariant it
broke, the end of its trace, and the command that replays it -- run again
first, to confirm it replays byte for byte (the same trace digest).
``--trace`` prints a whole trace (use it with ``--seeds 1``).  ``--jobs``
runs seeds on that many processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any, cast

from twisted.logger import ILogObserver, globalLogBeginner
from zope.interface import provider

from ferry.sim.bugs import BUGS
from ferry.sim.faults import FAULTS, parse_faults
from ferry.sim.runner import SeedResult, run_seed


@provider(ILogObserver)
def _discard(event: dict[str, Any]) -> None:
    """ferry logs as it runs; nobody reads it here (failures are caught by the runner)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ferry.sim",
        description="Run ferry under the deterministic simulator, one run per seed.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    parser.add_argument("--from", dest="first", type=int, default=0, help="the first seed (0)")
    parser.add_argument(
        "--faults",
        default="all",
        help=f"all, none, or a comma-separated list of: {', '.join(FAULTS)}",
    )
    parser.add_argument("--bug", choices=BUGS, help="plant a bug in the simulator's doubles")
    parser.add_argument("--jobs", type=int, default=1, help="processes to run seeds on (1)")
    parser.add_argument("--trace", action="store_true", help="print every seed's whole trace")
    parser.add_argument("--quiet", action="store_true", help="print only the failures")
    return parser


def _run(seed: int, faults: frozenset[str], bug: str | None, trace: bool) -> SeedResult:
    return run_seed(seed, faults=faults, bug=bug, keep_trace=trace)


def _results(
    seeds: Iterable[int], faults: frozenset[str], bug: str | None, jobs: int, trace: bool
) -> Iterator[SeedResult]:
    work = partial(_run, faults=faults, bug=bug, trace=trace)
    if jobs <= 1:
        yield from map(work, seeds)
        return
    import multiprocessing

    # A worker lives for 64 chunks (512 seeds): a process running seeds grows
    # slowly (tens of MB a hundred seeds), and a long run must not.
    with multiprocessing.get_context("fork").Pool(jobs, maxtasksperchild=64) as pool:
        yield from pool.imap(work, seeds, chunksize=8)


def _replay_command(seed: int, args: argparse.Namespace) -> str:
    command = f"python -m ferry.sim --seeds 1 --from {seed}"
    if args.faults != "all":
        command += f" --faults {args.faults}"
    if args.bug:
        command += f" --bug {args.bug}"
    return command + " --trace"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        faults = parse_faults(args.faults)
    except ValueError as error:
        print(f"python -m ferry.sim: --faults: {error}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.jobs < 1:
        print("python -m ferry.sim: --seeds and --jobs must be at least 1", file=sys.stderr)
        return 2
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, _discard)], redirectStandardIO=False)
    seeds = range(args.first, args.first + args.seeds)
    started = time.monotonic()
    failed: list[SeedResult] = []
    steps = 0
    for result in _results(seeds, faults, args.bug, args.jobs, args.trace):
        steps += result.steps
        if args.trace:
            print("\n".join(result.tail))
        if result.ok:
            continue
        failed.append(result)
        again = run_seed(result.seed, faults=faults, bug=args.bug)
        same = "replays identically" if again.digest == result.digest else "DOES NOT REPLAY"
        print(f"seed {result.seed}: {result.violation}", file=sys.stderr)
        print(f"  {result.summary}", file=sys.stderr)
        for line in result.tail[-25:]:
            print(f"  | {line}", file=sys.stderr)
        print(f"  trace {result.digest[:16]} {same}", file=sys.stderr)
        print(f"  replay: {_replay_command(result.seed, args)}", file=sys.stderr)
    elapsed = time.monotonic() - started
    if not args.quiet:
        rate = args.seeds / elapsed if elapsed > 0 else float("inf")
        print(
            f"{args.seeds} seeds from {args.first}: {len(failed)} failed; "
            f"{elapsed:.1f} s, {rate:.1f} seeds/s, {steps} steps"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
