"""MirrorSource against scripted fake destinations over loopback TCP.

The bytes go over real sockets on the test reactor (pytest-twisted); the
source's timers (hello, reply, retry, pacing) run on a ``task.Clock`` the
test advances, so a 60 s reply timeout takes no time and nothing sleeps.
Every wait is on a Deferred with a deadline.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

from fakes.destination import Commit, FakeDestination, Hello, Migrate, Script
from fakes.flexnbd import MIRROR, FakeFlexnbdListener, ListenerScript
from fakes.gate import FakeGate
from ferry import statecharts
from ferry.clock import ReactorClock
from ferry.migrate.attempt import Attempt
from ferry.migrate.options import (
    FAILED_TO_CONNECT,
    MIRROR_STARTED,
    NO_HELLO,
    REJECTED,
    SIZE_MISMATCH,
    CannotBreak,
    CopyMode,
    Destination,
    FinishAction,
    MirrorOptions,
    MirrorResult,
    NotMirroring,
    StartOutcome,
)
from ferry.migrate.source import MirrorSource
from ferry.migrate.wire import tcp_connector
from ferry.nbd.constants import Command, CommandFlag
from ferry.nbd.events import Request
from ferry.replay import replay
from ferry.serve.export import Export
from ferry.trace import CREATED, Tracer, TraceRecord

from .migrate_support import KIB, MIB, sparse_image

reactor: Any = _reactor
SIZE = 4 * MIB
DEADLINE = 10.0
DATA = [(0, b"a" * MIB), (3 * MIB, b"b" * 512 * KIB)]


def within(d: Deferred[Any]) -> Deferred[Any]:
    return d.addTimeout(DEADLINE, reactor)


class Rig:
    """An export serving a sparse image, a fake gate, and a source aimed at ``port``."""

    def __init__(
        self,
        tmp_path: Path,
        port: int,
        *,
        connector: Any = None,
        image_calls: Any = None,
        **options: Any,
    ) -> None:
        self.path = tmp_path / "src.img"
        self.image = sparse_image(self.path, SIZE, DATA)
        self.original = self.path.read_bytes()
        self.clock = task.Clock()
        self.rclock = ReactorClock(self.clock)
        self.records: list[TraceRecord] = []
        self.tracer = Tracer(self.records.append)
        self.export = Export("disk", self.image, clock=self.rclock, tracer=self.tracer)
        self.export.trigger("serve")
        self.gate = FakeGate(self.export, self.rclock)
        self.stopped = 0
        options.setdefault("action", FinishAction.NOTHING)
        self.source = MirrorSource(
            self.export,
            Destination("127.0.0.1", port),
            gate=self.gate,
            clock=self.rclock,
            connector=connector or tcp_connector(reactor),
            options=MirrorOptions(**options),
            tracer=self.tracer,
            stop_process=self._stop,
            image_calls=image_calls,
        )

    def _stop(self) -> None:
        self.stopped += 1

    def reached(self, machine: str, state: str) -> Deferred[TraceRecord]:
        """Fires when ``machine`` enters ``state`` (at once if it is there now)."""
        d: Deferred[TraceRecord] = Deferred()
        current = self.source.state if machine == "migration" else self.export.state
        if current == state:
            d.callback(self.records[-1])
            return within(d)

        def sink(rec: TraceRecord) -> None:
            if rec.machine == machine and rec.dest == state and rec.ok and not d.called:
                unsubscribe()
                # Resume the test after the transition, not inside its trace hook.
                reactor.callLater(0, d.callback, rec)

        unsubscribe = self.tracer.subscribe(sink)
        return within(d)

    def states(self, machine: str) -> list[str]:
        return [
            r.dest for r in self.records if r.machine == machine and r.ok and r.event != CREATED
        ]

    def replays(self) -> None:
        result = replay([r.to_json() for r in self.records], statecharts.load_all())
        assert result.final_states[("role", "disk")] == self.export.state
        assert result.final_states[("migration", "disk")] == self.source.state

    def untouched(self) -> bool:
        return self.path.read_bytes() == self.original


@pytest.fixture
def listen() -> Iterator[Any]:
    ports: list[IListeningPort] = []

    def start(factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return int(port.getHost().port)

    yield start
    for port in ports:
        port.stopListening()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- success ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_migration_while_a_client_writes(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE)
    rig = Rig(tmp_path, listen(fake))
    outcome = await within(rig.source.start())
    assert outcome == StartOutcome(True, MIRROR_STARTED, plain_target=False)
    assert outcome.reply == "0: Mirror started"
    assert rig.export.state == "migrating"
    # The bulk pass is on the wire; a client writes behind and ahead of it.
    assert rig.gate.write(3 * MIB + 4096, b"c" * 4096)
    assert rig.gate.write(2 * MIB, b"d" * 100)  # into a hole
    await rig.reached("migration", "dirty_pass")
    assert rig.gate.write(0, b"e" * 8192)
    # A write dispatched before the switchover that lands only once it began.
    token = rig.gate.begin_write(MIB + 512, b"f" * 512)
    await rig.reached("role", "quiescing")
    assert rig.source.state == "quiescing" and rig.source.job.plan is None
    assert not rig.gate.write(5, b"held")  # held, not failed
    rig.clock.advance(0.02)
    rig.gate.finish_write(token)
    result: MirrorResult = await within(rig.source.finished)
    assert result == MirrorResult(
        "completed", True, "handed over to 127.0.0.1:" + str(rig.source.destination.port)
    )
    await within(fake.sessions[-1].lost)
    expected = bytearray(rig.original)
    for offset, data in [
        (3 * MIB + 4096, b"c" * 4096),
        (2 * MIB, b"d" * 100),
        (0, b"e" * 8192),
        (MIB + 512, b"f" * 512),
    ]:
        expected[offset : offset + len(data)] = data
    assert rig.path.read_bytes() == bytes(expected)
    assert fake.disk == expected  # the held write never reached either side
    assert rig.gate.dropped and rig.gate.dropped[0][:2] == (5, b"held")
    assert rig.export.state == "handed_off" and not rig.export.has_control
    assert rig.gate.disconnected == [f"the image was handed over to {rig.source.destination}"]
    session = fake.sessions[-1]
    assert session.migrate_request == (1, SIZE)
    assert session.commit_token == 0
    assert session.commands[-3:] == ["FLUSH", "COMMIT", "DISC"]
    assert fake.committed and rig.stopped == 0
    assert rig.states("role") == ["serving", "migrating", "quiescing", "handing_off", "handed_off"]
    migration = rig.states("migration")
    assert migration[:3] == ["negotiating", "bulk_pass", "dirty_pass"]
    assert migration[-3:] == ["quiescing", "committing", "completed"]
    progress = rig.source.progress()
    assert progress.is_migrating is False and progress.last_downtime_ms == 20
    rig.replays()
    with pytest.raises(NotMirroring):
        rig.source.cancel()


@pytest_twisted.ensureDeferred
async def test_the_passes_read_the_image_on_threads(tmp_path: Path, listen: Any) -> None:
    """The extent scan and each data request's bytes are read off the reactor."""
    readers: list[str] = []
    rig: Rig

    def on_a_thread(work: Any) -> Deferred[Any]:
        def call() -> Any:
            readers.append(threading.current_thread().name)
            return work()

        return threads.deferToThread(call)

    fake = FakeDestination(SIZE)
    rig = Rig(tmp_path, listen(fake), image_calls=on_a_thread, max_in_flight=3)
    assert (await within(rig.source.start())).ok
    assert rig.gate.write(3 * MIB, b"w" * 4096)
    result = await within(rig.source.finished)
    assert result.handed_off
    expected = bytearray(rig.original)
    expected[3 * MIB : 3 * MIB + 4096] = b"w" * 4096
    assert fake.disk == expected
    assert readers and threading.main_thread().name not in readers
    # Every data request's read, and the bulk pass's extent scan.
    assert rig.source.counters.data_requests + 1 == len(readers)


@pytest_twisted.ensureDeferred
async def test_mirror_into_a_plain_nbd_server_keeps_serving(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE, [Script(migrate=Migrate.UNSUPPORTED)])
    rig = Rig(tmp_path, listen(fake))
    outcome = await within(rig.source.start())
    assert outcome.ok and outcome.plain_target
    result = await within(rig.source.finished)
    assert result == MirrorResult("completed", False, "mirrored to a plain NBD server")
    await within(fake.sessions[-1].lost)
    assert bytes(fake.disk) == rig.original
    assert rig.export.state == "serving" and rig.export.has_control
    assert rig.gate.releases == 1 and rig.gate.disconnected == []
    assert fake.sessions[-1].commands[-2:] == ["FLUSH", "DISC"]
    assert "COMMIT" not in fake.sessions[-1].commands
    # Holes went as WRITE_ZEROES, not as data.
    assert rig.source.counters.data_bytes == MIB + 512 * KIB
    assert fake.sessions[-1].data_bytes == MIB + 512 * KIB
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_exit_and_unlink_actions(tmp_path: Path, listen: Any) -> None:
    for action in (FinishAction.EXIT, FinishAction.UNLINK):
        fake = FakeDestination(SIZE)
        rig = Rig(tmp_path, listen(fake), action=action)
        await within(rig.source.start())
        await within(rig.source.finished)
        assert (rig.stopped, rig.path.exists()) == (
            (1, True) if action is FinishAction.EXIT else (0, False)
        )


# -- failures before a good negotiation: the job ends with flexnbd's reply ----------


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (Script(hello=Hello.CLOSE_AT_ONCE), REJECTED),
        (Script(hello=Hello.CLOSE_AFTER_HELLO), REJECTED),
        (Script(hello=Hello.WRONG_MAGIC), REJECTED),
        (Script(migrate=Migrate.REFUSE), REJECTED),
        (Script(size=SIZE + 4096), SIZE_MISMATCH),
        (Script(size=SIZE - 4096, migrate=Migrate.UNSUPPORTED), SIZE_MISMATCH),
    ],
    ids=["accept-close", "close-after-hello", "wrong-magic", "refused", "bigger", "smaller"],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_first_negotiation_ends_the_job(
    tmp_path: Path, listen: Any, script: Script, message: str
) -> None:
    fake = FakeDestination(SIZE, [script])
    rig = Rig(tmp_path, listen(fake))
    outcome = await within(rig.source.start())
    assert (outcome.ok, outcome.message) == (False, message)
    assert outcome.reply == f"1: {message}"
    await assert_failed_and_serving(rig)
    assert len(fake.sessions) == 1


async def assert_failed_and_serving(rig: Rig) -> None:
    result = await within(rig.source.finished)
    assert result.state == "failed" and not result.handed_off
    assert rig.source.state == "failed"
    assert rig.export.state == "serving"
    assert rig.untouched()
    assert rig.clock.getDelayedCalls() == []  # no retry
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_connection_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path, free_port())
    outcome = await within(rig.source.start())
    assert outcome.reply == f"1: {FAILED_TO_CONNECT}"
    await assert_failed_and_serving(rig)


@pytest_twisted.ensureDeferred
async def test_no_hello_within_five_seconds(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE, [Script(hello=Hello.SILENT)])
    rig = Rig(tmp_path, listen(fake))
    started = rig.source.start()
    await rig.reached("migration", "negotiating")
    rig.clock.advance(4.99)
    assert not started.called
    rig.clock.advance(0.01)
    outcome = await within(started)
    assert outcome.reply == f"1: {NO_HELLO}"
    await assert_failed_and_serving(rig)


@pytest_twisted.ensureDeferred
async def test_a_plain_target_refuses_a_handoff_action(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE, [Script(migrate=Migrate.UNSUPPORTED)])
    rig = Rig(tmp_path, listen(fake), action=FinishAction.UNLINK)
    outcome = await within(rig.source.start())
    assert outcome.message == REJECTED and "plain NBD server" in outcome.detail
    await assert_failed_and_serving(rig)


# -- failures after one: retry from scratch with backoff ----------------------------


async def fail_then_retry(rig: Rig, fake: FakeDestination, trigger: Any = None) -> None:
    """Drive the first attempt to its failure, check retry_wait, and let the retry run."""
    outcome = await within(rig.source.start())
    assert outcome.ok
    if trigger is not None:
        await trigger()
    await rig.reached("migration", "retry_wait")
    assert rig.export.state == "migrating"
    assert rig.untouched()
    (retry,) = [c for c in rig.clock.getDelayedCalls() if c.active()]
    assert retry.getTime() - rig.clock.seconds() == pytest.approx(1.0)
    rig.clock.advance(0.999)
    assert rig.source.state == "retry_wait"
    rig.clock.advance(0.001)
    result = await within(rig.source.finished)
    assert result.state == "completed" and result.handed_off
    assert rig.source.job.attempts == 2
    assert len(fake.sessions) == 2
    assert bytes(fake.disk) == rig.original
    assert rig.export.state == "handed_off"
    migration = rig.states("migration")
    assert migration[migration.index("retry_wait") :][:4] == [
        "retry_wait",
        "reconnecting",
        "renegotiating",
        "bulk_pass",
    ]
    rig.replays()


@pytest.mark.parametrize(
    "script",
    [
        Script(error_on_write=2),
        Script(close_on_write=2),
        Script(error_on_flush=1),
        Script(error_on_flush=2),
        Script(commit=Commit.REFUSE),
    ],
    ids=["error-reply", "close-before-reply", "preflush-error", "flush-error", "commit-rejected"],
)
@pytest_twisted.ensureDeferred
async def test_a_failed_attempt_retries_then_succeeds(
    tmp_path: Path, listen: Any, script: Script
) -> None:
    fake = FakeDestination(SIZE, [script, Script()])
    rig = Rig(tmp_path, listen(fake))
    await fail_then_retry(rig, fake)
    if script.error_on_flush == 2 or script.commit is Commit.REFUSE:
        # The switchover had begun: clients were held, then released, then held again.
        assert rig.gate.holds == 2 and rig.gate.releases == 1
        assert "retry_migration" in [r.event for r in rig.records if r.machine == "role"]
    if script.error_on_flush == 1:
        # The FLUSH after the bulk pass, before any switchover: nothing was held.
        assert rig.gate.holds == 1 and rig.gate.releases == 0
        assert fake.sessions[0].commands.count("FLUSH") == 1
    if script.commit is Commit.REFUSE:
        assert rig.states("role")[:5] == [
            "serving",
            "migrating",
            "quiescing",
            "handing_off",
            "migrating",
        ]


@pytest_twisted.ensureDeferred
async def test_a_flush_between_passes_overlaps_the_next_pass_but_not_a_switchover(
    tmp_path: Path, listen: Any
) -> None:
    fake = FakeDestination(SIZE, [Script(hold_flush=1)])
    rig = Rig(tmp_path, listen(fake))
    await within(rig.source.start())
    session = fake.sessions[-1]
    assert rig.gate.write(0, b"behind the bulk pass")  # its first request is on the wire
    await within(session.arrived("FLUSH"))
    # The bulk pass is over and its FLUSH unanswered: the dirty pass goes on regardless.
    assert rig.source.state == "dirty_pass"
    await within(session.arrived("WRITE", session.commands.count("WRITE") + 1))
    assert session.commands[-2:] == ["FLUSH", "WRITE"]
    # Its one write is answered, and the pass would switch over: not before the FLUSH.
    rig.clock.advance(0.01)
    assert rig.source.state == "dirty_pass" and rig.gate.holds == 0
    session.release_flush()
    result = await within(rig.source.finished)
    assert result.state == "completed"
    # The second FLUSH went before the switchover (clients not yet held), the third ended it.
    assert session.commands[-6:] == ["FLUSH", "WRITE", "FLUSH", "FLUSH", "COMMIT", "DISC"]
    assert rig.gate.holds == 1
    assert fake.disk == bytearray(rig.path.read_bytes())
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_no_reply_within_the_timeout_is_a_failure(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE, [Script(hang_from_write=2), Script()])
    rig = Rig(tmp_path, listen(fake), reply_timeout=30.0)

    async def hang() -> None:
        await within(fake.next_connection() if not fake.sessions else succeed(fake.sessions[0]))
        await within(fake.sessions[0].hung)
        rig.clock.advance(29.9)
        assert rig.source.state == "bulk_pass"
        rig.clock.advance(0.1)

    await fail_then_retry(rig, fake, hang)
    assert "no reply within 30.0 s" in rig.source.last_error


def succeed(value: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


@pytest_twisted.ensureDeferred
async def test_a_refused_reconnect_backs_off_doubling(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(
        SIZE, [Script(error_on_write=1), Script(hello=Hello.CLOSE_AT_ONCE), Script()]
    )
    rig = Rig(tmp_path, listen(fake))
    await within(rig.source.start())
    await rig.reached("migration", "retry_wait")
    rig.clock.advance(1.0)
    await rig.reached("migration", "renegotiating")
    # The second attempt is thrown out during its handshake: 2 s this time.
    await rig.reached("migration", "retry_wait")
    (retry,) = [c for c in rig.clock.getDelayedCalls() if c.active()]
    assert retry.getTime() - rig.clock.seconds() == pytest.approx(2.0)
    rig.clock.advance(2.0)
    result = await within(rig.source.finished)
    assert result.handed_off and rig.source.job.attempts == 2  # attempts count bulk passes
    assert bytes(fake.disk) == rig.original
    rig.replays()


# -- the commit's outcome unknown -------------------------------------------------


@pytest.mark.parametrize("commit", [Commit.CLOSE, Commit.HANG])
@pytest_twisted.ensureDeferred
async def test_a_lost_ack_is_in_doubt(tmp_path: Path, listen: Any, commit: Commit) -> None:
    fake = FakeDestination(SIZE, [Script(commit=commit)])
    rig = Rig(tmp_path, listen(fake))
    await within(rig.source.start())
    await rig.reached("migration", "committing")
    assert rig.export.state == "handing_off"
    with pytest.raises(CannotBreak):
        rig.source.cancel()
    await within(fake.sessions[0].hung)
    if commit is Commit.HANG:
        rig.clock.advance(60.0)
    await rig.reached("migration", "in_doubt")
    assert rig.export.state == "in_doubt" and not rig.export.has_control
    assert rig.gate.holding and rig.gate.disconnected == []
    assert not rig.source.finished.called
    with pytest.raises(CannotBreak, match="in_doubt"):
        rig.source.cancel()
    rig.source.resolve(handed_off=False)
    result = await within(rig.source.finished)
    assert result.state == "failed"
    assert rig.export.state == "serving" and not rig.gate.holding
    rig.replays()


# -- break ------------------------------------------------------------------------


class StallingConnector:
    """Connects for real, except the attempts listed, which never connect."""

    def __init__(self, stall: set[int]) -> None:
        self.stall = stall
        self.calls = 0
        self.real = tcp_connector(reactor)

    def __call__(self, destination: Destination, factory: Factory, timeout: float) -> Any:
        self.calls += 1
        if self.calls in self.stall:
            return Deferred()
        return self.real(destination, factory, timeout)


async def to_state(rig: Rig, fake: FakeDestination, state: str) -> None:
    rig.source.start()
    if state == "dirty_pass":
        await rig.reached("migration", "bulk_pass")
        rig.gate.write(0, b"x")
    if state == "quiescing":
        await rig.reached("migration", "bulk_pass")
        rig.gate.begin_write(0, b"x")  # never lands: the hold never fires
    if state == "reconnecting":
        await rig.reached("migration", "retry_wait")
        rig.clock.advance(1.0)
    if state == "renegotiating":
        await rig.reached("migration", "retry_wait")
        rig.clock.advance(1.0)
    await rig.reached("migration", state)


BREAKABLE: dict[str, tuple[list[Script], set[int]]] = {
    "connecting": ([Script()], {1}),
    "negotiating": ([Script(hello=Hello.SILENT)], set()),
    "bulk_pass": ([Script(hang_from_write=1)], set()),
    "dirty_pass": ([Script(hang_from_write=5)], set()),  # bulk: 4 writes
    "quiescing": ([Script()], set()),
    "retry_wait": ([Script(error_on_write=1)], set()),
    "reconnecting": ([Script(error_on_write=1)], {2}),
    "renegotiating": ([Script(error_on_write=1), Script(hello=Hello.SILENT)], set()),
}


@pytest.mark.parametrize("state", list(BREAKABLE))
@pytest_twisted.ensureDeferred
async def test_break_in_every_breakable_state(tmp_path: Path, listen: Any, state: str) -> None:
    scripts, stall = BREAKABLE[state]
    fake = FakeDestination(SIZE, scripts)
    rig = Rig(tmp_path, listen(fake), connector=StallingConnector(stall))
    await to_state(rig, fake, state)
    holding = rig.gate.holding
    rig.source.cancel()
    result = await within(rig.source.finished)
    assert result == MirrorResult("cancelled", False, "break")
    assert rig.source.state == "cancelled"
    assert rig.export.state == "serving"
    assert not rig.gate.holding and rig.gate.releases == (1 if holding else 0)
    assert [c for c in rig.clock.getDelayedCalls() if c.active()] == []
    assert rig.untouched() or state in ("dirty_pass", "quiescing")
    if rig.source.outcome is not None and not rig.source.outcome.ok:
        assert rig.source.outcome.message == "Mirror was cancelled"
    with pytest.raises(NotMirroring):
        rig.source.cancel()
    with pytest.raises(NotMirroring):
        rig.source.set_max_bps(1)
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_break_refused_while_committing(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE, [Script(commit=Commit.HANG)])
    rig = Rig(tmp_path, listen(fake))
    rig.source.start()
    await rig.reached("migration", "committing")
    with pytest.raises(CannotBreak, match="committing"):
        rig.source.cancel()
    assert rig.source.state == "committing" and rig.export.state == "handing_off"


# -- the bandwidth limit on the simulated clock ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_limit_paces_requests_and_can_change_mid_run(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE)
    rig = Rig(tmp_path, listen(fake), max_bps=MIB, max_data_length=256 * KIB)
    await within(rig.source.start())
    # A 100 ms burst, then one 256 KiB request every 0.25 s.
    (pace,) = [c for c in rig.clock.getDelayedCalls() if c.active()]
    assert pace.getTime() - rig.clock.seconds() == pytest.approx(0.25 - 0.1)
    rig.source.set_max_bps(4 * MIB)  # the waiting request is repaid at the new rate
    assert pace.getTime() - rig.clock.seconds() == pytest.approx((0.25 - 0.1) / 4)
    assert rig.source.progress().migration_speed_limit == 4 * MIB
    rig.source.set_max_bps(None)
    assert pace.getTime() == rig.clock.seconds()
    rig.clock.advance(0)
    result = await within(rig.source.finished)
    assert result.handed_off and bytes(fake.disk) == rig.original


@pytest_twisted.ensureDeferred
async def test_a_low_limit_cuts_requests_to_a_seconds_worth(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE)
    rig = Rig(tmp_path, listen(fake), max_bps=100 * KIB, max_data_length=MIB)
    await within(rig.source.start())
    paced = [c for c in rig.clock.getDelayedCalls() if c.active()]
    assert len(paced) == 1  # the next request waits for the limiter
    rig.source.set_max_bps(None)
    rig.clock.advance(0)
    result = await within(rig.source.finished)
    assert result.handed_off and bytes(fake.disk) == rig.original
    (session,) = fake.sessions
    # 100 KiB/s rounds down to 64 KiB requests (never silent for more than a
    # second): the first extent went in pieces; once the limit is lifted the
    # next extent (512 KiB) goes whole.
    assert session.write_lengths[:16] == [64 * KIB] * 16
    assert session.write_lengths[16:] == [512 * KIB]


def test_start_refuses_an_export_that_is_not_serving(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 1)
    rig.export.trigger("migrate")
    with pytest.raises(Exception, match="not serving"):
        rig.source.start()
    with pytest.raises(ValueError, match="stop_process"):
        MirrorSource(
            rig.export,
            Destination("h", 1),
            gate=rig.gate,
            clock=rig.rclock,
            connector=tcp_connector(reactor),
        )


# -- flexnbd: the stream of `flexnbd mirror`, into a `flexnbd listen` ------------------


@pytest_twisted.ensureDeferred
async def test_flexnbd_mirror_hands_off_with_disc(tmp_path: Path, listen: Any) -> None:
    fake = FakeFlexnbdListener(SIZE)
    rig = Rig(tmp_path, listen(fake), flexnbd=True)
    outcome = await within(rig.source.start())
    assert outcome == StartOutcome(True, MIRROR_STARTED, plain_target=False)
    result = await within(rig.source.finished)
    assert result.state == "completed" and result.handed_off
    await within(fake.sessions[-1].lost)
    assert bytes(fake.disk) == rig.original
    (session,) = fake.sessions
    # Only writes (zeroes too: the hello has no WRITE_ZEROES) and the FLUSH
    # that ends the bulk pass, then the switchover's FLUSH and DISC.
    assert set(session.commands[:-2]) == {"WRITE", "FLUSH"}
    assert session.commands.index("FLUSH") == len(session.commands) - 3
    assert session.commands[-2:] == ["FLUSH", "DISC"]
    assert session.handles == {MIRROR}
    covered = sorted(session.writes)
    assert covered[0][0] == 0 and sum(length for _, length in covered) >= SIZE
    assert fake.control_arrived
    assert rig.export.state == "handed_off" and not rig.export.has_control
    assert rig.states("role")[-2:] == ["handing_off", "handed_off"]
    assert rig.states("migration")[-2:] == ["committing", "completed"]
    assert rig.source.counters.zero_requests == 0
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_flexnbd_mirror_sends_one_request_at_a_time(tmp_path: Path, listen: Any) -> None:
    fake = FakeFlexnbdListener(SIZE)
    rig = Rig(tmp_path, listen(fake), flexnbd=True, max_data_length=64 * KIB)
    await within(rig.source.start())
    seen: list[int] = []
    pump = rig.source.copier.pump

    def counting(attempt: Any) -> None:
        pump(attempt)
        seen.append(len(attempt.in_flight))

    rig.source.copier.pump = counting  # type: ignore[method-assign]
    result = await within(rig.source.finished)
    assert result.handed_off and seen and max(seen) == 1
    assert bytes(fake.disk) == rig.original


@pytest_twisted.ensureDeferred
async def test_flexnbd_mirror_refuses_another_size(tmp_path: Path, listen: Any) -> None:
    fake = FakeFlexnbdListener(SIZE, [ListenerScript(size=SIZE * 2)])
    rig = Rig(tmp_path, listen(fake), flexnbd=True)
    outcome = await within(rig.source.start())
    assert outcome.reply == "1: Remote size does not match local size"
    await assert_failed_and_serving(rig)
    assert fake.sessions[0].commands == []


@pytest_twisted.ensureDeferred
async def test_flexnbd_mirror_wants_an_oldstyle_hello(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE)  # a ferry listener: newstyle
    rig = Rig(tmp_path, listen(fake), flexnbd=True)
    outcome = await within(rig.source.start())
    assert outcome.message == REJECTED and "oldstyle" in outcome.detail
    await assert_failed_and_serving(rig)


@pytest_twisted.ensureDeferred
async def test_flexnbd_mirror_retries_after_a_close_mid_stream(tmp_path: Path, listen: Any) -> None:
    fake = FakeFlexnbdListener(SIZE, [ListenerScript(close_on_write=2), ListenerScript()])
    rig = Rig(tmp_path, listen(fake), flexnbd=True)
    outcome = await within(rig.source.start())
    assert outcome.ok
    await rig.reached("migration", "retry_wait")
    assert rig.export.state == "migrating"
    rig.clock.advance(1.0)
    result = await within(rig.source.finished)
    assert result.state == "completed" and result.handed_off
    assert rig.source.job.attempts == 2 and len(fake.sessions) == 2
    await within(fake.sessions[1].lost)
    assert not fake.sessions[0].disc and fake.sessions[1].disc
    assert bytes(fake.disk) == rig.original
    assert rig.export.state == "handed_off"
    rig.replays()


# -- write-blocking (ferry.migrate.mirroring) ---------------------------------------


async def until(condition: Any) -> None:
    """Let the reactor run until ``condition()`` holds (TimeoutError past the deadline)."""
    deadline = reactor.seconds() + DEADLINE
    while not condition():
        if reactor.seconds() > deadline:
            raise TimeoutError("the condition never held")
        await task.deferLater(reactor, 0.001, lambda: None)


async def past_the_first_mib(
    tmp_path: Path, listen: Any, fake: FakeDestination
) -> tuple[Rig, Any, Attempt]:
    """A write-blocking migration at 1 MiB/s on the test's clock, stopped by its limiter after
    its first MiB and the hole, both answered: behind the bulk pass's cursor lies what is
    copied."""
    rig = Rig(tmp_path, listen(fake), max_bps=MIB, copy_mode=CopyMode.WRITE_BLOCKING)
    assert (await within(rig.source.start())).ok
    session = fake.sessions[-1]
    rig.clock.advance(1)  # past the limiter's burst: the first MiB goes, then the hole
    await within(session.arrived("WRITE_ZEROES"))
    attempt = rig.source.attempt
    await until(lambda: not attempt.in_flight)  # the first MiB and the hole answered
    return rig, session, attempt


@pytest_twisted.ensureDeferred
async def test_write_blocking_mirrors_what_is_copied_and_marks_the_rest(
    tmp_path: Path, listen: Any
) -> None:
    """A limit of 1 MiB/s on the test's clock stops the bulk pass after its first MiB: behind
    it a client write waits for the destination's answer; in the range of a request not yet
    read it is the pass's; past the pass's cursor it is marked for the next pass."""
    fake = FakeDestination(SIZE)
    rig, session, _attempt = await past_the_first_mib(tmp_path, listen, fake)
    plan = rig.source.job.plan
    assert plan is not None and plan.cursor == 3 * MIB + 512 * KIB  # [3, 3.5) MiB: paced
    assert rig.gate.write(4096, b"m" * 4096)
    mirrored = rig.gate.held_replies.pop(4096)
    assert not mirrored.called  # the destination has not answered yet
    await within(mirrored)
    assert fake.disk[4096 : 2 * 4096] == b"m" * 4096  # there before the pass could bring it
    assert rig.source.stats.mirrored_writes == 1
    assert rig.source.stats.mirrored_bytes == 4096
    # A TRIM behind the pass: ferry's image reads zeroes there, so WRITE_ZEROES goes too.
    rig.image.punch_hole(MIB - 8192, 8192)
    trim = Request(0, Command.TRIM, CommandFlag(0), MIB - 8192, 8192)
    trimmed = rig.export.note_write(MIB - 8192, 8192, trim)
    assert trimmed is not None and not trimmed.called
    await within(trimmed)
    assert fake.disk[MIB - 8192 : MIB] == bytes(8192)
    assert session.commands.count("WRITE_ZEROES") == 2  # the hole's, and the TRIM's
    assert rig.gate.write(3 * MIB, b"p" * 4096)  # in the paced request, not yet read
    assert rig.gate.write(SIZE - 4096, b"t" * 4096)  # past the cursor, a hole
    assert not rig.gate.held_replies  # both answered at once
    assert rig.source.dirty.dirty_bytes == 4096  # only the one past the cursor
    rig.clock.advance(1)  # the paced request goes
    result = await within(rig.source.finished)
    assert result.handed_off
    expected = bytearray(rig.original)
    for offset, data in [(4096, b"m"), (3 * MIB, b"p"), (SIZE - 4096, b"t")]:
        expected[offset : offset + 4096] = data * 4096
    expected[MIB - 8192 : MIB] = bytes(8192)
    assert fake.disk == expected
    assert rig.source.stats.mirrored_writes == 2
    rig.replays()


@pytest_twisted.ensureDeferred
async def test_a_pass_request_waits_for_the_mirrored_write_of_its_range(
    tmp_path: Path, listen: Any
) -> None:
    """Two overlapping writes are never on the wire at once: the dirty pass takes a block a
    mirrored write is on its way to, reads it, and sends it only after that write's answer."""
    # Data-carrying requests: 1 the first MiB, 2 the hole, 3 the mirrored write (held).
    fake = FakeDestination(SIZE, [Script(hold_write=3)])
    rig, session, attempt = await past_the_first_mib(tmp_path, listen, fake)
    rig.export.note_write(8192, 4096)  # a write that failed here: marked dirty, not mirrored
    assert rig.gate.write(8192, b"m" * 4096)
    mirrored = rig.gate.held_replies.pop(8192)
    await until(lambda: session.held_write is not None)
    assert not mirrored.called
    rig.clock.advance(1)  # the paced request goes, the bulk pass ends, the dirty pass takes 8192
    await until(lambda: rig.source.state == "dirty_pass" and attempt.reading == 1)
    (waiting,) = attempt.mirrors.values()
    assert (waiting.offset, len(waiting.waiters)) == (8192, 1)  # the pass's request, parked
    writes = session.commands.count("WRITE")
    session.release_write()
    await within(mirrored)
    await within(session.arrived("WRITE", writes + 1))  # now it goes
    result = await within(rig.source.finished)
    assert result.handed_off
    expected = bytearray(rig.original)
    expected[8192 : 8192 + 4096] = b"m" * 4096
    assert fake.disk == expected


@pytest_twisted.ensureDeferred
async def test_the_switchover_waits_for_the_mirrored_writes(tmp_path: Path, listen: Any) -> None:
    """Clients held, the last pass starts only once every mirrored write is answered, so
    it and its FLUSH cover them all."""
    fake = FakeDestination(SIZE, [Script(hold_write=3)])
    rig, session, _attempt = await past_the_first_mib(tmp_path, listen, fake)
    assert rig.gate.write(8192, b"m" * 4096)
    mirrored = rig.gate.held_replies.pop(8192)
    await until(lambda: session.held_write is not None)
    rig.clock.advance(1)  # the paced request goes; nothing is dirty: switch over
    await rig.reached("role", "quiescing")
    await until(lambda: "FLUSH" in session.commands)  # the FLUSH before the decision
    assert rig.source.state == "quiescing" and rig.source.job.plan is None  # no last pass yet
    assert not mirrored.called
    session.release_write()
    await within(mirrored)
    result = await within(rig.source.finished)
    assert result.handed_off
    assert session.commands[-3:] == ["FLUSH", "COMMIT", "DISC"]
    expected = bytearray(rig.original)
    expected[8192 : 8192 + 4096] = b"m" * 4096
    assert fake.disk == expected


@pytest_twisted.ensureDeferred
async def test_a_failed_mirrored_write_is_answered_marked_and_the_attempt_retried(
    tmp_path: Path, listen: Any
) -> None:
    """The destination answers the mirrored write EIO: the client's write is answered (it
    is on the source), the attempt is lost, and the retry brings the write over."""
    # Data-carrying requests: 1 the first MiB, 2 the hole, 3 the mirrored write.
    fake = FakeDestination(SIZE, [Script(error_on_write=3), Script()])
    rig, _session, _attempt = await past_the_first_mib(tmp_path, listen, fake)
    assert rig.gate.write(8192, b"x" * 4096)
    await within(rig.gate.held_replies.pop(8192))  # answered, not failed
    await rig.reached("migration", "retry_wait")
    assert rig.source.last_failure == "write_error"
    assert "mirrored write of [8192, 12288) failed: EIO" in rig.source.last_error
    assert rig.source.stats.mirrored_writes == 0
    assert rig.export.state == "migrating" and rig.export.has_control
    # The retry's backoff, then its pacing: the test's clock moves on while the wire works.
    await until(lambda: rig.clock.advance(0.5) or rig.source.finished.called)
    result = await within(rig.source.finished)
    assert result.handed_off and len(fake.sessions) == 2
    expected = bytearray(rig.original)
    expected[8192 : 8192 + 4096] = b"x" * 4096
    assert fake.disk == expected


@pytest_twisted.ensureDeferred
async def test_a_lost_destination_answers_every_mirrored_write(tmp_path: Path, listen: Any) -> None:
    """The destination hangs: the reply timeout gives the attempt up, and with it every
    mirrored write on its wire is marked dirty and its client answered."""
    fake = FakeDestination(SIZE, [Script(hang_from_write=3), Script()])
    rig, session, _attempt = await past_the_first_mib(tmp_path, listen, fake)
    for offset in (0, 65536):
        assert rig.gate.write(offset, b"h" * 4096)
    await within(session.hung)
    replies = [rig.gate.held_replies.pop(0), rig.gate.held_replies.pop(65536)]
    assert not any(reply.called for reply in replies)  # waiting for the destination
    rig.clock.advance(60)  # the reply timeout
    for reply in replies:
        await within(reply)
    assert rig.source.last_failure == "reply_timeout"
    assert rig.source.dirty.dirty_bytes == 2 * 4096  # marked for the retry (and it copies all)
    rig.source.cancel()
    result = await within(rig.source.finished)
    assert result.state == "cancelled" and rig.export.state == "serving"
