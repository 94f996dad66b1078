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

Each refusal is an :class:`UnsafePath` whose text is one line saying what
is wrong and what would fix it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

__all__ = ["PRIVATE_FILE_MODE", "UnsafePath", "check_private_directory", "open_private_file"]

PRIVATE_FILE_MODE: Final = 0o600
_OTHERS: Final = 0o077


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
