"""Where to look for the image: the places a proxy tries, best first, each time it connects.

The proxy asks a :class:`Finder` for locations before every attempt, so
the answer can change while the client waits: after a handoff the
lockspace names the new holder as soon as it has taken the lease.  Two
finders exist:

* :class:`FixedAddress` -- ``--conn-addr``/``--conn-port``, always (a
  server restarted in place, or a source that says where the image went:
  that answer is the upstream attempt's, see :mod:`ferry.proxy.upstream`);
* :class:`LockspaceFinder` -- ``--lockspace etcd:... --resource NAME``: the
  address the image's exclusive lease holder publishes (a
  :class:`Directory`), then ``--conn-addr`` if the lockspace names none or
  cannot be reached.

Locations that have served this client before are tried first by the
session itself (the last one that worked), so a finder only says where the
image may be now.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.nbd.locate import Location

__all__ = ["Directory", "Finder", "FixedAddress", "LockspaceFinder", "parse_address"]

_log = Logger()


class Finder(Protocol):
    """Where the image may be served now, best first (never empty)."""

    def locations(self) -> Deferred[list[Location]]: ...

    def describe(self) -> str:
        """For logs and the status line: where this finder looks."""
        ...


class FixedAddress:
    """One address, always: ``--conn-addr`` and ``--conn-port``."""

    def __init__(self, location: Location) -> None:
        self.location = location

    def locations(self) -> Deferred[list[Location]]:
        return succeed([self.location])

    def describe(self) -> str:
        return str(self.location)


class Directory(Protocol):
    """What a lockspace says about who serves a resource."""

    @property
    def spec(self) -> str: ...

    def where(self, resource: str) -> Deferred[list[str]]:
        """The ``HOST:PORT`` addresses the resource's exclusive holder serves at (maybe none)."""
        ...


class LockspaceFinder:
    """The lease holder's published address first, then the fixed one."""

    def __init__(
        self, directory: Directory, resource: str, fallback: Location, export_name: str
    ) -> None:
        self.directory = directory
        self.resource = resource
        self.fallback = fallback
        self.export_name = export_name

    def locations(self) -> Deferred[list[Location]]:
        def found(addresses: list[str]) -> list[Location]:
            places: list[Location] = []
            for address in addresses:
                try:
                    host, port = parse_address(address)
                    places.append(Location(host, port, self.export_name))
                except ValueError as error:
                    _log.warn(
                        "{space}: {resource} is served at {address!r}, which is not "
                        "HOST:PORT: {error}",
                        space=self.directory.spec,
                        resource=self.resource,
                        address=address,
                        error=error,
                    )
            return [*places, *([] if self.fallback in places else [self.fallback])]

        def unavailable(failure: Failure) -> list[Location]:
            _log.info(
                "{space}: cannot ask who serves {resource}: {why}; trying {fallback}",
                space=self.directory.spec,
                resource=self.resource,
                why=failure.getErrorMessage(),
                fallback=str(self.fallback),
            )
            return [self.fallback]

        return self.directory.where(self.resource).addCallbacks(found, unavailable)

    def describe(self) -> str:
        return f"{self.resource} in {self.directory.spec}, else {self.fallback}"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` to (host without brackets, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"unbalanced brackets in {text!r}")
    number = int(port)
    if not 0 < number < 1 << 16:
        raise ValueError(f"port {number} out of range")
    return host.strip("[]"), number
