"""The new process's side of a takeover: ask, receive, check, commit.

All of it is blocking and runs before the new process's reactor does:
there is nothing else for it to do yet.  :func:`describe` asks the giver
what it serves (nothing is held); :func:`ask` asks for the export itself
and receives the descriptors and the state; :meth:`Taken.commit` says
"ready", hears "yours" and says "serving".  Until :meth:`Taken.commit`
returns, this process must touch none of the sockets it holds, write
nothing and renew nothing: the giver may still take everything back.  On
any failure before then, :meth:`Taken.refuse` says so and closes this
process's copies (a plain close: the giver's keep the sockets alive).

Every descriptor received stays :class:`Taken`'s: whatever keeps one (the
image, the lease, Twisted's adopted ports and connections) keeps a
duplicate, and :meth:`Taken.close` closes the originals at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from ferry.control.client import ControlError, JsonControl, connect
from ferry.faults import pause_point
from ferry.handoff import fdpass
from ferry.takeover import notes
from ferry.takeover.state import Descriptors, TakeoverState, TakeoverStateError

__all__ = ["Taken", "TakeoverError", "ask", "describe"]

#: The longest line a refusal on the control socket may be.
_MAX_ANSWER: Final = 64 * 1024


class TakeoverError(Exception):
    """The takeover did not happen (the old process serves on); one line saying why."""


def describe(path: str, *, timeout: float = notes.STEP_TIMEOUT) -> dict[str, Any]:
    """What the ferry at control socket ``path`` serves (its ``served`` answer)."""
    try:
        with JsonControl(path, timeout=timeout, trusted=True) as control:
            answer = control.call(notes.DESCRIBE)
    except (ControlError, TimeoutError) as error:
        raise TakeoverError(str(error) or f"control socket {path}: no answer in time") from None
    if "error" in answer:
        raise TakeoverError(f"control socket {path}: {answer['error'].get('message')}")
    result = answer.get("result")
    if not isinstance(result, dict):
        raise TakeoverError(f"control socket {path}: unexpected answer {answer!r:.200}")
    return result


@dataclass
class Taken:
    """What arrived: the state, the descriptors by what they are, and the connection."""

    sock: socket.socket
    state: TakeoverState
    fds: Descriptors
    asked_at: float
    """This process's clock when it asked: the lease's remaining time counts from here."""

    def commit(self) -> None:
        """Say "ready"; on "yours", say "serving": everything is this process's from then.

        :class:`TakeoverError` if the giver says no or goes away instead
        (it serves on; nothing here touched anything).
        """
        try:
            fdpass.send_note(self.sock, notes.READY, timeout=notes.STEP_TIMEOUT)
            kind, text = fdpass.receive_note(self.sock, timeout=notes.STEP_TIMEOUT)
        except fdpass.FdPassError as error:
            raise TakeoverError(f"the old process did not hand the export over: {error}") from None
        if kind != notes.YOURS:
            raise TakeoverError(f"the old process said no: {text or 'no reason given'}")
        pause_point("takeover_committed")
        # If the giver is gone by now it cannot serve either: this process does.
        with contextlib.suppress(fdpass.FdPassError):
            fdpass.send_note(self.sock, notes.SERVING, timeout=notes.STEP_TIMEOUT)

    def refuse(self, why: str) -> None:
        """Tell the giver no (it serves on), and close everything received."""
        with contextlib.suppress(fdpass.FdPassError, OSError):
            fdpass.send_note(self.sock, notes.NO, why, timeout=notes.STEP_TIMEOUT)
        self.close()

    def close(self) -> None:
        """Close this process's originals of the descriptors, and the connection."""
        for fd in self.fds.all():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()


def ask(
    path: str,
    *,
    now: Callable[[], float],
    formats: Collection[int],
    timeout: float = notes.ASK_TIMEOUT,
) -> Taken:
    """Ask the ferry at control socket ``path`` for its export; receive it, or why not.

    ``formats`` are the state formats this process reads: an offer in
    another is refused before anything moves.
    """
    try:
        sock = connect(path, timeout, trusted=True)
    except ControlError as error:
        raise TakeoverError(str(error)) from None
    except OSError as error:
        raise TakeoverError(f"control socket {path}: {error.strerror or error}") from None
    try:
        asked_at = now()
        request = {"id": 1, "method": notes.REQUEST, "params": {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        _refusal(sock, path)
        received = fdpass.receive_descriptors(sock, formats=formats, timeout=timeout)
    except fdpass.Refused as refused:
        sock.close()
        raise TakeoverError(
            f"the old process's state cannot be read here: {refused}; the old process serves on"
        ) from None
    except (fdpass.FdPassError, OSError) as error:
        sock.close()
        raise TakeoverError(f"control socket {path}: {error}") from None
    except BaseException:
        sock.close()
        raise
    try:
        state = TakeoverState.from_bytes(received.state)
        fds = state.split(received.fds)
    except TakeoverStateError as error:
        for fd in received.fds:
            os.close(fd)
        with contextlib.suppress(fdpass.FdPassError, OSError):
            fdpass.send_note(sock, notes.NO, str(error), timeout=notes.STEP_TIMEOUT)
        sock.close()
        raise TakeoverError(f"the old process's state: {error}") from None
    taken = Taken(sock, state, fds, asked_at)
    pause_point("takeover_received")
    return taken


def _refusal(sock: socket.socket, path: str) -> None:
    """A JSON answer instead of the offer is a refusal: raise it (nothing was held)."""
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise TakeoverError(f"control socket {path}: closed without an answer")
    if first != b"{":
        return
    line = b""
    while not line.endswith(b"\n") and len(line) < _MAX_ANSWER:
        chunk = sock.recv(_MAX_ANSWER)
        if not chunk:
            break
        line += chunk
    try:
        answer = json.loads(line)
        message = answer["error"]["message"]
    except (ValueError, KeyError, TypeError):
        raise TakeoverError(f"control socket {path}: unexpected answer {line[:200]!r}") from None
    raise TakeoverError(f"the old process refused: {message}")
