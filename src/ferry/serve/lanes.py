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

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred

__all__ = ["JOBS_PER_EXPORT", "Lane", "RunBlocking"]

#: Blocking jobs of one export running at once.  Writes to one file and its
#: fdatasync calls mostly wait for each other in the kernel (the inode's
#: lock), so more would buy little.
JOBS_PER_EXPORT: Final = 4

RunBlocking = Callable[[Callable[[], object]], "Deferred[Any]"]


class Lane:
    """Runs one export's blocking jobs through ``run_blocking``, ``limit`` at a time, in order."""

    def __init__(self, run_blocking: RunBlocking, limit: int = JOBS_PER_EXPORT) -> None:
        self._run_blocking = run_blocking
        self._limit = limit
        self._running = 0
        self._waiting: deque[tuple[Callable[[], object], Deferred[Any]]] = deque()

    def __call__(self, work: Callable[[], object]) -> Deferred[Any]:
        """Fires with ``work``'s result once it has had its turn and its thread."""
        if self._running < self._limit:
            return self._start(work)
        d: Deferred[Any] = Deferred()
        self._waiting.append((work, d))
        return d

    def _start(self, work: Callable[[], object]) -> Deferred[Any]:
        self._running += 1
        d = self._run_blocking(work)
        d.addBoth(self._ended)
        return d

    def _ended(self, result: object) -> object:
        self._running -= 1
        if self._waiting:
            work, waiter = self._waiting.popleft()
            self._start(work).chainDeferred(waiter)
        return result

    @property
    def waiting(self) -> int:
        """Jobs waiting for a turn (beyond the ``limit`` running)."""
        return len(self._waiting)
