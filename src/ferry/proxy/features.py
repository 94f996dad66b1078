"""What the proxy promised its client, and whether the server it reaches now keeps the promise.

A client negotiates once, with the proxy, and is told what the first
server offered: the size, read-only or not, which commands and flags.  It
relies on those for as long as it is connected, across every server the
proxy reaches meanwhile.  So after a reconnection:

* a different size means another image (or one resized under us): the
  proxy refuses to go on with that server, and the requests waiting get EIO;
* a flag the client was promised and the new server lacks fails, with EIO,
  exactly the requests that need it (a FUA write, a TRIM, a write at all
  once the server is read-only); the rest go on;
* ``base:allocation`` and structured replies are the proxy's own: it
  answers BLOCK_STATUS itself (all data, which is always true) when the
  server has no such context, and builds whichever replies its client chose.

Sans-IO: these are functions of the handshake's results and the request.
"""

from __future__ import annotations

from typing import Final

from ferry.nbd.constants import BASE_ALLOCATION, Command, CommandFlag, TransmissionFlag
from ferry.nbd.events import ExportInfo, Negotiated, Request

__all__ = ["block_status_context", "export_info", "refusal", "server_flags", "unsupported"]

#: What each command needs the server to have advertised.
_COMMAND_NEEDS: Final = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Command.CACHE: TransmissionFlag.SEND_CACHE,
}
_WRITING: Final = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_FUA: Final = int(CommandFlag.FUA)
_FAST_ZERO: Final = int(CommandFlag.FAST_ZERO)
_DF: Final = int(CommandFlag.DF)


def export_info(name: str, negotiated: Negotiated) -> ExportInfo:
    """The export the proxy offers its client: the server's, as the server described it."""
    flags = TransmissionFlag(negotiated.transmission_flags)
    return ExportInfo(
        name=name,
        size=negotiated.size,
        read_only=bool(flags & TransmissionFlag.READ_ONLY),
        min_block_size=negotiated.min_block_size,
        preferred_block_size=negotiated.preferred_block_size,
        max_block_size=negotiated.max_block_size,
        advertise=flags,
    )


def refusal(promised: ExportInfo, negotiated: Negotiated) -> str | None:
    """Why the proxy must not go on with this server for a client promised ``promised``."""
    if negotiated.size != promised.size:
        return (
            f"the server's export is {negotiated.size} bytes, not the {promised.size} "
            "the client was given: another image"
        )
    return None


def unsupported(request: Request, promised: int, server: int) -> str | None:
    """Why ``request`` cannot go to a server advertising ``server`` (None: it can).

    Only what the client was ``promised`` counts: a command the client was
    never offered goes to the server as sent, and the server answers it.
    """
    if request.command in _WRITING and server & ~promised & TransmissionFlag.READ_ONLY:
        return "the server is read-only now"
    lost = promised & ~server  # promised, and not there any more
    need = _COMMAND_NEEDS.get(request.command)
    if need is not None and lost & need:
        return f"the server no longer offers {request.command.name}"
    flags = int(request.flags)
    if flags & _FUA and lost & TransmissionFlag.SEND_FUA:
        return "the server no longer offers FUA"
    if flags & _FAST_ZERO and lost & TransmissionFlag.SEND_FAST_ZERO:
        return "the server no longer offers FAST_ZERO"
    return None


def server_flags(request: Request, server: int) -> CommandFlag:
    """The request's flags as the server may see them: DF only if it offers DF.

    DF asks for a read in one piece; the proxy gathers the pieces itself, so
    to a server without DF it is only left out.
    """
    flags = int(request.flags)
    if flags & _DF and not server & TransmissionFlag.SEND_DF:
        return CommandFlag(flags & ~_DF)
    return request.flags


def block_status_context(negotiated: Negotiated) -> int | None:
    """The server's id for ``base:allocation``, or None: the proxy answers BLOCK_STATUS itself."""
    return negotiated.meta_contexts.get(BASE_ALLOCATION)
