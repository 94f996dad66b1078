"""A migration moves the image's lease with control: real ``ferry serve`` and ``ferry listen``.

Both ends name the same resource in the same lockspace (a local directory,
then a real etcd).  After the handoff the destination holds the lease with a
larger token and the source holds nothing; when the destination cannot take
the lease (another resource name here), the commit is refused, the source
keeps the lease and serves on, and ``break`` leaves it there.  Every
migration's data is compared byte for byte.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcd_support import EtcdServer, etcd_fixture
from fakes.commit_cutter import CommitCutter, Cut
from support import (
    FERRY,
    FerryProcess,
    mirror_command,
    random_file,
    run,
    serve,
    serve_args,
    sparse_file,
    status,
    wait_until,
)

pytestmark = pytest.mark.integration

__all__ = ["etcd_fixture"]  # the fixture, for pytest

SIZE = 8 << 20



@contextlib.contextmanager
def pair(
    tmp_path: Path,
    space: str,
    source_resource: str,
    dest_resource: str | None,
    dest_space: str | None = None,
) -> Iterator[tuple[FerryProcess, FerryProcess, Path, Path]]:
    source_image = random_file(tmp_path / "source.img", SIZE, seed=5)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    procs = []
    try:
        for mode, image, lockspace, resource in (
            ("serve", source_image, space, source_resource),
            ("listen", dest_image, dest_space or space, dest_resource),
        ):
            args = ["--sock", str(tmp_path / f"{mode}.sock"), "--lockspace", lockspace]
            if resource is not None:
                args += ["--resource", resource]
            procs.append(serve(image, *args, mode=mode))
        yield procs[0], procs[1], source_image, dest_image
    finally:
        for proc in procs:
            proc.stop()


def mirror_args(tmp_path: Path, dest: FerryProcess, *extra: str) -> list[str]:
    """``ferry mirror`` of the ``serve`` of :func:`pair` to ``dest``, action nothing."""
    return mirror_command(dest.port, tmp_path / "serve.sock", "--action", "nothing", *extra)


def mirror(tmp_path: Path, dest: FerryProcess, *extra: str) -> str:
    return run(mirror_args(tmp_path, dest, *extra), timeout=120).stdout.decode()


def check_handoff(tmp_path: Path, dest: FerryProcess, source_image: Path, dest_image: Path) -> None:
    before = status(tmp_path / "serve.sock")
    assert before["lease_state"] == "held"
    out = mirror(tmp_path, dest, "--wait")
    assert out.rstrip().endswith("has control of the image"), out
    source, destination = status(tmp_path / "serve.sock"), status(tmp_path / "listen.sock")
    assert (source["state"], source["lease_state"]) == ("handed_off", "released")
    assert (destination["state"], destination["lease_state"]) == ("serving", "held")
    assert int(destination["lease_token"]) > int(before["lease_token"])
    assert source_image.read_bytes() == dest_image.read_bytes()


def test_the_lease_moves_with_control_on_a_local_lockspace(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    with pair(tmp_path, f"local:{locks}", "vm1", "vm1") as (_, dest, source_image, dest_image):
        assert status(tmp_path / "listen.sock")["lease_state"] == "incoming"
        check_handoff(tmp_path, dest, source_image, dest_image)
        # The lockspace agrees: a third server for vm1 is refused, naming the destination.
        lease = ["--lockspace", f"local:{locks}", "--resource", "vm1"]
        third = run(
            [*FERRY, "serve", "-l", "127.0.0.1", "-p", "0", "-f", str(source_image), *lease],
            check=False,
        )
        assert third.returncode == 1
        assert f":{dest.proc.pid}:" in third.stderr.decode()
    # Both stopped: the last holder (the destination) removed the lock file.
    assert list(locks.glob("*.lock")) == []


def test_the_lease_moves_with_control_on_etcd(tmp_path: Path, etcd: EtcdServer) -> None:
    space = f"etcd:{etcd.url}"
    resource = f"vm-{tmp_path.name}"
    with pair(tmp_path, space, resource, resource) as (_, dest, source_image, dest_image):
        check_handoff(tmp_path, dest, source_image, dest_image)


def test_a_listener_told_another_lease_refuses_the_source_at_once(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    with pair(tmp_path, f"local:{locks}", "vm1", "another") as (source, dest, *_):
        refused = run(mirror_args(tmp_path, dest), check=False)
        assert refused.returncode == 1
        assert refused.stderr.decode() == (
            "ferry: Mirror was rejected: the destination refused the migration: ERR_POLICY: "
            "this listener takes over the lease 'another'; the source holds 'vm1'\n"
        )
        line = source.wait_for_log("the source holds")
        assert "'another'" in line and "'vm1'" in line
        source = status(tmp_path / "serve.sock")
        assert (source["state"], source["lease_state"]) == ("serving", "held")


def test_a_listener_not_told_takes_over_whatever_the_source_holds(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    with pair(tmp_path, f"local:{locks}", "vm7", None) as (_, dest, source_image, dest_image):
        assert status(tmp_path / "listen.sock")["lease_state"] == "incoming"
        check_handoff(tmp_path, dest, source_image, dest_image)


def test_a_destination_that_cannot_take_the_lease_leaves_it_with_the_source(
    tmp_path: Path,
) -> None:
    # Same lease name, but the destination looks in another lockspace, where
    # the source's token means nothing: the take-over fails at the commit.
    ours, theirs = tmp_path / "locks", tmp_path / "elsewhere"
    ours.mkdir(mode=0o700)
    theirs.mkdir(mode=0o700)
    with pair(tmp_path, f"local:{ours}", "vm1", "vm1", f"local:{theirs}") as (source, dest, *_):
        assert run(mirror_args(tmp_path, dest)).stdout.decode().strip() == ("Mirror started")
        assert "lease" in source.wait_for_log("commit refused")
        during = status(tmp_path / "serve.sock")
        assert during["lease_state"] == "held" and during["has_control"] == "true"
        # No retry can give the destination the lease: the migration ends failed.
        wait_until(
            "the migration ended",
            lambda: status(tmp_path / "serve.sock")["is_migrating"] == "false",
        )
        after = status(tmp_path / "serve.sock")
        assert (after["state"], after["lease_state"]) == ("serving", "held")
        assert after["migration_last_failure"] == "lease_refused"
        assert status(tmp_path / "listen.sock")["has_control"] == "false"


# -- the acknowledgement lost: the lease settles in_doubt, both ways (on etcd) ---------


def mirror_through(tmp_path: Path, cutter: CommitCutter) -> subprocess.CompletedProcess[bytes]:
    """``ferry mirror --wait`` to the relay in front of the listener."""
    command = mirror_command(cutter.port, tmp_path / "serve.sock", "--action", "nothing", "--wait")
    return run(command, check=False, timeout=120)


def test_an_ack_lost_after_the_commit_is_settled_as_handed_off(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    space, resource = f"etcd:{etcd.url}", f"vm-{tmp_path.name}"
    with pair(tmp_path, space, resource, resource) as (source, dest, source_image, dest_image):
        before = status(tmp_path / "serve.sock")
        with CommitCutter(dest.port, Cut.AFTER_COMMIT) as cutter:
            out = mirror_through(tmp_path, cutter)
            assert cutter.done.is_set() and cutter.error is None
        # The destination committed and serves; the source never heard it,
        # went in_doubt, and the lease (now the destination's) settled it.
        assert "the lease says handed_off" in source.wait_for_log("the lease says")
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode().rstrip().endswith("has control of the image")
        after, destination = status(tmp_path / "serve.sock"), status(tmp_path / "listen.sock")
        assert (after["state"], after["lease_state"]) == ("handed_off", "released")
        assert (destination["state"], destination["lease_state"]) == ("serving", "held")
        assert int(destination["lease_token"]) > int(before["lease_token"])
        assert source_image.read_bytes() == dest_image.read_bytes()


def test_a_commit_lost_before_the_destination_is_settled_as_serving(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    space, resource = f"etcd:{etcd.url}", f"vm-{tmp_path.name}"
    with pair(tmp_path, space, resource, resource) as (source, dest, source_image, _):
        with CommitCutter(dest.port, Cut.BEFORE_COMMIT) as cutter:
            out = mirror_through(tmp_path, cutter)
            assert cutter.done.is_set() and cutter.error is None
        assert "the lease says serving" in source.wait_for_log("the lease says")
        assert out.returncode == 1
        assert "did not commit" in out.stderr.decode(), out.stderr
        after, destination = status(tmp_path / "serve.sock"), status(tmp_path / "listen.sock")
        assert (after["state"], after["has_control"], after["lease_state"]) == (
            "serving",
            "true",
            "held",
        )
        assert (destination["state"], destination["has_control"]) == ("listening", "false")
        assert destination["lease_state"] != "held"
        # The source took its lease back: it serves writes, and nobody else may.
        run(
            [*FERRY, "write", "-l", "127.0.0.1", "-p", str(source.port), "-F", "0", "-S", "5"],
            input=b"still",
        )
        assert source_image.read_bytes()[:5] == b"still"
        lease = ("--lockspace", space, "--resource", resource)
        third = run([*FERRY, *serve_args(source_image, *lease)], check=False)
        assert third.returncode == 1 and f":{source.proc.pid}:" in third.stderr.decode()


def test_break_mid_migration_leaves_the_lease_with_the_source_on_etcd(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    space, resource = f"etcd:{etcd.url}", f"vm-{tmp_path.name}"
    with pair(tmp_path, space, resource, resource) as (source, dest, source_image, dest_image):
        before = status(tmp_path / "serve.sock")
        # Slow enough (8 MiB at 1 MiB/s) that the break lands in the bulk pass.
        assert run(mirror_args(tmp_path, dest, "--max-bps", "1M")).returncode == 0
        source.wait_for_log("negotiated")
        stopped = run([*FERRY, "break", "--sock", str(tmp_path / "serve.sock")])
        assert stopped.stdout.decode().strip() == "mirror stopped"
        after, destination = status(tmp_path / "serve.sock"), status(tmp_path / "listen.sock")
        assert (after["state"], after["lease_state"]) == ("serving", "held")
        assert after["lease_token"] == before["lease_token"]
        assert (destination["has_control"], destination["lease_state"]) == ("false", "incoming")
        # And the next migration moves it.
        check_handoff(tmp_path, dest, source_image, dest_image)


def test_a_read_only_export_refuses_to_hand_control_over(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    image = random_file(tmp_path / "source.img", SIZE, seed=6)
    lease = ["--lockspace", f"local:{locks}"]
    source = serve(image, "--read-only", *lease, "--sock", str(tmp_path / "serve.sock"))
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    dest = serve(dest_image, *lease, "--sock", str(tmp_path / "listen.sock"), mode="listen")
    try:
        refused = run(mirror_args(tmp_path, dest), check=False)
        # One answer, at once: no attempt after attempt failing at the switchover.
        assert refused.returncode == 1
        assert refused.stderr.decode().startswith("ferry: Mirror was rejected: a read-only export")
        assert "read-only export cannot hand control over" in source.wait_for_log("read-only")
        after = status(tmp_path / "serve.sock")
        assert (after["state"], after["is_migrating"], after["lease_state"]) == (
            "serving",
            "false",
            "held",
        )
        assert status(tmp_path / "listen.sock")["state"] == "listening"
    finally:
        for proc in (source, dest):
            proc.stop()


# -- a source stopped in the middle ----------------------------------------------------


def test_sigterm_to_a_source_mid_migration_stops_it_cleanly(tmp_path: Path) -> None:
    """The node breaks its migration before it closes the image: exit 0, no traceback,
    the destination listens again, and the source's lease is released."""
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    with pair(tmp_path, f"local:{locks}", "vm1", "vm1") as (source, dest, *_):
        # 8 MiB at 1 MiB/s: the SIGTERM lands in the bulk pass.
        assert run(mirror_args(tmp_path, dest, "--max-bps", "1M")).returncode == 0
        source.wait_for_log("negotiated")
        assert status(tmp_path / "listen.sock")["state"] == "receiving"
        assert source.stop() == 0
        stderr = source.stderr_text()
        assert "Traceback" not in stderr and "Unhandled" not in stderr, stderr
        assert "ended cancelled" in stderr
        dest.wait_for_log("listening again")
        after = status(tmp_path / "listen.sock")
        assert (after["state"], after["has_control"]) == ("listening", "false")
        # Nobody holds vm1 any more: the next server takes it at once.
        lease = ["--lockspace", f"local:{locks}", "--resource", "vm1"]
        third = serve(tmp_path / "source.img", *lease)
        assert third.stop() == 0
    assert list(locks.glob("*.lock")) == []
