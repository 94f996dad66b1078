"""One TCP connection's state, as a value: what ``TCP_REPAIR`` reads out and writes back.

:func:`ferry.handoff.tcp_repair.checkpoint` fills a :class:`SocketState`
from a live socket; :func:`ferry.handoff.tcp_repair.restore` makes a new
socket from one, possibly in another process on another host.  Between the
two it travels inside the migration stream, so it has a wire format here,
with the rules every ferry wire format keeps:

* **versioned**: the first six bytes are a magic and a version; a version
  this node does not read is refused by name, before any field is looked at;
* **bounded**: each queue is at most :data:`MAX_QUEUE_BYTES`, so a blob never
  makes the reader allocate more than twice that plus a fixed header, and the
  length must match exactly (no trailing bytes);
* **bytes-safe**: the queues are opaque bytes, carried with their lengths,
  never decoded.

A decoded state is validated as one built by hand is (``__post_init__``):
a :class:`SocketState` in hand always has in-range fields.  Anything wrong
is a :class:`StateFormatError`, a :class:`~ferry.handoff.errors.HandoffError`:
the connection it described is aborted, nothing else.

The sequence numbers are the kernel's ``TCP_QUEUE_SEQ`` of each queue: the
number *after* its last byte (``write_seq`` for the send queue, ``rcv_nxt``
for the receive queue).  A restore starts each queue at that number minus
the queue's length and lets the re-injected bytes advance it back.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final

from ferry.handoff.errors import HandoffError

__all__ = [
    "MAX_QUEUE_BYTES",
    "STATE_VERSION",
    "RepairWindow",
    "SocketState",
    "StateFormatError",
]

#: The wire format this node writes, and the only one it reads.
STATE_VERSION: Final = 1
#: The largest queue a state may carry.  Linux's default buffer ceilings
#: (``tcp_rmem``/``tcp_wmem`` max) are 6 MiB and 4 MiB; this leaves room for
#: a host tuned well above them and still bounds what a blob can ask for.
MAX_QUEUE_BYTES: Final = 64 * 1024 * 1024

_MAGIC: Final = b"FTCP"
_PREAMBLE: Final = struct.Struct(">4sH")  # magic, version
# family, local ip and port, peer ip and port, send seq, recv seq, unsent,
# mss, options, snd/rcv window scale, timestamp, the five window fields,
# nodelay, send queue length, recv queue length; then the two queues.
_BODY: Final = struct.Struct(">B16sH16sHIIIHBBBIIIIIIBII")
_FAMILIES: Final[dict[int, int]] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}
_U32: Final = 1 << 32
_MAX_WSCALE: Final = 14  # RFC 7323


class StateFormatError(HandoffError, ValueError):
    """A state blob (or fields) this node cannot restore: the message says which part."""


@dataclass(frozen=True, slots=True)
class RepairWindow:
    """``TCP_REPAIR_WINDOW``: the window bookkeeping the peer has been told about.

    Without it a restored socket starts with a window of its own choosing,
    which may be smaller than what the peer was already allowed to send.
    """

    snd_wl1: int  # the sequence number of the segment that last updated snd_wnd
    snd_wnd: int  # the window the peer advertised to us
    max_window: int  # the largest window the peer ever advertised
    rcv_wnd: int  # the window we advertised to the peer
    rcv_wup: int  # rcv_nxt when we last advertised it

    def __post_init__(self) -> None:
        for name in ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"):
            value = getattr(self, name)
            if not 0 <= value < _U32:
                raise StateFormatError(f"window field {name}={value} is not a u32")


@dataclass(frozen=True, slots=True)
class SocketState:
    """Everything a restore needs to make a socket the peer cannot tell from this one.

    ``send_queue`` is what the peer has not acknowledged, oldest byte first;
    its last ``unsent`` bytes were never put on the wire (a restore sends
    them the ordinary way).  ``recv_queue`` is what arrived and was
    acknowledged but not yet read by the application.  ``options`` is the
    ``tcpi_options`` mask (``TCPI_OPT_*``) the handshake negotiated; the
    window scales and ``timestamp`` mean something only when their option
    is in it.  ``nodelay`` is carried because repair does not keep ordinary
    socket options.
    """

    family: int
    local: tuple[str, int]
    peer: tuple[str, int]
    send_seq: int
    recv_seq: int
    send_queue: bytes
    unsent: int
    recv_queue: bytes
    mss: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: RepairWindow
    nodelay: bool = False

    def __post_init__(self) -> None:
        version = _FAMILIES.get(self.family)
        if version is None:
            raise StateFormatError(f"address family {self.family} is neither AF_INET nor AF_INET6")
        for side, (host, port) in (("local", self.local), ("peer", self.peer)):
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                raise StateFormatError(f"{side} address {host!r} is not an IP address") from None
            if address.version != version:
                raise StateFormatError(f"{side} address {host} is not an IPv{version} address")
            if not 0 < port < 1 << 16:
                raise StateFormatError(f"{side} port {port} is not in 1..65535")
        for name in ("send_seq", "recv_seq", "timestamp"):
            value = getattr(self, name)
            if not 0 <= value < _U32:
                raise StateFormatError(f"{name}={value} is not a u32")
        for name in ("send_queue", "recv_queue"):
            size = len(getattr(self, name))
            if size > MAX_QUEUE_BYTES:
                raise StateFormatError(
                    f"{name} of {size} bytes is over the limit of {MAX_QUEUE_BYTES}"
                )
        if not 0 <= self.unsent <= len(self.send_queue):
            raise StateFormatError(
                f"unsent={self.unsent} is not within the send queue's {len(self.send_queue)} bytes"
            )
        if not 0 < self.mss < 1 << 16:
            raise StateFormatError(f"mss={self.mss} is not in 1..65535")
        if not 0 <= self.options < 1 << 8:
            raise StateFormatError(f"options={self.options} is not a u8 mask")
        for name in ("snd_wscale", "rcv_wscale"):
            value = getattr(self, name)
            if not 0 <= value <= _MAX_WSCALE:
                raise StateFormatError(f"{name}={value} is not in 0..{_MAX_WSCALE}")

    def with_unsent(self, data: bytes) -> SocketState:
        """This state with ``data`` queued after everything else, to be sent by the restore.

        For bytes the application had written but the kernel had not taken
        yet (a Twisted transport's own buffer): the restore sends them, in
        order, after the send queue, as if they had been written before the
        checkpoint.
        """
        return dataclasses.replace(
            self,
            # send_seq is the number after the queue's last byte: it moves with the queue.
            send_seq=(self.send_seq + len(data)) % _U32,
            send_queue=self.send_queue + data,
            unsent=self.unsent + len(data),
        )

    # -- the wire format -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The state as a self-describing blob :meth:`from_bytes` reads back exactly."""
        window = self.window
        return b"".join(
            (
                _PREAMBLE.pack(_MAGIC, STATE_VERSION),
                _BODY.pack(
                    self.family,
                    _pack_ip(self.local[0]),
                    self.local[1],
                    _pack_ip(self.peer[0]),
                    self.peer[1],
                    self.send_seq,
                    self.recv_seq,
                    self.unsent,
                    self.mss,
                    self.options,
                    self.snd_wscale,
                    self.rcv_wscale,
                    self.timestamp,
                    window.snd_wl1,
                    window.snd_wnd,
                    window.max_window,
                    window.rcv_wnd,
                    window.rcv_wup,
                    int(self.nodelay),
                    len(self.send_queue),
                    len(self.recv_queue),
                ),
                self.send_queue,
                self.recv_queue,
            )
        )

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> SocketState:
        """Decode and validate a blob from :meth:`to_bytes`; :class:`StateFormatError` if not one.

        The magic and version are checked first, so a blob of another format
        version is refused with that reason and nothing else is parsed.
        """
        data = bytes(blob)
        if len(data) < _PREAMBLE.size:
            raise StateFormatError(f"a TCP state of {len(data)} bytes is too short to be one")
        magic, version = _PREAMBLE.unpack_from(data)
        if magic != _MAGIC:
            raise StateFormatError(f"not a ferry TCP state (magic {magic!r}, not {_MAGIC!r})")
        if version != STATE_VERSION:
            raise StateFormatError(
                f"TCP state format version {version} is not supported "
                f"(this node reads version {STATE_VERSION})"
            )
        fixed = _PREAMBLE.size + _BODY.size
        if len(data) < fixed:
            raise StateFormatError(f"TCP state truncated: {len(data)} bytes, header needs {fixed}")
        (
            family,
            local_ip,
            local_port,
            peer_ip,
            peer_port,
            send_seq,
            recv_seq,
            unsent,
            mss,
            options,
            snd_wscale,
            rcv_wscale,
            timestamp,
            snd_wl1,
            snd_wnd,
            max_window,
            rcv_wnd,
            rcv_wup,
            nodelay,
            send_len,
            recv_len,
        ) = _BODY.unpack_from(data, _PREAMBLE.size)
        for name, size in (("send queue", send_len), ("receive queue", recv_len)):
            if size > MAX_QUEUE_BYTES:
                raise StateFormatError(
                    f"{name} of {size} bytes is over the limit of {MAX_QUEUE_BYTES}"
                )
        if len(data) != fixed + send_len + recv_len:
            raise StateFormatError(
                f"TCP state is {len(data)} bytes; its header says {fixed + send_len + recv_len}"
            )
        if nodelay not in (0, 1):
            raise StateFormatError(f"nodelay={nodelay} is not a boolean")
        version_of = _FAMILIES.get(family)
        if version_of is None:
            raise StateFormatError(f"address family {family} is neither AF_INET nor AF_INET6")
        queues = fixed + send_len
        return cls(
            family=family,
            local=(_unpack_ip(local_ip, version_of), local_port),
            peer=(_unpack_ip(peer_ip, version_of), peer_port),
            send_seq=send_seq,
            recv_seq=recv_seq,
            send_queue=data[fixed:queues],
            unsent=unsent,
            recv_queue=data[queues:],
            mss=mss,
            options=options,
            snd_wscale=snd_wscale,
            rcv_wscale=rcv_wscale,
            timestamp=timestamp,
            window=RepairWindow(snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup),
            nodelay=bool(nodelay),
        )


def _pack_ip(host: str) -> bytes:
    """An address in 16 bytes: IPv6 as is, IPv4 in the first four, zeroes after."""
    return ipaddress.ip_address(host).packed.ljust(16, b"\0")


def _unpack_ip(raw: bytes, version: int) -> str:
    if version == 6:
        return str(ipaddress.IPv6Address(raw))
    if any(raw[4:]):
        raise StateFormatError("an IPv4 address with bytes after its fourth")
    return str(ipaddress.IPv4Address(raw[:4]))
