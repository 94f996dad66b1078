"""The local lockspace across real processes: exclusion, hand-over, and death by SIGKILL.

Each holder is a separate ``python`` process driving ``LocalLockspace``
through a line protocol on its stdin/stdout, so the locks really are in
different processes, as two ferry nodes' would be.  Every wait is on a
line from a pipe or on a process exit, with a deadline; nothing sleeps.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Deadline, read_line

pytestmark = pytest.mark.integration

IMAGE = "/srv/images/vm1.img"
DEADLINE = 30.0

# One command per line in, one answer per line out:
#   acquire OWNER MODE | take_over OWNER TOKEN  ->  ok TOKEN      (the grant is kept)
#   offer | renew | release                      ->  ok [TOKEN]
#   inquire                                      ->  holders OWNER/MODE/TOKEN ... | holders -
#   any failure                                  ->  error TYPE message
HOLDER = r"""
import sys
from twisted.python.failure import Failure
from ferry.lease.backend import Grant, LeaseMode
from ferry.lease.local import LocalLockspace

space, resource = LocalLockspace(sys.argv[1]), sys.argv[2]
grant = None

def call(command, args):
    if command == "acquire":
        return space.acquire(resource, args[0], LeaseMode(args[1]))
    if command == "take_over":
        return space.take_over(resource, args[0], int(args[1]))
    if command == "inquire":
        return space.inquire(resource)
    return getattr(space, command)(grant)

for line in sys.stdin:
    command, *args = line.split()
    answers = []
    call(command, args).addBoth(answers.append)
    got = answers[0]
    if isinstance(got, Failure):
        print("error", type(got.value).__name__, got.value, flush=True)
    elif isinstance(got, Grant):
        grant = got
        print("ok", got.token, flush=True)
    elif command == "inquire":
        listed = " ".join(f"{h.owner}/{h.mode.value}/{h.token}" for h in got)
        print("holders", listed or "-", flush=True)
    else:
        print("ok", flush=True)
"""


class Holder:
    """A process holding (or trying to hold) leases in the lockspace at ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(directory), IMAGE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        line = read_line(self.proc.stdout, Deadline(DEADLINE))
        assert line, f"the holder exited: {self.proc.wait(timeout=DEADLINE)}"
        return line.decode().rstrip("\n")

    def kill(self) -> None:
        """SIGKILL: no chance to release anything; the kernel drops its locks."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=DEADLINE) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[list[Holder]]:
    started = [Holder(tmp_path) for _ in range(3)]
    yield started
    for holder in started:
        holder.close()


def test_exclusive_holders_in_two_processes_exclude_each_other(holders: list[Holder]) -> None:
    a, b, observer = holders
    assert a.ask("acquire node-a exclusive") == "ok 1"
    assert b.ask("acquire node-b exclusive") == (
        f"error LeaseConflict lease on {IMAGE} is held by node-a (exclusive, token 1)"
    )
    assert b.ask("acquire node-b shared").startswith("error LeaseConflict")
    assert observer.ask("inquire") == "holders node-a/exclusive/1"
    assert a.ask("renew") == "ok"


def test_a_process_killed_with_sigkill_releases_its_lease(holders: list[Holder]) -> None:
    a, b, observer = holders
    assert a.ask("acquire node-a exclusive") == "ok 1"
    a.kill()
    assert observer.ask("inquire") == "holders -"
    assert b.ask("acquire node-b exclusive") == "ok 2"


def test_shared_holders_in_several_processes(holders: list[Holder]) -> None:
    a, b, writer = holders
    assert a.ask("acquire reader-a shared") == "ok 0"
    assert b.ask("acquire reader-b readonly") == "ok 0"
    assert writer.ask("acquire writer exclusive").startswith("error LeaseConflict")
    a.kill()
    assert writer.ask("inquire") == "holders reader-b/readonly/0"
    assert writer.ask("acquire writer exclusive").startswith("error LeaseConflict")
    b.kill()
    assert writer.ask("acquire writer exclusive") == "ok 1"


def test_a_lease_handed_over_between_processes(holders: list[Holder]) -> None:
    source, destination, other = holders
    assert source.ask("acquire src exclusive") == "ok 1"
    assert source.ask("offer") == "ok 1"
    assert other.ask("acquire other exclusive").startswith("error LeaseConflict")
    assert destination.ask("take_over dst 9").startswith("error LeaseConflict")
    assert destination.ask("take_over dst 1") == "ok 2"
    assert source.ask("renew") == (
        f"error LeaseLost lease on {IMAGE} is now held by dst (exclusive, token 2)"
    )
    assert source.ask("take_over src 1").startswith("error LeaseConflict")  # too late to cancel
    assert other.ask("inquire") == "holders dst/exclusive/2"
    destination.kill()
    assert other.ask("acquire other exclusive") == "ok 3"


def test_the_last_holder_to_leave_removes_the_file_and_tokens_go_on(
    holders: list[Holder], tmp_path: Path
) -> None:
    a, b, observer = holders
    assert a.ask("acquire node-a shared") == "ok 0"
    assert b.ask("acquire node-b shared") == "ok 0"
    assert a.ask("release") == "ok"
    assert len(list(tmp_path.glob("*.lock"))) == 1  # node-b still reads it
    assert b.ask("release") == "ok"
    assert list(tmp_path.glob("*.lock")) == []
    assert a.ask("acquire node-a exclusive") == "ok 1"
    assert a.ask("release") == "ok"
    assert list(tmp_path.glob("*.lock")) == []
    assert observer.ask("inquire") == "holders -"
    assert b.ask("acquire node-b exclusive") == "ok 2"  # a new file, a larger token


def test_an_offerer_that_dies_leaves_a_stale_offer(holders: list[Holder]) -> None:
    source, destination, _ = holders
    assert source.ask("acquire src exclusive") == "ok 1"
    assert source.ask("offer") == "ok 1"
    source.kill()
    # The token still matches, so the commit's take-over works ...
    assert destination.ask("take_over dst 1") == "ok 2"
    assert destination.ask("release") == "ok"
    # ... and with nobody left, an ordinary acquire does too.
    assert destination.ask("acquire dst exclusive") == "ok 3"
