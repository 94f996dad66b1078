"""The pure parts of write-blocking mirroring: the wire's ranges, what is copied, the options."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.control.commands import Reply, _parse_mirror
from ferry.migrate.core.ranges import RangeMap
from ferry.migrate.options import CopyMode, MirrorOptions

from .test_migrate_job import MIB, Rig


def test_ranges_find_every_overlap_and_only_overlaps() -> None:
    ranges: RangeMap[str] = RangeMap()
    ranges.add(100, 200, "b")
    ranges.add(0, 50, "a")
    ranges.add(300, 400, "c")
    assert ranges.values() == ["a", "b", "c"] and len(ranges) == 3
    assert not ranges.overlaps(50, 100)  # the gap, both ends exclusive as they must be
    assert not ranges.overlaps(200, 300)
    assert not ranges.overlaps(400, 1000)
    assert ranges.overlaps(49, 50) and ranges.overlaps(199, 201) and ranges.overlaps(399, 400)
    assert sorted(ranges.overlapping(0, 1000)) == ["a", "b", "c"]
    assert sorted(ranges.overlapping(150, 350)) == ["b", "c"]
    assert list(ranges.overlapping(50, 100)) == []
    with pytest.raises(ValueError, match="overlaps"):
        ranges.add(150, 160, "inside b")
    with pytest.raises(ValueError, match="overlaps"):
        ranges.add(350, 450, "across c's end")
    with pytest.raises(ValueError, match="empty"):
        ranges.add(10, 10, "empty")
    assert ranges.remove(100) == "b"
    with pytest.raises(KeyError):
        ranges.remove(100)
    assert not ranges.overlaps(100, 200)
    ranges.add(60, 290, "d")  # fits where b was, and more
    assert ranges.values() == ["a", "d", "c"]


def test_what_is_copied_is_behind_the_bulk_pass_then_everything(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    job = rig.job
    assert not job.copied(0, 4096)  # connecting: nothing is
    job.connected()  # type: ignore[attr-defined]
    job.accepted()  # type: ignore[attr-defined]
    plan = job.plan
    assert plan is not None and plan.bulk and plan.cursor == 0
    assert not job.copied(0, 4096)
    ops = plan.ops()
    first = next(ops)  # handed out: the cursor is past it
    assert job.copied(first.offset, first.end)
    assert not job.copied(first.offset, first.end + 1)  # ahead of the cursor: the pass's
    job.sent(first)
    for op in ops:
        job.sent(op)
    job.end_of_pass()
    assert job.state in ("dirty_pass", "quiescing")
    assert job.copied(0, 4 * MIB)  # after the bulk pass, everything is behind a pass


def test_write_blocking_is_an_option_flexnbd_cannot_take() -> None:
    assert MirrorOptions().copy_mode is CopyMode.BACKGROUND
    assert MirrorOptions(copy_mode=CopyMode.WRITE_BLOCKING).copy_mode.value == "write-blocking"
    with pytest.raises(ValueError, match="write-blocking needs a ferry or NBD destination"):
        MirrorOptions(copy_mode=CopyMode.WRITE_BLOCKING, flexnbd=True)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("background", CopyMode.BACKGROUND), ("write-blocking", CopyMode.WRITE_BLOCKING)],
)
def test_the_mirror_command_takes_a_copy_mode(value: str, mode: CopyMode) -> None:
    parsed = _parse_mirror(["127.0.0.1", "4000"], {"copy_mode": value})
    assert not isinstance(parsed, Reply), parsed
    assert parsed[1].copy_mode is mode


@pytest.mark.parametrize("bad", ["bogus", "Write-Blocking", "", 1, True, None, ["background"]])
def test_a_bad_copy_mode_is_refused_in_one_line(bad: object) -> None:
    reply = _parse_mirror(["127.0.0.1", "4000"], {"copy_mode": bad})
    assert isinstance(reply, Reply)
    assert reply.line() == "1: bad copy_mode: must be 'background' or 'write-blocking'\n"


def test_write_blocking_into_flexnbd_is_refused_before_anything_starts() -> None:
    reply = _parse_mirror(["127.0.0.1", "4000"], {"copy_mode": "write-blocking", "flexnbd": True})
    assert isinstance(reply, Reply)
    assert reply.line().startswith("1: copy mode write-blocking needs a ferry or NBD destination")
