"""open_trusted_path: a path walked without following anyone else's symlink.

The suite runs as root (like ferry on a storage host), so "someone else"
is made with lchown: a link or a directory of uid 65534 (nobody).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.safepath import MAX_SYMLINKS, UnsafePath, open_trusted_path

NOBODY = 65534


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    """A listening Unix socket at tmp_path/real/ctl.sock (a directory of ours, 0700)."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    path = real / "ctl.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    yield path
    server.close()


def reached(path: Path | str) -> os.stat_result:
    """What open_trusted_path finds at ``path`` (closing the descriptor)."""
    fd = open_trusted_path(path, "control socket")
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def test_a_plain_path_is_the_file_itself_and_can_be_connected_through_its_descriptor(
    listening: Path,
) -> None:
    fd = open_trusted_path(listening, "control socket")
    try:
        assert stat.S_ISSOCK(os.fstat(fd).st_mode)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(f"/proc/self/fd/{fd}")  # the way ferry.control.client connects
    finally:
        os.close(fd)
    assert reached(listening).st_ino == listening.stat().st_ino


def test_our_own_symlinks_are_followed_relative_absolute_and_in_the_middle(
    listening: Path, tmp_path: Path
) -> None:
    (tmp_path / "relative.sock").symlink_to("real/ctl.sock")
    (tmp_path / "absolute.sock").symlink_to(listening)
    (tmp_path / "dir").symlink_to(tmp_path / "real")
    (tmp_path / "chain.sock").symlink_to("relative.sock")
    inode = listening.stat().st_ino
    for name in ("relative.sock", "absolute.sock", "dir/ctl.sock", "chain.sock"):
        assert reached(tmp_path / name).st_ino == inode, name
    assert reached(tmp_path / "real" / ".." / "dir" / "./ctl.sock").st_ino == inode


def test_someone_else_s_symlink_is_never_followed(listening: Path, tmp_path: Path) -> None:
    planted = tmp_path / "planted.sock"
    planted.symlink_to(listening)  # to the very socket: still refused
    os.lchown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=r"planted.sock is a symbolic link of uid 65534"):
        open_trusted_path(planted, "control socket")
    planted_dir = tmp_path / "planted-dir"
    planted_dir.symlink_to(listening.parent)
    os.lchown(planted_dir, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=r"planted-dir is a symbolic link of uid 65534"):
        open_trusted_path(planted_dir / "ctl.sock", "control socket")
    # Ours, pointing through theirs: refused where theirs is met.
    (tmp_path / "ours.sock").symlink_to("planted.sock")
    with pytest.raises(UnsafePath, match=r"planted.sock is a symbolic link of uid 65534"):
        open_trusted_path(tmp_path / "ours.sock", "control socket")


def test_a_file_in_a_directory_others_could_replace_it_in_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "ctl.sock").touch()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match="in a directory of uid 65534"):
        open_trusted_path(theirs / "ctl.sock", "control socket")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "ctl.sock").touch()
    shared.chmod(0o777)
    with pytest.raises(UnsafePath, match=r"others may write to its directory \(mode 0777\)"):
        open_trusted_path(shared / "ctl.sock", "control socket")
    shared.chmod(0o1777)  # sticky, as /tmp: nobody may replace another's file there
    assert stat.S_ISREG(reached(shared / "ctl.sock").st_mode)


def test_a_loop_a_missing_file_and_a_file_used_as_a_directory_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(UnsafePath, match=f"more than {MAX_SYMLINKS} symbolic links"):
        open_trusted_path(tmp_path / "a", "control socket")
    with pytest.raises(FileNotFoundError):
        open_trusted_path(tmp_path / "missing.sock", "control socket")
    (tmp_path / "file").touch()
    with pytest.raises(NotADirectoryError, match="file is not a directory"):
        open_trusted_path(tmp_path / "file" / "ctl.sock", "control socket")
