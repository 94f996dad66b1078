"""Paths other users cannot redirect: private directories and files opened without symlinks.

ferry runs as root on storage hosts, next to unprivileged users.  Whatever
it creates or trusts on disk (lock files, traces, logs, control sockets)
must not be something another user can swap, read or point elsewhere:

* a **private directory** belongs to the user ferry runs as and grants
  nothing to group or others (``0700``, as ``~/.ssh`` must be).  Only then
  can nobody else delete, replace or read-lock what ferry keeps in it.
* a **private file** is opened with ``O_NOFOLLOW`` (a symlink planted at
  its path is refused, never followed), must belong to that user, and is
  left ``0600``: a file of ours with wider permissions is narrowed, one of
  someone else's is refused.
* a file or socket ferry creates (a trace, a log, a control socket) lives in
  a directory others cannot write to, unless the directory is sticky (as
  ``/tmp`` is: there nobody may remove or rename another's file), and must be
  ferry's own (:func:`check_parent_directory`).
* a path ferry is told to reach and trust (``--takeover SOCK``, which hands
  the node's every descriptor to whoever listens there) is resolved one
  component at a time (:func:`open_trusted_path`): a symlink is followed only
  if it is this user's or root's, never someone else's, and the file found
  is then reached through the descriptor, not the path, so nothing can be
  swapped in between.

Each refusal is an :class:`UnsafePath` whose text is one line saying what
is wrong and what would fix it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, Final

__all__ = [
    "PRIVATE_FILE_MODE",
    "UnsafePath",
    "check_parent_directory",
    "check_private_directory",
    "open_append",
    "open_private_file",
    "open_trusted_path",
]

PRIVATE_FILE_MODE: Final = 0o600
_OTHERS: Final = 0o077
#: The symlinks one resolution follows at most (the kernel's own limit).
MAX_SYMLINKS: Final = 40


class UnsafePath(Exception):
    """A path another user could redirect, replace or read; ``str`` says why, in one line."""


def check_private_directory(path: str | os.PathLike[str], what: str) -> None:
    """Refuse ``path`` unless it is a directory of this user's that no one else may touch.

    ``what`` names the directory's purpose in the message ("lockspace
    directory").  A missing directory raises ``FileNotFoundError``: whether
    that is an error is the caller's business.
    """
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise UnsafePath(
            f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {uid}): "
            "use a directory of your own"
        )
    if info.st_mode & _OTHERS:
        mode = stat.S_IMODE(info.st_mode)
        raise UnsafePath(
            f"{what} {path} has mode {mode:04o}: others may read or change it; "
            f"make it private (chmod 700 {path})"
        )


def check_parent_directory(path: str | os.PathLike[str], what: str) -> None:
    """Refuse ``path`` if others could replace it: its directory is writable by
    group or others without the sticky bit, or belongs to someone else who is
    not root."""
    directory = Path(path).parent
    info = os.stat(directory)
    uid = os.geteuid()
    if info.st_uid not in (uid, 0):
        raise UnsafePath(
            f"{what} {path}: its directory {directory} belongs to uid {info.st_uid}, who "
            "could replace it: use a directory of your own"
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(info.st_mode)
        raise UnsafePath(
            f"{what} {path}: others may write to its directory {directory} (mode {mode:04o}) "
            "and replace it: use a directory of your own"
        )


def open_private_file(path: str | os.PathLike[str], flags: int, what: str) -> int:
    """Open ``path`` without following a symlink; it must be this user's, and ends up 0600.

    ``flags`` are ``os.open``'s (``O_NOFOLLOW`` and ``O_CLOEXEC`` are
    added); with ``O_CREAT`` a new file is created ``0600``.  Returns the
    descriptor.  Raises :class:`UnsafePath` for a symlink or someone else's
    file, ``OSError`` for everything else.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError:
        if _is_symlink(path):
            raise UnsafePath(f"{what} {path} is a symbolic link: refusing to follow it") from None
        raise
    try:
        info = os.fstat(fd)
        uid = os.geteuid()
        if info.st_uid != uid:
            raise UnsafePath(
                f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {uid})"
            )
        if stat.S_IMODE(info.st_mode) & _OTHERS and stat.S_ISREG(info.st_mode):
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(path: str | os.PathLike[str]) -> bool:
    try:
        return Path(path).is_symlink()
    except OSError:
        return False


def open_append(path: str | os.PathLike[str], what: str) -> IO[str]:
    """A trace or a log: appended to, line-buffered, and never someone else's.

    Raises :class:`UnsafePath` for a symlink, someone else's file, or a
    directory others could swap it in; ``OSError`` for the rest.
    """
    check_parent_directory(path, what)
    fd = open_private_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def open_trusted_path(path: str | os.PathLike[str], what: str) -> int:
    """An ``O_PATH`` descriptor of the file at ``path``, found without trusting anyone else.

    The path is walked one component at a time, each opened with
    ``O_NOFOLLOW`` relative to the directory before it: a symlink is
    followed only if it belongs to this user or to root (its target is read
    from the link's own descriptor, so it cannot be swapped meanwhile), and
    the directory the file is found in must be one others cannot replace it
    in (:func:`check_parent_directory`'s rule).  The caller reaches the
    file through ``/proc/self/fd/N`` (a Unix socket can be connected to that
    way), never through ``path`` again.  Raises :class:`UnsafePath` saying
    which component is whose, ``OSError`` for the rest (a missing file).
    """
    uid = os.geteuid()
    text = os.fspath(path)
    pending = text.split("/")
    directory = os.open("/" if text.startswith("/") else ".", _DIRECTORY)
    links = 0
    walked = "/" if text.startswith("/") else ""
    try:
        while True:
            name = pending.pop(0)
            if name in ("", "."):
                if pending:
                    continue
                name = "."
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            info = os.fstat(fd)
            shown = os.path.join(walked, name)
            if stat.S_ISLNK(info.st_mode):
                try:
                    if info.st_uid not in (uid, 0):
                        raise UnsafePath(
                            f"{what} {text}: {shown} is a symbolic link of uid {info.st_uid}, "
                            "neither this user nor root: refusing to follow it"
                        )
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise UnsafePath(f"{what} {text}: more than {MAX_SYMLINKS} symbolic links")
                    target = os.readlink("", dir_fd=fd)
                finally:
                    os.close(fd)
                pending = target.split("/") + pending
                if target.startswith("/"):
                    os.close(directory)
                    directory = os.open("/", _DIRECTORY)
                    walked = "/"
                continue
            if not pending or pending == [""]:
                try:
                    _check_found_in(directory, text, what)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
            if not stat.S_ISDIR(info.st_mode):
                os.close(fd)
                raise NotADirectoryError(f"{what} {text}: {shown} is not a directory")
            os.close(directory)
            directory = fd
            walked = shown
    finally:
        os.close(directory)


_DIRECTORY: Final = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _check_found_in(directory: int, path: str, what: str) -> None:
    """The directory a trusted path's file was found in: others cannot replace it there."""
    info = os.fstat(directory)
    uid = os.geteuid()
    if info.st_uid not in (uid, 0):
        raise UnsafePath(
            f"{what} {path}: it is in a directory of uid {info.st_uid}, who could replace it"
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(info.st_mode)
        raise UnsafePath(
            f"{what} {path}: others may write to its directory (mode {mode:04o}) and replace it"
        )
