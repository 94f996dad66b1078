"""One NBD connection over this process's stdin and stdout: ``ferry listen --stdio``.

The source's ``exec:COMMAND`` transport starts a listener (often through
``ssh``) and speaks the migration's stream over the command's stdin and
stdout.  Here that stream is one more connection of the node's
:class:`~ferry.serve.server.NBDServer`, so the migration is received
exactly as one over TCP is.  Its peer is :data:`~ferry.serve.acl.LOCAL_PEER`:
whoever started this process already had its stdin, and is trusted as a
local sender.  ``on_end`` is told when the stream is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.stdio import StandardIO
from twisted.python.failure import Failure

from ferry.serve.server import NBDServer

__all__ = ["StdioConnection", "serve_stdio"]


class StdioConnection(StandardIO):
    """stdin and stdout as a transport; ``abortConnection`` closes both at once."""

    def __init__(self, protocol: Any, on_end: Callable[[], None], reactor: Any) -> None:
        self._on_end = on_end
        super().__init__(protocol, reactor=reactor)  # type: ignore[no-untyped-call]

    def abortConnection(self) -> None:
        self.loseConnection()  # type: ignore[no-untyped-call]

    def getPeer(self) -> UNIXAddress:
        return UNIXAddress(None)

    def getHost(self) -> UNIXAddress:
        return UNIXAddress(None)

    def connectionLost(self, reason: Failure) -> None:
        ended_before = self.disconnected
        super().connectionLost(reason)  # type: ignore[misc]
        if not ended_before:
            self._on_end()


def serve_stdio(server: NBDServer, on_end: Callable[[], None], reactor: Any) -> StdioConnection:
    """Hand stdin and stdout to ``server`` as one connection; ``on_end`` once it is gone."""
    protocol = server.buildProtocol(UNIXAddress(None))
    if protocol is None:
        raise RuntimeError("the server accepts no connection")
    return StdioConnection(protocol, on_end, reactor)
