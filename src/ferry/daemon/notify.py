"""systemd's readiness protocol (``Type=notify``), written out: one datagram per notice.

systemd passes ``$NOTIFY_SOCKET``, the path of a Unix datagram socket; a
service tells it how it is by sending newline-separated ``KEY=VALUE``
assignments there (``sd_notify(3)``).  A path that starts with ``@`` is in
the abstract namespace: the ``@`` stands for a leading NUL byte.  Without
``$NOTIFY_SOCKET`` (not run by systemd) every notice is dropped, so the
daemon calls these whatever runs it.

The daemon sends, in this order (``STATUS=`` rides along with each):

* ``READY=1`` once every export of the file serves (or listens);
* ``RELOADING=1`` when a reload begins (with ``MONOTONIC_USEC=``, which
  ``Type=notify-reload`` asks for), then ``READY=1`` when it has ended,
  applied or refused;
* ``STOPPING=1`` when it begins to shut down.

A notice that cannot be sent (systemd went away, the socket is full) is
logged and dropped: the service goes on serving either way.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from twisted.logger import Logger

__all__ = ["Notifier", "notice"]

log = Logger()


def notice(fields: Mapping[str, str]) -> bytes:
    """The datagram for ``fields``: ``KEY=VALUE`` lines (a value must be one line)."""
    lines = []
    for key, value in fields.items():
        if "\n" in value:
            raise ValueError(f"{key}={value!r}: a notice's value is one line")
        lines.append(f"{key}={value}")
    return ("\n".join(lines) + "\n").encode("utf-8")


class Notifier:
    """Sends notices to ``$NOTIFY_SOCKET`` (or the ``address`` given); a no-op without one."""

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        self.address = address

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> None:
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as out:
                # Never block the reactor: a full socket drops the notice.
                out.sendto(notice(fields), socket.MSG_DONTWAIT, target)
        except OSError as error:
            log.warn(
                "cannot tell systemd {fields}: {error}",
                fields=" ".join(fields),
                error=error.strerror or error,
            )

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def reloading(self, status: str) -> None:
        monotonic_usec = str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        self.send(RELOADING="1", MONOTONIC_USEC=monotonic_usec, STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)
