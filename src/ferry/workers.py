"""Worker threads for blocking calls, answered on the reactor thread.

Every disk call of the data plane (a 4 KiB ``pwrite`` takes about 4 us)
goes through here, so the round trip to a thread and back is most of its
cost.  Twisted's own pool (``deferToThreadPool``) took about 50 us per call
here, on 2 cores; this one about 18 us, for three reasons:

* a job is one tuple on a ``queue.SimpleQueue`` (no context copy, no
  per-call ``Failure`` machinery);
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

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["WorkerPool", "at_end_of_turn", "turn"]

_STOP: Final = None
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


class WorkerPool:
    """At most ``size`` threads running jobs; each job's Deferred fires on the reactor thread."""

    def __init__(self, reactor: Any, size: int, *, name: str = "ferry-worker") -> None:
        if size < 1:
            raise ValueError(f"a pool of {size} threads")
        self._reactor = reactor
        self.size = size
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Deferred[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._done: list[tuple[Deferred[Any], bool, Any]] = []
        self._threads: list[threading.Thread] = []
        self._idle = 0  # started threads waiting for a job
        self._queued = 0  # jobs put and not yet taken
        self._stopped = False

    def __call__(self, work: Callable[[], object]) -> Deferred[Any]:
        """Run ``work()`` on a worker thread; fires with its result or its exception."""
        if self._stopped:
            raise RuntimeError("the worker pool is stopped")
        d: Deferred[Any] = Deferred()
        thread = None
        with self._lock:
            self._queued += 1
            if self._queued > self._idle and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
        self._jobs.put((work, d))
        if thread is not None:
            thread.start()
        return d

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    def stop(self) -> None:
        """Take no more jobs; each thread ends once it is idle (a hung one never does)."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._jobs.put(_STOP)

    # -- on the worker threads -----------------------------------------------------

    def _work(self) -> None:
        jobs = self._jobs
        lock = self._lock
        while True:
            with lock:
                self._idle += 1
            job = jobs.get()
            with lock:
                self._idle -= 1
                if job is not None:
                    self._queued -= 1
            if job is None:
                return
            work, d = job
            try:
                result = (d, True, work())
            except BaseException as error:  # handed to the Deferred, traceback and all
                result = (d, False, error)
            with lock:
                wake = not self._done
                self._done.append(result)
            if wake:
                self._reactor.callFromThread(self._deliver)

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
