"""One export's share of the worker threads: a disk that hangs stalls its own export only.

FLUSH, and a write or trim with FUA, wait for ``fdatasync`` on a worker
thread, and the node has one pool of them for every export.  An export
whose disk stops answering (a dead NFS server, a SAN path that hangs)
keeps each thread it is given until the disk comes back; a client of that
export that pipelines flushes would take them all, and every other
export's flushes would queue behind it.

So each export reaches the pool through a :class:`Lane`: at most
``JOBS_PER_EXPORT`` of its jobs run at once, the rest wait in the lane, in
order.  A hung disk holds that many threads and no more; the pool is sized
(``ferry.node``) to keep room for the others beside a few hung ones.

Reads and writes without FUA are still performed on the reactor thread (see
``ferry.serve.connection``), so a disk that hangs on those stalls every
export of the node until they move to threads too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred, DeferredSemaphore

__all__ = ["JOBS_PER_EXPORT", "Lane", "RunBlocking"]

#: Blocking jobs of one export running at once.  fdatasync calls on one file
#: mostly wait for each other in the kernel, so more would buy little.
JOBS_PER_EXPORT: Final = 4

RunBlocking = Callable[[Callable[[], object]], "Deferred[Any]"]


class Lane:
    """Runs one export's blocking jobs through ``run_blocking``, ``limit`` at a time."""

    def __init__(self, run_blocking: RunBlocking, limit: int = JOBS_PER_EXPORT) -> None:
        self._run_blocking = run_blocking
        self._slots = DeferredSemaphore(limit)

    def __call__(self, work: Callable[[], object]) -> Deferred[Any]:
        """Fires with ``work``'s result once it has had its turn and its thread."""
        return self._slots.run(self._run_blocking, work)

    @property
    def waiting(self) -> int:
        """Jobs waiting for a turn (beyond the ``limit`` running)."""
        return len(self._slots.waiting)
