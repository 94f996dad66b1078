"""``ferry check``: what this host can do for ferry, one capability a line (as ``criu check``).

Each probe *tries* the thing, harmlessly, rather than reading version
numbers: a throwaway socket in TCP repair mode, an nftables table made and
deleted, an OFD lock on a scratch file, holes punched and sought in a
scratch file beside ``--file`` (on its file system, which is what matters),
a lease taken and released in ``--lockspace``.  Scratch files are removed
whatever happens.

A probe is *needed* when the options ask for what it enables: ``--file``
needs its file system's probes, ``--lockspace`` its own (and, local, OFD
locks), ``--move-connections`` the connection handoff's.  The others are
reported all the same, with what their absence disables.  The exit status
is 0 exactly when every needed probe is ok.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["Probe", "file_probes", "host_probes", "lockspace_probe", "render"]

F_OFD_SETLK: Final = int(getattr(fcntl, "F_OFD_SETLK", 37))
_FLOCK: Final = struct.Struct("hhqqi")
SCRATCH: Final = 1 << 20  # bytes of the scratch file's data


@dataclass(frozen=True)
class Probe:
    """One capability: whether it is there, and if not, why and what that disables."""

    name: str
    ok: bool
    detail: str = ""
    disables: str = ""
    needed: bool = False

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.name}" + (f" ({self.detail})" if self.detail else "")
        need = " [needed]" if self.needed else ""
        return f"missing  {self.name}: {self.detail}; disables {self.disables}{need}"


def render(probes: list[Probe]) -> tuple[list[str], int]:
    """The lines to print and the exit status (1 if a needed probe failed)."""
    status = 1 if any(p.needed and not p.ok for p in probes) else 0
    return [p.line() for p in probes], status


def _probe(name: str, disables: str, needed: bool, attempt: Callable[[], str | None]) -> Probe:
    """``attempt`` answers None when the capability is there, else why not."""
    try:
        why = attempt()
    except OSError as error:
        why = error.strerror or str(error)
    return Probe(name, why is None, why or "", disables, needed)


# -- the host ------------------------------------------------------------------------------


def host_probes(*, move_connections: bool, ofd_dir: str, ofd_needed: bool) -> list[Probe]:
    """TCP_REPAIR with CAP_NET_ADMIN, nftables, and OFD locks in ``ofd_dir``."""
    from ferry.handoff import freeze
    from ferry.handoff.capability import repair_reason

    moving = "moving client connections at a handoff (they are disconnected instead)"
    return [
        _probe("TCP_REPAIR and CAP_NET_ADMIN", moving, move_connections, repair_reason),
        _probe(
            "nftables", moving, move_connections, lambda: freeze.probe(f"ferry_check_{os.getpid()}")
        ),
        _probe(
            f"OFD locks in {ofd_dir}",
            "the local lockspace (leases in lock files)",
            ofd_needed,
            lambda: _ofd_reason(ofd_dir),
        ),
    ]


def _table_name() -> str:
    """An nftables table of this check's own, made and deleted by the probe."""
    return f"ferry_check_{os.getpid()}"


def _ofd_reason(directory: str) -> str | None:
    with _scratch(directory) as fd:
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, request)
        except OSError as error:
            return f"F_OFD_SETLK failed: {error.strerror}"
    return None


# -- the image's file system ----------------------------------------------------------------


def file_probes(path: str) -> list[Probe]:
    """The image ``path`` (readable and writable) and its file system's probes."""
    directory = os.path.dirname(os.path.abspath(path))
    image = _probe(f"the image {path}", "serving it", True, lambda: _image_reason(path))
    where = f"on {directory}"
    return [
        image,
        _probe(
            f"fdatasync {where}",
            "FLUSH and FUA (writes cannot be made durable)",
            True,
            lambda: _fsync_reason(directory),
        ),
        _probe(
            f"SEEK_DATA and SEEK_HOLE {where}",
            "sparse copies: a migration sends every byte, holes too",
            True,
            lambda: _seek_reason(directory),
        ),
        _probe(
            f"hole punching {where}",
            "TRIM and WRITE_ZEROES by deallocation (zeroes are written instead)",
            True,
            lambda: _punch_reason(directory),
        ),
    ]


def _image_reason(path: str) -> str | None:
    if not os.path.exists(path):
        return "no such file"
    if not os.access(path, os.R_OK | os.W_OK):
        return "not readable and writable by this user"
    return None


@contextlib.contextmanager
def _scratch(directory: str) -> Iterator[int]:
    """A scratch file in ``directory``, removed afterwards; its descriptor."""
    fd, name = tempfile.mkstemp(prefix=".ferry-check-", dir=directory)
    try:
        os.unlink(name)  # gone whatever happens; the descriptor is enough
        yield fd
    finally:
        os.close(fd)


def _fsync_reason(directory: str) -> str | None:
    with _scratch(directory) as fd:
        os.pwrite(fd, b"\xa5" * 4096, 0)
        os.fdatasync(fd)
    return None


def _seek_reason(directory: str) -> str | None:
    with _scratch(directory) as fd:
        os.ftruncate(fd, 4 * SCRATCH)
        os.pwrite(fd, b"\xa5" * SCRATCH, 2 * SCRATCH)
        os.fsync(fd)
        try:
            data = os.lseek(fd, 0, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as error:
            return f"lseek failed: {error.strerror}"
        if data == 0:
            return "the file system reports no holes (SEEK_DATA finds data at 0)"
        if hole < data + SCRATCH:
            return "SEEK_HOLE finds a hole inside written data"
    return None


def _punch_reason(directory: str) -> str | None:
    from ferry.storage.image import punch_supported

    with _scratch(directory) as fd:
        os.pwrite(fd, b"\xa5" * SCRATCH, 0)
        return punch_supported(fd, 0, SCRATCH)


# -- the lockspace ----------------------------------------------------------------------------


def lockspace_probe(spec: str, reactor: Any, settle: Callable[..., Any]) -> Probe:
    """Take and release a lease named after this check in ``spec`` (reachable and writable)."""
    from twisted.internet.defer import Deferred

    from ferry.lease.backend import LeaseError, LeaseMode
    from ferry.lease.spec import open_lockspace

    name = f"lockspace {spec}"
    disables = "leases: serve and listen need --lockspace none without one"
    try:
        backend = open_lockspace(spec, reactor=reactor)
    except (LeaseError, ValueError) as error:
        return Probe(name, False, str(error), disables, True)

    async def attempt() -> None:
        resource = f"ferry-check:{socket.gethostname()}:{os.getpid()}"
        try:
            grant = await backend.acquire(resource, f"{resource}:check", LeaseMode.EXCLUSIVE)
            await backend.release(grant)
        finally:
            await backend.close()

    try:
        settle(reactor, lambda: Deferred.fromCoroutine(attempt()))
    except LeaseError as error:
        return Probe(name, False, str(error), disables, True)
    except OSError as error:
        return Probe(name, False, error.strerror or str(error), disables, True)
    return Probe(name, True, "a lease taken and released", disables, True)


def lockspace_dir(spec: str | None) -> str | None:
    """The directory of a ``local:`` lockspace (None: another kind, or none)."""
    if spec is None or not spec.startswith("local:"):
        return None
    return os.path.abspath(os.path.expanduser(spec.partition(":")[2]))
