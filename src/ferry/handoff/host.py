"""Which host and network namespace this process is in, as one comparable string.

A connection moves differently when the destination shares the source's
network stack: the same 4-tuple cannot exist twice in one namespace, so the
source must close its socket (silently, in repair mode) before the
destination can rebuild it, and the commit's refusal cannot give it back.
Across namespaces (another host, or a test's namespace) the source keeps its
socket until the destination has the image, and a refusal resumes it.

Two processes are in the same network stack exactly when they run under
the same kernel boot (``/proc/sys/kernel/random/boot_id``) and in the same
network namespace (the inode of ``/proc/self/ns/net``, unique per kernel).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["network_identity"]

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def network_identity() -> str:
    """``"BOOT_ID/net:INODE"``: equal for two processes exactly when they share a network stack."""
    boot = _BOOT_ID.read_text().strip()
    namespace = os.stat("/proc/self/ns/net").st_ino
    return f"{boot}/net:{namespace}"
