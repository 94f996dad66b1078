"""The JSON lines one control connection sends, held within a cap while its peer is slow.

A JSON-lines connection stays open, and with a subscription
(:mod:`ferry.control.events`) the server writes to it unasked, whenever a
machine moves.  A peer that stops reading must neither make the server
block (it never does: Twisted buffers every write) nor make it buffer
without bound.  So every line goes through a :class:`JsonLines`:

* It is the transport's streaming producer.  While the transport holds less
  than its ``bufferSize`` (64 KiB) unsent, a line goes straight to it;
  past that the transport pauses us, and lines wait here, in order, until
  it resumes us.
* At most ``MAX_BACKLOG_BYTES`` may wait here.  The line that would go past
  it ends the connection instead: the backlog is thrown away (memory is
  given back at once), a last ``{"method": "end", "params": {"reason":
  ..., "complete": false}}`` line says why, and the connection closes once the transport has
  sent what it holds -- or is aborted ``CLOSE_GRACE`` seconds later if the
  peer still reads nothing.  So one connection costs at most the
  transport's buffer plus the cap, and a dropped peer knows it was dropped.
* Replies to requests take the same path as notifications, so a reply
  never overtakes an event sent before it.

The model is ``twisted.web.http.HTTPChannel``: when the transport says
"pause", stop producing, and keep a named limit on what waits.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ITransport
from zope.interface import implementer

from ferry.clock import Clock, DelayedCall

__all__ = ["CLOSE_GRACE", "MAX_BACKLOG_BYTES", "JsonLines", "end_message"]

#: What may wait for one slow peer, beyond the transport's own buffer: a few
#: thousand trace records, far more than a migration makes, and small enough
#: that a hundred stuck subscribers are no memory worry.
MAX_BACKLOG_BYTES: Final = 256 * 1024

#: How long a connection being closed gets to take its last lines before it
#: is aborted; shutdown waits at most this long for its subscribers.
CLOSE_GRACE: Final = 2.0


def end_message(reason: str, *, complete: bool) -> bytes:
    """The last line the server sends on a connection it closes, saying why.

    ``complete`` says whether everything meant for the peer was sent before
    it (a shutdown) or some was thrown away (a peer dropped for being slow).
    """
    return _line({"method": "end", "params": {"reason": reason, "complete": complete}})


def _line(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, allow_nan=False).encode("utf-8") + b"\n"


@implementer(IPushProducer)
class JsonLines:
    """The outgoing side of one JSON-lines control connection."""

    def __init__(
        self,
        transport: ITransport,
        clock: Clock,
        *,
        max_backlog: int = MAX_BACKLOG_BYTES,
        grace: float = CLOSE_GRACE,
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._max_backlog = max_backlog
        self._grace = grace
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._paused = False
        self._ended = False
        self._abort_call: DelayedCall | None = None
        self._lost: list[Deferred[None]] = []
        self._gone = False
        transport.registerProducer(self, True)  # type: ignore[attr-defined]

    @property
    def ended(self) -> bool:
        """True once nothing more will be sent (closing, dropped, or gone)."""
        return self._ended

    @property
    def max_backlog(self) -> int:
        """The cap on :attr:`backlog_bytes`."""
        return self._max_backlog

    @property
    def backlog_bytes(self) -> int:
        """Bytes waiting here for the transport to resume us."""
        return self._backlog_bytes

    def send(self, message: Mapping[str, Any]) -> None:
        """Send one JSON object as a line (dropped silently once the connection has ended)."""
        self.send_line(_line(message))

    def send_line(self, line: bytes) -> None:
        """Send one encoded line, ending in ``\\n``; see the module doc for the cap."""
        if self._ended:
            return
        if not self._paused and not self._backlog:
            self._transport.write(line)
            return
        if self._backlog_bytes + len(line) > self._max_backlog:
            waiting = len(self._backlog)
            self.end(
                f"dropped: this connection read too slowly ({waiting} lines, "
                f"{self._backlog_bytes} bytes waiting; the limit is {self._max_backlog})",
                discard=True,
            )
            return
        self._backlog.append(line)
        self._backlog_bytes += len(line)

    def end(self, reason: str, *, discard: bool = False) -> None:
        """Send what waits (unless ``discard``), a last line saying why, then close.

        If the peer has not taken it all within the grace period, the
        connection is aborted.
        """
        if self._ended:
            return
        self._ended = True
        backlog, self._backlog = self._backlog, deque()
        self._backlog_bytes = 0
        # A registered producer keeps a transport open after loseConnection
        # (FileDescriptor resumes the producer instead of closing).
        self._transport.unregisterProducer()  # type: ignore[attr-defined]
        if not discard:
            self._transport.writeSequence(list(backlog))
        self._transport.write(end_message(reason, complete=not discard))
        self._transport.loseConnection()
        self._abort_call = self._clock.call_later(self._grace, self._abort)

    def when_lost(self) -> Deferred[None]:
        """Fires once the connection is gone (at once if it already is)."""
        d: Deferred[None] = Deferred()
        if self._gone:
            d.callback(None)
        else:
            self._lost.append(d)
        return d

    def connection_lost(self) -> None:
        """The protocol's ``connectionLost``: forget everything, stop the abort timer."""
        self._ended = True
        self._gone = True
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        waiting, self._lost = self._lost, []
        for d in waiting:
            d.callback(None)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._gone:
            self._transport.abortConnection()  # type: ignore[attr-defined]

    # -- IPushProducer ----------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        # Writing may pause us again (the transport's buffer fills): stop then.
        while self._backlog and not self._paused and not self._ended:
            line = self._backlog.popleft()
            self._backlog_bytes -= len(line)
            self._transport.write(line)

    def stopProducing(self) -> None:
        self._ended = True
        self._backlog.clear()
        self._backlog_bytes = 0
