"""What each migration pass sends: the pass planner and its per-pass counters.

Pass 1 (bulk) sends every allocated extent of the image.  Holes are not sent
as data: each becomes a zero request (NBD WRITE_ZEROES without NO_HOLE, so a
sparse destination stays sparse), or nothing at all when the destination is
known to be empty.  Later passes send what the dirty map collected during
the previous pass, snapshotted (and cleared) when the pass starts.

Why this is correct while clients write (the dirty map's own invariant is
that a client marks *after* its write reached the image):

- The bulk pass clears the dirty map *before* it asks for the extents, so a
  write that lands after the extents were read (into a hole the pass will
  zero, or behind the pass) is marked in the fresh map and sent by pass 2.
- A dirty pass takes its snapshot first and reads extents and data later,
  so what it reads is at least as new as the marks it holds; a write after
  the snapshot is in the next pass.  A dirty chunk that is now a hole (the
  client trimmed or zeroed it) goes as a zero request, not as data.
  Extents are looked up ahead, ``EXTENT_WINDOW`` at a time, not once per
  run (two ``lseek`` calls for each scattered 4 KiB block were most of the
  planner's 9 us a request); that is still after the snapshot, so the
  argument holds.  A range that became data since its lookup is marked
  dirty by that write and goes next pass; one that became a hole is read
  as zeroes and sent as data, which is correct, only not sparse.
- A write landing ahead of the pass is sent by this pass *and* the next
  one: harmless, and QEMU does the same.

Requests are cut to at most ``max_data_length`` bytes of data (the
destination's maximum request size) and ``max_zero_length`` bytes of zeroes
(a 32-bit NBD length); they come in offset order and never reach past the
end of the image.  Dirty-pass requests are computed lazily, as the data
plane asks for them, so a large dirty set is never a large list.

Counting (the status fields): a pass starts with ``total_bytes`` to copy,
``pass_dirty_bytes`` is what is still to copy, ``pass_clean_bytes`` is the
rest of the image.  For the bulk pass holes are clean: their zero requests
cost no bandwidth and are not counted.  For a dirty pass every dirty byte
counts, a dirty hole included, because nobody knows it is a hole until the
pass reaches it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
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

    __slots__ = ("_end", "_extents", "_index", "image")

    def __init__(self, image: ExtentSource) -> None:
        self.image = image
        self._extents: list[Extent] = []
        self._index = 0
        self._end = 0  # the window covers up to here

    def _look_up(self, offset: int, end: int) -> None:
        length = max(end, offset + EXTENT_WINDOW) - offset
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
    for each one the destination acknowledged.
    """

    __slots__ = ("_ops", "_remaining", "bulk", "number", "size", "total_bytes")

    def __init__(
        self, number: int, size: int, total_bytes: int, ops: Iterator[CopyOp], *, bulk: bool
    ) -> None:
        self.number = number
        self.size = size
        self.total_bytes = total_bytes
        self.bulk = bulk
        self._ops = ops
        self._remaining = total_bytes

    def __repr__(self) -> str:
        return (
            f"<PassPlan {self.number} total={self.total_bytes} remaining={self._remaining}"
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
        if counted > self._remaining:
            raise ValueError(f"{op} is more than pass {self.number} has left ({self._remaining})")
        self._remaining -= counted

    @property
    def dirty_bytes(self) -> int:
        """``pass_dirty_bytes``: still to copy in this pass."""
        return self._remaining

    @property
    def clean_bytes(self) -> int:
        """``pass_clean_bytes``: what this pass need not copy."""
        return self.size - self.total_bytes

    @property
    def finished(self) -> bool:
        return self._remaining == 0


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

    def _max(self, kind: OpKind) -> int:
        return self.max_data_length if kind is OpKind.DATA else self.max_zero_length

    def bulk_pass(self) -> PassPlan:
        """Pass 1: every allocated extent; clears the dirty map first (see the module doc)."""
        if self.passes:
            raise RuntimeError("the bulk pass is the first pass of an attempt")
        self.dirty.snapshot_and_clear()
        size = self.image.size
        extents = self.image.extents(0, size)
        data = sum(e.length for e in extents if not e.hole)
        self.passes = 1
        return PassPlan(1, size, data, self._bulk_ops(extents), bulk=True)

    def _bulk_ops(self, extents: Iterable[Extent]) -> Iterator[CopyOp]:
        for e in extents:
            if e.hole and self.destination_empty:
                continue
            kind = OpKind.ZERO if e.hole else OpKind.DATA
            yield from _split(e.offset, e.end, kind, self._max(kind))

    def dirty_pass(self) -> PassPlan:
        """The next pass: what clients wrote since the previous pass began its reads."""
        if not self.passes:
            raise RuntimeError("a dirty pass follows the bulk pass")
        snapshot = self.dirty.snapshot_and_clear()
        self.passes += 1
        return PassPlan(
            self.passes,
            snapshot.size,
            snapshot.dirty_bytes,
            self._dirty_ops(snapshot),
            bulk=False,
        )

    def _dirty_ops(self, snapshot: DirtySnapshot) -> Iterator[CopyOp]:
        window = _ExtentWindow(self.image)
        for offset, length in snapshot.runs():
            for e in window.cover(offset, length):
                kind = OpKind.ZERO if e.hole else OpKind.DATA
                yield from _split(e.offset, e.end, kind, self._max(kind))
