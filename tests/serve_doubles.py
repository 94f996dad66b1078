"""Test doubles for the Twisted data plane, shared by its unit tests.

``Blocking`` stands in for the worker thread pool so a test decides when a
job finishes; ``Peer`` wires ferry's sans-IO NBD client to a protocol under
test through a ``StringTransport``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ferry.nbd.client import ClientConnection


class Blocking:
    """A run_blocking that holds jobs until the test releases or fails them.

    By default it holds only fsyncs (an image's ``flush``: FLUSH, FUA, a
    commit), and runs every other disk call at once, as if a thread had
    done it in no time: the tests about what waits for an fsync.  With
    ``hold_all`` it holds every job (reads, writes, extents too).
    """

    def __init__(self, *, hold_all: bool = False) -> None:
        self.jobs: list[tuple[Callable[[], object], defer.Deferred[Any]]] = []
        self.hold_all = hold_all

    def __call__(self, work: Callable[[], object]) -> defer.Deferred[Any]:
        if not self.hold_all and getattr(work, "__name__", "") != "flush":
            try:
                return defer.succeed(work())
            except Exception as error:
                return defer.fail(error)
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((work, d))
        return d

    def release(self, index: int) -> None:
        """Let the job at ``index`` (in the order they came) run and finish now."""
        work, d = self.jobs.pop(index)
        try:
            result = work()
        except Exception as error:
            d.errback(Failure(error))
        else:
            d.callback(result)

    def release_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for work, d in jobs:
            d.callback(work())

    def fail_all(self, error: Exception) -> None:
        jobs, self.jobs = self.jobs, []
        for _, d in jobs:
            d.errback(Failure(error))


class Peer:
    """One client connection: a sans-IO client, a protocol, and the transport between."""

    def __init__(
        self, protocol: Protocol, transport: StringTransport, client: ClientConnection
    ) -> None:
        self.protocol = protocol
        self.transport = transport
        self.client = client
        self.events: list[Any] = []

    def pump(self) -> list[Any]:
        """Move bytes both ways until neither side has anything to say."""
        while True:
            to_client = self.transport.value()
            self.transport.clear()
            if to_client:
                self.events.extend(self.client.receive_data(to_client))
            to_server = self.client.data_to_send()
            if to_server and not self.transport.disconnecting:
                self.protocol.dataReceived(to_server)
            if not to_client and not to_server:
                return self.events
