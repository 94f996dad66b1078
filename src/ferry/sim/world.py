"""The seeded world: one clock, random streams derived from the seed, the trace, the loop.

Every choice a run makes comes from a :meth:`World.stream`: a
``random.Random`` seeded from the world's seed and the stream's name (and
how many streams of that name came before), never from the process's hash
seed or from the order in which unrelated parts happened to draw.  A
connection, a disk, a client each draw from their own stream, so two
replies sent in another order get the same delays.

:meth:`World.run` takes the clock from one scheduled call to the next.
Every callback is run through :meth:`World.guarded`: an exception out of
ferry's code is a broken invariant (nothing should raise into the reactor),
and after each callback the per-step invariants are checked.  The first
broken invariant stops the run; it is kept in :attr:`World.violation`.

The trace is one line per thing that happened (a transition, a fault, an
acknowledgement), stamped with the simulated time; its digest is what
"replays byte for byte" compares.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet import task
from twisted.internet.base import DelayedCall

__all__ = ["SimClock", "Trace", "Violation", "World"]

#: Trace lines kept in memory to print when a seed fails (the digest covers all).
TRACE_TAIL: Final = 200


@dataclass(frozen=True)
class Violation:
    """The first invariant a run broke: its name, what was seen, and when."""

    invariant: str
    detail: str
    time: float

    def __str__(self) -> str:
        return f"{self.invariant} at t={self.time:.6f}: {self.detail}"


class Trace:
    """What happened, one line each: hashed as it grows, the tail kept (all if asked)."""

    def __init__(self, *, keep_all: bool = False) -> None:
        self._digest = hashlib.sha256()
        self.keep_all = keep_all
        self.lines: list[str] = []
        self.count = 0

    def add(self, line: str) -> None:
        self._digest.update(line.encode())
        self._digest.update(b"\n")
        self.count += 1
        self.lines.append(line)
        if not self.keep_all and len(self.lines) > 2 * TRACE_TAIL:
            del self.lines[:TRACE_TAIL]

    def tail(self, n: int = TRACE_TAIL) -> list[str]:
        return self.lines[-n:]

    def digest(self) -> str:
        return self._digest.hexdigest()


class SimClock(task.Clock):
    """``task.Clock`` with its calls in a heap: the same calls in the same order, faster.

    ``task.Clock`` sorts its whole list at every ``callLater`` and every call
    it runs; a run keeps a thousand calls pending (time-outs of requests in
    flight), which made sorting most of the simulator's time.  Here a call
    is pushed once (again when ``reset`` brings it forward); a cancelled or
    postponed entry is skipped or pushed again when it reaches the top.
    Calls due at the same time run in the order they were made.
    """

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> DelayedCall:
        call = DelayedCall(
            self.seconds() + delay, callable, args, kw, _forget, self._push, self.seconds
        )
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        heapq.heappush(self._heap, (call.getTime(), next(self._order), call))

    def getDelayedCalls(self) -> Sequence[DelayedCall]:
        return [call for _, _, call in sorted(self._heap) if call.active()]

    def next_time(self) -> float | None:
        """When the next call is due (None: nothing is pending)."""
        heap = self._heap
        while heap:
            when, _, call = heap[0]
            if not call.active():
                heapq.heappop(heap)
            elif call.getTime() > when:
                heapq.heapreplace(heap, (call.getTime(), next(self._order), call))
            else:
                return when
        return None

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        heap = self._heap
        while True:
            when = self.next_time()
            if when is None or when > self.rightNow:
                return
            _, _, call = heapq.heappop(heap)
            call.called = 1
            call.func(*call.args, **call.kw)


def _forget(call: DelayedCall) -> None:
    """A cancelled call stays in the heap until it reaches the top."""


class World:
    """One run: the seed, the clock, the trace, the checks; see the module doc."""

    def __init__(self, seed: int, *, keep_trace: bool = False) -> None:
        self.seed = seed
        self.clock = SimClock()
        self.trace = Trace(keep_all=keep_trace)
        self.violation: Violation | None = None
        self._streams: dict[str, int] = {}
        self._step_checks: list[Callable[[], None]] = []
        self.steps = 0

    # -- randomness --------------------------------------------------------------

    def stream(self, name: str) -> random.Random:
        """A random stream of its own: the same seed and name give the same numbers."""
        n = self._streams.get(name, 0)
        self._streams[name] = n + 1
        # A str seed is hashed with SHA-512, whatever PYTHONHASHSEED says.
        return random.Random(f"{self.seed}/{name}/{n}")

    # -- time ----------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def call_later(self, delay: float, who: str, fn: Callable[..., object], *args: Any) -> Any:
        """Run ``fn(*args)`` ``delay`` seconds from now, guarded (for the world's own events)."""
        return self.clock.callLater(max(0.0, delay), self.guarded, who, fn, *args)

    # -- what happened ---------------------------------------------------------------

    def log(self, who: str, what: str) -> None:
        self.trace.add(f"{self.clock.seconds():.6f} {who} {what}")

    def violate(self, invariant: str, detail: str) -> None:
        """Record a broken invariant; the first one ends the run."""
        if self.violation is None:
            self.violation = Violation(invariant, detail, self.clock.seconds())
            self.log("!", f"{invariant}: {detail}")

    # -- running ---------------------------------------------------------------------

    def check_each_step(self, check: Callable[[], None]) -> None:
        """Run ``check`` after every callback (it calls :meth:`violate` if something broke)."""
        self._step_checks.append(check)

    def guarded(self, who: str, fn: Callable[..., object], *args: Any) -> None:
        """Run one callback; an exception out of it is a violation; then check the step."""
        self.steps += 1
        try:
            fn(*args)
        except Exception as error:
            where = "".join(traceback.format_exception(error)[-3:]).strip()
            self.violate("no exception", f"{who}: {type(error).__name__}: {error} [{where}]")
        for check in self._step_checks:
            check()

    def forget(self) -> None:
        """The run is over: drop what would keep its objects alive (pending calls, checks)."""
        self.clock = SimClock()
        self._step_checks.clear()

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Run scheduled calls up to time ``until`` (or until ``stop()``, or a violation)."""
        clock = self.clock
        while self.violation is None:
            if stop is not None and stop():
                return
            when = clock.next_time()
            if when is None or when > until:
                break
            clock.advance(max(0.0, when - clock.seconds()))
        if self.violation is None and clock.seconds() < until:
            clock.advance(until - clock.seconds())
