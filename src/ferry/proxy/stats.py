"""What every session of a proxy adds up to: the status line's and ``/metrics``' totals.

The sessions add to one :class:`ProxyStats` through their host (the
listener, :class:`~ferry.proxy.listener.ProxyServer`); the status line and
the Prometheus collector (:mod:`ferry.proxy.status`) read it.  It is apart
from the listener so that a session can name it without importing the
listener that builds sessions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["ProxyStats"]


@dataclass
class ProxyStats:
    """Counters of every session since the proxy started (the status line's totals)."""

    upstream: str = ""  # where the last server a session reached was
    connections: int = 0  # client connections accepted
    reconnects: int = 0  # servers reached again after one was lost
    requests: int = 0  # client requests answered (by the server or the proxy)
    requests_replayed: int = 0  # requests sent again to a new server
    requests_expired: int = 0  # requests answered EIO: no server within max-wait, or another image
    longest_pause: float = 0.0  # the longest a request waited for a server, in seconds
    errors: Counter[str] = field(default_factory=Counter)  # replies with an error, by errno name

    def pause(self, seconds: float) -> None:
        self.longest_pause = max(self.longest_pause, seconds)
