"""The one exception family of :mod:`ferry.handoff`: "this connection does not move".

Each module raises its own subclass, with a message a human can act on;
the switchover needs only the base class to fall back to what it did before
connections could move: disconnect that client and carry on with the image.
"""

from __future__ import annotations


class HandoffError(Exception):
    """A connection (or the host) cannot take part in a handoff; the message says why."""
