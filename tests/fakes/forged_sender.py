"""A migration sender scripted by hand, as an attacker on the network would write one.

It speaks ferry's migration extension with ferry's own sans-IO client over
a blocking socket: ``FERRY_OPT_MIGRATE`` naming whatever lease it likes
(or none), GO, a few WRITEs, then ``FERRY_CMD_COMMIT`` with any token.  A
real source (``ferry mirror``) does the same in order; this one lies.
Every step has a deadline: a listener that stops answering fails the test
with ``TimeoutError`` instead of hanging it.  With ``tls`` (an
``ssl.SSLContext``, whatever certificate the attacker has) it asks for
STARTTLS first and carries on over TLS.
"""

from __future__ import annotations

import socket
import ssl

from ferry.migrate.wire import migrate_option
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import Command
from ferry.nbd.events import (
    Event,
    Negotiated,
    NegotiationFailed,
    OptionAnswered,
    Reply,
    StartTLS,
)

__all__ = ["ForgedSender"]


class ForgedSender:
    """One connection to a ``ferry listen`` that claims to be a migration source."""

    def __init__(
        self,
        port: int,
        size: int,
        *,
        resource: str = "",
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.tls = tls
        self.conn = ClientConnection(
            "", meta_contexts=(), extra_options=[migrate_option(size, resource)], tls=bool(tls)
        )
        self.option: OptionAnswered | None = None
        self.negotiated: Negotiated | None = None
        self.refused: NegotiationFailed | None = None
        self.replies: dict[int, Reply] = {}
        while self.negotiated is None and self.refused is None:
            self._step()

    def write(self, offset: int, data: bytes) -> Reply:
        return self._wait(self.conn.request(Command.WRITE, offset, data=data))

    def commit(self, token: int) -> Reply:
        return self._wait(self.conn.commit(token))

    def close(self) -> None:
        self.sock.close()

    def _wait(self, handle: int) -> Reply:
        while handle not in self.replies:
            self._step()
        return self.replies.pop(handle)

    def _step(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the listener closed the connection")
        for event in self.conn.receive_data(data):
            self._note(event)

    def _note(self, event: Event) -> None:
        if isinstance(event, StartTLS):
            assert self.tls is not None
            self.sock = self.tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
            self.conn.tls_started()
        elif isinstance(event, OptionAnswered):
            self.option = event
        elif isinstance(event, Negotiated):
            self.negotiated = event
        elif isinstance(event, NegotiationFailed):
            self.refused = event
        elif isinstance(event, Reply):
            self.replies[event.handle] = event
