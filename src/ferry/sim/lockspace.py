"""The simulated lockspace: etcd as one table on the world's clock, and each process's way to it.

A run's lockspace is etcd or a local lock directory, drawn from the seed.
The local one is ferry's own, on real lock files (:mod:`ferry.sim.locallock`);
etcd is modelled here.  :class:`SimLockspace` keeps the truth -- who holds
each resource, under which token, until when -- as etcd does: grants have
a TTL, counted by the lockspace on its own clock from when a renewal
*arrives*; every write (acquire, offer, take-over) moves a global revision,
which is the token, so an offer answers with a new token; a key that
expired is gone, and a take-over by its token finds nothing; watches tell
a holder when its key goes.  Requests travel: they take time, they may not
arrive (unreachable: the answer is ``LockspaceUnavailable`` after the
request time-out), and an answer may be lost after the request was applied
-- the outcome the real backend cannot know, after which it revokes the
lease it made for an acquire or a take-over (which may or may not get
through either).

Each process reaches it through a :class:`LockspaceClient`, the
:class:`~ferry.lease.backend.LeaseBackend` its lease manager is given; the
faults act per client (this process cannot reach etcd, that one is slow).
Answers are delivered through the process's gate, so a paused process hears
nothing until it resumes.

:meth:`SimLockspace.holder` is what the invariants ask: the grant the
lockspace honours right now.  :class:`Lockspace` is what the rest of the
simulator needs of either kind.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred

from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseBackend,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    LockspaceUnavailable,
)
from ferry.sim.process import ProcessTime
from ferry.sim.world import World

__all__ = [
    "KINDS",
    "REQUEST_TIMEOUT",
    "ClientFaults",
    "FaultyBackend",
    "Lockspace",
    "LockspaceClient",
    "SimLockspace",
]

_T = TypeVar("_T")

KINDS: Final = ("etcd", "local")
#: How long an etcd request waits for an answer before the client gives up.
REQUEST_TIMEOUT: Final = 2.0


@dataclass
class _Entry:
    """One exclusive grant as the lockspace keeps it."""

    owner: str
    token: int
    handle: int
    process: ProcessTime
    expires_at: float | None
    offered: bool = False
    address: str | None = None  # where the holder serves (``publish``), for a proxy
    watchers: list[tuple[ProcessTime, Callable[[str], None]]] = field(default_factory=list)
    timer: Any = None

    def holder(self) -> Holder:
        return Holder(self.owner, LeaseMode.EXCLUSIVE, self.token, self.offered)


@dataclass
class _Resource:
    name: str
    entry: _Entry | None = None


@dataclass
class ClientFaults:
    """What stands between one process and the lockspace now."""

    unreachable: bool = False
    slow: float = 0.0  # extra seconds each way
    lost_answers: float = 0.0  # chance that an applied request's answer is lost


class FaultyBackend(LeaseBackend, Protocol):
    """A process's way to the lockspace, and what stands in that way now."""

    faults: ClientFaults


class Lockspace(Protocol):
    """What the simulator needs of a run's lockspace, etcd's model or the real local one."""

    @property
    def kind(self) -> str: ...

    @property
    def ttl(self) -> float | None: ...

    def client(self, process: ProcessTime, *, steal: bool = False) -> FaultyBackend:
        """How ``process`` reaches it (``steal``: a planted bug, see ferry.sim.bugs)."""
        ...

    def holder(self, resource: str) -> Holder | None:
        """Who holds ``resource`` exclusively now, in the lockspace's own view."""
        ...

    def close(self) -> None:
        """The run is over."""
        ...


class SimLockspace:
    """etcd's truth; see the module doc."""

    kind: Final = "etcd"

    def __init__(self, world: World, ttl: float) -> None:
        self.world = world
        self.ttl: float = ttl
        self.rng = world.stream("lockspace")
        self._resources: dict[str, _Resource] = {}
        self._revision = 0
        self._handles = itertools.count(1)

    def client(self, process: ProcessTime, *, steal: bool = False) -> LockspaceClient:
        """How ``process`` reaches the lockspace (``steal``: a planted bug, see ferry.sim.bugs)."""
        return LockspaceClient(self, process, steal=steal)

    def close(self) -> None:
        """Nothing outlives the run."""

    # -- the truth --------------------------------------------------------------------

    def holder(self, resource: str) -> Holder | None:
        """Who the lockspace says holds ``resource`` exclusively now (None: nobody)."""
        entry = self._live(resource).entry
        return None if entry is None else entry.holder()

    def _resource(self, resource: str) -> _Resource:
        res = self._resources.get(resource)
        if res is None:
            res = self._resources[resource] = _Resource(resource)
        return res

    def _live(self, resource: str) -> _Resource:
        res = self._resource(resource)
        entry = res.entry
        if entry is not None and not self._alive(entry):
            self._drop(res, f"lease on {resource} expired")
        return res

    def _alive(self, entry: _Entry) -> bool:
        return entry.expires_at is None or self.world.now() < entry.expires_at

    def _drop(self, res: _Resource, reason: str) -> None:
        entry, res.entry = res.entry, None
        if entry is None:
            return
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        for process, on_lost in entry.watchers:
            process.later(self._latency(), on_lost, reason)

    def _next_token(self) -> int:
        """etcd's revision: every write moves it, and it is the token."""
        self._revision += 1
        return self._revision

    def _latency(self) -> float:
        return self.rng.uniform(0.0005, 0.01)

    def _new_entry(self, res: _Resource, owner: str, process: ProcessTime) -> Grant:
        token = self._next_token()
        entry = _Entry(owner, token, next(self._handles), process, None)
        self._extend(entry)
        res.entry = entry
        return Grant(res.name, entry.holder(), self.ttl, entry.handle)

    def _extend(self, entry: _Entry) -> None:
        entry.expires_at = self.world.now() + self.ttl
        if entry.watchers:
            self._arm_expiry(entry)

    def _arm_expiry(self, entry: _Entry) -> None:
        assert entry.expires_at is not None
        delay = entry.expires_at - self.world.now()
        if entry.timer is not None and entry.timer.active():
            entry.timer.reset(delay)
        else:
            entry.timer = self.world.clock.callLater(delay, self._expire, entry)

    def _expire(self, entry: _Entry) -> None:
        for res in self._resources.values():
            if res.entry is entry:
                self._live(res.name)

    # -- the operations, applied at the lockspace ---------------------------------------

    def _acquire(self, resource: str, owner: str, process: ProcessTime) -> Grant:
        res = self._live(resource)
        if res.entry is not None:
            raise LeaseConflict(resource, (res.entry.holder(),))
        return self._new_entry(res, owner, process)

    def _renew(self, grant: Grant) -> None:
        entry = self._entry_of(grant)
        self._extend(entry)

    def _release(self, grant: Grant) -> None:
        res = self._live(grant.resource)
        entry = res.entry
        if entry is not None and entry.handle == grant.handle and entry.token == grant.token:
            entry.watchers.clear()
            self._drop(res, "released")

    def _inquire(self, resource: str) -> tuple[Holder, ...]:
        entry = self._live(resource).entry
        return () if entry is None else (entry.holder(),)

    def _offer(self, grant: Grant) -> Grant:
        entry = self._entry_of(grant)
        entry.offered = True
        entry.token = self._next_token()
        return replace(grant, holder=entry.holder())

    def _take_over(
        self, resource: str, owner: str, token: int, process: ProcessTime, *, steal: bool
    ) -> Grant:
        res = self._live(resource)
        entry = res.entry
        # etcd compares the key's revision: a key gone (expired, released) matches nothing.
        current = None if entry is None else entry.token
        if current != token and not steal:
            holders = () if entry is None else (entry.holder(),)
            raise LeaseConflict(
                resource, holders, f"lease on {resource} is not held under token {token}"
            )
        if entry is not None:
            self._drop(res, f"taken over by {owner}")
        return self._new_entry(res, owner, process)

    def _entry_of(self, grant: Grant) -> _Entry:
        entry = self._live(grant.resource).entry
        if entry is None or entry.handle != grant.handle or entry.token != grant.token:
            raise LeaseLost(f"lease on {grant.resource} (token {grant.token}) is gone")
        return entry

    def _publish(self, grant: Grant, address: str) -> None:
        self._entry_of(grant).address = address

    def _where(self, resource: str) -> list[str]:
        entry = self._live(resource).entry
        return [] if entry is None or entry.address is None else [entry.address]

    def _watch(self, grant: Grant, process: ProcessTime, on_lost: Callable[[str], None]) -> Any:
        entry = self._live(grant.resource).entry
        if entry is None or entry.handle != grant.handle:
            return None
        watcher = (process, on_lost)
        entry.watchers.append(watcher)
        self._arm_expiry(entry)
        return entry, watcher


class LockspaceClient:
    """One process's :class:`~ferry.lease.backend.LeaseBackend`, through the faults."""

    def __init__(self, space: SimLockspace, process: ProcessTime, *, steal: bool) -> None:
        self.space = space
        self.process = process
        self.steal = steal  # take-overs ignore the token
        self.faults = ClientFaults()
        self.rng = space.world.stream(f"lockspace client {process.name}")

    @property
    def spec(self) -> str:
        return "sim-etcd:"

    # -- LeaseBackend -------------------------------------------------------------------

    def acquire(self, resource: str, owner: str, mode: LeaseMode) -> Deferred[Grant]:
        if mode is not LeaseMode.EXCLUSIVE:
            return defer.fail(LeaseError("the simulated lockspace takes exclusive leases only"))
        return self._call(
            "acquire", lambda: self.space._acquire(resource, owner, self.process), makes_grant=True
        )

    def renew(self, grant: Grant) -> Deferred[None]:
        return self._call("renew", lambda: self.space._renew(grant))

    def release(self, grant: Grant) -> Deferred[None]:
        return self._call("release", lambda: self.space._release(grant))

    def inquire(self, resource: str) -> Deferred[tuple[Holder, ...]]:
        return self._call("inquire", lambda: self.space._inquire(resource))

    def offer(self, grant: Grant) -> Deferred[Grant]:
        return self._call("offer", lambda: self.space._offer(grant))

    def take_over(self, resource: str, owner: str, token: int) -> Deferred[Grant]:
        return self._call(
            "take_over",
            lambda: self.space._take_over(resource, owner, token, self.process, steal=self.steal),
            makes_grant=True,
        )

    def publish(self, grant: Grant, address: str) -> Deferred[None]:
        return self._call("publish", lambda: self.space._publish(grant, address))

    def where(self, resource: str) -> Deferred[list[str]]:
        return self._call("where", lambda: self.space._where(resource))

    def watch(self, grant: Grant, on_lost: Callable[[str], None]) -> Callable[[], None]:
        found = self.space._watch(grant, self.process, on_lost)
        if found is None:
            return lambda: None
        entry, watcher = found

        def stop() -> None:
            if watcher in entry.watchers:
                entry.watchers.remove(watcher)

        return stop

    def close(self) -> Deferred[None]:
        return defer.succeed(None)

    # -- the way there and back -------------------------------------------------------------

    def _call(self, op: str, apply: Callable[[], _T], *, makes_grant: bool = False) -> Deferred[_T]:
        d: Deferred[_T] = Deferred()
        space, faults = self.space, self.faults
        applied: list[Any] = []

        def arrive() -> None:
            if self.faults.unreachable:
                return  # lost on the way: the time-out answers
            try:
                result: Any = apply()
            except LeaseError as error:
                result = error
            applied.append(result)
            if faults.lost_answers and self.rng.random() < faults.lost_answers:
                return  # applied, and the answer lost
            self.process.later(space._latency() + faults.slow, settle, result)

        def settle(result: Any) -> None:
            if d.called:
                return
            if isinstance(result, LeaseError):
                d.errback(result)
            else:
                d.callback(result)

        def time_out() -> None:
            if d.called:
                return
            # The backend revokes the lease it made for an unknown outcome; the
            # revoke may not get through either.
            made = makes_grant and applied and not isinstance(applied[0], LeaseError)
            if made and not self.faults.unreachable and self.rng.random() < 0.5:
                space._release(applied[0])
            d.errback(LockspaceUnavailable(f"simulated etcd: no answer to {op}"))

        space.world.call_later(space._latency() + faults.slow, "lockspace", arrive)
        self.process.later(REQUEST_TIMEOUT, time_out)
        return d
