"""The simulated disk: what was written, what is durable, and the faults between the two.

A :class:`SimDisk` belongs to a host and outlives the processes on it.  It
has two layers, as a kernel's page cache over a device does:

* **visible**: what reads return -- every write lands here at once;
* **synced**: what survives a power cut -- a successful sync copies the
  pages written since the last one (the *dirty* pages) here.

A power cut (:meth:`SimDisk.power_cut`) keeps the synced layer and, for each
dirty page, decides by the seed whether the kernel had written it back
already; a killed process loses nothing (the page cache is the kernel's).

Faults, switched on for a while by :mod:`ferry.sim.faults`: a write or a
sync that fails with EIO or ENOSPC, and a slow device.  A failed write
writes nothing.  A failed sync behaves as Linux does since 4.13: the dirty
pages are marked clean without reaching the device ("fsyncgate"), so they
stay readable but are *lost* -- a later sync that succeeds does not write
them, and a power cut drops them.

:class:`SimImage` is an :class:`~ferry.storage.Image` whose system calls are
this disk's methods, so the data plane and the migration cannot tell it
from a file; ``run_blocking`` (:mod:`ferry.sim.node`) runs its flushes after
the disk's latency, as a thread would.  Which reads the page cache answers
at once, and how much of a write the kernel takes at once, is the seed's
choice too: the data plane's paths on the reactor thread
(``Image.read_cached``, ``Image.write_nowait``) and on the threads are
both taken.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ferry.storage.image import Extent, Image

__all__ = ["PAGE", "DiskFaults", "SimDisk", "SimImage"]

#: The disk's page: the unit of dirtiness, write-back and holes.
PAGE: Final = 4096
_ZERO_PAGE: Final = bytes(PAGE)


@dataclass
class DiskFaults:
    """What the disk does wrong now: chances per call, and how slow it is."""

    write_error: float = 0.0  # chance that a pwrite fails
    sync_error: float = 0.0  # chance that an fsync fails
    errno: int = errno.EIO  # EIO or ENOSPC
    latency: tuple[float, float] = (0.0002, 0.002)  # a blocking call's duration, seconds


class SimDisk:
    """A host's disk: a visible and a synced layer, and the pages in between."""

    def __init__(
        self, size: int, rng: random.Random, initial: bytes | bytearray | None = None
    ) -> None:
        if size % PAGE:
            raise ValueError(f"a simulated disk is whole pages, not {size} bytes")
        self.size = size
        self._rng = rng
        self.visible = bytearray(initial if initial is not None else bytes(size))
        self.synced = bytearray(self.visible)
        self._dirty: set[int] = set()
        self._lost: set[int] = set()  # marked clean by a failed sync, never written back
        self.faults = DiskFaults()
        self.writes = 0
        self.syncs = 0

    # -- what the image does -----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.visible[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._maybe_fail(self.faults.write_error, "pwrite")
        view = memoryview(data).cast("B")
        self.visible[offset : offset + view.nbytes] = view
        self._touch(offset, view.nbytes)

    def zero(self, offset: int, length: int) -> None:
        self._maybe_fail(self.faults.write_error, "fallocate")
        self.visible[offset : offset + length] = bytes(length)
        self._touch(offset, length)

    def sync(self) -> None:
        """fdatasync: the dirty pages become durable -- or, on an error, lost."""
        self.syncs += 1
        if self.faults.sync_error and self._rng.random() < self.faults.sync_error:
            self._lost |= self._dirty
            self._dirty = set()
            raise OSError(self.faults.errno, os.strerror(self.faults.errno) + " (simulated fsync)")
        for page in self._dirty:
            start = page * PAGE
            self.synced[start : start + PAGE] = self.visible[start : start + PAGE]
        self._dirty = set()

    def extents(self, offset: int, length: int, max_extents: int | None) -> list[Extent]:
        """Pages that read as zeroes are holes; the rest is data."""
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end and (max_extents is None or len(out) < max_extents):
            hole = self._zero_page(pos // PAGE)
            stop = pos
            while stop < end and self._zero_page(stop // PAGE) == hole:
                stop = min(end, (stop // PAGE + 1) * PAGE)
            out.append(Extent(pos, stop - pos, hole))
            pos = stop
        return out

    # -- what happens to the host ---------------------------------------------------------

    def power_cut(self) -> int:
        """The host lost power: the synced layer, plus whatever was written back; pages lost."""
        dropped = 0
        for page in sorted(self._dirty):
            if self._rng.random() < 0.5:
                start = page * PAGE
                self.synced[start : start + PAGE] = self.visible[start : start + PAGE]
            else:
                dropped += 1
        dropped += len(self._lost)
        self.visible[:] = self.synced
        self._dirty = set()
        self._lost = set()
        return dropped

    @property
    def lost_pages(self) -> int:
        """Pages a failed sync marked clean: they read back but a crash takes them."""
        return len(self._lost)

    def cached(self) -> bool:
        """Whether a read finds its pages in the page cache: the reactor reads it at once."""
        return self._rng.random() < 0.5

    def takes_at_once(self, length: int) -> int:
        """How much of a write ``pwritev2(RWF_NOWAIT)`` takes: all, some whole pages, or none."""
        draw = self._rng.random()
        if draw < 0.4:
            return length
        if draw < 0.5 and length > PAGE:
            return PAGE * self._rng.randrange(1, (length + PAGE - 1) // PAGE)
        return 0

    def latency(self) -> float:
        low, high = self.faults.latency
        return self._rng.uniform(low, high)

    # -- helpers ----------------------------------------------------------------------------

    def _touch(self, offset: int, length: int) -> None:
        self.writes += 1
        if length <= 0:
            return
        for page in range(offset // PAGE, (offset + length - 1) // PAGE + 1):
            self._dirty.add(page)
            self._lost.discard(page)

    def _zero_page(self, page: int) -> bool:
        start = page * PAGE
        return self.visible[start : start + PAGE] == _ZERO_PAGE

    def _maybe_fail(self, chance: float, call: str) -> None:
        if chance and self._rng.random() < chance:
            code = self.faults.errno
            raise OSError(code, f"{os.strerror(code)} (simulated {call})")


class SimImage(Image):
    """An :class:`~ferry.storage.Image` on a :class:`SimDisk` (see the module doc)."""

    def __init__(self, disk: SimDisk, path: str, *, read_only: bool = False) -> None:
        super().__init__(-1, Path(path), disk.size, read_only=read_only)
        self.disk = disk
        self._open = True

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "a simulated image has no descriptor")

    @property
    def closed(self) -> bool:
        return not self._open

    def close(self) -> None:
        self._open = False

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.disk.read(offset, length)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        length = memoryview(data).nbytes
        self._check(offset, length)
        if self.read_only:
            raise OSError(errno.EBADF, "read-only image")
        if length:
            self.disk.write(offset, data)

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        """By the seed, the page cache answers at once (the reactor reads) or not (a thread does).

        (The real method asked the kernel about descriptor -1: until this was
        here, every READ a simulated client sent failed with EBADF, and no
        read was ever checked.)
        """
        self._check(offset, length)
        if not self.disk.cached():
            return None
        return bytearray(self.disk.read(offset, length))

    def write_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """By the seed, the kernel takes all of a write at once, its first pages, or none of it."""
        view = memoryview(data).cast("B")
        self._check(offset, view.nbytes)
        if self.read_only:
            raise OSError(errno.EBADF, "read-only image")
        taken = self.disk.takes_at_once(view.nbytes)
        if taken:
            self.disk.write(offset, view[:taken])
        return taken

    def _fdatasync(self) -> None:
        self.disk.sync()

    def punch_hole(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if length:
            self.disk.zero(offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast_only: bool = False
    ) -> None:
        self._check(offset, length)
        if length:
            self.disk.zero(offset, length)

    def extents(self, offset: int, length: int, max_extents: int | None = None) -> list[Extent]:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        return self.disk.extents(offset, length, max_extents)
