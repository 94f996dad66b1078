"""What keeps an export from migrating now: QEMU's migration blockers, with a reason each.

A blocker is a sentence an operator (or ferry itself) gives for why the
image must stay where it is: a backup that reads it, a maintenance window.
While an export has any, ``mirror`` is refused with ``1: migration
blocked: REASON`` before anything is connected, and the status line lists
them (``blockers``).  A running migration is not stopped by a new blocker:
that is what ``break`` is for.

Two kinds:

* set by hand (``block`` / ``unblock`` on the control socket, ``ferry
  block``): kept in order until removed;
* found in the lockspace: another holder shares the image's lease (a
  ``ferry lock run --shared`` backup beside a read-only export).  A shared
  holder reads the image where it is, and would go on reading it there
  after a migration, so the migration is blocked while it holds the lease.
  The lockspace is asked afresh at every ``mirror``
  (:func:`lease_blockers` of the answer), and now and then for the status
  line.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from ferry.lease.backend import Holder
from ferry.migrate.options import MirrorError

__all__ = [
    "MAX_REASON_BYTES",
    "BadBlocker",
    "Blockers",
    "MigrationBlocked",
    "blocked_message",
    "lease_blockers",
]

#: The longest reason: it travels in status lines, JSON answers and logs.
MAX_REASON_BYTES: Final = 256


class MigrationBlocked(MirrorError):
    """``mirror`` while the export has a blocker; ``str`` is the reply's text."""


class BadBlocker(ValueError):
    """A reason that cannot be a blocker's (empty, too long, a control character)."""


def blocked_message(reasons: Iterable[str]) -> str:
    """The refusal of a blocked ``mirror``: ``migration blocked: R1; R2``."""
    return "migration blocked: " + "; ".join(reasons)


def lease_blockers(holders: Iterable[Holder], owner: str) -> list[str]:
    """One reason for every holder other than ``owner`` that shares the lease."""
    return [
        f"the lease on the image is shared with {holder.owner} ({holder.mode.value})"
        for holder in holders
        if holder.owner != owner
    ]


class Blockers:
    """The blockers set by hand on one export, in the order they were added."""

    def __init__(self) -> None:
        self._reasons: list[str] = []

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(self._reasons)

    def add(self, reason: str) -> bool:
        """Block with ``reason``; False if the export was blocked with it already."""
        problem = reason_problem(reason)
        if problem is not None:
            raise BadBlocker(problem)
        if reason in self._reasons:
            return False
        self._reasons.append(reason)
        return True

    def remove(self, reason: str | None = None) -> list[str]:
        """Remove ``reason`` (None: every one); the reasons removed (none: it was not there)."""
        if reason is None:
            removed, self._reasons = self._reasons, []
            return removed
        if reason not in self._reasons:
            return []
        self._reasons.remove(reason)
        return [reason]


def reason_problem(reason: str) -> str | None:
    """Why ``reason`` cannot be a blocker's reason (None: it can)."""
    if not reason.strip():
        return "a blocker needs a reason"
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError:
        return "the reason is not UTF-8 text"
    if size > MAX_REASON_BYTES:
        return f"the reason is longer than {MAX_REASON_BYTES} bytes"
    if any(ord(char) < 32 or ord(char) == 127 for char in reason):
        return "the reason contains a control character"
    return None
