"""The trace's and the log's writer thread: in order, never waited on, bounded, loud."""

from __future__ import annotations

import errno
import io
import threading
from pathlib import Path

import pytest

from ferry.appender import Appender


class StuckFile(io.StringIO):
    """A file whose writes wait until ``release`` is set, like a disk that hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(30), "the test never released the file"
        return super().write(text)

    def close(self) -> None:
        self.text = self.getvalue()
        super().close()


class FullDisk(io.StringIO):
    """A file that answers ENOSPC until ``space`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.space = False

    def write(self, text: str) -> int:
        if not self.space:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def test_lines_from_many_threads_arrive_whole_and_each_thread_s_in_order(tmp_path: Path) -> None:
    path = tmp_path / "trace"
    appender = Appender(path.open("a"), what="trace file")

    def writer(n: int) -> None:
        for i in range(500):
            appender.write(f"{n} {i}\n")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert appender.drain()
    lines = path.read_text().splitlines()
    assert len(lines) == 2000
    for n in range(4):
        assert [int(line.split()[1]) for line in lines if line.split()[0] == str(n)] == list(
            range(500)
        )
    appender.write("last\n")
    appender.close()  # writes what is queued first
    assert path.read_text().splitlines()[-1] == "last"
    with pytest.raises(ValueError, match="trace file is closed"):
        appender.write("after\n")


def test_a_file_that_hangs_costs_the_writer_nothing_and_memory_stays_bounded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stuck = StuckFile()
    appender = Appender(stuck, what="log file", limit=100)
    appender.write("first\n")
    assert stuck.entered.wait(30)  # the thread is inside the file's write, and stays there
    for i in range(50):  # the caller (the reactor) never waits, whatever the file does
        assert appender.write(f"line {i:02}\n") == 8
    # 100 characters may wait (the 6 being written and 11 lines of 8); the rest was
    # dropped, and that was said once.
    assert appender.lost == 50 - 11
    assert capsys.readouterr().err.count("lines are lost") == 1
    stuck.release.set()
    assert appender.drain()
    assert stuck.getvalue() == "first\n" + "".join(f"line {i:02}\n" for i in range(11))
    appender.close()


def test_a_full_disk_loses_lines_says_so_once_and_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    disk = FullDisk()
    appender = Appender(disk, what="log file")
    appender.write("a\n")
    appender.write("b\n")
    assert appender.drain()
    err = capsys.readouterr().err
    assert err.count("No space left on device; lines are lost") == 1, err
    assert appender.lost == 2
    disk.space = True
    appender.write("c\n")
    assert appender.drain()
    assert disk.getvalue() == "c\n"
    disk.space = False  # a new episode is said again
    appender.write("d\n")
    assert appender.drain()
    assert capsys.readouterr().err.count("lines are lost") == 1
    assert appender.lost == 3
    appender.close()


def test_close_does_not_wait_for_ever_on_a_file_that_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ferry.appender.CLOSE_WAIT", 0.2)
    stuck = StuckFile()
    appender = Appender(stuck, what="trace file")
    appender.write("x\n")
    assert stuck.entered.wait(30)
    appender.close()  # gives up after CLOSE_WAIT, leaving the thread to its file
    assert not appender.drain(0.1)
    stuck.release.set()
