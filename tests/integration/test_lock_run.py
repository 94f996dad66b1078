"""``ferry lock run`` and ``ferry lock status`` as real processes, on both lockspaces.

Each run is a real supervisor with a real child (``sh -c``), so exit
statuses, signals and SIGKILL are the kernel's, not a double's.  The child
writes to the supervisor's stdout, which it inherits: a child's ``ready``
line on the test's pipe is the event the test waits for, with a deadline.
A holder that must stay alive reads a line from its stdin, which the test
writes when it is done with it; nothing sleeps to synchronise.

Most tests run the lock commands through a small script that builds
``ferry``'s parser with just them (:data:`LOCK`), so they test the
supervisor without depending on how ``ferry.cli`` wires its modes; the
tests at the end run ``python -m ferry lock`` itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from etcd_support import MIN_TTL, EtcdServer, etcd_fixture
from support import FERRY, Deadline, free_port, read_line

pytestmark = pytest.mark.integration

__all__ = ["etcd_fixture"]  # the module's etcd fixture: pytest finds it by its name, "etcd"

DEADLINE = 30.0
HOST = socket.gethostname()

# The lock commands exactly as `ferry` parses and runs them (cli.Parser,
# cli.UserError), without `ferry.cli.build_parser`'s list of modes.
STANDALONE = """
import sys
from ferry import cli
from ferry.cli.lock import add_lock_commands

parser = cli.Parser(prog="ferry")
add_lock_commands(parser.add_subparsers(dest="mode", parser_class=cli.Parser))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.run(args))
except cli.UserError as error:
    print(f"ferry: {error}", file=sys.stderr)
    sys.exit(1)
"""
LOCK = [sys.executable, "-c", STANDALONE, "lock"]

# A child that says it is running, then waits for a line on stdin.
HOLD = ["sh", "-c", "echo ready; read line"]


class LockRun:
    """One ``lock run`` in a child process, its stdin and stdout pipes kept."""

    def __init__(self, lockspace: str, resource: str, *options: str, command: Sequence[str]):
        where = ["--lockspace", lockspace, "--resource", resource]
        self.proc = subprocess.Popen(
            [*LOCK, "run", *where, *options, "--", *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its command is in its process group: close() ends both
        )

    @property
    def owner(self) -> str:
        return f"{HOST}:{self.proc.pid}:lock-run"

    def line(self, deadline: Deadline | None = None) -> str:
        """The command's next line on stdout (b"" at its end)."""
        assert self.proc.stdout is not None
        return read_line(self.proc.stdout, deadline or Deadline(DEADLINE)).decode().rstrip("\n")

    def ready(self) -> LockRun:
        assert self.line() == "ready", self.finish()
        return self

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def finish(self, timeout: float = DEADLINE) -> tuple[int, str]:
        """Wait for the supervisor's exit: its status and everything it said on stderr."""
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode()

    def close(self) -> None:
        """Kill the supervisor and whatever its command left, then read the pipes to their end.

        A command that outlived its supervisor (a test that failed half-way)
        holds the pipes open: it must go too, or this waits for ever.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=DEADLINE)


@pytest.fixture
def runs() -> Iterator[list[LockRun]]:
    """Every run a test starts is gone when it ends, whatever happened."""
    started: list[LockRun] = []
    yield started
    for run in started:
        run.close()


@pytest.fixture
def space(tmp_path: Path) -> str:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    return f"local:{locks}"


def lock(*args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCK, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def status(space: str, *resource: str) -> list[str]:
    result = lock("status", "--lockspace", space, *(["--resource", *resource] if resource else []))
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout.splitlines()


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ferry: ")
    return lines[0]


# -- exit status ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("exit 0", 0),
        ("exit 3", 3),
        ("kill -USR1 $$", 128 + signal.SIGUSR1),  # killed by a signal: 128 + its number
    ],
)
def test_the_commands_exit_status_is_ferrys(
    space: str, runs: list[LockRun], script: str, expected: int
) -> None:
    runs.append(run := LockRun(space, "job", command=["sh", "-c", f"echo ready; {script}"]))
    run.ready()
    assert run.finish() == (expected, "")
    assert status(space, "job") == ["nobody holds job"]  # released on the way out
    assert list(Path(space.removeprefix("local:")).glob("*.lock")) == []  # and no file left


# -- exclusion -----------------------------------------------------------------------


def test_a_second_exclusive_run_fails_at_once_naming_the_holder(
    space: str, runs: list[LockRun], tmp_path: Path
) -> None:
    runs.append(first := LockRun(space, "backup", command=HOLD))
    first.ready()
    [held] = status(space, "backup")
    assert held.startswith(f"backup: {first.owner} (exclusive, token ")
    token = int(held.rsplit(" ", 1)[1].rstrip(")"))

    marker = tmp_path / "second-ran"
    started = time.monotonic()
    second = lock("run", "--lockspace", space, "--resource", "backup", "--", "touch", str(marker))
    assert time.monotonic() - started < 5  # refused, not queued behind the holder
    assert second.returncode == 1
    assert one_line(second.stderr) == (
        f"ferry: lease on backup is held by {first.owner} (exclusive, token {token})"
    )
    assert not marker.exists()

    first.send("done\n")
    assert first.finish() == (0, "")
    assert status(space, "backup") == ["nobody holds backup"]


def test_shared_runs_coexist_and_exclude_an_exclusive_one(
    space: str, runs: list[LockRun], tmp_path: Path
) -> None:
    runs.append(a := LockRun(space, "disk", "--shared", command=HOLD))
    runs.append(b := LockRun(space, "disk", "--readonly", "--owner", "reader-b", command=HOLD))
    a.ready()
    b.ready()
    # Every lockspace lists shared holders by owner, whichever slot each took.
    assert status(space, "disk") == sorted(
        [f"disk: {a.owner} (shared, token 0)", "disk: reader-b (readonly, token 0)"]
    )
    marker = tmp_path / "writer-ran"
    writer = lock("run", "--lockspace", space, "--resource", "disk", "--", "touch", str(marker))
    assert writer.returncode == 1
    assert one_line(writer.stderr).startswith("ferry: lease on disk is held by ")
    assert not marker.exists()
    for run in (a, b):
        run.send("done\n")
        assert run.finish() == (0, "")


# -- signals -------------------------------------------------------------------------

# Traps four signals (saying so) and exits 42 on SIGTERM.  `wait` returns
# early when a trapped signal arrives, so each trap runs at once.
TRAPPER = """
for sig in INT HUP USR1 USR2; do trap "echo $sig" $sig; done
trap 'echo TERM; kill $pid; exit 42' TERM
sleep 60 > /dev/null 2>&1 & pid=$!  # off the pipes: dash now and then leaves it running
echo ready
while kill -0 $pid 2>/dev/null; do wait $pid; done  # not a busy loop once sleep ends
"""


def test_signals_sent_to_ferry_reach_the_command(space: str, runs: list[LockRun]) -> None:
    runs.append(run := LockRun(space, "job", command=["sh", "-c", TRAPPER]))
    run.ready()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        run.proc.send_signal(sig)
        assert run.line() == sig.name[3:]  # the command trapped it; ferry is still there
    run.proc.send_signal(signal.SIGTERM)
    assert run.line() == "TERM"
    assert run.finish() == (42, "")
    assert status(space, "job") == ["nobody holds job"]


# -- what cannot run -----------------------------------------------------------------


def test_an_unreachable_lockspace_is_one_line_and_the_command_never_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    for space, words in (
        (f"etcd:http://127.0.0.1:{free_port()}", "no etcd endpoint answered"),
        (f"local:{tmp_path / 'missing'}", "does not exist"),
    ):
        result = lock("run", "--lockspace", space, "--resource", "r", "--", "touch", str(marker))
        assert result.returncode == 1, result
        line = one_line(result.stderr)
        assert line.startswith("ferry: cannot take the lease on r: ") and words in line
        assert not marker.exists()


def test_a_command_that_cannot_run_takes_no_lease(space: str) -> None:
    result = lock("run", "--lockspace", space, "--resource", "r", "--", "no-such-command-here")
    assert result.returncode == 127
    assert one_line(result.stderr) == (
        "ferry: no-such-command-here: command not found (or not executable)"
    )
    assert status(space) == [f"nobody holds a lease in {space}"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--resource", "r"], "name the command to run"),
        (["--resource", "r", "--ttl", "2", "--", "true"], "--ttl is for an etcd lockspace"),
        (["--resource", "r", "--ttl", "0", "--", "true"], "must be more than 0 seconds"),
        (["--resource", "r", "--shared", "--readonly", "--", "true"], "not allowed with"),
        (["--", "true"], "--resource"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(space: str, args: list[str], words: str) -> None:
    result = lock("run", "--lockspace", space, *args)
    assert result.returncode == 2, result
    assert words in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_a_bad_lockspace_is_a_usage_error() -> None:
    result = lock("status", "--lockspace", "nowhere:x")
    assert result.returncode == 2
    assert "unknown scheme" in result.stderr.splitlines()[-1]


# -- lock status on a local lockspace -------------------------------------------------


def test_status_names_holders_modes_and_tokens_on_a_local_lockspace(
    space: str, runs: list[LockRun]
) -> None:
    assert status(space, "vm1") == ["nobody holds vm1"]
    runs.append(vm1 := LockRun(space, "vm1", command=HOLD))
    runs.append(vm2 := LockRun(space, "vm2", "--shared", "--owner", "reader", command=HOLD))
    vm1.ready()
    vm2.ready()
    [line] = status(space, "vm1")
    assert line.startswith(f"vm1: {vm1.owner} (exclusive, token ")
    # Without a name: a local lockspace lists its lock files (named by a hash of the resource).
    from ferry.lease.local import lock_file_name

    directory = space.removeprefix("local:")
    assert sorted(status(space)) == sorted(
        [
            f"{directory}/{lock_file_name('vm1')}: {line.split(': ', 1)[1]}",
            f"{directory}/{lock_file_name('vm2')}: reader (shared, token 0)",
        ]
    )
    for run in (vm1, vm2):
        run.send("done\n")
        assert run.finish() == (0, "")
    assert status(space) == [f"nobody holds a lease in {space}"]
    # The last holder of each removed its file; the token mark stays.
    assert sorted(path.name for path in Path(directory).iterdir()) == ["tokens"]


# -- on etcd -------------------------------------------------------------------------


def test_status_on_etcd_lists_resources_by_name(etcd: EtcdServer, runs: list[LockRun]) -> None:
    space = f"etcd:{etcd.url}"
    runs.append(a := LockRun(space, "/srv/a.img", command=HOLD))
    runs.append(b := LockRun(space, "/srv/b.img", "--readonly", command=HOLD))
    a.ready()
    b.ready()
    [held_a] = status(space, "/srv/a.img")
    assert held_a.startswith(f"/srv/a.img: {a.owner} (exclusive, token ")
    token_b = int(status(space, "/srv/b.img")[0].rsplit(" ", 1)[1].rstrip(")"))
    assert status(space) == [held_a, f"/srv/b.img: {b.owner} (readonly, token {token_b})"]
    refused = lock("run", "--lockspace", space, "--resource", "/srv/a.img", "--", "true")
    assert (refused.returncode, one_line(refused.stderr)) == (
        1,
        f"ferry: lease on /srv/a.img is held by {held_a.split(': ', 1)[1]}",
    )
    for run in (a, b):
        run.send("done\n")
        assert run.finish() == (0, "")
    assert status(space, "/srv/a.img") == ["nobody holds /srv/a.img"]


def test_on_etcd_a_lost_lease_kills_the_command_within_the_ttl(
    etcd: EtcdServer, runs: list[LockRun]
) -> None:
    ttl = 2 * MIN_TTL
    space = f"etcd:{etcd.url}"
    command = ["sh", "-c", "echo $$; echo ready; exec sleep 60"]
    runs.append(run := LockRun(space, "/srv/c.img", "--ttl", str(ttl), command=command))
    pid = int(run.line())
    run.ready()
    # The local deadline is the last confirmed renewal's send time + ttl - margin,
    # so from the pause on the command has less than the TTL left.
    with etcd.paused():
        paused_at = time.monotonic()
        assert run.proc.wait(timeout=DEADLINE) == 137
        took = time.monotonic() - paused_at
    _, err = run.finish()
    assert one_line(err) == (
        "ferry: lease on /srv/c.img lost (no renewal confirmed before the deadline); "
        f"killed sh (pid {pid}) with SIGKILL"
    )
    assert took < ttl, f"the command outlived the lease's TTL: killed after {took:.2f} s"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- through `ferry` itself -----------------------------------------------------------


def test_ferry_has_the_lock_commands(space: str) -> None:
    listed = subprocess.run([*FERRY, "--help"], capture_output=True, text=True, check=True)
    assert "lock" in listed.stdout.split()
    run = [*FERRY, "lock", "run", "--lockspace", space, "--resource", "r"]
    result = subprocess.run(
        [*run, "--", "sh", "-c", "exit 5"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert (result.returncode, result.stderr) == (5, "")
    shown = subprocess.run(
        [*FERRY, "lock", "status", "--lockspace", space, "--resource", "r"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert (shown.returncode, shown.stdout) == (0, "nobody holds r\n")
