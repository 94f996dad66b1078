"""What each migration pass sends: the pass planner and its per-pass counters.

Pass 1 (bulk) sends every allocated extent of the image.  Holes are not sent
as data: each becomes a zero request (NBD WRITE_ZEROES without NO_HOLE, so a
sparse destination stays sparse), or nothing at all when the destination is
known to be empty.  Later passes send what the dirty map holds, taking it a
window at a time as they sweep the image from start to end.

Why this is correct while clients write (the dirty map's own invariant is
that a client marks *after* its write reached the image, and a pass reads a
chunk only *after* it cleared it):

- The bulk pass clears the dirty map *before* it asks for the extents, so a
  write that lands after the extents were read (into a hole the pass will
  zero, or behind the pass) is marked in the fresh map and sent by pass 2.
  Just before it hands out a data request it clears the chunks wholly
  inside it: a write that marked one of them has reached the image, and the
  read that follows sees it.  Holes keep their marks (their zero request
  reads nothing).
- A dirty pass takes the map one window (``EXTENT_WINDOW``) at a time
  (:meth:`~ferry.storage.DirtyMap.take`: snapshot and clear), and only then
  looks up that window's extents and hands out its requests, whose data is
  read later still; so what it reads is at least as new as the marks it
  took, and a write after the take is in the map for the next pass.  The
  extents are looked up within the window only, never ahead of a take.  A
  dirty chunk that is now a hole (the client trimmed or zeroed it) goes as
  a zero request, not as data.  A range that became data since its lookup
  is marked dirty by that write and goes next pass; one that became a hole
  is read as zeroes and sent as data, which is correct, only not sparse.
- So a chunk rewritten *ahead* of a pass is sent once, by this pass, and
  only what clients write *behind* a pass is left for the next one.  With a
  snapshot of the whole map at the start of each pass (the first design)
  both went again: with 20 MB/s of random 4 KiB writes, each pass carried
  about twice what it had to (benchmarks/migrate.py).

Requests are cut to at most ``max_data_length`` bytes of data (the
destination's maximum request size) and ``max_zero_length`` bytes of zeroes
(a 32-bit NBD length); they come in offset order and never reach past the
end of the image.  Requests are computed lazily, as the data plane asks for
them, so a large dirty set is never a large list.

Counting (the status fields): ``pass_dirty_bytes`` is what the pass still
has to copy, ``total_bytes`` what it copies in all, ``pass_clean_bytes`` the
rest of the image.  For the bulk pass holes are clean: their zero requests
cost no bandwidth and are not counted.  For a dirty pass every dirty byte
counts, a dirty hole included, because nobody knows it is a hole until the
pass reaches it; and its total grows while it runs, by what clients dirty
ahead of it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from ferry.storage.dirtymap import DirtyMap, DirtySnapshot
from ferry.storage.image import Extent

__all__ = [
    "DEFAULT_MAX_DATA_LENGTH",
    "DEFAULT_MAX_ZERO_LENGTH",
    "CopyOp",
    "ExtentSource",
    "OpKind",
    "PassPlan",
    "PassPlanner",
]

#: Bytes of data per WRITE: well under every server's maximum (qemu-nbd and
#: nbdkit take 32 MiB) and big enough that per-request costs vanish.
DEFAULT_MAX_DATA_LENGTH: Final = 4 * 1024 * 1024
#: Bytes per WRITE_ZEROES: NBD lengths are 32 bits; stay aligned below 4 GiB.
DEFAULT_MAX_ZERO_LENGTH: Final = 2**31
#: How far ahead a dirty pass looks up extents at once, and at most how many
#: extents one lookup returns (a fragmented image stops the window early).
EXTENT_WINDOW: Final = 64 * 1024 * 1024
WINDOW_EXTENTS: Final = 1024


class OpKind(enum.Enum):
    """How a range goes to the destination."""

    DATA = "data"  # read from the image, sent as WRITE
    ZERO = "zero"  # sent as WRITE_ZEROES (may punch a hole), no payload


@dataclass(frozen=True, slots=True)
class CopyOp:
    """One request of a pass: a range of the image and how to send it."""

    offset: int
    length: int
    kind: OpKind

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0:
            raise ValueError(f"bad op: offset={self.offset} length={self.length}")

    @property
    def end(self) -> int:
        return self.offset + self.length


class ExtentSource(Protocol):
    """What the planner needs of an image (``ferry.storage.Image`` is one)."""

    @property
    def size(self) -> int: ...

    def extents(self, offset: int, length: int, max_extents: int | None = None) -> list[Extent]: ...


def _split(offset: int, end: int, kind: OpKind, max_length: int) -> Iterator[CopyOp]:
    while offset < end:
        length = min(max_length, end - offset)
        yield CopyOp(offset, length, kind)
        offset += length


class _ExtentWindow:
    """The image's extents from the last lookup on, for runs that come in offset order."""

    __slots__ = ("_end", "_extents", "_index", "image", "limit")

    def __init__(self, image: ExtentSource, *, limit: int) -> None:
        self.image = image
        self.limit = limit  # never look up extents past here: the map is not taken there yet
        self._extents: list[Extent] = []
        self._index = 0
        self._end = 0  # the window covers up to here

    def _look_up(self, offset: int, end: int) -> None:
        length = min(max(end, offset + EXTENT_WINDOW), max(end, self.limit)) - offset
        self._extents = self.image.extents(offset, length, WINDOW_EXTENTS)
        self._index = 0
        self._end = self._extents[-1].end if self._extents else end

    def cover(self, offset: int, length: int) -> Iterator[Extent]:
        """``[offset, offset + length)`` cut into extents; ``offset`` never goes back."""
        end = offset + length
        while offset < end:
            if offset >= self._end:
                self._look_up(offset, end)
                if not self._extents:
                    return  # past the end of the image
            extents = self._extents
            while extents[self._index].end <= offset:
                self._index += 1
            extent = extents[self._index]
            stop = min(extent.end, end)
            yield Extent(offset, stop - offset, extent.hole)
            offset = stop


class PassPlan:
    """One pass: its number, its requests (iterate once), and how far it has got.

    The data plane takes requests from :meth:`ops` and calls :meth:`done`
    for each one the destination acknowledged.  A bulk pass knows its total
    when it starts; a dirty pass learns it as it sweeps (see the module doc).
    """

    __slots__ = ("_acked", "_ops", "_sweep", "_total", "bulk", "cursor", "number", "size")

    def __init__(
        self,
        number: int,
        size: int,
        make_ops: Callable[[PassPlan], Iterator[CopyOp]],
        *,
        total_bytes: int | None = None,
        sweep: _Sweep | None = None,
    ) -> None:
        if (total_bytes is None) == (sweep is None):
            raise ValueError("a pass has either a fixed total (bulk) or a sweep (dirty)")
        self.number = number
        self.size = size
        self.bulk = sweep is None
        self.cursor = 0  # where the requests handed out so far end
        self._total = total_bytes or 0
        self._sweep = sweep
        self._acked = 0
        # Lazy: the requests move this plan's cursor as they are handed out.
        self._ops = make_ops(self)

    def __repr__(self) -> str:
        return (
            f"<PassPlan {self.number} total={self.total_bytes} remaining={self.dirty_bytes}"
            f"{' bulk' if self.bulk else ''}>"
        )

    def ops(self) -> Iterator[CopyOp]:
        """The requests in offset order; one iterator per pass, so it cannot restart."""
        return self._ops

    def counts(self, op: CopyOp) -> int:
        """The bytes ``op`` takes off ``pass_dirty_bytes`` when it is done."""
        if self.bulk and op.kind is OpKind.ZERO:
            return 0
        return op.length

    def done(self, op: CopyOp) -> None:
        """The destination acknowledged ``op``."""
        counted = self.counts(op)
        if self._acked + counted > self._handed_out:
            left = self.in_hand_bytes
            raise ValueError(f"{op} is more than pass {self.number} has left ({left})")
        self._acked += counted

    @property
    def _handed_out(self) -> int:
        """Bytes of the requests handed out so far (a bulk pass: its whole total)."""
        return self._total if self._sweep is None else self._sweep.taken

    @property
    def total_bytes(self) -> int:
        """What the pass copies: a dirty pass's grows while clients dirty ahead of it."""
        if self._sweep is None:
            return self._total
        return self._sweep.taken + self._sweep.ahead()

    @property
    def dirty_bytes(self) -> int:
        """``pass_dirty_bytes``: still to copy in this pass."""
        return self.total_bytes - self._acked

    @property
    def in_hand_bytes(self) -> int:
        """Taken from the dirty map (or, in the bulk pass, planned) and not yet acknowledged."""
        return self._handed_out - self._acked

    @property
    def clean_bytes(self) -> int:
        """``pass_clean_bytes``: what this pass need not copy."""
        return self.size - self.total_bytes

    @property
    def finished(self) -> bool:
        return self.dirty_bytes == 0

    def bytes_left(self, dirty: DirtyMap) -> int:
        """What the migration still has to send, as of now: this pass's part and the map's.

        A dirty pass took its part out of the map, so the map holds only
        the rest.  In the bulk pass every mark counts: one ahead of the
        pass in a data extent will be cleared when the pass reads it, but
        one in a hole will not, and telling them apart would walk the
        extents; so this is an upper bound until the bulk pass ends.
        """
        if self._sweep is None:
            return self.dirty_bytes + dirty.dirty_bytes
        return self.in_hand_bytes + dirty.dirty_bytes


class _Sweep:
    """A dirty pass's way through the live dirty map: what it took, and up to where."""

    __slots__ = ("cursor", "dirty", "taken")

    def __init__(self, dirty: DirtyMap) -> None:
        self.dirty = dirty
        self.cursor = 0  # the map is taken up to here
        self.taken = 0  # bytes taken so far

    def ahead(self) -> int:
        """Dirty bytes the sweep has still to take."""
        return self.dirty.dirty_bytes_from(self.cursor)

    def windows(self, size: int) -> Iterator[DirtySnapshot]:
        """Take the map a window at a time, skipping clean space, until the end of the image."""
        while self.cursor < size:
            start = self.dirty.next_dirty(self.cursor)
            if start is None:
                self.cursor = size
                return
            window = self.dirty.take(start, min(start + EXTENT_WINDOW, size))
            self.cursor = window.end  # whole chunks: none is taken twice in a pass
            self.taken += window.dirty_bytes
            yield window


class PassPlanner:
    """Plans the passes of one attempt: pass 1 from the extents, then from the dirty map.

    Make a new planner for each attempt: pass numbers start again at 1.
    ``destination_empty`` says the destination reads as zeroes everywhere
    (a fresh ferry listener), so the bulk pass may skip holes entirely.
    """

    def __init__(
        self,
        image: ExtentSource,
        dirty: DirtyMap,
        *,
        max_data_length: int = DEFAULT_MAX_DATA_LENGTH,
        max_zero_length: int = DEFAULT_MAX_ZERO_LENGTH,
        destination_empty: bool = False,
    ) -> None:
        if dirty.size != image.size:
            raise ValueError(f"dirty map size {dirty.size} is not image size {image.size}")
        for name, value in (
            ("max_data_length", max_data_length),
            ("max_zero_length", max_zero_length),
        ):
            if value <= 0:
                raise ValueError(f"{name} {value} is not positive")
        self.image = image
        self.dirty = dirty
        self.max_data_length = max_data_length
        self.max_zero_length = max_zero_length
        self.destination_empty = destination_empty
        self.passes = 0
        self._begun = False  # begin_bulk_pass cleared the map for extents read elsewhere

    def _max(self, kind: OpKind) -> int:
        return self.max_data_length if kind is OpKind.DATA else self.max_zero_length

    def begin_bulk_pass(self) -> None:
        """Clear the dirty map, before the image's extents are read elsewhere (a thread).

        Then :meth:`bulk_pass` takes the extents that were read *after* this.
        """
        if self.passes:
            raise RuntimeError("the bulk pass is the first pass of an attempt")
        self.dirty.snapshot_and_clear()
        self._begun = True

    def bulk_pass(self, extents: list[Extent] | None = None) -> PassPlan:
        """Pass 1: every allocated extent; clears the dirty map first (see the module doc).

        ``extents``: the whole image's, read after :meth:`begin_bulk_pass`
        cleared the map (None: cleared and read here and now).
        """
        if self.passes:
            raise RuntimeError("the bulk pass is the first pass of an attempt")
        size = self.image.size
        if extents is None:
            self.dirty.snapshot_and_clear()
            extents = self.image.extents(0, size)
        elif not self._begun:
            raise RuntimeError("extents read before the dirty map was cleared")
        data = sum(e.length for e in extents if not e.hole)
        self.passes = 1
        return PassPlan(1, size, lambda plan: self._bulk_ops(plan, extents), total_bytes=data)

    def _bulk_ops(self, plan: PassPlan, extents: Iterable[Extent]) -> Iterator[CopyOp]:
        for e in extents:
            if e.hole and self.destination_empty:
                continue
            kind = OpKind.ZERO if e.hole else OpKind.DATA
            for op in _split(e.offset, e.end, kind, self._max(kind)):
                if kind is OpKind.DATA:
                    self.dirty.clear_within(op.offset, op.length)  # before its read
                plan.cursor = op.end
                yield op

    def dirty_pass(self) -> PassPlan:
        """The next pass: what clients wrote since the previous pass read it."""
        if not self.passes:
            raise RuntimeError("a dirty pass follows the bulk pass")
        self.passes += 1
        sweep = _Sweep(self.dirty)
        return PassPlan(
            self.passes, self.image.size, lambda plan: self._dirty_ops(plan, sweep), sweep=sweep
        )

    def _dirty_ops(self, plan: PassPlan, sweep: _Sweep) -> Iterator[CopyOp]:
        for window in sweep.windows(self.image.size):
            extents = _ExtentWindow(self.image, limit=sweep.cursor)
            for offset, length in window.runs():
                for e in extents.cover(offset, length):
                    kind = OpKind.ZERO if e.hole else OpKind.DATA
                    for op in _split(e.offset, e.end, kind, self._max(kind)):
                        plan.cursor = op.end
                        yield op
