"""The etcd lockspace against a real etcd 3.4 (one member, started by the module's fixture).

Every test works on a resource of its own, so the tests share one etcd
without seeing each other's keys.  Waits are Deferreds with deadlines: an
expiry is observed through a watch, a paused etcd through the request
time-out; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred

from etcd_support import MIN_TTL, EtcdServer, etcd_fixture
from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    LockspaceUnavailable,
)
from ferry.lease.etcd import EtcdLockspace
from support import free_port

pytestmark = pytest.mark.integration

__all__ = ["etcd_fixture"]  # the module's etcd fixture: pytest finds it by its name, "etcd"

reactor: Any = _reactor
DEADLINE = 10.0
EXCLUSIVE, SHARED, READONLY = LeaseMode.EXCLUSIVE, LeaseMode.SHARED, LeaseMode.READONLY

MakeLockspace = Callable[..., EtcdLockspace]


def within(d: Deferred[Any], seconds: float = DEADLINE) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


async def failure_of(d: Deferred[Any]) -> Exception:
    """The exception ``d`` fails with (the test fails if it succeeds)."""
    try:
        result = await within(d)
    except Exception as exc:
        return exc
    raise AssertionError(f"expected a failure, got {result!r}")


def lost_signal() -> tuple[Deferred[str], Callable[[str], None], list[str]]:
    """An ``on_lost`` callback, the Deferred it fires, and every reason it was called with."""
    fired: Deferred[str] = Deferred()
    calls: list[str] = []

    def on_lost(reason: str) -> None:
        calls.append(reason)
        if not fired.called:
            fired.callback(reason)

    return fired, on_lost, calls


@pytest.fixture
def make_lockspace(etcd: EtcdServer) -> Iterator[MakeLockspace]:
    """Builds lockspaces (on the module's etcd unless told otherwise); closes them after."""
    made: list[EtcdLockspace] = []

    def make(endpoints: list[str] | None = None, **options: Any) -> EtcdLockspace:
        lockspace = EtcdLockspace(endpoints or [etcd.url], reactor=reactor, **options)
        made.append(lockspace)
        return lockspace

    yield make
    for lockspace in made:
        pytest_twisted.blockon(lockspace.close())


@pytest.fixture
def lockspace(make_lockspace: MakeLockspace) -> EtcdLockspace:
    return make_lockspace()


@pytest.fixture
def resource(request: pytest.FixtureRequest) -> str:
    return f"/var/lib/images/{request.node.name}.qcow2"


# -- acquire and conflicts ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_exclusive_acquire_on_a_free_resource(
    lockspace: EtcdLockspace, resource: str, etcd: EtcdServer
) -> None:
    # The exclusive compare covers the resource's whole (empty) key range:
    # etcd 3.4 holds "create_revision == 0" for a range with no keys.
    grant: Grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    assert grant.resource == resource
    assert grant.token > 0
    assert grant.ttl == 10
    assert grant.handle != 0
    assert lockspace.spec == f"etcd:{etcd.url}"
    holders = await within(lockspace.inquire(resource))
    assert holders == (Holder("a:1:src", EXCLUSIVE, grant.token),)
    await within(lockspace.renew(grant))


@pytest_twisted.ensureDeferred
async def test_a_second_exclusive_acquire_names_the_holder(
    lockspace: EtcdLockspace, resource: str
) -> None:
    first = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    conflict = await failure_of(lockspace.acquire(resource, "b:2:dst", EXCLUSIVE))
    assert isinstance(conflict, LeaseConflict)
    assert conflict.holders == (first.holder,)
    assert "a:1:src (exclusive, token" in str(conflict)
    # The loser's etcd lease was revoked: only the holder's key is there.
    assert await within(lockspace.inquire(resource)) == (first.holder,)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", [SHARED, READONLY])
async def test_shared_holders_coexist(
    lockspace: EtcdLockspace, resource: str, mode: LeaseMode
) -> None:
    one = await within(lockspace.acquire(resource, "a:1:reader", mode))
    two = await within(lockspace.acquire(resource, "b:2:reader", SHARED))
    assert two.token > one.token
    holders = await within(lockspace.inquire(resource))
    assert holders == (one.holder, two.holder)
    again = await failure_of(lockspace.acquire(resource, "a:1:reader", SHARED))
    assert isinstance(again, LeaseConflict), "the same owner twice is a conflict"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", [SHARED, READONLY])
async def test_shared_then_exclusive_conflicts(
    lockspace: EtcdLockspace, resource: str, mode: LeaseMode
) -> None:
    reader = await within(lockspace.acquire(resource, "a:1:reader", mode))
    conflict = await failure_of(lockspace.acquire(resource, "b:2:writer", EXCLUSIVE))
    assert isinstance(conflict, LeaseConflict)
    assert conflict.holders == (reader.holder,)
    assert f"a:1:reader ({mode.value}" in str(conflict)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", [SHARED, READONLY])
async def test_exclusive_then_shared_conflicts(
    lockspace: EtcdLockspace, resource: str, mode: LeaseMode
) -> None:
    writer = await within(lockspace.acquire(resource, "a:1:writer", EXCLUSIVE))
    conflict = await failure_of(lockspace.acquire(resource, "b:2:reader", mode))
    assert isinstance(conflict, LeaseConflict)
    assert conflict.holders == (writer.holder,)
    assert await within(lockspace.inquire(resource)) == (writer.holder,)


# -- tokens, release, offer and take-over ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_strictly_increase(lockspace: EtcdLockspace, resource: str) -> None:
    first = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    await within(lockspace.release(first))
    assert await within(lockspace.inquire(resource)) == ()
    second = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    offered = await within(lockspace.offer(second))
    taken = await within(lockspace.take_over(resource, "b:2:dst", offered.token))
    tokens = [first.token, second.token, offered.token, taken.token]
    assert tokens == sorted(set(tokens)), tokens
    assert offered.holder.offered and offered.handle == second.handle
    assert not taken.holder.offered
    assert await within(lockspace.inquire(resource)) == (taken.holder,)


@pytest_twisted.ensureDeferred
async def test_an_offer_shows_and_supersedes_the_old_grant(
    lockspace: EtcdLockspace, resource: str
) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    offered = await within(lockspace.offer(grant))
    assert await within(lockspace.inquire(resource)) == (
        Holder("a:1:src", EXCLUSIVE, offered.token, offered=True),
    )
    await within(lockspace.renew(offered))
    assert isinstance(await failure_of(lockspace.renew(grant)), LeaseLost)
    blocked = await failure_of(lockspace.acquire(resource, "b:2:dst", EXCLUSIVE))
    assert isinstance(blocked, LeaseConflict)
    assert "offered for migration" in str(blocked)


@pytest_twisted.ensureDeferred
async def test_only_an_exclusive_grant_can_be_offered(
    lockspace: EtcdLockspace, resource: str
) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:reader", SHARED))
    assert isinstance(await failure_of(lockspace.offer(grant)), LeaseError)


@pytest_twisted.ensureDeferred
async def test_take_over_with_the_wrong_token_conflicts(
    lockspace: EtcdLockspace, resource: str
) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    offered = await within(lockspace.offer(grant))
    conflict = await failure_of(lockspace.take_over(resource, "b:2:dst", grant.token))
    assert isinstance(conflict, LeaseConflict)
    assert f"not held under token {grant.token}" in str(conflict)
    assert conflict.holders == (offered.holder,)
    nobody = await failure_of(lockspace.take_over(f"{resource}.free", "b:2:dst", 1))
    assert isinstance(nobody, LeaseConflict)
    assert "held by nobody" in str(nobody)


@pytest_twisted.ensureDeferred
async def test_after_a_take_over_the_old_holder_is_lost_and_its_release_harmless(
    lockspace: EtcdLockspace, resource: str
) -> None:
    old = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    offered = await within(lockspace.offer(old))
    new = await within(lockspace.take_over(resource, "b:2:dst", offered.token))
    lost = await failure_of(lockspace.renew(offered))
    assert isinstance(lost, LeaseLost)
    assert "b:2:dst" in str(lost)
    await within(lockspace.release(offered))  # revokes its etcd lease, not the new key
    assert await within(lockspace.inquire(resource)) == (new.holder,)
    await within(lockspace.renew(new))


@pytest_twisted.ensureDeferred
async def test_the_source_cancels_an_offer_by_taking_it_back(
    lockspace: EtcdLockspace, resource: str
) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    offered = await within(lockspace.offer(grant))
    back = await within(lockspace.take_over(resource, "a:1:src", offered.token))
    assert back.token > offered.token and not back.holder.offered
    late = await failure_of(lockspace.take_over(resource, "b:2:dst", offered.token))
    assert isinstance(late, LeaseConflict)
    assert late.holders == (back.holder,)
    await within(lockspace.release(offered))  # the superseded grant: its lease, not the key
    await within(lockspace.renew(back))


@pytest_twisted.ensureDeferred
async def test_the_holder_publishes_where_it_serves_and_only_the_current_one_is_named(
    lockspace: EtcdLockspace, resource: str
) -> None:
    assert await within(lockspace.where(resource)) == []
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    assert await within(lockspace.where(resource)) == []  # held, nothing published yet
    await within(lockspace.publish(grant, "10.0.0.1:10809"))
    assert await within(lockspace.where(resource)) == ["10.0.0.1:10809"]
    # Offered for a migration: the source is not where the image is any more.
    offered = await within(lockspace.offer(grant))
    assert await within(lockspace.where(resource)) == []
    new = await within(lockspace.take_over(resource, "b:2:dst", offered.token))
    assert await within(lockspace.where(resource)) == []
    stale = await failure_of(lockspace.publish(offered, "10.0.0.1:10809"))
    assert isinstance(stale, LeaseLost)
    await within(lockspace.publish(new, "[fe80::2]:10810"))
    # The source lets its lease go: the record, the destination's now, stays.
    await within(lockspace.release(offered))
    assert await within(lockspace.where(resource)) == ["[fe80::2]:10810"]
    assert await within(lockspace.inquire(resource)) == (new.holder,)  # not a holder
    await within(lockspace.release(new))
    assert await within(lockspace.where(resource)) == []


@pytest_twisted.ensureDeferred
async def test_releasing_twice_succeeds(lockspace: EtcdLockspace, resource: str) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:src", SHARED))
    await within(lockspace.release(grant))
    await within(lockspace.release(grant))
    assert await within(lockspace.inquire(resource)) == ()
    assert isinstance(await failure_of(lockspace.renew(grant)), LeaseLost)


# -- expiry and watches ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_grant_not_renewed_expires(
    make_lockspace: MakeLockspace, lockspace: EtcdLockspace, resource: str
) -> None:
    short = make_lockspace(ttl=MIN_TTL)
    grant = await within(short.acquire(resource, "a:1:src", EXCLUSIVE))
    assert grant.ttl == MIN_TTL
    fired, on_lost, _ = lost_signal()
    short.watch(grant, on_lost)
    reason = await within(fired, MIN_TTL + 5.0)  # etcd checks expiries every 0.5 s
    assert "deleted" in reason
    assert isinstance(await failure_of(short.renew(grant)), LeaseLost)
    taken = await within(lockspace.acquire(resource, "b:2:dst", EXCLUSIVE))
    assert taken.token > grant.token


@pytest_twisted.ensureDeferred
async def test_a_watch_fires_once_on_a_take_over_but_not_on_its_own_offer(
    lockspace: EtcdLockspace, resource: str
) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    fired, on_lost, calls = lost_signal()
    lockspace.watch(grant, on_lost)
    offered = await within(lockspace.offer(grant))
    taken = await within(lockspace.take_over(resource, "b:2:dst", offered.token))
    reason = await within(fired)
    assert "taken by b:2:dst" in reason
    # A further change after the loss is not reported again (seen by the time
    # a watch on the new grant reports it).
    then, on_then, _ = lost_signal()
    lockspace.watch(taken, on_then)
    await within(lockspace.release(taken))
    await within(then)
    assert calls == [reason]


@pytest_twisted.ensureDeferred
async def test_a_watch_fires_when_the_key_is_deleted(
    make_lockspace: MakeLockspace, lockspace: EtcdLockspace, resource: str
) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:reader", READONLY))
    fired, on_lost, _ = lost_signal()
    make_lockspace().watch(grant, on_lost)  # another process watching the same grant
    await within(lockspace.release(grant))
    assert "deleted" in await within(fired)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_watch_stays_quiet(lockspace: EtcdLockspace, resource: str) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    _, on_lost, calls = lost_signal()
    cancel = lockspace.watch(grant, on_lost)
    cancel()
    await within(lockspace.release(grant))
    # A second watch on another grant, fired after the release, proves the
    # event has been delivered by the time we look.
    other = await within(lockspace.acquire(resource, "b:2:dst", EXCLUSIVE))
    fired, on_other, _ = lost_signal()
    lockspace.watch(other, on_other)
    await within(lockspace.release(other))
    await within(fired)
    assert calls == []


# -- an etcd that is slow, away or restarted ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_paused_etcd_fails_renew_within_the_request_timeout(
    make_lockspace: MakeLockspace, etcd: EtcdServer, resource: str
) -> None:
    lockspace = make_lockspace(request_timeout=0.5)
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    with etcd.paused():
        started = reactor.seconds()
        failure = await failure_of(lockspace.renew(grant))
        elapsed = reactor.seconds() - started
    assert isinstance(failure, LockspaceUnavailable)
    assert "within 0.5 s" in str(failure)
    assert 0.4 <= elapsed < 1.5, elapsed
    await within(lockspace.renew(grant))  # and it recovers on the same lockspace


@pytest_twisted.ensureDeferred
async def test_unreachable_endpoints_make_the_lockspace_unavailable(
    make_lockspace: MakeLockspace, resource: str
) -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    lockspace = make_lockspace(dead, request_timeout=2.0)
    failure = await failure_of(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    assert isinstance(failure, LockspaceUnavailable)
    message = str(failure)
    assert "\n" not in message
    assert all(endpoint in message for endpoint in dead), message
    assert isinstance(await failure_of(lockspace.inquire(resource)), LockspaceUnavailable)


@pytest_twisted.ensureDeferred
async def test_a_dead_first_endpoint_fails_over_to_the_next(
    make_lockspace: MakeLockspace, etcd: EtcdServer, resource: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    lockspace = make_lockspace([dead, etcd.url])
    assert lockspace.spec == f"etcd:{dead},{etcd.url}"
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    await within(lockspace.renew(grant))
    offered = await within(lockspace.offer(grant))
    await within(lockspace.take_over(resource, "b:2:dst", offered.token))


@pytest_twisted.ensureDeferred
async def test_grants_and_watches_survive_an_etcd_restart(
    lockspace: EtcdLockspace, etcd: EtcdServer, resource: str
) -> None:
    grant = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    fired, on_lost, _ = lost_signal()
    before = etcd.watchers()
    lockspace.watch(grant, on_lost)
    await within(threads.deferToThread(etcd.wait_for_watchers, before + 1))
    etcd.restart()  # breaks the watch stream and the pooled connections
    await within(lockspace.renew(grant))
    offered = await within(lockspace.offer(grant))
    await within(lockspace.take_over(resource, "b:2:dst", offered.token))
    assert "taken by b:2:dst" in await within(fired)  # through the reopened stream


@pytest_twisted.ensureDeferred
async def test_a_watch_after_a_compaction_looks_at_the_key_as_it_is(
    lockspace: EtcdLockspace, etcd: EtcdServer, resource: str
) -> None:
    # The history a watch would replay from its grant's token is gone, so
    # etcd cancels it; the watch then reads the key instead.
    gone = await within(lockspace.acquire(resource, "a:1:src", EXCLUSIVE))
    await within(lockspace.take_over(resource, "b:2:dst", gone.token))
    held = await within(lockspace.acquire(f"{resource}.2", "c:3:src", EXCLUSIVE))
    for other in ("x", "y"):  # history after held.token + 1, so that it is compacted too
        await within(lockspace.acquire(f"{resource}.{other}", "e:5:other", SHARED))
    assert etcd.compact() > held.token + 1
    fired_gone, on_gone, _ = lost_signal()
    lockspace.watch(gone, on_gone)
    fired_held, on_held, calls = lost_signal()
    lockspace.watch(held, on_held)
    assert "held by b:2:dst" in await within(fired_gone)
    # The grant still held is watched again, from the revision it was read at.
    offered = await within(lockspace.offer(held))
    await within(lockspace.take_over(held.resource, "d:4:dst", offered.token))
    assert "taken by d:4:dst" in await within(fired_held)
    assert len(calls) == 1
