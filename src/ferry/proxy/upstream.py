"""Reaching the server: connect, ask where the image is, negotiate the export.

:class:`Dialer` takes the places a :class:`~ferry.proxy.finder.Finder`
gave, best first, and tries them one at a time; the first that negotiates
the export wins.  Each try is an :class:`_Attempt`: a TCP connection (the
``Connector`` the migration source uses), ferry's sans-IO client on it, and
a deadline for the server's hello and negotiation on the injected clock.
(``tcp_connector`` connects to an IP address directly, so a server that is
down is known at once.)

Before GO every attempt asks ``FERRY_OPT_LOCATE`` (:mod:`ferry.nbd.locate`).
A ferry server that handed the image off answers with where it went; the
attempt then gives up on that server, and the dialer tries the new place
next, before the rest of the list.  Any other server answers ERR_UNSUP and
the handshake goes on as usual.  At most :data:`MAX_REDIRECTS` such answers
are followed per dial, so two servers pointing at each other cannot keep
the proxy busy forever.

The negotiated connection is handed over as an :class:`Upstream`: the
:class:`~ferry.migrate.wire.MirrorProtocol` (the same byte mover the
migration source uses), what was negotiated, and where.  Its owner then
makes itself the wire's handler.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.clock import Clock, DelayedCall
from ferry.migrate.options import Destination
from ferry.migrate.wire import Connector, MirrorProtocol
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import BASE_ALLOCATION
from ferry.nbd.events import (
    Event,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    OptionData,
)
from ferry.nbd.locate import (
    FERRY_OPT_LOCATE,
    FERRY_REP_LOCATION,
    Location,
    decode_location,
    locate_option,
)

__all__ = ["MAX_REDIRECTS", "Dial", "DialFailed", "Dialer", "Upstream", "tcp_connector"]

_log = Logger()

#: Seconds for a TCP connection to be made, and then for the whole handshake.
CONNECT_TIMEOUT: Final = 5.0
HELLO_TIMEOUT: Final = 5.0
#: "It moved there" answers followed in one dial.
MAX_REDIRECTS: Final = 4


@dataclass(frozen=True, slots=True)
class Upstream:
    """A server connection, negotiated and ready for requests."""

    wire: MirrorProtocol
    negotiated: Negotiated
    location: Location


class DialFailed(Exception):
    """No place answered with the export; the message says what each one did."""


class _Moved(Exception):
    """The server no longer has the image; it says where it went."""

    def __init__(self, locations: list[Location]) -> None:
        super().__init__(", ".join(map(str, locations)))
        self.locations = locations


class _Attempt:
    """One try at one place; a :class:`~ferry.migrate.wire.WireHandler` until it settles."""

    def __init__(
        self,
        location: Location,
        *,
        connector: Connector,
        clock: Clock,
        bind: str | None,
        on_connected: Callable[[Location], None],
    ) -> None:
        self.location = location
        self.result: Deferred[Upstream] = Deferred()
        self._clock = clock
        self._on_connected = on_connected
        self._wire: MirrorProtocol | None = None
        self._moved: list[Location] = []
        self._timer: DelayedCall | None = None
        self._factory = _AttemptFactory(self, location.export_name)
        destination = Destination(location.host, location.port, bind, location.export_name)
        try:
            connecting = connector(destination, self._factory, CONNECT_TIMEOUT)
        except Exception as exc:  # a bad bind address fails before any Deferred
            self._settle(DialFailed(f"{location}: cannot connect: {exc}"))
            return
        connecting.addErrback(self._not_connected)

    def cancel(self) -> None:
        self._settle(DialFailed(f"{self.location}: given up"))

    # -- WireHandler ---------------------------------------------------------------

    def wire_connected(self, wire: MirrorProtocol) -> None:
        if self.result.called:
            wire.abort()
            return
        self._wire = wire
        self._timer = self._clock.call_later(HELLO_TIMEOUT, self._too_slow)
        self._on_connected(self.location)

    def wire_events(self, wire: MirrorProtocol, events: list[Event]) -> None:
        for event in events:
            if self.result.called:
                return
            if isinstance(event, OptionData):
                self._option_data(event)
            elif isinstance(event, OptionAnswered):
                if event.option == FERRY_OPT_LOCATE and self._moved:
                    self._settle(_Moved(self._moved))
            elif isinstance(event, Negotiated):
                self._settle(Upstream(wire, event, self.location))
            elif isinstance(event, NegotiationFailed):
                why = f"{event.error.name}: {event.message}" if event.message else event.error.name
                self._settle(DialFailed(f"{self.location} refused the export: {why}"))

    def wire_broken(self, wire: MirrorProtocol, reason: str) -> None:
        self._settle(DialFailed(f"{self.location}: protocol error: {reason}"))

    def wire_lost(self, wire: MirrorProtocol, reason: str) -> None:
        self._settle(DialFailed(f"{self.location}: connection lost: {reason}"))

    # -- the rest ----------------------------------------------------------------------

    def _option_data(self, event: OptionData) -> None:
        if event.option != FERRY_OPT_LOCATE or event.reply != FERRY_REP_LOCATION:
            return
        try:
            moved = decode_location(event.payload)
        except ValueError as error:
            _log.warn("{here}: a bad location answer: {error}", here=str(self), error=error)
            return
        # "" is the name asked for.
        name = moved.export_name or self.location.export_name
        self._moved.append(Location(moved.host, moved.port, name))

    def _not_connected(self, failure: Failure) -> None:
        self._settle(DialFailed(f"{self.location}: {failure.getErrorMessage()}"))

    def _too_slow(self) -> None:
        self._timer = None
        self._settle(DialFailed(f"{self.location}: no handshake within {HELLO_TIMEOUT:g} s"))

    def _settle(self, outcome: Upstream | Exception) -> None:
        if self.result.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if isinstance(outcome, Upstream):
            self.result.callback(outcome)
            return
        if self._wire is not None:
            self._wire.abort()
        self.result.errback(outcome)

    def __str__(self) -> str:
        return str(self.location)


class _AttemptFactory(Factory):
    """Builds the one connection of an attempt: ferry's client asking LOCATE first."""

    noisy = False  # one per attempt: "Starting factory" would drown the log

    def __init__(self, attempt: _Attempt, export_name: str) -> None:
        self.attempt = attempt
        self.export_name = export_name

    def buildProtocol(self, addr: Any) -> MirrorProtocol:
        client = ClientConnection(
            self.export_name,
            meta_contexts=(BASE_ALLOCATION,),
            extra_options=[locate_option(self.export_name)],
        )
        protocol = MirrorProtocol(self.attempt, client)
        protocol.factory = self
        return protocol


def tcp_connector(reactor: Any) -> Connector:
    """TCP to the server: an IP address directly, a name through ``HostnameEndpoint``.

    ``HostnameEndpoint`` reports a refused connection only at its next
    happy-eyeballs tick, 0.3 s later: every attempt at a server that is down
    would last that long, and a client's request waiting on it with it.
    """

    def connect(destination: Destination, factory: Factory, timeout: float) -> Deferred[Any]:
        bind = None if destination.bind is None else (destination.bind, 0)
        try:
            version = ipaddress.ip_address(destination.host).version
        except ValueError:
            endpoint: Any = HostnameEndpoint(
                reactor, destination.host, destination.port, timeout=timeout, bindAddress=bind
            )
        else:
            kind = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
            endpoint = kind(
                reactor, destination.host, destination.port, timeout=timeout, bindAddress=bind
            )
        connecting: Deferred[Any] = endpoint.connect(factory)
        return connecting

    return connect


class Dialer:
    """Tries places in turn, following "it moved there", until one negotiates the export."""

    def __init__(self, *, connector: Connector, clock: Clock, bind: str | None = None) -> None:
        self._connector = connector
        self._clock = clock
        self._bind = bind

    def dial(
        self,
        places: list[Location],
        *,
        on_connected: Callable[[Location], None],
        on_redirected: Callable[[list[Location]], None],
    ) -> Dial:
        """Start; the callbacks hear of each connection made and each "it moved" (the trace)."""
        return Dial(self, list(places), on_connected, on_redirected)

    def attempt(self, location: Location, on_connected: Callable[[Location], None]) -> _Attempt:
        return _Attempt(
            location,
            connector=self._connector,
            clock=self._clock,
            bind=self._bind,
            on_connected=on_connected,
        )


class Dial:
    """One dial in progress; ``result`` fires with an :class:`Upstream` or fails with DialFailed."""

    def __init__(
        self,
        dialer: Dialer,
        places: list[Location],
        on_connected: Callable[[Location], None],
        on_redirected: Callable[[list[Location]], None],
    ) -> None:
        self.result: Deferred[Upstream] = Deferred()
        self.redirects: list[Location] = []
        self._dialer = dialer
        self._places = places
        self._on_connected = on_connected
        self._on_redirected = on_redirected
        self._failures: list[str] = []
        self._attempt: _Attempt | None = None
        self._next()

    def cancel(self) -> None:
        """Give up: the attempt in progress is dropped; ``result`` fails."""
        if self.result.called:
            return
        attempt, self._attempt = self._attempt, None
        self.result.errback(DialFailed("given up"))
        if attempt is not None:
            attempt.cancel()

    def _next(self) -> None:
        if self.result.called:
            return
        if not self._places:
            self.result.errback(DialFailed("; ".join(self._failures) or "nowhere to go"))
            return
        location = self._places.pop(0)
        attempt = self._attempt = self._dialer.attempt(location, self._on_connected)
        attempt.result.addCallbacks(self._won, self._lost, errbackArgs=(attempt,))

    def _won(self, upstream: Upstream) -> None:
        if self.result.called:
            upstream.wire.abort()
            return
        self.result.callback(upstream)

    def _lost(self, failure: Failure, attempt: _Attempt) -> None:
        if self.result.called or attempt is not self._attempt:
            return
        moved = failure.value if isinstance(failure.value, _Moved) else None
        if moved is not None and len(self.redirects) < MAX_REDIRECTS:
            locations = moved.locations
            _log.info(
                "{here} says the image is now at {there}",
                here=str(attempt.location),
                there=", ".join(map(str, locations)),
            )
            self.redirects.extend(locations)
            fresh = [place for place in locations if place not in self._places]
            self._places[:0] = fresh
            self._failures.append(f"{attempt.location}: moved to {failure.getErrorMessage()}")
            self._on_redirected(locations)
        elif moved is not None:
            self._failures.append(f"{attempt.location}: moved again; too many redirects")
        else:
            self._failures.append(failure.getErrorMessage())
        self._next()
