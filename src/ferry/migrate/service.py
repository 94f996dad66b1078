"""The service address a node's clients use, which moves with the image at the handoff.

``--service-address IP/PREFIX@DEV`` (:class:`~ferry.handoff.address.ServiceAddress`).
The source holds it from the start (``hold``: added to DEV if missing).  The
destination takes it once the commit has landed and before it acknowledges
(``take``: added, then announced with a gratuitous ARP so the clients'
next packets reach it).  The source gives it up when it learns the commit
landed (``give_up``: removed), after the clients that did not move have
been told goodbye from it and before its frozen connections are let go, so
a late packet of a moved client finds no address here rather than a reset.
Until then both hosts have it for a moment; the destination's announcement
is what the clients follow.  The announcer's packet socket is opened ahead of
time: binding one takes tens of milliseconds, too long for the hold.

Trouble with the address is logged and never fails the handoff: the image
is safe either way, and only the clients' connections depend on it.
"""

from __future__ import annotations

from twisted.logger import Logger

from ferry.handoff import address
from ferry.handoff.address import AddressError, Announcer, ServiceAddress

__all__ = ["ServiceAddressHolder"]

_log = Logger()

#: Gratuitous ARPs sent on taking the address: one may be lost on a busy link.
ANNOUNCEMENTS = 2


class ServiceAddressHolder:
    """Adds, gives up, takes back and announces one service address; see the module doc."""

    def __init__(self, service: ServiceAddress) -> None:
        self.address = service
        # Raises AddressError (no such device, no CAP_NET_RAW): a start-up error.
        self._announcer = Announcer(service) if service.ip.version == 4 else None

    def hold(self) -> bool:
        """At start: the address is on its device (added if it was missing); True if added."""
        return address.add(self.address)

    def give_up(self) -> None:
        """The image has moved to another host: remove the address (trouble is logged)."""
        try:
            address.remove(self.address)
        except AddressError as error:
            _log.error("cannot give up the service address: {error}", error=error)
            return
        _log.info("gave up the service address {address}", address=str(self.address))

    def take(self) -> None:
        """This node has the image now: add the address and announce it."""
        try:
            address.add(self.address)
            if self._announcer is not None:
                self._announcer.announce(ANNOUNCEMENTS)
        except AddressError as error:
            _log.error("cannot take the service address: {error}", error=error)
            return
        _log.info("took the service address {address}", address=str(self.address))

    def close(self) -> None:
        if self._announcer is not None:
            self._announcer.close()
