"""What every fuzz target shares: splitting a stream, failing loudly, running under atheris.

A target is one module in ``fuzz/`` with a ``check(data: bytes) -> None``
that feeds ``data`` to one of ferry's parsers and raises ``Violation`` when
a promise of that parser's module docstring is broken.  Any other
exception escaping ``check`` is a finding too: the parsers promise to raise
nothing but their own ``ProtocolError``, and the control socket nothing at
all.  So a finding is always "``check`` raised", and the same function
serves libFuzzer (``run``) and the unit test that replays every kept input
(tests/unit/test_fuzz_corpus.py), without atheris.

Coverage comes from atheris' bytecode instrumentation of ferry's own
functions only (``instrument_ferry``): instrumenting Twisted and the
standard library as well would slow every execution for edges that say
nothing about ferry's parsers.
"""

from __future__ import annotations

import gc
import itertools
import random
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = [
    "TARGETS",
    "Violation",
    "bytewise",
    "chunks",
    "expect",
    "instrument_ferry",
    "run",
    "same_session",
    "stays_broken",
]

#: Every target, a module of this directory; its corpus is corpus/TARGET/.
TARGETS = ("nbd_server", "nbd_oldstyle", "nbd_client", "control_lines", "control_json")


class Violation(AssertionError):
    """An input made a parser break a promise its module documents."""


def expect(condition: bool, message: str) -> None:
    """Raise ``Violation(message)`` unless ``condition`` (an ``assert`` that ``-O`` keeps)."""
    if not condition:
        raise Violation(message)


def stays_broken(receive_data: Callable[[bytes], object]) -> None:
    """Promise 3 of both NBD parsers: once broken, every later call raises ``ProtocolError``."""
    from ferry.nbd.events import ProtocolError

    for more in (b"", b"\0" * 32):
        try:
            receive_data(more)
        except ProtocolError:
            continue
        raise Violation(f"a broken connection took {more!r} without raising")


class Run(Protocol):
    """What one feeding of a stream to a parser gave (both NBD targets' ``Outcome``)."""

    events: Sequence[object]
    output: bytes
    error: str | None


def same_session(first: Run, second: Run, how: str) -> None:
    """Two splits of the same bytes made the same session: events, output, failure.

    Both NBD parsers drop the events of the call that raises, so when the
    runs failed each kept a prefix of the events: the shorter must be a
    prefix of the longer.
    """
    expect(
        (first.error is None) == (second.error is None),
        f"{how}: one run failed ({first.error or second.error}), the other did not",
    )
    expect(first.output == second.output, f"{how}: the output differs")
    if first.error is None:
        expect(list(first.events) == list(second.events), f"{how}: the events differ")
    else:
        a, b = sorted((list(first.events), list(second.events)), key=len)
        expect(b[: len(a)] == a, f"{how}: the events before the error differ")


def chunks(data: bytes, seed: int, *, max_cuts: int = 16) -> list[bytes]:
    """``data`` cut at up to ``max_cuts`` points that ``seed`` chooses (the same every time).

    Seed 0 keeps ``data`` whole; an empty ``data`` is one empty chunk, so a
    caller still makes one call.
    """
    if seed == 0 or len(data) < 2:
        return [data]
    rng = random.Random(seed * 1_000_003 + len(data))
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, max_cuts))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    """``data`` one byte at a time: the split that never parses two frames in one call."""
    return [data[i : i + 1] for i in range(len(data))] or [b""]


def instrument_ferry() -> int:
    """Add atheris' coverage instrumentation to every loaded function of ``ferry``; how many.

    ``atheris.instrument_all`` does this for every module; this keeps to
    ferry's.  Call it after the target has imported what it fuzzes.
    """
    import atheris

    count = 0
    for obj in gc.get_objects():
        if not isinstance(obj, types.FunctionType):
            continue
        module = getattr(obj, "__module__", None) or ""
        if module == "ferry" or module.startswith("ferry."):
            atheris.instrument_func(obj)
            count += 1
    return count


def run(check: Callable[[bytes], Any], argv: list[str] | None = None) -> None:
    """Fuzz ``check`` with libFuzzer's command line ``argv`` (corpus dirs, ``-max_total_time``).

    A file argument instead of a directory runs ``check`` once on that file:
    how a crash is reproduced.
    """
    import atheris

    count = instrument_ferry()
    print(f"INFO: instrumented {count} ferry functions", file=sys.stderr)
    atheris.Setup(argv if argv is not None else sys.argv, check)
    atheris.Fuzz()
