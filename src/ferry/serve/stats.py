"""Per-export request counters, kept as plain numbers on the hot path.

A prometheus_client ``Counter.inc()`` takes a lock and costs about a
microsecond; at tens of thousands of requests a second that is a visible
share of the data plane.  These counters are plain integers updated on the
reactor thread, and the metrics collector reads them when it is scraped
(on the same thread, so it never sees a half-updated value).
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

# Upper bounds of the request-latency histogram, in seconds: from a page-cache
# read on loopback (tens of microseconds) to an fsync on a busy disk.
LATENCY_BUCKETS: Final = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


@dataclass(slots=True)
class Histogram:
    """Counts per bucket (not cumulative; the collector accumulates)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


@dataclass(slots=True)
class RequestStats:
    requests: Counter[str] = field(default_factory=Counter)
    #: Of those, performed on the reactor thread with no worker thread: READs
    #: the page cache answered, WRITEs the kernel took whole without waiting.
    at_once: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    connections: int = 0
    protocol_errors: int = 0

    def observe(self, command: str, seconds: float) -> None:
        self.requests[command] += 1
        histogram = self.latency.get(command)
        if histogram is None:
            histogram = self.latency[command] = Histogram()
        histogram.observe(seconds)


@dataclass(slots=True)
class HandoffCounts:
    """The client connections of the last handoff: moved with the image, or lost.

    The source counts a connection moved once the destination said it
    rebuilt it and the commit landed; the destination, once it joined the
    export.  Either side counts every other one lost (``connections_aborted``):
    a client that could not move is disconnected, as before connections
    could move.
    """

    moved: int = 0
    aborted: int = 0
