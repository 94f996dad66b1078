"""A process's view of time: what pausing it, killing it and jumping its clock do.

Each simulated ferry process gets a :class:`ProcessTime`: the ``reactor``
its :class:`~ferry.clock.ReactorClock` wraps.  Its timers are calls on the
world's clock, and so is everything delivered *to* it -- bytes from the
network, answers from the lockspace, a finished fsync -- through
:meth:`ProcessTime.run`.  That one gate is where the faults act:

* **paused** (SIGSTOP, a VM frozen): nothing runs; what falls due waits, in
  order, and runs when the process resumes -- the keep-alive, the expiry
  timer and the client's request alike, so the first thing a resumed
  process does may be a request that its lease no longer allows;
* **dead** (killed, or its host crashed): nothing runs any more, and what
  was pending is dropped;
* **a clock that jumps**: :meth:`ProcessTime.seconds` (the wall clock) is
  the world's time plus an offset that a fault can change at any moment;
  :meth:`ProcessTime.monotonic` is the world's time and never jumps.
  Timers already scheduled keep their place on the world's clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet import error

from ferry.sim.world import World

__all__ = ["ProcessTime"]


class _Call:
    """A delayed call of one process (``IDelayedCall``), on the world's clock.

    A call that fell due while its process was paused has not run yet: to
    the process it is still pending, and may still be cancelled or moved.
    """

    __slots__ = ("_owner", "args", "done", "fn", "generation", "inner")

    def __init__(
        self, owner: ProcessTime, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._owner = owner
        self.fn = fn
        self.args = args
        self.inner: Any = None
        self.done = False  # ran or cancelled
        self.generation = 0  # which scheduling of it is the live one

    def getTime(self) -> float:
        return float(self.inner.getTime()) + self._owner.offset

    def cancel(self) -> None:
        if self.done:
            raise error.AlreadyCancelled
        self.done = True
        self._owner._forget(self)
        if self.inner.active():
            self.inner.cancel()

    def delay(self, secondsLater: float) -> None:
        if self.done:
            raise error.AlreadyCalled
        if self.inner.active():
            self.inner.delay(secondsLater)
        else:
            due = float(self.inner.getTime()) + secondsLater
            self._owner._schedule(self, due - self._owner.world.clock.seconds())

    def reset(self, secondsFromNow: float) -> None:
        if self.done:
            raise error.AlreadyCalled
        if self.inner.active():
            self.inner.reset(secondsFromNow)
        else:
            self._owner._schedule(self, secondsFromNow)

    def active(self) -> bool:
        return not self.done


class ProcessTime:
    """The reactor time of one process; see the module doc."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.offset = 0.0
        self.paused = False
        self.dead = False
        self._held: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._on_death: list[Callable[[], None]] = []
        self._calls: dict[_Call, None] = {}  # pending, in the order they were made

    # -- ReactorTime ------------------------------------------------------------------

    def seconds(self) -> float:
        return self.world.clock.seconds() + self.offset

    def monotonic(self) -> float:
        return self.world.clock.seconds()

    def callLater(
        self, delay: float, fn: Callable[..., object], /, *args: object, **kw: object
    ) -> _Call:
        if kw:
            raise TypeError("the simulator's processes take positional arguments only")
        call = _Call(self, fn, args)
        self._calls[call] = None
        self._schedule(call, delay)
        return call

    def _schedule(self, call: _Call, delay: float) -> None:
        if delay > 0:
            # This clock and the world's differ by an offset, so a delay one
            # of them can represent may vanish in the other's rounding: a
            # LoopingCall would then come back at the same instant forever.
            delay = max(delay, math.ulp(self.world.clock.seconds()))
        call.generation += 1
        call.inner = self.world.clock.callLater(
            max(0.0, delay), self.run, self._run_call, call, call.generation
        )

    def _run_call(self, call: _Call, generation: int) -> None:
        if call.done or generation != call.generation:
            return  # cancelled, or moved, while it waited for a paused process
        call.done = True
        self._calls.pop(call, None)
        call.fn(*call.args)

    def _forget(self, call: _Call) -> None:
        self._calls.pop(call, None)

    # -- the gate ---------------------------------------------------------------------

    def run(self, fn: Callable[..., object], *args: Any) -> None:
        """Deliver ``fn(*args)`` to this process now: run, held while paused, dropped if dead."""
        if self.dead:
            return
        if self.paused:
            self._held.append((fn, args))
            return
        self.world.guarded(self.name, fn, *args)

    def later(self, delay: float, fn: Callable[..., object], *args: Any) -> None:
        """Deliver ``fn(*args)`` after ``delay`` seconds (something from outside the process)."""
        self.world.clock.callLater(max(0.0, delay), self.run, fn, *args)

    # -- faults -----------------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        """Run what fell due while paused, in order (a callback may pause it again)."""
        self.paused = False
        held, self._held = self._held, []
        for index, (fn, args) in enumerate(held):
            if self.paused or self.dead:
                if not self.dead:
                    self._held = held[index:] + self._held
                return
            self.world.guarded(self.name, fn, *args)

    def jump(self, seconds: float) -> None:
        self.offset += seconds

    def on_death(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when the process dies: what the kernel does for it (closing its files)."""
        self._on_death.append(fn)

    def kill(self) -> None:
        """Nothing of this process runs again."""
        if self.dead:
            return
        self.dead = True
        for call in list(self._calls):
            if call.inner.active():
                call.inner.cancel()
        self._calls.clear()
        self._held.clear()
        for fn in self._on_death:
            fn()
