"""Named pause points, for tests that must kill a process at one exact moment.

A fault test cannot win a race against the code it interrupts: a SIGKILL
sent "while the destination restores connections" lands before, during or
after, as the scheduler pleases, and the test then proves nothing.  So the
process stops itself: with ``FERRY_PAUSE_AT=NAME`` in its environment, the
first time it reaches :func:`pause_point` ``NAME`` it logs ``paused at
NAME`` and sends itself SIGSTOP.  The test waits for that line, then does
what it came to do (SIGKILL, SIGCONT).  Without the variable a pause point
costs one dictionary lookup; nothing else in ferry reads it.

Points:

* ``restored`` -- the destination has rebuilt the first connection a
  sender carried, and has not answered it yet.
* ``takeover_received`` -- ``serve --takeover``: the new process holds the
  old one's descriptors and state, and has said nothing yet ("ready").
* ``takeover_committed`` -- ``serve --takeover``: the old process has said
  "yours", and the new one has not said "serving" yet.
"""

from __future__ import annotations

import os
import signal

from twisted.logger import Logger

__all__ = ["pause_point"]

_log = Logger()
_reached: set[str] = set()


def pause_point(name: str) -> None:
    """Stop this process here, once, if ``FERRY_PAUSE_AT`` names ``name``."""
    if os.environ.get("FERRY_PAUSE_AT") != name or name in _reached:
        return
    _reached.add(name)
    _log.warn("paused at {name}", name=name)
    os.kill(os.getpid(), signal.SIGSTOP)
