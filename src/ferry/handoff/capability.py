"""Can this host move client connections?  Asked once at start, answered in one line.

Moving a connection between hosts needs three things of this host, each
checked by trying it, harmlessly, rather than by reading version numbers:

* ``TCP_REPAIR`` permitted: the kernel has it (CONFIG_CHECKPOINT_RESTORE) and
  this process has CAP_NET_ADMIN in the user namespace that owns its
  network namespace -- a throwaway socket is put into repair mode;
* ``TCP_REPAIR_WINDOW`` (Linux 4.8): without it a restored socket would
  advertise a window the peer never agreed to;
* nftables for the freeze: libnftables loads and a table can be made and
  deleted here (:func:`ferry.handoff.freeze.probe`).

Where any is missing the switchover disconnects clients, as before
connections could move, and the image's handoff is unaffected;
``can_move_connections`` says which, for the status line and /metrics.
"""

from __future__ import annotations

import errno
import socket

from ferry.handoff import freeze
from ferry.handoff.tcp_repair import (
    TCP_REPAIR,
    TCP_REPAIR_WINDOW,
    RepairError,
    enter_repair,
)

__all__ = ["can_move_connections", "repair_reason"]


def can_move_connections(*, freeze_table: str | None = None) -> tuple[bool, str]:
    """(True, "") if this host can move connections; else (False, one line saying why not)."""
    reason = repair_reason() or freeze.probe(freeze_table)
    if reason is None:
        return True, ""
    return False, reason


def repair_reason() -> str | None:
    """None if TCP_REPAIR (and TCP_REPAIR_WINDOW) works here; else one line saying why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            enter_repair(sock, "probe")
        except RepairError as error:
            return str(error)
        try:
            sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
        except OSError as error:
            if error.errno == errno.ENOPROTOOPT:
                return "this kernel has no TCP_REPAIR_WINDOW (Linux 4.8 or later is needed)"
            return f"TCP_REPAIR_WINDOW failed: {error.strerror}"
        finally:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    return None
