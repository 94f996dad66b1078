"""The pass planner over real sparse files and a dirty map, with clients writing mid-pass."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.migrate.core import passes as passes_module
from ferry.migrate.core.passes import CopyOp, OpKind, PassPlan, PassPlanner
from ferry.storage import DirtyMap, Image

from .migrate_support import KIB, MIB, sparse_image

G = 4 * KIB
MAX = 64 * KIB
SIZE = MIB + 1000  # not a multiple of anything, so the tail is clipped


class Destination:
    """What an NBD destination holds after the ops it was sent (junk unless empty)."""

    def __init__(self, size: int, *, empty: bool) -> None:
        self.data = bytearray(size) if empty else bytearray(b"\xa5") * size
        self.ops: list[CopyOp] = []

    def apply(self, image: Image, op: CopyOp) -> None:
        assert 0 <= op.offset < op.end <= len(self.data)
        if op.kind is OpKind.DATA:
            self.data[op.offset : op.end] = image.pread(op.offset, op.length)
        else:
            self.data[op.offset : op.end] = bytes(op.length)
        self.ops.append(op)


def client_write(image: Image, dirty: DirtyMap, offset: int, data: bytes) -> None:
    """A client write as the data plane does it: write, then mark."""
    image.pwrite(data, offset)
    dirty.mark(offset, len(data))


def run(plan: PassPlan, image: Image, dest: Destination) -> list[CopyOp]:
    ops = list(plan.ops())
    for op in ops:
        dest.apply(image, op)
        plan.done(op)
    assert plan.finished
    return ops


def covered(ops: Iterable[CopyOp], kind: OpKind | None = None) -> set[int]:
    """The 512-byte sectors the ops cover (all test offsets are sector aligned)."""
    return {
        s
        for op in ops
        if kind in (None, op.kind)
        for s in range(op.offset // 512, -(-op.end // 512))
    }


def check_shape(ops: list[CopyOp], size: int) -> None:
    """In offset order, not overlapping, within the image, each at most its maximum."""
    for a, b in itertools.pairwise(ops):
        assert a.end <= b.offset
    for op in ops:
        assert op.end <= size
        assert op.length <= (MAX if op.kind is OpKind.DATA else 2**31)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    img = sparse_image(
        tmp_path / "disk.img",
        SIZE,
        [(0, b"A" * 8 * KIB), (200 * KIB, b"B" * 300 * KIB), (SIZE - 10, b"C" * 10)],
    )
    if all(not e.hole for e in img.extents(0, SIZE)):
        pytest.skip("this file system reports no holes")
    return img


def test_bulk_pass_sends_allocated_extents_and_zeroes_the_holes(image: Image) -> None:
    dirty = DirtyMap(SIZE, G)
    dirty.mark(0, SIZE)  # whatever was dirty before the migration is forgotten
    planner = PassPlanner(image, dirty, max_data_length=MAX)
    plan = planner.bulk_pass()
    assert dirty.dirty_bytes == 0
    allocated = [e for e in image.extents(0, SIZE) if not e.hole]
    data_bytes = sum(e.length for e in allocated)
    assert (plan.number, plan.total_bytes, plan.dirty_bytes) == (1, data_bytes, data_bytes)
    assert plan.clean_bytes == SIZE - data_bytes
    dest = Destination(SIZE, empty=False)
    ops = run(plan, image, dest)
    check_shape(ops, SIZE)
    assert covered(ops, OpKind.DATA) == covered(
        CopyOp(e.offset, e.length, OpKind.DATA) for e in allocated
    )
    assert covered(ops) == covered([CopyOp(0, SIZE, OpKind.DATA)])
    assert bytes(dest.data) == image.pread(0, SIZE)
    assert plan.dirty_bytes == 0


def test_bulk_pass_sends_nothing_for_holes_into_an_empty_destination(image: Image) -> None:
    plan = PassPlanner(image, DirtyMap(SIZE, G), destination_empty=True).bulk_pass()
    dest = Destination(SIZE, empty=True)
    ops = run(plan, image, dest)
    assert {op.kind for op in ops} == {OpKind.DATA}
    assert sum(op.length for op in ops) == plan.total_bytes
    assert bytes(dest.data) == image.pread(0, SIZE)


def test_a_bulk_pass_on_extents_read_elsewhere_keeps_the_writes_after_the_clear(
    image: Image,
) -> None:
    """The scan runs on a thread: a write between the clear and the scan is the next pass's."""
    dirty = DirtyMap(SIZE, G)
    planner = PassPlanner(image, dirty, max_data_length=MAX)
    with pytest.raises(RuntimeError, match="before the dirty map was cleared"):
        planner.bulk_pass(image.extents(0, SIZE))
    dirty.mark(0, SIZE)  # before the migration: forgotten
    planner.begin_bulk_pass()
    assert dirty.dirty_bytes == 0
    extents = image.extents(0, SIZE)  # the scan, on its thread
    hole = next(e for e in extents if e.hole)
    client_write(image, dirty, hole.offset, b"y" * 10)  # lands after it: the scan says hole
    plan = planner.bulk_pass(extents)
    dest = Destination(SIZE, empty=False)
    run(plan, image, dest)
    assert dirty.dirty_bytes == G  # zeroed by this pass, still marked: the next one sends it
    run(planner.dirty_pass(), image, dest)
    assert bytes(dest.data) == image.pread(0, SIZE)


def test_zero_ops_do_not_count_in_the_bulk_pass_but_do_in_dirty_passes(image: Image) -> None:
    dirty = DirtyMap(SIZE, G)
    planner = PassPlanner(image, dirty, max_data_length=MAX)
    bulk = planner.bulk_pass()
    hole = next(op for op in bulk.ops() if op.kind is OpKind.ZERO)
    assert bulk.counts(hole) == 0
    dirty.mark(hole.offset, G)  # a client trimmed: dirty, and still a hole
    second = planner.dirty_pass()
    assert second.total_bytes == G
    (op,) = list(second.ops())
    assert (op.kind, op.length, second.counts(op)) == (OpKind.ZERO, G, G)


def test_a_dirty_pass_is_the_dirty_map_split_into_requests(image: Image) -> None:
    dirty = DirtyMap(SIZE, G)
    planner = PassPlanner(image, dirty, max_data_length=MAX)
    run(planner.bulk_pass(), image, Destination(SIZE, empty=False))
    client_write(image, dirty, 100, b"x")  # chunk 0
    client_write(image, dirty, 200 * KIB, b"y" * 200 * KIB)  # 50 chunks, > MAX: split
    client_write(image, dirty, SIZE - 1, b"z")  # the clipped tail chunk
    plan = planner.dirty_pass()
    assert plan.number == 2
    expected = G + 200 * KIB + (SIZE - (SIZE // G) * G)
    assert (plan.total_bytes, plan.clean_bytes) == (expected, SIZE - expected)
    assert dirty.dirty_bytes == expected  # taken a window at a time, as the pass gets there
    ops = list(plan.ops())
    assert dirty.dirty_bytes == 0
    check_shape(ops, SIZE)
    assert [(op.offset, op.length) for op in ops] == [
        (0, G),
        (200 * KIB, MAX),
        (264 * KIB, MAX),
        (328 * KIB, MAX),
        (392 * KIB, 8 * KIB),
        ((SIZE // G) * G, SIZE - (SIZE // G) * G),
    ]
    assert all(op.kind is OpKind.DATA for op in ops)
    assert planner.dirty_pass().total_bytes == 0


def test_writes_landing_during_a_pass_reach_the_destination(image: Image) -> None:
    dirty = DirtyMap(SIZE, G)
    planner = PassPlanner(image, dirty, max_data_length=MAX)
    dest = Destination(SIZE, empty=True)
    plan = planner.bulk_pass()
    ops = plan.ops()
    for op in itertools.islice(ops, 3):
        dest.apply(image, op)
        plan.done(op)
    cursor = dest.ops[-1].end
    client_write(image, dirty, 0, b"behind the pass")
    client_write(image, dirty, SIZE - 10, b"ahead....!")
    client_write(image, dirty, 700 * KIB, b"into a hole the extents already showed")
    for op in ops:
        dest.apply(image, op)
        plan.done(op)
    assert cursor > 15
    assert bytes(dest.data) != image.pread(0, SIZE)  # pass 1 missed what landed behind it
    second = planner.dirty_pass()
    run(second, image, dest)
    assert bytes(dest.data) == image.pread(0, SIZE)
    # Behind the pass and into a hole: both again.  Ahead of it, into data
    # it had yet to read: read by pass 1 itself, and not sent twice.
    assert second.total_bytes == 2 * G


@mock.patch.object(passes_module, "EXTENT_WINDOW", 64 * KIB)  # the tail is another window
def test_a_dirty_pass_sends_once_what_is_rewritten_ahead_of_it(image: Image) -> None:
    dirty = DirtyMap(SIZE, G)
    planner = PassPlanner(image, dirty, max_data_length=MAX)
    dest = Destination(SIZE, empty=False)
    run(planner.bulk_pass(), image, dest)
    client_write(image, dirty, 0, b"first")
    client_write(image, dirty, SIZE - 10, b"last")
    plan = planner.dirty_pass()
    ops = plan.ops()
    first = next(ops)
    dest.apply(image, first)
    plan.done(first)
    client_write(image, dirty, 10, b"behind")  # in the chunk already sent
    client_write(image, dirty, SIZE - 5, b"ahead")  # in the chunk not yet sent
    assert plan.dirty_bytes == SIZE % G  # the tail chunk, which the pass has still to take
    for op in ops:
        dest.apply(image, op)
        plan.done(op)
    assert plan.finished and plan.total_bytes == G + SIZE % G
    third = planner.dirty_pass()
    assert [(op.offset, op.length) for op in third.ops()] == [(0, G)]


def test_the_planner_refuses_passes_out_of_order(image: Image, tmp_path: Path) -> None:
    planner = PassPlanner(image, DirtyMap(SIZE, G))
    with pytest.raises(RuntimeError, match="follows the bulk pass"):
        planner.dirty_pass()
    planner.bulk_pass()
    with pytest.raises(RuntimeError, match="first pass"):
        planner.bulk_pass()
    with pytest.raises(ValueError, match="dirty map size"):
        PassPlanner(image, DirtyMap(SIZE - 1, G))
    with pytest.raises(ValueError, match="max_data_length"):
        PassPlanner(image, DirtyMap(SIZE, G), max_data_length=0)


def test_done_refuses_more_than_the_pass_has(image: Image) -> None:
    plan = PassPlanner(image, DirtyMap(SIZE, G)).bulk_pass()
    with pytest.raises(ValueError, match="more than pass 1 has left"):
        plan.done(CopyOp(0, SIZE, OpKind.DATA))


# -- property: whatever clients do, the destination ends equal to the source -----

sector = st.integers(0, SIZE // 512 - 1)
write = st.tuples(
    st.sampled_from(["write", "trim"]), sector, st.integers(1, 64), st.integers(0, 255)
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    initial=st.lists(st.tuples(sector, st.integers(1, 100)), max_size=8),
    passes=st.lists(st.lists(st.tuples(st.integers(0, 40), write), max_size=6), max_size=4),
    empty=st.booleans(),
    granularity=st.sampled_from([512, 4 * KIB, 64 * KIB]),
    # The dirty pass's extent look-ahead: the real one covers this image
    # whole; small ones make runs cross windows and windows end early.
    window=st.sampled_from([(64 * MIB, 1024), (8 * KIB, 1), (100 * KIB, 3)]),
)
def test_passes_converge_to_an_exact_copy(
    tmp_path: Path,
    initial: list[tuple[int, int]],
    passes: list[list[tuple[int, tuple[str, int, int, int]]]],
    empty: bool,
    granularity: int,
    window: tuple[int, int],
) -> None:
    window_bytes, window_extents = window
    with (
        mock.patch.object(passes_module, "EXTENT_WINDOW", window_bytes),
        mock.patch.object(passes_module, "WINDOW_EXTENTS", window_extents),
    ):
        check_convergence(tmp_path, initial, passes, empty, granularity)


def check_convergence(
    tmp_path: Path,
    initial: list[tuple[int, int]],
    passes: list[list[tuple[int, tuple[str, int, int, int]]]],
    empty: bool,
    granularity: int,
) -> None:
    data = [(s * 512, bytes([s % 251 + 1]) * min(n * 512, SIZE - s * 512)) for s, n in initial]
    image = sparse_image(tmp_path / "prop.img", SIZE, data)
    dirty = DirtyMap(SIZE, granularity)
    planner = PassPlanner(image, dirty, max_data_length=MAX, destination_empty=empty)
    dest = Destination(SIZE, empty=empty)
    plan = planner.bulk_pass()
    for writes in [*passes, []]:  # the last pass has no writes: clients are held
        if plan.bulk:
            allocated = covered(
                CopyOp(e.offset, e.length, OpKind.DATA)
                for e in image.extents(0, SIZE)
                if not e.hole
            )
        pending = sorted(writes, key=lambda w: w[0])
        ops: list[CopyOp] = []
        # Requests are handed out lazily, as the data plane asks; a request's
        # data is read only when it is sent, a little later (the previous
        # one is sent after the next is taken).  Clients write in between.
        waiting: CopyOp | None = None
        for i, op in enumerate(itertools.chain(plan.ops(), [None])):
            if waiting is not None:
                dest.apply(image, waiting)
                plan.done(waiting)
            while pending and pending[0][0] <= i:
                _, (kind, s, n, byte) = pending.pop(0)
                offset, length = s * 512, min(n * 512, SIZE - s * 512)
                if kind == "write":
                    client_write(image, dirty, offset, bytes([byte]) * length)
                else:
                    image.punch_hole(offset, length)
                    dirty.mark(offset, length)
            if op is not None:
                ops.append(op)
            waiting = op
        check_shape(ops, SIZE)
        if plan.bulk:
            assert covered(ops, OpKind.DATA) == allocated
            if not empty:
                assert covered(ops) == covered([CopyOp(0, SIZE, OpKind.DATA)])
        else:
            assert sum(op.length for op in ops) == plan.total_bytes
        for _, (_, s, n, byte) in pending:  # writes after the pass's last op
            offset, length = s * 512, min(n * 512, SIZE - s * 512)
            client_write(image, dirty, offset, bytes([byte]) * length)
        assert plan.finished
        plan = planner.dirty_pass()
    assert plan.total_bytes == 0  # the held pass left nothing dirty behind it
    assert bytes(dest.data) == image.pread(0, SIZE)
    image.close()
    os.unlink(tmp_path / "prop.img")
