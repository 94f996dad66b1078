"""Worker threads for blocking calls, answered on the reactor thread.

Every disk call of the data plane (a 4 KiB ``pwrite`` takes about 4 us)
goes through here, so the round trip to a thread and back is most of its
cost.  Twisted's own pool (``deferToThreadPool``) took about 50 us per call
here, on 2 cores; this one about 18 us, because:

* a job is one tuple in a deque (no context copy, no per-call ``Failure``
  machinery), and it wakes one thread: the idle threads each block on a
  lock of their own, and the pool releases the last one to go idle.  (On
  one shared ``queue.SimpleQueue`` every ``put`` woke two idle threads --
  the queue's lock, released by the thread that got the job, wakes the
  next waiter, which finds nothing and sleeps again -- and the second
  wanted the GIL too.  With this and the next point, the server's
  threads went from 7.3-8.6 to 3.7-5.8 voluntary context switches per
  4 KiB write at queue depth 1 (benchmarks/README.md);
* a thread that finishes a job takes the next one without sleeping while
  there is one, and wakes the reactor only once it has taken it or is
  about to sleep, so that the reactor thread, once awake, does not find
  the thread still holding the GIL;
* results are handed back in batches: a thread appends to a list and wakes
  the reactor (``callFromThread``) only when the list was empty, so under
  load one wake-up delivers many results;
* threads are started only when every started one is busy;
* work on the reactor thread happens in *turns* (:func:`turn`): the
  delivery of a batch of results is one, and so is a connection's
  dispatch of what it received.  What is put off to the end of the turn
  (:func:`at_end_of_turn`) happens once for all of it: a connection whose
  jobs end together sends their replies in one ``sendmsg`` instead of
  one each (on loopback a send costs about 45 us, more than the write),
  and a lane hands the requests that became ready together to one thread
  (``ferry.serve.lanes``).

The threads are daemon threads: a disk that never answers keeps its
thread, and must not keep the process from exiting.  ``stop`` ends the
idle ones.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["WorkerPool", "at_end_of_turn", "turn"]

_log = Logger()

# What waits for the end of the turn under way (None: no turn is under way).
# Only the reactor thread touches it.
_after: list[Callable[[], object]] | None = None


@contextmanager
def turn() -> Iterator[None]:
    """A turn of the reactor thread's work: what is put off to its end happens on leaving.

    Inside another turn it adds nothing: the outer one's end is this one's.
    """
    global _after
    if _after is not None:
        yield
        return
    _after = []
    try:
        yield
    finally:
        after, _after = _after, None
        for callback in after:
            try:
                callback()
            except Exception:
                _log.failure("at the end of a turn")


def at_end_of_turn(callback: Callable[[], object]) -> bool:
    """Call ``callback()`` at the end of the turn under way.

    False (and nothing is kept) when no turn is under way: the caller then
    does it at once itself.
    """
    if _after is None:
        return False
    _after.append(callback)
    return True


class _Worker:
    """One thread's own wake-up: a lock it blocks on while it has nothing to do."""

    __slots__ = ("wake",)

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # held: acquiring it again blocks until the pool releases it


class WorkerPool:
    """At most ``size`` threads running jobs; each job's Deferred fires on the reactor thread."""

    def __init__(self, reactor: Any, size: int, *, name: str = "ferry-worker") -> None:
        if size < 1:
            raise ValueError(f"a pool of {size} threads")
        self._reactor = reactor
        self.size = size
        self._name = name
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Callable[[], object], Deferred[Any]]] = deque()
        self._idle: list[_Worker] = []  # threads blocked on their own wake, the last idle last
        self._done: list[tuple[Deferred[Any], bool, Any]] = []
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def __call__(self, work: Callable[[], object]) -> Deferred[Any]:
        """Run ``work()`` on a worker thread; fires with its result or its exception."""
        if self._stopped:
            raise RuntimeError("the worker pool is stopped")
        d: Deferred[Any] = Deferred()
        idle = thread = None
        with self._lock:
            self._jobs.append((work, d))
            if self._idle:
                idle = self._idle.pop()
            elif len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
            # else every thread is busy: the first to finish takes it
        if idle is not None:
            idle.wake.release()
        elif thread is not None:
            thread.start()
        return d

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    def stop(self) -> None:
        """Take no more jobs; each thread ends once no job is left (a hung one never does)."""
        if self._stopped:
            return
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.wake.release()

    # -- on the worker threads -----------------------------------------------------

    def _work(self) -> None:
        me = _Worker()
        lock = self._lock
        jobs = self._jobs
        wake_reactor = False
        while True:
            work = None
            with lock:
                if jobs:
                    work, d = jobs.popleft()
                elif not self._stopped:
                    self._idle.append(me)
            if wake_reactor:
                # Only now, with the next job taken or this thread about to sleep:
                # the reactor thread, once awake, finds the GIL free.
                wake_reactor = False
                self._reactor.callFromThread(self._deliver)
            if work is None:
                if self._stopped:
                    with lock:
                        if not jobs:
                            return
                    continue
                me.wake.acquire()  # until __call__ or stop releases it (the GIL is let go)
                continue
            try:
                result = (d, True, work())
            except BaseException as error:  # handed to the Deferred, traceback and all
                result = (d, False, error)
            with lock:
                wake_reactor = not self._done
                self._done.append(result)

    # -- on the reactor thread ---------------------------------------------------------

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        with turn():
            for d, ok, value in done:
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)  # a Failure of the exception, with its traceback
