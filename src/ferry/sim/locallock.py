"""ferry's own ``local:DIR`` lockspace, on real lock files, for the simulated processes.

The ``local`` lockspace is not modelled: every simulated process gets a
:class:`~ferry.lease.local.LocalLockspace` of its own on one shared
directory (in ``/dev/shm`` when there is one), so the lease manager runs
against the real open-file-description locks, ledger and holder slots.
OFD locks belong to an ``open()``, not to a process, so two simulated
processes in this one Python process exclude each other exactly as two
real ones would.  Every call is a few system calls answered at once, as
in ``ferry serve``; nothing in them is random or timed, so a seed replays.

What the simulator adds, per process (:class:`LocalClient`):

* **death**: a process killed, or whose host lost power, has its lock
  descriptors closed without a word -- what the kernel does -- so its
  records stay in the file, as a SIGKILL'd holder's do;
* **unreachable** (or its host partitioned off): the directory is unusable
  from that process for a while (an NFS mount gone away): every call fails
  with ``LockspaceUnavailable``.

``slow`` and ``lost-answers`` do nothing here: a local call has no way to be
slow or to lose its answer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, Final, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred

from ferry.clock import ReactorClock
from ferry.lease.backend import Grant, Holder, LeaseMode, LockspaceUnavailable
from ferry.lease.local import LocalLockspace
from ferry.sim.process import ProcessTime
from ferry.sim.world import World

__all__ = ["LocalClient", "SimLocalLockspace"]

_T = TypeVar("_T")

#: Where the lock directories go: memory, when the machine has it.
_SHM: Final = "/dev/shm"


class SimLocalLockspace:
    """One run's lock directory, and a :class:`LocalClient` for each process."""

    kind: Final = "local"
    ttl: Final = None

    def __init__(self, world: World) -> None:
        self.world = world
        base = _SHM if os.path.isdir(_SHM) else None
        self.directory = tempfile.mkdtemp(prefix="ferry-sim-", dir=base)  # mode 0700
        self._observer = LocalLockspace(self.directory)
        self._clients: list[LocalClient] = []
        # The files change only through a client's call or a death: the
        # holder is read again only after one (the invariants ask at every step).
        self.changes = 0
        self._known: tuple[int, Holder | None] | None = None

    def client(self, process: ProcessTime, host: str, clock: ReactorClock) -> LocalClient:
        """How ``process`` reaches the directory (every call answers at once: no clock)."""
        client = LocalClient(self, process)
        self._clients.append(client)
        return client

    def impair(self, process: ProcessTime, kind: str, severity: float) -> Callable[[], None]:
        """``unreachable`` or ``partition``: the directory unusable from ``process``."""
        clients = [c for c in self._clients if c.process is process]
        if kind not in ("unreachable", "partition") or not clients:
            return _nothing
        (client,) = clients
        client.unreachable = True

        def reachable() -> None:
            client.unreachable = False

        return reachable

    def holder(self, resource: str) -> Holder | None:
        """Who the lock file says holds ``resource`` exclusively now (None: nobody).

        The simulator has one resource, so one answer is remembered.
        """
        if self._known is not None and self._known[0] == self.changes:
            return self._known[1]
        answer: list[tuple[Holder, ...]] = []
        self._observer.inquire(resource).addCallback(answer.append)
        holders = answer[0] if answer else ()
        holder = next((h for h in holders if h.mode is LeaseMode.EXCLUSIVE), None)
        self._known = (self.changes, holder)
        return holder

    def close(self) -> None:
        """The run is over: every descriptor closed, the directory removed."""
        for client in self._clients:
            client.died()
        self._observer.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class LocalClient:
    """One process's :class:`~ferry.lease.local.LocalLockspace`, through the faults."""

    def __init__(self, space: SimLocalLockspace, process: ProcessTime) -> None:
        self.space = space
        self.process = process
        self.unreachable = False
        self._real = LocalLockspace(space.directory)
        process.on_death(self.died)

    @property
    def spec(self) -> str:
        return self._real.spec

    def died(self) -> None:
        """The process is gone: the kernel closes its descriptors, and so its locks go."""
        self.space.changes += 1
        holds = self._real._holds  # the descriptors the grants keep
        for hold in holds.values():
            with contextlib.suppress(OSError):
                os.close(hold.fd)
        holds.clear()

    # -- LeaseBackend -------------------------------------------------------------------

    def acquire(self, resource: str, owner: str, mode: LeaseMode) -> Deferred[Grant]:
        return self._call(self._real.acquire, resource, owner, mode)

    def renew(self, grant: Grant) -> Deferred[None]:
        return self._call(self._real.renew, grant)

    def release(self, grant: Grant) -> Deferred[None]:
        return self._call(self._real.release, grant)

    def inquire(self, resource: str) -> Deferred[tuple[Holder, ...]]:
        return self._call(self._real.inquire, resource)

    def offer(self, grant: Grant) -> Deferred[Grant]:
        return self._call(self._real.offer, grant)

    def take_over(self, resource: str, owner: str, token: int) -> Deferred[Grant]:
        return self._call(self._real.take_over, resource, owner, token)

    def publish(self, grant: Grant, address: str) -> Deferred[None]:
        return self._call(self._real.publish, grant, address)

    def where(self, resource: str) -> Deferred[list[str]]:
        return self._call(self._real.where, resource)

    def watch(self, grant: Grant, on_lost: Callable[[str], None]) -> Callable[[], None]:
        return self._real.watch(grant, on_lost)  # no reactor: renewals find a loss

    def close(self) -> Deferred[None]:
        return self._real.close()

    def _call(self, operation: Callable[..., Deferred[_T]], *args: Any) -> Deferred[_T]:
        if self.process.dead:
            return Deferred()  # a dead process hears nothing
        if self.unreachable:
            return defer.fail(LockspaceUnavailable("simulated: the lock directory is unusable"))
        self.space.changes += 1
        return operation(*args)


def _nothing() -> None:
    """A fault that does nothing here."""
