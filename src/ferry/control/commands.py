"""The control commands, independent of how they arrive.

Both wire forms of the control socket (flexnbd's lines and JSON-RPC) call
these.  A command answers a :class:`Reply`: an exit status and a text, as
flexnbd's ``N: text`` line, plus a JSON value for the RPC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ferry.serve.acl import Acl, AclError
from ferry.serve.server import NBDServer

NOT_YET = "live migration is not available in this version of ferry"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    text: str
    value: Any = field(default=None)

    def line(self) -> str:
        return f"{self.status}: {self.text}\n"


class Commands:
    """The commands a running ferry node accepts, by name."""

    def __init__(self, server: NBDServer, *, default_deny: bool) -> None:
        self._server = server
        self._default_deny = default_deny
        self.table: dict[str, Callable[[Sequence[str]], Reply]] = {
            "status": self.status,
            "acl": self.acl,
            "mirror": self.not_yet,
            "break": self.not_yet,
            "mirror_max_bps": self.not_yet,
        }

    def run(self, name: str, args: Sequence[str]) -> Reply:
        if not name:
            return Reply(9, "missing command")
        command = self.table.get(name)
        if command is None:
            return Reply(10, "unknown command")
        return command(args)

    def status(self, args: Sequence[str]) -> Reply:
        snapshot = self._server.default_export.snapshot()
        return Reply(0, snapshot.to_line(), snapshot.to_dict())

    def acl(self, args: Sequence[str]) -> Reply:
        try:
            acl = Acl.parse(args, default_deny=self._default_deny)
        except AclError:
            bad = next(entry for entry in args if not _is_network(entry))
            return Reply(1, f"bad spec: {bad}")
        disconnected = self._server.replace_acl(acl)
        return Reply(0, "updated", {"acl": acl.entries(), "disconnected": disconnected})

    def not_yet(self, args: Sequence[str]) -> Reply:
        return Reply(1, NOT_YET)


def _is_network(entry: str) -> bool:
    try:
        Acl.parse([entry])
    except AclError:
        return False
    return True
