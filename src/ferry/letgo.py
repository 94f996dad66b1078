"""Let go of a socket another process holds too: no packet, no shutdown, no reset.

After a takeover on this host the new process holds the very same kernel
sockets as the old one: SCM_RIGHTS duplicates descriptors, not sockets.
The old process must drop its descriptors and do nothing else to the
sockets.  Twisted's ways of closing are all wrong here: ``shutdown()``
(a port's and a connection's orderly close) ends the socket for every
process that holds it -- a listening socket stops listening, a
connection sends FIN -- and an abort sets ``SO_LINGER`` to zero on the
socket, so that the *last* close, the new process's one day, would be a
reset.  And a Unix port's end unlinks its path, which the new process
serves.

:func:`let_go` takes a Twisted transport or port out of the reactor,
detaches its Python socket (any later close, shutdown or option on it is a
harmless error on a closed object) and closes the bare descriptor.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["let_go"]


def let_go(selectable: Any) -> None:
    """Drop this process's descriptor of ``selectable``'s socket; nothing else happens to it.

    ``selectable`` is a Twisted ``FileDescriptor`` with a ``socket``: a
    ``tcp.Server`` connection, or a ``tcp.Port`` / ``unix.Port``.  A
    connection's protocol still needs its ``connectionLost``; the caller
    decides when (see ``NBDServerProtocol.handed_on``).
    """
    selectable.stopReading()
    selectable.stopWriting()
    sock = getattr(selectable, "socket", None)
    if sock is None:
        return
    fd = sock.detach()
    if fd >= 0:
        os.close(fd)
