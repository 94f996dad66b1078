"""The service address: the IP clients reach an image at, which moves with the image.

``--service-address IP/PREFIX@DEV`` names it: the address with its prefix
length, and the network device it lives on.  At the switchover the source
removes it from its device and the destination adds it to its own, then
*announces* it: a gratuitous ARP, broadcast on the device, which makes every
host on the link that already knows the address (the clients) point it at
this device's hardware address.  Without the announcement a client keeps
sending to the old host's MAC and the moved connection hangs.

Addresses are added and removed with rtnetlink (``RTM_NEWADDR`` /
``RTM_DELADDR``) directly: no ``ip`` process on the switchover's path, and
the kernel's errno comes back as it is.  The announcement goes out on a raw
packet socket opened ahead of time (:class:`Announcer`): binding one took
about 25 ms on the measured machine, too long to spend during the hold.
IPv6 addresses can be added and removed (without duplicate address
detection, which would hold a moving address unusable for a second or
more), but announcing one -- an unsolicited neighbour advertisement -- is
not implemented, and :class:`Announcer` refuses it by name.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from ferry.handoff.errors import HandoffError
from ferry.handoff.tcp_repair import IP_FREEBIND, IPV6_FREEBIND

__all__ = [
    "AddressError",
    "Announcer",
    "ServiceAddress",
    "add",
    "is_present",
    "listen_freebind",
    "remove",
]

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h
_RTM_NEWADDR: Final = 20
_RTM_DELADDR: Final = 21
_RTM_GETADDR: Final = 22
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_NLM_F_DUMP: Final = 0x300
_NLM_F_EXCL: Final = 0x200
_NLM_F_CREATE: Final = 0x400
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2
_IFA_F_NODAD: Final = 0x02
_NLMSGHDR: Final = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG: Final = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTATTR: Final = struct.Struct("=HH")  # length, type
_NLMSGERR: Final = struct.Struct("=i")  # -errno, then the request's header
_NETLINK_TIMEOUT: Final = 5.0

_ETH_P_ARP: Final = 0x0806
_ETH_P_IP: Final = 0x0800
_ARPHRD_ETHER: Final = 1
_ARPOP_REQUEST: Final = 1
_BROADCAST: Final = b"\xff" * 6
_ARP: Final = struct.Struct("!6s6sHHHBBH6s4s6s4s")  # Ethernet header, then the ARP packet


class AddressError(HandoffError):
    """A service address that does not parse, or that the kernel would not add, remove or send."""


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    """``IP/PREFIX@DEV``: an address, its prefix length, and the device it belongs on."""

    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    device: str

    @classmethod
    def parse(cls, text: str) -> ServiceAddress:
        """Parse ``IP/PREFIX@DEV``; :class:`AddressError` saying what is wrong otherwise."""
        spec, at, device = text.rpartition("@")
        if not at or not spec or not device:
            raise AddressError(f"service address {text!r} is not IP/PREFIX@DEV")
        if "/" not in spec:
            raise AddressError(f"service address {text!r} has no /PREFIX (e.g. 10.0.0.5/24@eth0)")
        if len(device) >= 16 or "/" in device or any(c.isspace() for c in device):
            raise AddressError(f"{device!r} is not a network device name")
        try:
            interface = ipaddress.ip_interface(spec)
        except ValueError as error:
            raise AddressError(f"service address {text!r}: {error}") from None
        if interface.ip.is_unspecified or interface.ip.is_multicast:
            raise AddressError(f"service address {text!r} is not a unicast host address")
        return cls(interface, device)

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.interface.ip

    def __str__(self) -> str:
        return f"{self.interface}@{self.device}"


# -- add, remove, look -------------------------------------------------------------


def listen_freebind(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, backlog: int = 128
) -> socket.socket:
    """A non-blocking listening socket on ``ip``:``port``, which need not be here yet.

    ``IP_FREEBIND``: a destination listens on the service address from the
    start, and clients reach it the moment the address is its own.  Raises
    OSError (the port in use, no such address family).
    """
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.bind((str(ip), port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def is_present(address: ServiceAddress) -> bool:
    """True if the address is on its device now."""
    index = _device_index(address.device)
    return index in _holders(address)


def add(address: ServiceAddress) -> bool:
    """Add the address to its device; False if it was already there.

    Refuses (:class:`AddressError`) an address that is on *another* device
    of this host: two devices answering for one IP is a configuration
    error, not something to paper over.
    """
    index = _device_index(address.device)
    holders = _holders(address)
    if index in holders:
        return False
    if holders:
        names = ", ".join(_device_name(other) for other in sorted(holders))
        raise AddressError(f"{address.ip} is already on {names}, not on {address.device}")
    try:
        _request(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, _address_message(address, index))
    except OSError as error:
        if error.errno == errno.EEXIST:
            return False  # added by someone else since we looked
        raise AddressError(f"adding {address}: {_explain(error)}") from error
    return True


def remove(address: ServiceAddress) -> bool:
    """Remove the address from its device; False if it was not there."""
    index = _device_index(address.device)
    try:
        _request(_RTM_DELADDR, 0, _address_message(address, index))
    except OSError as error:
        if error.errno == errno.EADDRNOTAVAIL:
            return False
        raise AddressError(f"removing {address}: {_explain(error)}") from error
    return True


def _device_index(device: str) -> int:
    try:
        return socket.if_nametoindex(device)
    except OSError:
        raise AddressError(f"there is no network device {device!r} here") from None


def _device_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"device #{index}"


def _explain(error: OSError) -> str:
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.EPERM:
        return f"{reason} (needs CAP_NET_ADMIN in this network namespace)"
    return reason


def _address_message(address: ServiceAddress, index: int) -> bytes:
    ip = address.ip
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    flags = _IFA_F_NODAD if ip.version == 6 else 0
    header = _IFADDRMSG.pack(family, address.interface.network.prefixlen, flags, 0, index)
    return header + _attribute(_IFA_LOCAL, ip.packed) + _attribute(_IFA_ADDRESS, ip.packed)


def _attribute(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return (_RTATTR.pack(length, kind) + value).ljust(_align(length), b"\0")


def _align(length: int) -> int:
    return (length + 3) & ~3


def _holders(address: ServiceAddress) -> set[int]:
    """The indexes of the devices that have ``address.ip`` (any prefix length)."""
    ip = address.ip
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    found: set[int] = set()
    for message in _dump(_RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
        if len(message) < _IFADDRMSG.size:
            continue
        _, _, _, _, index = _IFADDRMSG.unpack_from(message)
        attributes = _attributes(message[_IFADDRMSG.size :])
        # IPv4 keeps the host's own address in IFA_LOCAL (IFA_ADDRESS is the
        # peer on point-to-point links); IPv6 has only IFA_ADDRESS.
        raw = attributes.get(_IFA_LOCAL, attributes.get(_IFA_ADDRESS))
        if raw == ip.packed:
            found.add(index)
    return found


def _attributes(data: bytes) -> dict[int, bytes]:
    attributes: dict[int, bytes] = {}
    pos = 0
    while pos + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size:
            break
        attributes.setdefault(kind, data[pos + _RTATTR.size : pos + length])
        pos += _align(length)
    return attributes


# -- rtnetlink, just enough of it ------------------------------------------------------


def _request(kind: int, flags: int, body: bytes) -> None:
    """Send one request and wait for its acknowledgement; OSError with the kernel's errno."""
    with _netlink() as sock:
        sock.send(
            _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK | flags, 1, 0
            )
            + body
        )
        for message_type, payload in _messages(sock):
            if message_type == _NLMSG_ERROR:
                (code,) = _NLMSGERR.unpack_from(payload)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return
        raise OSError(errno.EIO, "rtnetlink closed without an acknowledgement")


def _dump(kind: int, body: bytes) -> list[bytes]:
    with _netlink() as sock:
        sock.send(
            _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
            + body
        )
        found: list[bytes] = []
        for message_type, payload in _messages(sock):
            if message_type == _NLMSG_DONE:
                return found
            if message_type == _NLMSG_ERROR:
                (code,) = _NLMSGERR.unpack_from(payload)
                raise OSError(-code, os.strerror(-code))
            found.append(payload)
        return found


def _netlink() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    sock.settimeout(_NETLINK_TIMEOUT)  # the kernel answers at once; this bounds a bug
    return sock


def _messages(sock: socket.socket) -> Iterator[tuple[int, bytes]]:
    """Yield (type, payload) for every netlink message until the socket has nothing more."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        pos = 0
        while pos + _NLMSGHDR.size <= len(data):
            length, message_type, _, _, _ = _NLMSGHDR.unpack_from(data, pos)
            if length < _NLMSGHDR.size:
                return
            yield message_type, data[pos + _NLMSGHDR.size : pos + length]
            pos += _align(length)


# -- the announcement --------------------------------------------------------------


class Announcer:
    """A packet socket on the service address's device, ready to announce the address.

    Open it before the switchover (the bind is the slow part); then
    :meth:`announce` costs one ``send`` per packet.  The socket is bound
    with protocol 0, so it receives nothing and never fills up.
    """

    def __init__(self, address: ServiceAddress) -> None:
        if address.ip.version != 4:
            raise AddressError(
                f"announcing {address.ip} needs an unsolicited neighbour advertisement, "
                "which is not implemented: only IPv4 service addresses can be announced"
            )
        self.address = address
        _device_index(address.device)
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        except OSError as error:
            raise AddressError(
                f"opening a packet socket to announce {address.ip}: {_explain(error)}"
            ) from error
        try:
            sock.bind((address.device, 0))
            _, _, _, hardware_type, mac = sock.getsockname()
        except OSError as error:
            sock.close()
            raise AddressError(
                f"binding a packet socket to {address.device}: {_explain(error)}"
            ) from error
        if hardware_type != _ARPHRD_ETHER or len(mac) != 6:
            sock.close()
            raise AddressError(
                f"{address.device} is not an Ethernet device (hardware type {hardware_type}): "
                "it cannot carry an ARP announcement"
            )
        self._sock = sock
        ip = address.ip.packed
        self._frame = _ARP.pack(
            _BROADCAST,
            mac,
            _ETH_P_ARP,  # Ethernet: to everyone, from us
            _ARPHRD_ETHER,
            _ETH_P_IP,
            6,
            4,
            _ARPOP_REQUEST,
            mac,
            ip,  # sender: us, at the service address
            bytes(6),
            ip,  # target: the same address -- what makes it gratuitous
        )

    def announce(self, count: int = 1) -> None:
        """Broadcast ``count`` gratuitous ARP requests for the address."""
        for _ in range(count):
            try:
                self._sock.send(self._frame)
            except OSError as error:
                raise AddressError(
                    f"announcing {self.address.ip} on {self.address.device}: {_explain(error)}"
                ) from error

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
