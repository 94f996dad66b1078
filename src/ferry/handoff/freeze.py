"""Freeze a connection: drop the peer's packets to it while its socket moves.

Why a freeze
------------
A socket in repair mode still accepts and ACKs incoming data, and a port
with no socket answers with a reset; either one, during the moment a
connection is between two sockets, breaks it for good (without a freeze 9
of 14 loopback runs drew a reset).  Dropping the peer's packets for that
moment costs it a retransmission and nothing else: TCP was built for lost
packets.

How
---
One nftables table of ferry's own per process (``inet``, so IPv4 and IPv6
alike), holding two sets of 4-tuples -- peer address, peer port, local
address, local port -- and one chain on the input hook at priority -300
(before conntrack and everything else) that drops (and counts) a TCP packet
whose tuple is in a set.  Freezing and unfreezing add and delete set elements: one
netlink transaction per call, a tenth of a millisecond, however many flows
it names.  The table is made when the :class:`Freezer` opens (do that ahead
of the switchover) and deleted when it closes; it carries nftables' *owner*
flag, so the kernel deletes it too when this process dies, even by SIGKILL:
no path leaves a client's packets dropped forever.

The table is driven through libnftables (Debian's ``nftables`` package) by
ctypes, in-process: no fork and exec of ``nft`` on the switchover's path.
The table belongs to the network namespace the :class:`Freezer` was opened
in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from typing import Final

from ferry.handoff.errors import HandoffError

__all__ = ["Flow", "FreezeError", "Freezer", "probe"]

_LIBRARY: Final = "libnftables.so.1"
_INPUT_PRIORITY: Final = -300
_OUTPUT_JSON: Final = 1 << 4  # NFT_CTX_OUTPUT_JSON


class FreezeError(HandoffError):
    """nftables is missing, not permitted, or refused a command; the message says which."""


@dataclass(frozen=True, slots=True)
class Flow:
    """One TCP connection as the local host sees it: its address and its peer's.

    IPv4-mapped IPv6 addresses (an AF_INET6 socket talking to an IPv4 peer)
    are stored as the IPv4 addresses they are on the wire.
    """

    local: tuple[str, int]
    peer: tuple[str, int]

    def __post_init__(self) -> None:
        local, peer = _wire_address(self.local[0]), _wire_address(self.peer[0])
        if local.version != peer.version:
            raise ValueError(f"local {local} and peer {peer} are of different IP versions")
        for side, port in (("local", self.local[1]), ("peer", self.peer[1])):
            if not 0 < port < 1 << 16:
                raise ValueError(f"{side} port {port} is not in 1..65535")
        object.__setattr__(self, "local", (str(local), self.local[1]))
        object.__setattr__(self, "peer", (str(peer), self.peer[1]))

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Flow:
        """The flow of a connected TCP socket."""
        local, peer = sock.getsockname(), sock.getpeername()
        return cls((local[0], local[1]), (peer[0], peer[1]))

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.local[0]).version

    def element(self) -> str:
        """The set element, in the order the rule matches: peer, then local."""
        return f"{self.peer[0]} . {self.peer[1]} . {self.local[0]} . {self.local[1]}"


def _wire_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _Nft:
    """A libnftables context: commands in, errors out as text."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or _LIBRARY
        try:
            lib = ctypes.CDLL(name)
        except OSError as error:
            raise FreezeError(
                f"libnftables is not installed ({error}): install Debian's nftables package"
            ) from error
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise FreezeError("libnftables could not make a context")
        lib.nft_ctx_buffer_error(ctx)
        lib.nft_ctx_buffer_output(ctx)
        self._lib = lib
        self._ctx: int | None = ctx

    def run(self, command: str, *, as_json: bool = False) -> str:
        """Run one nft script (atomically); its output, or :class:`FreezeError` with nft's words."""
        if self._ctx is None:
            raise FreezeError("the nftables context is closed")
        self._lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON if as_json else 0)
        status = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        if status != 0:
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            first = error.strip().splitlines()[0] if error.strip() else f"status {status}"
            raise FreezeError(f"nft refused {command.split(chr(10))[0]!r}: {first}")
        return str(output)

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


class Freezer:
    """This process's freeze table: :meth:`freeze` and :meth:`unfreeze` flows, :meth:`close`.

    Idempotent both ways: freezing a frozen flow and unfreezing one that is
    not frozen change nothing.  :meth:`close` (or leaving the ``with``
    block) unfreezes everything by deleting the table; so does this
    process's death.  Not thread-safe: one thread (the reactor's) drives it.
    """

    def __init__(self, table: str | None = None) -> None:
        self.table = table or f"ferry-handoff-{os.getpid()}"
        if not self.table.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"table name {self.table!r} is not letters, digits, - and _")
        self._frozen: set[Flow] = set()
        self._nft = _Nft()
        try:
            self._nft.run(self._definition())
        except BaseException:
            self._nft.close()
            raise
        self._open = True

    def _definition(self) -> str:
        t = self.table
        return "\n".join(
            (
                f"table inet {t} {{",
                "  flags owner",
                "  set frozen4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; }",
                "  set frozen6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; }",
                "  chain input {",
                f"    type filter hook input priority {_INPUT_PRIORITY}; policy accept;",
                "    ip saddr . tcp sport . ip daddr . tcp dport @frozen4 counter drop",
                "    ip6 saddr . tcp sport . ip6 daddr . tcp dport @frozen6 counter drop",
                "  }",
                "}",
            )
        )

    @property
    def frozen(self) -> frozenset[Flow]:
        return frozenset(self._frozen)

    def freeze(self, *flows: Flow) -> None:
        """Drop every incoming packet of ``flows`` from now on (one transaction)."""
        new = [flow for flow in dict.fromkeys(flows) if flow not in self._frozen]
        self._elements("add", new)
        self._frozen.update(new)

    def unfreeze(self, *flows: Flow) -> None:
        """Let ``flows``' packets in again; flows not frozen are ignored."""
        known = [flow for flow in dict.fromkeys(flows) if flow in self._frozen]
        self._elements("delete", known)
        self._frozen.difference_update(known)

    def _elements(self, verb: str, flows: list[Flow]) -> None:
        if not self._open:
            raise FreezeError(f"the freeze table {self.table} is closed")
        commands = []
        for version in (4, 6):
            elements = [flow.element() for flow in flows if flow.version == version]
            if elements:
                commands.append(
                    f"{verb} element inet {self.table} frozen{version} {{ {', '.join(elements)} }}"
                )
        if commands:
            self._nft.run("\n".join(commands))

    def dropped_packets(self) -> int:
        """How many packets the freeze has dropped since the table was made."""
        if not self._open:
            raise FreezeError(f"the freeze table {self.table} is closed")
        listing = json.loads(self._nft.run(f"list chain inet {self.table} input", as_json=True))
        return sum(
            expression["counter"]["packets"]
            for item in listing.get("nftables", [])
            for expression in item.get("rule", {}).get("expr", [])
            if isinstance(expression, dict) and "counter" in expression
        )

    def close(self) -> None:
        """Delete the table (unfreezing every flow); safe to call twice."""
        if not self._open:
            return
        self._open = False
        self._frozen.clear()
        try:
            self._nft.run(f"delete table inet {self.table}")
        finally:
            self._nft.close()  # the owner flag deletes the table if the command did not

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def probe(table: str | None = None) -> str | None:
    """None if a freeze table can be made here; else one line saying why not."""
    try:
        Freezer(table or f"ferry-probe-{os.getpid()}").close()
    except FreezeError as error:
        return str(error)
    return None
