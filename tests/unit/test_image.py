"""The image file against the real file system under the test's tmp_path.

Allocation is checked with ``st_blocks``, so these tests prove that holes are
really punched, not only that the bytes read back as zeroes.  File systems
lacking a ``fallocate`` mode or ``SEEK_DATA`` are stood in for by replacing
``image._fallocate`` / ``os.lseek`` with wrappers that refuse some calls.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.storage import Extent, Image, ImageError, ZeroingNotFast
from ferry.storage import image as image_mod

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

_real_fallocate = image_mod._fallocate

MODE_PUNCH = image_mod.FALLOC_FL_PUNCH_HOLE | image_mod.FALLOC_FL_KEEP_SIZE
MODE_ZERO_RANGE = image_mod.FALLOC_FL_ZERO_RANGE | image_mod.FALLOC_FL_KEEP_SIZE
MODE_ALLOCATE = image_mod.FALLOC_FL_KEEP_SIZE


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def allocated(image: Image) -> int:
    return os.fstat(image.fileno()).st_blocks * 512


@pytest.fixture
def block(tmp_path: Path) -> int:
    """The file system's allocation unit, so the tests hold beyond 4 KiB blocks."""
    return max(os.statvfs(tmp_path).f_bsize, 4 * KIB)


@pytest.fixture
def sparse(tmp_path: Path) -> Iterator[Image]:
    """A 1 GiB image with nothing allocated."""
    with Image.open(sparse_file(tmp_path / "disk.img", GIB)) as image:
        assert allocated(image) == 0, "this file system does not create sparse files"
        yield image


class FakeFallocate:
    """``fallocate`` on a file system that answers ``refuse[mode]`` for some modes."""

    def __init__(self, refuse: dict[int, int]) -> None:
        self.refuse = refuse
        self.calls: list[int] = []

    def __call__(self, fd: int, mode: int, offset: int, length: int) -> None:
        self.calls.append(mode)
        if mode in self.refuse:
            err = self.refuse[mode]
            raise OSError(err, os.strerror(err))
        _real_fallocate(fd, mode, offset, length)


@pytest.fixture
def refuse(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeFallocate]:
    def install(*modes: int, err: int = errno.EOPNOTSUPP) -> FakeFallocate:
        fake = FakeFallocate(dict.fromkeys(modes, err))
        monkeypatch.setattr(image_mod, "_fallocate", fake)
        return fake

    return install


# -- opening ------------------------------------------------------------------


def test_open_missing_file_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nope.img"
    with pytest.raises(ImageError) as info:
        Image.open(path)
    assert str(info.value) == f"image {path}: no such file"
    assert info.value.path == str(path)
    assert not path.exists()


@pytest.mark.parametrize("read_only", [False, True])
def test_open_directory(tmp_path: Path, read_only: bool) -> None:
    with pytest.raises(ImageError, match=r": is a directory$"):
        Image.open(tmp_path, read_only=read_only)


def test_open_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.img"
    path.touch()
    with pytest.raises(ImageError) as info:
        Image.open(path)
    assert str(info.value) == f"image {path}: is empty (size 0)"


def test_open_path_through_a_file(tmp_path: Path) -> None:
    sparse_file(tmp_path / "f", 4096)
    with pytest.raises(ImageError, match="not a directory"):
        Image.open(tmp_path / "f" / "x")


def test_open_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    for read_only in (True, False):
        with pytest.raises(ImageError, match="is a FIFO, not a regular file or block device"):
            Image.open(path, read_only=read_only)


def test_open_character_device() -> None:
    with pytest.raises(ImageError, match="is a character device"):
        Image.open("/dev/null", read_only=True)


def test_open_without_permission(tmp_path: Path) -> None:
    """Without write permission the image cannot be opened writable, and ferry says what helps.

    Root may open any file, so the file is made immutable instead, which even
    root may not open for writing.
    """
    path = sparse_file(tmp_path / "locked.img", 4096)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)
    try:
        with pytest.raises(ImageError, match=r": permission denied: .* use --read-only$"):
            Image.open(path)
        Image.open(path, read_only=True).close()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def test_open_error_leaks_no_descriptor(tmp_path: Path) -> None:
    (tmp_path / "empty.img").touch()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ImageError):
            Image.open(tmp_path / "empty.img")
    assert len(os.listdir("/proc/self/fd")) == before


def test_open_attributes_and_close(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "disk.img", 12345)
    image = Image.open(str(path), read_only=True)
    assert image.path == path
    assert image.size == 12345
    assert image.read_only
    assert not image.closed
    assert "disk.img" in repr(image)
    fd = image.fileno()
    assert os.get_blocking(fd)
    image.close()
    image.close()  # idempotent
    assert image.closed
    with pytest.raises(ValueError):
        image.fileno()
    # A closed image never touches whatever reuses its descriptor number.
    with pytest.raises(OSError) as info:
        image.pread(0, 1)
    assert info.value.errno == errno.EBADF


def test_context_manager_closes(tmp_path: Path) -> None:
    with Image.open(sparse_file(tmp_path / "disk.img", 4096)) as image:
        assert not image.closed
    assert image.closed


# -- reading and writing ------------------------------------------------------


def test_pread_pwrite_round_trip_at_odd_offsets(tmp_path: Path) -> None:
    model = bytearray(3 * MIB + 17)
    with Image.open(sparse_file(tmp_path / "disk.img", len(model))) as image:
        for offset, length in [(0, 1), (1, 4095), (4095, 2), (12345, 100_001), (MIB - 3, MIB + 7)]:
            data = os.urandom(length)
            image.pwrite(data, offset)
            model[offset : offset + length] = data
        image.pwrite(memoryview(b"xyz")[1:], len(model) - 2)  # up to the last byte
        model[-2:] = b"yz"
        image.pwrite(bytearray(b"abc"), 7)
        model[7:10] = b"abc"
        assert image.pread(0, len(model)) == model
        for offset, length in [(0, 0), (5, 9), (4093, 9000), (len(model) - 1, 1)]:
            assert image.pread(offset, length) == model[offset : offset + length]
        image.flush()
    assert (tmp_path / "disk.img").read_bytes() == model


_SMALL = 256 * KIB
_op = st.tuples(
    st.sampled_from(["write", "punch", "zero", "zero_no_hole"]),
    st.integers(0, _SMALL - 1),
    st.integers(0, 80 * KIB),
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_op, max_size=12))
def test_writes_and_zeroes_agree_with_a_bytearray(ops: list[tuple[str, int, int]]) -> None:
    """Whatever mix of writes and zeroing, the file reads like the model, and
    every extent reported as a hole reads as zeroes."""
    model = bytearray(_SMALL)
    with (
        tempfile.TemporaryDirectory() as d,
        Image.open(sparse_file(Path(d) / "i", _SMALL)) as image,
    ):
        for n, (op, offset, length) in enumerate(ops):
            length = min(length, _SMALL - offset)
            if op == "write":
                data = bytes([n % 255 + 1]) * length
                image.pwrite(data, offset)
                model[offset : offset + length] = data
            else:
                if op == "punch":
                    image.punch_hole(offset, length)
                else:
                    image.write_zeroes(offset, length, may_trim=op == "zero")
                model[offset : offset + length] = bytes(length)
        assert image.pread(0, _SMALL) == model
        extents = image.extents(0, _SMALL)
        check_cover(extents, 0, _SMALL)
        for e in extents:
            if e.hole:
                assert model[e.offset : e.end] == bytes(e.length)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), (4096, 1), (4000, 97), (4097, 0)])
def test_out_of_range_is_refused_before_touching_the_file(
    tmp_path: Path, offset: int, length: int
) -> None:
    with Image.open(sparse_file(tmp_path / "disk.img", 4096)) as image:
        with pytest.raises(ValueError, match="outside the image"):
            image.pread(offset, length)
        if length >= 0:  # a buffer carries its own length
            with pytest.raises(ValueError, match="outside the image"):
                image.pwrite(b"x" * length, offset)
        with pytest.raises(ValueError, match="outside the image"):
            image.punch_hole(offset, length)
        with pytest.raises(ValueError, match="outside the image"):
            image.write_zeroes(offset, length)
    assert os.stat(tmp_path / "disk.img").st_size == 4096


def test_pread_of_a_file_that_shrank_is_eio(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "disk.img", 8192)
    with Image.open(path) as image:
        os.truncate(path, 4096)
        with pytest.raises(OSError) as info:
            image.pread(4000, 1000)
        assert info.value.errno == errno.EIO


def test_read_only_refuses_every_write(tmp_path: Path) -> None:
    """The descriptor is O_RDONLY, so the kernel answers EBADF; nothing is changed."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xaa" * 65536)
    with Image.open(path, read_only=True) as image:
        attempts: list[Callable[[], None]] = [
            lambda: image.pwrite(b"x", 0),
            lambda: image.punch_hole(0, 4096),
            lambda: image.write_zeroes(0, 4096),
            lambda: image.write_zeroes(0, 4096, may_trim=False),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EBADF
        assert image.pread(0, 4) == b"\xaa" * 4
        image.flush()  # fdatasync works on a read-only descriptor
    assert path.read_bytes() == b"\xaa" * 65536


# -- holes and zeroes -----------------------------------------------------------


def test_punch_hole_deallocates_and_reads_zeroes(sparse: Image) -> None:
    sparse.pwrite(b"\xff" * (64 * KIB), MIB)
    assert 64 * KIB <= allocated(sparse) <= 128 * KIB
    sparse.punch_hole(MIB, 64 * KIB)
    assert allocated(sparse) == 0
    assert sparse.pread(MIB - 1, 64 * KIB + 2) == bytes(64 * KIB + 2)
    assert sparse.size == GIB


def test_punch_hole_unaligned_keeps_neighbours(sparse: Image, block: int) -> None:
    sparse.pwrite(b"\xff" * (4 * block), 0)
    sparse.punch_hole(100, 3 * block)
    assert sparse.pread(0, 100) == b"\xff" * 100
    assert sparse.pread(100, 3 * block) == bytes(3 * block)
    assert sparse.pread(100 + 3 * block, block - 100) == b"\xff" * (block - 100)
    # the blocks wholly inside the range were freed, the edges were zeroed
    assert allocated(sparse) <= 2 * block


def test_write_zeroes_may_trim_deallocates(sparse: Image) -> None:
    sparse.pwrite(b"\x01" * MIB, 0)
    sparse.write_zeroes(0, MIB)
    assert allocated(sparse) == 0
    assert sparse.pread(0, MIB) == bytes(MIB)


def test_write_zeroes_no_hole_stays_allocated(sparse: Image) -> None:
    sparse.pwrite(b"\x01" * MIB, 0)
    sparse.write_zeroes(0, MIB, may_trim=False)
    assert allocated(sparse) >= MIB
    assert sparse.pread(0, MIB) == bytes(MIB)
    # and a hole zeroed with NO_HOLE becomes allocated
    sparse.write_zeroes(8 * MIB, MIB, may_trim=False, fast_only=True)
    assert allocated(sparse) >= 2 * MIB
    assert sparse.pread(8 * MIB, MIB) == bytes(MIB)


def test_zero_length_calls_are_no_ops(sparse: Image, refuse: Callable[..., FakeFallocate]) -> None:
    fake = refuse()
    sparse.punch_hole(0, 0)
    sparse.write_zeroes(GIB, 0, may_trim=False, fast_only=True)
    sparse.pwrite(b"", GIB)
    assert fake.calls == []
    assert allocated(sparse) == 0


def test_punch_unsupported_falls_back_to_zero_range(
    sparse: Image, refuse: Callable[..., FakeFallocate]
) -> None:
    fake = refuse(MODE_PUNCH)
    sparse.pwrite(b"\x01" * MIB, 0)
    sparse.punch_hole(0, MIB)
    sparse.write_zeroes(MIB, MIB, fast_only=True)
    assert sparse.pread(0, 2 * MIB) == bytes(2 * MIB)
    # the refusal is remembered: punch was tried once
    assert fake.calls == [MODE_PUNCH, MODE_ZERO_RANGE, MODE_ZERO_RANGE]


def test_zero_range_unsupported_punches_then_allocates(
    sparse: Image, refuse: Callable[..., FakeFallocate]
) -> None:
    """tmpfs, for one, punches holes but has no ZERO_RANGE."""
    fake = refuse(MODE_ZERO_RANGE)
    sparse.pwrite(b"\x01" * MIB, 0)
    sparse.write_zeroes(0, MIB, may_trim=False, fast_only=True)
    assert sparse.pread(0, MIB) == bytes(MIB)
    assert allocated(sparse) >= MIB
    assert fake.calls == [MODE_ZERO_RANGE, MODE_PUNCH, MODE_ALLOCATE]


def test_punched_but_cannot_allocate(sparse: Image, refuse: Callable[..., FakeFallocate]) -> None:
    fake = refuse(MODE_ZERO_RANGE, MODE_ALLOCATE)
    sparse.pwrite(b"\x01" * MIB, 0)
    # FAST_ZERO: the hole is zeroes, that is enough
    sparse.write_zeroes(0, MIB, may_trim=False, fast_only=True)
    assert sparse.pread(0, MIB) == bytes(MIB)
    assert allocated(sparse) == 0
    # otherwise the range is written, so it ends up allocated as asked
    sparse.pwrite(b"\x01" * MIB, 0)
    sparse.write_zeroes(0, MIB, may_trim=False)
    assert sparse.pread(0, MIB) == bytes(MIB)
    assert allocated(sparse) >= MIB
    assert fake.calls == [MODE_ZERO_RANGE, MODE_PUNCH, MODE_ALLOCATE]


@pytest.mark.parametrize("may_trim", [True, False])
def test_fast_only_refuses_to_write_buffers(
    sparse: Image, refuse: Callable[..., FakeFallocate], may_trim: bool
) -> None:
    refuse(MODE_PUNCH, MODE_ZERO_RANGE, MODE_ALLOCATE)
    sparse.pwrite(b"\x01" * 4096, 0)
    with pytest.raises(ZeroingNotFast):
        sparse.write_zeroes(0, 4096, may_trim=may_trim, fast_only=True)
    assert sparse.pread(0, 4096) == b"\x01" * 4096  # untouched
    sparse.write_zeroes(0, 4096, may_trim=may_trim)
    assert sparse.pread(0, 4096) == bytes(4096)


def test_no_fallocate_at_all_writes_zeroes_in_bounded_chunks(
    sparse: Image, refuse: Callable[..., FakeFallocate], monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse(MODE_PUNCH, MODE_ZERO_RANGE, MODE_ALLOCATE, err=errno.ENOSYS)
    length = 5 * MIB + 123
    sparse.pwrite(b"\x01" * length, 7)
    writes: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    sparse.punch_hole(7, length)  # TRIM promises zeroes too
    assert max(writes) <= image_mod.ZERO_CHUNK_SIZE
    assert sum(writes) == length
    assert sparse.pread(0, length + 14) == bytes(length + 14)


def test_einval_falls_back_without_disabling_the_fast_path(
    sparse: Image, refuse: Callable[..., FakeFallocate]
) -> None:
    """A block device answers EINVAL for an unaligned range; later ranges may be fine."""
    fake = refuse(MODE_PUNCH, err=errno.EINVAL)
    sparse.pwrite(b"\x01" * 8192, 0)
    sparse.punch_hole(0, 4096)
    sparse.punch_hole(4096, 4096)
    assert fake.calls.count(MODE_PUNCH) == 2
    assert sparse.pread(0, 8192) == bytes(8192)


def test_other_fallocate_errors_propagate(
    sparse: Image, refuse: Callable[..., FakeFallocate]
) -> None:
    refuse(MODE_ZERO_RANGE, err=errno.ENOSPC)
    with pytest.raises(OSError) as info:
        sparse.write_zeroes(0, 4096, may_trim=False)
    assert info.value.errno == errno.ENOSPC


def test_on_tmpfs_if_there_is_one() -> None:
    """A real file system without ZERO_RANGE, when the host has /dev/shm."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = sparse_file(Path(d) / "disk.img", 64 * MIB)
        with Image.open(path) as image:
            image.pwrite(b"\x01" * MIB, 0)
            image.write_zeroes(0, MIB, may_trim=False, fast_only=True)
            assert image.pread(0, MIB) == bytes(MIB)
            assert allocated(image) >= MIB
            image.write_zeroes(0, MIB)
            assert allocated(image) == 0
            assert image.extents(0, image.size) == [Extent(0, 64 * MIB, True)]


# -- extents --------------------------------------------------------------------


def reference_extents(pattern: list[bool], unit: int, offset: int, length: int) -> list[Extent]:
    """What extents() must say for a file whose unit ``i`` holds data iff pattern[i]."""
    size = len(pattern) * unit
    end = min(offset + length, size)
    out: list[Extent] = []
    pos = offset
    while pos < end:
        hole = not pattern[pos // unit]
        stop = min((pos // unit + 1) * unit, end)
        if out and out[-1].hole == hole:
            prev = out.pop()
            out.append(Extent(prev.offset, stop - prev.offset, hole))
        else:
            out.append(Extent(pos, stop - pos, hole))
        pos = stop
    return out


def check_cover(extents: list[Extent], offset: int, end: int) -> None:
    pos = offset
    for i, e in enumerate(extents):
        assert e.offset == pos
        assert i == 0 or extents[i - 1].hole != e.hole, "adjacent extents not merged"
        pos = e.end
    assert pos == end


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.lists(st.booleans(), min_size=1, max_size=48),
    sub=st.tuples(st.floats(0, 1), st.floats(0, 1.2)),
)
def test_extents_match_the_written_pattern(pattern: list[bool], sub: tuple[float, float]) -> None:
    unit = 64 * KIB  # a multiple of any allocation unit we expect to meet
    with tempfile.TemporaryDirectory() as d:
        path = sparse_file(Path(d) / "disk.img", len(pattern) * unit)
        with Image.open(path) as image:
            for i, data in enumerate(pattern):
                if data:
                    image.pwrite(b"\x5a" * unit, i * unit)
            # the page cache alone must be enough, and after writeback too
            for _ in range(2):
                assert image.extents(0, image.size) == reference_extents(
                    pattern, unit, 0, image.size
                )
                offset = int(sub[0] * image.size) // 512 * 512 + int(sub[0] * 1000)
                offset = min(offset, image.size)
                length = int(sub[1] * image.size)
                found = image.extents(offset, length)
                assert found == reference_extents(pattern, unit, offset, length)
                check_cover(found, offset, min(offset + length, image.size))
                image.flush()


def test_extents_of_an_empty_sparse_file_and_edges(sparse: Image) -> None:
    assert sparse.extents(0, GIB) == [Extent(0, GIB, True)]
    assert sparse.extents(GIB - 1, 100) == [Extent(GIB - 1, 1, True)]
    assert sparse.extents(GIB, 100) == []
    assert sparse.extents(GIB + 5, 100) == []
    assert sparse.extents(123, 0) == []
    with pytest.raises(ValueError):
        sparse.extents(-1, 10)
    sparse.pwrite(b"x", GIB - 1)
    tail = sparse.extents(0, GIB)
    assert tail[-1].hole is False and tail[-1].end == GIB
    assert tail[0] == Extent(0, tail[0].length, True)


def test_extents_max_extents_covers_a_prefix(sparse: Image) -> None:
    for i in range(0, 20, 2):
        sparse.pwrite(b"d" * (64 * KIB), i * 64 * KIB)
    everything = sparse.extents(0, 20 * 64 * KIB)
    assert len(everything) == 20
    assert sparse.extents(0, 20 * 64 * KIB, max_extents=3) == everything[:3]
    assert sparse.extents(0, GIB, max_extents=1) == everything[:1]
    with pytest.raises(ValueError):
        sparse.extents(0, 1, max_extents=0)


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EOPNOTSUPP])
def test_extents_without_seek_data_is_one_data_extent(
    sparse: Image, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    real_lseek = os.lseek
    seeks: list[int] = []

    def lseek(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            seeks.append(how)
            raise OSError(err, os.strerror(err))
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    assert sparse.extents(4096, GIB) == [Extent(4096, GIB - 4096, False)]
    assert sparse.extents(0, 10) == [Extent(0, 10, False)]
    assert seeks == [os.SEEK_DATA]  # remembered


def test_extent_validation() -> None:
    assert Extent(0, 1, True).end == 1
    with pytest.raises(ValueError):
        Extent(0, 0, True)
    with pytest.raises(ValueError):
        Extent(-1, 5, False)


# -- block devices --------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device over a 16 MiB file, where the host lets us make one."""
    losetup = shutil.which("losetup")
    if losetup is None or os.geteuid() != 0:
        pytest.skip("needs root and losetup")
    backing = sparse_file(tmp_path / "backing.img", 16 * MIB)
    made = subprocess.run(
        [losetup, "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", device], check=False)


def test_block_device(loop_device: str) -> None:
    with Image.open(loop_device) as image:
        assert image.size == 16 * MIB
        image.pwrite(b"\x01" * MIB, MIB)
        assert image.pread(MIB, 4) == b"\x01" * 4
        image.write_zeroes(MIB, 64 * KIB, may_trim=False, fast_only=True)
        image.punch_hole(MIB + 64 * KIB, 64 * KIB)
        assert image.pread(MIB, 128 * KIB + 1) == bytes(128 * KIB) + b"\x01"
        # unaligned: the kernel says EINVAL, the range is zeroed anyway
        image.write_zeroes(MIB + 128 * KIB + 1, 1000)
        assert image.pread(MIB + 128 * KIB, 1002) == b"\x01" + bytes(1000) + b"\x01"
        # a block device has no hole information: all data
        assert image.extents(0, GIB) == [Extent(0, 16 * MIB, False)]
        image.flush()


# -- flushing -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_failed_flush_fails_every_later_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Linux marks the pages it could not write back clean, so the next fdatasync succeeds.

    Found by the simulator (``python -m ferry.sim``): a FLUSH acknowledged
    after a failed one promised a write the disk never got, and a power
    cut took it.
    """
    with Image.open(sparse_file(tmp_path / "disk.img", MIB)) as image:
        image.pwrite(b"acknowledged", 0)
        syncs: list[int] = []

        def failing(fd: int) -> None:
            syncs.append(fd)
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(image_mod.os, "fdatasync", failing)
        with pytest.raises(OSError) as first:
            image.flush()
        monkeypatch.undo()
        with pytest.raises(OSError) as again:
            image.flush()  # the disk would say yes; the image must not
        assert first.value.errno == again.value.errno == code
        assert "an earlier flush failed" in str(again.value)
        assert len(syncs) == 1
        image.clear_flush_failure()  # everything is about to be written anew
        image.flush()


# -- writing without waiting (RWF_NOWAIT) -----------------------------------------------


def test_write_nowait_writes_at_once_on_xfs(xfs_dir: Path) -> None:
    with Image.open(sparse_file(xfs_dir / "disk.img", MIB)) as image:
        # A write that must also change the file's timestamps needs a transaction, and
        # would wait: it is refused (0) and written the usual way, as the data plane
        # does on a thread.  The writes after it in the same clock tick are taken.
        taken = []
        for n in range(1, 65):
            data = bytes([n]) * 4 * KIB
            taken.append(image.write_nowait(data, n * 4 * KIB))
            if not taken[-1]:
                image.pwrite(data, n * 4 * KIB)
        assert taken.count(4 * KIB) > 32
        assert set(taken) <= {0, 4 * KIB}
        for n in range(1, 65):
            assert image.pread(n * 4 * KIB, 4 * KIB) == bytes([n]) * 4 * KIB


def test_write_nowait_asks_a_kernel_that_refuses_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4, tmpfs and block devices say EOPNOTSUPP: the image stops asking, the write waits."""
    calls: list[int] = []

    def refusing(fd: int, buffers: object, offset: int, flags: int = 0) -> int:
        calls.append(offset)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    with Image.open(sparse_file(tmp_path / "disk.img", MIB)) as image:
        monkeypatch.setattr(image_mod.os, "pwritev", refusing)
        assert image.write_nowait(b"x" * 512, 0) == 0
        assert image.write_nowait(b"x" * 512, 512) == 0
        assert calls == [0]
        assert image.pread(0, 1024) == bytes(1024)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_write_nowait_fails_as_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def failing(fd: int, buffers: object, offset: int, flags: int = 0) -> int:
        raise OSError(code, os.strerror(code))

    with Image.open(sparse_file(tmp_path / "disk.img", MIB)) as image:
        monkeypatch.setattr(image_mod.os, "pwritev", failing)
        with pytest.raises(OSError) as raised:
            image.write_nowait(b"x" * 512, 0)
        assert raised.value.errno == code


def test_write_nowait_checks_its_range_and_a_read_only_image(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "disk.img", MIB)
    with Image.open(path) as image, pytest.raises(ValueError):
        image.write_nowait(b"x" * 512, MIB - 256)
    with Image.open(path, read_only=True) as image, pytest.raises(OSError) as raised:
        image.write_nowait(b"x" * 512, 0)
    assert raised.value.errno == errno.EBADF
