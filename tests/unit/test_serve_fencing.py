"""The data plane under a lease: once the lease is lost or past its deadline, no byte moves.

An export serving on Twisted's test doubles holds a lease from the in-memory
lockspace, on the same simulated clock.  The decisive case is the paused
process: the clock jumps past the lease's local deadline *without any timer
running* (as after SIGSTOP/SIGCONT), and the very next request must fail
with EIO and leave the file untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fakes.lockspace import FakeLockspace
from ferry.lease.manager import LeaseManager
from ferry.nbd.constants import Command, Errno

from .test_serve_connection import Harness

TTL = 9.0


class LeasedHarness(Harness):
    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.lockspace = FakeLockspace(self.clock, ttl=TTL)
        self.fenced: list[str] = []
        self.lease = LeaseManager(
            self.lockspace,
            resource="disk.img",
            owner="test:1:disk",
            clock=self.clock,
            on_fenced=self.fenced.append,
        )
        self.lease.register()
        self.lease.acquire()
        assert self.lease.state == "held"
        self.export.lease = self.lease


@pytest.fixture
def leased(tmp_path: Path) -> LeasedHarness:
    return LeasedHarness(tmp_path)


def write(harness: Harness, offset: int, data: bytes) -> Errno:
    peer = harness.connect()
    peer.negotiate()
    handle = peer.client.request(Command.WRITE, offset, data=data)
    return peer.replies()[handle].error


def test_a_held_lease_lets_requests_through_and_shows_in_status(leased: LeasedHarness) -> None:
    assert write(leased, 0, b"ok") == Errno.OK
    assert leased.image.pread(0, 2) == b"ok"
    status = leased.export.snapshot()
    assert (status.lease_state, status.lease_token) == ("held", leased.lease.token)


def test_a_process_resumed_past_its_deadline_writes_nothing(leased: LeasedHarness) -> None:
    peer = leased.connect()
    peer.negotiate()
    deadline = leased.lease.deadline
    assert deadline is not None
    # SIGSTOP ... SIGCONT: time passed, no timer ran, the keep-alive never fired.
    leased.reactor.rightNow = deadline + 0.001
    handle = peer.client.request(Command.WRITE, 0, data=b"late")
    read = peer.client.request(Command.READ, 0, 4)
    replies = peer.replies()
    assert replies[handle].error == Errno.EIO
    assert replies[read].error == Errno.EIO
    assert leased.image.pread(0, 4) == bytes(4)
    assert leased.export.stats.bytes_written == 0


def test_a_lost_lease_fences_the_export(leased: LeasedHarness) -> None:
    on_fenced = leased.fenced
    leased.lockspace.lose("disk.img")
    leased.reactor.advance(TTL / 3)  # the next renewal hears it is gone
    assert leased.lease.state == "fenced" and len(on_fenced) == 1
    assert write(leased, 512, b"after") == Errno.EIO
    assert leased.image.pread(512, 5) == bytes(5)
    assert leased.export.snapshot().lease_state == "fenced"
