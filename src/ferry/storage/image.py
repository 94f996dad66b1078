"""The image file: positional reads and writes, zeroing, flushing, extents.

Everything here is a plain blocking system call; nothing knows about
Twisted.  The callers (``serve/`` and ``migrate/``) decide which calls are
cheap enough for the reactor thread and which go to a thread pool.

Invariants this module keeps:

- ``size`` is fixed when the image is opened.  No call reads or writes
  outside ``[0, size)``: out-of-range arguments raise ``ValueError`` before
  any system call, so a bug in a caller cannot grow the file or scribble past
  the end of a block device.
- A zeroed or trimmed range reads back as zeroes, whatever the file system
  supports: each fast path (``fallocate`` modes) falls back to a slower one
  that gives the same bytes, and only ``fast_only`` refuses the slowest.
- Every method except ``close`` may be called from several threads at once:
  all I/O is positional (``pread``/``pwrite``), and ``lseek`` is used only for
  its return value.  A file system that lacks a ``fallocate`` mode or
  ``SEEK_DATA`` is remembered per image, so the unsupported call is made once.
- Nothing ever creates, truncates or resizes the file.
- A failed flush is final: every later :meth:`Image.flush` fails too, until
  :meth:`Image.clear_flush_failure` (see there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["Extent", "Image", "ImageError", "ZeroingNotFast"]

# fallocate(2) modes, from <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10

_PUNCH: Final = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
# KEEP_SIZE is required on block devices and harmless inside a regular file.
_ZERO_RANGE: Final = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
_ALLOCATE: Final = FALLOC_FL_KEEP_SIZE

#: The largest buffer the slow zeroing path writes at once: big enough that
#: the syscall overhead vanishes, small enough to never matter for memory.
ZERO_CHUNK_SIZE: Final = 1024 * 1024
_ZEROES: Final = bytes(ZERO_CHUNK_SIZE)

#: ``preadv2``/``pwritev2``'s "do not wait" flag (Linux 4.14), where Python has it.
_RWF_NOWAIT: Final[int | None] = getattr(os, "RWF_NOWAIT", None)

#: fallocate errors that mean "this file (system) cannot do that mode".
#: EINVAL is not among them: block devices return it for a range that is not
#: aligned to the logical block size, which says nothing about other ranges.
_UNSUPPORTED: Final = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV})

#: lseek(SEEK_DATA) errors that mean "no hole information here".  Block
#: devices answer EINVAL; some network and FUSE file systems answer the rest.
_SEEK_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})

def _nbytes(data: bytes | bytearray | memoryview) -> int:
    """How many bytes a write of ``data`` writes (a memoryview's items may be wider)."""
    return memoryview(data).nbytes if isinstance(data, memoryview) else len(data)


def _nowait_unsupported(error: OSError) -> bool:
    """Whether an ``RWF_NOWAIT`` call failed because this file or kernel cannot do it at all."""
    return error.errno in _UNSUPPORTED or error.errno == errno.EINVAL


_OPEN_REASONS: Final = {
    errno.ENOENT: "no such file",
    errno.EISDIR: "is a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENXIO: "no such device",
    errno.EBUSY: "device or resource busy",
    errno.ETXTBSY: "file is busy",
}


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    # CDLL(None) is the running process, which links libc on every Linux
    # that CPython supports; find_library is only a second chance.
    for name in (None, ctypes.util.find_library("c")):
        try:
            func = ctypes.CDLL(name, use_errno=True).fallocate
        except (OSError, AttributeError):
            continue
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        return func
    return None


_libc_fallocate: Final = _load_fallocate()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``, raising ``OSError`` like the functions in ``os``.

    ``os.posix_fallocate`` cannot pass a mode, hence ctypes.  A module-level
    function so tests can stand in a file system that lacks some modes.
    """
    if _libc_fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    while _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def punch_supported(fd: int, offset: int, length: int) -> str | None:
    """Punch a hole in ``fd`` (a scratch file: its data goes); None if the file system
    can, else why not (``ferry check``)."""
    try:
        _fallocate(fd, _PUNCH, offset, length)
    except OSError as error:
        return f"fallocate(PUNCH_HOLE) failed: {error.strerror}"
    return None


class ImageError(Exception):
    """The image cannot be opened; ``str()`` is one line fit for a user."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"image {self.path}: {reason}")


class ZeroingNotFast(Exception):
    """Zeroing would mean writing buffers, and the caller asked for fast only.

    NBD's FAST_ZERO lets a client ask for this answer (ENOTSUP) so that it can
    fall back to its own strategy rather than wait for a slow zero.
    """


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the image that is all hole or all (possibly) data.

    ``hole=True`` promises that reads return zeroes and nothing is allocated;
    ``hole=False`` promises nothing, the bytes may still be zero.
    """

    offset: int
    length: int
    hole: bool

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0:
            raise ValueError(f"bad extent: offset={self.offset} length={self.length}")

    @property
    def end(self) -> int:
        return self.offset + self.length


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "of an unknown type"


class Image:
    """An open image: a regular file or a block device of fixed size."""

    __slots__ = (
        "_can_allocate",
        "_can_punch",
        "_can_read_nowait",
        "_can_seek",
        "_can_write_nowait",
        "_can_zero_range",
        "_fd",
        "_flush_failure",
        "path",
        "read_only",
        "size",
    )

    path: Path
    size: int
    read_only: bool

    def __init__(self, fd: int, path: Path, size: int, *, read_only: bool) -> None:
        """Adopt an open descriptor; use :meth:`open` unless you already have one."""
        self._fd = fd
        self.path = path
        self.size = size
        self.read_only = read_only
        self._can_punch = True
        self._can_zero_range = True
        self._can_allocate = True
        self._can_seek = True
        self._flush_failure: int | None = None  # the errno of the first flush that failed
        self._can_read_nowait = _RWF_NOWAIT is not None
        self._can_write_nowait = _RWF_NOWAIT is not None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> Image:
        """Open an existing image, turning every failure into one ``ImageError``.

        O_NONBLOCK only keeps a FIFO from hanging the open until it is
        rejected; it is cleared again, and it means nothing for regular files
        and block devices.  There is no O_CREAT: a mistyped path must be an
        error, not a fresh empty image.
        """
        flags = os.O_RDONLY if read_only else os.O_RDWR
        flags |= os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as e:
            reason = _OPEN_REASONS.get(e.errno or 0) or (e.strerror or str(e)).lower()
            if not read_only and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                reason += ": to serve it without writing, use --read-only"
            raise ImageError(path, reason) from e
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(path, "is a directory")
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                # st_size of a device node is 0; the device knows its size.
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise ImageError(
                    path, f"is {_kind(st.st_mode)}, not a regular file or block device"
                )
            if size == 0:
                raise ImageError(path, "is empty (size 0)")
            os.set_blocking(fd, True)
        except ImageError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise ImageError(path, (e.strerror or str(e)).lower()) from e
        return cls(fd, Path(path), size, read_only=read_only)

    def __repr__(self) -> str:
        state = " closed" if self._fd < 0 else ""
        return f"<Image {str(self.path)!r} size={self.size} read_only={self.read_only}{state}>"

    # -- lifetime --------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O on a closed image")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor; later calls fail with EBADF.

        The descriptor becomes -1 rather than staying a stale number, so a
        late call cannot land on whatever file reuses that number.  The caller
        must not close while other threads are still inside a call.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- data ------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range offset={offset} length={length} is outside the image (size {self.size})"
            )

    def _short(self, at: int) -> OSError:
        return OSError(errno.EIO, f"image {self.path}: unexpected end of file at {at}")

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes.

        A short read is retried; end of file inside ``size`` means the file
        shrank under us, which is reported as EIO rather than returned short.
        """
        self._check(offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            more = os.pread(self._fd, length - done, offset + done)
            if not more:
                raise self._short(offset + done)
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        """Read exactly ``length`` bytes if that needs no disk I/O; None if it would.

        ``preadv2(RWF_NOWAIT)`` answers from the page cache or says EAGAIN
        instead of waiting for the disk, so a caller on an event loop can
        read what is cached without a thread and leave the rest to one.  A
        short answer (part of the range cached, or the end of the file)
        is None too: :meth:`pread` reads it again, whole or with its error.
        Where the kernel or the file does not support it, always None.
        """
        self._check(offset, length)
        if not self._can_read_nowait or _RWF_NOWAIT is None:
            return None
        buffer = bytearray(length)
        try:
            n = os.preadv(self._fd, (buffer,), offset, _RWF_NOWAIT)
        except OSError as e:
            if _nowait_unsupported(e):
                self._can_read_nowait = False
            elif e.errno != errno.EAGAIN:
                raise
            return None
        return buffer if n == length else None

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of ``data``; errors (ENOSPC, EIO, EBADF) propagate as ``OSError``.

        A read-only image refuses with the kernel's EBADF (the descriptor is
        O_RDONLY); callers that serve read-only exports check before calling.
        """
        length = _nbytes(data)
        self._check(offset, length)
        if length == 0:
            return
        n = os.pwrite(self._fd, data, offset)
        if n != length:
            self._pwrite_rest(memoryview(data).cast("B"), n, offset)

    def write_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write what of ``data`` needs no waiting; returns how many bytes that was.

        ``pwritev2(RWF_NOWAIT)`` copies into the page cache or says EAGAIN
        where it would wait (a page to read or allocate, dirty pages to
        throttle, a lock), so a caller on an event loop writes there what
        it can and leaves the rest (``data[n:]``) to a thread.  XFS and
        btrfs take buffered writes this way since Linux 6.0/6.1; ext4,
        tmpfs and block devices refuse (EOPNOTSUPP), and from then on this
        image answers 0 without asking.  Other errors (ENOSPC, EIO, EBADF
        on a read-only image) propagate as from :meth:`pwrite`.
        """
        length = _nbytes(data)
        self._check(offset, length)
        if not self._can_write_nowait or _RWF_NOWAIT is None or length == 0:
            return 0
        try:
            return os.pwritev(self._fd, (data,), offset, _RWF_NOWAIT)
        except OSError as e:
            if _nowait_unsupported(e):
                self._can_write_nowait = False
            elif e.errno != errno.EAGAIN:
                raise
            return 0

    def _pwrite_rest(self, view: memoryview, done: int, offset: int) -> None:
        while done < view.nbytes:
            n = os.pwrite(self._fd, view[done:], offset + done)
            if n == 0:  # pwrite makes progress or fails; never spin
                raise OSError(errno.EIO, f"image {self.path}: write made no progress")
            done += n

    def flush(self) -> None:
        """Make acknowledged writes durable; metadata that reads don't need is skipped.

        Once a flush has failed, every later one fails with the same errno.
        Linux marks the pages it could not write back clean: they still read
        back, but a later fdatasync succeeds without writing them, and a crash
        loses them (PostgreSQL's "fsyncgate").  A flush that succeeded after a
        failed one would promise clients writes that are not on the disk.
        """
        if self._flush_failure is not None:
            code = self._flush_failure
            raise OSError(
                code,
                f"image {self.path}: an earlier flush failed ({os.strerror(code)}): "
                "what was written before it may not be on the disk",
            )
        try:
            self._fdatasync()
        except OSError as error:
            self._flush_failure = error.errno or errno.EIO
            raise

    def _fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def clear_flush_failure(self) -> None:
        """Flushes may succeed again: every byte will be written anew before one is relied on.

        Right only when that is so -- a migration's destination, when a new
        sender starts sending the whole image (nothing it held before is kept).
        """
        self._flush_failure = None

    # -- zeroing ---------------------------------------------------------------

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range, leaving zeroes.

        NBD leaves the content of a trimmed range undefined, but ferry promises
        zeroes, so where the file system cannot punch the range is zeroed
        another way.
        """
        self._check(offset, length)
        if length:
            self._zero(offset, length, trim=True, fast_only=False)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast_only: bool = False
    ) -> None:
        """Make a range read back as zeroes.

        ``may_trim`` (no NBD NO_HOLE) lets a sparse image stay sparse by
        punching.  Without it the range stays allocated: ZERO_RANGE, else punch
        followed by allocate, else writing zero buffers.  ``fast_only`` (NBD
        FAST_ZERO) raises :class:`ZeroingNotFast` instead of writing buffers.
        """
        self._check(offset, length)
        if length:
            self._zero(offset, length, trim=may_trim, fast_only=fast_only)

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """True if done, False if the mode is unsupported here; other errors raise."""
        try:
            _fallocate(self._fd, mode, offset, length)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                if mode == _PUNCH:
                    self._can_punch = False
                elif mode == _ZERO_RANGE:
                    self._can_zero_range = False
                else:
                    self._can_allocate = False
                return False
            if e.errno == errno.EINVAL:
                return False
            raise
        return True

    def _zero(self, offset: int, length: int, *, trim: bool, fast_only: bool) -> None:
        if trim and self._can_punch and self._try_fallocate(_PUNCH, offset, length):
            return
        if self._can_zero_range and self._try_fallocate(_ZERO_RANGE, offset, length):
            return
        if (
            not trim
            and self._can_punch
            and self._can_allocate
            and self._try_fallocate(_PUNCH, offset, length)
            # The range reads as zeroes now; allocate it again.  If that fails,
            # a FAST_ZERO request left as a hole is still all zeroes (NO_HOLE
            # is only a preference); otherwise the buffers below allocate it.
            and (self._try_fallocate(_ALLOCATE, offset, length) or fast_only)
        ):
            return
        if fast_only:
            raise ZeroingNotFast(
                f"image {self.path}: cannot zero {length} bytes at {offset} without writing them"
            )
        self._write_zero_buffers(offset, length)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        zeroes = memoryview(_ZEROES)
        end = offset + length
        while offset < end:
            n = min(end - offset, ZERO_CHUNK_SIZE)
            written = os.pwrite(self._fd, zeroes[:n], offset)
            if written != n:
                self._pwrite_rest(zeroes[:n], written, offset)
            offset += n

    # -- allocation ------------------------------------------------------------

    def extents(self, offset: int, length: int, max_extents: int | None = None) -> list[Extent]:
        """Holes and data covering exactly ``[offset, offset + length)`` within the image.

        Where the file system has no hole information the whole range is one
        data extent: saying "data" is always safe, saying "hole" is a promise
        of zeroes.  ``max_extents`` stops early, covering only a prefix of the
        range, so that a fragmented file cannot make one BLOCK_STATUS request
        build a list of millions of extents.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        if max_extents is not None and max_extents < 1:
            raise ValueError(f"max_extents {max_extents} is less than 1")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        if not self._can_seek:
            return [Extent(offset, end - offset, False)]
        out: list[Extent] = []
        pos = offset
        while pos < end:
            if max_extents is not None and len(out) >= max_extents:
                break  # each extent so far is whole: it ends where the other kind begins
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data from pos to end of file
                    data = end
                elif e.errno in _SEEK_UNSUPPORTED:
                    self._can_seek = False
                    _append(out, pos, end, hole=False)
                    break
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                _append(out, pos, stop, hole=True)
                pos = stop
                continue
            try:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                hole = end  # the file shrank between the calls: claim data
            stop = min(hole, end) if hole > pos else end
            _append(out, pos, stop, hole=False)
            pos = stop
        return out


def _append(out: list[Extent], start: int, stop: int, *, hole: bool) -> None:
    if out and out[-1].hole == hole and out[-1].end == start:
        prev = out.pop()
        start = prev.offset
    out.append(Extent(start, stop - start, hole))
