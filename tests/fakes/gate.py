"""A ClientGate without sockets: client writes are calls, holding is a queue.

It keeps the contract of :class:`ferry.migrate.gate.ClientGate` honestly,
and holds exactly when the real data plane does: while the export's role is
in a state with ``clients_held`` (it watches the role, as the export's
connections do).  A write submitted while held is queued, not performed;
leaving the held state performs the queue in order (a release) or, on to
``handed_off``, leaves it for :meth:`disconnect_all` to drop.
:meth:`writes_landed` fires only once writes "in flight" (started with
:meth:`FakeGate.begin_write`, not yet finished) have landed.  Writes go
through the export (the image, then ``note_write``), as the serve side's
do, so the mirror's dirty map sees them.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from ferry.clock import Clock
from ferry.nbd.constants import Command, CommandFlag
from ferry.nbd.events import Request
from ferry.serve.export import Attached, Export


class FakeGate:
    def __init__(self, export: Export, clock: Clock) -> None:
        self.export = export
        self.clock = clock
        self.holds = 0
        self.releases = 0
        self.disconnected: list[str] = []
        self.caps: list[int | None] = []
        self.queued: list[tuple[int, bytes, float]] = []  # offset, data, held at
        self.dropped: list[tuple[int, bytes, float]] = []
        self._in_flight: dict[int, tuple[int, bytes]] = {}
        self._next = 0
        self._waiters: list[Deferred[None]] = []
        self._longest = 0.0
        # The replies a write-blocking migration holds until the destination has the write,
        # by offset (a write answered at once has none).
        self.held_replies: dict[int, Deferred[None]] = {}
        export.observe_role(self._role_changed)

    @property
    def holding(self) -> bool:
        return self.export.clients_held

    def _role_changed(self, trigger: str, source: str, dest: str) -> None:
        chart = self.export.role_chart
        held, holds = chart.property(source, "clients_held"), chart.property(dest, "clients_held")
        if holds and not held:
            self.holds += 1
        elif held and not holds and dest != "handed_off":
            self._end_hold()
            self.releases += 1
            queued, self.queued = self.queued, []
            for offset, data, _ in queued:
                self._perform(offset, data)

    # -- ClientGate ---------------------------------------------------------------

    def writes_landed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._in_flight:
            self._waiters.append(d)
        else:
            d.callback(None)
        return d

    def disconnect_all(self, reason: str) -> None:
        self._end_hold()
        self.disconnected.append(reason)
        self.dropped += self.queued
        self.queued = []

    @property
    def clients(self) -> list[Attached]:
        return []  # its clients are calls, not connections: none can move

    @property
    def longest_hold(self) -> float:
        current = self.clock.seconds() - self.queued[0][2] if self.queued else 0.0
        return max(self._longest, current)

    def set_write_cap(self, bytes_per_second: int | None) -> None:
        self.caps.append(bytes_per_second)

    # -- a client, as the test drives it ------------------------------------------------

    def write(self, offset: int, data: bytes) -> bool:
        """A client write: performed now (True) or held by the switchover (False)."""
        if self.holding:
            self.queued.append((offset, data, self.clock.seconds()))
            return False
        self._perform(offset, data)
        return True

    def begin_write(self, offset: int, data: bytes) -> int:
        """A write dispatched before any hold that has not landed yet; finish it later."""
        assert not self.holding
        self._next += 1
        self._in_flight[self._next] = (offset, data)
        return self._next

    def finish_write(self, token: int) -> None:
        offset, data = self._in_flight.pop(token)
        self._perform(offset, data)
        if not self._in_flight:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def _perform(self, offset: int, data: bytes) -> None:
        self.export.image.pwrite(data, offset)
        request = Request(0, Command.WRITE, CommandFlag(0), offset, len(data), data)
        reply = self.export.note_write(offset, len(data), request)
        if reply is not None:
            self.held_replies[offset] = reply

    def _end_hold(self) -> None:
        if self.queued:
            self._longest = max(self._longest, self.clock.seconds() - self.queued[0][2])
