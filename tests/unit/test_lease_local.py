"""LocalLockspace (``local:DIR``) in a temporary directory, and the ``--lockspace`` text.

Two ``LocalLockspace`` objects in this one process stand for two
processes: OFD locks belong to the open file, so they exclude each other
exactly as separate processes would.  Where only a real process will do
(one that dies holding the lease) a child is started, and the test waits on
its output and its exit, never on a sleep.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ferry.clock import ReactorClock
from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    LockspaceUnavailable,
)
from ferry.lease.local import (
    LEDGER_COPY_SIZE,
    MAX_HOLDERS,
    TOKENS_FILE,
    LocalLockspace,
    lock_file_name,
)
from ferry.lease.manager import CHECK_INTERVAL, LeaseManager
from ferry.lease.spec import (
    ROOT_LOCK_DIR,
    EtcdSpec,
    LocalSpec,
    default_lockspace,
    default_lockspace_dir,
    default_resource,
    open_lockspace,
    parse_lockspace,
)
from support import Deadline, read_line

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

EXCLUSIVE, SHARED, READONLY = LeaseMode.EXCLUSIVE, LeaseMode.SHARED, LeaseMode.READONLY
IMAGE = "/srv/images/vm1.img"


def result(d: Deferred[T]) -> T:
    """LocalLockspace answers with fired Deferreds; this unwraps one (raising failures)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def failure_of(d: Deferred[Any], kind: type[E]) -> E:
    with pytest.raises(kind) as info:
        result(d)
    return info.value


@pytest.fixture
def lockspaces(tmp_path: Path) -> Iterator[tuple[LocalLockspace, LocalLockspace, LocalLockspace]]:
    """Three holders' views of one lockspace directory ("source", "destination", "other")."""
    views = (LocalLockspace(tmp_path), LocalLockspace(tmp_path), LocalLockspace(tmp_path))
    yield views
    for view in views:
        result(view.close())


def acquire(space: LocalLockspace, owner: str, mode: LeaseMode = EXCLUSIVE) -> Grant:
    return result(space.acquire(IMAGE, owner, mode))


def holders(space: LocalLockspace) -> list[tuple[str, str, int, bool]]:
    return [(h.owner, h.mode.value, h.token, h.offered) for h in result(space.inquire(IMAGE))]


# -- who may hold it together --------------------------------------------------------


def test_exclusive_holders_exclude_each_other_even_in_one_process(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    grant = acquire(a, "a")
    conflict = failure_of(b.acquire(IMAGE, "b", EXCLUSIVE), LeaseConflict)
    assert conflict.holders == (Holder("a", EXCLUSIVE, 1),)
    assert str(conflict) == f"lease on {IMAGE} is held by a (exclusive, token 1)"
    # Two grants through the same LocalLockspace object are two open files too.
    failure_of(a.acquire(IMAGE, "a-again", EXCLUSIVE), LeaseConflict)
    result(a.renew(grant))


def test_shared_holders_coexist(lockspaces: Any) -> None:
    a, b, c = lockspaces
    acquire(a, "a", SHARED)
    acquire(b, "b", SHARED)
    acquire(c, "c", READONLY)
    assert holders(a) == [
        ("a", "shared", 0, False),
        ("b", "shared", 0, False),
        ("c", "readonly", 0, False),
    ]


@pytest.mark.parametrize("reader", [SHARED, READONLY])
def test_a_reader_and_an_exclusive_holder_exclude_each_other_both_ways(
    lockspaces: Any, reader: LeaseMode
) -> None:
    a, b, _ = lockspaces
    shared = acquire(a, "reader", reader)
    conflict = failure_of(b.acquire(IMAGE, "writer", EXCLUSIVE), LeaseConflict)
    assert [h.owner for h in conflict.holders] == ["reader"]
    result(a.release(shared))

    acquire(b, "writer")
    conflict = failure_of(a.acquire(IMAGE, "reader", reader), LeaseConflict)
    assert [h.owner for h in conflict.holders] == ["writer"]


def test_resources_are_independent(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    acquire(a, "a")
    assert result(b.acquire("/srv/images/other.img", "b", EXCLUSIVE)).token == 1


# -- tokens --------------------------------------------------------------------------


def test_tokens_strictly_increase_and_survive_a_new_lockspace_object(
    lockspaces: Any, tmp_path: Path
) -> None:
    a, b, _ = lockspaces
    tokens = []
    for space in (a, b, a):
        grant = acquire(space, "x")
        tokens.append(grant.token)
        result(space.release(grant))
    assert not a.path_for(IMAGE).exists()  # each release removed the file: the mark kept count
    shared = acquire(b, "reader", SHARED)
    # Shared holders see the token of the file's ledger (a new file's: none yet); they
    # never move it.
    assert shared.token == 0
    result(b.release(shared))
    fresh = LocalLockspace(tmp_path)
    grant = acquire(fresh, "fresh")
    tokens.append(grant.token)
    result(fresh.offer(grant))
    tokens.append(result(b.take_over(IMAGE, "taker", grant.token)).token)
    assert tokens == [1, 2, 3, 4, 5]
    result(fresh.close())


def test_a_grant_belongs_to_the_lockspace_object_that_gave_it(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    grant = acquire(a, "a")
    error = failure_of(b.renew(grant), LeaseLost)
    assert "not this lockspace's" in str(error)
    result(a.renew(grant))


def test_an_offer_is_taken_over_only_with_its_token(lockspaces: Any) -> None:
    source, destination, other = lockspaces
    grant = acquire(source, "src")
    offered = result(source.offer(grant))
    assert offered.holder == Holder("src", EXCLUSIVE, 1, offered=True)
    assert offered.handle == grant.handle
    assert holders(other) == [("src", "exclusive", 1, True)]
    result(source.renew(offered))  # still the source's while offered

    for mode in (EXCLUSIVE, SHARED, READONLY):
        conflict = failure_of(other.acquire(IMAGE, "other", mode), LeaseConflict)
        assert "being handed over by src (token 1)" in str(conflict)
    wrong = failure_of(destination.take_over(IMAGE, "dst", 7), LeaseConflict)
    assert "has token 1, not 7" in str(wrong)

    taken = result(destination.take_over(IMAGE, "dst", 1))
    assert taken.holder == Holder("dst", EXCLUSIVE, 2)
    lost = failure_of(source.renew(offered), LeaseLost)
    assert str(lost) == f"lease on {IMAGE} is now held by dst (exclusive, token 2)"
    assert holders(other) == [("dst", "exclusive", 2, False)]  # the old source is not listed
    failure_of(source.take_over(IMAGE, "src", 1), LeaseConflict)  # too late to cancel
    result(source.release(offered))
    result(destination.renew(taken))
    assert holders(other) == [("dst", "exclusive", 2, False)]


def test_the_source_cancels_by_taking_its_own_offer_back(lockspaces: Any) -> None:
    source, destination, other = lockspaces
    offered = result(source.offer(acquire(source, "src")))
    back = result(source.take_over(IMAGE, "src", offered.token))
    assert back.token == 2
    failure_of(destination.take_over(IMAGE, "dst", offered.token), LeaseConflict)
    failure_of(source.renew(offered), LeaseLost)
    result(source.release(offered))  # the old grant goes; the new one stays
    result(source.renew(back))
    assert holders(other) == [("src", "exclusive", 2, False)]


def _check_in_progress(path: Path) -> int:
    """A third party in the middle of its own check: it has the hold byte, for now."""
    fd = os.open(path, os.O_RDWR)
    request = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 1, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    return fd


def test_a_take_over_waits_out_a_third_partys_momentary_check(
    lockspaces: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, destination, _ = lockspaces
    offered = result(source.offer(acquire(source, "src")))
    checker = _check_in_progress(source.path_for(IMAGE))
    yields: list[int] = []

    def checker_finishes() -> None:  # what the retry loop's sched_yield lets happen
        if not yields:
            os.close(checker)
        yields.append(1)

    monkeypatch.setattr(os, "sched_yield", checker_finishes)
    assert result(destination.take_over(IMAGE, "dst", offered.token)).token == 2
    assert yields == [1]


def test_a_take_over_blocked_for_good_is_a_conflict(lockspaces: Any) -> None:
    source, destination, _ = lockspaces
    offered = result(source.offer(acquire(source, "src")))
    checker = _check_in_progress(source.path_for(IMAGE))
    try:
        conflict = failure_of(destination.take_over(IMAGE, "dst", offered.token), LeaseConflict)
    finally:
        os.close(checker)
    assert conflict.holders == (Holder("src", EXCLUSIVE, 1, offered=True),)
    assert result(destination.take_over(IMAGE, "dst", offered.token)).token == 2


def test_a_released_offer_is_stale_and_acquired_normally(lockspaces: Any) -> None:
    source, _, other = lockspaces
    offered = result(source.offer(acquire(source, "src")))
    result(source.release(offered))
    assert holders(other) == []
    assert acquire(other, "other").token == 2


def test_offering_a_shared_lease_is_refused(lockspaces: Any) -> None:
    a, _, _ = lockspaces
    error = failure_of(a.offer(acquire(a, "reader", SHARED)), LeaseError)
    assert "only an exclusive lease can be offered" in str(error)


# -- releasing and losing ----------------------------------------------------------------


def test_release_frees_the_lease_and_is_idempotent(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    grant = acquire(a, "a")
    result(a.release(grant))
    result(a.release(grant))
    failure_of(a.renew(grant), LeaseLost)
    assert holders(b) == []
    assert acquire(b, "b").token == 2


def test_close_releases_every_grant(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    acquire(a, "a", SHARED)
    result(a.acquire("/srv/images/other.img", "a", EXCLUSIVE))
    result(a.close())
    assert lock_files(a) == []  # both were a's alone: both went
    acquire(b, "b")
    assert result(b.acquire("/srv/images/other.img", "b", EXCLUSIVE)).token == 2


def test_a_removed_or_replaced_lock_file_is_a_lost_lease(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    grant = acquire(a, "a")
    path = a.path_for(IMAGE)
    path.unlink()
    assert "was removed" in str(failure_of(a.renew(grant), LeaseLost))
    newcomer = acquire(b, "b")  # a new file: nothing stops a second holder ...
    assert "was replaced" in str(failure_of(a.renew(grant), LeaseLost))  # ... but a knows
    result(b.renew(newcomer))


def test_a_removed_directory_is_a_lost_lease(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    directory.mkdir(mode=0o700)
    space = LocalLockspace(directory)
    grant = result(space.acquire(IMAGE, "a", EXCLUSIVE))
    space.path_for(IMAGE).unlink()
    directory.rmdir()
    failure_of(space.renew(grant), LeaseLost)
    result(space.release(grant))


def test_slots_are_reused(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    for _ in range(MAX_HOLDERS + 10):
        result(a.release(acquire(a, "a", SHARED)))
    readers = [acquire(b, f"r{i}", SHARED) for i in range(3)]
    assert len(holders(a)) == len(readers)


def test_a_torn_ledger_copy_is_ignored(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    # Ledger generation 1 (token 1), then 2 (offered): a released offer keeps its file.
    result(a.release(result(a.offer(acquire(a, "a")))))
    with a.path_for(IMAGE).open("r+b") as f:  # tear generation 2, as a power cut might
        f.seek(0)
        f.write(b'0000beef {"gener')
    assert acquire(b, "b").token == 2  # generation 1's token, plus one


# -- the files go with their last holder ------------------------------------------------


def lock_files(space: LocalLockspace) -> list[str]:
    return sorted(path.name for path in space.directory.glob("*.lock"))


def test_the_last_release_removes_the_file_and_tokens_go_on_growing(lockspaces: Any) -> None:
    a, b, c = lockspaces
    first = acquire(a, "a")
    assert lock_files(c) == [lock_file_name(IMAGE)]
    result(a.release(first))
    assert lock_files(c) == []
    assert holders(c) == [] and result(c.inquire_all()) == {}  # a missing file: nobody
    mark = c.directory / TOKENS_FILE
    assert mark.stat().st_mode & 0o777 == 0o600
    second = acquire(b, "b")  # a new file, but not a token that went back
    assert second.token == 2
    result(b.release(second))
    third = result(c.take_over(IMAGE, "c", 0))  # even by a take-over of a new file's token
    assert third.token == 3
    result(c.release(third))
    assert sorted(p.name for p in c.directory.iterdir()) == [TOKENS_FILE]


def test_the_mark_is_shared_by_resources_and_each_ones_tokens_grow(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    held = acquire(a, "a")  # token 1, and its file stays
    for _ in range(3):  # another resource's files come and go: tokens 1, 2, 3
        result(b.release(result(b.acquire("other", "b", EXCLUSIVE))))
    result(a.release(held))
    assert acquire(b, "b").token == 4  # above the mark (3), so above its own 1 too


def test_a_release_during_an_offer_keeps_the_file_for_the_take_over(lockspaces: Any) -> None:
    source, destination, other = lockspaces
    offered = result(source.offer(acquire(source, "src")))
    result(source.release(offered))  # a source released after sending its commit
    assert lock_files(other) == [lock_file_name(IMAGE)]
    taken = result(destination.take_over(IMAGE, "dst", offered.token))
    assert taken.token == 2
    result(destination.release(taken))
    assert lock_files(other) == []
    assert acquire(other, "other").token == 3


def test_a_source_taken_over_keeps_the_file_until_it_releases(lockspaces: Any) -> None:
    source, destination, other = lockspaces
    offered = result(source.offer(acquire(source, "src")))
    taken = result(destination.take_over(IMAGE, "dst", offered.token))
    result(destination.release(taken))  # the source has not noticed yet: its slot is live
    assert lock_files(other) == [lock_file_name(IMAGE)]
    failure_of(source.renew(offered), LeaseLost)
    result(source.release(offered))  # now nobody is left: the source removes it
    assert lock_files(other) == []
    assert acquire(other, "other").token == 3


def test_a_readers_release_keeps_the_file_while_another_reader_holds_it(lockspaces: Any) -> None:
    a, b, c = lockspaces
    first, second = acquire(a, "a", SHARED), acquire(b, "b", READONLY)
    result(a.release(first))
    assert lock_files(c) == [lock_file_name(IMAGE)]
    assert holders(c) == [("b", "readonly", 0, False)]
    result(b.release(second))
    assert lock_files(c) == []
    assert not (c.directory / TOKENS_FILE).exists()  # no token to keep: no mark yet


def test_a_readers_release_keeps_the_file_while_a_locker_is_between_lock_and_slot(
    lockspaces: Any,
) -> None:
    """A reader that has the hold byte but no slot yet is seen by the failed upgrade alone."""
    a, b, _ = lockspaces
    reader = acquire(a, "a", SHARED)
    checker = _check_in_progress(a.path_for(IMAGE))
    try:
        result(a.release(reader))
        assert lock_files(b) == [lock_file_name(IMAGE)]
    finally:
        os.close(checker)
    result(b.release(acquire(b, "b", SHARED)))
    assert lock_files(b) == []


def test_a_release_that_finds_the_mark_busy_keeps_its_file(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    result(a.release(acquire(a, "a")))  # creates the mark (1)
    busy = os.open(a.directory / TOKENS_FILE, os.O_RDWR)  # another release, raising it now
    try:
        fcntl.fcntl(busy, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
        held = acquire(b, "b")
        assert held.token == 2
        result(b.release(held))
        assert lock_files(a) == [lock_file_name(IMAGE)]  # left for a later holder
    finally:
        os.close(busy)
    assert acquire(a, "a").token == 3
    result(a.close())
    assert lock_files(a) == []


def test_a_symlink_at_the_mark_is_refused_not_followed(lockspaces: Any, tmp_path: Path) -> None:
    a, b, _ = lockspaces
    held = acquire(a, "a")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    (tmp_path / TOKENS_FILE).symlink_to(target)
    result(a.release(held))  # cannot raise the mark through a symlink: keeps its file
    assert lock_files(a) == [lock_file_name(IMAGE)]
    error = failure_of(b.acquire(IMAGE, "b", EXCLUSIVE), LockspaceUnavailable)
    assert str(error) == (
        f"token file {tmp_path / TOKENS_FILE} is a symbolic link: refusing to follow it"
    )
    assert target.read_bytes() == b"precious"


def test_a_refused_take_over_leaves_no_file_behind(lockspaces: Any) -> None:
    a, _, _ = lockspaces
    conflict = failure_of(a.take_over(IMAGE, "dst", 7), LeaseConflict)
    assert "has token 0, not 7" in str(conflict)
    assert list(a.directory.iterdir()) == []


def _release_when_opened(
    space: LocalLockspace, monkeypatch: pytest.MonkeyPatch, release: Any, times: int = 1
) -> list[int]:
    """Make ``release`` happen right after ``space`` opens a lock file, ``times`` times."""
    opened = space._opened
    removed: list[bool] = []  # at each open: whether the file was gone once it was opened

    def open_then_release(resource: str) -> Any:
        opening = opened(resource)
        if len(removed) < times:
            release()
        removed.append(not space.path_for(resource).exists())
        return opening

    monkeypatch.setattr(space, "_opened", open_then_release)
    return removed


@pytest.mark.parametrize("mode", [EXCLUSIVE, SHARED])
def test_a_locker_whose_file_was_removed_under_it_opens_it_again(
    lockspaces: Any, monkeypatch: pytest.MonkeyPatch, mode: LeaseMode
) -> None:
    """B opens the file, A (its last holder) releases and removes it, B locks the old file."""
    a, b, c = lockspaces
    held = acquire(a, "a")
    removed = _release_when_opened(b, monkeypatch, lambda: result(a.release(held)))
    grant = acquire(b, "b", mode)
    assert removed == [True, False]  # it locked the old file, saw it gone, and opened the new
    assert grant.token == (2 if mode is EXCLUSIVE else 0)
    # Its lock is on the file everyone else finds: nobody gets the lease beside it.
    assert holders(c) == [("b", mode.value, grant.token, False)]
    conflict = failure_of(c.acquire(IMAGE, "c", EXCLUSIVE), LeaseConflict)
    assert [h.owner for h in conflict.holders] == ["b"]
    result(b.renew(grant))


def test_a_take_over_whose_file_was_removed_under_it_opens_it_again(
    lockspaces: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, destination, other = lockspaces
    offered = result(source.offer(acquire(source, "src")))
    taken = result(destination.take_over(IMAGE, "dst", offered.token))
    result(source.release(offered))
    removed = _release_when_opened(other, monkeypatch, lambda: result(destination.release(taken)))
    # The token it names was in the old file: the new file has none, so it is refused.
    failure_of(other.take_over(IMAGE, "other", taken.token), LeaseConflict)
    assert removed == [True, False]
    assert acquire(other, "other").token == 3


def test_a_file_removed_at_every_open_is_unavailable_and_leaks_nothing(
    lockspaces: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _, _ = lockspaces
    path = a.path_for(IMAGE)
    descriptors = len(os.listdir("/proc/self/fd"))
    _release_when_opened(a, monkeypatch, path.unlink, times=1000)
    error = failure_of(a.acquire(IMAGE, "a", EXCLUSIVE), LockspaceUnavailable)
    assert str(error) == (
        f"lock file {path} was removed or replaced 20 times while it was being locked: "
        f"is something else removing files in {a.directory}?"
    )
    assert len(os.listdir("/proc/self/fd")) == descriptors


@pytest_twisted.ensureDeferred
async def test_the_watch_fences_nobody_for_a_last_holders_removal(tmp_path: Path) -> None:
    space, other = LocalLockspace(tmp_path, reactor=_reactor), LocalLockspace(tmp_path)
    reports: list[str] = []
    # (With a reactor, the lockspace answers from its own thread: awaited.)
    mine = await space.acquire(IMAGE, "a", SHARED)
    leaving = await space.acquire("gone", "a", EXCLUSIVE)
    space.watch(mine, reports.append)
    space.watch(leaving, reports.append)
    alongside = acquire(other, "b", SHARED)
    result(other.release(alongside))  # a reader leaves; the file stays (mine is live)
    await space.release(leaving)  # the last holder of "gone": the file goes
    assert lock_files(space) == [lock_file_name(IMAGE)]
    # Directory events arrive in order: once this one's loss is seen, so were the above.
    sentinel = await space.acquire("sentinel", "a", EXCLUSIVE)
    seen: Deferred[str] = Deferred()
    space.watch(sentinel, seen.callback)
    space.path_for("sentinel").unlink()
    assert "was removed" in await seen.addTimeout(10.0, _reactor)
    assert reports == []
    await space.renew(mine)
    await space.close()


# -- inquire and the errors --------------------------------------------------------------


def test_inquire_reports_live_holders_only(lockspaces: Any) -> None:
    a, b, c = lockspaces
    assert holders(c) == []
    assert not c.path_for(IMAGE).exists()  # asking creates nothing
    first = acquire(a, "a", SHARED)
    acquire(b, "b", READONLY)
    assert holders(c) == [("a", "shared", 0, False), ("b", "readonly", 0, False)]
    result(a.release(first))
    assert holders(c) == [("b", "readonly", 0, False)]


def test_a_missing_directory_is_unavailable_and_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    space = LocalLockspace(missing)
    assert space.spec == f"local:{missing}"
    for d in (space.acquire(IMAGE, "a", EXCLUSIVE), space.inquire(IMAGE)):
        error = failure_of(d, LockspaceUnavailable)
        assert str(error) == f"lockspace directory {missing} does not exist (or is not a directory)"
    failure_of(space.take_over(IMAGE, "a", 1), LockspaceUnavailable)


def test_an_unwritable_directory_is_unavailable(tmp_path: Path) -> None:
    """Root may write any directory, so as root it is made immutable instead."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(tmp_path)], check=True)
    else:
        tmp_path.chmod(0o500)
    try:
        error = failure_of(
            LocalLockspace(tmp_path).acquire(IMAGE, "a", EXCLUSIVE), LockspaceUnavailable
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
        tmp_path.chmod(0o700)
    assert str(tmp_path) in str(error)
    assert "Permission denied" in str(error) or "Operation not permitted" in str(error)


def test_a_lock_file_that_cannot_be_opened_is_unavailable_and_named(tmp_path: Path) -> None:
    space = LocalLockspace(tmp_path)
    space.path_for(IMAGE).mkdir()  # something that is not a lock file is in the way
    error = failure_of(space.acquire(IMAGE, "a", EXCLUSIVE), LockspaceUnavailable)
    assert str(error) == f"cannot use lock file {space.path_for(IMAGE)}: Is a directory"


def test_the_lock_file_is_named_by_the_resource_hash(lockspaces: Any, tmp_path: Path) -> None:
    a, _, _ = lockspaces
    acquire(a, "a")
    name = hashlib.sha256(IMAGE.encode()).hexdigest() + ".lock"
    assert lock_file_name(IMAGE) == name
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert a.path_for(IMAGE) == tmp_path / name
    assert tmp_path.joinpath(name).stat().st_size > LEDGER_COPY_SIZE


def test_an_owner_must_fit_its_record(lockspaces: Any) -> None:
    a, _, _ = lockspaces
    with pytest.raises(ValueError, match="owner"):
        result(a.acquire(IMAGE, "x" * 300, EXCLUSIVE))


# -- who else may touch the files ------------------------------------------------------------

NOBODY = 65534


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o705, 0o770, 0o777, 0o1777])
def test_a_directory_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    locks = tmp_path / "locks"
    locks.mkdir()
    locks.chmod(mode)
    space = LocalLockspace(locks)
    expected = (
        f"lockspace directory {locks} has mode {mode & 0o7777:04o}: others may read or change "
        f"it; make it private (chmod 700 {locks})"
    )
    for d in (space.acquire(IMAGE, "a", EXCLUSIVE), space.inquire(IMAGE), space.inquire_all()):
        assert str(failure_of(d, LockspaceUnavailable)) == expected
    assert list(locks.iterdir()) == []  # nothing was created in it


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory away")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    os.chown(locks, NOBODY, NOBODY)
    error = failure_of(LocalLockspace(locks).acquire(IMAGE, "a", EXCLUSIVE), LockspaceUnavailable)
    assert str(error) == (
        f"lockspace directory {locks} belongs to uid {NOBODY}, not to this user "
        f"(uid {os.geteuid()}): use a directory of your own"
    )


def test_lock_files_are_private(lockspaces: Any, tmp_path: Path) -> None:
    a, b, _ = lockspaces
    path = a.path_for(IMAGE)
    acquire(a, "a", SHARED)  # a holder keeps the file
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)  # as ferry before 0.2 made them
    acquire(b, "b", SHARED)
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_symlink_at_a_lock_file_is_refused_not_followed(lockspaces: Any, tmp_path: Path) -> None:
    a, _, _ = lockspaces
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    a.path_for(IMAGE).symlink_to(target)
    for d in (a.acquire(IMAGE, "a", EXCLUSIVE), a.inquire(IMAGE)):
        error = failure_of(d, LockspaceUnavailable)
        path = a.path_for(IMAGE)
        assert str(error) == f"lock file {path} is a symbolic link: refusing to follow it"
    assert target.read_bytes() == b"precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_lock_file_of_another_user_is_refused(lockspaces: Any) -> None:
    a, b, _ = lockspaces
    acquire(a, "a", SHARED)  # a holder keeps the file
    os.chown(a.path_for(IMAGE), NOBODY, NOBODY)
    error = failure_of(b.acquire(IMAGE, "b", EXCLUSIVE), LockspaceUnavailable)
    assert str(error) == (
        f"lock file {a.path_for(IMAGE)} belongs to uid {NOBODY}, not to this user "
        f"(uid {os.geteuid()})"
    )


READ_LOCK = r"""
import fcntl, os, struct, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
except OSError as err:
    print("cannot open:", err.strerror, flush=True)
    sys.exit(0)
fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 1, 0))
print("read-locked the hold byte", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_another_user_cannot_lock_anyone_out() -> None:
    """The attack: an unprivileged user read-locks byte 0 of a lock file (once 0644).

    Every directory up to the lockspace is open to the attacker, as /var/lib
    is: only the lockspace's own privacy (and the file's) stands in the way.
    """
    top = Path(tempfile.mkdtemp(prefix="ferry-locks-", dir="/tmp"))
    try:
        top.chmod(0o711)
        locks = top / "locks"
        locks.mkdir(mode=0o700)
        a, b = LocalLockspace(locks), LocalLockspace(locks)
        held = acquire(a, "a")  # a holder keeps the file
        assert a.path_for(IMAGE).stat().st_mode & 0o777 == 0o600
        attack = subprocess.run(
            ["/usr/bin/python3", "-c", READ_LOCK, str(a.path_for(IMAGE))],
            user=NOBODY,
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert attack.stdout == b"cannot open: Permission denied\n"
        locks.chmod(0o711)  # the file's own mode is the second wall
        attack = subprocess.run(
            ["/usr/bin/python3", "-c", READ_LOCK, str(a.path_for(IMAGE))],
            user=NOBODY,
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert attack.stdout == b"cannot open: Permission denied\n"
        locks.chmod(0o700)
        result(a.release(held))
        assert acquire(b, "b").token == 2
        result(b.close())
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("how", ["removed", "replaced"])
@pytest_twisted.ensureDeferred
async def test_the_watch_reports_a_removed_or_replaced_lock_file_at_once(
    tmp_path: Path, how: str
) -> None:
    space = LocalLockspace(tmp_path, reactor=_reactor)
    grant = await space.acquire(IMAGE, "a", EXCLUSIVE)  # on the lockspace's thread
    lost: Deferred[str] = Deferred()
    space.watch(grant, lost.callback)
    path = space.path_for(IMAGE)
    if how == "removed":
        path.unlink()
        expected = f"lock file {path} was removed"
    else:
        replacement = tmp_path / "new"
        replacement.write_bytes(b"")
        os.replace(replacement, path)
        expected = f"lock file {path} was replaced by another file"
    assert await lost.addTimeout(10.0, _reactor) == expected
    await space.close()


@pytest_twisted.ensureDeferred
async def test_an_unwatched_grant_is_not_reported(tmp_path: Path) -> None:
    space = LocalLockspace(tmp_path, reactor=_reactor)
    first = await space.acquire(IMAGE, "a", EXCLUSIVE)
    second = await space.acquire("other", "a", EXCLUSIVE)
    reports: list[str] = []
    stop = space.watch(first, reports.append)
    watched: Deferred[str] = Deferred()
    space.watch(second, watched.callback)
    stop()
    space.path_for(IMAGE).unlink()
    space.path_for("other").unlink()
    await watched.addTimeout(10.0, _reactor)
    assert reports == []
    await space.close()


@pytest_twisted.ensureDeferred
async def test_with_a_reactor_the_operations_run_on_a_thread_of_their_own(
    tmp_path: Path,
) -> None:
    """A lockspace that hangs (an NFS server gone) must not hold up the reactor thread."""
    space = LocalLockspace(tmp_path, reactor=_reactor)
    threads: list[str] = []
    sync = os.fdatasync

    def recording_sync(fd: int) -> None:
        threads.append(threading.current_thread().name)
        sync(fd)

    os.fdatasync = recording_sync  # type: ignore[assignment]
    try:
        asked = space.acquire(IMAGE, "a", EXCLUSIVE)
        assert not asked.called  # answered later, on the reactor thread
        grant = await asked
    finally:
        os.fdatasync = sync
    assert threads and all(name.startswith("ferry-lockspace") for name in threads)
    assert grant.holder.token == 1
    await space.close()


# -- a holder that dies ------------------------------------------------------------------------

CHILD = r"""
import sys
from ferry.lease.backend import LeaseMode
from ferry.lease.local import LocalLockspace

directory, resource, mode, offer = sys.argv[1:]
space = LocalLockspace(directory)
answers = []
space.acquire(resource, "child", LeaseMode(mode)).addBoth(answers.append)
if offer == "offer":
    space.offer(answers[0]).addBoth(answers.append)
print("holding", answers[-1].token, flush=True)
sys.stdin.read()  # hold until killed
"""


class Child:
    """A process holding a lease until it is killed."""

    def __init__(self, directory: Path, mode: LeaseMode = EXCLUSIVE, offer: bool = False) -> None:
        args = [str(directory), IMAGE, mode.value, "offer" if offer else "keep"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, Deadline(30.0))
        assert line.startswith(b"holding "), line
        self.token = int(line.split()[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30.0) == -signal.SIGKILL
        for stream in (self.proc.stdin, self.proc.stdout):
            assert stream is not None
            stream.close()


def test_a_holder_that_is_killed_frees_the_lease(tmp_path: Path) -> None:
    space = LocalLockspace(tmp_path)
    child = Child(tmp_path)
    conflict = failure_of(space.acquire(IMAGE, "parent", EXCLUSIVE), LeaseConflict)
    assert conflict.holders == (Holder("child", EXCLUSIVE, 1),)
    child.kill()
    assert result(space.inquire(IMAGE)) == ()
    assert acquire(space, "parent").token == 2
    result(space.close())
    assert lock_files(space) == []  # the file a killed holder left goes with the next one


def test_an_offer_whose_offerer_died_is_stale(tmp_path: Path) -> None:
    space = LocalLockspace(tmp_path)
    child = Child(tmp_path, offer=True)
    failure_of(space.acquire(IMAGE, "parent", EXCLUSIVE), LeaseConflict)
    child.kill()
    assert acquire(space, "parent").token == 2
    result(space.close())


def test_shared_holders_that_die_leave_no_live_record(tmp_path: Path) -> None:
    space = LocalLockspace(tmp_path)
    child = Child(tmp_path, SHARED)
    assert [h.owner for h in result(space.inquire(IMAGE))] == ["child"]
    child.kill()
    assert result(space.inquire(IMAGE)) == ()
    result(space.close())


# -- with the manager ---------------------------------------------------------------------------


def test_the_manager_fences_when_the_lock_file_is_removed(tmp_path: Path) -> None:
    reactor = task.Clock()
    fenced: list[str] = []
    manager = LeaseManager(
        LocalLockspace(tmp_path),
        resource=IMAGE,
        owner="src",
        clock=ReactorClock(reactor),
        on_fenced=fenced.append,
    )
    manager.register()
    result(manager.acquire())
    assert manager.deadline == float("inf")
    reactor.advance(CHECK_INTERVAL)
    assert manager.state == "held"
    LocalLockspace(tmp_path).path_for(IMAGE).unlink()
    reactor.advance(CHECK_INTERVAL)
    assert manager.state == "fenced"
    assert fenced == [f"lock file {tmp_path / lock_file_name(IMAGE)} was removed"]


def _offered_manager(directory: Path, fenced: list[str]) -> LeaseManager:
    manager = LeaseManager(
        LocalLockspace(directory),
        resource=IMAGE,
        owner="src",
        clock=ReactorClock(task.Clock()),
        on_fenced=fenced.append,
    )
    manager.register()
    result(manager.acquire())
    result(manager.prepare_migrate())
    return manager


def test_a_take_back_someone_blocks_fences_the_source(tmp_path: Path) -> None:
    """Nobody took the lease over, but the take-back cannot have it: no control without it."""
    fenced: list[str] = []
    manager = _offered_manager(tmp_path, fenced)
    blocker = os.open(manager_path := LocalLockspace(tmp_path).path_for(IMAGE), os.O_RDONLY)
    try:
        fcntl.fcntl(blocker, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 1, 0))
        failure_of(manager.cancel_migrate_out(), LeaseConflict)
    finally:
        os.close(blocker)
    assert manager.state == "fenced"
    assert not manager.may_write()
    assert len(fenced) == 1 and fenced[0].startswith("cannot take the offered lease back: ")
    holders = result(LocalLockspace(tmp_path).inquire(IMAGE))
    assert holders == ()  # and it let go of the file: the next holder gets the lease
    assert manager_path.exists()


def test_a_take_back_in_an_unusable_lockspace_fences_the_source(tmp_path: Path) -> None:
    """A local lock has no deadline to wait for: a take-back that cannot be done is a loss."""
    fenced: list[str] = []
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    manager = _offered_manager(locks, fenced)
    locks.chmod(0o777)
    failure_of(manager.cancel_migrate_out(), LockspaceUnavailable)
    assert manager.state == "fenced"
    assert fenced == [
        f"cannot take the offered lease back: lockspace directory {locks} has mode 0777: "
        f"others may read or change it; make it private (chmod 700 {locks})"
    ]


def test_managers_hand_a_local_lease_over(tmp_path: Path) -> None:
    clock = ReactorClock(task.Clock())
    source, destination = (
        LeaseManager(LocalLockspace(tmp_path), resource=IMAGE, owner=owner, clock=clock)
        for owner in ("src", "dst")
    )
    source.register()
    destination.register(incoming=True)
    result(source.acquire())
    token = result(source.prepare_migrate())
    result(destination.acquire_incoming(token))
    assert destination.may_write() and destination.token == token + 1
    result(source.complete_migrate_out())
    assert (source.state, destination.state) == ("released", "held")
    assert [h.owner for h in result(destination.inquire())] == ["dst"]
    result(destination.shutdown())


# -- the --lockspace text -----------------------------------------------------------------------


def test_local_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_lockspace("local:/var/lib/ferry/locks") == LocalSpec(Path("/var/lib/ferry/locks"))
    monkeypatch.chdir(tmp_path)
    spec = parse_lockspace("local:locks")
    assert spec == LocalSpec(tmp_path / "locks")
    assert str(spec) == f"local:{tmp_path / 'locks'}"


def test_etcd_specs() -> None:
    spec = parse_lockspace("etcd:http://10.0.0.1:2379,10.0.0.2:2379,http://[::1]:2380/")
    assert spec == EtcdSpec(("http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://[::1]:2380"))
    assert str(spec) == "etcd:http://10.0.0.1:2379,http://10.0.0.2:2379,http://[::1]:2380"


def test_etcd_specs_with_tls_and_a_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = parse_lockspace(
        "etcd:https://e1:2379,e2:2379?cacert=ca.pem&cert=/etc/ferry/c.pem&key=/etc/ferry/k.pem"
        "&user=ferry&password-file=secret"
    )
    assert spec == EtcdSpec(
        ("https://e1:2379", "https://e2:2379"),  # the second takes the first one's scheme
        cacert=tmp_path / "ca.pem",  # made absolute now, as a local directory is
        cert=Path("/etc/ferry/c.pem"),
        key=Path("/etc/ferry/k.pem"),
        user="ferry",
        password_file=tmp_path / "secret",
    )
    assert spec.tls
    assert str(spec) == "etcd:https://e1:2379,https://e2:2379"  # no file, no user


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no scheme"),
        ("/var/lib/locks", "has no scheme"),
        ("local:", "names no directory"),
        ("local:  ", "names no directory"),
        ("etcd:", "endpoint is empty"),
        ("etcd:http://a:1,", "endpoint is empty"),
        ("etcd:http://host", "names no port"),
        ("etcd:host:0", "names no port"),
        ("etcd:http://host:99999", "bad port"),
        ("etcd:http://host:port", "bad port"),
        ("etcd:ftp://host:2379", "only http:// and https://"),
        ("etcd:https://a:1,http://b:2", "every endpoint must use https://"),
        ("etcd:http://a:1?cacert=/ca.pem", "cacert, cert and key are for https://"),
        ("etcd:https://a:1?cert=/c.pem", "cert and key come together"),
        ("etcd:https://a:1?user=ferry", "user and password-file come together"),
        ("etcd:https://a:1?password=hunter2", "unknown option 'password'"),
        ("etcd:https://a:1?user=a&user=b&password-file=/p", "'user' is given twice"),
        ("etcd:https://a:1?user=&password-file=/p", "'user' is empty"),
        ("etcd:https://a:1?user", "NAME=VALUE"),
        ("etcd:http://host:2379/v3", "nothing more"),
        ("etcd:http://:2379", "names no host"),
        ("etcd:a:1,a:1", "twice"),
        ("consul:http://host:8500", "unknown scheme 'consul'"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_lockspace(text)


def test_open_lockspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = open_lockspace(f"local:{tmp_path}", reactor=None)
    assert isinstance(local, LocalLockspace)
    assert local.spec == f"local:{tmp_path}"

    made: list[tuple[list[str], object]] = []

    class EtcdLockspace:
        def __init__(self, endpoints: list[str], *, reactor: object) -> None:
            made.append((endpoints, reactor))

    fake = types.ModuleType("ferry.lease.etcd")
    fake.EtcdLockspace = EtcdLockspace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ferry.lease.etcd", fake)
    reactor = object()
    backend = open_lockspace(parse_lockspace("etcd:h1:1,h2:2"), reactor=reactor)
    assert isinstance(backend, EtcdLockspace)
    assert made == [(["http://h1:1", "http://h2:2"], reactor)]


def test_the_default_resource_is_the_canonical_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    (tmp_path / "link.img").symlink_to(image)
    monkeypatch.chdir(tmp_path)
    assert default_resource("link.img") == str(image.resolve())
    assert default_resource(image) == str(image.resolve())


def test_the_default_lockspace_directory(tmp_path: Path) -> None:
    assert default_lockspace_dir(uid=0, environ={}) == ROOT_LOCK_DIR
    assert default_lockspace_dir(uid=1000, environ={"XDG_STATE_HOME": "/st"}) == Path(
        "/st/ferry/locks"
    )
    home = tmp_path / "home"
    assert default_lockspace_dir(uid=1000, environ={"XDG_STATE_HOME": "rel"}, home=home) == (
        home / ".local/state/ferry/locks"
    )
    assert default_lockspace_dir(uid=1000, environ={}, home=home) == (
        home / ".local/state/ferry/locks"
    )


def test_the_default_lockspace_is_created(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "ferry" / "locks"
    assert default_lockspace(directory) == LocalSpec(directory)
    assert directory.is_dir()
    assert directory.stat().st_mode & 0o777 == 0o700
    assert default_lockspace(directory) == LocalSpec(directory)  # and again, harmlessly
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(LockspaceUnavailable, match="cannot create lockspace directory"):
        default_lockspace(tmp_path / "file" / "locks")


# -- a takeover on one host: the grant's descriptor moves -----------------------------


def test_a_passed_descriptor_keeps_the_lease_held_throughout(lockspaces: Any) -> None:
    """The successor adopts the very grant; the old holder lets go without a gap."""
    old, new, other = lockspaces
    grant = acquire(old, "old")
    passed = old.pass_on(grant)
    assert passed.fd is not None and passed.grant == grant
    # SCM_RIGHTS gives the new process a descriptor of the same open file description.
    adopted = new.adopt(dataclasses.replace(passed, fd=os.dup(passed.fd)))
    assert adopted.holder == grant.holder  # the same grant: owner and token unchanged
    failure_of(other.acquire(IMAGE, "third", EXCLUSIVE), LeaseConflict)
    old.let_go(grant)
    assert holders(other) == [("old", "exclusive", 1, False)]
    failure_of(other.acquire(IMAGE, "third", EXCLUSIVE), LeaseConflict)
    result(new.renew(adopted))
    result(new.release(adopted))
    assert holders(other) == []
    assert acquire(other, "third").token == 2


def test_letting_go_tidies_nothing(lockspaces: Any) -> None:
    """Had the old holder released, the successor's adopted grant would be gone."""
    old, new, _ = lockspaces
    grant = acquire(old, "old")
    passed = old.pass_on(grant)
    adopted = new.adopt(dataclasses.replace(passed, fd=os.dup(passed.fd)))  # type: ignore[arg-type]
    old.let_go(grant)
    result(old.close())  # closing the lockspace must not touch a grant let go
    result(new.renew(adopted))


def test_adopt_refuses_a_descriptor_that_is_not_the_lock_file(
    lockspaces: Any, tmp_path: Path
) -> None:
    old, new, _ = lockspaces
    grant = acquire(old, "old")
    passed = old.pass_on(grant)
    stranger = os.open(tmp_path / "stranger", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(LeaseLost, match="not the lock file"):
            new.adopt(dataclasses.replace(passed, fd=stranger))
    finally:
        os.close(stranger)
    with pytest.raises(LeaseError, match="no lock file descriptor"):
        new.adopt(dataclasses.replace(passed, fd=None))


def test_adopt_refuses_a_grant_whose_record_is_not_the_files(lockspaces: Any) -> None:
    old, new, _ = lockspaces
    grant = acquire(old, "old")
    passed = old.pass_on(grant)
    fd = os.dup(passed.fd)  # type: ignore[arg-type]
    try:
        wrong_id = dict(passed.detail, grant_id="0" * 16)
        with pytest.raises(LeaseLost, match="overwritten"):
            new.adopt(dataclasses.replace(passed, fd=fd, detail=wrong_id))
        forged = dataclasses.replace(grant, holder=Holder("old", EXCLUSIVE, 7))
        with pytest.raises(LeaseLost, match="token 7"):
            new.adopt(dataclasses.replace(passed, fd=fd, grant=forged))
        with pytest.raises(LeaseError, match="incomplete"):
            new.adopt(dataclasses.replace(passed, fd=fd, detail={}))
    finally:
        os.close(fd)


def test_adopt_refuses_a_descriptor_that_does_not_hold_the_locks(lockspaces: Any) -> None:
    """The lock file opened afresh is the right file, but its locks are someone else's."""
    old, new, _ = lockspaces
    grant = acquire(old, "old")
    passed = old.pass_on(grant)
    fd = os.open(old.path_for(IMAGE), os.O_RDWR)  # the file, not the locked open file
    try:
        with pytest.raises(LeaseLost, match="does not hold the grant"):
            new.adopt(dataclasses.replace(passed, fd=fd))
        result(old.renew(grant))  # the failed adoption took nothing from the holder
        old.let_go(grant)  # ... which lets go: nobody holds the slot or the hold byte now
        with pytest.raises(LeaseLost, match="not locked any more"):
            new.adopt(dataclasses.replace(passed, fd=fd))
    finally:
        os.close(fd)
