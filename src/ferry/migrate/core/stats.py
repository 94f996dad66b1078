"""Per-export migration counters: retries and failures by reason, and completions.

These are counters, not status fields: they never go back down, they
outlive the job that counted them (one :class:`MigrationStats` per export,
kept by its ``MirrorManager`` across every ``mirror`` command), and the
status line has no place for them.  Like ``serve/stats.py``'s
``RequestStats`` they are plain numbers on the reactor thread, read by the
metrics collector on the same thread.

A reason is a label (``ferry_migration_retries_total{reason=...}``), so it
comes from the fixed :class:`FailureReason` set, never from an error
message: an address or a byte range in a label would make a new series for
every failure.  The collector exports every reason from the start, at 0,
so the first retry is an increase Prometheus can see.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from ferry.nbd.constants import Errno
from ferry.serve.stats import Histogram

__all__ = ["PERMANENT", "FailureReason", "MigrationStats", "failure_of_reply"]


class FailureReason(enum.StrEnum):
    """Why an attempt was lost (a retry) or a job ended without handing over (a failure)."""

    CONNECT = "connect"  # the destination could not be reached
    NO_HELLO = "no_hello"  # connected, but no hello in time
    REJECTED = "rejected"  # the destination refused the migration or its options
    SIZE_MISMATCH = "size_mismatch"  # the destination's export has another size
    CONNECTION_LOST = "connection_lost"  # the connection closed under the stream
    PROTOCOL_ERROR = "protocol_error"  # the destination broke the NBD protocol
    WRITE_ERROR = "write_error"  # an error reply to a WRITE or WRITE_ZEROES
    READ_ERROR = "read_error"  # the source's own image could not be read
    FLUSH_ERROR = "flush_error"  # an error reply to a FLUSH
    REPLY_TIMEOUT = "reply_timeout"  # no reply within the reply timeout
    LEASE = "lease"  # the lease could not be offered for the handover
    COMMIT_REJECTED = "commit_rejected"  # the destination answered the commit with an error
    IN_DOUBT = "in_doubt"  # the commit's ack was lost and the destination did not commit
    HOOK = "hook"  # a hook (or the approver) vetoed a step: the job was cancelled
    NO_SPACE = "no_space"  # the destination answered ENOSPC: its disk is full
    LEASE_REFUSED = "lease_refused"  # the destination refused the commit: it cannot take the lease
    NOT_CONVERGED = "not_converged"  # the passes never got within max_downtime


#: What retrying cannot heal: a migration lost to one of these ends ``failed`` at once.
PERMANENT: Final = frozenset(
    {FailureReason.NO_SPACE, FailureReason.SIZE_MISMATCH, FailureReason.LEASE_REFUSED}
)


@dataclass(slots=True)
class MigrationStats:
    retries: Counter[FailureReason] = field(default_factory=Counter)
    failures: Counter[FailureReason] = field(default_factory=Counter)
    completed: int = 0
    # A write-blocking migration's client writes answered by the destination
    # (ferry.migrate.mirroring), their bytes, and their round trips.
    mirrored_writes: int = 0
    mirrored_bytes: int = 0
    mirrored_latency: Histogram = field(default_factory=Histogram)


def failure_of_reply(error: Errno, otherwise: FailureReason) -> FailureReason:
    """The reason of an error reply from the destination: ENOSPC is a full disk, which
    no retry heals; any other error is ``otherwise`` (a write's, a flush's)."""
    return FailureReason.NO_SPACE if error == Errno.ENOSPC else otherwise
