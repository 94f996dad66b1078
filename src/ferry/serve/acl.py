"""Who may connect: flexnbd's access control list.

An ACL is a list of IPv4/IPv6 addresses and CIDR networks.  flexnbd's rule
is kept exactly: a non-empty list admits only the addresses it names; an
empty list admits everyone, unless ``--default-deny`` is given, in which case
it admits no one.  IPv4 clients reaching a dual-stack socket appear as
IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) and are matched as IPv4.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        """Whether a client at ``host`` may connect (a non-IP host is refused)."""
        if not self.networks:
            return not self.default_deny
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def entries(self) -> list[str]:
        return [str(network) for network in self.networks]
