"""One export's trouble is its own: a daemon's other exports keep serving their clients.

A node serves ``sick``, whose disk is a double that can hang (``fdatasync``
or ``pwrite`` never returns until the test lets it) or fail (EIO), beside
``well``, an ordinary file.  The node runs in this process on the real
reactor (so the double can stand in for the disk), and every client is
libnbd's, in a process of its own.  Each test makes ``sick`` misbehave --
its disk hangs or fails, its lease is taken away, a client of it turns
hostile -- and checks that a client of ``well`` writes, flushes and reads
back meanwhile.

Every disk call of a request runs on a worker thread, and each export gets
at most its lane's share of them (``ferry.serve.lanes``): a disk that hangs
holds that share, and the reactor -- every other export, the lease
keep-alive, even the reads of ``sick`` the page cache can answer -- goes on.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from ferry.exports import ExportConfig
from ferry.lease.local import lock_file_name
from ferry.lease.spec import default_resource
from ferry.node import WORKER_THREADS, Node, NodeConfig
from ferry.serve.lanes import JOBS_PER_EXPORT
from ferry.storage import Image
from support import NBDSH, random_file

pytestmark = pytest.mark.integration

reactor: Any = _reactor
SIZE = 8 << 20
DEADLINE = 30.0

#: A client of ``well``: write, flush, read back.  It cannot finish if its
#: flush finds no worker thread.
WELL = """
data = bytes(range(256)) * 4096
h.pwrite(data, 0)
h.flush()
assert h.pread(len(data), 0) == data
print("ok")
"""


class DiskDouble(Image):
    """An image whose disk can hang on fdatasync, or fail every read and write with EIO."""

    def __init__(self, fd: int, path: Path, size: int, *, read_only: bool) -> None:
        super().__init__(fd, path, size, read_only=read_only)
        self.failing = False
        self.hung = False
        self.released = threading.Event()
        self.flushing = 0  # fdatasync calls inside the disk now
        self.writes_hang = False
        self.writing = 0  # pwrite calls that have entered the hung disk
        self._writers: list[Deferred[None]] = []
        self._lock = threading.Lock()
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def pread(self, offset: int, length: int) -> bytes:
        if self.failing:
            raise OSError(errno.EIO, "the disk double fails")
        return super().pread(offset, length)

    def pwrite(self, data: Any, offset: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, "the disk double fails")
        if self.writes_hang:  # on a worker thread: it stays here until released
            with self._lock:
                self.writing += 1
            reactor.callFromThread(self._tell)
            self.released.wait()
        super().pwrite(data, offset)

    def write_nowait(self, data: Any, offset: int) -> int:
        return 0  # every write goes to pwrite, on a thread, where the double may hang it

    def flush(self) -> None:
        if self.hung:  # on a worker thread: it stays here until released
            with self._lock:
                self.flushing += 1
            reactor.callFromThread(self._tell)
            self.released.wait()
            with self._lock:
                self.flushing -= 1
        super().flush()

    def when_writing(self) -> Deferred[None]:
        """Fires on the reactor once a write is inside the hung disk."""
        d: Deferred[None] = Deferred()
        self._writers.append(d)
        self._tell()
        return d

    def when_flushing(self, count: int) -> Deferred[None]:
        """Fires on the reactor once ``count`` flushes are inside the hung disk."""
        d: Deferred[None] = Deferred()
        self._waiting.append((count, d))
        self._tell()
        return d

    def _tell(self) -> None:
        if self.writing:
            writers, self._writers = self._writers, []
            for d in writers:
                d.callback(None)
        for entry in list(self._waiting):
            count, d = entry
            if self.flushing >= count:
                self._waiting.remove(entry)
                d.callback(None)


class Client(ProcessProtocol):
    """An nbdsh script in a process of its own; ``done`` fires with (exit code, output)."""

    def __init__(self) -> None:
        self.out = b""
        self.done: Deferred[tuple[int, str]] = Deferred()
        self.ended = False
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def when_output(self, text: str) -> Deferred[None]:
        """Fires once the client has printed ``text``."""
        d: Deferred[None] = Deferred()
        self._waiting.append((text.encode(), d))
        self.outReceived(b"")
        return d

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for entry in list(self._waiting):
            if entry[0] in self.out:
                self._waiting.remove(entry)
                entry[1].callback(None)

    def errReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        self.done.callback((reason.value.exitCode, self.out.decode(errors="replace")))


class Clients:
    """Starts clients; kills those still running when the test ends."""

    def __init__(self) -> None:
        self.running: list[tuple[Client, Any]] = []

    def start(self, uri: str, script: str) -> Client:
        client = Client()
        argv = [*NBDSH, "-u", uri, "-c", script]
        transport = reactor.spawnProcess(client, argv[0], argv, env=dict(os.environ))
        self.running.append((client, transport))
        return client

    def run(self, uri: str, script: str) -> Deferred[tuple[int, str]]:
        """Run a client to its end, within the deadline."""
        return self.start(uri, script).done.addTimeout(DEADLINE, reactor)

    def kill_all(self) -> None:
        for client, transport in self.running:
            if not client.ended:
                transport.signalProcess("KILL")


@pytest.fixture
def clients() -> Iterator[Clients]:
    started = Clients()
    yield started
    started.kill_all()


class Daemon:
    """A node serving ``sick`` (on the disk double) and ``well``, with a local lockspace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.locks = root / "locks"
        self.locks.mkdir(mode=0o700)
        self.sick_file = random_file(root / "sick.img", SIZE, seed=1)
        self.well_file = random_file(root / "well.img", SIZE, seed=2)
        self.sick: DiskDouble | None = None
        self.node = Node(
            reactor,
            NodeConfig(
                addr="127.0.0.1", port=0, lockspace=f"local:{self.locks}", exit_stops_node=False
            ),
            [
                ExportConfig(file=str(self.sick_file), name="sick"),
                ExportConfig(file=str(self.well_file), name="well"),
            ],
            open_image=self._open,
        )

    def _open(self, path: str, *, read_only: bool = False) -> Image:
        if Path(path) == self.sick_file:
            self.sick = DiskDouble.open(path, read_only=read_only)
            return self.sick
        return Image.open(path, read_only=read_only)

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.node.port}/{name}"

    def state(self, name: str) -> str:
        return self.node.exports.get(name).export.state

    @defer.inlineCallbacks
    def stop(self) -> Any:
        if self.sick is not None:
            self.sick.hung = self.sick.failing = self.sick.writes_hang = False
            self.sick.released.set()
        yield self.node.shutdown()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    started = Daemon(tmp_path)
    yield started
    pytest_twisted.blockon(started.stop())


@pytest_twisted.inlineCallbacks
def test_a_hung_disk_holds_its_lane_and_the_other_export_flushes(
    daemon: Daemon, clients: Clients
) -> Any:
    yield daemon.node.start()
    assert daemon.sick is not None
    daemon.sick.hung = True
    # More flushes than the node has worker threads, pipelined, never answered.
    flushes = 2 * WORKER_THREADS
    hostile = clients.start(
        daemon.uri("sick"),
        f"""
for _ in range({flushes}):
    h.aio_flush()
while h.aio_in_flight():
    h.poll(-1)
print("all answered")
""",
    )
    yield daemon.sick.when_flushing(JOBS_PER_EXPORT).addTimeout(DEADLINE, reactor)
    code, out = yield clients.run(daemon.uri("well"), WELL)
    assert (code, out) == (0, "ok\n")
    # The hung disk holds its lane's share of the threads, no more: the rest wait in its lane.
    assert daemon.sick.flushing == JOBS_PER_EXPORT
    assert not hostile.ended
    daemon.sick.released.set()
    code, out = yield hostile.done.addTimeout(DEADLINE, reactor)
    assert (code, out) == (0, "all answered\n")


class Renewals:
    """Counts the lockspace's answered renewals, per resource (a spy on the real lockspace)."""

    def __init__(self, lockspace: Any) -> None:
        self.done: dict[str, int] = {}
        self._waiting: list[tuple[str, int, Deferred[None]]] = []
        renew = lockspace.renew

        def counted(grant: Any) -> Deferred[None]:
            def answered(result: object) -> object:
                self.done[grant.resource] = self.done.get(grant.resource, 0) + 1
                for entry in list(self._waiting):
                    if self.done[entry[0]] >= entry[1]:
                        self._waiting.remove(entry)
                        entry[2].callback(None)
                return result

            d: Deferred[None] = renew(grant)
            return d.addCallback(answered)

        lockspace.renew = counted

    def when(self, resource: str, count: int) -> Deferred[None]:
        """Fires once ``count`` renewals of ``resource`` have been answered in all."""
        d: Deferred[None] = Deferred()
        if self.done.get(resource, 0) >= count:
            d.callback(None)
        else:
            self._waiting.append((resource, count, d))
        return d


@pytest_twisted.inlineCallbacks
def test_a_disk_that_hangs_on_a_write_stalls_that_write_only(
    daemon: Daemon, clients: Clients
) -> Any:
    yield daemon.node.start()
    assert daemon.sick is not None
    renewals = Renewals(daemon.node._lockspace)
    daemon.sick.writes_hang = True
    stalled = clients.start(
        daemon.uri("sick"),
        """
h.pwrite(b"w" * 4096, 0)
print("written")
""",
    )
    yield daemon.sick.when_writing().addTimeout(DEADLINE, reactor)
    # The other export is served: a write, a flush, a read back.
    code, out = yield clients.run(daemon.uri("well"), WELL)
    assert (code, out) == (0, "ok\n")
    # Another client of the sick export reads what the page cache holds.
    expected = daemon.sick_file.read_bytes()[1 << 20 : (1 << 20) + 4096]
    code, out = yield clients.run(
        daemon.uri("sick"), f"print(h.pread(4096, 1 << 20) == {expected!r})"
    )
    assert (code, out) == (0, "True\n")
    # Both leases are renewed by the reactor meanwhile, the sick export's too.
    sick_resource = default_resource(daemon.sick_file)
    well_resource = default_resource(daemon.well_file)
    yield renewals.when(sick_resource, 1).addTimeout(DEADLINE, reactor)
    yield renewals.when(well_resource, 1).addTimeout(DEADLINE, reactor)
    assert not stalled.ended and daemon.sick.writing == 1
    assert daemon.state("sick") == "serving"
    daemon.sick.released.set()
    code, out = yield stalled.done.addTimeout(DEADLINE, reactor)
    assert (code, out) == (0, "written\n")
    assert daemon.sick_file.read_bytes()[:4096] == b"w" * 4096


@pytest_twisted.inlineCallbacks
def test_a_failing_disk_fails_its_own_clients_only(daemon: Daemon, clients: Clients) -> Any:
    yield daemon.node.start()
    assert daemon.sick is not None
    daemon.sick.failing = True
    code, out = yield clients.run(
        daemon.uri("sick"),
        """
try:
    h.pwrite(b"x" * 4096, 0)
except nbd.Error as error:
    print(error.errno)  # libnbd names it
""",
    )
    assert (code, out) == (0, "EIO\n")
    code, out = yield clients.run(daemon.uri("well"), WELL)
    assert (code, out) == (0, "ok\n")
    assert (daemon.state("sick"), daemon.state("well")) == ("serving", "serving")


@pytest_twisted.inlineCallbacks
def test_a_fenced_export_stops_alone(daemon: Daemon, clients: Clients) -> Any:
    yield daemon.node.start()
    fenced: Deferred[None] = Deferred()
    sick = daemon.node.exports.get("sick").export
    sick.observe_role(lambda trigger, source, dest: dest == "fenced" and fenced.callback(None))
    # Someone takes sick's lock file away: its lease is lost, and the node sees it at once.
    os.unlink(daemon.locks / lock_file_name(default_resource(daemon.sick_file)))
    yield fenced.addTimeout(DEADLINE, reactor)
    code, out = yield clients.run(daemon.uri("sick"), 'print("connected")')
    assert code != 0 and "connected" not in out  # a fenced export takes no client
    code, out = yield clients.run(daemon.uri("well"), WELL)
    assert (code, out) == (0, "ok\n")
    well = daemon.node.exports.get("well")
    assert well.lease is not None and well.lease.state == "held"
    assert daemon.state("well") == "serving"


@pytest_twisted.inlineCallbacks
def test_a_greedy_client_of_one_export_does_not_slow_the_other(
    daemon: Daemon, clients: Clients
) -> Any:
    yield daemon.node.start()
    # A client of sick asks for the whole image eight times over, pipelined, and
    # never reads a reply: its connection is paused, no one else's.
    greedy = clients.start(
        daemon.uri("sick"),
        f"""
import time
for offset in range(0, {SIZE}, 1 << 20):
    for _ in range(8):
        h.aio_pread(nbd.Buffer(1 << 20), offset)
print("sent", flush=True)
time.sleep(3600)  # the hostile part: it never reads what comes back
""",
    )
    yield greedy.when_output("sent").addTimeout(DEADLINE, reactor)
    for _ in range(3):
        code, out = yield clients.run(daemon.uri("well"), WELL)
        assert (code, out) == (0, "ok\n")
    assert daemon.node.exports.get("sick").export.num_clients == 1 and not greedy.ended
