"""The one way ferry reads the time and schedules work.

Logic never calls ``time.time()`` or ``reactor.callLater`` itself: it is given a
:class:`Clock`.  In production that is a :class:`ReactorClock` around the
reactor; in tests it is a :class:`ReactorClock` around
``twisted.internet.task.Clock``, so timeouts, rates and retries run on
simulated time and a test decides exactly when they fire.

Going through one wrapper also means every pending timer is known, so a
shutdown can cancel them all instead of leaving callbacks to fire into a
half-torn-down export (the model is Synapse's ``synapse/util/clock.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast, runtime_checkable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Clock", "DelayedCall", "ReactorClock", "ReactorTime", "cancel_call"]

_log = Logger()


@runtime_checkable
class ReactorTime(Protocol):
    """What :class:`ReactorClock` needs of a reactor.

    It is the part of ``IReactorTime`` ferry uses, written as a structural
    type so that both the real reactor and ``twisted.internet.task.Clock``
    satisfy it without a cast (a zope interface is invisible to mypy).
    ``callLater`` is declared to return ``object`` for the same reason: mypy
    cannot match ``IDelayedCall``'s self-less method declarations against
    :class:`DelayedCall`, so the one conversion happens in ``call_later``.
    """

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], /, *args: object, **kw: object
    ) -> object: ...


class DelayedCall(Protocol):
    """The handle :meth:`Clock.call_later` returns (``IDelayedCall``'s methods)."""

    def getTime(self) -> float: ...

    def cancel(self) -> None: ...

    def delay(self, secondsLater: float) -> None: ...

    def reset(self, secondsFromNow: float) -> None: ...

    def active(self) -> bool: ...


class Clock(Protocol):
    """Time as ferry's logic sees it: now, later, and every so often."""

    def seconds(self) -> float:
        """Seconds since the epoch on this clock (simulated in tests)."""
        ...

    def call_later(self, delay: float, fn: Callable[..., object], *args: object) -> DelayedCall:
        """Run ``fn(*args)`` once, ``delay`` seconds from now, unless cancelled."""
        ...

    def looping_call(
        self, interval: float, fn: Callable[..., object], *args: object, now: bool = False
    ) -> LoopingCall:
        """Run ``fn(*args)`` every ``interval`` seconds until stopped."""
        ...


class _TrackedCall:
    """A delayed call that forgets itself in its clock when it is cancelled.

    Without this a long-lived export that re-arms a timeout on every renewal
    would keep every cancelled handle in the pending set until shutdown.
    """

    def __init__(self, clock: ReactorClock) -> None:
        self._clock = clock
        self.delayed_call: DelayedCall | None = None

    def getTime(self) -> float:
        assert self.delayed_call is not None
        return self.delayed_call.getTime()

    def cancel(self) -> None:
        assert self.delayed_call is not None
        self._clock._pending.discard(self)
        self.delayed_call.cancel()

    def delay(self, secondsLater: float) -> None:
        assert self.delayed_call is not None
        self.delayed_call.delay(secondsLater)

    def reset(self, secondsFromNow: float) -> None:
        assert self.delayed_call is not None
        self.delayed_call.reset(secondsFromNow)

    def active(self) -> bool:
        assert self.delayed_call is not None
        return self.delayed_call.active()

    def __repr__(self) -> str:
        return f"<_TrackedCall {self.delayed_call!r}>"


class ReactorClock:
    """A :class:`Clock` on a reactor (or on ``task.Clock`` in tests).

    It remembers every call it scheduled that has neither run nor been
    cancelled, and every looping call still running, so :meth:`cancel_all`
    can stop them when the process shuts down.
    """

    def __init__(self, reactor: ReactorTime) -> None:
        self._reactor = reactor
        self._pending: set[_TrackedCall] = set()
        self._loops: set[LoopingCall] = set()

    @property
    def reactor(self) -> ReactorTime:
        """The reactor underneath, for the few APIs that want one (``LoopingCall.clock``)."""
        return self._reactor

    def seconds(self) -> float:
        return self._reactor.seconds()

    def call_later(self, delay: float, fn: Callable[..., object], *args: object) -> DelayedCall:
        handle = _TrackedCall(self)

        def run() -> None:
            # Forget the call before running it: fn may raise, and a call that
            # has fired is no longer something shutdown could cancel.
            self._pending.discard(handle)
            fn(*args)

        handle.delayed_call = cast(DelayedCall, self._reactor.callLater(delay, run))
        self._pending.add(handle)
        return handle

    def looping_call(
        self, interval: float, fn: Callable[..., object], *args: object, now: bool = False
    ) -> LoopingCall:
        """Start ``fn(*args)`` every ``interval`` seconds on this clock's reactor.

        The first call is ``interval`` seconds from now unless ``now`` is true.
        If ``fn`` raises, the loop stops and the failure is logged, not lost
        in an unhandled ``Deferred``.
        """
        loop = LoopingCall(fn, *args)
        # LoopingCall defaults to the global reactor; tests need their task.Clock.
        loop.clock = cast(IReactorTime, self._reactor)
        self._loops.add(loop)
        d = loop.start(interval, now=now)

        def forget(result: object) -> object:
            self._loops.discard(loop)
            return result

        def died(failure: Failure) -> None:
            _log.failure("looping call {fn!r} died", failure, fn=fn)

        d.addBoth(forget)
        d.addErrback(died)
        return loop

    def pending(self) -> int:
        """How many calls and loops :meth:`cancel_all` would stop now."""
        return len(self._pending) + len(self._loops)

    def cancel_all(self) -> None:
        """Cancel every pending call and stop every running loop.

        Meant for shutdown, after which nothing scheduled earlier should run.
        The clock stays usable: shutdown code may still schedule its own
        timeouts.
        """
        for handle in list(self._pending):
            if handle.active():
                handle.cancel()
        self._pending.clear()
        for loop in list(self._loops):
            if loop.running:
                loop.stop()
        self._loops.clear()


def cancel_call(call: DelayedCall | None) -> None:
    """Cancel ``call`` unless it is None, has run, or was cancelled already."""
    if call is not None and call.active():
        call.cancel()
