"""Which of an export's requests in flight must wait for which.

Requests run on worker threads, several at once, and finish in any order.
NBD and ferry's own promises still need some order:

* requests whose ranges overlap run in the order they arrived, where at
  least one of them writes (two reads of one range may run together): a
  READ sent after a WRITE sees that write, and a WRITE sent after a READ
  does not change what that READ returns;
* a FLUSH runs only once every write that arrived before it has finished,
  so it makes them all durable (NBD asks this only of the writes already
  answered; arrival order is stronger and costs nothing more here);
* a migration's switchover plans its last pass only once every write
  admitted before the hold has finished and been reported to the dirty
  map (:meth:`RequestOrder.when_writes_done`).

The order is kept per export, over every connection of it: a client with
several connections (multi-conn) gets the same guarantees across them.

This module only keeps the books (no threads, no Twisted): the connection
admits a job, starts it when :meth:`RequestOrder.admit` says it is ready,
and reports its end with :meth:`RequestOrder.finish`, which says which
waiting jobs are ready now.  The jobs in flight are few (each connection
has at most ``MAX_JOBS_PER_CONNECTION``), so a new job is compared with
each of them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

__all__ = ["Access", "Job", "RequestOrder"]


class Access(enum.Enum):
    """What a job does to the image, as far as ordering goes."""

    READ = "read"  # READ, BLOCK_STATUS, CACHE
    WRITE = "write"  # WRITE, WRITE_ZEROES, TRIM
    FLUSH = "flush"  # FLUSH: after every earlier write, whatever its range


class Job:
    """One admitted request: its range, what waits for it, and how it starts."""

    __slots__ = ("access", "blockers", "dependents", "end", "finished", "offset", "start")

    def __init__(self, access: Access, offset: int, length: int, start: Callable[[], None]) -> None:
        self.access = access
        self.offset = offset
        self.end = offset + length
        #: Called (by whoever admitted or finished the job it waited for) once it may run.
        self.start = start
        self.blockers = 0  # earlier jobs it still waits for
        self.dependents: list[Job] = []
        self.finished = False

    def __repr__(self) -> str:
        return f"<Job {self.access.value} [{self.offset}, {self.end}) waits for {self.blockers}>"

    def must_follow(self, earlier: Job) -> bool:
        """Whether this job may start only once ``earlier`` (which arrived first) has finished."""
        if self.access is Access.FLUSH:
            return earlier.access is Access.WRITE
        if earlier.access is Access.FLUSH:
            return False
        if self.access is Access.READ and earlier.access is Access.READ:
            return False
        return self.offset < earlier.end and earlier.offset < self.end


class RequestOrder:
    """One export's jobs in flight, in arrival order, and the waits between them."""

    def __init__(self) -> None:
        self._jobs: list[Job] = []  # admitted and not finished, in arrival order
        self._writes = 0  # of which WRITE jobs
        # when_writes_done: (the write jobs still to finish, the callback)
        self._write_waiters: list[tuple[set[Job], Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._jobs)

    def conflicts(self, access: Access, offset: int, length: int) -> bool:
        """Whether a job like this, admitted now, would have to wait."""
        if not self._jobs:
            return False
        probe = Job(access, offset, length, _nothing)
        return any(probe.must_follow(earlier) for earlier in self._jobs)

    def admit(self, job: Job) -> bool:
        """Put ``job`` last in arrival order; True if it may start now, else it waits.

        A job that waits is started (``job.start()``) by the :meth:`finish`
        of the last job it waits for; one that may start now is not: the
        caller starts it.
        """
        for earlier in self._jobs:
            if job.must_follow(earlier):
                job.blockers += 1
                earlier.dependents.append(job)
        self._jobs.append(job)
        if job.access is Access.WRITE:
            self._writes += 1
        return job.blockers == 0

    def finish(self, job: Job) -> None:
        """``job`` has finished: start each job that waited for it and nothing else now."""
        if job.finished:
            raise ValueError(f"{job!r} finished twice")
        job.finished = True
        self._jobs.remove(job)
        if job.access is Access.WRITE:
            self._writes -= 1
            if self._write_waiters:
                self._write_finished(job)
        dependents, job.dependents = job.dependents, []
        for waiting in dependents:
            waiting.blockers -= 1
            if waiting.blockers == 0:
                waiting.start()

    # -- the switchover's wait ----------------------------------------------------------

    def when_writes_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once every write job admitted so far has finished (now if none)."""
        pending = {job for job in self._jobs if job.access is Access.WRITE}
        if not pending:
            callback()
            return
        self._write_waiters.append((pending, callback))

    def _write_finished(self, job: Job) -> None:
        ready = []
        for entry in self._write_waiters:
            entry[0].discard(job)
            if not entry[0]:
                ready.append(entry)
        for entry in ready:
            self._write_waiters.remove(entry)
            entry[1]()

    @property
    def writes_in_flight(self) -> int:
        return self._writes


def _nothing() -> None:
    pass
