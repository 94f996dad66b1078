"""One client connection of the proxy, and the server connection it has at each moment.

The client side is ferry's sans-IO server (:class:`~ferry.nbd.server.ServerConnection`)
on the client's transport; the server side is ferry's sans-IO client on a
:class:`~ferry.migrate.wire.MirrorProtocol`, one per server reached.  Between
them sits the client's :class:`~ferry.proxy.book.RequestBook`, and the
session's machine (``statecharts/proxy.yaml``), whose state says what a
request the client sends now becomes: forwarded, held, or failed.

Invariants:

* Every request the client sends gets exactly one reply while the client is
  connected: the server's (turned into the reply form the client chose), or
  the proxy's own (EIO when it gave up waiting or the new server lacks what
  the request needs; an all-data extent for a BLOCK_STATUS the server cannot
  answer; the parser's error for a request it rejected).
* A request is in flight on at most one server connection.  When that
  connection goes, every request it had not answered is sent again, once a
  server is negotiated, in the order the client sent them; no two requests
  that overlap (one of them writing) are in flight together (the book).
* The client is greeted only once the first server is negotiated: the
  export it is offered is that server's (size, flags, block sizes), and a
  later server must have the same size (``features.refusal``).
* A server's ESHUTDOWN is not an answer for the client: the server is going
  away, and the request goes to the next one.
* Reading from the client stops while the book holds :data:`MAX_OUTSTANDING`
  requests or :data:`MAX_OUTSTANDING_BYTES` of data, and reading replies from
  the server stops while the client's transport asks us to pause: a client
  that sends without reading, or a server that goes away, cannot make the
  proxy buffer without bound.
* Every timer (the hello, the retry, ``--max-wait``) is on the injected clock.
"""

from __future__ import annotations

from typing import Any, Final
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ferry import statecharts
from ferry.chartnames import ProxyState, ProxyTrigger
from ferry.clock import Clock, DelayedCall
from ferry.migrate.core.backoff import Backoff
from ferry.migrate.wire import MirrorProtocol
from ferry.nbd.constants import (
    BlockState,
    Command,
    CommandFlag,
    Errno,
    OptionReply,
    TransmissionFlag,
)
from ferry.nbd.events import (
    Disconnect,
    Event,
    ExportInfo,
    Extent,
    HandshakeAborted,
    HandshakeComplete,
    ProtocolError,
    Refusal,
    RejectedRequest,
    Reply,
    Request,
)
from ferry.nbd.locate import Location
from ferry.nbd.server import ServerConnection
from ferry.outbox import Outbox, tune
from ferry.proxy import features
from ferry.proxy.book import Pending, RequestBook
from ferry.proxy.finder import Finder
from ferry.proxy.stats import ProxyStats
from ferry.proxy.upstream import Dial, Dialer, Upstream
from ferry.trace import Tracer

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_OUTSTANDING",
    "MAX_OUTSTANDING_BYTES",
    "ProxySession",
    "SessionHost",
]

log = Logger()

#: A client has this long after its greeting to finish the handshake.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Stop reading from the client while this many requests, or bytes of their
#: data and answers, are not answered yet; read again below half of each.
MAX_OUTSTANDING: Final = 4096
MAX_OUTSTANDING_BYTES: Final = 64 * 1024 * 1024
#: The delays between attempts to reach a server (the first comes at once).
RETRY_INITIAL: Final = 0.1
RETRY_MAX: Final = 5.0

_FORWARD: Final = "forward"
_HOLD: Final = "hold"
_FAIL: Final = "fail"
_READ: Final = Command.READ
_BLOCK_STATUS: Final = Command.BLOCK_STATUS
_OK: Final = Errno.OK
_DF: Final = int(CommandFlag.DF)
_SEND_DF: Final = int(TransmissionFlag.SEND_DF)
_READ_ONLY: Final = int(TransmissionFlag.READ_ONLY)


class SessionHost(TypingProtocol):
    """What a session needs of the listener that made it (``ProxyServer`` is one).

    Where to look for the image and how to reach it, the clock and tracer,
    the wait before requests fail, the counters every session adds to; the
    session reports itself opened and closed.
    """

    export_name: str
    finder: Finder
    dialer: Dialer
    clock: Clock
    tracer: Tracer | None
    max_wait: float
    stats: ProxyStats

    def session_opened(self, session: ProxySession) -> None: ...

    def session_closed(self, session: ProxySession) -> None: ...


class _Link:
    """The model the proxy machine drives; ``transitions`` adds ``state`` and the triggers."""

    state: str


@implementer(IPushProducer)
class ProxySession(Protocol):
    """One client connection; see the module doc."""

    def __init__(self, host: SessionHost, number: int) -> None:
        self._host = host
        self._clock = host.clock
        self.name = f"client-{number}"
        self._chart = statecharts.load("proxy")
        self._link = _Link()
        statecharts.build(
            self._chart, self._link, instance=self.name, tracer=host.tracer, clock=host.clock
        )
        self._mode = self._chart.property(self._link.state, "requests")
        self.book = RequestBook()
        self.peer = ""
        self._nbd: ServerConnection | None = None
        self._outbox: Outbox | None = None
        self._promised: ExportInfo | None = None
        self._client_context = 0  # the id the client's base:allocation has with us
        self._upstream: Upstream | None = None
        self._server_name = ""  # the export's name as the first server gave it
        self._server_flags = 0
        self._promised_flags = 0
        self._checked = False  # requests must pass features.unsupported
        self._strip_df = False  # the server has no DF: leave the flag out
        self._server_context: int | None = None
        self._dial: Dial | None = None
        self._last_good: Location | None = None
        self._backoff = Backoff(RETRY_INITIAL, RETRY_MAX)
        self._retry_timer: DelayedCall | None = None
        self._wait_timer: DelayedCall | None = None
        self._handshake_timer: DelayedCall | None = None
        self._closing = False  # the client sent DISC, or the proxy is draining
        self._gone = False  # the client's connection is lost
        self._reading_paused = False  # we stopped reading the client (the book is full)
        self._replies_paused = False  # the client's transport asked us to pause
        self._drained: list[defer.Deferred[None]] = []
        self._pump_pending = False
        # Per session, for logs and tests; the host's stats add them all up.
        self.reconnects = 0
        self.replayed = 0

    @property
    def state(self) -> str:
        return self._link.state

    @property
    def upstream(self) -> Location | None:
        return None if self._upstream is None else self._upstream.location

    # -- the machine ------------------------------------------------------------

    def _fire(self, trigger: ProxyTrigger) -> None:
        machine: Any = self._link
        machine.trigger(trigger)
        self._mode = self._chart.property(self._link.state, "requests")

    # -- the client's connection -------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = _peer(self.transport)
        self._host.session_opened(self)
        tune(self.transport)
        self._outbox = Outbox(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        log.info("{session}: {peer} connected", session=self.name, peer=self.peer)
        # No greeting before the server's: the client is told its size and flags.
        self._wait_timer = self._clock.call_later(self._host.max_wait, self._waited_too_long)
        self._dial_now()

    def dataReceived(self, data: bytes) -> None:
        nbd = self._nbd
        if nbd is None or self._gone:
            return  # nothing may come before the greeting; nothing after the end
        try:
            events = nbd.receive_data(data)
        except ProtocolError as error:
            log.warn(
                "{session}: closing {peer}: {error}", session=self.name, peer=self.peer, error=error
            )
            self._abort_client()
            return
        self._flush_handshake()
        for event in events:
            self._client_event(event)
        self._pump_soon()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        if self._outbox is not None:
            self._outbox.discard()
        for timer in (self._retry_timer, self._wait_timer, self._handshake_timer):
            _cancel(timer)
        self._retry_timer = self._wait_timer = self._handshake_timer = None
        if self._dial is not None:
            dial, self._dial = self._dial, None
            dial.cancel()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            if self.book.in_flight:
                upstream.wire.abort()
            else:
                upstream.wire.disconnect()
        self.book.fail_all(self._clock.seconds())
        if self.state != ProxyState.CLOSED:
            self._fire(ProxyTrigger.CLOSE)
        log.info("{session}: {peer} went away", session=self.name, peer=self.peer)
        self._host.session_closed(self)
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    # -- IPushProducer: the client's transport is full ----------------------------

    def pauseProducing(self) -> None:
        self._replies_paused = True
        self._pause_upstream(True)

    def resumeProducing(self) -> None:
        self._replies_paused = False
        self._pause_upstream(False)

    def stopProducing(self) -> None:
        self._abort_client()

    def drain(self) -> defer.Deferred[None]:
        """Read nothing more; close once every request received has its answer."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._gone:
            d.callback(None)
            return d
        self._drained.append(d)
        self._closing = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._maybe_close()
        return d

    # -- ExportCatalog: what the client's handshake finds -----------------------------

    def lookup(self, name: str) -> ExportInfo | Refusal:
        promised = self._promised
        assert promised is not None  # the handshake starts once it is known
        if name not in ("", promised.name, self._server_name):
            return Refusal(
                OptionReply.ERR_UNKNOWN,
                f"this proxy serves {promised.name!r} (or the default export), not {name!r}",
            )
        return promised

    def listing(self) -> list[ExportInfo]:
        return [] if self._promised is None else [self._promised]

    # -- what the client sends ---------------------------------------------------------

    def _client_event(self, event: Event) -> None:
        kind = type(event)
        if kind is Request:
            self._accept(event)  # type: ignore[arg-type]
        elif kind is RejectedRequest:
            rejected: RejectedRequest = event  # type: ignore[assignment]
            self._count_reply(rejected.error)
            self._send(self._client().reply_error(rejected.handle, rejected.error, rejected.reason))
        elif kind is HandshakeComplete:
            complete: HandshakeComplete = event  # type: ignore[assignment]
            _cancel(self._handshake_timer)
            self._handshake_timer = None
            self._client_context = next(iter(complete.meta_contexts), 0)
            log.info(
                "{session}: {peer} negotiated {name!r}",
                session=self.name,
                peer=self.peer,
                name=complete.export.name,
            )
        elif kind is Disconnect:
            self._closing = True
        elif kind is HandshakeAborted:
            self._lose_client()

    def _accept(self, request: Request) -> None:
        if self.state == ProxyState.FAILED:
            # The proxy gave up waiting; the client asks again: try now, and
            # let this request wait for that one attempt.
            _cancel(self._retry_timer)
            self._retry()
        mode = self._mode
        now = self._clock.seconds()
        if mode == _FAIL:
            self._count_reply(Errno.EIO, expired=True)
            self._send(self._client().reply_error(request.handle, Errno.EIO, self._why_failing()))
            return
        self.book.add(request, now, held=mode == _HOLD)
        if mode == _HOLD:
            self._arm_wait()
        if len(self.book) >= MAX_OUTSTANDING or self.book.weight >= MAX_OUTSTANDING_BYTES:
            self._pause_reading(True)

    def _why_failing(self) -> str:
        return f"no server for this export within {self._host.max_wait:g} s"

    # -- sending to the server ---------------------------------------------------------

    def _pump_soon(self) -> None:
        """Pump once the reactor has handled every socket that is ready now.

        A client that sends its requests one ``send`` at a time (libnbd
        does, and so fio) would otherwise cost one ``sendmsg`` to the
        server per request, and the server one wake-up per request: the
        requests and replies of one reactor iteration go out together.
        """
        if not self._pump_pending:
            self._pump_pending = True
            self._clock.call_later(0, self._pump)

    def _pump(self) -> None:
        """Send what may go now, flush both ways, and close if the client is done."""
        self._pump_pending = False
        upstream = self._upstream
        book = self.book
        if (
            upstream is not None
            and book.has_ready()
            and self._mode == _FORWARD
            and not upstream.wire.closing
        ):
            wire = upstream.wire
            request_upstream = wire.client.request
            checked = self._checked
            strip_df = self._strip_df
            sent = book.sent
            for pending in book.take_ready():
                request = pending.request
                if checked:
                    why = features.unsupported(request, self._promised_flags, self._server_flags)
                    if why is not None:
                        self._finish_locally(pending, Errno.EIO, why)
                        continue
                if request.command is _BLOCK_STATUS and self._server_context is None:
                    self._finish_locally(pending, _OK, "")
                    continue
                flags = request.flags
                if strip_df and flags & _DF:
                    flags = features.server_flags(request, self._server_flags)
                handle = request_upstream(
                    request.command, request.offset, request.length, flags=flags, data=request.data
                )
                sent(pending, handle)
                if pending.sent > 1:
                    self.replayed += 1
                    self._host.stats.requests_replayed += 1
            wire.flush()
        if self._outbox is not None and not self._gone:
            self._outbox.flush()
        if self._reading_paused and (
            len(book) < MAX_OUTSTANDING // 2 and book.weight < MAX_OUTSTANDING_BYTES // 2
        ):
            self._pause_reading(False)
        if self._closing:
            self._maybe_close()

    def _finish_locally(self, pending: Pending, error: Errno, why: str) -> None:
        """Answer ``pending`` from the proxy: an error, or BLOCK_STATUS as all data."""
        request = pending.request
        self.book.finish(pending, self._clock.seconds())
        self._count_reply(error)
        nbd = self._client()
        if error is not _OK:
            self._send(nbd.reply_error(request.handle, error, why))
            return
        extents = [Extent(request.length, BlockState.DATA)]
        self._send(nbd.reply_block_status(request.handle, self._client_context, extents))

    # -- WireHandler: the server's side ------------------------------------------------------

    def wire_connected(self, wire: MirrorProtocol) -> None:
        pass  # the dialer's business until it hands the connection over

    def wire_events(self, wire: MirrorProtocol, events: list[Event]) -> None:
        upstream = self._upstream
        if upstream is None or wire is not upstream.wire:
            return
        now = self._clock.seconds()
        book = self.book
        for event in events:
            if type(event) is not Reply:
                continue
            reply = event
            if reply.error is Errno.ESHUTDOWN:
                # Not an answer: the server is going away.  What it had not
                # answered, this request included, goes to the next one.
                log.info("{session}: the server is shutting down", session=self.name)
                wire.abort()
                break
            pending = book.answered(reply.handle, now)
            if pending is not None and not self._gone:
                self._answer(pending, reply)
        if self._mode == _FORWARD and self.state == ProxyState.REPLAYING and not book.held:
            self._replayed()
        self._pump_soon()

    def wire_broken(self, wire: MirrorProtocol, reason: str) -> None:
        self._upstream_gone(wire, f"protocol error: {reason}")

    def wire_lost(self, wire: MirrorProtocol, reason: str) -> None:
        self._upstream_gone(wire, reason)

    def _answer(self, pending: Pending, reply: Reply) -> None:
        request = pending.request
        nbd = self._client()
        outbox = self._outbox
        assert outbox is not None
        self._count_reply(reply.error)
        if reply.error is not _OK:
            outbox.add(nbd.reply_error(request.handle, reply.error, reply.message))
        elif request.command is _READ:
            outbox.add_all(nbd.reply_read(request.handle, request.offset, reply.data))
        elif request.command is _BLOCK_STATUS:
            extents = reply.extents.get(self._server_context or 0) or (
                Extent(request.length, BlockState.DATA),
            )
            outbox.add(nbd.reply_block_status(request.handle, self._client_context, extents))
        else:
            outbox.add(nbd.reply_ok(request.handle))

    # -- losing the server, and finding it again -----------------------------------------------

    def _upstream_gone(self, wire: MirrorProtocol, reason: str) -> None:
        upstream = self._upstream
        if upstream is None or wire is not upstream.wire:
            return
        self._upstream = None
        if self._gone:
            return
        if self._closing and not self.book:
            self._lose_client()  # the client said goodbye; the server went with it
            return
        now = self._clock.seconds()
        resend = self.book.lost(now)
        log.warn(
            "{session}: lost the server at {where} ({reason}); holding {n} request(s), "
            "{resend} of them to send again",
            session=self.name,
            where=str(upstream.location),
            reason=reason,
            n=len(self.book),
            resend=resend,
        )
        self._fire(ProxyTrigger.LOST)
        self._arm_wait()
        self._backoff.reset()
        self._retry_timer = self._clock.call_later(0, self._retry)

    def _dial_now(self) -> None:
        """Ask the finder where to look, then try those places (the last good one first)."""
        d = self._host.finder.locations()

        def go(found: list[Location]) -> None:
            if (
                self._gone
                or self._dial is not None
                or self.state in (ProxyState.CONNECTED, ProxyState.REPLAYING)
            ):
                return
            first = [] if self._last_good is None else [self._last_good]
            places = first + [place for place in found if place not in first]
            dial = self._dial = self._host.dialer.dial(
                places, on_connected=self._dialed, on_redirected=self._redirected
            )
            dial.result.addCallbacks(
                self._reached, self._unreached, callbackArgs=(dial,), errbackArgs=(dial,)
            )

        def nowhere(failure: Failure) -> None:
            log.failure("{session}: cannot ask where the server is", failure, session=self.name)
            self._attempt_failed("cannot ask where the server is")

        d.addCallbacks(go, nowhere)

    def _dialed(self, location: Location) -> None:
        if not self._gone:
            self._fire(ProxyTrigger.DIALED)

    def _redirected(self, locations: list[Location]) -> None:
        if not self._gone:
            self._fire(ProxyTrigger.REDIRECTED)

    def _reached(self, upstream: Upstream, dial: Dial) -> None:
        if dial is not self._dial or self._gone:
            upstream.wire.abort()
            return
        self._dial = None
        negotiated = upstream.negotiated
        if self._promised is None:
            self._promised = features.export_info(self._host.export_name, negotiated)
            self._server_name = negotiated.export_name
            self._take(upstream)
            self._fire(ProxyTrigger.NEGOTIATED)
            _cancel(self._wait_timer)
            self._wait_timer = None
            self._greet()
            return
        why = features.refusal(self._promised, negotiated)
        if why is not None:
            log.error(
                "{session}: {where} will not do: {why}; its requests get EIO",
                session=self.name,
                where=str(upstream.location),
                why=why,
            )
            upstream.wire.disconnect()
            self._fire(ProxyTrigger.MISMATCH)
            self._give_up(why)
            return
        self._take(upstream)
        self.reconnects += 1
        self._host.stats.reconnects += 1
        log.info(
            "{session}: reached the server at {where}; sending the {n} request(s) held",
            session=self.name,
            where=str(upstream.location),
            n=len(self.book),
        )
        self._fire(ProxyTrigger.NEGOTIATED)
        _cancel(self._wait_timer)
        self._wait_timer = None
        self._pump()
        if self.state == ProxyState.REPLAYING and not self.book.held:
            self._replayed()

    def _unreached(self, failure: Failure, dial: Dial) -> None:
        if dial is not self._dial:
            return
        self._dial = None
        self._attempt_failed(failure.getErrorMessage())

    def _attempt_failed(self, why: str) -> None:
        if self._gone:
            return
        self._fire(ProxyTrigger.ATTEMPT_FAILED)
        if self.state == ProxyState.FAILED:  # the one attempt from failed: what waited for it fails
            self._give_up(f"no server for this export: {why}")
            return
        delay = self._backoff.next_delay()
        log.info(
            "{session}: no server ({why}); trying again in {delay:g} s",
            session=self.name,
            why=why,
            delay=delay,
        )
        self._retry_timer = self._clock.call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if self._gone or self._dial is not None:
            return
        state = self.state
        if state == ProxyState.UPSTREAM_LOST:
            self._fire(ProxyTrigger.RECONNECT)
        elif state == ProxyState.FAILED:
            self._fire(ProxyTrigger.RETRY)
        elif state != ProxyState.ACCEPTED:
            return
        self._dial_now()

    def _take(self, upstream: Upstream) -> None:
        self._upstream = upstream
        upstream.wire.handler = self
        self._server_flags = flags = upstream.negotiated.transmission_flags
        assert self._promised is not None and self._promised.advertise is not None
        self._promised_flags = promised = int(self._promised.advertise)
        # Only a server that lacks something the client was promised needs
        # each request checked (features.unsupported); the first never does.
        self._checked = bool(promised & ~flags or flags & ~promised & _READ_ONLY)
        self._strip_df = not flags & _SEND_DF
        self._server_context = features.block_status_context(upstream.negotiated)
        self._last_good = upstream.location
        self._host.stats.upstream = str(upstream.location)
        self._backoff.reset()
        if self._replies_paused:
            self._pause_upstream(True)

    def _replayed(self) -> None:
        self._fire(ProxyTrigger.REPLAYED)
        self._host.stats.pause(self.book.longest_pause)
        log.info(
            "{session}: every request held is answered; longest wait {pause:.3f} s",
            session=self.name,
            pause=self.book.longest_pause,
        )

    # -- max-wait -----------------------------------------------------------------------------

    def _arm_wait(self) -> None:
        """Time the oldest held request's wait; at ``max_wait`` everything held gets EIO."""
        if self._wait_timer is not None and self._wait_timer.active():
            return
        oldest = self.book.oldest_hold()
        if oldest is None:
            return
        delay = max(0.0, oldest + self._host.max_wait - self._clock.seconds())
        self._wait_timer = self._clock.call_later(delay, self._waited_too_long)

    def _waited_too_long(self) -> None:
        self._wait_timer = None
        if self._gone:
            return
        if self.state == ProxyState.ACCEPTED:
            log.error(
                "{session}: no server within {wait:g} s; disconnecting {peer}",
                session=self.name,
                wait=self._host.max_wait,
                peer=self.peer,
            )
            self._abort_client()
            return
        if self._mode != _HOLD or self.state == ProxyState.RETRYING:
            return  # in retrying, the attempt's own time-outs bound the wait
        if self._dial is not None:
            dial, self._dial = self._dial, None
            dial.cancel()
        _cancel(self._retry_timer)
        self._retry_timer = None
        log.error(
            "{session}: no server within {wait:g} s: {n} request(s) get EIO",
            session=self.name,
            wait=self._host.max_wait,
            n=len(self.book),
        )
        self._fire(ProxyTrigger.GIVE_UP)
        self._give_up(self._why_failing())

    def _give_up(self, why: str) -> None:
        """Fail every request not answered (EIO); keep trying for a server, for what comes next."""
        _cancel(self._wait_timer)
        self._wait_timer = None
        now = self._clock.seconds()
        for pending in self.book.fail_all(now):
            self._count_reply(Errno.EIO, expired=True)
            self._send(self._client().reply_error(pending.request.handle, Errno.EIO, why))
        self._host.stats.pause(self.book.longest_pause)
        _cancel(self._retry_timer)
        self._retry_timer = self._clock.call_later(self._backoff.next_delay(), self._retry)
        self._pump()

    # -- plumbing ------------------------------------------------------------------------------

    def _greet(self) -> None:
        self._nbd = ServerConnection(self)
        self._flush_handshake()
        self._handshake_timer = self._clock.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        log.info(
            "{session}: closing {peer}: no handshake in time", session=self.name, peer=self.peer
        )
        self._abort_client()

    def _client(self) -> ServerConnection:
        assert self._nbd is not None
        return self._nbd

    def _flush_handshake(self) -> None:
        if self._nbd is not None and self._outbox is not None:
            out = self._nbd.data_to_send()
            if out:
                self._outbox.add(out)
                self._outbox.flush()

    def _send(self, reply: bytes) -> None:
        if self._outbox is not None and not self._gone:
            self._outbox.add(reply)

    def _count_reply(self, error: Errno, *, expired: bool = False) -> None:
        stats = self._host.stats
        stats.requests += 1
        if error is not _OK:
            stats.errors[error.name] += 1
            if expired:
                stats.requests_expired += 1

    def _pause_reading(self, pause: bool) -> None:
        self._reading_paused = pause
        transport: Any = self.transport
        if transport is None or self._gone:
            return
        if pause:
            transport.pauseProducing()
        elif not self._closing:
            transport.resumeProducing()

    def _pause_upstream(self, pause: bool) -> None:
        upstream = self._upstream
        transport: Any = None if upstream is None else upstream.wire.transport
        if transport is None:
            return
        if pause:
            transport.pauseProducing()
        else:
            transport.resumeProducing()

    def _maybe_close(self) -> None:
        if self._closing and not self.book and not self._gone:
            self._lose_client()

    def _lose_client(self) -> None:
        if self.transport is not None:
            if self._outbox is not None:
                self._outbox.flush()
            self.transport.loseConnection()

    def _abort_client(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def _cancel(timer: DelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()


def _peer(transport: Any) -> str:
    address = transport.getPeer() if transport is not None else None
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) or "a client"
    return f"{host}:{getattr(address, 'port', '')}"
