"""The destination's half of the two-phase commit, for ferry's senders and flexnbd's.

A listening export takes the image from one sender (``ferry.serve``); when
that sender commits, the :class:`Receiver` makes the commit true or refuses
it, and says which:

1. ``commit`` (role ``receiving -> committing``, the fencing token kept);
2. fdatasync of the image, on the thread pool, within ``timeout``;
3. the commit no longer depends on the sender's socket (it takes the
   sender's place, :meth:`~ferry.serve.export.Export.detach_commit`): from
   here, if the lease is taken the node serves, ack or no ack -- a source
   that lost the acknowledgement asks the lease;
4. the source's lease, taken over by the commit's token (or a lease of its
   own when the source holds none);
5. ``committed`` (``committing -> serving``, with control), and only then
   the acknowledgement.

Every other ending is answered too, and sends the export back to
``listening`` for the next sender: EIO if the fsync fails or does not
finish in time (the source takes it as a definite no), EPERM with the reason
if the lease cannot be taken, EIO for a bug (logged whole).  A listener is
never left in ``committing``.

flexnbd's sender commits with NBD_CMD_DISC and closes its socket: nothing
is answered, the commit is detached from the socket from the start, and a
failure leaves the image with nobody in control until an operator steps in
(the weaker handoff the README describes).
"""

from __future__ import annotations

import errno as os_errno
import os
from collections.abc import Callable
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.chartnames import RoleState
from ferry.clock import Clock
from ferry.migrate.arrivals import Arrivals
from ferry.nbd.constants import Errno, OptionReply
from ferry.nbd.events import ConnectionLanding, Refusal
from ferry.serve.connection import CommitAnswer, ConnectionHost
from ferry.serve.export import Export

__all__ = ["COMMIT_TIMEOUT", "Receiver"]

_log = Logger()

#: A sender's commit must be durable within this long, or it is refused (EIO)
#: and the export listens again: a destination never waits in committing for
#: a disk that does not answer.  The source flushed before it committed, so
#: only its last pass is left to sync; its own reply timeout is 60 s.
COMMIT_TIMEOUT: Final = 30.0

RunBlocking = Callable[[Callable[[], object]], "Deferred[Any]"]


class Receiver:
    """Performs the commits of the migration senders of one node's listening exports."""

    def __init__(
        self,
        *,
        run_blocking: RunBlocking,
        clock: Clock,
        timeout: float = COMMIT_TIMEOUT,
        arrivals: Arrivals | None = None,
    ) -> None:
        self._run_blocking = run_blocking
        self._clock = clock
        self.timeout = timeout
        # Rebuilds the client connections senders carry here (None: none are taken).
        self._arrivals = arrivals

    def connection_landing(self) -> ConnectionLanding | Refusal:
        if self._arrivals is None:
            return Refusal(OptionReply.ERR_UNSUP, "this node does not take client connections")
        return self._arrivals.landing()

    def carried(
        self, host: ConnectionHost, export: Export, state: bytes, answer: CommitAnswer
    ) -> None:
        if self._arrivals is None:
            answer(Errno.ENOTSUP, "this node does not take client connections")
            return
        self._arrivals.carried(host, export, state, answer)

    def commit(
        self,
        export: Export,
        sender: object,
        token: int,
        source_resource: str,
        answer: CommitAnswer | None,
    ) -> Deferred[None]:
        """Commit ``sender``'s migration of ``export``; see the module doc.

        ``answer`` replies to the sender (None: a flexnbd sender, which is
        not answered).  The Deferred fires, never fails, once the commit is
        settled either way.
        """
        return _Commit(self, export, sender, token, source_resource, answer).run()


class _Commit:
    """One commit, from the sender's request to its answer."""

    def __init__(
        self,
        receiver: Receiver,
        export: Export,
        sender: object,
        token: int,
        source_resource: str,
        answer: CommitAnswer | None,
    ) -> None:
        self._receiver = receiver
        self._export = export
        self._owner = sender  # the sender, then the commit detached from its socket
        self._token = token
        self._source_resource = source_resource
        self._answer = answer
        self._flexnbd = answer is None
        self._deadline = receiver._clock.call_later(receiver.timeout, self._timed_out)
        self._taking_lease = False  # past the fsync: only the lockspace bounds the rest
        self._answered = False

    def run(self) -> Deferred[None]:
        export = self._export
        export.begin_commit(self._owner)
        if self._flexnbd:
            self._detach()
        _log.info(
            "{name}: {who} commits with token {token}; syncing",
            name=export.name,
            who="the flexnbd sender" if self._flexnbd else "the sender",
            token=self._token,
        )
        steps = self._receiver._run_blocking(export.image.flush)
        steps.addCallbacks(self._synced, self._sync_failed)
        steps.addErrback(self._internal_error)
        # Settled once every step has returned, the fsync included, even if
        # the answer went earlier (a time-out).
        return steps.addBoth(self._settled)

    # -- the steps -----------------------------------------------------------------

    def _pending(self) -> bool:
        """Whether this commit is still the export's, unanswered."""
        return self._export.sender is self._owner and self._export.state == RoleState.COMMITTING

    def _detach(self) -> bool:
        commit = self._export.detach_commit(self._owner)
        if commit is None:
            return False
        self._owner = commit
        return True

    def _synced(self, _: object) -> Deferred[None] | None:
        if not self._pending() or not self._detach():
            if not self._answered:
                _log.warn("{name}: commit abandoned: the sender went away", name=self._export.name)
            return None
        self._taking_lease = True
        taking = defer.maybeDeferred(self._export.take_lease, self._token, self._source_resource)
        taking.addCallbacks(self._took, self._lease_refused)
        return taking

    def _took(self, _: object) -> None:
        export = self._export
        lease = export.lease
        if lease is not None and not lease.may_write():
            # The acknowledgement promises that this node owns the image.
            self._refuse(Errno.EPERM, f"the lease is {lease.state} before the ack")
            return
        if not export.committed(self._owner):
            _log.warn("{name}: commit abandoned while taking the lease", name=export.name)
            return
        _log.info("{name}: committed; serving with control", name=export.name)
        self._finish(Errno.OK, "")

    def _lease_refused(self, failure: Failure) -> None:
        why = f"cannot take the lease: {failure.getErrorMessage()}"
        if self._flexnbd:
            why += "; nobody serves the image until an operator steps in"
        self._refuse(Errno.EPERM, why)

    def _sync_failed(self, failure: Failure) -> None:
        error = failure.value
        why = os.strerror(error.errno or os_errno.EIO) if isinstance(error, OSError) else ""
        self._refuse(Errno.EIO, f"fsync failed: {why or error}")

    def _timed_out(self) -> None:
        # Only while syncing: once the lease is being taken, the lockspace's
        # own time-outs bound the answer, and a "no" given now could cross a
        # take-over that succeeds.
        if self._pending() and not self._taking_lease:
            timeout = self._receiver.timeout
            self._refuse(
                Errno.EIO, f"commit timed out: the image did not sync within {timeout:g} s"
            )

    def _internal_error(self, failure: Failure) -> None:
        _log.failure("{name}: internal error in the commit", failure, name=self._export.name)
        self._refuse(Errno.EIO, "internal error in the commit")

    # -- the end -------------------------------------------------------------------

    def _refuse(self, error: Errno, why: str) -> None:
        """A definite no: nothing was taken; the export listens again for a new sender."""
        if not self._pending():
            return
        _log.error("{name}: commit refused: {why}", name=self._export.name, why=why)
        self._export.sender_lost(self._owner)
        self._finish(error, why)

    def _finish(self, error: Errno, message: str) -> None:
        """Answer, once (flexnbd's sender is not answered)."""
        if self._answered:
            return
        self._answered = True
        if self._deadline.active():
            self._deadline.cancel()
        if self._answer is not None:
            self._answer(error, message)

    def _settled(self, _: object) -> None:
        if self._deadline.active():
            self._deadline.cancel()
