"""Who may connect: flexnbd's access control list.

An ACL is a list of IPv4/IPv6 addresses and CIDR networks.  flexnbd's rule
is kept exactly: a non-empty list admits only the addresses it names; an
empty list admits everyone, unless ``--default-deny`` is given, in which case
it admits no one.  IPv4 clients reaching a dual-stack socket appear as
IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) and are matched as IPv4.

A migration sender is held to more: it hands this node an image and the
control of it, so an empty ACL does not admit it from anywhere.  Without
TLS (which authenticates it by certificate) a sender must come from an
address the ACL names, or, while the ACL is empty, from a loopback address
(:meth:`Acl.admits_sender`).  A daemon's export has an ACL of its own
beside the listener's: a sender must be admitted by both, and named by
one of them (or, neither naming anyone, come from loopback).

A peer with no IP address -- on the node's Unix socket (``--nbd-sock``,
mode 0600: this user's processes only) or on stdin and stdout
(``listen --stdio``: whoever started the process) -- is
:data:`LOCAL_PEER`.  The ACL, which names addresses, does not apply to it:
the file's mode or the parent process has already decided who it is, so
it is admitted, as a client and as a sender.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The "address" of a peer on a Unix socket or on stdio (see the module doc).
LOCAL_PEER = "local"


def peer_host_of(address: object) -> str:
    """A connection's peer as the ACL sees it: its IP address, or :data:`LOCAL_PEER`."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else LOCAL_PEER


class AclError(ValueError):
    """An ACL entry that is not an address or a network; the message names it."""


@dataclass(frozen=True, slots=True)
class Acl:
    networks: tuple[Network, ...] = ()
    default_deny: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str], *, default_deny: bool = False) -> Acl:
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise AclError(f"bad ACL entry {entry!r}: not an IP address or CIDR") from None
        return cls(tuple(networks), default_deny)

    def allows(self, host: str) -> bool:
        """Whether a client at ``host`` may connect (a non-IP host is refused, but for
        :data:`LOCAL_PEER`)."""
        if host == LOCAL_PEER:
            return True
        if not self.networks:
            return not self.default_deny
        address = _address(host)
        if address is None:
            return False
        return any(address in network for network in self.networks)

    def admits_sender(self, host: str, export: Acl | None = None) -> bool:
        """Whether a migration sender at ``host`` may hand this node an image.

        Only an address the ACL names, or loopback while the ACL is empty:
        "everyone" is never who may take over a disk.  With ``export`` (the
        ACL of the export it would send to), both must allow ``host`` and
        one of them must name it, or, neither naming anyone, it is loopback.
        :data:`LOCAL_PEER` is admitted.
        """
        if host == LOCAL_PEER:
            return True
        address = _address(host)
        if address is None:
            return False
        acls = (self,) if export is None else (self, export)
        if not all(acl.allows(host) for acl in acls):
            return False
        # Allowed by an ACL that names addresses is named by it.
        return any(acl.networks for acl in acls) or address.is_loopback

    def entries(self) -> list[str]:
        return [str(network) for network in self.networks]


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address (IPv4-mapped IPv6 as IPv4); None if it is not one."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is a loopback address."""
    address = _address(host)
    return host == "localhost" if address is None else address.is_loopback
