"""Clients of the control socket, for the CLI and for scripts.

``line_command`` speaks flexnbd's form (one command, one reply line);
:class:`JsonControl` keeps one JSON-lines connection open, which
``ferry mirror --wait`` needs: it asks for progress while a ``wait``
request is outstanding, and the answer to ``wait`` is how the job ended.
``ferry events`` subscribes on one and reads notifications until the end.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from ferry.safepath import UnsafePath, open_trusted_path

# How often ``follow`` asks for progress: often enough to watch, rarely
# enough not to matter to the server.
PROGRESS_INTERVAL: Final = 0.5


class ControlError(Exception):
    """The control socket could not be reached or answered nonsense; one clear line."""


@dataclass(frozen=True)
class StreamEnd:
    """How the server ended an event stream (its ``end`` notification)."""

    reason: str
    complete: bool
    """True if every event up to the end was sent (a shutdown), false if some were dropped."""


_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


def check_server(conn: socket.socket, path: str) -> None:
    """Refuse a server that is neither this user nor root, before a byte is sent to it.

    A socket someone planted at a path in a shared directory would answer
    ``status`` with a forged line and be sent ``acl`` or ``mirror``: the
    kernel says who is listening (SO_PEERCRED), and only ferry's own user,
    or root, is believed.
    """
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _, uid, _ = _PEERCRED.unpack(raw)
    if uid not in (os.geteuid(), 0):
        conn.close()
        raise ControlError(
            f"control socket {path}: the server there runs as uid {uid}, "
            "neither this user nor root: refusing to talk to it"
        )


def connect(path: str, timeout: float | None, *, trusted: bool = False) -> socket.socket:
    """A connection to the control socket at ``path``, its server checked (:func:`check_server`).

    A path that is something other than a socket is said to be so, rather
    than "Connection refused".  ``trusted``: the path is resolved without
    following anyone else's symlink, and connected to through the socket
    file's own descriptor (:func:`ferry.safepath.open_trusted_path`), for a
    takeover, which hands the server's every descriptor over.
    """
    found: int | None = None
    try:
        if trusted:
            found = open_trusted_path(path, "control socket")
            info = os.fstat(found)
        else:
            info = os.stat(path)
    except UnsafePath as unsafe:
        raise ControlError(str(unsafe)) from None
    except FileNotFoundError:
        raise ControlError(f"control socket {path}: no such file") from None
    except OSError as error:
        raise ControlError(f"control socket {path}: {error.strerror or error}") from None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(f"control socket {path}: not a socket (is --sock the right path?)")
        conn.settimeout(timeout)
        conn.connect(path if found is None else f"/proc/self/fd/{found}")
        check_server(conn, path)
    except BaseException:
        conn.close()
        raise
    finally:
        if found is not None:
            os.close(found)
    return conn


def line_command(path: str, lines: list[str], *, timeout: float = 30.0) -> tuple[int, str]:
    """Send one flexnbd-form command; return its status and text."""
    request = "".join(f"{line}\n" for line in lines) + "\n"
    try:
        with connect(path, timeout) as conn:
            conn.sendall(request.encode("utf-8"))
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError as error:
        raise ControlError(f"control socket {path}: {error.strerror or error}") from None
    reply = b"".join(chunks).decode("utf-8", "replace").strip()
    status, sep, text = reply.partition(": ")
    if not sep or not status.isdigit():
        raise ControlError(f"control socket {path}: unexpected reply {reply!r}")
    return int(status), text


class JsonControl:
    def __init__(self, path: str, *, timeout: float = 60.0, trusted: bool = False) -> None:
        self._path = path
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._buffer = b""
        try:
            self._sock = connect(path, None, trusted=trusted)
        except OSError as error:
            raise ControlError(f"control socket {path}: {error.strerror or error}") from None

    def __enter__(self) -> JsonControl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._sock.close()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request, its answer (``result`` or ``error``)."""
        request_id = next(self._ids)
        self._send(request_id, method, params)
        deadline = time.monotonic() + self._timeout
        while True:
            answer = self._next(deadline - time.monotonic())
            if answer is None:
                raise ControlError(f"control socket {self._path}: closed before answering")
            if answer.get("id") == request_id:
                return answer

    def follow(
        self, show: Callable[[str], None], *, export: str | None = None
    ) -> dict[str, Any] | None:
        """Show progress lines until the migration (of ``export``) ends; return how it ended.

        None if the server went away first (a source that exits after a
        handoff answers ``wait`` before it stops, so None means trouble).
        """
        params = None if export is None else {"export": export}
        self._send("wait", "wait", params)
        last = ""
        while True:
            self._send(next(self._ids), "migration", params)
            deadline = time.monotonic() + PROGRESS_INTERVAL
            while (left := deadline - time.monotonic()) > 0:
                try:
                    answer = self._next(left)
                except TimeoutError:
                    break
                if answer is None:
                    return None
                result = answer.get("result")
                if not isinstance(result, dict):
                    continue
                line = str(result.get("line", ""))
                if line and line != last:
                    show(line)  # the wait's answer too: a short job ends between two asks
                    last = line
                if answer.get("id") == "wait":
                    final = result.get("result")
                    return final if isinstance(final, dict) else {"state": result.get("phase")}

    def subscribe(self, *, current: bool = True, export: str | None = None) -> list[dict[str, Any]]:
        """Subscribe to the server's transitions (of ``export``'s machines only, if given);
        return where every machine stands now.

        With ``current`` false the list is empty.  A refusal is a ControlError.
        """
        params: dict[str, Any] = {"current": current}
        if export is not None:
            params["export"] = export
        answer = self.call("subscribe", params)
        if "error" in answer:
            message = answer["error"].get("message", answer["error"])
            raise ControlError(f"control socket {self._path}: subscribe: {message}")
        result = answer.get("result")
        records = result.get("current", []) if isinstance(result, dict) else None
        if not isinstance(records, list):
            raise ControlError(f"control socket {self._path}: unexpected answer {answer!r}")
        return records

    def follow_events(self, show: Callable[[dict[str, Any]], None]) -> StreamEnd | None:
        """Show each event's record as it comes, with no deadline, until the stream ends.

        Returns how the server ended it, or None if the connection closed
        without an ``end`` (the server died, or is not ferry).
        """
        while True:
            message = self._next(None)
            if message is None:
                return None
            method = message.get("method")
            params = message.get("params")
            if method == "event" and isinstance(params, dict):
                show(params)
            elif method == "end" and isinstance(params, dict):
                return StreamEnd(str(params.get("reason", "")), params.get("complete") is True)

    def _send(self, request_id: object, method: str, params: dict[str, Any] | None) -> None:
        request = {"id": request_id, "method": method, "params": params or {}}
        try:
            self._sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        except OSError as error:
            raise ControlError(f"control socket {self._path}: {error.strerror or error}") from None

    def _next(self, timeout: float | None) -> dict[str, Any] | None:
        """The next answer; None at EOF; TimeoutError if none comes in time (None: wait on)."""
        while b"\n" not in self._buffer:
            wait = None if timeout is None else max(timeout, 0.0)
            ready, _, _ = select.select([self._sock], [], [], wait)
            if not ready:
                raise TimeoutError("no answer in time")
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError(f"control socket {self._path}: not JSON: {line[:80]!r}") from None
        if not isinstance(answer, dict):
            raise ControlError(f"control socket {self._path}: unexpected answer {answer!r}")
        return answer
