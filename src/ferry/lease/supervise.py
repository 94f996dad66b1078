"""``ferry lock run``: run a command while holding a lease, and never without it.

A lease protects something the command touches (a disk image, a
directory, a job that must run once).  The danger is not a command that
fails to start but one that goes on after its lease has gone: that is the
split brain the lease exists to prevent.  So the supervisor keeps one rule:
the command runs only while the lease is held.

* It is started only once the lease is granted.  If someone else holds the
  lease the run ends at once, with one line naming the holder, and the
  command never runs (nothing waits for the lease: whether to retry is the
  caller's decision, as with ``flock -n``).
* The :class:`~ferry.lease.manager.LeaseManager` keeps the lease alive.  The
  moment it fences -- the lease was lost, or no renewal was confirmed before
  the local deadline -- the command is killed with SIGKILL, not asked to
  stop: a command that cleans up on SIGTERM would go on writing, after the
  deadline, under a lease someone else may already hold.
* When the command exits, the lease is released (within
  :data:`RELEASE_TIMEOUT`; an etcd grant that cannot be released ends with
  its TTL).

Exit status
-----------
The command's, as a shell reports it: its exit code, or 128 + the number
of the signal that killed it.  Otherwise: 1 when the lease could not be
taken (held by someone else, the lockspace unreachable), 127 when the
command cannot be run, and :data:`FENCED_STATUS` (137, a SIGKILL death)
whenever the lease was lost while the command ran -- even if the command
managed to exit on its own in the same instant, since it may have worked
without the lease.

Signals
-------
SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 sent to ferry are passed on to
the command, which decides what they mean; ferry waits for it to exit and
exits with its status.  A signal that arrives before the command has
started ends the run with 128 + its number (all five terminate by default,
and there is nobody yet to pass them to), the lease released.  A signal
that was ignored when ferry started (``nohup``) stays ignored and is not
passed on.

The command stays in ferry's process group, so it can use the terminal.
A Ctrl-C typed at that terminal reaches every process of the foreground
group, the command included; passing it on as well would deliver it twice
(and a shell script's ``trap`` would run twice).  So SIGINT is not passed on
while ferry's process group is its terminal's foreground group: there, the
terminal has delivered it already.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.clock import ReactorClock
from ferry.lease.backend import Grant, LeaseBackend, LeaseConflict, LeaseError, LeaseMode
from ferry.lease.manager import LeaseManager
from ferry.lease.spec import open_lockspace

__all__ = [
    "CANNOT_RUN",
    "FENCED_STATUS",
    "FORWARDED_SIGNALS",
    "RELEASE_TIMEOUT",
    "LockRun",
    "LockRunError",
    "Supervisor",
    "default_owner",
    "exit_status",
    "run",
]

_log = Logger()

FORWARDED_SIGNALS: Final = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""The signals ferry passes on to the command (see the module doc)."""

FENCED_STATUS: Final = 128 + signal.SIGKILL
"""The exit status of a run whose lease was lost: the command was killed with SIGKILL."""

CANNOT_RUN: Final = 127
"""The exit status when the command is not found or cannot be executed (a shell's)."""

RELEASE_TIMEOUT: Final = 5.0
"""The longest ferry waits, after the command exits, for the lockspace to take the lease back.

A local lock is released at once; an etcd lease that cannot be revoked in
this time expires with its TTL, so waiting longer would only delay the exit.
"""

CLOSE_TIMEOUT: Final = 1.0
"""The longest ferry waits for the lockspace's connections to close before it exits."""


class LockRunError(Exception):
    """Why a run did not start, in one line, and the exit status that says so."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LockRun:
    """What ``ferry lock run`` was asked to do.

    ``owner`` empty means :func:`default_owner`.  ``ttl`` is for an etcd
    lockspace (None: its default); a local lock has none.
    """

    lockspace: str
    resource: str
    command: tuple[str, ...]
    mode: LeaseMode = LeaseMode.EXCLUSIVE
    owner: str = ""
    ttl: float | None = None


def default_owner() -> str:
    """``host:pid:lock-run``: who holds the lease, as ``lock status`` and conflicts name it."""
    return f"{socket.gethostname()}:{os.getpid()}:lock-run"


def exit_status(reason: BaseException) -> int:
    """A finished command's status as a shell gives it: the exit code, or 128 + the signal."""
    status = getattr(reason, "status", None)
    if status is not None:  # the raw wait status, when Twisted kept it
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code
    signum = getattr(reason, "signal", None)
    if signum:
        return 128 + int(signum)
    return int(getattr(reason, "exitCode", 0) or 0)


def run(job: LockRun, reactor: Any = None, *, say: Callable[[str], None] | None = None) -> int:
    """Run ``job`` to its end on ``reactor`` (which this call runs); the exit status.

    Raises :class:`LockRunError` for what is wrong before anything starts (a
    command that cannot be found, a lockspace that cannot be opened).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    executable = _find(job.command)
    try:
        backend = open_lockspace(job.lockspace, reactor=reactor, ttl=job.ttl)
    except (ValueError, LeaseError) as error:
        raise LockRunError(f"--lockspace {job.lockspace}: {error}") from None
    supervisor = Supervisor(reactor, backend, job, executable, say=say)
    reactor.callWhenRunning(supervisor.start)
    supervisor.finished.addBoth(lambda _: reactor.stop())
    reactor.run()
    return supervisor.status


def _find(command: tuple[str, ...]) -> str:
    """The executable to run, found before the lease is taken: a lease for nothing helps nobody."""
    if not command:
        raise LockRunError("no command to run", CANNOT_RUN)
    found = shutil.which(command[0])
    if found is None:
        raise LockRunError(f"{command[0]}: command not found (or not executable)", CANNOT_RUN)
    return found


def _say(message: str) -> None:
    print(f"ferry: {message}", file=sys.stderr, flush=True)


class _Command(ProcessProtocol):
    """The command's process: ferry only needs to hear that it ended."""

    def __init__(self, ended: Callable[[BaseException], None]) -> None:
        self._ended = ended

    def processEnded(self, reason: Failure) -> None:
        assert reason.value is not None
        self._ended(reason.value)


class Supervisor:
    """One ``lock run``: take the lease, run the command, fence it, release, finish.

    :attr:`finished` fires once everything is over; :attr:`status` is then
    the exit status.  Messages for the operator go through ``say`` (one
    line each, ``ferry: ...`` on stderr by default).
    """

    def __init__(
        self,
        reactor: Any,
        backend: LeaseBackend,
        job: LockRun,
        executable: str,
        *,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._backend = backend
        self._job = job
        self._executable = executable
        self._say = say or _say
        self.lease = LeaseManager(
            backend,
            resource=job.resource,
            owner=job.owner or default_owner(),
            mode=job.mode,
            clock=ReactorClock(reactor, monotonic=time.monotonic),
            on_fenced=self._fenced,
        )
        self.status = 1
        self.finished: Deferred[None] = Deferred()
        self._command: IProcessTransport | None = None
        self._early_signal: int | None = None  # arrived before the command started
        self._fence_reason: str | None = None
        self._finishing = False
        self._handlers: dict[int, Any] = {}  # the handlers ours replaced

    # -- the run, step by step ---------------------------------------------------

    def start(self) -> None:
        """Install the signal handlers, then ask for the lease (the reactor is running)."""
        self._install_handlers()
        self.lease.register()
        d = self.lease.acquire()
        d.addCallbacks(self._acquired, self._refused)
        d.addErrback(self._crashed)

    def _acquired(self, grant: Grant) -> None:
        if self._early_signal is not None:
            self._finish(128 + self._early_signal)
            return
        try:
            self._command = self._reactor.spawnProcess(
                _Command(self._command_ended),
                self._executable,
                list(self._job.command),
                env=dict(os.environ),
                childFDs={0: 0, 1: 1, 2: 2},  # the command uses ferry's stdin, stdout, stderr
            )
        except OSError as error:
            self._say(f"cannot run {self._job.command[0]}: {error.strerror or error}")
            self._finish(CANNOT_RUN)
            return
        _log.info(
            "holding the lease on {resource} (token {token}); running {command}",
            resource=self._job.resource,
            token=grant.token,
            command=self._job.command[0],
        )

    def _refused(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, LeaseConflict):
            self._say(str(error))
        elif isinstance(error, LeaseError):
            self._say(f"cannot take the lease on {self._job.resource}: {error}")
        else:
            failure.raiseException()
        self._finish(1)

    def _command_ended(self, reason: BaseException) -> None:
        self._command = None
        status = exit_status(reason)
        self._finish(FENCED_STATUS if self._fence_reason is not None else status)

    def _fenced(self, reason: str) -> None:
        """The lease is gone: the command must not run another instant."""
        self._fence_reason = reason
        command = self._command
        if command is None:
            return  # it has exited already; its status stands
        pid = command.pid
        with contextlib.suppress(ProcessExitedAlready):  # exiting anyway: still fenced
            command.signalProcess("KILL")
        self._say(
            f"lease on {self._job.resource} lost ({reason}); "
            f"killed {self._job.command[0]} (pid {pid}) with SIGKILL"
        )

    def _finish(self, status: int) -> None:
        """Release the lease (if still ours), close the lockspace, then fire :attr:`finished`."""
        if self._finishing:
            return
        self._finishing = True
        self.status = status
        self._restore_handlers()
        d = self._release()
        d.addBoth(self._close)
        d.addBoth(lambda _: self.finished.callback(None))

    def _release(self) -> Deferred[None]:
        if not self.lease.holds:  # fenced (the manager let it go) or never held
            return self.lease.shutdown()
        d = self.lease.release()
        d.addTimeout(RELEASE_TIMEOUT, self._reactor)
        d.addErrback(self._release_failed)
        return d

    def _close(self, _: object) -> Deferred[None]:
        """Drop the lockspace's connections; one that will not close is not worth waiting for."""
        d = self._backend.close()
        d.addTimeout(CLOSE_TIMEOUT, self._reactor)
        d.addErrback(lambda _: None)
        return d

    def _release_failed(self, failure: Failure) -> None:
        why = failure.getErrorMessage() or type(failure.value).__name__
        self._say(
            f"could not release the lease on {self._job.resource} ({why}); "
            "it ends when its TTL runs out"
        )

    def _crashed(self, failure: Failure) -> None:
        """A bug, not a refusal: log it, and still never leave the lease behind."""
        _log.failure("lock run failed", failure)
        self._finish(1)

    # -- signals ----------------------------------------------------------------------

    def _install_handlers(self) -> None:
        """Replace the reactor's handlers (installed at startup) with forwarding ones."""
        for signum in FORWARDED_SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue  # ignored by whoever started ferry: stays ignored
            self._handlers[signum] = previous
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        handlers, self._handlers = self._handlers, {}
        for signum, previous in handlers.items():
            signal.signal(signum, previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between any two bytecodes of the reactor thread: do the work
        # from the reactor loop, where the command's state is consistent.
        self._reactor.callFromThread(self._forward, signum)

    def _forward(self, signum: int) -> None:
        if self._finishing:
            return
        if self._command is None:
            # Still acquiring: remember the first; _acquired ends the run.
            if self._early_signal is None:
                self._early_signal = signum
            return
        if signum == signal.SIGINT and _terminal_delivered_it():
            return
        with contextlib.suppress(ProcessExitedAlready):  # its end is on its way to us
            self._command.signalProcess(signum)


def _terminal_delivered_it() -> bool:
    """Whether ferry's process group is in the foreground of its terminal (see the module doc).

    Asked at the moment the signal arrives: job control (``bg``, ``fg``)
    moves a process group in and out of the foreground.
    """
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False
