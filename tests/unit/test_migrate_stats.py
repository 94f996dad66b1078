"""Migration retries, failures and completions are counted by their reason, and exported.

Each failure is made to happen for real, by a scripted fake destination over
loopback TCP (the :class:`Rig` of ``test_migrate_source``, whose timers run
on a ``task.Clock``); the counters are read from the source, and at the end
from ``/metrics`` as a node renders it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fakes.destination import Commit, FakeDestination, Hello, Migrate, Script
from ferry.exports import ExportConfig, ExportUnit
from ferry.metrics import make_registry
from ferry.migrate.core.stats import FailureReason
from ferry.migrate.manager import MirrorManager
from ferry.migrate.options import Destination, FinishAction, MirrorOptions
from ferry.migrate.wire import tcp_connector
from ferry.nbd.constants import Errno

from .test_migrate_source import SIZE, Rig, free_port, reactor, succeed, within
from .test_migrate_source import listen as listen  # the fixture

R = FailureReason


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (None, R.CONNECT),
        (Script(hello=Hello.SILENT), R.NO_HELLO),
        (Script(hello=Hello.CLOSE_AT_ONCE), R.CONNECTION_LOST),
        (Script(migrate=Migrate.REFUSE), R.REJECTED),
        (Script(size=SIZE + 4096), R.SIZE_MISMATCH),
    ],
    ids=["refused", "no-hello", "closed", "refused-migration", "size"],
)
@pytest_twisted.ensureDeferred
async def test_a_failed_first_negotiation_is_a_failure_by_reason(
    tmp_path: Path, listen: Any, script: Script | None, reason: FailureReason
) -> None:
    port = free_port() if script is None else listen(FakeDestination(SIZE, [script]))
    rig = Rig(tmp_path, port)
    started = rig.source.start()
    if reason is R.NO_HELLO:
        await rig.reached("migration", "negotiating")
        rig.clock.advance(5.0)
    await within(started)
    result = await within(rig.source.finished)
    assert result.state == "failed"
    stats = rig.source.stats
    assert dict(stats.failures) == {reason: 1}
    assert not stats.retries and stats.completed == 0


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (Script(error_on_write=2), R.WRITE_ERROR),
        (Script(close_on_write=2), R.CONNECTION_LOST),
        (Script(error_on_flush=1), R.FLUSH_ERROR),
        (Script(commit=Commit.REFUSE), R.COMMIT_REJECTED),
        (Script(hang_from_write=2), R.REPLY_TIMEOUT),
    ],
    ids=["write-error", "closed", "flush-error", "commit-rejected", "hang"],
)
@pytest_twisted.ensureDeferred
async def test_a_lost_attempt_is_a_retry_by_reason(
    tmp_path: Path, listen: Any, script: Script, reason: FailureReason
) -> None:
    fake = FakeDestination(SIZE, [script, Script()])
    rig = Rig(tmp_path, listen(fake), reply_timeout=30.0)
    assert (await within(rig.source.start())).ok
    if reason is R.REPLY_TIMEOUT:
        await within(fake.next_connection() if not fake.sessions else succeed(fake.sessions[0]))
        await within(fake.sessions[0].hung)
        rig.clock.advance(30.0)
    await rig.reached("migration", "retry_wait")
    assert dict(rig.source.stats.retries) == {reason: 1}
    rig.clock.advance(1.0)  # the backoff
    result = await within(rig.source.finished)
    assert result.state == "completed"
    stats = rig.source.stats
    assert dict(stats.retries) == {reason: 1}
    assert not stats.failures and stats.completed == 1


@pytest_twisted.ensureDeferred
async def test_an_in_doubt_commit_settled_as_not_taken_is_a_failure(
    tmp_path: Path, listen: Any
) -> None:
    fake = FakeDestination(SIZE, [Script(commit=Commit.CLOSE)])
    rig = Rig(tmp_path, listen(fake))
    await within(rig.source.start())
    await rig.reached("migration", "in_doubt")
    assert not rig.source.stats.failures  # not yet: nobody knows
    rig.source.resolve(handed_off=False)
    await within(rig.source.finished)
    assert dict(rig.source.stats.failures) == {R.IN_DOUBT: 1}
    assert not rig.source.stats.retries and rig.source.stats.completed == 0


@pytest_twisted.ensureDeferred
async def test_the_counters_outlive_each_job_and_export_every_reason(
    tmp_path: Path, listen: Any
) -> None:
    rig = Rig(tmp_path, free_port())  # only its export and gate are used
    manager = MirrorManager(
        rig.export, gate=rig.gate, clock=rig.rclock, connector=tcp_connector(reactor)
    )
    options = MirrorOptions(action=FinishAction.NOTHING)
    refused = Destination("127.0.0.1", free_port())
    for _ in range(2):
        await within(manager.mirror(refused, options))
        await within(manager.finished())
    fake = FakeDestination(SIZE)
    await within(manager.mirror(Destination("127.0.0.1", listen(fake)), options))
    await within(manager.finished())

    unit = ExportUnit(ExportConfig(str(rig.path)), rig.export, manager)
    text = generate_latest(make_registry(lambda: [unit])).decode()
    samples = {
        (s.name, s.labels.get("reason")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("ferry_migration_", "ferry_migrations_"))
    }
    expected = {
        ("ferry_migrations_completed_total", None): 1.0,
        # Status fields, not counters: no blocker, and the last job's last attempt did not fail.
        ("ferry_migration_blockers", None): 0.0,
        ("ferry_migration_last_failure_info", None): 1.0,
    }
    for reason in FailureReason:
        expected["ferry_migration_retries_total", reason.value] = 0.0
        expected["ferry_migration_failures_total", reason.value] = 2.0 if reason is R.CONNECT else 0
    assert samples == expected


@pytest_twisted.ensureDeferred
async def test_no_space_at_the_destination_fails_at_once(tmp_path: Path, listen: Any) -> None:
    fake = FakeDestination(SIZE, [Script(error_on_write=2, write_errno=Errno.ENOSPC), Script()])
    rig = Rig(tmp_path, listen(fake))
    assert (await within(rig.source.start())).ok
    await rig.reached("migration", "retry_wait")
    rig.clock.advance(0)  # the policy decides after the transition
    result = await within(rig.source.finished)
    assert result.state == "failed" and result.reason.startswith("no_space: ")
    assert "failed: ENOSPC" in result.reason
    assert dict(rig.source.stats.failures) == {R.NO_SPACE: 1}
    assert not rig.source.stats.retries and len(fake.sessions) == 1
    assert rig.export.state == "serving"


@pytest.mark.parametrize(
    ("policy", "lost"), [({"max_retries": 2}, 3), ({"retry_for": 2.5}, 3)], ids=["count", "time"]
)
@pytest_twisted.ensureDeferred
async def test_the_retry_policy_gives_up_with_the_last_reason(
    tmp_path: Path, listen: Any, policy: dict[str, Any], lost: int
) -> None:
    scripts = [Script(close_on_write=2) for _ in range(5)]
    fake = FakeDestination(SIZE, scripts)
    rig = Rig(tmp_path, listen(fake), **policy)
    assert (await within(rig.source.start())).ok
    while not rig.source.job.final:
        await rig.reached("migration", "retry_wait")
        rig.clock.advance(1.0)  # the backoff (1 s, 2 s, ...), or the policy's decision
        rig.clock.advance(1.0)
    result = await within(rig.source.finished)
    assert result.state == "failed" and result.reason.startswith("connection_lost: ")
    assert len(fake.sessions) == lost
    stats = rig.source.stats
    assert dict(stats.retries) == {R.CONNECTION_LOST: lost - 1}
    assert dict(stats.failures) == {R.CONNECTION_LOST: 1}
    assert rig.source.last_failure == "connection_lost"
