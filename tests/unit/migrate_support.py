"""Shared by the migrate tests: run a simulated clock call by call, and a sparse image."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import task

from ferry.storage import Image

KIB = 1024
MIB = 1024 * KIB


def run_until(clock: task.Clock, end: float) -> None:
    """Advance ``clock`` to ``end``, stopping at each pending call's own time.

    ``task.Clock.advance`` runs every due call at the *new* time, so a call
    scheduled for 1.0 would see 5.0 after ``advance(5)``; a rate test needs
    each send stamped with the time it was due.
    """
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= end]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    if clock.seconds() < end:
        clock.advance(end - clock.seconds())


def sparse_image(path: Path, size: int, data: list[tuple[int, bytes]]) -> Image:
    """A sparse file of ``size`` bytes with ``data`` written at its offsets, opened."""
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, chunk in data:
            os.pwrite(fd, chunk, offset)
    finally:
        os.close(fd)
    return Image.open(path)
