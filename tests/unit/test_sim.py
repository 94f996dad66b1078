"""The simulator itself: seeds run clean, replay byte for byte, and its checks bite.

``python -m ferry.sim`` runs ferry's real objects under simulated time, network,
disks and lockspace (see ``ferry.sim``).  These tests keep it honest:

* a few seeds run with every fault and break nothing;
* a seed run twice -- in this process or in another, whatever its hash
  seed -- gives the same trace, byte for byte;
* every bug planted in the simulator's doubles (``--bug``) is caught within
  a bounded number of seeds, and by a seed named here, breaking the
  invariant named here, so the simulator cannot stop checking unseen;
* the seeds that found bugs in ferry run clean now that those are fixed,
  and break again when the fix is undone (put back by monkeypatching the
  old code in);
* the command line says which seeds failed, and why, and exits 1.

Performance (seeds per second) is measured by benchmarks, not here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from ferry.chartnames import RoleTrigger
from ferry.clock import ReactorClock
from ferry.lease.backend import Grant
from ferry.lease.manager import LeaseManager
from ferry.migrate import carry
from ferry.migrate.core.convergence import ConvergencePolicy
from ferry.migrate.manager import MirrorManager
from ferry.migrate.options import Destination, MirrorError, MirrorOptions, StartOutcome
from ferry.migrate.source import MirrorSource
from ferry.serve.export import RECEIVING_STATES, Export
from ferry.sim.bugs import BUGS
from ferry.sim.faults import Faults, parse_faults
from ferry.sim.pattern import Ledger, Verdict
from ferry.sim.runner import run_seed
from ferry.storage.image import Image

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

#: Each planted bug's own seed, and the invariant that seed breaks with the bug (and
#: not without it): found with ``python -m ferry.sim --seeds 120 --bug NAME``.
PLANTED = {
    "ack-before-fsync": (28, "durable writes survive a crash where control is"),
    "release-before-ack": (0, "a migration completes"),
    "skip-last-pass": (4, "acknowledged writes are where control is"),
    "ignore-token": (77, "a writer holds its lease"),
}


# -- ferry's bugs the simulator found, undone again ------------------------------------


def _flush_forgets_a_failure(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(Image, "flush", lambda image: image._fdatasync())


def _deadline_on_the_wall_clock(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(ReactorClock, "monotonic", ReactorClock.seconds)


def _renewal_of_the_old_token_is_a_loss(patch: pytest.MonkeyPatch) -> None:
    fixed = LeaseManager._renewal_failed

    def as_before(manager: LeaseManager, failure: object, epoch: int, grant: Grant) -> None:
        if manager.token is not None:  # the renewal's grant always looks current
            grant = replace(grant, holder=replace(grant.holder, token=manager.token))
        fixed(manager, failure, epoch, grant)  # type: ignore[arg-type]

    patch.setattr(LeaseManager, "_renewal_failed", as_before)


def _refused_commit_keeps_the_lease(patch: pytest.MonkeyPatch) -> None:
    def as_before(export: Export, sender: object) -> None:
        if sender is not export._sender:
            return
        export._sender = None
        if export.state in RECEIVING_STATES:
            export.trigger(RoleTrigger.SENDER_LOST)

    patch.setattr(Export, "sender_lost", as_before)


def _connection_machines_share_names(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(carry, "_unique", lambda name, named: name)


def _refused_start_stays_current(patch: pytest.MonkeyPatch) -> None:
    fixed_start, fixed = MirrorSource.start, MirrorManager._start
    tried: list[MirrorSource] = []

    def start(source: MirrorSource) -> Deferred[StartOutcome]:
        tried.append(source)
        return fixed_start(source)

    def as_before(
        manager: MirrorManager, destination: Destination, options: MirrorOptions
    ) -> Deferred[StartOutcome]:
        try:
            return fixed(manager, destination, options)
        except MirrorError:
            manager.current = tried[-1]  # the job that never started stays current
            raise

    patch.setattr(MirrorSource, "start", start)
    patch.setattr(MirrorManager, "_start", as_before)


def _never_give_up(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(ConvergencePolicy, "give_up_after", property(lambda policy: 10**9))


def _stalls_outlast_the_chaos(patch: pytest.MonkeyPatch) -> None:
    fixed = Faults._for

    def as_before(faults: Faults, seconds: float, what: str, undo: Callable[[], None]) -> None:
        if what.startswith("stall"):
            faults.world.call_later(seconds, "faults", undo)  # ends on its own, never at heal
            return
        fixed(faults, seconds, what, undo)

    patch.setattr(Faults, "_for", as_before)


@dataclass(frozen=True)
class Regression:
    """A seed that broke an invariant in ferry's code, the fix, and the fix undone."""

    seed: int
    fixed: str
    invariant: str  # what the seed breaks with the fix undone
    undo: Callable[[pytest.MonkeyPatch], None]
    faults: str = "all"


REGRESSIONS = (
    Regression(
        425,
        "a FLUSH after a failed one succeeded (storage/image.py)",
        "acknowledged writes are where control is",
        _flush_forgets_a_failure,
    ),
    Regression(
        23,
        "the lease deadline was kept on the wall clock (lease/manager.py)",
        "a writer holds its lease",
        _deadline_on_the_wall_clock,
    ),
    Regression(
        560,
        "a renewal refused for the token the holder's own offer moved was a loss",
        "a migration completes",
        _renewal_of_the_old_token_is_a_loss,
        faults="slow,lost-answers,unreachable,pause,delay,jump",
    ),
    Regression(
        125,
        "a commit refused after it took the lease kept it (serve/export.py)",
        "a migration completes",
        _refused_commit_keeps_the_lease,
    ),
    Regression(
        2,
        "two clients of one host shared a connection machine's name (migrate/carry.py)",
        "every trace replays",
        _connection_machines_share_names,
    ),
    Regression(
        9,
        "a mirror refused while the lockspace was asked stayed 'running' (migrate/manager.py)",
        "the cluster settles",
        _refused_start_stays_current,
    ),
    Regression(
        45730,
        "a stall begun late in the chaos outlasted it into the last migration (sim/faults.py)",
        "a migration completes",
        _stalls_outlast_the_chaos,
    ),
    Regression(
        428,
        "a migration that never converged ran for ever (migrate/core/convergence.py)",
        "the cluster settles",
        _never_give_up,
    ),
)


def test_a_few_seeds_break_nothing() -> None:
    for seed in range(6):
        result = run_seed(seed)
        assert result.ok, f"seed {seed}: {result.violation}"
        assert result.steps > 100


def test_the_clients_reads_are_answered_and_judged(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that fails is never judged: a simulator whose reads all fail checks none."""
    judged: list[int] = []
    judge = Ledger.judge

    def counting(ledger: Ledger, block: int, data: bytes, floor: int) -> Verdict:
        if sys._getframe(1).f_code.co_name != "judge_image":  # a client's read, not the end
            judged.append(block)
        return judge(ledger, block, data, floor)

    monkeypatch.setattr(Ledger, "judge", counting)
    for seed in range(3):
        assert run_seed(seed).ok
    assert len(judged) > 50


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


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_bug_is_caught_by_its_own_seed(bug: str) -> None:
    seed, invariant = PLANTED[bug]
    caught = run_seed(seed, bug=bug).violation
    assert caught is not None and caught.invariant == invariant, caught
    assert run_seed(seed).ok  # the bug, not the seed, breaks it


@pytest.mark.parametrize("regression", REGRESSIONS, ids=lambda r: str(r.seed))
def test_the_seeds_that_found_bugs_run_clean_and_catch_them_again(
    regression: Regression, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = parse_faults(regression.faults)
    result = run_seed(regression.seed, faults=faults)
    assert result.ok, f"seed {regression.seed} ({regression.fixed}): {result.violation}"
    regression.undo(monkeypatch)
    again = run_seed(regression.seed, faults=faults).violation
    assert again is not None and again.invariant == regression.invariant, again


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
