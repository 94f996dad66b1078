"""Every input kept in fuzz/corpus/ replayed through its fuzz target's checks, without atheris.

The corpora hold the seeds recorded from real sessions (fuzz/seeds.py),
hand-made inputs for the limits (hand-*), every input a fuzz run found a
fault with (finding-*, kept beside the fix and its own regression test),
and the minimized inputs longer runs reached (grown-*).
Replaying them here makes a regression fail the ordinary test run, not
only a fuzz run that happens to come back to it; scripts/fuzz.sh explores
from them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from fuzzing import TARGETS

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus"
KEPT = [(target, path) for target in TARGETS for path in sorted((CORPUS / target).iterdir())]


def test_every_target_has_a_corpus() -> None:
    for target in TARGETS:
        assert any(p.name.startswith("seed-") for p in (CORPUS / target).iterdir()), target


@pytest.mark.parametrize(
    ("target", "path"), KEPT, ids=[f"{target}/{path.name}" for target, path in KEPT]
)
def test_a_kept_input_keeps_every_promise(target: str, path: Path) -> None:
    importlib.import_module(target).check(path.read_bytes())
