"""``local:DIR``: the embedded lockspace, fcntl OFD locks on one file per resource.

Why OFD locks
-------------
An open-file-description lock (``F_OFD_SETLK``) belongs to one ``open()``,
not to the process: two grants in one process, each with its own file
descriptor, exclude each other exactly as two processes would (classic
POSIX ``F_SETLK`` locks would merge them, and any ``close()`` of the file
anywhere in the process would drop them all).  The kernel drops them when
the last descriptor goes, so a holder that dies, even by SIGKILL, frees its
lease with no timeout at all: grants here have ``ttl=None``.  Descriptors
are opened ``O_CLOEXEC`` so a child that ``exec``\\ s never inherits a lock.
Nothing ever waits for a lock (``F_OFD_SETLKW`` is never used): a busy
byte is an answer, not a reason to block the reactor.

The file
--------
``DIR/<sha256 of the resource name>.lock``.  Locks are advisory byte
ranges, independent of the bytes stored at the same offsets:

* **byte 0, the hold lock.**  An exclusive holder keeps a write lock on it;
  shared and read-only holders keep read locks, so the kernel itself makes
  exclusive and shared exclude each other.
* **the ledger**, two copies at offsets 0 and 1024: the token counter and
  the record of the current exclusive holder (possibly dead; possibly
  offered).  It is written only under a write lock on the hold byte, each
  write going to the older copy with a larger generation number, so a
  reader without the lock (``inquire``, an offerer's ``renew``), or a file
  torn by a power cut, always finds one whole copy.  Token changes are
  ``fdatasync``\\ ed: a token that went backwards after a crash would defeat
  its purpose.
* **holder slots** from offset 2048, 512 bytes each.  Every live holder,
  whatever its mode, keeps a write lock on the first byte of its own slot
  and writes its record (grant id, owner, mode, token, offered) there.
  ``inquire`` test-locks (``F_OFD_GETLK``) each slot: a slot nobody has
  locked belongs to a dead or departed holder whatever its bytes say.  An
  exclusive record counts only if the ledger names the same grant id, which
  drops a source that has been taken over but has not noticed yet.

Records are one line, ``<crc32> <json>``, NUL-padded; a torn read fails the
checksum and is treated as no record.

Removing the files, and the tokens that must survive it
-------------------------------------------------------
A lock file nobody holds is removed by its last holder, so a lockspace
does not fill up with one file per image ever served.  The token lives in
the file, though, and a token that starts again at 1 after the file goes
would defeat fencing.  So the lockspace keeps one more file,
``DIR/tokens``: a token *mark* in the ledger's own two-copy format (no
holder), created like the lock files.  The invariant is that, for every
resource, its lock file's ledger or else the mark is at least the largest
token the resource ever had; every exclusive acquire and take-over issues
``max(ledger token, mark) + 1``, so per resource tokens still only grow.

* The last holder removes the file.  At its release it takes the hold
  byte's write lock (an exclusive holder has it; a shared one tries to
  upgrade its read lock, which fails while another reader holds one; an
  offerer tries to take it back), and only then, with no other slot locked
  and no ``offered`` holder in the ledger (a source that releases after
  sending its commit leaves the ledger to the destination's take-over),
  raises the mark to the ledger's token (``fdatasync``\\ ed before the
  file goes), clears its records, and unlinks the path, if the path still
  names its file.  Anything in the way (the mark's lock busy with another
  release, an error) leaves the file for a later holder: removal is
  tidying, never needed for correctness.
* Every locker checks, once it has the hold byte, that the path still
  names the file it opened; if the last holder removed it in between, it
  closes and opens again.  Nobody removes a file whose hold byte someone
  else has locked, so from then on the file is the resource's.
* The mark is raised only at a removal, under an OFD write lock of its own
  that nobody waits for (a release that finds it busy keeps its file), and
  is read without a lock: a new file is created after the removal that
  raised the mark, so its first acquire sees the raised mark.  The mark
  grows only, so sharing one between resources is harmless: a resource's
  tokens grow, perhaps by more than one.

The inotify watch below does not fence anyone for such a removal: a file
is removed only when no grant is left on it.

Who else may touch the files
----------------------------
Locks are advisory: anyone who can open a lock file can lock its bytes, and
anyone who can write the directory can delete or replace the file.  A
local user who read-locks the hold byte of a file in a world-readable
lockspace keeps every holder out of it, and one who deletes a file lets a
second holder in beside the first.  So the directory must be private
(the user's own, mode 0700: :func:`ferry.safepath.check_private_directory`),
checked on every operation, and lock files are created 0600 and opened
without following symlinks.  A lockspace that cannot keep others out is
refused with one line saying how to fix it, never used.

Even so, the owner (or root) can still remove or replace a file by hand.
With a reactor, :meth:`LocalLockspace.watch` sees that at once through
inotify on the directory, and the holder is fenced; without one (the unit
tests) the manager's periodic ``renew`` is the only check.  (The next
holder of a file removed by hand gets a token above the mark, which may be
below the removed file's: its fenced holder cannot use it, but downstream
checks may refuse the newcomer until the token passes the old one again.)

Migration: offer and take-over across processes
-----------------------------------------------
The destination is another process, perhaps on another host sharing the
directory, so the source must let go of the hold byte while still
excluding everyone but a take-over with its token.  ``offer`` marks the
ledger's record and its own slot ``offered`` and then unlocks the hold
byte, keeping its slot lock, which now means "the offerer is alive".

* ``acquire`` (any mode) gets the hold byte but then refuses while the
  ledger's holder is *live* (its slot locked, with the ledger's grant id).
  An offer whose offerer has died or released is stale and does not block.
* ``take_over(token)`` gets the hold byte, compares ``token`` with the
  ledger's under that lock, and on a match writes itself in with the next
  token.  The source cancels by the same call with its own token; whoever
  comes second finds the token moved and gets :class:`LeaseConflict`.
* The offerer's next ``renew`` finds another grant in the ledger:
  :class:`LeaseLost`.

``take_over`` asks only that the token still match, not that the offerer
be alive: an offer whose source has died since, or a lease the source
released after sending its commit, can still be taken by the commit's
token.  That is safe because every exclusive acquire moves the token, so
a matching token proves nobody has held the resource exclusively since
the offer, and it is what lets a commit complete when the source dies
right after sending it.

Takeover on one host: the descriptor moves
--------------------------------------------
An OFD lock belongs to an open file description, not to a descriptor or a
process, so it stays held as long as *any* descriptor of that description
is open, in any process.  ``ferry serve --takeover`` passes the grant's
descriptor itself to the new process (SCM_RIGHTS): :meth:`~LocalLockspace.pass_on`
names it, :meth:`~LocalLockspace.adopt` checks in the new process that it
is the lock file and the record it claims (and that the hold byte and slot
are locked, as seen from a descriptor of its own), and
:meth:`~LocalLockspace.let_go` closes the old process's copy *without*
tidying the records, since they are the successor's now.  The locks never
drop for an instant, nothing in the file changes (same grant id, same
token, the old owner's label), and a holder that dies in between frees
nothing while the other still has its copy.

Deferreds
---------
Every operation is a handful of small syscalls on a local (or NFS) file,
microseconds, except the ``fdatasync`` after a token change, which happens
once per acquire or take-over -- and any of them can hang for as long as
the file system does (an NFS server that went away).  With a reactor they
run on a thread of the lockspace's own, one operation at a time in the
order they were asked (so no two ever race on a lock file or on the
holds kept here), and answer on the reactor thread: a lockspace that hangs
holds up the leases, never every client of the node.  The inotify watch
is the reactor's; the checks it starts go to that thread too.  Without a
reactor (the unit tests, ``ferry lock``) they run on the calling thread
and answer with an already-fired ``Deferred``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import os
import secrets
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

from twisted.internet import defer
from twisted.internet import inotify as _inotify
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    LockspaceUnavailable,
    PassedGrant,
    in_holder_order,
)
from ferry.safepath import UnsafePath, check_private_directory, open_private_file
from ferry.workers import WorkerPool

__all__ = ["MAX_HOLDERS", "MAX_OWNER_BYTES", "LocalLockspace", "lock_file_name"]

_log = Logger()
_T = TypeVar("_T")

# Linux's values (Python's fcntl exports them on Linux since 3.9, but look
# first).  The struct below is LP64 Linux's (x86_64, aarch64, ...).
F_OFD_GETLK: Final = int(getattr(fcntl, "F_OFD_GETLK", 36))
F_OFD_SETLK: Final = int(getattr(fcntl, "F_OFD_SETLK", 37))

# struct flock on LP64 Linux: l_type, l_whence, l_start, l_len, l_pid, padding.
# OFD requests must carry l_pid 0.
_FLOCK: Final = struct.Struct("hhqqi4x")

HOLD_BYTE: Final = 0
LEDGER_COPY_SIZE: Final = 1024
LEDGER_COPIES: Final = 2
SLOT_BASE: Final = LEDGER_COPY_SIZE * LEDGER_COPIES
SLOT_SIZE: Final = 512
MAX_HOLDERS: Final = 256
"""Holder slots per resource: a bound on what one inquire scans."""
MAX_OWNER_BYTES: Final = 256
"""An owner is a label for people (``host:pid:label``); it must fit a slot record."""

# A hold byte that is busy while no live holder is visible belongs to a
# process in the middle of its own check (microseconds); try again this
# many times, yielding the CPU between tries, before calling it a conflict.
_BUSY_RETRIES: Final = 50
# A lock-free reader retries a ledger it caught mid-write this many times.
_READ_RETRIES: Final = 5
# A locker whose file was removed (by its last holder) between its open and
# its lock opens it again, this many times at most.
_REOPEN_RETRIES: Final = 20
TOKENS_FILE: Final = "tokens"
"""The lockspace's token mark, in its directory beside the lock files."""
# Twisted's inotify module has no annotations: use it as Any.
inotify: Any = _inotify
# What in the directory may mean a lock file was removed or replaced.
_WATCHED: Final = (
    inotify.IN_DELETE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
    | inotify.IN_CREATE
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
)

# Grant handles are unique in the process, not per LocalLockspace object, so
# a grant handed to the wrong object can never be mistaken for one of its own.
_handles = itertools.count(1)


def lock_file_name(resource: str) -> str:
    """The file in the lockspace directory that stands for ``resource``.

    Hashing makes any resource name (a path with slashes, a long one) a
    safe, fixed-length file name, and the same one on every host.
    """
    return hashlib.sha256(resource.encode("utf-8")).hexdigest() + ".lock"


# -- records on disk ------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One holder, as its slot (and, if exclusive, the ledger) records it."""

    grant_id: str
    slot: int
    owner: str
    mode: LeaseMode
    token: int
    offered: bool = False

    def holder(self) -> Holder:
        return Holder(self.owner, self.mode, self.token, self.offered)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.grant_id,
            "slot": self.slot,
            "owner": self.owner,
            "mode": self.mode.value,
            "token": self.token,
            "offered": self.offered,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> _Record:
        return cls(
            grant_id=str(obj["id"]),
            slot=int(obj["slot"]),
            owner=str(obj["owner"]),
            mode=LeaseMode(obj["mode"]),
            token=int(obj["token"]),
            offered=bool(obj["offered"]),
        )


@dataclass(frozen=True)
class _Ledger:
    """The resource's token counter and its exclusive holder of record."""

    generation: int = 0
    token: int = 0
    holder: _Record | None = None

    def successor(self, **changes: Any) -> _Ledger:
        """The next version to write: same fields but ``changes``, one generation on."""
        return replace(self, generation=self.generation + 1, **changes)

    def to_dict(self) -> dict[str, Any]:
        holder = None if self.holder is None else self.holder.to_dict()
        return {"generation": self.generation, "token": self.token, "holder": holder}

    @classmethod
    def from_dict(cls, obj: Any) -> _Ledger:
        holder = obj["holder"]
        return cls(
            generation=int(obj["generation"]),
            token=int(obj["token"]),
            holder=None if holder is None else _Record.from_dict(holder),
        )


class _Torn(Exception):
    """A region that is neither blank nor a whole record (a torn read or a torn write)."""


def _encode(obj: dict[str, Any], size: int) -> bytes:
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    line = b"%08x %s\n" % (zlib.crc32(payload), payload)
    if len(line) > size:
        raise ValueError(f"record of {len(line)} bytes does not fit in {size}")
    return line.ljust(size, b"\0")


def _decode(raw: bytes) -> Any | None:
    """The object stored in ``raw``; None for a blank region; :class:`_Torn` otherwise."""
    if not raw.strip(b"\0"):
        return None
    line, newline, _ = raw.partition(b"\n")
    checksum, _, payload = line.partition(b" ")
    try:
        if not newline or int(checksum, 16) != zlib.crc32(payload):
            raise _Torn()
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise _Torn() from None


def _slot_offset(slot: int) -> int:
    return SLOT_BASE + slot * SLOT_SIZE


# -- byte-range locks --------------------------------------------------------------


def _try_lock(fd: int, kind: int, offset: int) -> bool:
    """Take (or, with ``F_UNLCK``, drop) a lock on one byte; False if someone else has it."""
    request = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, request)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock(fd: int, offset: int) -> None:
    _try_lock(fd, fcntl.F_UNLCK, offset)


def _locked_by_another(fd: int, offset: int) -> bool:
    """Whether any other open file description has a lock on the byte at ``offset``."""
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    answer = fcntl.fcntl(fd, F_OFD_GETLK, request)
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)


# -- one grant's open file -----------------------------------------------------------


@dataclass
class _Hold:
    """What this process keeps for one grant: its own descriptor, hence its own locks."""

    resource: str
    path: Path
    fd: int
    identity: tuple[int, int]  # (st_dev, st_ino) of the file the locks are on
    record: _Record
    holds_byte: bool  # False once an offer has let go of the hold byte


class _LockFile:
    """Reads and writes of one open lock file; every method is a few syscalls."""

    def __init__(self, fd: int, path: Path, what: str = "lock file") -> None:
        self.fd = fd
        self.path = path
        self.what = what  # names the file in errors: the token mark is kept as a ledger too

    def read_ledger(self) -> _Ledger:
        """The newest whole ledger copy.  A reader without the hold byte retries a torn one."""
        for _ in range(_READ_RETRIES):
            raw = os.pread(self.fd, SLOT_BASE, 0)
            copies = [raw[i : i + LEDGER_COPY_SIZE] for i in range(0, SLOT_BASE, LEDGER_COPY_SIZE)]
            ledgers: list[_Ledger] = []
            torn = False
            for copy in copies:
                try:
                    obj = _decode(copy)
                except _Torn:
                    torn = True
                    continue
                if obj is not None:
                    ledgers.append(self._parse_ledger(obj))
            if ledgers:
                return max(ledgers, key=lambda ledger: ledger.generation)
            if not torn:
                return _Ledger()
            os.sched_yield()  # let the writer finish
        raise LockspaceUnavailable(f"{self.what} {self.path} has no readable ledger")

    def _parse_ledger(self, obj: Any) -> _Ledger:
        try:
            return _Ledger.from_dict(obj)
        except (KeyError, TypeError, ValueError):
            raise LockspaceUnavailable(
                f"{self.what} {self.path} has a ledger ferry cannot read"
            ) from None

    def write_ledger(self, ledger: _Ledger, *, durable: bool) -> None:
        """Write ``ledger`` over the older copy; only a holder of the hold byte's write lock may."""
        copy = ledger.generation % LEDGER_COPIES
        os.pwrite(self.fd, _encode(ledger.to_dict(), LEDGER_COPY_SIZE), copy * LEDGER_COPY_SIZE)
        if durable:
            os.fdatasync(self.fd)

    def read_slot(self, slot: int) -> _Record | None:
        """The record in ``slot``; None if it is blank, torn or not a record."""
        raw = os.pread(self.fd, SLOT_SIZE, _slot_offset(slot))
        try:
            obj = _decode(raw)
            return None if obj is None else _Record.from_dict(obj)
        except (_Torn, KeyError, TypeError, ValueError):
            return None

    def write_slot(self, record: _Record) -> None:
        os.pwrite(self.fd, _encode(record.to_dict(), SLOT_SIZE), _slot_offset(record.slot))

    def clear_slot(self, slot: int) -> None:
        os.pwrite(self.fd, b"\0" * SLOT_SIZE, _slot_offset(slot))

    def take_slot(self) -> int:
        """Lock the first free holder slot; the kernel decides races between takers."""
        for slot in range(MAX_HOLDERS):
            if _try_lock(self.fd, fcntl.F_WRLCK, _slot_offset(slot)):
                return slot
        raise LockspaceUnavailable(f"lock file {self.path}: all {MAX_HOLDERS} holder slots in use")

    def slot_count(self) -> int:
        """How many slots may hold a record: every holder writes its own, growing the file."""
        size = os.fstat(self.fd).st_size
        return min(MAX_HOLDERS, max(0, -(-(size - SLOT_BASE) // SLOT_SIZE)))

    def is_live(self, record: _Record) -> bool:
        """Whether ``record``'s holder still keeps its slot (and it is still its slot)."""
        if not _locked_by_another(self.fd, _slot_offset(record.slot)):
            return False
        current = self.read_slot(record.slot)
        return current is not None and current.grant_id == record.grant_id

    def others_keep_slots(self) -> bool:
        """Whether anyone else keeps a holder slot locked: a holder, an offerer, a stale source.

        Every slot is asked, not only those the file has grown to: a slot is
        locked before its record is written.
        """
        return any(_locked_by_another(self.fd, _slot_offset(slot)) for slot in range(MAX_HOLDERS))

    def is_at_path(self) -> bool:
        """Whether the path still names this open file (not removed, not replaced)."""
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        mine = os.fstat(self.fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def live_holders(self) -> tuple[Holder, ...]:
        """Who holds the resource: live slots, exclusive ones only if the ledger names them."""
        ledger = self.read_ledger()
        named = None if ledger.holder is None else ledger.holder.grant_id
        exclusive: list[Holder] = []
        shared: list[Holder] = []
        for slot in range(self.slot_count()):
            if not _locked_by_another(self.fd, _slot_offset(slot)):
                continue
            record = self.read_slot(slot)
            if record is None:
                continue
            if record.mode is not LeaseMode.EXCLUSIVE:
                shared.append(record.holder())
            elif record.grant_id == named:
                exclusive.append(record.holder())
        return in_holder_order([*exclusive, *shared])


# -- the backend ---------------------------------------------------------------------


class LocalLockspace:
    """A :class:`~ferry.lease.backend.LeaseBackend` in a directory: ``local:DIR``.

    The directory must exist (see :func:`ferry.lease.spec.default_lockspace`
    for the default one, which is created).  All hosts that share it must
    see the same files and honour each other's POSIX locks (a local file
    system, or NFS with working locking).
    """

    def __init__(self, directory: str | os.PathLike[str], *, reactor: Any = None) -> None:
        if not sys.platform.startswith("linux"):
            # Elsewhere the fcntl numbers above mean something else, or nothing.
            raise LockspaceUnavailable(
                f"local:{directory} needs Linux's open file description locks"
            )
        self.directory = Path(directory)
        self._holds: dict[int, _Hold] = {}
        self._reactor = reactor  # for the inotify watch; None: renewals are the only check
        # Where the operations run: a thread of their own, one at a time (see
        # "Deferreds" above); None without a reactor: the calling thread.
        self._thread = (
            None if reactor is None else WorkerPool(reactor, 1, name="ferry-lockspace")
        )
        self._notifier: Any = None  # twisted.internet.inotify.INotify, once watching
        self._watchers: dict[int, Callable[[], None]] = {}  # grant handle -> its check

    @property
    def spec(self) -> str:
        return f"local:{self.directory}"

    def path_for(self, resource: str) -> Path:
        """The lock file of ``resource`` (for operators and tests)."""
        return self.directory / lock_file_name(resource)

    # -- the LeaseBackend interface --------------------------------------------

    def acquire(self, resource: str, owner: str, mode: LeaseMode) -> Deferred[Grant]:
        return self._answer(self._acquire, resource, owner, mode)

    def renew(self, grant: Grant) -> Deferred[None]:
        return self._answer(self._renew, grant)

    def release(self, grant: Grant) -> Deferred[None]:
        return self._answer(self._release, grant)

    def inquire(self, resource: str) -> Deferred[tuple[Holder, ...]]:
        return self._answer(self._inquire, resource)

    def offer(self, grant: Grant) -> Deferred[Grant]:
        return self._answer(self._offer, grant)

    def take_over(self, resource: str, owner: str, token: int) -> Deferred[Grant]:
        return self._answer(self._take_over, resource, owner, token)

    def publish(self, grant: Grant, address: str) -> Deferred[None]:
        """Nothing is recorded: a local lockspace is one host's, and so are its servers."""
        return succeed(None)

    def where(self, resource: str) -> Deferred[list[str]]:
        return succeed([])

    def inquire_all(self) -> Deferred[dict[str, tuple[Holder, ...]]]:
        """Every lock file that has a live holder, with its holders (``ferry lock status``).

        A lock file is named by a hash of its resource and its records keep
        no resource name, so the keys are lock file paths: to ask about a
        resource by name, use :meth:`inquire`.
        """
        return self._answer(self._inquire_all)

    def watch(self, grant: Grant, on_lost: Callable[[str], None]) -> Callable[[], None]:
        """Call ``on_lost`` as soon as the grant's lock file is removed or replaced.

        A lock is not told when its file goes, so the directory is watched
        (inotify) and every change there re-checks the watched grants.
        Without a reactor nothing is watched and the manager's periodic
        ``renew`` finds the loss.
        """
        if self._reactor is None:
            return _no_op
        handle = grant.handle

        def check() -> None:
            hold = self._holds.get(handle)
            if hold is None:
                return
            self._answer(self._check, hold).addErrback(judge)

        def judge(failure: Failure) -> None:
            if isinstance(failure.value, LeaseLost):
                if self._watchers.pop(handle, None) is not None:
                    on_lost(failure.getErrorMessage())
            elif not isinstance(failure.value, LeaseError):  # cannot tell now; renewals ask
                _log.failure("checking {path}", failure, path=str(self.directory))

        self._watchers[handle] = check
        try:
            self._watch_directory()
        except OSError as err:
            _log.warn(
                "cannot watch {directory} ({err}): lost lock files are noticed at the "
                "next check only",
                directory=str(self.directory),
                err=err,
            )

        def unwatch() -> None:
            self._watchers.pop(handle, None)

        return unwatch

    def close(self) -> Deferred[None]:
        self._watchers.clear()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        closed = self._answer(self._close)
        if self._thread is not None:
            closed.addBoth(self._stop_thread)
        return closed

    def _stop_thread(self, result: object) -> object:
        if self._thread is not None:
            self._thread.stop()
        return result

    def _answer(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run an operation where operations run (see "Deferreds" in the module doc)."""
        if self._thread is None:
            return defer.maybeDeferred(fn, *args)
        return self._thread(partial(fn, *args))

    # -- a takeover on this host (PassingBackend) --------------------------------

    def pass_on(self, grant: Grant) -> PassedGrant:
        """The grant's descriptor and record, for a successor process; nothing changes."""
        hold = self._hold_of(grant)
        detail = {
            "grant_id": hold.record.grant_id,
            "slot": hold.record.slot,
            "holds_byte": hold.holds_byte,
        }
        return PassedGrant(grant, detail, hold.fd)

    def let_go(self, grant: Grant) -> None:
        """Close this process's copy of the descriptor, records untouched: the successor's now."""
        self._watchers.pop(grant.handle, None)
        hold = self._holds.pop(grant.handle, None)
        if hold is not None:
            os.close(hold.fd)

    def adopt(self, passed: PassedGrant) -> Grant:
        """Keep the grant whose descriptor a predecessor passed on; see the module doc."""
        grant, fd = passed.grant, passed.fd
        if fd is None:
            raise LeaseError(f"lease on {grant.resource}: no lock file descriptor came with it")
        try:
            grant_id = str(passed.detail["grant_id"])
            slot = int(passed.detail["slot"])
            holds_byte = bool(passed.detail["holds_byte"])
        except (KeyError, TypeError, ValueError):
            raise LeaseError(
                f"lease on {grant.resource}: the grant's record is incomplete"
            ) from None
        self._check_directory()
        path = self.path_for(grant.resource)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise LeaseLost(f"lock file {path} was removed") from None
        except OSError as err:
            raise self._unavailable(path, err) from None
        mine = _guarded(path, os.fstat, fd)
        if (stat.st_dev, stat.st_ino) != (mine.st_dev, mine.st_ino):
            raise LeaseLost(f"the descriptor passed on is not the lock file {path}")
        lock = _LockFile(fd, path)
        record = _guarded(path, lock.read_slot, slot)
        if record is None or record.grant_id != grant_id:
            raise LeaseLost(f"lease on {grant.resource}: its holder record was overwritten")
        if record.holder() != grant.holder:
            raise LeaseLost(
                f"lease on {grant.resource}: the record names {record.holder().describe()}, "
                f"not {grant.holder.describe()}"
            )
        self._check_still_locked(fd, path, record, holds_byte)
        handle = next(_handles)
        self._holds[handle] = _Hold(
            resource=grant.resource,
            path=path,
            fd=fd,
            identity=(stat.st_dev, stat.st_ino),
            record=record,
            holds_byte=holds_byte,
        )
        hold = self._holds[handle]
        try:
            self._check(hold)
        except BaseException:
            del self._holds[handle]
            raise
        return Grant(grant.resource, record.holder(), ttl=None, handle=handle)

    def _check_still_locked(self, fd: int, path: Path, record: _Record, holds_byte: bool) -> None:
        """The passed descriptor's open file holds the grant's locks, not some other one.

        Seen from a descriptor of our own, the slot (and the hold byte) must
        be locked by someone; and locking the slot again through the passed
        descriptor must succeed, which it does only if that someone is the
        passed descriptor's open file (any other holder's lock would refuse it).
        """
        try:
            probe = open_private_file(path, os.O_RDONLY, "lock file")
        except UnsafePath as unsafe:
            raise LockspaceUnavailable(str(unsafe)) from None
        except OSError as err:
            raise self._unavailable(path, err) from None
        slot = _slot_offset(record.slot)
        try:
            if not _guarded(path, _locked_by_another, probe, slot):
                raise LeaseLost(f"lock file {path}: the grant's slot is not locked any more")
            if holds_byte and not _guarded(path, _locked_by_another, probe, HOLD_BYTE):
                raise LeaseLost(f"lock file {path}: the grant's hold byte is not locked any more")
        finally:
            os.close(probe)
        if not _guarded(path, _try_lock, fd, fcntl.F_WRLCK, slot):
            raise LeaseLost(f"lock file {path}: the descriptor passed on does not hold the grant")

    # -- the operations, synchronously -------------------------------------------

    def _acquire(self, resource: str, owner: str, mode: LeaseMode) -> Grant:
        _check_owner(owner)
        exclusive = mode is LeaseMode.EXCLUSIVE
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        with self._held(resource, kind) as lock:
            ledger = lock.read_ledger()
            if ledger.holder is not None and lock.is_live(ledger.holder):
                raise _held_by(resource, ledger.holder)
            token = self._next_token(ledger) if exclusive else ledger.token
            record = self._write_holder(lock, ledger, owner, mode, token)
            return self._keep(resource, lock, record)

    def _take_over(self, resource: str, owner: str, token: int) -> Grant:
        _check_owner(owner)
        with self._held(resource, fcntl.F_WRLCK) as lock:
            ledger = lock.read_ledger()
            if ledger.token != token:
                holders = lock.live_holders()
                # One that found no file (another lockspace, say) leaves none behind.
                if self._may_remove(resource, lock, has_write_lock=True):
                    self._tidy(resource, lock, _remove, lock)
                raise LeaseConflict(
                    resource,
                    holders,
                    f"lease on {resource} has token {ledger.token}, not {token}: "
                    "it was taken back or taken first",
                )
            new_token = self._next_token(ledger)
            record = self._write_holder(lock, ledger, owner, LeaseMode.EXCLUSIVE, new_token)
            return self._keep(resource, lock, record)

    def _renew(self, grant: Grant) -> None:
        self._check(self._hold_of(grant))

    def _offer(self, grant: Grant) -> Grant:
        hold = self._hold_of(grant)
        if hold.record.mode is not LeaseMode.EXCLUSIVE:
            raise LeaseError(
                f"lease on {hold.resource} is {hold.record.mode.value}: only an "
                "exclusive lease can be offered"
            )
        self._check(hold)
        if hold.holds_byte:
            lock = _LockFile(hold.fd, hold.path)
            offered = replace(hold.record, offered=True)
            _guarded(hold.path, lock.write_slot, offered)
            ledger = _guarded(hold.path, lock.read_ledger)
            _guarded(hold.path, lock.write_ledger, ledger.successor(holder=offered), durable=False)
            _unlock(hold.fd, HOLD_BYTE)
            hold.record, hold.holds_byte = offered, False
        return replace(grant, holder=hold.record.holder())

    def _release(self, grant: Grant) -> None:
        hold = self._holds.pop(grant.handle, None)
        if hold is not None:
            self._drop(hold)

    def _drop(self, hold: _Hold) -> None:
        """Tidy up (the records, and the file if this was its last holder), then close.

        The tidying is best effort; the close is the release.
        """
        lock = _LockFile(hold.fd, hold.path)
        has_write_lock = hold.holds_byte and hold.record.mode is LeaseMode.EXCLUSIVE
        try:
            # Decided first, while this grant's record still shows: a locker that
            # comes meanwhile is told who has the lease, not "nobody".
            last = self._may_remove(hold.resource, lock, has_write_lock=has_write_lock)
            self._tidy(hold.resource, lock, _clear_records, lock, hold.record, has_write_lock)
            if last:
                self._tidy(hold.resource, lock, _remove, lock)
        finally:
            os.close(hold.fd)

    def _may_remove(self, resource: str, lock: _LockFile, *, has_write_lock: bool) -> bool:
        """Whether the file may go once this caller is done with it; if so, the mark covers it.

        It takes the hold byte's write lock first (a shared holder upgrades
        its read lock; that fails while another reader holds one).  Not while
        anyone else keeps a slot (a holder, an offerer, a source taken over
        that has not released yet), and never while the ledger names an
        offered holder: the destination's take-over needs this ledger and its
        token, even after the source has released.  Trouble is logged and
        keeps the file.
        """
        try:
            if not has_write_lock and not _try_lock(lock.fd, fcntl.F_WRLCK, HOLD_BYTE):
                return False
            ledger = lock.read_ledger()
            if ledger.holder is not None and ledger.holder.offered:
                return False
            if lock.others_keep_slots():
                return False
            return ledger.token == 0 or self._raise_mark(ledger.token)
        except (OSError, LeaseError) as err:
            _log_untidy(resource, lock.path, err)
            return False

    def _tidy(
        self, resource: str, lock: _LockFile, tidy: Callable[..., object], *args: Any
    ) -> None:
        """Run ``tidy(*args)``; trouble is logged, never raised: nothing depends on it."""
        try:
            tidy(*args)
        except (OSError, LeaseError) as err:
            _log_untidy(resource, lock.path, err)

    def _inquire(self, resource: str) -> tuple[Holder, ...]:
        return self._holders_in(self.path_for(resource))

    def _inquire_all(self) -> dict[str, tuple[Holder, ...]]:
        self._check_directory()
        held = {str(path): self._holders_in(path) for path in sorted(self.directory.glob("*.lock"))}
        return {path: holders for path, holders in held.items() if holders}

    def _holders_in(self, path: Path) -> tuple[Holder, ...]:
        """The live holders recorded in the lock file at ``path``; none if it does not exist."""
        self._check_directory()
        try:
            fd = self._open(path, os.O_RDONLY, "lock file")
        except FileNotFoundError:
            return ()
        try:
            return _guarded(path, _LockFile(fd, path).live_holders)
        finally:
            os.close(fd)

    def _close(self) -> None:
        holds, self._holds = list(self._holds.values()), {}
        for hold in holds:
            self._drop(hold)

    def _watch_directory(self) -> None:
        if self._notifier is not None:
            return
        notifier = inotify.INotify(self._reactor)
        try:
            notifier.watch(FilePath(str(self.directory)), _WATCHED, callbacks=[self._changed])
        except BaseException:
            notifier.loseConnection()
            raise
        notifier.startReading()
        self._notifier = notifier

    def _changed(self, _: object, path: FilePath[str], mask: int) -> None:
        for check in list(self._watchers.values()):
            check()

    # -- helpers -----------------------------------------------------------------------

    def _check_directory(self) -> None:
        """Refuse a directory that others could write or read: it cannot keep holders safe."""
        try:
            check_private_directory(self.directory, "lockspace directory")
        except UnsafePath as unsafe:
            raise LockspaceUnavailable(str(unsafe)) from None
        except OSError as err:
            raise self._unavailable(self.directory, err) from None

    def _held(self, resource: str, kind: int) -> _Opening:
        """The resource's lock file, its hold byte locked (``kind``), and still at its path.

        A last holder removes the file at its release (see the module doc),
        so the file opened may be gone by the time its hold byte is had; then
        the lock is on a file nobody else will ever look at, and it is opened
        again.  Once the hold byte is had, nobody else removes the file.
        """
        path = self.path_for(resource)
        for _ in range(_REOPEN_RETRIES):
            opening = self._opened(resource)
            lock = opening.lock
            try:
                self._take_hold_byte(lock, resource, kind)
                current = _guarded(path, lock.is_at_path)
            except BaseException:
                os.close(lock.fd)
                raise
            if current:
                return opening
            os.close(lock.fd)
        raise LockspaceUnavailable(
            f"lock file {path} was removed or replaced {_REOPEN_RETRIES} times while it was "
            f"being locked: is something else removing files in {self.directory}?"
        )

    def _opened(self, resource: str) -> _Opening:
        self._check_directory()
        path = self.path_for(resource)
        fd = self._open(path, os.O_RDWR | os.O_CREAT, "lock file", missing_is_unavailable=True)
        return _Opening(fd, path)

    def _open(
        self, path: Path, flags: int, what: str, *, missing_is_unavailable: bool = False
    ) -> int:
        """A private file of the lockspace, opened; trouble is :class:`LockspaceUnavailable`.

        A missing file (``FileNotFoundError``) is the caller's business
        unless ``missing_is_unavailable`` (with ``O_CREAT``, only a missing
        directory makes it so).
        """
        try:
            return open_private_file(path, flags, what)
        except UnsafePath as unsafe:
            raise LockspaceUnavailable(str(unsafe)) from None
        except FileNotFoundError as err:
            if missing_is_unavailable:
                raise self._unavailable(path, err, what) from None
            raise
        except OSError as err:
            raise self._unavailable(path, err, what) from None

    def _unavailable(
        self, path: Path, err: OSError, what: str = "lock file"
    ) -> LockspaceUnavailable:
        if isinstance(err, FileNotFoundError | NotADirectoryError):
            return LockspaceUnavailable(
                f"lockspace directory {self.directory} does not exist (or is not a directory)"
            )
        return LockspaceUnavailable(f"cannot use {what} {path}: {err.strerror or err}")

    # -- the token mark ------------------------------------------------------------------

    def _next_token(self, ledger: _Ledger) -> int:
        """The token of a new exclusive holder: above the ledger's, and above the mark."""
        return max(ledger.token, self._mark()) + 1

    def _mark(self) -> int:
        """The lockspace's token mark: 0 until a lock file with a token has been removed.

        Read without a lock: the copy being written is the older one, and
        whatever a removal raised it to was durable before the file went.
        """
        path = self.directory / TOKENS_FILE
        try:
            fd = self._open(path, os.O_RDONLY, "token file")
        except FileNotFoundError:
            return 0
        try:
            return _guarded(path, _LockFile(fd, path, "token file").read_ledger).token
        finally:
            os.close(fd)

    def _raise_mark(self, token: int) -> bool:
        """Make the mark at least ``token``, durably; False if another removal is raising it now.

        Its own write lock makes the read-and-raise of two removals one
        after the other; it is never waited for: a removal that finds it
        busy keeps its file for a later holder to remove.
        """
        self._check_directory()  # it may be created: only in a directory others cannot touch
        path = self.directory / TOKENS_FILE
        fd = self._open(path, os.O_RDWR | os.O_CREAT, "token file", missing_is_unavailable=True)
        try:
            if not _guarded(path, _try_lock, fd, fcntl.F_WRLCK, HOLD_BYTE):
                return False
            marks = _LockFile(fd, path, "token file")
            mark = marks.read_ledger()
            if mark.token < token:
                created = os.fstat(fd).st_size == 0
                _guarded(path, marks.write_ledger, mark.successor(token=token), durable=True)
                if created:  # the file's name must be as durable as its mark
                    _guarded(self.directory, _sync_directory, self.directory)
            return True
        finally:
            os.close(fd)

    def _take_hold_byte(self, lock: _LockFile, resource: str, kind: int) -> None:
        """Lock the hold byte or raise :class:`LeaseConflict` naming who has it.

        A busy byte with no live holder in sight that could be keeping it
        (an offerer has let go of it) belongs to another process in the
        middle of its own check; that is retried a few times.
        """
        holders: tuple[Holder, ...] = ()
        for _ in range(_BUSY_RETRIES):
            if _guarded(lock.path, _try_lock, lock.fd, kind, HOLD_BYTE):
                return
            holders = _guarded(lock.path, lock.live_holders)
            # An offered holder has let go of the byte: it is not who is in the way.
            if any(not holder.offered for holder in holders):
                break
            os.sched_yield()
        raise LeaseConflict(resource, holders)

    def _write_holder(
        self, lock: _LockFile, ledger: _Ledger, owner: str, mode: LeaseMode, token: int
    ) -> _Record:
        """Claim a slot and write ``owner`` into it (and, if exclusive, into the ledger)."""
        slot = _guarded(lock.path, lock.take_slot)
        record = _Record(secrets.token_hex(8), slot, owner, mode, token)
        _guarded(lock.path, lock.write_slot, record)
        if mode is LeaseMode.EXCLUSIVE:
            successor = ledger.successor(token=token, holder=record)
            _guarded(lock.path, lock.write_ledger, successor, durable=True)
        return record

    def _keep(self, resource: str, lock: _LockFile, record: _Record) -> Grant:
        stat = _guarded(lock.path, os.fstat, lock.fd)
        handle = next(_handles)
        self._holds[handle] = _Hold(
            resource=resource,
            path=lock.path,
            fd=lock.fd,
            identity=(stat.st_dev, stat.st_ino),
            record=record,
            holds_byte=True,
        )
        return Grant(resource, record.holder(), ttl=None, handle=handle)

    def _hold_of(self, grant: Grant) -> _Hold:
        hold = self._holds.get(grant.handle)
        if hold is None or (hold.resource, hold.record.owner, hold.record.token) != (
            grant.resource,
            grant.holder.owner,
            grant.token,
        ):
            raise LeaseLost(f"lease on {grant.resource} was released (or is not this lockspace's)")
        return hold

    def _check(self, hold: _Hold) -> None:
        """Raise :class:`LeaseLost` unless the lock file still names this grant."""
        try:
            stat = os.stat(hold.path)
        except (FileNotFoundError, NotADirectoryError):
            raise LeaseLost(f"lock file {hold.path} was removed") from None
        except OSError as err:
            raise LockspaceUnavailable(f"cannot check {hold.path}: {err.strerror}") from None
        if (stat.st_dev, stat.st_ino) != hold.identity:
            raise LeaseLost(f"lock file {hold.path} was replaced by another file")
        lock = _LockFile(hold.fd, hold.path)
        mine = hold.record.grant_id
        if hold.record.mode is LeaseMode.EXCLUSIVE:
            ledger = _guarded(hold.path, lock.read_ledger)
            if ledger.holder is None or ledger.holder.grant_id != mine:
                raise LeaseLost(_lost_to(hold.resource, ledger.holder))
        else:
            record = _guarded(hold.path, lock.read_slot, hold.record.slot)
            if record is None or record.grant_id != mine:
                raise LeaseLost(f"lease on {hold.resource}: its holder record was overwritten")


class _Opening:
    """A freshly opened lock file that is closed again unless the operation keeps it.

    ``with self._opened(resource) as lock``: an exception closes the
    descriptor, which drops whatever it had locked; a normal exit leaves it
    open for the grant that now owns it.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self.lock = _LockFile(fd, path)

    def __enter__(self) -> _LockFile:
        return self.lock

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            os.close(self.lock.fd)


def _clear_records(lock: _LockFile, record: _Record, exclusive_holder: bool) -> None:
    """Blank a departing grant's slot and, if the ledger names it as holder, the ledger's record."""
    if exclusive_holder:
        ledger = lock.read_ledger()
        if ledger.holder is not None and ledger.holder.grant_id == record.grant_id:
            lock.write_ledger(ledger.successor(holder=None), durable=False)
    lock.clear_slot(record.slot)


def _log_untidy(resource: str, path: Path, err: Exception) -> None:
    # Tidying only: whatever it left, closing the descriptor is what releases.
    _log.info(
        "lease on {resource}: could not tidy {path}: {err}", resource=resource, path=path, err=err
    )


def _remove(lock: _LockFile) -> None:
    """Unlink the lock file's path if it still names this file.

    Only a holder of the hold byte's write lock calls this, and ferry
    itself only ever creates lock files, never renames one over another, so
    the path cannot change between the check and the unlink.
    """
    if lock.is_at_path():
        os.unlink(lock.path)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _held_by(resource: str, holder: _Record) -> LeaseConflict:
    """The refusal while the ledger's exclusive holder is alive without the hold byte."""
    reason = ""
    if holder.offered:
        reason = (
            f"lease on {resource} is being handed over by {holder.owner} (token "
            f"{holder.token}); only a take-over with that token can move it"
        )
    return LeaseConflict(resource, (holder.holder(),), reason)


def _lost_to(resource: str, holder: _Record | None) -> str:
    if holder is None:
        return f"lease on {resource} was released by someone else"
    return f"lease on {resource} is now held by {holder.holder().describe()}"


def _check_owner(owner: str) -> None:
    if not owner or len(owner.encode("utf-8")) > MAX_OWNER_BYTES:
        raise ValueError(f"owner must be 1 to {MAX_OWNER_BYTES} bytes, not {owner!r}")


def _guarded(path: Path, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a file operation; an I/O error becomes :class:`LockspaceUnavailable` naming ``path``."""
    try:
        return fn(*args, **kwargs)
    except OSError as err:
        raise LockspaceUnavailable(f"lock file {path}: {err.strerror or err}") from None


def _no_op() -> None:
    """What :meth:`LocalLockspace.watch` returns: there is nothing to stop."""
