"""Attacks on real ``ferry`` processes, each one that once worked against ferry.

Every test plays the attacker's part by hand (a forged migration sender, a
process in the lockspace's way at the worst moment) and then checks ferry's
promise: no node serves without its lease, no two nodes have control of one
image, a listener is never left unable to take the real migration, and the
real data arrives byte for byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.commit_cutter import CommitCutter, Cut
from fakes.forged_sender import ForgedSender
from ferry.lease.local import lock_file_name
from ferry.nbd.constants import Errno, OptionReply
from support import (
    FERRY,
    FerryProcess,
    mirror_command,
    random_file,
    run,
    serve,
    sparse_file,
    status,
)

pytestmark = pytest.mark.integration

SIZE = 8 << 20
F_OFD_SETLK = 37



@contextlib.contextmanager
def source_and_listener(
    tmp_path: Path, resource: str
) -> Iterator[tuple[FerryProcess, FerryProcess, Path, Path, Path]]:
    """``serve`` holding ``resource`` and a ``listen --resource`` for it, one local lockspace."""
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    lease = ["--lockspace", f"local:{locks}", "--resource", resource]
    source_image = random_file(tmp_path / "source.img", SIZE, seed=11)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    source = serve(source_image, *lease, "--sock", str(tmp_path / "serve.sock"))
    try:
        dest = serve(dest_image, *lease, "--sock", str(tmp_path / "listen.sock"), mode="listen")
        try:
            yield source, dest, source_image, dest_image, locks
        finally:
            dest.stop()
    finally:
        source.stop()


def test_a_forged_commit_is_answered_and_the_real_source_still_migrates(tmp_path: Path) -> None:
    """A sender naming no lease commits to ``listen --resource vm1`` while vm1 is held.

    Once, the listener took its own lease for the commit, found vm1 held,
    and never answered: it stayed ``committing`` for minutes, refusing the
    real source.  Now the commit is refused with the reason, at once, and
    the listener takes the real migration.
    """
    with source_and_listener(tmp_path, "vm1") as (_, dest, source_image, dest_image, _locks):
        forged = ForgedSender(dest.port, SIZE, resource="")
        assert forged.option is not None and forged.option.reply == OptionReply.ACK
        assert forged.negotiated is not None
        assert forged.write(0, b"attacker's bytes").error == Errno.OK
        reply = forged.commit(0)
        forged.close()
        assert reply.error == Errno.EPERM
        assert reply.message.startswith("cannot take the lease: lease on vm1 is held by ")
        listening = status(tmp_path / "listen.sock")
        assert (listening["state"], listening["has_control"]) == ("listening", "false")
        out = run(
            mirror_command(dest.port, tmp_path / "serve.sock", "--action", "nothing", "--wait"),
            timeout=120,
        ).stdout.decode()
        assert out.rstrip().endswith("has control of the image"), out
        assert dest_image.read_bytes() == source_image.read_bytes()
        assert status(tmp_path / "listen.sock")["lease_state"] == "held"


def test_a_lease_kept_from_the_source_at_the_commit_fences_it(tmp_path: Path) -> None:
    """Someone locks the lease's file while it is offered, then lets go.

    Once, the destination's take-over failed, the source could not take its
    lease back either, went back to ``migrating`` with ``has_control=true``
    and no lease, retried forever, and a second server acquired the lease
    beside it.  Now the source is fenced: it has no control, serves no I/O,
    and only then can anyone else have the lease.
    """
    held: list[int] = []

    def in_the_way() -> None:
        # The offer let go of the hold byte: take it (as a local user who
        # could open the file once could; now only this user can).
        fd = os.open(locks / lock_file_name("vm1"), os.O_RDONLY)
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 1, 0))
        held.append(fd)

    with source_and_listener(tmp_path, "vm1") as (source, dest, source_image, _, locks):
        before = source_image.read_bytes()
        with CommitCutter(dest.port, Cut.NEVER, on_commit=in_the_way) as relay:
            command = mirror_command(relay.port, tmp_path / "serve.sock", "--action", "nothing")
            out = run([*command, "--wait"], check=False, timeout=120)
            assert relay.done.is_set() and relay.error is None
        assert out.returncode == 1, out.stdout
        source.wait_for_log("fenced")
        fenced = status(tmp_path / "serve.sock")
        assert (fenced["state"], fenced["has_control"], fenced["is_migrating"]) == (
            "fenced",
            "false",
            "false",
        )
        assert fenced["lease_state"] in ("fenced", "released")
        listening = status(tmp_path / "listen.sock")
        assert (listening["state"], listening["has_control"]) == ("listening", "false")
        # The fenced source touches nothing.
        refused = run(
            [*FERRY, "write", "-l", "127.0.0.1", "-p", str(source.port), "-F", "0", "-S", "4"],
            input=b"evil",
            check=False,
        )
        assert refused.returncode != 0
        assert source_image.read_bytes() == before
        for fd in held:
            os.close(fd)
        # Only now may another server have the lease: exactly one has control.
        third = serve(
            source_image,
            "--lockspace",
            f"local:{locks}",
            "--resource",
            "vm1",
            "--sock",
            str(tmp_path / "third.sock"),
        )
        try:
            assert status(tmp_path / "third.sock")["has_control"] == "true"
            assert status(tmp_path / "serve.sock")["has_control"] == "false"
        finally:
            third.stop()


# -- who may hand a listener an image ---------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (
            ["--addr", "0.0.0.0"],
            "ferry: listen on 0.0.0.0 admits migration senders only from the addresses its ACL "
            "names: name the source hosts as ACL entries (ferry listen ... ADDRESS ...), or "
            "authenticate them by certificate (--tls require --tls-verify-peer)\n",
        ),
        (
            ["--addr", "127.0.0.1", "--oldstyle"],
            "ferry: listen --oldstyle takes flexnbd's migration, which cannot authenticate: "
            "name the source hosts as ACL entries (ferry listen ... ADDRESS ...)\n",
        ),
    ],
    ids=["network-without-acl", "oldstyle-without-acl"],
)
def test_a_listener_that_would_take_an_image_from_anyone_refuses_to_start(
    tmp_path: Path, extra: list[str], line: str
) -> None:
    image = sparse_file(tmp_path / "dest.img", SIZE)
    args = ["listen", "--port", "0", "--file", str(image), "--lockspace", "none", *extra]
    refused = run([*FERRY, *args], check=False, timeout=60)
    assert (refused.returncode, refused.stderr.decode()) == (1, line)


def test_a_sender_the_acl_does_not_name_cannot_hand_over_an_image(tmp_path: Path) -> None:
    """The attack: a forged sender commits its own bytes to a listener on the network.

    The listener names its real source (127.0.0.2, which ``ferry mirror
    --bind`` sends from); the forger, from 127.0.0.1, is refused before it
    can write a byte, and the real source migrates.
    """
    source_image = random_file(tmp_path / "source.img", SIZE, seed=12)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    before = dest_image.read_bytes()
    lease = ["--lockspace", "none"]
    source = serve(source_image, *lease, "--sock", str(tmp_path / "serve.sock"))
    listen = ["listen", "--addr", "0.0.0.0", "--port", "0", "--file", str(dest_image)]
    dest = FerryProcess(
        [*listen, *lease, "--sock", str(tmp_path / "listen.sock"), "127.0.0.2"]
    ).wait_serving()
    try:
        with pytest.raises(ConnectionError):  # the ACL closes it at once
            ForgedSender(dest.port, SIZE, resource="")
        assert dest_image.read_bytes() == before
        assert status(tmp_path / "listen.sock")["state"] == "listening"
        mirror = mirror_command(dest.port, tmp_path / "serve.sock", "--action", "nothing")
        out = run([*mirror, "--bind", "127.0.0.2", "--wait"], timeout=120).stdout.decode()
        assert out.rstrip().endswith("has control of the image"), out
        assert dest_image.read_bytes() == source_image.read_bytes()
    finally:
        dest.stop()
        source.stop()


# -- paths another user prepared -------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory like /tmp: anyone may create files in it; only their owner may remove them.

    Made in /tmp itself, so another user can reach it (pytest's own
    directories are private to root).
    """
    top = Path(tempfile.mkdtemp(prefix="ferry-attack-", dir="/tmp"))
    try:
        top.chmod(0o711)
        directory = top / "shared"
        directory.mkdir()
        directory.chmod(0o1777)
        yield directory
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("option", ["--trace", "--log"])
def test_a_symlink_planted_at_a_trace_or_log_path_is_refused(
    tmp_path: Path, shared: Path, option: str
) -> None:
    """The attack: root's ferry once appended its trace to whatever the symlink named."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    planted = shared / "ferry.jsonl"
    planted.symlink_to(victim)
    image = sparse_file(tmp_path / "disk.img", SIZE)
    args = ["serve", "--addr", "127.0.0.1", "--port", "0", "--file", str(image)]
    args += ["--lockspace", "none", option]
    refused = run([*FERRY, *args, str(planted)], check=False, timeout=60)
    what = "trace file" if option == "--trace" else "log file"
    assert (refused.returncode, refused.stderr.decode()) == (
        1,
        f"ferry: {what} {planted} is a symbolic link: refusing to follow it\n",
    )
    assert victim.read_bytes() == b"precious\n"


def test_a_trace_in_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: anyone could swap the file
    image = sparse_file(tmp_path / "disk.img", SIZE)
    trace = open_dir / "t.jsonl"
    args = ["serve", "--addr", "127.0.0.1", "--port", "0", "--file", str(image)]
    refused = run([*FERRY, *args, "--lockspace", "none", "--trace", str(trace)], check=False)
    assert refused.returncode == 1
    assert refused.stderr.decode() == (
        f"ferry: trace file {trace}: others may write to its directory {open_dir} "
        "(mode 0777) and replace it: use a directory of your own\n"
    )


FAKE_SERVER = r"""
import os, socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    try:
        conn.recv(65536)
        conn.sendall(b"0: pid=1 size=1 has_control=true forged=yes\n")
    except OSError:
        pass  # the victim hung up without a word: the attack failed
    conn.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a server as another user")
def test_a_socket_another_user_planted_is_neither_believed_nor_taken_over(
    tmp_path: Path, shared: Path
) -> None:
    """The attack: root's ferry status printed a forged line; its acl went to the attacker."""
    import subprocess

    sock = shared / "ctl.sock"
    fake = subprocess.Popen(
        ["/usr/bin/python3", "-c", FAKE_SERVER, str(sock)],
        user=NOBODY,
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == b"listening\n"
        for command in (["status"], ["acl", "10.0.0.0/8"]):
            asked = run([*FERRY, *command, "--sock", str(sock)], check=False, timeout=60)
            assert asked.returncode == 1
            assert asked.stderr.decode() == (
                f"ferry: control socket {sock}: the server there runs as uid {NOBODY}, "
                "neither this user nor root: refusing to talk to it\n"
            )
            assert b"forged" not in asked.stdout
        image = sparse_file(tmp_path / "disk.img", SIZE)
        args = ["serve", "--addr", "127.0.0.1", "--port", "0", "--file", str(image)]
        refused = run([*FERRY, *args, "--lockspace", "none", "--sock", str(sock)], check=False)
        assert refused.returncode == 1
        assert f"control socket {sock}: belongs to uid {NOBODY}" in refused.stderr.decode()
    finally:
        fake.kill()
        fake.wait()
