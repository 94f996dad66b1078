"""Disjoint byte ranges of the image, each with a value: what is on the migration wire.

A write-blocking migration (:mod:`ferry.migrate.mirroring`) must never have
two overlapping writes on the wire at once: no NBD server promises to apply
overlapping requests in the order they came, and an older copy landing
after a newer one would leave the destination behind the source with
nothing marked dirty to mend it.  So each attempt keeps two
:class:`RangeMap` s: the ranges its passes have in hand (taken from the
plan, being read, sent, not yet answered) and the mirrored client writes
not yet answered.  Each map's ranges are disjoint by construction (a
pass's requests never overlap; a mirrored write that would overlap another
is not mirrored), which lets a lookup find the ranges overlapping
``[offset, end)`` by bisection instead of a walk over all of them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["RangeMap"]

V = TypeVar("V")


class RangeMap(Generic[V]):
    """Disjoint, non-empty ranges ``[offset, end)``, each with a value."""

    __slots__ = ("_ends", "_starts", "_values")

    def __init__(self) -> None:
        self._starts: list[int] = []  # sorted; the ranges are disjoint, so the ends are too
        self._ends: list[int] = []
        self._values: list[V] = []

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __repr__(self) -> str:
        return f"<RangeMap {list(zip(self._starts, self._ends, strict=True))}>"

    def add(self, offset: int, end: int, value: V) -> None:
        """Add ``[offset, end)``; it must overlap none already here."""
        if end <= offset:
            raise ValueError(f"empty range [{offset}, {end})")
        if self.overlaps(offset, end):
            raise ValueError(f"[{offset}, {end}) overlaps a range already in the map")
        i = bisect.bisect_left(self._starts, offset)
        self._starts.insert(i, offset)
        self._ends.insert(i, end)
        self._values.insert(i, value)

    def remove(self, offset: int) -> V:
        """Take out the range that starts at ``offset``; returns its value (KeyError: none)."""
        i = bisect.bisect_left(self._starts, offset)
        if i == len(self._starts) or self._starts[i] != offset:
            raise KeyError(offset)
        del self._starts[i], self._ends[i]
        return self._values.pop(i)

    def overlaps(self, offset: int, end: int) -> bool:
        """Whether any range here shares a byte with ``[offset, end)``."""
        i = bisect.bisect_left(self._starts, end) - 1
        return i >= 0 and self._ends[i] > offset

    def overlapping(self, offset: int, end: int) -> Iterator[V]:
        """The values of the ranges that share a byte with ``[offset, end)``."""
        i = bisect.bisect_left(self._starts, end) - 1
        while i >= 0 and self._ends[i] > offset:
            yield self._values[i]
            i -= 1

    def values(self) -> list[V]:
        """Every value, in offset order."""
        return list(self._values)
