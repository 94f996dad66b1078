"""Requests on worker threads keep NBD's order, however the threads interleave.

The data plane runs each READ, WRITE, WRITE_ZEROES, TRIM and FLUSH on a
worker thread, and threads finish in any order.  Here the pool is a double
that holds every job (``Blocking(hold_all=True)``) and hypothesis picks
which held job runs next, so every interleaving the real pool could produce
is one a test can draw; and which WRITEs the kernel takes at once, on the
reactor thread (``Image.write_nowait``, as XFS does), is drawn too.
Whatever it draws, the result must be the
sequential one: each READ returns what the writes that arrived before it
left, the image ends as if the requests had run one at a time in arrival
order, and each FLUSH runs only after every write that arrived before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

import serve_doubles
from ferry.clock import ReactorClock
from ferry.nbd.client import ClientConnection
from ferry.nbd.constants import Command, CommandFlag, Errno
from ferry.nbd.events import Reply
from ferry.serve.connection import NBDServerProtocol
from ferry.serve.export import Export
from ferry.serve.ordering import Access, Job, RequestOrder
from ferry.serve.server import NBDServer
from ferry.storage import Image
from serve_doubles import Blocking

SIZE = 64 * 1024
SECTOR = 512


class RecordingImage(Image):
    """An image that counts the writes it has performed, and what each FLUSH found done."""

    def __init__(self, fd: int, path: Path, size: int, *, read_only: bool) -> None:
        super().__init__(fd, path, size, read_only=read_only)
        self.done: Counter[tuple[str, int, int]] = Counter()
        self.flushes: list[Counter[tuple[str, int, int]]] = []
        self.takes_at_once: Callable[[], bool] = lambda: False

    def pwrite(self, data: Any, offset: int) -> None:
        super().pwrite(data, offset)
        self.done["write", offset, len(data)] += 1

    def write_nowait(self, data: Any, offset: int) -> int:
        """All of it at once or none of it (then a thread writes it), as the test draws."""
        if not self.takes_at_once():
            return 0
        self.pwrite(data, offset)
        return len(data)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast_only: bool = False
    ) -> None:
        super().write_zeroes(offset, length, may_trim=may_trim, fast_only=fast_only)
        self.done["write", offset, length] += 1

    def punch_hole(self, offset: int, length: int) -> None:
        super().punch_hole(offset, length)
        self.done["write", offset, length] += 1

    def flush(self) -> None:
        super().flush()
        self.flushes.append(Counter(self.done))


class Node:
    def __init__(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * (SIZE // 256))
        self.image = RecordingImage.open(path)
        clock = ReactorClock(task.Clock())
        self.export = Export("disk", self.image, clock=clock)
        self.export.trigger("serve")
        self.blocking = Blocking(hold_all=True)
        self.server = NBDServer([self.export], clock=clock, run_blocking=self.blocking)

    def connect(self) -> serve_doubles.Peer:
        protocol = self.server.buildProtocol(None)
        assert isinstance(protocol, NBDServerProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        peer = serve_doubles.Peer(protocol, transport, ClientConnection("disk"))
        peer.pump()
        assert peer.client.negotiated is not None
        peer.events.clear()
        return peer


# One request: (connection, command, offset, length, FUA).
ranges = st.tuples(st.integers(0, SIZE // SECTOR - 1), st.integers(1, 16)).map(
    lambda r: (r[0] * SECTOR, min(r[1] * SECTOR, SIZE - r[0] * SECTOR))
)
requests = st.lists(
    st.tuples(
        st.integers(0, 1),
        st.sampled_from(
            [
                Command.WRITE,
                Command.WRITE,
                Command.READ,
                Command.READ,
                Command.FLUSH,
                Command.WRITE_ZEROES,
                Command.TRIM,
            ]
        ),
        ranges,
        st.booleans(),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=requests, data=st.data())
def test_any_interleaving_of_the_threads_gives_the_sequential_result(
    tmp_path_factory: pytest.TempPathFactory, ops: list[Any], data: st.DataObject
) -> None:
    node = Node(tmp_path_factory.mktemp("order") / "disk.img")
    # Which writes the kernel takes at once (on the reactor thread, as XFS does) is drawn too.
    node.image.takes_at_once = lambda: data.draw(st.booleans())
    peers = [node.connect(), node.connect()]
    model = bytearray(node.image.pread(0, SIZE))
    expected_reads: dict[tuple[int, int], bytes] = {}
    writes_before: dict[tuple[int, int], Counter[tuple[str, int, int]]] = {}
    written: Counter[tuple[str, int, int]] = Counter()
    fua_writes: dict[tuple[int, int], tuple[str, int, int]] = {}
    for index, (which, command, (offset, length), fua) in enumerate(ops):
        client = peers[which].client
        flags = CommandFlag.FUA if fua and command is not Command.READ else CommandFlag(0)
        if command is Command.WRITE:
            payload = bytes([index + 1]) * length
            handle = client.request(command, offset, data=payload, flags=flags)
            model[offset : offset + length] = payload
        elif command is Command.READ:
            handle = client.request(command, offset, length)
            expected_reads[which, handle] = bytes(model[offset : offset + length])
        elif command is Command.FLUSH:
            handle = client.request(command)
            writes_before[which, handle] = Counter(written)
        else:  # WRITE_ZEROES, TRIM: both read back as zeroes in ferry
            handle = client.request(command, offset, length, flags=flags)
            model[offset : offset + length] = bytes(length)
        if command in (Command.WRITE, Command.WRITE_ZEROES, Command.TRIM):
            written["write", offset, length] += 1
            if fua:
                fua_writes[which, handle] = ("write", offset, length)
        peers[which].pump()  # it arrives now: after every request before it
    # The threads finish in whatever order hypothesis draws.  One release runs
    # one job: a FLUSH (or FUA) reply that appears after it was answered by the
    # fsync that job was, which must have found every write before it done.
    seen: set[tuple[int, int]] = set(_replies(peers))  # reads answered from the cache
    while node.blocking.jobs:
        node.blocking.release(data.draw(st.integers(0, len(node.blocking.jobs) - 1)))
        for peer in peers:
            peer.pump()
        answered = set(_replies(peers))
        for key in answered - seen:
            seen.add(key)
            if key in writes_before:
                assert node.image.flushes, key
                assert not writes_before[key] - node.image.flushes[-1], key
            if key in fua_writes:
                assert node.image.flushes[-1][fua_writes[key]] >= 1, key
    replies = _replies(peers)
    assert len(replies) == len(ops)
    assert all(reply.error == Errno.OK for reply in replies.values())
    for key, expected in expected_reads.items():
        assert replies[key].data == expected
    assert node.image.pread(0, SIZE) == bytes(model)
    assert len(node.export.order) == 0


def _replies(peers: list[serve_doubles.Peer]) -> dict[tuple[int, int], Reply]:
    return {
        (which, e.handle): e
        for which, peer in enumerate(peers)
        for e in peer.events
        if isinstance(e, Reply)
    }


# -- the books themselves -------------------------------------------------------------------


def test_overlapping_requests_wait_where_one_of_them_writes() -> None:
    order = RequestOrder()
    started: list[str] = []

    def job(name: str, access: Access, offset: int = 0, length: int = 0) -> Job:
        made = Job(access, offset, length, lambda: started.append(name))
        if order.admit(made):
            started.append(name)
        return made

    write = job("write", Access.WRITE, 0, 4096)
    job("read elsewhere", Access.READ, 4096, 4096)
    read = job("read under the write", Access.READ, 1024, 10)
    job("second read", Access.READ, 1024, 10)
    rewrite = job("write over the read", Access.WRITE, 1030, 1)
    flush = job("flush", Access.FLUSH)
    job("write after the flush", Access.WRITE, 8192, 512)
    assert started == ["write", "read elsewhere", "write after the flush"]
    order.finish(write)
    assert started[3:] == ["read under the write", "second read"]
    order.finish(read)
    assert started[5:] == []  # the second read still reads what the rewrite would change
    assert rewrite.blockers == 1 and flush.blockers == 1


def test_the_switchover_waits_for_the_writes_admitted_before_it() -> None:
    order = RequestOrder()
    first = Job(Access.WRITE, 0, 512, lambda: None)
    read = Job(Access.READ, 0, 512, lambda: None)
    order.admit(first)
    order.admit(read)
    landed: list[str] = []
    order.when_writes_done(lambda: landed.append("landed"))
    later = Job(Access.WRITE, 4096, 512, lambda: None)
    order.admit(later)  # admitted after the wait began: not waited for
    assert landed == []
    order.finish(first)
    assert landed == ["landed"]
    order.when_writes_done(lambda: landed.append("again"))
    assert landed == ["landed"]
    order.finish(later)
    assert landed == ["landed", "again"]
    empty = RequestOrder()
    empty.when_writes_done(lambda: landed.append("at once"))
    assert landed[-1] == "at once"


def test_a_job_cannot_finish_twice() -> None:
    order = RequestOrder()
    job = Job(Access.READ, 0, 1, lambda: None)
    order.admit(job)
    order.finish(job)
    with pytest.raises(ValueError, match="twice"):
        order.finish(job)
