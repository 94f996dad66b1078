"""One export's share of the worker threads: a disk that hangs stalls its own export only.

Every disk call of a client request (READ that the page cache cannot answer
at once, WRITE, WRITE_ZEROES, TRIM, BLOCK_STATUS, FLUSH) runs on a worker
thread, and the node has one pool of them for every export.  An export
whose disk stops answering (a dead NFS server, a SAN path that hangs)
keeps each thread it is given until the disk comes back; a client of that
export that pipelines requests would take them all, and every other
export's requests would queue behind it.

So each export reaches the pool through a :class:`Lane`: at most
``JOBS_PER_EXPORT`` of its jobs run at once, the rest wait in the lane, in
order.  A hung disk holds that many threads and no more; the pool is sized
(``ferry.node``) to keep room for the others beside a few hung ones.

The lane is a counter and a queue rather than a ``DeferredSemaphore``: it is
on the path of every request, and the semaphore's Deferreds cost more than
the 4 KiB write they guard.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ferry.workers import at_end_of_turn

__all__ = ["JOBS_PER_EXPORT", "Lane", "RunBlocking"]

#: Blocking jobs of one export running at once.  Writes to one file and its
#: fdatasync calls mostly wait for each other in the kernel (the inode's
#: lock), so more would buy little.
JOBS_PER_EXPORT: Final = 4

RunBlocking = Callable[[Callable[[], object]], "Deferred[Any]"]


class _Batch:
    """Short jobs that share one turn on a thread, run one after the other.

    Jobs join a batch until a worker thread picks it up: one hand-off to a
    thread and back then serves every request that became ready meanwhile.
    """

    __slots__ = ("_lock", "jobs", "results", "started")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs: list[tuple[Callable[[], object], Deferred[Any]]] = []
        self.started = False
        self.results: list[tuple[bool, object]] = []

    def join(self, work: Callable[[], object], d: Deferred[Any]) -> bool:
        """Add a job (on the reactor thread); False once a thread has started the batch."""
        with self._lock:
            if self.started:
                return False
            self.jobs.append((work, d))
            return True

    def run(self) -> None:
        """On a worker thread: every job, in order, keeping each one's result or exception."""
        with self._lock:
            self.started = True
            jobs = list(self.jobs)
        results: list[tuple[bool, object]] = []
        for work, _ in jobs:
            try:
                results.append((True, work()))
            except Exception as error:
                results.append((False, error))
        self.results = results


class Lane:
    """Runs one export's blocking jobs through ``run_blocking``, ``limit`` at a time, in order.

    A short job (a read or write of the data plane, as opposed to an fsync
    that may take seconds) joins the lane's batch that no thread has
    started yet, if there is one; a batch takes one of the ``limit`` turns,
    and is handed to a thread at the end of the reactor's turn, so the
    requests that became ready together go together.

    Each batch costs one hand-off to a thread and one back.  On 2 busy
    cores a thread that is woken often waits for a CPU, and a 4 KiB write
    answered through a thread took several times as long as one written on
    the reactor (see benchmarks/README.md); batching what is ready together
    is what wins some of that back under load.  (Waiting on the reactor for
    the batch, at most a millisecond, was tried: the thread took as long to
    start, and the reactor only stood still meanwhile.)
    """

    def __init__(self, run_blocking: RunBlocking, limit: int = JOBS_PER_EXPORT) -> None:
        self._run_blocking = run_blocking
        self._limit = limit
        self._running = 0
        self._waiting: deque[tuple[Callable[[], object], Deferred[Any], bool]] = deque()
        self._open: _Batch | None = None  # the batch a thread has not started yet

    def __call__(self, work: Callable[[], object], *, short: bool = False) -> Deferred[Any]:
        """Fires with ``work``'s result once it has had its turn and its thread."""
        d: Deferred[Any] = Deferred()
        if short and self._open is not None and self._open.join(work, d):
            return d
        if self._running < self._limit:
            self._start(work, d, short)
        else:
            self._waiting.append((work, d, short))
        return d

    def _start(self, work: Callable[[], object], d: Deferred[Any], short: bool) -> None:
        self._running += 1
        if not short:
            self._run_blocking(work).addBoth(self._ended).chainDeferred(d)
            return
        batch = self._open = _Batch()
        batch.join(work, d)
        while self._waiting and self._waiting[0][2]:  # the short jobs waiting next join it
            waiting, waiter, _ = self._waiting.popleft()
            batch.join(waiting, waiter)
        if not at_end_of_turn(lambda: self._submit(batch)):
            self._submit(batch)

    def _submit(self, batch: _Batch) -> None:
        self._run_blocking(batch.run).addBoth(self._batch_ended, batch)

    def _ended(self, result: object) -> object:
        self._running -= 1
        if self._waiting:
            self._start(*self._waiting.popleft())
        return result

    def _batch_ended(self, result: object, batch: _Batch) -> None:
        """The batch ran on its thread: answer each of its jobs."""
        if self._open is batch:
            self._open = None
        self._ended(None)
        if isinstance(result, Failure):  # the batch itself failed (a bug): so does every job
            for _, d in batch.jobs:
                d.errback(result)
            return
        for (_, d), (ok, value) in zip(batch.jobs, batch.results, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(cast(Exception, value))

    @property
    def waiting(self) -> int:
        """Jobs waiting for a turn (beyond the ``limit`` running)."""
        return len(self._waiting)
