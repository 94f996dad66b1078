"""An in-memory lockspace: a :class:`~ferry.lease.backend.LeaseBackend` for unit tests.

It keeps the contract honestly, on the test's simulated clock: exclusive
and shared holders exclude each other, an exclusive acquire or a take-over
gets the next token, an offered lease can be moved only by its token, and a
grant with a TTL that is not renewed in time is gone (``LeaseLost`` on the
next renewal, and its watchers are told).  Many managers may share one
fake, as many processes share one lockspace.

Faults the test can script:

* ``unreachable``: every call fails with ``LockspaceUnavailable``.
* ``renewals_fail``: renewals fail with ``LockspaceUnavailable`` and do not
  extend the grant (the lockspace never saw them).
* ``renewals_hang``: renewals never answer (kept in :attr:`hung`).
* ``delayed``: operation names whose *answers* wait for :meth:`deliver`;
  the operation itself has already happened, as with a slow network.
* :meth:`lose`: the lockspace drops every grant on a resource (an
  operator's ``etcdctl del``, a removed lock file); watchers are told.
* ``watching``: whether watchers are told at all (False: a backend that
  notices loss only on renewal, like the local one).

Grants pass to another manager as they are (``pass_on``/``adopt``, like
etcd's: the same handle and token), and ``let_go`` only records the call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred

from ferry.clock import Clock
from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    LockspaceUnavailable,
    PassedGrant,
)

_T = TypeVar("_T")

UNREACHABLE = "fake lockspace unreachable"


@dataclass
class _Entry:
    handle: int
    resource: str
    owner: str
    mode: LeaseMode
    token: int
    expires_at: float | None
    offered: bool = False
    watchers: list[Callable[[str], None]] = field(default_factory=list)

    def holder(self) -> Holder:
        return Holder(self.owner, self.mode, self.token, self.offered)


@dataclass
class _Resource:
    token: int = 0
    entries: dict[int, _Entry] = field(default_factory=dict)

    def exclusive(self) -> _Entry | None:
        return next((e for e in self.entries.values() if e.mode is LeaseMode.EXCLUSIVE), None)

    def holders(self) -> tuple[Holder, ...]:
        ordered = sorted(self.entries.values(), key=lambda e: (e.mode is not LeaseMode.EXCLUSIVE,))
        return tuple(e.holder() for e in ordered)


class FakeLockspace:
    def __init__(self, clock: Clock, *, ttl: float | None = 9.0, spec: str = "fake:") -> None:
        self.clock = clock
        self.ttl = ttl
        self._spec = spec
        self.unreachable = False
        self.renewals_fail = False
        self.renewals_hang = False
        self.watching = True
        self.delayed: set[str] = set()
        self.hung: list[Deferred[None]] = []
        self.calls: list[tuple[float, str, str]] = []  # (time, operation, resource)
        self._waiting: list[tuple[Deferred[Any], Callable[[], Any]]] = []
        self._resources: dict[str, _Resource] = {}
        self._handles = itertools.count(1)

    @property
    def spec(self) -> str:
        return self._spec

    # -- what a test looks at and does ---------------------------------------------

    def renewals(self, resource: str | None = None) -> list[float]:
        """When renewals were asked for (of ``resource``, or of any)."""
        return [t for t, op, r in self.calls if op == "renew" and resource in (None, r)]

    def holders_now(self, resource: str) -> tuple[Holder, ...]:
        """Who holds ``resource`` right now, without recording a call."""
        return self._resource(resource).holders()

    def lose(self, resource: str, reason: str = "removed from the lockspace") -> None:
        """Drop every grant on ``resource``; watchers hear ``reason``."""
        res = self._resource(resource)
        for entry in list(res.entries.values()):
            self._drop(res, entry, reason)

    def deliver(self) -> None:
        """Hand over the answers held back by :attr:`delayed`, in order."""
        waiting, self._waiting = self._waiting, []
        for d, outcome in waiting:
            defer.maybeDeferred(outcome).chainDeferred(d)

    # -- LeaseBackend ----------------------------------------------------------------

    def acquire(self, resource: str, owner: str, mode: LeaseMode) -> Deferred[Grant]:
        return self._answer("acquire", resource, lambda: self._acquire(resource, owner, mode))

    def renew(self, grant: Grant) -> Deferred[None]:
        if self.renewals_hang and not self.unreachable:
            self.calls.append((self.clock.seconds(), "renew", grant.resource))
            d: Deferred[None] = Deferred()
            self.hung.append(d)
            return d
        return self._answer("renew", grant.resource, lambda: self._renew(grant))

    def release(self, grant: Grant) -> Deferred[None]:
        return self._answer("release", grant.resource, lambda: self._release(grant))

    def inquire(self, resource: str) -> Deferred[tuple[Holder, ...]]:
        return self._answer("inquire", resource, lambda: self._inquire(resource))

    def offer(self, grant: Grant) -> Deferred[Grant]:
        return self._answer("offer", grant.resource, lambda: self._offer(grant))

    def take_over(self, resource: str, owner: str, token: int) -> Deferred[Grant]:
        return self._answer("take_over", resource, lambda: self._take_over(resource, owner, token))

    def watch(self, grant: Grant, on_lost: Callable[[str], None]) -> Callable[[], None]:
        entry = self._resource(grant.resource).entries.get(grant.handle)
        if entry is None:
            return lambda: None
        entry.watchers.append(on_lost)

        def stop() -> None:
            if on_lost in entry.watchers:
                entry.watchers.remove(on_lost)

        return stop

    def close(self) -> Deferred[None]:
        self._resources.clear()
        return defer.succeed(None)

    # -- PassingBackend --------------------------------------------------------------

    def pass_on(self, grant: Grant) -> PassedGrant:
        self._entry(grant)
        self.calls.append((self.clock.seconds(), "pass_on", grant.resource))
        return PassedGrant(grant)

    def let_go(self, grant: Grant) -> None:
        self.calls.append((self.clock.seconds(), "let_go", grant.resource))

    def adopt(self, passed: PassedGrant) -> Grant:
        self.calls.append((self.clock.seconds(), "adopt", passed.grant.resource))
        entry = self._entry(passed.grant)
        if entry.holder() != passed.grant.holder:
            raise LeaseLost(f"lease on {passed.grant.resource} is not the grant passed on")
        return passed.grant

    # -- the semantics ---------------------------------------------------------------------

    def _acquire(self, resource: str, owner: str, mode: LeaseMode) -> Grant:
        res = self._live(resource)
        exclusive = mode is LeaseMode.EXCLUSIVE
        if res.entries and (exclusive or res.exclusive() is not None):
            raise LeaseConflict(resource, res.holders())
        if exclusive:
            res.token += 1
        return self._grant(res, resource, owner, mode)

    def _renew(self, grant: Grant) -> None:
        if self.renewals_fail:
            raise LockspaceUnavailable("fake lockspace: renewals are failing")
        entry = self._entry(grant)
        if entry.expires_at is not None and self.ttl is not None:
            entry.expires_at = self.clock.seconds() + self.ttl

    def _release(self, grant: Grant) -> None:
        res = self._live(grant.resource)
        res.entries.pop(grant.handle, None)

    def _inquire(self, resource: str) -> tuple[Holder, ...]:
        return self._live(resource).holders()

    def _offer(self, grant: Grant) -> Grant:
        entry = self._entry(grant)
        if entry.mode is not LeaseMode.EXCLUSIVE:
            raise LeaseError(f"lease on {grant.resource} is {entry.mode.value}: cannot offer it")
        entry.offered = True
        return replace(grant, holder=entry.holder())

    def _take_over(self, resource: str, owner: str, token: int) -> Grant:
        res = self._live(resource)
        if res.token != token:
            raise LeaseConflict(
                resource, res.holders(), f"lease on {resource} has token {res.token}, not {token}"
            )
        if any(e.mode is not LeaseMode.EXCLUSIVE for e in res.entries.values()):
            raise LeaseConflict(resource, res.holders())  # shared holders came in meanwhile
        new = self._next_token(res)
        grant = self._grant(res, resource, owner, LeaseMode.EXCLUSIVE, token=new)
        for entry in list(res.entries.values()):
            if entry.handle != grant.handle:
                self._drop(res, entry, f"taken over by {owner} (token {new})")
        return grant

    # -- helpers ---------------------------------------------------------------------------

    def _answer(self, op: str, resource: str, outcome: Callable[[], _T]) -> Deferred[_T]:
        self.calls.append((self.clock.seconds(), op, resource))
        if self.unreachable:
            return defer.fail(LockspaceUnavailable(UNREACHABLE))
        if op in self.delayed:
            result = defer.maybeDeferred(outcome)  # it happens now; the answer comes later
            d: Deferred[_T] = Deferred()
            self._waiting.append((d, lambda: result))
            return d
        return defer.maybeDeferred(outcome)

    def _resource(self, resource: str) -> _Resource:
        return self._resources.setdefault(resource, _Resource())

    def _live(self, resource: str) -> _Resource:
        """The resource, after dropping grants whose TTL ran out."""
        res = self._resource(resource)
        now = self.clock.seconds()
        for entry in list(res.entries.values()):
            if entry.expires_at is not None and now >= entry.expires_at:
                self._drop(res, entry, f"lease on {resource} expired")
        return res

    def _entry(self, grant: Grant) -> _Entry:
        entry = self._live(grant.resource).entries.get(grant.handle)
        if entry is None:
            raise LeaseLost(f"lease on {grant.resource} (token {grant.token}) is gone")
        return entry

    def _next_token(self, res: _Resource) -> int:
        res.token += 1
        return res.token

    def _grant(
        self, res: _Resource, resource: str, owner: str, mode: LeaseMode, token: int | None = None
    ) -> Grant:
        handle = next(self._handles)
        expires = None if self.ttl is None else self.clock.seconds() + self.ttl
        entry = _Entry(
            handle, resource, owner, mode, res.token if token is None else token, expires
        )
        res.entries[handle] = entry
        return Grant(resource, entry.holder(), self.ttl, handle)

    def _drop(self, res: _Resource, entry: _Entry, reason: str) -> None:
        res.entries.pop(entry.handle, None)
        if self.watching:
            for on_lost in list(entry.watchers):
                on_lost(reason)
