"""The proxy's request book: which requests may be in flight together, and replay order.

Times are plain numbers here (the book is handed its times); the session
tests run the same logic on a simulated clock.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.nbd.constants import Command, CommandFlag
from ferry.nbd.events import Request
from ferry.proxy.book import BUCKET_SHIFT, MAX_BUCKETS, Pending, RequestBook

MiB = 1 << 20
NO_FLAGS = CommandFlag(0)


def req(handle: int, command: Command, offset: int = 0, length: int = 4096) -> Request:
    data = bytes(length) if command is Command.WRITE else b""
    if command is Command.FLUSH:
        offset = length = 0
    return Request(handle, command, NO_FLAGS, offset, length, data)


def handles(pendings: list[Pending]) -> list[int]:
    return [p.request.handle for p in pendings]


def send_all(book: RequestBook) -> list[Pending]:
    """Take what is ready and send it, the server's handle being the client's plus 1000."""
    ready = book.take_ready()
    for pending in ready:
        book.sent(pending, pending.request.handle + 1000)
    return ready


def test_disjoint_requests_all_go_at_once_in_arrival_order() -> None:
    book = RequestBook()
    for n in range(16):
        book.add(req(n, Command.WRITE if n % 2 else Command.READ, n * 4096), now=0.0)
    assert handles(send_all(book)) == list(range(16))
    assert book.in_flight == 16 and len(book) == 16
    assert book.weight == 16 * 4096


def test_overlapping_write_waits_for_the_earlier_one() -> None:
    book = RequestBook()
    book.add(req(1, Command.WRITE, 0, 8192), now=0.0)
    book.add(req(2, Command.WRITE, 4096, 4096), now=0.0)  # overlaps 1
    book.add(req(3, Command.READ, 8192, 4096), now=0.0)  # touches nothing in flight
    assert handles(send_all(book)) == [1, 3]
    assert book.take_ready() == []
    answered = book.answered(1001, now=1.0)
    assert answered is not None and answered.request.handle == 1
    assert handles(send_all(book)) == [2]


def test_reads_share_but_a_read_waits_for_a_write_and_a_write_for_a_read() -> None:
    book = RequestBook()
    book.add(req(1, Command.READ, 0), now=0)
    book.add(req(2, Command.READ, 0), now=0)
    book.add(req(3, Command.WRITE, 0), now=0)  # waits for both reads
    book.add(req(4, Command.READ, 0), now=0)  # waits for the write
    assert handles(send_all(book)) == [1, 2]
    book.answered(1001, now=0)
    assert book.take_ready() == []
    book.answered(1002, now=0)
    assert handles(send_all(book)) == [3]
    book.answered(1003, now=0)
    assert handles(send_all(book)) == [4]


@pytest.mark.parametrize("command", [Command.TRIM, Command.WRITE_ZEROES])
def test_trim_and_write_zeroes_change_data(command: Command) -> None:
    book = RequestBook()
    book.add(req(1, Command.READ, 0), now=0)
    book.add(req(2, command, 0), now=0)
    assert handles(send_all(book)) == [1]


def test_a_chain_of_overlaps_keeps_its_order() -> None:
    # 2 overlaps 1, 3 overlaps 2 but not 1: 3 still goes after 2.
    book = RequestBook()
    book.add(req(1, Command.WRITE, 0, 4096), now=0)
    book.add(req(2, Command.WRITE, 2048, 4096), now=0)
    book.add(req(3, Command.WRITE, 5000, 4096), now=0)
    assert handles(send_all(book)) == [1]
    book.answered(1001, now=0)
    assert handles(send_all(book)) == [2]
    book.answered(1002, now=0)
    assert handles(send_all(book)) == [3]


def test_flush_and_empty_requests_conflict_with_nothing() -> None:
    book = RequestBook()
    book.add(req(1, Command.WRITE, 0), now=0)
    book.add(req(2, Command.FLUSH), now=0)
    book.add(req(3, Command.WRITE, 0, 0), now=0)
    book.add(req(4, Command.FLUSH), now=0)
    assert handles(send_all(book)) == [1, 2, 3, 4]


def test_requests_across_buckets_and_wide_ones_are_found() -> None:
    book = RequestBook()
    edge = (1 << BUCKET_SHIFT) - 2048
    book.add(req(1, Command.WRITE, edge, 4096), now=0)  # two buckets
    book.add(req(2, Command.READ, 1 << BUCKET_SHIFT, 512), now=0)  # the second one
    wide = (MAX_BUCKETS + 1) << BUCKET_SHIFT
    book.add(req(3, Command.TRIM, 0, wide), now=0)  # everything
    book.add(req(4, Command.READ, wide - 4096, 4096), now=0)  # under the wide trim only
    book.add(req(5, Command.READ, wide + 4096, 4096), now=0)  # beyond it
    assert handles(send_all(book)) == [1, 5]
    book.answered(1001, now=0)
    assert handles(send_all(book)) == [2]
    book.answered(1002, now=0)
    assert handles(send_all(book)) == [3]
    book.answered(1003, now=0)
    assert handles(send_all(book)) == [4]
    book.answered(1004, now=0)
    book.answered(1005, now=0)
    assert len(book) == 0 and book.weight == 0


def test_lost_server_turns_in_flight_back_into_ready_in_order() -> None:
    book = RequestBook()
    for n, offset in enumerate([0, 8192, 16384, 4096]):
        book.add(req(n, Command.WRITE, offset, 8192 if n == 0 else 4096), now=0)
    # 3 (at 4096) overlaps 0 (0..8192): it waits.
    assert handles(send_all(book)) == [0, 1, 2]
    book.answered(1001, now=1)  # 1 made it before the loss
    assert book.lost(now=2.0) == 2
    assert book.held == 3  # 0 and 2 to send again, 3 still waiting behind 0
    assert book.oldest_hold() == 2.0
    # The new connection gets them again, oldest first; 3 still waits for 0.
    assert handles(book.take_ready()) == [0, 2]


def test_replay_accounts_the_pause_and_counts_each_send() -> None:
    book = RequestBook()
    first = book.add(req(1, Command.WRITE, 0), now=0)
    send_all(book)
    book.lost(now=10.0)
    late = book.add(req(2, Command.READ, 4096), now=12.0, held=True)
    assert book.held == 2 and late.held_since == 12.0
    again = book.take_ready()
    assert again == [first, late]
    for pending in again:
        book.sent(pending, pending.request.handle + 2000)
    assert first.sent == 2 and late.sent == 1
    book.answered(2001, now=13.5)
    assert book.longest_pause == 3.5
    book.answered(2002, now=14.0)
    assert book.longest_pause == 3.5 and book.held == 0


def test_fail_all_returns_everything_oldest_first_and_empties_the_book() -> None:
    book = RequestBook()
    book.add(req(1, Command.WRITE, 0), now=0)
    book.add(req(2, Command.WRITE, 0), now=0)
    book.add(req(3, Command.READ, 1 << 30), now=0)
    send_all(book)
    book.lost(now=1)
    failed = book.fail_all(now=61)
    assert handles(failed) == [1, 2, 3]
    assert len(book) == 0 and book.weight == 0 and book.held == 0 and not book.has_ready()
    assert book.longest_pause == 60
    assert book.answered(1001, now=62) is None  # a late answer is nobody's now
    book.add(req(4, Command.WRITE, 0), now=70)
    assert handles(send_all(book)) == [4]  # nothing stale blocks it


def test_a_request_answered_by_the_proxy_itself_releases_its_dependents() -> None:
    book = RequestBook()
    book.add(req(1, Command.WRITE, 0), now=0)
    book.add(req(2, Command.WRITE, 0), now=0)
    (first,) = book.take_ready()
    book.finish(first, now=0)  # e.g. EIO: the server lacks a feature it needs
    assert handles(book.take_ready()) == [2]


# -- the invariant, over random schedules --------------------------------------------------

commands = st.sampled_from([Command.READ, Command.WRITE, Command.TRIM, Command.FLUSH])
ops = st.lists(
    st.tuples(commands, st.integers(0, 40), st.integers(0, 6)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, seed=st.integers(0, 2**32 - 1))
def test_conflicting_requests_are_never_in_flight_together_and_keep_their_order(
    ops: list[tuple[Command, int, int]], seed: int
) -> None:
    """Random arrivals, answers and losses: the book's invariants hold throughout."""
    rng = random.Random(seed)
    book = RequestBook()
    unit = 1 << (BUCKET_SHIFT - 2)  # ranges straddle buckets often
    in_flight: dict[int, Pending] = {}
    started: list[int] = []  # seqs in the order they were (last) sent
    answered: set[int] = set()
    next_handle = 0
    for n, (command, block, blocks) in enumerate(ops):
        book.add(req(n, command, block * unit, blocks * unit), now=float(n))
        for pending in book.take_ready():
            assert pending.seq not in answered
            for other in in_flight.values():
                assert not pending.conflicts(other), (pending, other)
            next_handle += 1
            book.sent(pending, next_handle)
            in_flight[next_handle] = pending
            started.append(pending.seq)
        roll = rng.random()
        if roll < 0.4 and in_flight:
            handle = rng.choice(list(in_flight))
            done = book.answered(handle, now=float(n))
            assert done is in_flight.pop(handle)
            answered.add(done.seq)
        elif roll < 0.5:
            book.lost(now=float(n))
            in_flight.clear()
    # Drain: answer everything, in random order.
    while len(book):
        for pending in book.take_ready():
            next_handle += 1
            book.sent(pending, next_handle)
            in_flight[next_handle] = pending
            started.append(pending.seq)
        handle = rng.choice(list(in_flight))
        answered.add(book.answered(handle, now=99.0).seq)  # type: ignore[union-attr]
        in_flight.pop(handle)
    assert answered == set(range(len(ops)))
    # Conflicting requests were last sent in arrival order.
    last_sent = {seq: i for i, seq in enumerate(started)}
    requests = [req(n, c, b * unit, k * unit) for n, (c, b, k) in enumerate(ops)]
    probe = RequestBook()
    pendings = [probe.add(r, now=0) for r in requests]
    for a in pendings:
        for b in pendings[a.seq + 1 :]:
            if a.conflicts(b) and b.request.command is not Command.FLUSH:
                assert last_sent[a.seq] < last_sent[b.seq], (a.seq, b.seq)


def test_empty_requests_inside_a_wide_one_wait_for_nothing_and_block_nothing() -> None:
    book = RequestBook()
    wide = (MAX_BUCKETS + 1) << BUCKET_SHIFT
    book.add(req(1, Command.WRITE, 8192, 0), now=0)
    book.add(req(2, Command.TRIM, 0, wide), now=0)  # sees the empty write, does not wait for it
    book.add(req(3, Command.WRITE, 4096, 0), now=0)  # inside the trim, empty: does not wait
    assert handles(send_all(book)) == [1, 2, 3]
