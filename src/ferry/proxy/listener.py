"""The proxy's listening side: one session per client connection, and what they add up to.

:class:`ProxyServer` is the Twisted factory behind the client-facing port
(TCP, or a Unix socket with ``--sock``) and the host every
:class:`~ferry.proxy.session.ProxySession` asks for its clock, its tracer,
the way to the server and its limits (it is their
:class:`~ferry.proxy.session.SessionHost`).  It keeps the sessions that are
open and the counters they add to (:class:`~ferry.proxy.stats.ProxyStats`), which the status line
and ``/metrics`` render (:mod:`ferry.proxy.status`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ferry.clock import Clock
from ferry.proxy.finder import Finder
from ferry.proxy.session import ProxySession
from ferry.proxy.stats import ProxyStats
from ferry.proxy.upstream import Dialer
from ferry.trace import Tracer

__all__ = ["DEFAULT_MAX_WAIT", "ProxyServer"]

log = Logger()

#: How long a client's requests wait for a server before they get EIO (--max-wait).
DEFAULT_MAX_WAIT: Final = 60.0
#: Client connections served at once; more are closed as soon as they are accepted.
MAX_CLIENTS: Final = 256


class ProxyServer(Factory):
    """Builds a :class:`ProxySession` for each client, within ``max_clients``."""

    def __init__(
        self,
        *,
        export_name: str,
        finder: Finder,
        dialer: Dialer,
        clock: Clock,
        tracer: Tracer | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        if not max_wait > 0:
            raise ValueError(f"max_wait must be positive, not {max_wait}")
        self.export_name = export_name
        self.finder = finder
        self.dialer = dialer
        self.clock = clock
        self.tracer = tracer
        self.max_wait = max_wait
        self.max_clients = max_clients
        self.stats = ProxyStats()
        self.sessions: set[ProxySession] = set()
        self.accepting = True
        self._numbered = 0

    def buildProtocol(self, addr: IAddress | None) -> ProxySession | None:
        if not self.accepting:
            return None
        if len(self.sessions) >= self.max_clients:
            log.warn("refusing a client: {n} connected already", n=len(self.sessions))
            return None
        self._numbered += 1
        return ProxySession(self, self._numbered)

    def session_opened(self, session: ProxySession) -> None:
        self.sessions.add(session)
        self.stats.connections += 1

    def session_closed(self, session: ProxySession) -> None:
        self.sessions.discard(session)

    def states(self) -> Counter[str]:
        """How many sessions are in each state of ``statecharts/proxy.yaml``."""
        return Counter(session.state for session in self.sessions)

    def drain(self) -> defer.Deferred[Any]:
        """Stop accepting; let every session finish what it has, then close it."""
        self.accepting = False
        return defer.DeferredList([session.drain() for session in list(self.sessions)])
