"""The simulator itself: seeds run clean, replay byte for byte, and its checks bite.

``python -m ferry.sim`` runs ferry's real objects under simulated time, network,
disks and lockspace (see ``ferry.sim``).  These tests keep it honest:

* a few seeds run with every fault and break nothing;
* a seed run twice -- in this process or in another, whatever its hash
  seed -- gives the same trace, byte for byte;
* every bug planted in the simulator's doubles (``--bug``) is caught within
  a bounded number of seeds, so the simulator cannot stop checking unseen;
* the seeds that found bugs in ferry run clean now that those are fixed
  (each fails with its fix undone);
* the command line says which seeds failed, and why, and exits 1.

Performance (seeds per second) is measured by benchmarks, not here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.sim.bugs import BUGS
from ferry.sim.runner import run_seed

SRC = str(Path(__file__).resolve().parents[2] / "src")

#: How many seeds each planted bug may survive, at most (it is usually caught
#: much sooner; the bound leaves room for the simulator to change).
CAUGHT_WITHIN = {
    "ack-before-fsync": 60,
    "release-before-ack": 20,
    "skip-last-pass": 20,
    "ignore-token": 120,
}

#: What the simulator checks (ferry.sim.invariants, ferry.sim.runner, the clients).
INVARIANTS = {
    "one node accepts writes",
    "a writer holds its lease",
    "no MachineError",
    "no exception",
    "no internal error",
    "acknowledged writes are where control is",
    "durable writes survive a crash where control is",
    "reads see acknowledged writes",
    "the server speaks NBD",
    "mirror is answered",
    "a second mirror is refused",
    "every migration ends",
    "the cluster settles",
    "a migration completes",
    "the owner serves in the end",
    "every trace replays",
}

#: Seeds that broke an invariant in ferry's code, and what was fixed.
REGRESSIONS: dict[int, str] = {
    2: "two clients of one host without a peer name shared a connection machine (carry.py)",
}


def test_a_few_seeds_break_nothing() -> None:
    for seed in range(6):
        result = run_seed(seed)
        assert result.ok, f"seed {seed}: {result.violation}"
        assert result.steps > 100


def test_a_seed_replays_byte_for_byte() -> None:
    first = run_seed(3, keep_trace=True)
    again = run_seed(3, keep_trace=True)
    assert first.digest == again.digest
    assert first.tail == again.tail
    assert len(first.tail) > 100


def test_a_seed_replays_in_another_process_whatever_its_hash_seed() -> None:
    here = run_seed(5).digest
    program = "from ferry.sim.runner import run_seed; print(run_seed(5).digest)"
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == here


def test_other_seeds_tell_other_stories() -> None:
    assert len({run_seed(seed).digest for seed in (10, 11, 12)}) == 3


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_bug_is_caught_within_a_bounded_number_of_seeds(bug: str) -> None:
    for seed in range(CAUGHT_WITHIN[bug]):
        result = run_seed(seed, bug=bug)
        if not result.ok:
            assert result.violation is not None
            assert result.violation.invariant != "no exception", result.violation
            return
    pytest.fail(f"{bug} survived {CAUGHT_WITHIN[bug]} seeds: the simulator no longer sees it")


@pytest.mark.parametrize("seed", sorted(REGRESSIONS))
def test_the_seeds_that_found_bugs_run_clean(seed: int) -> None:
    result = run_seed(seed)
    assert result.ok, f"seed {seed} ({REGRESSIONS[seed]}): {result.violation}"


def _sim(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-m", "ferry.sim", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_line_names_the_failing_seed_and_the_broken_invariant() -> None:
    out = _sim("--seeds", "8", "--from", "2", "--bug", "skip-last-pass")
    assert out.returncode == 1
    failed = re.findall(r"^seed (\d+): (.+) at t=[0-9.]+: ", out.stderr, re.MULTILINE)
    assert failed, out.stderr
    seed, invariant = failed[0]
    assert 2 <= int(seed) < 10
    assert invariant in INVARIANTS
    assert f"replay: python -m ferry.sim --seeds 1 --from {seed} --bug skip-last-pass" in out.stderr
    assert out.stderr.count("replays identically") == len(failed)
    assert f"8 seeds from 2: {len(failed)} failed" in out.stdout


def test_the_command_line_exits_0_when_nothing_broke() -> None:
    out = _sim("--seeds", "2", "--faults", "reset,kill")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert "2 seeds from 0: 0 failed" in out.stdout


def test_the_command_line_refuses_an_unknown_fault() -> None:
    out = _sim("--seeds", "1", "--faults", "reset,meteor")
    assert out.returncode == 2
    assert "unknown fault meteor" in out.stderr
